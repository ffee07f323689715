"""What a compiled model saves for its backward beyond the eager one: every saved tensor's shape and dtype,
and the attention ops each compiled graph runs.

    python benchmarks/compiled_saved.py [--device cuda] [--models bert llama] [--layers 2] [--batch B]
        [--seq S] [--tiny] [--unpatched] [--no-eager] [--compiled model model-nomask blocks]

Builds ``benchmarks/train_step.py``'s models (BERT-base with its attention dropout 0.1, batch 32 x 512; the
Llama-3-8B layer, 2 x 4096; ``--tiny``: hidden 64, for the CPU), patched with ``actpatch.patch_model``'s
defaults (``--unpatched``: unpatched first), and runs one training forward eagerly, then compiled with
inductor: ``model``, ``torch.compile(model)``; ``blocks``, each block compiled in place before patching (as
train_step.py does); ``model-nomask``, ``torch.compile(model)`` with transformers' SDPA masks dropped while
tracing where eager mode drops them (no padding mask; an experiment, see :func:`skipping_masks`).  Each
storage saved for the backward is counted once (parameters excluded), grouped by (shape, dtype, stride),
with ``memory_allocated``'s growth over the forward on CUDA.  Inductor's post-grad hook lists each graph's
attention ops (the aten SDPA variant, or the math path's bmm, softmax and random draws) with their shapes,
and the forward graph's outputs of 3 or more dimensions (what it keeps for the backward).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys

import torch

import actpatch

ATTENTION_OPS = ("scaled_dot_product", "softmax", "dropout", "rand", "philox", "bernoulli", "expand", "bmm")


def build(name: str, layers: int, tiny: bool, device: str, dtype: torch.dtype):
    import transformers

    h = 64 if tiny else None
    if name == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=layers,
            hidden_size=h or 768,
            num_attention_heads=4 if tiny else 12,
            intermediate_size=4 * (h or 768),
            vocab_size=1000 if tiny else 30522,
        )
        model_class = transformers.BertForMaskedLM
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=h or 4096,
            intermediate_size=224 if tiny else 14336,
            num_attention_heads=4 if tiny else 32,
            num_key_value_heads=2 if tiny else 8,
            vocab_size=1000 if tiny else 128256,
            max_position_embeddings=8192,
        )
        model_class = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(cfg)
    return model.to(dtype).train()


def saved(run, model, inputs: dict) -> tuple[dict[tuple, list[int]], int]:
    """((shape, dtype, stride) -> bytes of each unique storage saved in one forward, the growth of
    ``memory_allocated`` over the forward (0 on the CPU)); the backward is run."""
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, tuple] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            dtype = str(t.dtype).replace("torch.", "")
            seen[st.data_ptr()] = (tuple(t.shape), dtype, tuple(t.stride()), st.nbytes())
        return t

    torch.manual_seed(1)
    cuda = next(model.parameters()).is_cuda
    allocated = lambda: torch.cuda.synchronize() or torch.cuda.memory_allocated() if cuda else 0  # noqa: E731
    before = allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run(**inputs).loss
    grown = allocated() - before
    loss.backward()
    for p in model.parameters():
        p.grad = None
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for shape, dtype, stride, nbytes in seen.values():
        groups[(shape, dtype, stride)].append(nbytes)
    return groups, grown


@contextlib.contextmanager
def skipping_masks():
    """transformers' SDPA masks dropped while tracing where eager mode drops them: no padding mask, and full
    attention, or causal attention with q_length == kv_length (SDPA's is_causal).  transformers 5.17 keeps
    them whenever it traces; 5.24 drops the full one under torch.compile as this does."""
    from transformers import masking_utils as mu

    causal, bidirectional = mu._ignore_causal_mask_sdpa, mu._ignore_bidirectional_mask_sdpa

    def causal_skip(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if padding_mask is None and (local_attention_size is None or kv_length < local_attention_size):
            return q_length == kv_length or q_length == 1
        return causal(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    def bidirectional_skip(padding_mask, kv_length, local_attention_size=None):
        if padding_mask is None and (local_attention_size is None or kv_length < local_attention_size):
            return True
        return bidirectional(padding_mask, kv_length, local_attention_size)

    mu._ignore_causal_mask_sdpa, mu._ignore_bidirectional_mask_sdpa = causal_skip, bidirectional_skip
    try:
        yield
    finally:
        mu._ignore_causal_mask_sdpa, mu._ignore_bidirectional_mask_sdpa = causal, bidirectional


GRAPHS: list[str] = []


def post_grad(graph: torch.fx.Graph) -> None:
    """Inductor's post-grad hook: the attention-related nodes of each graph, and a forward graph's outputs."""
    lines = []
    for node in graph.nodes:
        if node.op == "call_function" and any(k in str(node.target) for k in ATTENTION_OPS):
            val = node.meta.get("val")
            vals = val if isinstance(val, (list, tuple)) else [val]
            desc = [f"{tuple(v.shape)} {v.dtype}" for v in vals if isinstance(v, torch.Tensor)]
            args = [
                f"{tuple(a.meta['val'].shape)}{'' if a.meta['val'].is_contiguous() else ' strided'}"
                for a in node.args
                if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
            ]
            lines.append(f"  {node.target} args {args} -> {desc}")
    out = next(n for n in graph.nodes if n.op == "output")
    outs = [a for a in out.args[0] if isinstance(a, torch.fx.Node)]
    summary = collections.Counter(
        f"{tuple(a.meta['val'].shape)} {a.meta['val'].dtype} <- {a.target}"
        for a in outs
        if isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() >= 3
    )
    lines.append(f"  graph outputs ({len(outs)}), those of 3+ dims:")
    lines += [f"    {n} x {k}" for k, n in sorted(summary.items())]
    GRAPHS.append("\n".join(lines))


def blocks(model) -> torch.nn.ModuleList:
    """The model's longest ModuleList: its decoder / encoder layers."""
    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)


