"""Norms that keep their output: pure PyTorch, any device (apex's ``memory_efficient`` norms, generalised).

The Linear after a norm saves the norm's output y anyway; keeping y (shared with that Linear) plus one
float32 per row, instead of the norm's input or float32 copies of it, makes the norm's own cost 4 bytes a
row.  The backward rebuilds the normalised tensor from y by dividing by the weight.

RMSNorm (``variant`` as ``rms_norm.py``, plus "torch": ``F.rms_norm`` / ``nn.RMSNorm``), r = 1/rms:

    forward    bitwise the module's: ``rms_norm.forward`` (llama, t5, gemma, litgpt, tune),
               ``torch._fused_rms_norm`` (torch)
    "llama", "t5"  y = w · s, s = n rounded to s's dtype:   ŝ = y / w rounded to s's dtype (the s the forward
                   rounded, recovered exactly when y's rounding is below half of s's ulp), n̂ = ŝ,
                   dw = Σ dy · ŝ,  g = (dy · w) rounded as autograd rounds it
    "gemma"        y = n · (1 + w):  n̂ = y / (1 + w),  dw = Σ dy · n̂,  g = dy · (1 + w)
    else           y = n · w:        n̂ = y / w,        dw = Σ dy · n̂,  g = dy · w
    dx = r · (g − n̂ · mean(g · n̂))

LayerNorm (``F.layer_norm`` over the last dim; w, b may be None), rstd = 1/σ:

    forward    bitwise ``F.layer_norm``: ``torch.native_layer_norm`` (checked bitwise on CPU in every dtype
               in tests/test_norm_output.py; rstd kept in float32)
    x̂ = (y − b) / w,  g = dy · w,  dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)),  dw = Σ dy · x̂,  db = Σ dy

Dividing is only as good as the divisor c (w, or 1 + w): with y rounded to u = eps/2 of its dtype, and
below its smallest normal to an absolute tiny · eps / 2,

    |x̂ − x̂_true| ≤ u · (|x̂| + |b| / |c|) + tiny · eps / (2 |c|)

(b = 0 for RMSNorm): relative to x̂'s own scale (rms 1), the rounding y already carries, amplified by
(|b| + tiny) / |c|.  ``safe_weight`` requires (|b| + tiny) ≤ K · |c| on every channel, K from y's dtype:

    half (bf16, fp16)  K = 1:     x̂ within 1 ulp at its scale, as close as eager's own rounding of y and
                                  of dw, so each gradient stays within 2× eager half's distance from float32
    float32            K = 2^10:  x̂ within 2^-14 ≈ 6e-5 at its scale, 30× inside the 2e-3 float32 bar

Zeros (NaN from 0/0), tiny weights (subnormal y: absolute rounding), weights dwarfed by the bias all fail it;
such a norm keeps its input instead (apex clamps |w| to eps, silently giving a wrong dw there).
``keeps_output`` also refuses where y is coarser than the weight's gradient (gemma, torch, LayerNorm with
half x and a float32 weight: n̂ would carry y's rounding into a float32 dw that eager computes from x).
It caches its answer per weight (and bias), checked again only when a tensor's ``_version`` changes (an
optimizer step, ``copy_``): one host sync per weight change, none per call; ``keeps_output_by_dtype``
answers for every y dtype at once (one sync), for callers deciding outside a compiled graph.
"""

from __future__ import annotations

import weakref

import torch

from . import rms_norm

VARIANTS = (*rms_norm.VARIANTS, "torch")
AMPLIFICATION = {torch.float32: 2.0**10, torch.bfloat16: 1.0, torch.float16: 1.0}
_ROUNDED = ("llama", "t5")  # the normalised tensor is rounded before the weight multiplies it


def rms_norm_forward(
    x: torch.Tensor, w: torch.Tensor, eps: float | None, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): the module's output, bitwise, and r = 1/rms per row (float32, [..., 1])."""
    if variant == "torch":
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], w, eps)  # the op: traceable by Dynamo
    return rms_norm.forward(x, w, eps, variant)


def rms_norm_backward_from_output(
    dy: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    variant: str,
    x_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) from the kept output y, w and r; x_dtype: the input's dtype (default y's)."""
    x_dtype = x_dtype or y.dtype
    n = y.float() / rms_norm.factor(w, variant)
    if variant in _ROUNDED:
        sdt = rms_norm.scaled_dtype(x_dtype, w.dtype, variant)  # s's dtype
        s = n.to(sdt)
        g = (dy * w).to(sdt).float()
        dw = (dy * s).sum_to_size(w.shape).to(w.dtype)
        n = s.float()
    else:
        dyf = dy.float()
        g = dyf * rms_norm.factor(w, variant)
        dw = (dyf * n).sum_to_size(w.shape).to(w.dtype)
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    return dx.to(x_dtype), dw


def layer_norm_forward(
    x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): ``F.layer_norm(x, x.shape[-1:], w, b, eps)`` bitwise and 1/σ per row (float32, [..., 1])."""
    y, _, rstd = torch.native_layer_norm(x, x.shape[-1:], w, b, eps)
    return y, rstd.float()  # CPU returns rstd in x's half dtype, CUDA in float32


