"""Whole training step (forward + backward) with activations swapped by hand for actpatch's modules.

    python benchmarks/train_step.py [--device cuda] [--models gpt2-medium bert-base llama3-8b-layer]
                                    [--compile] [--compiled [model|blocks]] [--json FILE]
    python benchmarks/train_step.py --device cpu --quick     # smoke test with tiny shapes

Models are built from transformers configs with random weights, bf16 (float32 with --device cpu), in
training mode, loss = the model's own LM/MLM loss on random tokens.  Swaps: GPT-2 ``mlp.act`` (NewGELU, a
Python tanh formula) -> InvertedGELU("tanh"); BERT's GELU -> InvertedGELU(); Llama's SiLU -> InvertedSiLU();
llama3-8b-layer-gated: Llama's MLP computes down(silu_mul(gate(x), up(x))), as patch_model(gated=True) does.
llama3-8b-layer-liger: Liger-Kernel's SwiGLU (LigerSiLUMulFunction, as LigerSwiGLUMLP) instead, CUDA only;
llama3-8b-layer-liger-norm: Liger's SwiGLU and LigerRMSNorm (llama casting mode), CUDA only;
llama3-8b-layer-actpatch, gpt2-medium-actpatch, bert-base-actpatch: actpatch.patch_model with its defaults
(gated MLPs fused, norms keep their output where the next op saves it); -actpatch-dropouts: and dropouts=True;
llama3-8b-layer-silu-actpatch: patch_model(gated=False, norms=False), the SiLU inverted alone; a -compiled
suffix: patch_model(..., compiled=True), decisions made for training under torch.compile.
gpt2-medium-dropouts, bert-base-dropouts: the activation swap, and every nn.Dropout -> PackedDropout (its mask
kept as bits, as patch_model(dropouts=True) does; GPT-2 and BERT train with dropout 0.1).
bert-base-no-attention-dropout: bert-base with its attention-probability dropout at 0 (hidden dropout 0.1).

- step time: median of CUDA-event-timed steps (forward, backward, grads set to None), eager and patched
  measured alternately on one model instance;
- saved activation bytes per token per layer: memory_allocated after the forward minus before, as the slope
  between a 2-layer and a 4-layer model (embeddings, logits and loss drop out);
- --compile: torch.compile of the patched model, graph breaks counted by torch._dynamo, none may come from
  actpatch's ops;
- --compiled: step times and saved bytes of ``torch.compile(model)`` instead, eager and patched alike
  (each swap recompiles once, in the warm-up; actpatch's ops are opaque custom ops in the compiled graph,
  around which the compiler's partitioner chooses what to save); ``--compiled blocks``: each block (the items
  of the model's longest ModuleList: decoder / encoder layers) compiled on its own, as torchtitan compiles
  its models (the code between blocks, embeddings, masks and the loss head, stays eager).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from actpatch.functional import silu_mul
from actpatch.nn import InvertedGELU, InvertedSiLU, PackedDropout

# name: (config factory(layers, quick), batch, seq, layers for the step time, swap function)


def _gpt2(layers: int, quick: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    h = 64 if quick else 1024
    cfg = GPT2Config(n_layer=layers, n_embd=h, n_head=4 if quick else 16, n_positions=1024, vocab_size=50257)
    return GPT2LMHeadModel(cfg)


def _bert(layers: int, quick: bool, **overrides):
    from transformers import BertConfig, BertForMaskedLM

    h = 64 if quick else 768
    cfg = BertConfig(
        num_hidden_layers=layers,
        hidden_size=h,
        num_attention_heads=4 if quick else 12,
        intermediate_size=4 * h,
        **overrides,
    )
    return BertForMaskedLM(cfg)


def _bert_no_attention_dropout(layers: int, quick: bool):
    return _bert(layers, quick, attention_probs_dropout_prob=0.0)


def _llama(layers: int, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=64 if quick else 4096,
        intermediate_size=224 if quick else 14336,
        num_attention_heads=4 if quick else 32,
        num_key_value_heads=2 if quick else 8,
        vocab_size=1000 if quick else 128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    return LlamaForCausalLM(cfg)


def _swap_gpt2(model, patched: dict) -> None:
    for block in model.transformer.h:
        _swap(block.mlp, "act", InvertedGELU("tanh"), patched)


def _swap_bert(model, patched: dict) -> None:
    for layer in model.bert.encoder.layer:
        _swap(layer.intermediate, "intermediate_act_fn", InvertedGELU(), patched)


def _swap_dropouts(model, patched: dict) -> None:
    """Every nn.Dropout of the model -> PackedDropout(p): the same draws and gradients, masks kept as bits."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                _swap(parent, attr, PackedDropout(child.p), patched)


