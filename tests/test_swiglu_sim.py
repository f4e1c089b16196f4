"""The SwiGLU kernels' PTX run through the interpreter (tests/ptxsim.py) on the CPU: gate and up
read from the halves of each row of one tensor, dgate and dup written so, every registered example
against the float64 reference (the GPU tests check the same on an H200)."""
import numpy as np
import pytest

from ptxgen.kernels.swiglu import SwiGLUBackwardSpec, SwiGLUSpec, swiglu_backward_reference, swiglu_reference
from ptxgen.vecio import DType, from_bf16, round_to, to_bf16
from ptxsim import launch

ROWS, WIDTH = 4, 512  # a multiple of every example's block x vector: the interpreter's blocks branch as one


def _stored(x: np.ndarray, dtype: DType) -> np.ndarray:
    return to_bf16(x) if dtype is DType.BF16 else x.astype(np.float32)


def _loaded(x: np.ndarray, dtype: DType) -> np.ndarray:
    return from_bf16(x).astype(np.float64) if dtype is DType.BF16 else x.astype(np.float64)


def _run(spec, *arrays):
    grid, block = spec.launch_dims(ROWS, WIDTH)
    return launch(spec, ((grid, 1, 1), block), *spec.arguments(*arrays, ROWS, WIDTH))


def _tolerance(spec) -> float:
    return 1e-2 if spec.out_dtype is DType.BF16 else 1e-5


@pytest.mark.parametrize("spec", SwiGLUSpec.examples(), ids=str)
def test_swiglu_reads_gate_and_up_from_the_halves_of_each_row(spec):
    rng = np.random.default_rng(0)
    gate_up = round_to(3 * rng.standard_normal((ROWS, 2 * WIDTH)), spec.dtype)
    out_empty = _stored(np.full((ROWS, WIDTH), np.nan), spec.out_dtype)
    *_, out = _run(spec, _stored(gate_up, spec.dtype), out_empty)
    ref = swiglu_reference(gate_up[:, :WIDTH], gate_up[:, WIDTH:])
    np.testing.assert_allclose(_loaded(out, spec.out_dtype), ref, rtol=_tolerance(spec), atol=1e-6)


@pytest.mark.parametrize("spec", SwiGLUBackwardSpec.examples(), ids=str)
def test_swiglu_backward_writes_dgate_and_dup_into_the_halves_of_each_row(spec):
    rng = np.random.default_rng(1)
    gate_up = round_to(3 * rng.standard_normal((ROWS, 2 * WIDTH)), spec.dtype)
    dout = rng.standard_normal((ROWS, WIDTH)).astype(np.float32)
    empty = _stored(np.full((ROWS, 2 * WIDTH), np.nan), spec.out_dtype)
    *_, dgate_up = _run(spec, _stored(gate_up, spec.dtype), dout, empty)
    dgate_up = _loaded(dgate_up, spec.out_dtype)
    refs = swiglu_backward_reference(gate_up[:, :WIDTH], gate_up[:, WIDTH:], dout)
    for ours, ref in zip((dgate_up[:, :WIDTH], dgate_up[:, WIDTH:]), refs):
        np.testing.assert_allclose(ours, ref, rtol=_tolerance(spec), atol=1e-5)


@pytest.mark.parametrize("spec", [SwiGLUSpec(dtype=DType.BF16, out_dtype=DType.BF16), SwiGLUBackwardSpec()], ids=str)
def test_a_width_that_would_split_a_threads_vector_across_rows_is_refused(spec):
    arrays = (0,) * (len(spec.params()) - 2)
    with pytest.raises(ValueError, match="width must be a positive multiple of"):
        spec.arguments(*arrays, 3, spec.vec() + 2)
