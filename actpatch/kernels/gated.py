"""Gated products m = act(a) · b (SwiGLU, GeGLU) that keep m and one of a, b: pure PyTorch, any device.

Eager PyTorch keeps a (for act's backward), act(a) and b (for the product's) and m (for down_proj).
Here autograd keeps m, which down_proj keeps anyway, plus k = a per element, and two bit masks:

    s = act(a)             rounded to the dtype, exactly as torch's own op rounds it (the forward's s)
    m = s · b              torch's own product, bitwise
    u = [|s| < T]          s is (nearly) 0, so m / s would not give b: k = b instead of a there;
                           T = 2^-18 in float32, 2^-13 in bf16/fp16
    z = [a > -1]           under u, the slope used for act'(a): 1/2 (a near 0) or 0 (a very negative)

Backward, from (dm, m, k, u, z):

    a = k, s = act(a)                              (u = 0: the same s, bitwise)
    b = m / s, in float32, clamped to the dtype's finite range (u = 0)   or  b = k (u = 1)
    db = dm · s   (u = 0)   or   0   (u = 1)       torch's product backward, bitwise where u = 0
    da = act_backward(dm · b, a)                   torch's own backward op (u = 0)
       = (dm · b) / 2   or   0                     (u = 1: z = 1, or not)

Where |s| >= T, b = m / s is exact but for m's rounding (relative 2^-9 in bf16, 2^-24 in float32, plus
half a subnormal spacing over T where m underflowed), so da is within the dtype's rounding of eager's and
db = dm · s is eager's bitwise.  Under u, s is a / 2 + O(a²) with |a| < 2T (slope 1/2) or a·Φ(a), a·σ(a)
for a < -12 (slope and s below T): da and db (taken as dm · 0) are off by at most about 2T |dm| (|b| + 1),
below 1e-5 of the gradients' scale in float32 and below their rounding in bf16/fp16.
The clamp only acts where m overflowed (fp16: |s · b| > 65504), where eager's down_proj already sees
inf: da stays finite there instead of NaN.

The halves of one tensor (Phi-3's ``gate_up_proj(x).chunk(2, -1)``, transformers' MoE ``_apply_gate``):
``halves_forward(gate_up)`` is ``forward`` of (a, b) = the two halves of gate_up [.., 2I] (a first when
``gate_first``), and ``halves_backward`` returns d(gate_up) = [da, db] (or [db, da]) [.., 2I], the
gradient autograd's chunk backward gives from ``backward``'s (da, db), bitwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bits import pack_bits, packed_size, unpack_bits

GATED = ("silu", "gelu", "gelu_tanh")
KEEP_B_BELOW = {torch.float32: 2.0**-18, torch.bfloat16: 2.0**-13, torch.float16: 2.0**-13}  # T


def act_forward(name: str, a: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(a)
    return F.gelu(a, approximate="tanh" if name == "gelu_tanh" else "none")


def act_backward(name: str, grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """torch's own derivative kernels: what autograd runs for F.silu / F.gelu."""
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, a)
    return torch.ops.aten.gelu_backward(grad, a, approximate="tanh" if name == "gelu_tanh" else "none")


def forward(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, k, bits): bits holds u then z, each packed 8 per byte (2 · ceil(n/8) bytes)."""
    s = act_forward(name, a)
    m = s * b
    keep_b = s.abs() < KEEP_B_BELOW.get(s.dtype, 0.0)
    k = torch.where(keep_b, b, a)
    bits = torch.cat([pack_bits(keep_b), pack_bits(a.float() > -1.0)])
    return m, k, bits


def backward(
    dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) from the saved (m, k, bits)."""
    n = m.numel()
    nb = packed_size(n)
    keep_b = unpack_bits(bits[:nb], n).view(m.shape)
    near_zero = unpack_bits(bits[nb:], n).view(m.shape)
    a = torch.where(keep_b, torch.zeros_like(k), k)
    s = act_forward(name, a)
    top = torch.finfo(m.dtype).max
    b = torch.where(keep_b, k.float(), (m.float() / s.float()).clamp(-top, top)).to(m.dtype)
    db = dm * torch.where(keep_b, torch.zeros_like(s), s)
    grad_s = dm * b
    da_kept = torch.where(near_zero, grad_s * 0.5, torch.zeros_like(grad_s))
    da = torch.where(keep_b, da_kept, act_backward(name, grad_s, a))
    return da, db


def halves(gate_up: torch.Tensor, gate_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): the gate and up halves of gate_up's last dimension (views)."""
    first, second = gate_up.chunk(2, dim=-1)
    return (first, second) if gate_first else (second, first)


def halves_forward(
    gate_up: torch.Tensor, name: str, gate_first: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, k, bits) of ``forward`` on gate_up's halves."""
    return forward(*halves(gate_up, gate_first), name)


def halves_backward(
    dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, name: str, gate_first: bool
) -> torch.Tensor:
    """d(gate_up): ``backward``'s (da, db) side by side, in gate_up's order."""
    da, db = backward(dm, m, k, bits, name)
    return torch.cat((da, db) if gate_first else (db, da), dim=-1)
