"""Each rank's rows of the global batch.

Every rank draws the same global batch (``data.batch_at``: the host work is small, and one data
position still says where a run is) and keeps rows ``[rank * b, (rank + 1) * b)`` with ``b =
batch / world``: the slices are disjoint, cover the batch, and laid end to end in rank order are
the batch one GPU would see. The loss is the mean over the GLOBAL batch's targets, so each rank
also needs the global count (``global_targets``), which it has without communicating.
"""
from __future__ import annotations

import numpy as np

from ..reference import IGNORE_INDEX


class BatchSplitError(ValueError):
    """A global batch that does not split evenly among the ranks; one line."""


def rank_rows(batch: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of a ``batch``-row global batch. Every rank gets the same number of rows
    (one batch shape, one plan and one CUDA graph on every GPU), so ``world`` must divide ``batch``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    if batch % world:
        raise BatchSplitError(f"--batch-size {batch} does not split evenly among {world} ranks "
                              f"(use a multiple of {world})")
    per = batch // world
    return slice(rank * per, (rank + 1) * per)


def eval_rows(batch: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of a validation batch: as even as can be (a short validation set's
    partial batch need not split evenly; the first ``batch % world`` ranks take one row more, a
    rank may take none), in rank order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    per, extra = divmod(batch, world)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (rank < extra))


def local_batch(ids: np.ndarray, targets: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s rows of a global batch's ids and targets."""
    rows = rank_rows(len(ids), rank, world)
    return ids[rows], targets[rows]


def global_targets(targets: np.ndarray) -> int:
    """The count the loss is averaged over: the global batch's targets that are not ignored (at least 1)."""
    return max(1, int((np.asarray(targets) != IGNORE_INDEX).sum()))