def table(title: str, measured: tuple[dict[tuple, list[int]], int], tokens: int) -> None:
    groups, grown = measured
    total = sum(sum(v) for v in groups.values())
    print(f"{title}: {total:,} B ({total / tokens:,.0f} B/token) saved; memory_allocated +{grown:,} B")
    for (shape, dtype, stride), sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {len(sizes):3d} x {shape} {dtype} stride {stride}: {sum(sizes) / tokens:,.0f} B/token")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["bert", "llama"], choices=["bert", "llama"])
    p.add_argument(
        "--compiled", nargs="+", default=["model", "blocks"], choices=["model", "blocks", "model-nomask"]
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--unpatched", action="store_true", help="also the unpatched model")
    p.add_argument("--no-eager", action="store_true", help="the compiled modes alone")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch._inductor.config.post_grad_custom_post_pass = post_grad
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device}")
    for name in args.models:
        b, s = {"bert": (32, 512), "llama": (2, 4096)}[name]
        b, s = args.batch or b, args.seq or s
        model = build(name, args.layers, args.tiny, args.device, dtype)
        ids = torch.randint(0, model.config.vocab_size, (b, s), device=args.device)
        inputs = {"input_ids": ids, "labels": ids}
        for patched in (False, True) if args.unpatched else (True,):
            tag = f"{name} {'patched' if patched else 'unpatched'}"
            for how in ("eager", *args.compiled)[args.no_eager :]:
                torch._dynamo.reset()
                GRAPHS.clear()
                run = model
                if how == "blocks":  # as train_step.py: compiled in place, then patched (compiled decisions)
                    for block in blocks(model):
                        block.compile()
                if patched:
                    actpatch.patch_model(model, batch_size=1, seq_len=256)
                if how.startswith("model"):
                    run = torch.compile(model)
                skip = skipping_masks() if how == "model-nomask" else contextlib.nullcontext()
                with skip:
                    if how != "eager":
                        saved(run, model, inputs)  # compiles
                    table(f"{tag} {how}", saved(run, model, inputs), b * s)
                if how != "eager":
                    print("  graphs (post-grad):")
                    print("\n".join(GRAPHS))
                for block in blocks(model):
                    block._compiled_call_impl = None
                if patched:
                    actpatch.unpatch_model(model)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