def _and_dropouts(swap):
    """``swap``, then every nn.Dropout -> PackedDropout."""

    def both(model, patched: dict) -> None:
        swap(model, patched)
        _swap_dropouts(model, patched)

    return both


def _swap_llama(model, patched: dict) -> None:
    for layer in model.model.layers:
        _swap(layer.mlp, "act_fn", InvertedSiLU(), patched)


def _swap_llama_gated(model, patched: dict) -> None:
    """The MLP fused as patch_model(gated=True) fuses it: down(silu_mul(gate(x), up(x)))."""
    for layer in model.model.layers:
        fused = lambda x, m=layer.mlp: m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x)))  # noqa: E731
        _swap(layer.mlp, "forward", fused, patched)


def _swap_llama_liger(model, patched: dict) -> None:
    """Liger-Kernel's fused SwiGLU, as LigerSwiGLUMLP computes it (keeps gate and up)."""
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    for layer in model.model.layers:
        m = layer.mlp
        fused = lambda x, m=m: m.down_proj(LigerSiLUMulFunction.apply(m.gate_proj(x), m.up_proj(x)))  # noqa: E731
        _swap(m, "forward", fused, patched)


def _swap_llama_liger_norm(model, patched: dict) -> None:
    """Liger's SwiGLU and LigerRMSNorm (casting mode "llama", HF's arithmetic) for both norms of a layer."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    _swap_llama_liger(model, patched)
    for layer in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            old = getattr(layer, name)
            new = LigerRMSNorm(
                old.weight.shape[0], eps=old.variance_epsilon, offset=0.0, casting_mode="llama"
            )
            new.weight = old.weight
            _swap(layer, name, new, patched)


def _patch_with(**options):
    """actpatch's own decision: patch_model with ``options`` (probed at a short sequence)."""

    def patch(model, patched: dict) -> None:
        import actpatch

        actpatch.patch_model(model, batch_size=1, seq_len=256, **options)
        patched["actpatch"] = lambda: actpatch.unpatch_model(model)

    return patch


def _swap(parent, attr: str, new, patched: dict) -> None:
    old = getattr(parent, attr)
    patched[(id(parent), attr)] = lambda: setattr(parent, attr, old)
    setattr(parent, attr, new)


def unswap(patched: dict) -> None:
    for undo in patched.values():
        undo()
    patched.clear()


