"""The cross-entropy's PTX with its first pass made by the logits' GEMM (``stats_block``: each
column tile's (max, sum of exp) per row, as gemm_wgmma's ``row_stats`` writes them), run through the
interpreter (tests/ptxsim.py) on the CPU against the float64 reference; the GPU tests check the
GEMM's statistics and the whole loss on an H200."""
import numpy as np
import pytest

from ptxgen.kernels.cross_entropy import CrossEntropySpec, cross_entropy_reference, row_stats_reference
from ptxgen.vecio import DType, from_bf16, to_bf16
from ptxsim import launch


@pytest.mark.parametrize("rows, vocab, stats_block, block_size, dtype", [
    (5, 1000, 128, 128, DType.F32),   # 8 tiles, the last 104 columns wide
    (5, 1000, 128, 128, DType.BF16),  # the bf16 model's: logits stored in bf16 by the LM head
    (3, 3000, 16, 128, DType.F32),    # 188 tiles: a thread merges two
    (2, 256, 256, 32, DType.F32)])    # one tile a row
def test_the_loss_from_the_gemms_statistics_is_the_reference_loss(rows, vocab, stats_block, block_size, dtype):
    rng = np.random.default_rng(7)
    logits = (4 * rng.standard_normal((rows, vocab))).astype(np.float32)
    stored = to_bf16(logits) if dtype is DType.BF16 else logits
    logits = from_bf16(stored) if dtype is DType.BF16 else logits  # the values the GEMM stored
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    targets[rows // 2] = -100
    scale = np.float32(1 / max(1, int((targets != -100).sum())))
    spec = CrossEntropySpec(vocab=vocab, dtype=dtype, grad_dtype=DType.BF16, block_size=block_size,
                            stats_block=stats_block)
    assert spec.stats_tiles == -(-vocab // stats_block)
    stats = row_stats_reference(logits, stats_block).astype(np.float32)
    _, _, loss, grad, _ = launch(spec, ((rows, 1, 1), block_size), stored, targets, np.full(rows, np.nan, np.float32),
                               np.full((rows, vocab), 0x7FC0, np.uint16), stats, scale)
    loss_ref, grad_ref = cross_entropy_reference(logits, targets, -100, float(scale))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_bf16(grad), grad_ref, rtol=1e-2, atol=1e-6)
    assert loss[rows // 2] == 0 and not from_bf16(grad)[rows // 2].any()  # the ignored row
