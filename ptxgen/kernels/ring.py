"""Copy rings: a pipeline's ``stages`` equal buffers in shared memory, filled and read in turn.

``Ring`` is the geometry (stage 0's shared address, how many stages, how many bytes each). The
cursors made from a ring walk it, each holding only the state its kernel's synchronization needs;
every cursor has ``at`` (where it is) and ``advance()`` (to the next stage, wrapping):

- ``Slot``: the stage index and the parity of the stage's mbarrier phase, for producers and
  consumers that meet at mbarriers (a wait names the phase; each stage completes once a trip);
  ``ring.address(slot)`` is its stage's buffer.
- ``Pointer``: the stage's shared address itself, for cp.async groups (a wait counts groups,
  so there is no phase to keep).
- ``Pair``: a two-stage ring as (``at``, ``other``), exchanged each round: double buffering
  where each round reads one stage and fills the other.
- ``Offset``: a two-stage ring's byte offset from stage 0, toggled by xor: double buffering
  where the offset is added to several per-thread addresses inside the stages.
"""
from __future__ import annotations

from ..builder import KernelBuilder, Reg, T


class Ring:
    def __init__(self, b: KernelBuilder, stages: int, stage_bytes: int, base: Reg):
        self.b, self.stages, self.stage_bytes, self.base = b, stages, stage_bytes, base
        self._end: Reg | None = None

    def end(self) -> Reg:
        """The shared address just past the last stage (emitted once)."""
        if self._end is None:
            self._end = self.b.add(self.base, self.stages * self.stage_bytes)
        return self._end

    def address(self, slot: "Slot") -> Reg:
        """The buffer of ``slot``'s stage."""
        return self.b.mad(slot.at, self.stage_bytes, self.base)


class Slot:
    """Which stage a slice counter is at (``at``) and the parity of its mbarriers' current phase,
    advanced slice by slice (each stage's barriers complete once per trip around the ring)."""

    def __init__(self, ring: Ring):
        b = ring.b
        self.b, self.stages = b, ring.stages
        self.at, self.phase = b.mov(0, T.U32), b.mov(0, T.U32)

    def seek(self, count: Reg) -> None:
        """To the ``count``-th slice since the start."""
        b = self.b
        b.rem(count, self.stages, out=self.at)
        b.and_(b.div(count, self.stages), 1, out=self.phase)

    def advance(self) -> None:
        b = self.b
        b.add(self.at, 1, out=self.at)
        wrapped = b.setp("eq", self.at, self.stages)
        b.mov(b.selp(0, self.at, wrapped, T.U32), out=self.at)
        b.mov(b.selp(b.xor(self.phase, 1), self.phase, wrapped, T.U32), out=self.phase)


class Pointer:
    """A stage's shared address (``at``), from stage 0."""

    def __init__(self, ring: Ring):
        self.ring, self.end = ring, ring.end()
        self.at = ring.b.mov(ring.base)

    def advance(self) -> None:
        b, ring = self.ring.b, self.ring
        b.add(self.at, ring.stage_bytes, out=self.at)
        b.mov(b.selp(ring.base, self.at, b.setp("eq", self.at, self.end), T.U32), out=self.at)


def _two_stages(ring: Ring, cursor: str) -> None:
    if ring.stages != 2:
        raise ValueError(f"{cursor} walks a two-stage ring, not one of {ring.stages}")


class Pair:
    """Two stages: ``at`` and ``other``, stage 0 first. ``at`` is the ring's base register itself
    (no copy), so after the first exchange the base holds whichever stage is current."""

    def __init__(self, ring: Ring):
        _two_stages(ring, "Pair")
        self.b, self.at = ring.b, ring.base
        self.other = ring.b.add(ring.base, ring.stage_bytes)

    def advance(self) -> None:
        b = self.b
        t = b.mov(self.at)
        b.mov(self.other, out=self.at)
        b.mov(t, out=self.other)


class Offset:
    """A two-stage ring's byte offset from stage 0 (``at``: 0 or ``stage_bytes``)."""

    def __init__(self, ring: Ring):
        _two_stages(ring, "Offset")
        self.b, self.stage_bytes = ring.b, ring.stage_bytes
        self.at = ring.b.mov(0, T.U32)

    def advance(self) -> None:
        self.b.xor(self.at, self.stage_bytes, out=self.at)
