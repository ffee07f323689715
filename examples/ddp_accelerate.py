"""Data-parallel training of a patched model with accelerate: each process patches its own replica, then
``accelerator.prepare`` wraps it in DistributedDataParallel (gloo on CPU, NCCL on GPUs).

    accelerate launch --multi_gpu --num_processes 2 examples/ddp_accelerate.py          # 2 processes
    accelerate launch --multi_gpu --num_processes 2 examples/ddp_accelerate.py --tiny --steps 3

``--multi_gpu`` picks accelerate's torchrun launcher; with no GPU the script asks for
``Accelerator(cpu=True)``, which turns the torchrun ranks into a MULTI_CPU (gloo) group.
(``accelerate launch --cpu`` with more than one process needs MPI; without it, it starts one process.)

A small Llama-style model learns next-byte prediction on Python's stdlib docstrings (--tiny: random
tokens, for smoke tests).  At the end the ranks check that their parameters are identical (DDP kept them
in sync) and that they trained on different data.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import LlamaConfig, LlamaForCausalLM

import actpatch


def data(tiny: bool, seq: int) -> torch.Tensor:
    if tiny:
        return torch.randint(0, 256, (256, seq), generator=torch.Generator().manual_seed(0))
    from _data import docstrings

    raw = torch.frombuffer(bytearray(" ".join(docstrings()).encode()), dtype=torch.uint8).long()
    return raw[: len(raw) // seq * seq].view(-1, seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="per process")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer width-32 model on random tokens")
    ap.add_argument("--json", help="write the result here (rank 0)")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(0)  # the same initial weights on every rank
    width = 32 if args.tiny else 128
    config = LlamaConfig(
        vocab_size=256, hidden_size=width, intermediate_size=4 * width - width // 2,
        num_hidden_layers=2 if args.tiny else 4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    report = actpatch.patch_model(model, batch_size=args.batch, seq_len=args.seq)
    accelerator.print(report)

    rows = data(args.tiny, args.seq)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(rows), batch_size=args.batch, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, opt, loader = accelerator.prepare(model, opt, loader)

    losses, first = [], None
    model.train()
    it = iter(loader)
    for _ in range(args.steps):
        (x,) = next(it)
        first = x if first is None else first
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
        accelerator.print(f"step {len(losses)}  loss {losses[-1]:.4f}")

    flat = torch.cat([p.detach().reshape(-1) for p in accelerator.unwrap_model(model).parameters()])
    params = accelerator.gather(flat[None])
    firsts = accelerator.gather(first[None].contiguous())
    result = {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "wrapped": type(model).__name__,
        "patched_sites": len(report.patched_sites),
        "still_patched": len(actpatch.patching.patched_modules(accelerator.unwrap_model(model))),
        "params_equal_across_ranks": bool(all(torch.equal(params[0], p) for p in params)),
        "ranks_saw_different_data": bool(any(not torch.equal(firsts[0], f) for f in firsts[1:])),
        "losses": losses,
    }
    if accelerator.is_main_process:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
    ok = result["params_equal_across_ranks"] and result["still_patched"] == result["patched_sites"] > 0
    # gloo's worker threads drop the gathered tensors after the collective has returned, and need the GIL
    # for it; DDP's reducer frees the process group at exit, whose destructor joins those threads while
    # holding the GIL (pytorch/pytorch#56297): a deadlock, unless they are done first.
    accelerator.wait_for_everyone()
    time.sleep(0.5)
    accelerator.end_training()
    if not ok:
        raise SystemExit("DDP check failed")


if __name__ == "__main__":
    main()
