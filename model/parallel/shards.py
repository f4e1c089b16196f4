"""ZeRO-1 over the flat parameter layout: buckets, each rank's piece of each, and its shard.

The parameters, gradients and AdamW moments live in flat f32 buffers (``ParamLayout``). For data
parallelism the buffers are padded to ``padded_total`` and cut into buckets of equal size (the
last one shorter), each a multiple of ``world * ALIGN`` elements: a bucket is reduce-scattered as
soon as the backward's last write into it is done, rank r receiving the r-th of its ``world``
equal pieces. A rank's shard is its pieces laid end to end, one contiguous buffer per rank
(fp32 master weights' part, gradient sums, both moments); every shard has the same size, and
every piece starts 16-byte aligned in bf16 (ALIGN elements), as the layout's tensors do (a fused
module's, the first of its parts: the others follow it unpadded).

Buckets are fixed-size ranges of the flat buffer, not whole tensors, so that every piece splits
evenly (NCCL's reduce-scatter gives each rank the same count) without moving a tensor; a bucket
that straddles two tensors is ready when both are (``bucket_ready_steps``). A piece may straddle
the end of the decayed tensors: ``segments`` splits it there for AdamW's weight decay. ``cuts``
are offsets where a bucket must end (rounded to the bucket unit both ways, so a cut that is not on
a unit leaves one bucket of a single unit across it): ZeroCudaRank cuts where the weights it
gathers in bf16 begin and end. A ``whole`` range, from one cut to another, is one bucket however
large (ZeroCudaRank's embedding table: each rank's piece of it a slab of whole rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..cuda_buffers import ParamLayout
from .comm import Communicator

if TYPE_CHECKING:
    from runtime.plan import Plan

ALIGN = 8  # elements: a piece starts 16 bytes aligned in bf16 (32 in f32), as ParamLayout's modules
# 128 MiB of f32 gradients per reduce-scatter. Each bucket costs the step about 40 us besides its
# bytes (its send and its all-gather split the step's graphs; measured on one H200 as one NCCL rank,
# qwen2-0.5b bf16 8x1024: 69.0 ms at 128 MiB, 69.4 at 64, 70.6 at 32, 78.1 at 8, against 67.3 for
# the plain step); a larger bucket makes the last send, after the backward, longer.
DEFAULT_BUCKET_ELEMS = 1 << 25


@dataclass(frozen=True)
class Bucket:
    index: int
    start: int  # in the padded flat buffers
    size: int  # a multiple of world * ALIGN

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Piece:
    """Rank r's part of one bucket: ``size`` elements at ``flat`` in the flat buffers, at ``shard`` in its shard."""

    bucket: int
    flat: int
    shard: int
    size: int


@dataclass(frozen=True)
class Segment:
    """A run of a rank's shard with one weight-decay setting (AdamW runs once per segment)."""

    shard: int
    flat: int
    size: int
    decays: bool


