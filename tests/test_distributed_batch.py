"""Each rank's rows of the global batch: disjoint, covering, deterministic, and end to end in
rank order the very batch one process draws (``data.batch_at``)."""
import numpy as np
import pytest

from model.data import batch_at
from model.parallel.batch import BatchSplitError, eval_rows, global_targets, local_batch, rank_rows
from model.reference import IGNORE_INDEX


@pytest.mark.parametrize("batch, world", [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3)])
def test_the_ranks_slices_are_disjoint_cover_the_batch_and_keep_its_order(batch, world):
    rows = [list(range(batch))[rank_rows(batch, r, world)] for r in range(world)]
    assert sum(rows, []) == list(range(batch))  # disjoint, covering, in order
    assert len({len(r) for r in rows}) == 1  # one batch shape on every rank


def test_concatenated_in_rank_order_the_slices_are_the_single_process_batch_at_every_step():
    stream = np.arange(10_000, dtype=np.int32) % 251
    position_one = position_dp = 0
    for _ in range(5):
        ids, targets, position_one = batch_at(stream, position_one, 8, 16)
        drawn, drawn_targets, position_dp = batch_at(stream, position_dp, 8, 16)  # every rank draws the same
        parts = [local_batch(drawn, drawn_targets, r, 4) for r in range(4)]
        np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), ids)
        np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), targets)
        assert position_dp == position_one


def test_the_loss_is_averaged_over_the_global_batchs_targets():
    targets = np.array([[1, 2, IGNORE_INDEX, 3], [IGNORE_INDEX] * 4])
    assert global_targets(targets) == 3
    assert global_targets(np.full((2, 2), IGNORE_INDEX)) == 1  # never a division by zero


def test_a_batch_that_does_not_split_evenly_is_one_line():
    with pytest.raises(BatchSplitError, match=r"^--batch-size 6 does not split evenly among 4 ranks \(use a multiple of 4\)$"):
        rank_rows(6, 0, 4)
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        rank_rows(8, 4, 4)


def test_planted_a_strided_split_is_disjoint_and_covering_but_caught_by_the_order_check():
    """Rows r, r + N, r + 2N, ... per rank: every row once, yet end to end not the batch one
    process sees (the per-position order the GPU plan's rows follow would differ)."""
    ids = np.arange(8)[:, None] * np.ones((1, 4), int)
    strided = [ids[r::4] for r in range(4)]
    assert sorted(np.concatenate(strided)[:, 0].tolist()) == list(range(8))  # disjoint and covering
    assert not np.array_equal(np.concatenate(strided), ids)  # what the order check compares


@pytest.mark.parametrize("batch, world", [(8, 2), (5, 2), (3, 4), (1, 2), (7, 3)])
def test_validation_rows_split_as_evenly_as_can_be_and_cover_the_batch_in_rank_order(batch, world):
    """A short validation set's partial batch need not split evenly: the first ``batch % world``
    ranks take one row more, a rank may take none; end to end in rank order, the batch."""
    rows = [eval_rows(batch, r, world) for r in range(world)]
    assert [r.start for r in rows] == [0] + [r.stop for r in rows[:-1]] and rows[-1].stop == batch
    sizes = [r.stop - r.start for r in rows]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
