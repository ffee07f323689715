"""actpatch.kernels.launch: the direct launch through a compiled kernel's launcher.

On CPU with a stand-in kernel (what is launched, and when Triton's own path runs); on a GPU, every patched
op launched directly gives bitwise what Triton's own launch path gives."""

from __future__ import annotations

import pytest
import torch

from actpatch.kernels import launch

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Param:
    def __init__(self, name: str, is_constexpr: bool = False) -> None:
        self.name, self.is_constexpr = name, is_constexpr


class Compiled:
    """A CompiledKernel's launch interface, recording its launches."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def run(self, *args):
        self.calls.append(("direct", args))


class Kernel:
    """A JITFunction's interface: ``kernel[grid](*args, **kwargs)`` compiles and returns the kernel."""

    params = [Param("x_ptr"), Param("n"), Param("scale"), Param("ROWS", True)]
    pre_run_hooks: list = []

    def __init__(self) -> None:
        self.calls: list = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return Compiled(self.calls)

        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch, "_JIT", Kernel)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1000 + device, raising=False)
    return Kernel()


def test_the_second_launch_calls_the_compiled_kernels_launcher(kernel):
    x = torch.zeros(64)
    launcher = launch.Launcher(kernel, {"ROWS": 8, "scale": 0.5}, 4)
    for _ in range(2):
        launcher._direct(3, (x, 64), 0)
    assert kernel.calls[0] == ("triton", (3,), (x, 64), {"ROWS": 8, "scale": 0.5, "num_warps": 4})
    # grid, stream, function, metadata, no launch metadata nor hooks, every argument in signature order,
    # tensors as their addresses
    assert kernel.calls[1] == (
        "direct",
        (3, 1, 1, 1000, "function", "metadata", None, None, None, x.data_ptr(), 64, 0.5, 8),
    )
    assert len(kernel.calls) == 2


def test_views_are_what_triton_sees(kernel):
    """The first launch (Triton's) takes the views; the direct one the addresses, the same."""
    x = torch.zeros(64, dtype=torch.bfloat16)
    launcher = launch.Launcher(kernel, {"ROWS": 8, "scale": 0.5}, 4, (torch.int16,))
    for _ in range(2):
        launcher._direct(3, (x, 64), 0)
    (seen, n), direct = kernel.calls[0][2], kernel.calls[1][1]
    assert seen.dtype == torch.int16 and seen.data_ptr() == x.data_ptr() and n == 64
    assert direct[9:11] == (x.data_ptr(), 64)


@pytest.mark.parametrize(
    "change",
    [
        lambda x, n: (x[1:], n),  # a tensor 4 bytes off 16-byte alignment
        lambda x, n: (x.double(), n),  # another dtype
        lambda x, n: (x, 65),  # an integer no longer a multiple of 16
        lambda x, n: (x, 1),  # ... equal to 1
        lambda x, n: (x, 2**31),  # ... past int32
    ],
)
def test_what_triton_specializes_on_compiles_anew(kernel, change):
    x, n = torch.zeros(64), 64
    launcher = launch.Launcher(kernel, {"ROWS": 8, "scale": 0.5}, 4)
    launcher._direct(3, (x, n), 0)
    launcher._direct(3, change(x, n), 0)
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]


def test_what_triton_does_not_specialize_on_launches_directly(kernel):
    launcher = launch.Launcher(kernel, {"ROWS": 8, "scale": 0.5}, 4)
    launcher._direct(3, (torch.zeros(96), 64), 0)
    launcher._direct(5, (torch.ones(80), 80), 0)  # other data, size, grid
    assert [c[0] for c in kernel.calls] == ["triton", "direct"]


def test_the_device_is_in_the_key(kernel):
    x = torch.zeros(64)
    launcher = launch.Launcher(kernel, {"ROWS": 8, "scale": 0.5}, 4)
    for device in (0, 1):
        launcher._direct(3, (x, 64), device)
    assert [c[0] for c in kernel.calls] == ["triton"] * 2


def test_keyword_arguments_and_warps_make_launchers_of_their_own(kernel):
    """``launch()`` keeps a Launcher per (kernel, keyword arguments, warps)."""
    before = len(launch._LAUNCHERS)
    for kwargs, warps in (
        ({"ROWS": 8, "scale": 0.5}, 4),
        ({"ROWS": 8, "scale": 0.5}, 8),
        ({"ROWS": 16, "scale": 0.5}, 4),
    ):
        for _ in range(2):
            launch.launch(kernel, 3, (torch.zeros(64), 64), kwargs, warps)
    assert len(launch._LAUNCHERS) == before + 3
    assert [c[0] for c in kernel.calls] == ["triton"] * 6  # CPU tensors: Triton's path (its interpreter)


