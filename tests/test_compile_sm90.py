"""Every Triton kernel compiles for sm_90 (H100/H200) on this CPU-only machine, with no float64 left.

Triton's bundled ptxas does this without a GPU, and it catches what the interpreter lets through: globals
the compiler refuses inside kernels, Python float constants typed float64 (which once dragged a whole
backward into float64 on the H200).
"""

from __future__ import annotations

import collections
import re

import pytest
import triton
import triton.language as tl

from actpatch.kernels import triton as tk
from actpatch.kernels import triton_dropout as td
from actpatch.kernels import triton_gated as tg
from actpatch.kernels import triton_norm as tn
from actpatch.kernels import triton_norm_output as tno
from actpatch.kernels import triton_relu_squared as trs

compiler = pytest.importorskip("triton.compiler")
GPUTarget = pytest.importorskip("triton.backends.compiler").GPUTarget

ROW = {"n_elements": "i64", "row_start": "i64"}
ACTIVATION_FORWARD = {"x_ptr": "*{t}", "y_ptr": "*{t}", "bits_ptr": "*u8", **ROW, "x_star": "fp32"}
ACTIVATION_BACKWARD = {
    "dy_ptr": "*{t}", "y_ptr": "*{t}", "bits_ptr": "*u8", "dx_ptr": "*{t}", "coef_ptr": "*fp32", **ROW,
    "y_hi": "fp32", "y_lo": "fp32", "inv_y_hi": "fp32", "t_end": "fp32", "t_end2": "fp32", "t_end3": "fp32",
    "scale_right": "fp32",
    "scale_near": "fp32", "scale_tail": "fp32",
}  # fmt: skip
LOOKUP_FORWARD = {
    "x_ptr": "*i16",
    "y_ptr": "*i16",
    "bits_ptr": "*u8",
    "table_ptr": "*i16",
    **ROW,
    "x_star": "fp32",
}
LOOKUP_BACKWARD = {
    "dy_ptr": "*{t}", "y_ptr": "*i16", "bits_ptr": "*u8", "dx_ptr": "*{t}", "table_ptr": "*fp32", **ROW,
}  # fmt: skip
GATED_FORWARD = {
    "a_ptr": "*{t}", "b_ptr": "*{t}", "m_ptr": "*{t}", "k_ptr": "*{t}", "bits_ptr": "*u8",
    "table_ptr": "*i16", "n_elements": "i64", "n_bytes": "i64", "width": "i64", "stride": "i64",
    "row_start": "i64", "keep_below": "fp32",
}  # fmt: skip
GATED_BACKWARD = {
    "dm_ptr": "*{t}", "m_ptr": "*{t}", "k_ptr": "*{t}", "bits_ptr": "*u8", "table_ptr": "*i16",
    "da_ptr": "*{t}", "db_ptr": "*{t}", "n_elements": "i64", "n_bytes": "i64", "width": "i64",
    "stride": "i64", "row_start": "i64", "top": "fp32",
}  # fmt: skip
NORM_BACKWARD = {
    "dy_ptr": "*{t}", "x_ptr": "*{t}", "w_ptr": "*{t}", "r_ptr": "*fp32", "dx_ptr": "*{t}", "dw_ptr": "*fp32",
    "n_rows": "i64", "width": "i64", "rows_per_program": "i32",
}  # fmt: skip
NORM_OUTPUT_TILES = {"n_rows": "i64", "width": "i64", "tiles_per_program": "i32"}
RMS_FROM_OUTPUT = {
    "dy_ptr": "*{t}", "y_ptr": "*{t}", "w_ptr": "*{t}", "r_ptr": "*fp32", "dx_ptr": "*{t}",
    "sum_ptr": "*fp32", **NORM_OUTPUT_TILES,
}  # fmt: skip
LAYER_FROM_OUTPUT = {
    "dy_ptr": "*{t}", "y_ptr": "*{t}", "w_ptr": "*{t}", "b_ptr": "*{t}", "rstd_ptr": "*fp32",
    "dx_ptr": "*{t}", "sum_ptr": "*fp32", **NORM_OUTPUT_TILES,
}  # fmt: skip
NORM_OUTPUT_SHAPE = {"ROWS": 2, "BLOCK": 4096, "STAGES": 3}  # the launch shape at 4096 in bf16
DROPOUT_PACK = {"mask_ptr": "*u8", "bits_ptr": "*u8", **ROW}
DROPOUT_BACKWARD = {"dy_ptr": "*{t}", "bits_ptr": "*u8", "dx_ptr": "*{t}", **ROW, "s": "fp32"}
RELU_SQUARED_FORWARD = {"x_ptr": "*{t}", "y_ptr": "*{t}", **ROW}
RELU_SQUARED_BACKWARD = {"dy_ptr": "*{t}", "y_ptr": "*{t}", "dx_ptr": "*{t}", **ROW, "y_max": "fp32"}
BASE = {
    "ROWS": 64,
    "FULL_ROWS": True,
    "LIBDEVICE": True,
    "GPU": True,
    "BF16_BY_HAND": False,
}  # those a kernel takes
CASES = {
    "activation forward": (tk._forward_kernel, ACTIVATION_FORWARD, {"ACT": 0, "ROUND_INTERMEDIATE": True}),
    "activation backward": (tk._backward_kernel, ACTIVATION_BACKWARD, {"N": 10, "DEG": 6, "INTERVALS": 32}),
    "lookup forward": (tk._forward_lookup_kernel, LOOKUP_FORWARD, {"FP16": False}),
    "lookup backward": (tk._backward_lookup_kernel, LOOKUP_BACKWARD, {}),
    **{
        f"gated {way}{table}{layout}": (
            kernel,
            signature,
            {"ACT": 0 if table else act, "TABLE": bool(table), "HALVES": halves},
        )
        for way, kernel, signature, act in (
            ("forward", tg._forward_kernel, GATED_FORWARD, 2),
            ("backward", tg._backward_kernel, GATED_BACKWARD, 0),
        )
        for table in ("", ", act from the table")
        for layout, halves in (
            ("", False),
            (", halves", True),
        )
    },
    "dropout pack": (td._pack_kernel, DROPOUT_PACK, {}),
    "dropout backward": (td._backward_kernel, DROPOUT_BACKWARD, {}),
    "relu_squared forward": (trs._forward_kernel, RELU_SQUARED_FORWARD, {}),
    "relu_squared backward": (trs._backward_kernel, RELU_SQUARED_BACKWARD, {}),
    "rms_norm backward": (
        tn._backward_kernel,
        NORM_BACKWARD,
        {
            "GEMMA": False,
            "ROUNDED": True,
            "S_DTYPE": tl.bfloat16,
            "GW_DTYPE": tl.bfloat16,
            "DS_DTYPE": tl.bfloat16,
            "BLOCK": 4096,
        },
    ),
    "rms_norm from output backward": (
        tno._rms_backward_kernel,
        RMS_FROM_OUTPUT,
        {
            "GEMMA": False,
            "ROUNDED": True,
            "S_DTYPE": tl.bfloat16,
            "GW_DTYPE": tl.bfloat16,
            "DS_DTYPE": tl.bfloat16,
            **NORM_OUTPUT_SHAPE,
        },
    ),
    "layer_norm from output backward": (
        tno._layer_backward_kernel,
        LAYER_FROM_OUTPUT,
        {"HAS_W": True, "HAS_B": True, **NORM_OUTPUT_SHAPE},
    ),
}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiles_for_sm90_without_float64(case, dtype):
    kernel, signature, constexprs = CASES[case]
    if constexprs.get("TABLE") and dtype == "fp32":
        pytest.skip("16-bit tensors only")
    names = list(kernel.arg_names)
    const = {k: v for k, v in (BASE | constexprs).items() if k in names}
    sig = {k: v.format(t=dtype) for k, v in signature.items()} | {k: "constexpr" for k in const}
    src = compiler.ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    options = {"num_warps": 2, "enable_fp_fusion": True}  # Triton's default on the GPU machine
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert ".f64" not in compiled.asm["ptx"]