MODELS = {
    "gpt2-medium": (_gpt2, 8, 1024, 12, _swap_gpt2),
    "bert-base": (_bert, 32, 512, 12, _swap_bert),
    "gpt2-medium-dropouts": (_gpt2, 8, 1024, 12, _and_dropouts(_swap_gpt2)),
    "bert-base-dropouts": (_bert, 32, 512, 12, _and_dropouts(_swap_bert)),
    "bert-base-no-attention-dropout": (_bert_no_attention_dropout, 32, 512, 12, _swap_bert),
    "llama3-8b-layer": (_llama, 2, 4096, 4, _swap_llama),
    "llama3-8b-layer-gated": (_llama, 2, 4096, 4, _swap_llama_gated),
    "llama3-8b-layer-liger": (_llama, 2, 4096, 4, _swap_llama_liger),
    "llama3-8b-layer-liger-norm": (_llama, 2, 4096, 4, _swap_llama_liger_norm),
    "llama3-8b-layer-actpatch": (_llama, 2, 4096, 4, _patch_with()),
    "llama3-8b-layer-actpatch-compiled": (_llama, 2, 4096, 4, _patch_with(compiled=True)),
    "llama3-8b-layer-silu-actpatch": (_llama, 2, 4096, 4, _patch_with(gated=False, norms=False)),
    "llama3-8b-layer-silu-actpatch-compiled": (
        _llama,
        2,
        4096,
        4,
        _patch_with(gated=False, norms=False, compiled=True),
    ),
    "gpt2-medium-actpatch": (_gpt2, 8, 1024, 12, _patch_with()),
    "gpt2-medium-actpatch-dropouts": (_gpt2, 8, 1024, 12, _patch_with(dropouts=True)),
    "gpt2-medium-actpatch-dropouts-compiled": (_gpt2, 8, 1024, 12, _patch_with(dropouts=True, compiled=True)),
    "bert-base-actpatch": (_bert, 32, 512, 12, _patch_with()),
    "bert-base-actpatch-dropouts": (_bert, 32, 512, 12, _patch_with(dropouts=True)),
}
QUICK = {name: (2, 64, 2) for name in MODELS}


def build(name: str, layers: int, args):
    factory = MODELS[name][0]
    torch.manual_seed(0)
    with torch.device(args.device):  # random init on the device: seconds, not minutes, for 2B parameters
        model = factory(layers, args.quick)
    return model.to(dtype=args.dtype).train()


def batch(model, b: int, s: int, device: str) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (b, s), device=device)
    return {"input_ids": ids, "labels": ids}


def runner(model, args):
    """What runs the steps: ``model``, ``torch.compile(model)`` with --compiled (the swaps change
    ``model``'s modules, which the compiled wrapper shares), or ``model`` with each block compiled in place
    (--compiled blocks).  Dynamo's caches are emptied first: frames that every model shares (transformers'
    wrappers) would otherwise reach the recompile limit after a few models and silently run eager."""
    if not args.compiled:
        return model
    torch._dynamo.reset()
    if args.compiled == "blocks":
        for block in blocks(model):
            block.compile()
        return model
    return torch.compile(model)


def blocks(model) -> torch.nn.ModuleList:
    """The model's longest ModuleList: its decoder / encoder layers."""
    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)


def step(model, inputs: dict) -> None:
    model(**inputs).loss.backward()
    for p in model.parameters():
        p.grad = None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model, inputs: dict, device: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(model, inputs)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(model, inputs)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def step_times(name: str, args) -> dict:
    _, b, s, layers, swap = MODELS[name]
    if args.quick:
        b, s, layers = QUICK[name]
    model = build(name, layers, args)
    run = runner(model, args)
    inputs = batch(model, b, s, args.device)
    patched: dict = {}
    times: dict[str, list[float]] = {"eager": [], "patched": []}
    for rnd in range(args.rounds):
        for mode in ("eager", "patched") if rnd % 2 == 0 else ("patched", "eager"):
            if mode == "patched":
                swap(model, patched)
            time_steps(run, inputs, args.device, args.warmup)
            times[mode] += time_steps(run, inputs, args.device, args.steps)
            unswap(patched)
    eager, ours = statistics.median(times["eager"]), statistics.median(times["patched"])
    del model, run
    _free(args.device)
    return {
        "layers": layers,
        "batch": b,
        "seq": s,
        "eager_ms": eager,
        "patched_ms": ours,
        "ratio": ours / eager,
    }


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def saved_bytes(model, inputs: dict, device: str) -> int:
    """Bytes autograd keeps after the forward: memory_allocated after minus before (CUDA)."""
    if device != "cuda":  # CPU: sum the saved tensors' storage, once each
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**inputs).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return sum(seen.values())
    sync(device)
    before = torch.cuda.memory_allocated()
    loss = model(**inputs).loss
    sync(device)
    after = torch.cuda.memory_allocated()
    loss.backward()
    for p in model.parameters():
        p.grad = None
    del loss
    return after - before


