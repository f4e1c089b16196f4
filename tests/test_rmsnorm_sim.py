"""The RMSNorm backward's PTX run through the interpreter (tests/ptxsim.py) on the CPU: reading its
dy in bf16 (``dy_dtype``, as bf16 precision's dX GEMMs store it), it gives the f32 kernel's outputs
of the same values bit for bit, and both are the float64 reference's within 1e-5."""
import numpy as np
import pytest

from ptxgen.kernels.rmsnorm import RMSNormBackwardSpec, rmsnorm_backward_reference, rmsnorm_reference
from ptxgen.vecio import DType, from_bf16, to_bf16
from ptxsim import launch


@pytest.mark.parametrize("residual", [False, True], ids=["final-norm", "residual"])
@pytest.mark.parametrize("rows, hidden", [(11, 128), (5, 97)])  # 97: one value a load, not a vector
def test_rmsnorm_backward_reads_a_bf16_dy_as_the_f32_kernel_reads_its_values(rows, hidden, residual):
    """dx, its bf16 copy and the dgamma partials, with rows a block's count does not divide."""
    rng = np.random.default_rng(hidden)
    x, dres = (rng.standard_normal((rows, hidden)).astype(np.float32) for _ in range(2))
    gamma = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    dy16 = to_bf16(rng.standard_normal((rows, hidden)).astype(np.float32))
    rstd = rmsnorm_reference(x, gamma, 1e-6)[1].astype(np.float32)
    outs = []
    for dy, dtype in ((dy16, DType.BF16), (from_bf16(dy16), DType.F32)):
        spec = RMSNormBackwardSpec(hidden=hidden, residual=residual, bf16_copy=True, rows_per_block=4,
                                   block_size=64, dy_dtype=dtype)
        grid, block = spec.launch_dims(rows)
        outs.append(launch(spec, ((grid, 1, 1), block), x, gamma, dy, rstd, *((dres,) if residual else ()),
                           np.full((rows, hidden), np.nan, np.float32), np.full((rows, hidden), 0x7FC0, np.uint16),
                           np.full((spec.partial_rows(rows), hidden), np.nan, np.float32), rows)[-3:])
    for ours, f32s in zip(*outs):  # dx, dx16, dgamma partials
        assert not np.isnan(from_bf16(ours) if ours.dtype == np.uint16 else ours).any()  # every value written
        np.testing.assert_array_equal(ours, f32s)
    dx, dgamma = rmsnorm_backward_reference(x, gamma, from_bf16(dy16), 1e-6)  # and both are right (float64)
    np.testing.assert_allclose(outs[0][0], dx + (dres if residual else 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[0][2].sum(axis=0), dgamma, rtol=1e-5, atol=1e-5)