def test_calls_not_of_runtime_arguments_then_keywords_keep_tritons_path(kernel, monkeypatch):
    assert launch.Launcher(kernel, {"scale": 0.5}, 4).rest is None  # keywords not the last parameters
    missing = launch.Launcher(kernel, {"ROWS": 8}, 4)  # a parameter missing from the call: never direct
    for _ in range(2):
        missing._direct(3, (torch.zeros(64), 64), 0)
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]
    assert launch.Launcher(kernel, {}, 4).rest is None  # a constexpr by position
    assert launch.Launcher(kernel, {"n": 64, "scale": 0.5, "ROWS": 8}, 4).rest == (64, 0.5, 8)
    monkeypatch.setattr(launch, "_JIT", None)  # a release whose launch convention was not read
    assert launch.Launcher(kernel, {"ROWS": 8, "scale": 0.5}, 4).rest is None


def test_cpu_tensors_launch_through_the_interpreter_path(kernel):
    """A Launcher leaves CPU tensors (Triton's interpreter) to ``kernel[grid]`` itself."""
    launcher = launch.Launcher(kernel, {"ROWS": 8, "scale": 0.5}, 4)
    launcher(2, (torch.zeros(64), 64))
    launcher(2, (torch.zeros(64), 64))
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]


# ----------------------------------------------------------------------------------------------- GPU


def _every_op():
    """(name, fn, inputs) for each kernel a patched op launches: the inverted activations' lookup kernels
    (bf16; of 4096 elements, of 4099: a last partial row, and 4 bytes off alignment), arithmetic ones
    (the fp16 SiLU forward, float32 both ways), the products (of two tensors, of one's halves), norms,
    ReLU², dropout."""
    import actpatch.functional as AF

    ops = []
    for dtype, n, offset, name, fn in (
        (torch.bfloat16, 4096, 0, "gelu", AF.gelu),
        (torch.bfloat16, 4099, 0, "gelu", AF.gelu),
        (torch.bfloat16, 4096, 2, "gelu", AF.gelu),
        (torch.bfloat16, 4099, 0, "quick_gelu", AF.quick_gelu),
        (torch.float16, 4096, 0, "silu", AF.silu),
        (torch.float32, 4099, 0, "gelu tanh", lambda t: AF.gelu(t, "tanh")),
        (torch.bfloat16, 4099, 0, "relu_squared", AF.relu_squared),
    ):
        x = torch.randn(n + offset, device="cuda", dtype=dtype)[offset:]
        ops.append((f"{name} {dtype} {n}+{offset}", fn, (x,)))
    a, b = (torch.randn(64, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(256, device="cuda", dtype=torch.bfloat16) + 0.5
    return ops + [
        ("silu_mul", AF.silu_mul, (a, b)),
        ("gelu_mul", AF.gelu_mul, (a, b)),
        ("silu_mul_halves", lambda t: AF.silu_mul_halves(t, gate_first=False), (torch.cat([a, b], -1),)),
        ("rms_norm", lambda t, w_: AF.rms_norm(t, w_, 1e-6), (a, w)),
        (
            "rms_norm_from_output",
            lambda t, w_: AF.rms_norm_from_output(t, w_, 1e-6, keep_output=True),
            (a, w),
        ),
        ("layer_norm", lambda t, w_: AF.layer_norm(t, (256,), w_, None, keep_output=True), (a, w)),
        ("dropout", lambda t: (torch.manual_seed(0), AF.dropout(t, 0.1))[1], (a,)),
    ]


def _outputs_and_grads(fn, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))


def _tritons_path(self, programs, args, device):
    self.kernel[(programs,)](*self._viewed(args), **self.kwargs, num_warps=self.num_warps)


@gpu
@needs_cuda
def test_gpu_direct_launches_give_what_tritons_launch_gives(monkeypatch):
    if launch._JIT is None:
        pytest.skip(f"Triton {launch._VERSION}: launches through Triton's own path")
    direct_launches, direct = [], launch.Launcher._direct

    def counting(self, programs, args, device):  # a launch that compiles adds a key
        known = len(self.compiled)
        direct(self, programs, args, device)
        direct_launches.extend([1] if known and len(self.compiled) == known else [])

    monkeypatch.setattr(launch.Launcher, "_direct", counting)
    ops = _every_op()
    for name, fn, inputs in ops:
        for _ in range(2):  # the first launches compile
            directs = _outputs_and_grads(fn, inputs)
        with monkeypatch.context() as m:
            m.setattr(launch.Launcher, "_direct", _tritons_path)
            tritons = _outputs_and_grads(fn, inputs)
        for got, expected in zip(directs, tritons, strict=True):
            assert torch.equal(got, expected), name
    assert len(direct_launches) >= 2 * len(ops)  # a forward and a backward launch each, at least
