"""RoPE's PTX run through the interpreter (tests/ptxsim.py) on the CPU, every registered example
against the float64 reference: the strided ones read q or k out of wider rows (the fused q/k/v
projection's) or write their gradients into them, leaving the other columns alone. The
interpreter's sin and cos are numpy's, so this pins the indexing and the angle reduction, not
sin.approx's accuracy (the GPU tests do that)."""
import numpy as np
import pytest

from ptxgen.kernels.rope import RopeSpec, rope_reference
from ptxgen.vecio import DType, from_bf16, round_to, to_bf16
from ptxsim import launch


def _stored(x: np.ndarray, dtype: DType) -> np.ndarray:
    return to_bf16(x) if dtype is DType.BF16 else x.astype(np.float32)


@pytest.mark.parametrize("spec", RopeSpec.examples(), ids=str)
def test_rope_rotates_every_head_of_every_token(spec):
    rng = np.random.default_rng(0)
    tokens, row = spec.block_size, spec.heads * spec.head_dim  # whole blocks: the interpreter branches as one
    positions = rng.integers(0, 32768, tokens).astype(np.int32)
    out_dtype = DType.BF16 if spec.bf16_out else spec.dtype
    # strided: the rows of x (forward) or y (inverse) are a wider buffer's, from column ``start`` on
    wide = row + 3 * spec.vec + spec.head_dim
    start = spec.head_dim + spec.vec
    x_stride, y_stride = (row, row) if not spec.strided else (row, wide) if spec.inverse else (wide, row)
    x_full = round_to(rng.standard_normal((tokens, x_stride)), spec.dtype)
    x = _stored(x_full, spec.dtype).reshape(-1)
    if spec.strided and not spec.inverse:
        x = np.concatenate([x[start:], np.zeros(start, x.dtype)])  # the pointer to column ``start``
        x_full = np.roll(x_full.reshape(-1), -start).reshape(tokens, x_stride)
    y_start = start if spec.strided and spec.inverse else 0  # the pointer to column ``start`` of the wider rows
    y = np.zeros(tokens * y_stride - y_start, np.uint16 if out_dtype is DType.BF16 else np.float32)
    grid, block = spec.launch_dims(tokens)
    args = spec.arguments(x, y, positions, tokens, x_stride, y_stride) if spec.strided else (x, y, positions, tokens)
    out = launch(spec, ((grid, 1, 1), block), *args)[1]
    out = np.concatenate([out, np.zeros(y_start, out.dtype)])  # rows from column ``start`` on, as written
    out = (from_bf16(out) if out_dtype is DType.BF16 else out).astype(np.float64).reshape(tokens, y_stride)
    ref = rope_reference(x_full[:, :row].reshape(tokens, spec.heads, spec.head_dim), positions, spec.theta,
                         inverse=spec.inverse).reshape(tokens, row)
    tolerance = 2.0 ** -8 if out_dtype is DType.BF16 else 1e-5
    np.testing.assert_allclose(out[:, :row], ref, rtol=tolerance, atol=1e-5)
    assert not out[:, row:].any()  # a wider row's other columns untouched


def test_strides_that_misalign_a_vector_or_overlap_rows_are_refused():
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6, strided=True)  # 4 pairs a thread
    spec.arguments(0, 0, 0, 8, 1152, 128)
    for strides in ((1150, 128), (1152, 120), (64, 128)):
        with pytest.raises(ValueError, match="strides must be multiples of 4"):
            spec.arguments(0, 0, 0, 8, *strides)
    with pytest.raises(ValueError, match="strided RoPE's arguments"):
        RopeSpec(heads=2, head_dim=64, theta=1e6).arguments(0, 0, 0, 8, 128, 128)


def test_rows_whose_strided_index_would_overflow_32_bits_are_refused():
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6, strided=True)
    spec.arguments(0, 0, 0, 2**32 // 1152 - 1, 1152, 128)
    with pytest.raises(ValueError, match="overflow the kernel's 32-bit index"):
        spec.arguments(0, 0, 0, 2**32 // 1152 + 1, 1152, 128)  # 128 x tokens fits, 1152 x tokens does not
