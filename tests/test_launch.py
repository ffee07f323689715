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
    monkeypatch.setattr(launch, "_COMPILED", {})
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1000 + device, raising=False)
    return Kernel()


def test_the_second_launch_calls_the_compiled_kernels_launcher(kernel):
    x = torch.zeros(64)
    for _ in range(2):
        assert launch._direct(kernel, 3, (x, 64), {"ROWS": 8, "scale": 0.5}, 4, 0)
    assert kernel.calls[0] == ("triton", (3,), (x, 64), {"ROWS": 8, "scale": 0.5, "num_warps": 4})
    # grid, stream, function, metadata, no launch metadata nor hooks, every argument in signature order
    assert kernel.calls[1] == (
        "direct",
        (3, 1, 1, 1000, "function", "metadata", None, None, None, x, 64, 0.5, 8),
    )
    assert len(kernel.calls) == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda x, n, kw: (x[1:], n, kw),  # a tensor 4 bytes off 16-byte alignment
        lambda x, n, kw: (x.double(), n, kw),  # another dtype
        lambda x, n, kw: (x, 65, kw),  # an integer no longer a multiple of 16
        lambda x, n, kw: (x, 1, kw),  # ... equal to 1
        lambda x, n, kw: (x, 2**31, kw),  # ... past int32
        lambda x, n, kw: (x, n, kw | {"ROWS": 16}),  # a constexpr
    ],
)
def test_what_triton_specializes_on_compiles_anew(kernel, change):
    x, n, kw = torch.zeros(64), 64, {"ROWS": 8, "scale": 0.5}
    launch._direct(kernel, 3, (x, n), kw, 4, 0)
    x2, n2, kw2 = change(x, n, kw)
    launch._direct(kernel, 3, (x2, n2), kw2, 4, 0)
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]


def test_what_triton_does_not_specialize_on_launches_directly(kernel):
    x, kw = torch.zeros(96), {"ROWS": 8, "scale": 0.5}
    launch._direct(kernel, 3, (x, 64), kw, 4, 0)
    launch._direct(kernel, 5, (torch.ones(80), 80), kw, 4, 0)  # other data, size, grid
    assert [c[0] for c in kernel.calls] == ["triton", "direct"]


def test_warps_and_device_are_in_the_key(kernel):
    x, kw = torch.zeros(64), {"ROWS": 8, "scale": 0.5}
    for warps, device in ((4, 0), (8, 0), (4, 1)):
        launch._direct(kernel, 3, (x, 64), kw, warps, device)
    assert [c[0] for c in kernel.calls] == ["triton"] * 3


def test_hooks_and_other_calls_keep_tritons_path(kernel, monkeypatch):
    x = torch.zeros(64)
    assert not launch._direct(kernel, 3, (x, 64), {"ROWS": 8}, 4, 0)  # a parameter missing
    assert not launch._direct(kernel, 3, (x, 64, 0.5, 8), {}, 4, 0)  # a constexpr by position
    monkeypatch.setattr(kernel, "pre_run_hooks", [print])
    assert not launch._direct(kernel, 3, (x, 64), {"ROWS": 8, "scale": 0.5}, 4, 0)
    assert kernel.calls == []


def test_cpu_tensors_launch_through_the_interpreter_path(kernel, monkeypatch):
    """launch() leaves CPU tensors (Triton's interpreter) to ``kernel[grid]`` itself."""
    monkeypatch.setattr(launch, "_JIT", Kernel)
    launch.launch(kernel, 2, (torch.zeros(64), 64), {"ROWS": 8, "scale": 0.5}, 4)
    launch.launch(kernel, 2, (torch.zeros(64), 64), {"ROWS": 8, "scale": 0.5}, 4)
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


class _CountingDict(dict):
    hits = 0

    def get(self, key, default=None):
        found = super().get(key, default)
        self.hits += found is not None
        return found


@gpu
@needs_cuda
def test_gpu_direct_launches_give_what_tritons_launch_gives(monkeypatch):
    if launch._JIT is None:
        pytest.skip(f"Triton {launch._VERSION}: launches through Triton's own path")
    compiled = _CountingDict()
    monkeypatch.setattr(launch, "_COMPILED", compiled)
    ops = _every_op()
    for name, fn, inputs in ops:
        for _ in range(2):  # the first launches compile
            direct = _outputs_and_grads(fn, inputs)
        with monkeypatch.context() as m:
            m.setattr(launch, "_JIT", None)
            tritons = _outputs_and_grads(fn, inputs)
        for got, expected in zip(direct, tritons, strict=True):
            assert torch.equal(got, expected), name
    assert compiled.hits >= 2 * len(ops)  # a forward and a backward launch each, at least