def memory_slope(name: str, args) -> dict:
    _, b, s, _, swap = MODELS[name]
    if args.quick:
        b, s, _ = QUICK[name]
    res = {}
    per_mode: dict[str, dict[int, int]] = {"eager": {}, "patched": {}}
    for layers in (2, 4):
        model = build(name, layers, args)
        run = runner(model, args)
        inputs = batch(model, b, s, args.device)
        for mode in ("eager", "patched"):
            patched: dict = {}
            if mode == "patched":
                swap(model, patched)
            step(run, inputs)  # warm-up (allocator, kernels, compilation)
            per_mode[mode][layers] = saved_bytes(run, inputs, args.device)
            unswap(patched)
        del model, run, inputs
        _free(args.device)
    for mode, per_layers in per_mode.items():
        res[f"{mode}_bytes_per_token_per_layer"] = (per_layers[4] - per_layers[2]) / 2 / (b * s)
        res[f"{mode}_bytes"] = per_layers
    return res


def compile_check(args) -> dict:
    """torch.compile a patched 2-layer GPT-2 (and a patched Llama layer pair); count graph breaks."""
    import torch._dynamo as dynamo

    out = {}
    for name in ("gpt2-medium", "llama3-8b-layer"):
        _, b, s, _, swap = MODELS[name]
        b, s = (2, 64) if args.quick else (min(b, 2), min(s, 1024))
        model = build(name, 2, args)
        inputs = batch(model, b, s, args.device)
        swap(model, {})
        dynamo.reset()
        dynamo.utils.counters.clear()
        explanation = dynamo.explain(model)(**inputs)
        reasons = [str(getattr(r, "reason", r)) for r in explanation.break_reasons]
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        step(compiled, inputs)
        step(compiled, inputs)
        sync(args.device)
        breaks = dict(dynamo.utils.counters["graph_break"])
        ours = [r for r in reasons + list(breaks) if "actpatch" in r.lower()]
        out[name] = {
            "explain_graph_breaks": explanation.graph_break_count,
            "explain_reasons": reasons,
            "counter_graph_breaks": breaks,
            "actpatch_breaks": ours,
            "compile_and_2_steps_s": time.perf_counter() - t0,
        }
        print(
            f"compile {name}: graph breaks {explanation.graph_break_count} (from actpatch: {len(ours)})",
            flush=True,
        )
        del model, compiled
        _free(args.device)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating eager/patched rounds")
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--compiled",
        nargs="?",
        const="model",
        choices=["model", "blocks"],
        help="measure torch.compile(model) instead, or each block compiled (blocks)",
    )
    p.add_argument("--json")
    args = p.parse_args()
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.quick:
        args.steps, args.warmup = 2, 1
    res: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}
    import transformers

    res["torch"], res["transformers"] = torch.__version__, transformers.__version__
    ok = True
    mode = f"compiled ({args.compiled}) " if args.compiled else ""
    for name in args.models:
        r = res[name] = {}
        if not args.no_memory:
            r.update(memory_slope(name, args))
            print(
                f"{name}: {mode}saved bytes/token/layer eager "
                f"{r['eager_bytes_per_token_per_layer']:,.0f} "
                f"patched {r['patched_bytes_per_token_per_layer']:,.0f}",
                flush=True,
            )
        if not args.no_time:
            r.update(step_times(name, args))
            print(
                f"{name}: {mode}step eager {r['eager_ms']:.2f} ms patched {r['patched_ms']:.2f} ms "
                f"(x{r['ratio']:.3f}; {r['layers']} layers, batch {r['batch']}, seq {r['seq']})",
                flush=True,
            )
    if args.compile:
        res["compile"] = c = compile_check(args)
        ok &= all(not v["actpatch_breaks"] for v in c.values())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
