"""The GPU ZeRO-1 step (model/parallel/zero_cuda.py) on one GPU: two ranks as threads of this
process, their collectives staged through the host (StagedCommunicator over a LocalGroup), each
rank's training step a plan run as CUDA graphs between the collectives. Against one process's
CudaBackend on the same global batches: the losses, norms and weights agree within the stated
tolerance, both ranks hold the same bits, and the moments consolidate to one process's.

Tolerance: the ranks' GEMMs sum the weight gradients over their own rows and the collective adds
the two halves, where one process sums all rows at once; fp32 moves the loss and weights by about
1e-6 relative over 3 steps (rtol 1e-4 allowed), bf16 by rounding one more operand boundary now and
then (1e-3 on the loss). An element whose gradient is near zero can flip AdamW's step (about
lr x sign(g)) either way, so weights and moments are compared as all elements within rtol in fp32
and all but a 1e-3 fraction within it in bf16, the moments with atol 1e-3 of their largest value.
"""
import numpy as np
import pytest

from model.config import preset
from model.optim import AdamWSettings
from model.parallel.comm import LocalGroup, StagedCommunicator
from model.parallel.zero_cuda import ZeroCudaRank
from model.params import init_params
from model.precision import Precision
from model.reference import IGNORE_INDEX
from runtime import ModuleCache
from runtime.driver import call, device

pytestmark = pytest.mark.cuda
CONFIG = preset("tiny")
ADAMW = AdamWSettings(max_grad_norm=0.5)
TOLERANCE = {Precision.FP32: (1e-4, 1e-4, 0.0), Precision.BF16: (1e-3, 2e-2, 1e-3)}  # loss, weight rtol, outliers


def assert_close_but_for(actual, expected, rtol, atol, fraction, what):
    """Every element within rtol/atol but for at most ``fraction`` of them."""
    off = ~np.isclose(actual, expected, rtol=rtol, atol=atol)
    assert off.mean() <= fraction, f"{what}: {off.sum()} of {off.size} elements off"


def global_batches(steps: int = 3, batch: int = 4, seq: int = 64):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        ids, targets = (rng.integers(0, CONFIG.vocab_size, (batch, seq)) for _ in range(2))
        targets[0, :9] = IGNORE_INDEX  # the mean is over the global batch's targets
        out.append((ids, targets))
    return out


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16], ids=["fp32", "bf16"])
def test_two_ranks_on_one_gpu_train_as_one_process_does(precision):
    from model.cuda_model import CudaBackend
    params, batches, cache = init_params(CONFIG, seed=0), global_batches(), ModuleCache(use_disk=False)
    one = CudaBackend(CONFIG, params, ADAMW, cache=cache, precision=precision)
    try:
        expected = [one.train_step(ids, targets, 3e-3) for ids, targets in batches]
        expected_params, expected_state = one.params, one.optimizer_state()
    finally:
        one.close()

    group = LocalGroup(2, timeout=120.0)

    def rank(comm):
        call("cuCtxSetCurrent", device().context)  # this thread's driver calls on the GPU's context
        r = ZeroCudaRank(StagedCommunicator(comm), CONFIG, params, ADAMW, precision=precision, cache=cache,
                         bucket_elems=1 << 16)
        try:
            steps = [r.train_step(ids, targets, 3e-3) for ids, targets in batches]
            return steps, r.params, r.optimizer_state()
        finally:
            r.close()

    results = group.run(rank)
    loss_rtol, rtol, fraction = TOLERANCE[precision]
    for steps, weights, state in results:
        for (loss, norm), (loss1, norm1) in zip(steps, expected):
            assert loss == pytest.approx(loss1, rel=loss_rtol) and norm == pytest.approx(norm1, rel=rtol)
        for name, w in expected_params.items():
            assert_close_but_for(weights[name], w, rtol, 1e-6, fraction, name)
        for name, m in expected_state.items():
            assert_close_but_for(state[name], m, rtol, 1e-3 * float(np.abs(m).max()), fraction, name)
    for name in expected_params:  # every replica the same bits
        assert np.array_equal(results[0][1][name], results[1][1][name]), name
