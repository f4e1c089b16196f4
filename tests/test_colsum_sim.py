"""The column sum's PTX run through the interpreter (tests/ptxsim.py) on the CPU: finished in one
launch (``finish``: the last block of each column block to be done adds the chunks' sums), it gives
the two launches' sums bit for bit and leaves its counts at zero for the next launch."""
import numpy as np
import pytest

from ptxgen.kernels.colsum import ColumnSumSpec
from ptxsim import launch


def _grid(spec, rows, cols, per_chunk):
    (gx, gy), block = spec.launch_dims(rows, cols, per_chunk)
    return (gx, gy, 1), block


@pytest.mark.parametrize("reverse", [False, True], ids=["last-chunk-last", "first-chunk-last"])
@pytest.mark.parametrize("rows, cols, per_chunk, groups", [(77, 33, 10, 8), (64, 40, 16, 1), (9, 32, 4, 32),
                                                           (300, 64, 64, 4)])
def test_one_launch_finishes_the_chunks_sums_as_a_second_launch_would(rows, cols, per_chunk, groups, reverse):
    """Whichever block of a column block is done last (the interpreter runs them in grid order or
    the other way round) adds the chunks' sums in chunk order."""
    x = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32)
    chunks = -(-rows // per_chunk)
    two = ColumnSumSpec(row_groups=groups)
    partial = launch(two, _grid(two, rows, cols, per_chunk), x, np.zeros((chunks, cols), np.float32),
                     rows, cols, per_chunk)[1]
    expected = launch(two, _grid(two, chunks, cols, chunks), partial, np.zeros(cols, np.float32),
                      chunks, cols, chunks)[1]
    one = ColumnSumSpec(row_groups=groups, finish=True)
    counts = np.zeros(-(-cols // 32), np.int32)
    _, partials, total, counts = launch(one, _grid(one, rows, cols, per_chunk), x,
                                        np.zeros((chunks, cols), np.float32), np.full(cols, np.nan, np.float32),
                                        counts, rows, cols, per_chunk, reverse=reverse)
    np.testing.assert_array_equal(partials, partial)
    np.testing.assert_array_equal(total.view(np.uint32), expected.view(np.uint32))
    assert not counts.any()  # left down for the next launch
    np.testing.assert_allclose(total, x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("finish", [False, True])
def test_a_bf16_matrix_sums_as_its_f32_values_do(finish):
    """The q/k/v bias's gradient sums the bf16 rows its GEMMs read: bit for bit the f32 kernel's sums
    of the same values (widened exactly), in one chunk or several finished in the launch."""
    from ptxgen.vecio import DType, from_bf16, to_bf16
    rows, cols, per_chunk = 70, 40, 16 if finish else 70
    x16 = to_bf16(np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32))
    chunks = -(-rows // per_chunk)

    def run(spec, x):
        extra = (np.zeros((chunks, cols), np.float32),) if finish else ()
        counts = (np.zeros(-(-cols // 32), np.int32),) if finish else ()
        out = launch(spec, _grid(spec, rows, cols, per_chunk), x, *extra, np.full(cols, np.nan, np.float32),
                     *counts, rows, cols, per_chunk)
        return out[2 if finish else 1]

    ours = run(ColumnSumSpec(row_groups=4, finish=finish, dtype=DType.BF16), x16)
    f32 = run(ColumnSumSpec(row_groups=4, finish=finish), from_bf16(x16))
    np.testing.assert_array_equal(ours.view(np.uint32), f32.view(np.uint32))
    np.testing.assert_allclose(ours, from_bf16(x16).astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)
