"""The SwiGLU kernels' PTX run through the interpreter (tests/ptxsim.py) on the CPU: gate and up
read from the halves of each row of one tensor, dgate and dup written so, every registered example
against the float64 reference (the GPU tests check the same on an H200)."""
import numpy as np
import pytest

from ptxgen.kernels.swiglu import SwiGLUBackwardSpec, SwiGLUSpec, swiglu_backward_reference, swiglu_reference
from ptxgen.vecio import DType, from_bf16, round_to, to_bf16
from ptxsim import launch

# rows x width a multiple of every example's block x vector: the interpreter's blocks branch as one
SHAPES = [(4, 512), (4, 1536)]


def _stored(x: np.ndarray, dtype: DType) -> np.ndarray:
    return to_bf16(x) if dtype is DType.BF16 else x.astype(np.float32)


def _loaded(x: np.ndarray, dtype: DType) -> np.ndarray:
    return from_bf16(x).astype(np.float64) if dtype is DType.BF16 else x.astype(np.float64)


def _run(spec, rows, width, *arrays):
    grid, block = spec.launch_dims(rows, width)
    return launch(spec, ((grid, 1, 1), block), *spec.arguments(*arrays, rows, width))


def _tolerance(spec) -> float:
    return 1e-2 if spec.out_dtype is DType.BF16 else 1e-5


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("spec", SwiGLUSpec.examples(), ids=str)
def test_swiglu_reads_gate_and_up_from_the_halves_of_each_row(spec, rows, width):
    rng = np.random.default_rng(0)
    gate_up = round_to(3 * rng.standard_normal((rows, 2 * width)), spec.dtype)
    out_empty = _stored(np.full((rows, width), np.nan), spec.out_dtype)
    *_, out = _run(spec, rows, width, _stored(gate_up, spec.dtype), out_empty)
    ref = swiglu_reference(gate_up[:, :width], gate_up[:, width:])
    np.testing.assert_allclose(_loaded(out, spec.out_dtype), ref, rtol=_tolerance(spec), atol=1e-6)


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("spec", SwiGLUBackwardSpec.examples(), ids=str)
def test_swiglu_backward_writes_dgate_and_dup_into_the_halves_of_each_row(spec, rows, width):
    rng = np.random.default_rng(1)
    gate_up = round_to(3 * rng.standard_normal((rows, 2 * width)), spec.dtype)
    dout = rng.standard_normal((rows, width)).astype(np.float32)
    empty = _stored(np.full((rows, 2 * width), np.nan), spec.out_dtype)
    *_, dgate_up = _run(spec, rows, width, _stored(gate_up, spec.dtype), dout, empty)
    dgate_up = _loaded(dgate_up, spec.out_dtype)
    refs = swiglu_backward_reference(gate_up[:, :width], gate_up[:, width:], dout)
    for ours, ref in zip((dgate_up[:, :width], dgate_up[:, width:]), refs):
        np.testing.assert_allclose(ours, ref, rtol=_tolerance(spec), atol=1e-5)


@pytest.mark.parametrize("spec", [SwiGLUSpec(), SwiGLUBackwardSpec()], ids=str)
def test_the_sigmoid_of_a_gate_below_minus_87_is_zero_not_subnormal(spec):
    """fastmath's rcp.approx.ftz: 1 / (1 + 2^126.96) (g = -88) flushes to 0 (float64: 6e-39), so
    silu(g) * up (float64: -1.1e-36) and its gradients are exactly zero there."""
    rows, width = 4, 512
    gate_up = np.concatenate([np.full((rows, width), -88.0), np.full((rows, width), 2.0)], axis=1).astype(np.float32)
    if isinstance(spec, SwiGLUSpec):
        *_, out = _run(spec, rows, width, gate_up, np.full((rows, width), np.nan, np.float32))
        assert not np.any(out)
        assert 0 < -swiglu_reference(gate_up[:, :width], gate_up[:, width:]).max() < 1e-35
    else:
        *_, grads = _run(spec, rows, width, gate_up, np.ones((rows, width), np.float32),
                         np.full((rows, 2 * width), np.nan, np.float32))
        assert not np.any(grads)


def test_a_width_of_fewer_elements_than_the_vector_runs_with_a_narrower_one():
    """fp32 intermediate_size 350: two elements a thread, the model's choice for that width."""
    spec = SwiGLUSpec(vec=2)
    rows, width = 256, 350  # 175 blocks of 256 x 2 elements
    gate_up = 3 * np.random.default_rng(2).standard_normal((rows, 2 * width)).astype(np.float32)
    *_, out = _run(spec, rows, width, gate_up, np.full((rows, width), np.nan, np.float32))
    np.testing.assert_allclose(out, swiglu_reference(gate_up[:, :width], gate_up[:, width:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [SwiGLUSpec(dtype=DType.BF16, out_dtype=DType.BF16), SwiGLUBackwardSpec()], ids=str)
def test_a_width_that_would_split_a_threads_vector_across_rows_is_refused(spec):
    arrays = (0,) * (len(spec.params()) - 2)
    with pytest.raises(ValueError, match="must be a positive multiple of"):
        spec.arguments(*arrays, 3, spec.elements() + 2)


@pytest.mark.parametrize("spec", [SwiGLUSpec(), SwiGLUBackwardSpec()], ids=str)
def test_rows_whose_paired_index_would_overflow_32_bits_are_refused(spec):
    """The index into gate_up reaches 2 x rows x width: refused where it would wrap, not only at rows x width."""
    arrays = (0,) * (len(spec.params()) - 2)
    spec.arguments(*arrays, 2**31 // 1024 - 1, 1024)
    with pytest.raises(ValueError, match="overflow the kernel's 32-bit index"):
        spec.arguments(*arrays, 2**31 // 1024, 1024)
