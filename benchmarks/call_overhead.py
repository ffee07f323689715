"""Host (CPU) time per eager call of each patched op against the torch op it replaces.

    python benchmarks/call_overhead.py [--device cuda] [--calls 200] [--rounds 20] [--profile]
    python benchmarks/call_overhead.py --device cpu    # a machine without CUDA: launches replaced by nothing

What it measures: forward + backward (``torch.autograd.grad``) of one call on tensors so small (4096
bf16 elements, [16, 256] for the products and norms; on CPU 64 and [4, 16], so that torch's own CPU
kernels cost next to nothing either) that the device finishes each kernel long before the host launches
the next: the time is the host's, Python layers, checks, allocations, autograd and kernel
launches, which a training step pays per call wherever the CPU cannot stay ahead of the GPU.  Each row is
the least µs per call over ``--rounds`` interleaved rounds of ``--calls`` calls (every row runs in every
round, so a slow spell of the machine hits all rows alike), its ratio the row's over its torch op's (the
rebound row's: over the swapped row's, what rebinding a call by name adds to the inverted op).

On CUDA the ops launch their Triton kernels; two more rows time one Triton launch (the bf16 lookup
backward's) through Triton's ``kernel[grid]`` and through an ``actpatch.kernels.launch.Launcher``.  With
``--device cpu`` the rows run actpatch's CUDA path on CPU tensors with each kernel launch replaced by
nothing (``launches_replaced_by_nothing``): every Python layer, check and allocation of an eager call
without the kernels (which on CPU are the pure-PyTorch reference, dozens of ops, not a GPU call's cost);
wall time there is the thread's CPU time (``time.thread_time``: the CPU autograd engine runs on it), so
other processes on the machine do not count.  Compare rows of one run: the CPU's speed varies.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import actpatch.functional as AF
from actpatch.activations.sigmoid_gated import quick_gelu_forward


class LaunchesNothing(torch.autograd.Function):
    """Saves its output twice, as the inverted activation saves y and its bits; computes nothing: the
    floor of any op written as a Python autograd.Function."""

    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        ctx.save_for_backward(y, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        _y, _also_y = ctx.saved_tensors
        return torch.empty_like(dy)


@contextlib.contextmanager
def launches_replaced_by_nothing():
    """actpatch's CUDA path for CPU tensors, each Triton launch a no-op (kernels taken as compiled: the
    arguments the GPU gets; two programs per multiprocessor of a made-up 132); the launches each op resolves
    at its first call (``*_PLANS``) resolved afresh inside, and forgotten after."""
    from actpatch.kernels import launch, ops, triton_norm, triton_norm_output
    from actpatch.kernels import triton as tk

    kernel_modules = [tk, triton_norm, triton_norm_output] + [
        getattr(ops, m) for m in ("_GATED_KERNELS", "_DROPOUT_KERNELS", "_RELU_SQUARED_KERNELS")
    ]
    patches = [(ops, "_on_gpu", lambda t: not torch._C._functorch.is_functorch_wrapped_tensor(t))]
    patches += [(m, "_kernel", lambda jitted, device: (jitted, True)) for m in kernel_modules]
    patches += [(m, "launch", lambda *args, **kwargs: None) for m in kernel_modules if hasattr(m, "launch")]
    patches += [(launch.Launcher, "__call__", lambda self, programs, args: None), (launch, "_LAUNCHERS", {})]
    patches += [(m, name, {}) for m in (ops, *kernel_modules) for name in vars(m) if name.endswith("_PLANS")]
    patches += [
        (triton_norm, "_programs", lambda device: 264),
        (triton_norm_output, "_sms", lambda device: 132),
    ]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    try:
        for m, name, value in patches:
            setattr(m, name, value)
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def grad_of(fn, inputs: tuple, dy: torch.Tensor):
    """One call of ``fn(*inputs)`` and its backward through ``torch.autograd.grad``."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)


def pairs(x: torch.Tensor, rows: int, width: int) -> dict[str, tuple]:
    """op -> (torch's call, actpatch's call), each forward + backward: activations of x, products and norms
    of [rows, width]."""
    device, dx = x.device, torch.randn_like(x)
    a, b = (torch.randn(rows, width, device=device, dtype=x.dtype, requires_grad=True) for _ in range(2))
    da = torch.randn_like(a)
    norm = LlamaRMSNorm(width).to(device=device, dtype=x.dtype)
    w, bias = norm.weight, torch.nn.Parameter(torch.zeros_like(norm.weight))
    act = {  # the activations: torch's op, actpatch's op
        "gelu": (F.gelu, AF.gelu),
        "gelu tanh": (lambda t: F.gelu(t, approximate="tanh"), lambda t: AF.gelu(t, "tanh")),
        "silu": (F.silu, AF.silu),
        "quick_gelu": (quick_gelu_forward, AF.quick_gelu),
        "relu_squared": (lambda t: torch.square(F.relu(t)), AF.relu_squared),
        "dropout p=0.1": (lambda t: F.dropout(t, 0.1), lambda t: AF.dropout(t, 0.1)),
    }
    out = {name: (grad_of(ours_t, (x,), dx), grad_of(ours, (x,), dx)) for name, (ours_t, ours) in act.items()}
    return out | {
        "silu_mul": (grad_of(lambda g, u: F.silu(g) * u, (a, b), da), grad_of(AF.silu_mul, (a, b), da)),
        "gelu_mul": (grad_of(lambda g, u: F.gelu(g) * u, (a, b), da), grad_of(AF.gelu_mul, (a, b), da)),
        "rms_norm (LlamaRMSNorm)": (
            grad_of(lambda t, _w: norm(t), (a, w), da),
            grad_of(lambda t, w_: AF.rms_norm(t, w_, 1e-6), (a, w), da),
        ),
        "rms_norm_from_output (F.rms_norm)": (
            grad_of(lambda t, w_: F.rms_norm(t, (width,), w_, 1e-6), (a, w), da),
            grad_of(
                lambda t, w_: AF.rms_norm_from_output(t, w_, 1e-6, "torch", keep_output=True), (a, w), da
            ),
        ),
        "layer_norm": (
            grad_of(lambda t, w_, b_: F.layer_norm(t, (width,), w_, b_), (a, w, bias), da),
            grad_of(lambda t, w_, b_: AF.layer_norm(t, (width,), w_, b_, keep_output=True), (a, w, bias), da),
        ),
    }


