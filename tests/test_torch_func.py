"""torch.func over the patched ops: per-sample gradients (vmap of grad), jvp, and what raises."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

import actpatch
import actpatch.functional as AF
from actpatch.kernels.ops import DOUBLE_BACKWARD_ERROR

W = torch.randn(16, generator=torch.Generator().manual_seed(1))
OPS = {  # name: (ours, plain torch, number of tensor inputs)
    "gelu": (AF.gelu, F.gelu, 1),
    "gelu_tanh": (lambda x: AF.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"), 1),
    "silu": (AF.silu, F.silu, 1),
    "quick_gelu": (AF.quick_gelu, lambda x: x * torch.sigmoid(1.702 * x), 1),
    "silu_mul": (AF.silu_mul, lambda a, b: F.silu(a) * b, 2),
    "gelu_mul": (AF.gelu_mul, lambda a, b: F.gelu(a) * b, 2),
    "rms_norm": (
        lambda x: AF.rms_norm(x, W, 1e-6),
        lambda x: W * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
        1,
    ),
}


def close_at_scale(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    assert (got - ref).abs().max() <= rel * ref.abs().max(), ((got - ref).abs().max(), ref.abs().max())


def per_sample_grads(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x):
        return functional_call(model, p, (), {"input_ids": x[None], "labels": x[None]}).loss

    return vmap(grad(loss), in_dims=(None, 0))(params, ids)


@pytest.mark.parametrize(
    ("family", "kinds"), [("llama", {"gated", "norm"}), ("gpt2", {"activation", "norm"})]
)
def test_per_sample_gradients_of_a_patched_model(family, kinds):
    """vmap(grad(loss)) through patched gated MLPs and RMSNorms (Llama), GPT-2's gelu_new kept as its own
    formula and its LayerNorms keeping their outputs: the unpatched model's, per sample."""
    from tiny_models import tiny_model

    model = tiny_model(family)
    if family == "gpt2":
        model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
        model = type(model)(model.config)
    ref = copy.deepcopy(model)
    report = actpatch.patch_model(model, batch_size=2, seq_len=8)
    assert {s.kind for s in report.patched_sites} == kinds
    ids = torch.randint(0, 90, (3, 8), generator=torch.Generator().manual_seed(0))
    got, want = per_sample_grads(model, ids), per_sample_grads(ref, ids)
    for name, g in got.items():
        assert g.shape[0] == 3
        close_at_scale(g, want[name])


@pytest.mark.parametrize("name", list(OPS))
def test_vmap_of_grad_matches_torch(name):
    ours, plain, n = OPS[name]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 5, 16, generator=g) for _ in range(n)]
    loss = lambda f: lambda *x: (f(*x) * torch.arange(16.0)).sum()  # noqa: E731
    got = vmap(grad(loss(ours), argnums=tuple(range(n))))(*xs)
    want = vmap(grad(loss(plain), argnums=tuple(range(n))))(*xs)
    for a, b in zip(got, want, strict=True):
        close_at_scale(a, b, 2e-3 if name in ("gelu", "gelu_tanh", "silu", "quick_gelu") else 1e-5)


@pytest.mark.parametrize("name", list(OPS))
def test_forward_mode_matches_torch(name):
    """jvp through each op (dual tensors that require grad, so the patched op runs) is torch's jvp."""
    ours, plain, n = OPS[name]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 16, generator=g) for _ in range(n)]
    ts = [torch.randn(6, 16, generator=g) for _ in range(n)]
    with fwAD.dual_level():
        out = ours(*(fwAD.make_dual(x.clone().requires_grad_(), t) for x, t in zip(xs, ts, strict=True)))
        assert "Actpatch" in type(out.grad_fn).__name__
        tangent = fwAD.unpack_dual(out).tangent
    close_at_scale(tangent, jvp(plain, tuple(xs), tuple(ts))[1])
    close_at_scale(jvp(ours, tuple(xs), tuple(ts))[1], jvp(plain, tuple(xs), tuple(ts))[1])


