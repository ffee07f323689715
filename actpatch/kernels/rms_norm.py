"""RMSNorm that keeps its input and 1/rms instead of float32 copies: pure PyTorch, any device.

Hugging Face's RMSNorms upcast x to float32 and normalise there; autograd then keeps the float32 copy h
(for pow and the product with 1/rms), 1/rms, and the normalised tensor the weight multiplies (bf16 in
Llama, float32 in Gemma): 6 + 2 bytes per element in a bf16 Llama, 8 + 4 in Gemma.  Here autograd keeps x
itself (2 bytes in bf16) and r = 1/rms (4 bytes per row); the backward recomputes n = h · r, one
pointwise product, instead of keeping it.

Forward, with h = x.float(), exactly the ops (and order) of the module it replaces, so y is bitwise
the same:

    r = rsqrt(mean(h², -1) + eps),   n = h · r
    "llama"  y = w · n.to(x.dtype)                       (Llama, Mistral, Qwen, Phi-3, DeepSeek, ...)
    "t5"     y = w · n.to(w.dtype)  (w half)  or  w · n   (T5LayerNorm: casts to the weight's dtype)
    "gemma"  y = (n · (1 + w.float())).to(x.dtype)       (Gemma, Gemma 2)
    "litgpt" y = (n · w.float()).to(x.dtype)             (litgpt's RMSNorm: cast after the weight multiply)
    "tune"   y = F.rms_norm(h, w).to(x.dtype)            (torchtune's RMSNorm): torch's fused op on h for a
             float32 w (r: its 1/rms), else litgpt's arithmetic (F.rms_norm's own for w of another dtype)

Backward, with g = dL/dn (float32), s the tensor w multiplies and c = ``factor(w)`` (1 + w, or w):

    "llama", "t5"      dw = Σ dy · s,  g = (dy · w) rounded to s's dtype (as autograd rounds it), as float32
    else               dw = Σ dy · n,  g = dy · c
    dx = r · (g - n · mean(g · n, -1))          (d/dh of h · rsqrt(mean(h²) + eps))

dw is reduced exactly as autograd reduces a broadcast product (``sum_to_size``), so it is eager's
bitwise; dx differs from eager's only by float32 rounding inside (eager applies the chain rule term by
term), far below the rounding of the result to x's dtype.  On CUDA the same arithmetic runs fused in
``triton_norm.py`` (dw summed in another order: within float32 rounding of eager's before its cast).

Forward-mode AD (jvp) along tangents ẋ, ẇ (None: zero), from the same x, w, r, with ḣ = ẋ in float32:

    ṅ = r · (ḣ - n · mean(n · ḣ, -1))
    "llama", "t5"  ẏ = w · ṅ (rounded to s's dtype) + ẇ · s      else  ẏ = (ṅ · c + n · ẇ).to(x.dtype)
"""

from __future__ import annotations

import torch

VARIANTS = ("llama", "t5", "gemma", "litgpt", "tune")
UNROUNDED = ("gemma", "litgpt", "tune")  # n multiplied in float32, the product rounded once
_HALF = (torch.float16, torch.bfloat16)


def factor(w: torch.Tensor, variant: str) -> torch.Tensor:
    """c, the float32 tensor an unrounded variant multiplies n by: 1 + w (gemma), w otherwise (litgpt, and
    ``F.rms_norm``'s "torch")."""
    return 1.0 + w.float() if variant == "gemma" else w.float()


def scaled_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype, variant: str) -> torch.dtype:
    """dtype of the tensor w multiplies (llama, t5): x's (llama), w's when half, else float32 (t5)."""
    if variant == "llama":
        return x_dtype
    return w_dtype if w_dtype in _HALF else torch.float32


def forward(x: torch.Tensor, w: torch.Tensor, eps: float, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): the module's output, bitwise, and r = 1/rms per row (float32, shape [..., 1])."""
    if variant == "tune" and w.dtype == torch.float32:
        y, r = torch.ops.aten._fused_rms_norm(x.float(), [x.shape[-1]], w, eps)
        return y.to(x.dtype), r
    h = x.to(torch.float32)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    n = h * r
    if variant in UNROUNDED:
        return (n * factor(w, variant)).to(x.dtype), r
    return w * n.to(scaled_dtype(x.dtype, w.dtype, variant)), r


def backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) from the kept x, w and r."""
    n = x.to(torch.float32) * r
    if variant in UNROUNDED:
        dyf = dy.float()
        g = dyf * factor(w, variant)
        dw = (dyf * n).sum_to_size(w.shape).to(w.dtype)
    else:
        s = n.to(scaled_dtype(x.dtype, w.dtype, variant))
        g = (dy * w).to(s.dtype).float()
        dw = (dy * s).sum_to_size(w.shape).to(w.dtype)
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw


def jvp(
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    dx: torch.Tensor | None,
    dw: torch.Tensor | None,
    variant: str,
) -> torch.Tensor:
    """ẏ, the forward-mode derivative of ``forward`` along (ẋ, ẇ), from the kept x, w and r; ``variant``
    "torch" (``F.rms_norm``: y = n · w in float32) as litgpt."""
    n = x.to(torch.float32) * r
    dn = torch.zeros_like(n) if dx is None else dx.float() * r
    if dx is not None:
        dn = dn - r * n * (n * dx.float()).mean(-1, keepdim=True)
    if variant not in ("llama", "t5"):
        dy = dn * factor(w, variant)
        return (dy if dw is None else dy + n * dw.float()).to(x.dtype)
    s = n.to(scaled_dtype(x.dtype, w.dtype, variant))
    dy = w * dn.to(s.dtype)
    return dy if dw is None else dy + dw * s