def launch_rows(device: str) -> dict[str, object]:
    """One launch of the bf16 lookup backward on 4096 elements: Triton's ``kernel[grid]``, actpatch's."""
    from actpatch.activations import ACTIVATIONS
    from actpatch.kernels import lookup
    from actpatch.kernels import triton as tk
    from actpatch.kernels.launch import Launcher

    dy, y = (torch.randn(4096, device=device, dtype=torch.bfloat16) for _ in range(2))
    bits, dx = torch.zeros(512, device=device, dtype=torch.uint8), torch.empty_like(dy)
    table = lookup.backward_table(ACTIVATIONS["gelu"], torch.bfloat16, dy.device)
    args = (dy, y.view(torch.int16), bits, dx, table, dy.numel(), 0)
    kwargs = {"FULL_ROWS": True, "ROWS": 64, "BF16_BY_HAND": False}
    kernel = tk._backward_lookup_kernel
    launcher = Launcher(kernel, kwargs, 2)
    return {
        "one Triton launch: kernel[grid]": lambda: kernel[(8,)](*args, **kwargs, num_warps=2),
        "one Triton launch: actpatch Launcher": lambda: launcher(8, args),
    }


class _ByName(torch.nn.Module):
    """An activation called by name in a module's forward, its output saved by a product with a weight (a
    rebound site once patched)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return F.gelu(t) * self.scale


class _ByChild(_ByName):
    """The same, the activation called as a child (a swapped site once patched)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = torch.nn.GELU()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.act(t) * self.scale


def rebinding_rows(x: torch.Tensor) -> dict[str, object]:
    """A patched module calling GELU by name (its forward rebound) and one calling a swapped GELU child:
    what rebinding costs per call beyond the inverted op (the ratio of the first to the second)."""
    import actpatch

    by_name, by_child, dx = _ByName().to(x.device), _ByChild().to(x.device), torch.randn_like(x)
    for module in (by_name, by_child):
        report = actpatch.patch_model(module, example_inputs=x.detach().requires_grad_())
        assert [s.patched for s in report.sites] == [True], report.sites
    return {
        "F.gelu in forward, rebound": grad_of(by_name, (x,), dx),
        "GELU child, swapped": grad_of(by_child, (x,), dx),
    }


# rows whose ratio is to another row than torch's op
BASELINES = {"F.gelu in forward, rebound": "GELU child, swapped"}


def least_us(cases: dict, calls: int, rounds: int, device: str) -> dict[str, float]:
    """The least µs per call of each case over interleaved rounds."""
    clock = time.perf_counter if device == "cuda" else time.thread_time
    best = dict.fromkeys(cases, float("inf"))
    for fn in cases.values():  # warm-up: compiles, tables, caches
        for _ in range(10):
            fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            for _ in range(calls):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (clock() - t0) / calls * 1e6)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--calls", type=int, default=200, help="calls per round and row")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="cProfile actpatch's GELU: where its time goes")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("call_overhead.py: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.device == "cpu":
            torch.set_num_threads(1)
            stack.enter_context(launches_replaced_by_nothing())
        n, rows, width = (4096, 16, 256) if args.device == "cuda" else (64, 4, 16)
        x = torch.randn(n, device=args.device, dtype=torch.bfloat16, requires_grad=True)
        ops = pairs(x, rows, width)
        dx = torch.randn_like(x)
        cases = {
            "autograd.Function launching nothing": grad_of(LaunchesNothing.apply, (x,), dx),
            "torch.ops.actpatch.gelu (the custom op)": grad_of(
                lambda t: torch.ops.actpatch.gelu(t)[0], (x,), dx
            ),
        }
        for name, (theirs, ours) in ops.items():
            cases |= {f"torch {name}": theirs, f"actpatch {name}": ours}
        cases |= rebinding_rows(x)
        if args.device == "cuda":
            cases |= launch_rows(args.device)
        best = least_us(cases, args.calls, args.rounds, args.device)
        print(f"{'µs per call (least over rounds)':<48} {'µs':>8} {'ratio':>7}")
        for name, us in best.items():
            torch_op = f"torch {name.removeprefix('actpatch ')}" if name.startswith("actpatch ") else None
            baseline = BASELINES.get(name, torch_op)
            ratio = f"{us / best[baseline]:7.2f}" if baseline in best else ""
            print(f"{name:<48} {us:8.1f} {ratio}", flush=True)
        if args.profile:
            import cProfile
            import pstats

            with cProfile.Profile() as prof:
                least_us({"gelu": ops["gelu"][1]}, args.calls, args.rounds, args.device)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