def _x_hat(y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """x̂ = (y − b) / w in float32."""
    xh = y.float()
    xh = xh if b is None else xh - b.float()
    return xh if w is None else xh / w.float()


def layer_norm_backward_from_output(
    dy: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw, db) from the kept output y, w, b and rstd (dw, db: None where w, b are)."""
    xh, dyf = _x_hat(y, w, b), dy.float()
    g = dyf if w is None else dyf * w.float()
    dx = rstd * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
    dw = None if w is None else (dyf * xh).sum_to_size(w.shape).to(w.dtype)
    db = None if b is None else dyf.sum_to_size(b.shape).to(b.dtype)
    return dx.to(y.dtype), dw, db


def layer_norm_jvp(
    x: torch.Tensor,
    w: torch.Tensor | None,
    rstd: torch.Tensor,
    dx: torch.Tensor | None,
    dw: torch.Tensor | None,
    db: torch.Tensor | None,
) -> torch.Tensor:
    """ẏ = ẋ̂ · w + x̂ · ẇ + ḃ, ẋ̂ = rstd · (ẋ − mean(ẋ) − x̂ · mean(x̂ · ẋ)), from x kept for forward AD."""
    h = x.float()
    xh = (h - h.mean(-1, keepdim=True)) * rstd
    dxh = torch.zeros_like(xh)
    if dx is not None:
        dh = dx.float()
        dxh = rstd * (dh - dh.mean(-1, keepdim=True) - xh * (xh * dh).mean(-1, keepdim=True))
    out = dxh if w is None else dxh * w.float()
    out = out if dw is None else out + xh * dw.float()
    return (out if db is None else out + db.float()).to(x.dtype)


def safe_weight(c: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether y of ``dtype`` divided by the divisor c (``rms_norm.factor``) rebuilds x̂ within the bar:
    (|b| + tiny) ≤ K · |c| on every channel (module docstring).  Reads c and b: one host sync."""
    return bool(_safe_weight_on_device(c, b, dtype))


def _safe_weight_on_device(c: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``safe_weight``'s answer as a 0-dim bool tensor on c's device (no host sync)."""
    tiny = torch.finfo(dtype).tiny
    top = tiny if b is None else b.float().abs() + tiny
    return (top <= AMPLIFICATION[dtype] * c.float().abs()).all()


_CACHE: dict[tuple, tuple] = {}
_CACHE_SIZE = 4096


def _stamp(t: torch.Tensor | None) -> tuple:
    return (None, None) if t is None else (weakref.ref(t), t._version)


def _fresh(stamp: tuple, t: torch.Tensor | None) -> bool:
    ref, version = stamp
    return (t is None and ref is None) or (ref is not None and ref() is t and t._version == version)


def keeps_output(
    w: torch.Tensor | None, b: torch.Tensor | None, y_dtype: torch.dtype, variant: str = "layer"
) -> bool:
    """Whether a norm (``variant``: an RMSNorm's, or "layer") with weight w and bias b may keep its output y
    of ``y_dtype``: y fine enough for the weight's gradient and ``safe_weight``; cached per (w, b), recomputed
    when either's ``_version`` changes (one host sync per change)."""
    return keeps_output_by_dtype(w, b, variant, (y_dtype,))[y_dtype]


def keeps_output_by_dtype(
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    variant: str = "layer",
    y_dtypes: tuple[torch.dtype, ...] = tuple(AMPLIFICATION),
) -> dict[torch.dtype, bool]:
    """``keeps_output`` for each of ``y_dtypes``, those not cached answered together: one host sync."""
    answers = {dt: dt in AMPLIFICATION and _fine_enough(w, dt, variant) for dt in y_dtypes}
    if w is None and b is None:
        return answers
    asked = []
    for dt in (dt for dt, ok in answers.items() if ok):
        hit = _CACHE.get((id(w), id(b), dt, variant))
        if hit is not None and _fresh(hit[0], w) and _fresh(hit[1], b):
            answers[dt] = hit[2]
        else:
            asked.append(dt)
    if not asked:
        return answers
    c = torch.ones((), device=b.device) if w is None else rms_norm.factor(w.detach(), variant)
    safe = torch.stack([_safe_weight_on_device(c, None if b is None else b.detach(), dt) for dt in asked])
    safe = safe.full_tensor() if hasattr(safe, "full_tensor") else safe  # a sharded weight's (FSDP2 DTensor)
    if len(_CACHE) + len(asked) > _CACHE_SIZE:
        _CACHE.clear()
    for dt, answer in zip(asked, safe.tolist(), strict=True):
        answers[dt] = answer
        _CACHE[(id(w), id(b), dt, variant)] = (_stamp(w), _stamp(b), answer)
    return answers


def _fine_enough(w: torch.Tensor | None, y_dtype: torch.dtype, variant: str) -> bool:
    """Whether y of ``y_dtype`` is as fine as the weight's gradient needs (always, where the forward rounded
    the normalised tensor before the weight multiplied it)."""
    return w is None or variant in _ROUNDED or torch.finfo(y_dtype).eps <= torch.finfo(w.dtype).eps