class ShardPlan:
    """Buckets and shards of ``total`` flat elements among ``world`` ranks."""

    def __init__(self, total: int, world: int, decay_end: int, bucket_elems: int = DEFAULT_BUCKET_ELEMS,
                 cuts: Sequence[int] = (), whole: tuple[int, int] | None = None):
        if world < 1 or total < 1 or bucket_elems < 1:
            raise ValueError(f"a shard plan needs world, total and bucket size >= 1, got {world}, {total}, {bucket_elems}")
        if not 0 <= decay_end <= total:
            raise ValueError(f"decay_end {decay_end} is outside 0..{total}")
        self.total, self.world, self.decay_end = total, world, decay_end
        unit = world * ALIGN
        self.padded_total = -(-total // unit) * unit
        if any(not 0 <= c <= total for c in cuts):
            raise ValueError(f"cuts {list(cuts)} must lie within 0..{total}")
        size = -(-bucket_elems // unit) * unit
        bounds = sorted({0, self.padded_total, *(c // unit * unit for c in cuts), *(-(-c // unit) * unit for c in cuts)})
        spans = list(zip(bounds, bounds[1:]))
        if whole is not None and tuple(whole) not in spans:
            raise ValueError(f"a whole bucket {whole} must run from one cut on the unit {unit} to the next")
        starts = [at for lo, hi in spans for at in ([lo] if (lo, hi) == whole else range(lo, hi, size))]
        ends = starts[1:] + [self.padded_total]
        self.buckets = [Bucket(i, at, end - at) for i, (at, end) in enumerate(zip(starts, ends))]
        self.shard_size = self.padded_total // world

    @classmethod
    def of(cls, layout: ParamLayout, world: int, bucket_elems: int = DEFAULT_BUCKET_ELEMS,
           cuts: Sequence[int] = (), whole: tuple[int, int] | None = None) -> "ShardPlan":
        return cls(layout.total, world, layout.decay_end, bucket_elems, cuts, whole)

    def pieces(self, rank: int) -> list[Piece]:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside 0..{self.world - 1}")
        out, at = [], 0
        for b in self.buckets:
            n = b.size // self.world
            out.append(Piece(b.index, b.start + rank * n, at, n))
            at += n
        return out

    def segments(self, rank: int) -> list[Segment]:
        """The rank's shard as runs of one decay setting (pieces split at ``decay_end``)."""
        out = []
        for p in self.pieces(rank):
            cut = min(max(self.decay_end, p.flat), p.flat + p.size)
            for flat, end, decays in ((p.flat, cut, True), (cut, p.flat + p.size, False)):
                if end > flat:
                    out.append(Segment(p.shard + flat - p.flat, flat, end - flat, decays))
        return out

    def pad(self, flat: np.ndarray) -> np.ndarray:
        """A layout-sized flat buffer, padded with zeros to ``padded_total`` (same dtype)."""
        if flat.shape != (self.total,):
            raise ValueError(f"a flat buffer of {self.total} elements expected, got shape {flat.shape}")
        out = np.zeros(self.padded_total, flat.dtype)
        out[:self.total] = flat
        return out

    def shard_of(self, padded: np.ndarray, rank: int) -> np.ndarray:
        """Rank ``rank``'s shard of a padded flat buffer (a copy): what it loads from a checkpoint."""
        return np.concatenate([padded[p.flat:p.flat + p.size] for p in self.pieces(rank)])

    def consolidate(self, shards: Sequence[np.ndarray]) -> np.ndarray:
        """Every rank's shard back into one layout-sized flat buffer (what a checkpoint holds)."""
        if len(shards) != self.world or any(s.shape != (self.shard_size,) for s in shards):
            raise ValueError(f"{self.world} shards of {self.shard_size} elements expected")
        out = np.zeros(self.padded_total, shards[0].dtype)
        for rank, shard in enumerate(shards):
            for p in self.pieces(rank):
                out[p.flat:p.flat + p.size] = shard[p.shard:p.shard + p.size]
        return out[:self.total]

    def reduce_scatter(self, comm: Communicator, padded: np.ndarray, shard: np.ndarray,
                       order: Sequence[int] | None = None) -> None:
        """Every bucket of ``padded`` (this rank's gradients) summed over the ranks into this rank's
        pieces of ``shard``, bucket by bucket in ``order`` (default: by index; the GPU sends them in
        ``send_order``)."""
        pieces = self.pieces(comm.rank)
        for i in order if order is not None else range(len(self.buckets)):
            b, p = self.buckets[i], pieces[i]
            comm.reduce_scatter(padded[b.start:b.end], shard[p.shard:p.shard + p.size])

    def all_gather(self, comm: Communicator, shard: np.ndarray, padded: np.ndarray) -> None:
        """Every rank's shard into ``padded`` (updated weights after AdamW; moments for a checkpoint)."""
        for b, p in zip(self.buckets, self.pieces(comm.rank)):
            comm.all_gather(shard[p.shard:p.shard + p.size], padded[b.start:b.end])


def bucket_ready_steps(plan: "Plan", grads_ptr: int, shards: ShardPlan, section: str = "backward",
                       skip: Sequence[int] = ()) -> list[int | None]:
    """For each bucket, the index in ``plan.of(section)`` of the step after which its gradients are
    final (the last step writing into it): where its reduce-scatter may be launched. ``grads_ptr``:
    the address of the (padded) f32 gradient buffer. ``skip``: buckets not sent (None)."""
    ready: list[int | None] = []
    for b in shards.buckets:
        if b.index in skip:
            ready.append(None)
            continue
        step = plan.last_writer(grads_ptr + 4 * b.start, 4 * b.size, section)
        if step is None:
            raise ValueError(f"no {section} step writes bucket {b.index} (elements {b.start}..{b.end})")
        ready.append(step)
    return ready


def send_order(ready: Sequence[int | None]) -> list[int]:
    """Bucket indexes in the order their gradients become final (ties by index; None: not sent):
    the same on every rank, as collectives must be."""
    return sorted((i for i, step in enumerate(ready) if step is not None), key=lambda i: (ready[i], i))
