"""Launching a Triton kernel on the device of its tensors, at the least CPU time per launch.

``kernel[grid](...)`` launches on the *current* CUDA device.  A model spread over GPUs in one process
(``from_pretrained(device_map=...)``, accelerate's ``dispatch_model``) keeps a layer's tensors on another
device than the current one, so a launch for tensors elsewhere runs under their device's guard.

``kernel[grid](...)`` (``JITFunction.run``) also spends, on every launch, Python time that an eager
training step pays per activation call (``benchmarks/call_overhead.py``): it binds the arguments, builds
a string cache key, reads environment knobs and hands the launcher empty profiler hook chains.  After a
specialization's first launch (compiled by Triton's own path), the compiled kernel is kept under a key
that holds everything Triton specializes on (each tensor's dtype and 16-byte alignment, each integer's
being 1, a multiple of 16 and its width; the other arguments, constexprs and scalars, by value; the warps
and the device), and later launches call its launcher directly: the same binary on the same arguments.
Triton releases whose launch convention was not read here, and launches with a hook set (a profiler's,
proton), keep Triton's own path.
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton import knobs
    from triton.runtime.jit import JITFunction
except ImportError:  # no Triton (nothing launches through here), or one without ``knobs`` (before 3.4)
    triton = None

# CompiledKernel.run(grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit
# hook, *every argument), with HookChains as the launch hooks: the convention read in Triton 3.6 and 3.9
_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2]) if triton else ()
_JIT = JITFunction if (3, 6) <= _VERSION < (3, 10) else None  # the kernels launched directly
_COMPILED: dict[tuple, object] = {}  # (kernel id, device, warps, specialization) -> CompiledKernel
_KEYWORDS: dict[tuple[int, int], tuple[str, ...] | None] = {}  # (kernel id, positional count) -> names


def launch(kernel, programs: int, args: tuple, kwargs: dict, num_warps: int) -> None:
    """``kernel[(programs,)](*args, **kwargs, num_warps=num_warps)`` on the device of ``args[0]`` (a
    tensor); Triton's interpreter (any device) launches as it is."""
    device = args[0].get_device()
    if device >= 0 and device != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[(programs,)](*args, **kwargs, num_warps=num_warps)
    elif not (
        device >= 0 and type(kernel) is _JIT and _direct(kernel, programs, args, kwargs, num_warps, device)
    ):
        kernel[(programs,)](*args, **kwargs, num_warps=num_warps)


def _direct(kernel, programs: int, args: tuple, kwargs: dict, num_warps: int, device: int) -> bool:
    """The launch through the compiled kernel's launcher (Triton's own path the first time per key, which
    compiles); False, launching nothing, where a hook is set (a profiler's launch hook, the kernel's pre-run
    hooks) or the call is not runtime arguments by position and the rest of the parameters by keyword.

    Key: each positional tensor's dtype and 16-byte alignment, each positional integer's being 1, a
    multiple of 16 and its width (what Triton specializes them on), the keyword arguments by value."""
    if knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls or kernel.pre_run_hooks:
        return False
    at = id(kernel), len(args)
    names = _KEYWORDS[at] if at in _KEYWORDS else _keywords(kernel, len(args))
    if names is None or len(names) != len(kwargs):
        return False
    rest = [kwargs[name] for name in names]
    key = (
        *at,
        device,
        num_warps,
        *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else _integer(a) for a in args],
        *rest,
    )
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[(programs,)](*args, **kwargs, num_warps=num_warps)
        return True
    stream = torch._C._cuda_getCurrentRawStream(device)  # as Triton's driver reads it
    compiled.run(
        programs, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *rest
    )
    return True


def _keywords(kernel, positional: int) -> tuple[str, ...] | None:
    """The names of the kernel's parameters after the first ``positional``, in its signature's order; None
    where one of the first is a constexpr (its value would belong in the key)."""
    params = kernel.params
    names = (
        None
        if any(p.is_constexpr for p in params[:positional])
        else tuple(p.name for p in params[positional:])
    )
    _KEYWORDS[id(kernel), positional] = names
    return names


def _integer(v: object) -> object:
    """A positional scalar's part of the key: an integer's being 1, a multiple of 16, within int32 and
    within int64 (Triton's i32 / i64 / u64); any other scalar itself."""
    if type(v) is int:
        return v == 1, v % 16 == 0, -(2**31) <= v < 2**31, v < 2**63
    return v