def test_jacrev_and_jacfwd():
    x = torch.randn(7)
    close_at_scale(torch.func.jacrev(AF.silu)(x.requires_grad_()), torch.func.jacrev(F.silu)(x), 2e-3)
    close_at_scale(
        torch.func.jacfwd(AF.silu_mul, argnums=1)(x, x),
        torch.func.jacfwd(lambda a, b: F.silu(a) * b, argnums=1)(x, x),
    )


@pytest.mark.parametrize(
    "transform",
    [torch.func.hessian, lambda f: torch.func.jacfwd(grad(f)), lambda f: torch.func.jacrev(grad(f))],
)
def test_second_derivatives_raise_actpatch_error(transform):
    with pytest.raises(RuntimeError, match="double backward") as err:
        transform(lambda x: AF.silu(x).sum())(torch.randn(5))
    assert str(err.value) == DOUBLE_BACKWARD_ERROR


def test_dropout_follows_vmap_randomness():
    """Under vmap, the mask is drawn as vmap's ``randomness`` says: "error" raises, "same" one mask for all
    samples, "different" one per sample; per-sample gradients are each sample's own mask, scaled."""
    x = torch.ones(4, 256)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(grad(lambda r: AF.dropout(r, 0.5).sum()))(x)
    same = vmap(grad(lambda r: AF.dropout(r, 0.5).sum()), randomness="same")(x)
    assert (same == same[0]).all() and set(same.unique().tolist()) == {0.0, 2.0}
    diff = vmap(grad(lambda r: AF.dropout(r, 0.5).sum()), randomness="different")(x)
    assert not (diff == diff[0]).all() and set(diff.unique().tolist()) == {0.0, 2.0}
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.ones(256, requires_grad=True), torch.full((256,), 3.0))
        y, dy = fwAD.unpack_dual(AF.dropout(x, 0.5))
    assert torch.equal(dy, 3.0 * y.detach())


def test_a_tensor_closed_over_by_a_transform_runs_the_transformable_function():
    """Inside a transform, an op on a tensor closed over (not transformed itself) runs the Function that
    torch.func supports, not the eager twin (whose old-style forward it refuses): torch's values."""
    x, w = torch.randn(5, requires_grad=True), torch.randn(3, 5)
    assert torch.equal(vmap(lambda v: AF.gelu(x) * v)(w), F.gelu(x) * w)
    assert torch.equal(vmap(lambda v: AF.silu_mul(x, x) * v)(w), F.silu(x) * x * w)


def test_vmap_over_the_compile_custom_ops_raises_actpatch_error():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"actpatch: torch.func.vmap over the custom op actpatch::gelu"):
        vmap(lambda r: torch.ops.actpatch.gelu(r)[0])(x)
    with pytest.raises(RuntimeError, match="actpatch::silu_mul"):
        vmap(lambda r: torch.ops.actpatch.silu_mul(r, r)[0])(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(OPS))
def test_gpu_vmap_of_grad_and_jvp_never_reach_a_triton_kernel(name):
    """On CUDA, batched tensors run the pure-PyTorch path (a Triton kernel cannot take them): torch's
    per-sample gradients and tangents."""
    ours, plain, n = OPS[name]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 5, 16, generator=g).cuda() for _ in range(n)]
    w = W.cuda()
    if name == "rms_norm":
        ours, plain = (
            (lambda x: AF.rms_norm(x, w, 1e-6)),
            (lambda x: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))),
        )
    loss = lambda f: lambda *x: (f(*x) * torch.arange(16.0, device="cuda")).sum()  # noqa: E731
    got = vmap(grad(loss(ours), argnums=tuple(range(n))))(*xs)
    want = vmap(grad(loss(plain), argnums=tuple(range(n))))(*xs)
    for a, b in zip(got, want, strict=True):
        close_at_scale(a, b, 2e-3 if n == 1 and name != "rms_norm" else 1e-5)