def test_float32_backward_loads_dy_and_y_first_and_each_intervals_coefficients_as_two_vectors():
    """dy and y are volatile loads (kept in program order, both issued before the arithmetic), and each
    element's coefficients come in two 16-byte gathers (ld.global.nc.v4), not one load per power."""
    kernel, names = tk._backward_kernel, list(tk._backward_kernel.arg_names)
    const = {k: v for k, v in (BASE | CASES["activation backward"][2]).items() if k in names}
    sig = {k: v.format(t="fp32") for k, v in ACTIVATION_BACKWARD.items()} | {k: "constexpr" for k in const}
    aligned = {(names.index(k),): [["tt.divisibility", 16]] for k in sig if k.endswith("_ptr")}
    constexprs = {(names.index(k),): v for k, v in const.items()}
    src = compiler.ASTSource(kernel, sig, constexprs=constexprs, attrs=aligned)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 2}).asm["ptx"]
    per_thread = BASE["ROWS"] * 8 // 64  # elements a thread: ROWS rows of 8 over 2 warps
    assert ptx.count("ld.global.nc.v4.f32") == 2 * per_thread
    loads = re.findall(r"ld\.(?:volatile\.)?global\.[\w.]+", ptx)
    assert loads[:2] == ["ld.volatile.global.v4.b32"] * 2, loads[:4]


def _memory_instructions(kernel, signature: dict, halves: bool) -> collections.Counter:
    """The global loads and stores of a gated kernel compiled for sm_90 in bf16 (``halves`` or dense), its
    pointers 16-byte aligned (as Triton specializes tensors at launch) and the integers unspecialized."""
    names = list(kernel.arg_names)
    const = {k: v for k, v in (BASE | {"ACT": 2, "TABLE": False, "HALVES": halves}).items() if k in names}
    sig = {k: v.format(t="bf16") for k, v in signature.items()} | {k: "constexpr" for k in const}
    aligned = {(names.index(k),): [["tt.divisibility", 16]] for k in signature if k.endswith("_ptr")}
    src = compiler.ASTSource(
        kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=aligned
    )
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 2}).asm["ptx"]
    # volatile loads (the backward's dm and k, kept in program order) read ld.volatile.global.*
    return collections.Counter(re.findall(r"(?:ld|st)\.(?:volatile\.)?global\.\w+(?:\.\w+)?", ptx))


@pytest.mark.parametrize("way", ["forward", "backward"])
def test_halves_of_widths_multiple_of_8_move_16_byte_vectors(way):
    """The halves of a gate_up (I a multiple of 8, whether or not Triton knows it to be a multiple of 16) are
    read (forward) and d(gate_up)'s written (backward) in 16-byte vectors, with the very loads and stores of
    the two-tensor kernels."""
    kernel, signature = (
        (tg._forward_kernel, GATED_FORWARD) if way == "forward" else (tg._backward_kernel, GATED_BACKWARD)
    )
    dense = _memory_instructions(kernel, signature, False)
    vectors = sum(count for op, count in dense.items() if op.endswith("global.v4.b32"))
    assert vectors >= 4, dense
    assert _memory_instructions(kernel, signature, True) == dense
