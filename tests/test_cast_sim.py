"""The strided cast's PTX run through the interpreter (tests/ptxsim.py) on the CPU: rows of ``width``
elements between row strides of their own, as the model copies v out of the fused q/k/v
projection's rows (f32 -> bf16, or f32 -> f32) and dv into its gradient's."""
import numpy as np
import pytest

from ptxgen.kernels.cast import CastSpec
from ptxgen.spec import SpecError
from ptxgen.vecio import DType, from_bf16, round_to
from ptxsim import launch

ROWS = 64


def _run(spec, src, dst, width):
    grid, block = spec.launch_dims(ROWS * width)
    return launch(spec, ((grid, 1, 1), block), *spec.arguments(src, dst, ROWS, width, src.shape[1], dst.shape[1]))[-1]


@pytest.mark.parametrize("dst", [DType.BF16, DType.F32])
@pytest.mark.parametrize("width, src_stride, dst_stride", [(128, 1152, 128), (128, 128, 1152), (64, 96, 72)])
def test_a_strided_cast_moves_each_row_and_nothing_else(dst, width, src_stride, dst_stride):
    spec = CastSpec(dst=dst, strided=True)
    if width * ROWS % (spec.block_size * spec.vec):
        pytest.skip("the interpreter needs whole blocks")
    src = np.random.default_rng(0).standard_normal((ROWS, src_stride)).astype(np.float32)
    empty = np.zeros((ROWS, dst_stride), np.uint16 if dst is DType.BF16 else np.float32)
    out = _run(spec, src, empty, width)
    moved = from_bf16(out) if dst is DType.BF16 else out
    np.testing.assert_array_equal(moved[:, :width], round_to(src[:, :width], dst).astype(np.float32))
    assert not moved[:, width:].any()  # the rest of each destination row untouched


def test_strides_and_widths_that_would_misalign_a_vector_or_overlap_rows_are_refused():
    spec = CastSpec(strided=True)  # f32 -> bf16: 8 elements a thread
    spec.arguments(0, 0, 4, 128, 1152, 128)
    for width, src_stride, dst_stride in ((12, 1152, 128), (128, 1156, 128), (128, 1152, 64)):
        with pytest.raises(ValueError, match="multiples of 8"):
            spec.arguments(0, 0, 4, width, src_stride, dst_stride)
    with pytest.raises(ValueError, match="strided cast's arguments"):
        CastSpec().arguments(0, 0, 4, 128, 128, 128)
    with pytest.raises(SpecError, match="only a strided cast"):
        CastSpec(dst=DType.F32)


def test_rows_whose_strided_index_would_overflow_32_bits_are_refused():
    spec = CastSpec(strided=True)
    spec.arguments(0, 0, 2**32 // 1152 - 1, 128, 1152, 128)
    with pytest.raises(ValueError, match="overflow the kernel's 32-bit index"):
        spec.arguments(0, 0, 2**32 // 1152 + 1, 128, 1152, 128)
