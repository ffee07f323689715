"""Launching a Triton kernel on the device of its tensors, at the least CPU time per launch.

``kernel[grid](...)`` launches on the *current* CUDA device.  A model spread over GPUs in one process
(``from_pretrained(device_map=...)``, accelerate's ``dispatch_model``) keeps a layer's tensors on another
device than the current one, so a launch for tensors elsewhere runs under their device's guard.

``kernel[grid](...)`` (``JITFunction.run``) also spends, on every launch, Python time that an eager
training step pays per activation call (``benchmarks/call_overhead.py``): it binds the arguments, builds
a string cache key, reads environment knobs and hands the launcher empty profiler hook chains.  A
``Launcher`` holds one kernel's keyword arguments (constexprs, scalars) and warps, prepared once; after a
specialization's first launch (compiled by Triton's own path), the compiled kernel's launcher is kept
under a key that holds the rest of what Triton specializes on (each tensor's dtype and 16-byte alignment,
each integer's being 1, a multiple of 16 and its width; the device), and later launches call it directly:
the same binary on the same arguments, tensors passed as their addresses (Triton's launcher would ask each
for it).  Triton releases whose launch convention was not read here, Triton's interpreter, and launches
with a hook set (a profiler's, proton) keep Triton's own path.
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


class Launcher:
    """``launcher(programs, args)`` is ``kernel[(programs,)](*args, **kwargs, num_warps=num_warps)`` on
    the device of ``args[0]`` (a tensor), ``args`` the kernel's first parameters (none a constexpr), the
    keyword arguments its others; ``views``: per positional argument, the dtype Triton is to see its
    tensor as (None: its own), so that a kernel reading int16 takes bfloat16 tensors as they are."""

    __slots__ = ("kernel", "kwargs", "num_warps", "views", "rest", "compiled")

    def __init__(self, kernel, kwargs: dict, num_warps: int, views: tuple = ()) -> None:
        self.kernel, self.kwargs, self.num_warps, self.views = kernel, kwargs, num_warps, views
        self.rest = _rest(kernel, kwargs)
        self.compiled: dict[tuple, tuple] = {}  # key -> (the compiled kernel's launcher, function, metadata)

    def __call__(self, programs: int, args: tuple) -> None:
        device = args[0].get_device()
        if device >= 0:
            if device != torch._C._cuda_getDevice():
                with torch.cuda.device(device):
                    return self(programs, args)
            if self.rest is not None and not (
                knobs.runtime.launch_enter_hook.calls
                or knobs.runtime.launch_exit_hook.calls
                or self.kernel.pre_run_hooks
            ):
                return self._direct(programs, args, device)
        self.kernel[(programs,)](*self._viewed(args), **self.kwargs, num_warps=self.num_warps)

    def _direct(self, programs: int, args: tuple, device: int) -> None:
        """The launch through the compiled kernel's launcher (Triton's own path the first time per key,
        which compiles)."""
        key, addresses = [device], []
        for a in args:
            if isinstance(a, torch.Tensor):
                address = a.data_ptr()
                key += a.dtype, address % 16 == 0
                addresses.append(address)
            else:
                key.append(_integer(a))
                addresses.append(a)
        key = tuple(key)
        hit = self.compiled.get(key)
        if hit is None:
            compiled = self.kernel[(programs,)](*self._viewed(args), **self.kwargs, num_warps=self.num_warps)
            if len(args) + len(self.rest) == len(self.kernel.params):  # every parameter given
                self.compiled[key] = compiled.run, compiled.function, compiled.packed_metadata
            return
        run, function, metadata = hit
        stream = torch._C._cuda_getCurrentRawStream(device)  # as Triton's driver reads it
        run(programs, 1, 1, stream, function, metadata, None, None, None, *addresses, *self.rest)

    def _viewed(self, args: tuple) -> tuple:
        """The arguments as Triton is to see them: the tensors of ``views`` viewed as its dtypes."""
        head = [a if dtype is None else a.view(dtype) for a, dtype in zip(args, self.views, strict=False)]
        return (*head, *args[len(head) :])


def launch(kernel, programs: int, args: tuple, kwargs: dict, num_warps: int) -> None:
    """``kernel[(programs,)](*args, **kwargs, num_warps=num_warps)`` through the ``Launcher`` kept for
    (kernel, kwargs, num_warps): for launches whose keyword arguments vary from call to call."""
    key = id(kernel), num_warps, *kwargs.items()
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        launcher = _LAUNCHERS[key] = Launcher(kernel, kwargs, num_warps)
    launcher(programs, args)


_LAUNCHERS: dict[tuple, Launcher] = {}


def _rest(kernel, kwargs: dict) -> tuple | None:
    """The keyword arguments' values in the kernel's signature order (what follows the positional ones in
    the compiled kernel's launch), where it launches directly; None where it does not: another kernel type
    (Triton's interpreter, another release), or keyword arguments that are not the last parameters."""
    if type(kernel) is not _JIT:
        return None
    names = [p.name for p in kernel.params[len(kernel.params) - len(kwargs) :]] if kwargs else []
    if sorted(names) != sorted(kwargs) or any(p.is_constexpr for p in kernel.params[: -len(kwargs) or None]):
        return None
    return tuple(kwargs[name] for name in names)


def _integer(v: object) -> object:
    """A positional scalar's part of the key: an integer's being 1, a multiple of 16, within int32 and
    within int64 (Triton's i32 / i64 / u64); any other scalar itself."""
    if type(v) is int:
        return v == 1, v % 16 == 0, -(2**31) <= v < 2**31, v < 2**63
    return v
