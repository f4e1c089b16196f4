"""Warp and block all-reductions shared by every kernel that reduces (one copy, not one per kernel)."""
from __future__ import annotations

from .builder import Addr, KernelBuilder, Reg

_IDENTITY = {"add": 0.0, "max": float("-inf")}


def _combine(b: KernelBuilder, op: str, x: Reg, y: Reg) -> Reg:
    return b.add(x, y) if op == "add" else b.max(x, y)


def tree_sum(b: KernelBuilder, values: list[Reg]) -> Reg:
    """Pairwise sum in a fixed order (so the rounding, and the result, never vary)."""
    while len(values) > 1:
        pairs = [b.add(values[k], values[k + 1]) for k in range(0, len(values) - 1, 2)]
        values = pairs + values[len(values) - len(values) % 2:]
    return values[0]


def warp_allreduce(b: KernelBuilder, value: Reg, op: str, width: int = 32) -> Reg:
    """Butterfly shuffle: every lane ends with the reduction over its aligned group of ``width``
    consecutive lanes (32: the whole warp)."""
    if width not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"warp_allreduce: width {width} is not a power of two <= 32")
    offset = width // 2
    while offset:
        value = _combine(b, op, value, b.shfl("bfly", value, offset))
        offset //= 2
    return value


def block_allreduce(b: KernelBuilder, value: Reg, op: str, block_size: int, tid: Reg,
                    in_loop: bool = False) -> Reg:
    """Every thread of a ``block_size``-thread block gets the reduction of all threads' values.

    Warps reduce by shuffle, lane 0 of each warp writes its partial to shared memory, then every
    warp reduces the partials by shuffle again, so the result needs no broadcast step.
    Each call owns its shared array, so several calls in one kernel need no extra barrier; a call
    inside a loop (``in_loop``) adds one after the read, before the next iteration writes again.
    """
    if op not in _IDENTITY:
        raise ValueError(f"block_allreduce: op must be one of {sorted(_IDENTITY)}")
    if block_size % 32 or not 32 <= block_size <= 1024:
        raise ValueError(f"block_allreduce: block_size {block_size} is not a multiple of 32 in [32, 1024]")
    value = warp_allreduce(b, value, op)
    warps = block_size // 32
    if warps == 1:
        return value
    partials = b.shared_array("partials", value.type, warps)
    base = b.addr_of(partials)
    lane = b.and_(tid, 31)
    warp_off = b.shl(b.shr(tid, 5), 2)
    is_lane0 = b.setp("eq", lane, 0)
    b.st("shared", Addr(b.add(base, warp_off)), value, guard=is_lane0)
    b.bar_sync()
    gathered = b.mov(_IDENTITY[op], value.type)
    has_partial = b.setp("lt", lane, warps)
    b.ld("shared", value.type, Addr(b.add(base, b.shl(lane, 2))), out=[gathered], guard=has_partial)
    if in_loop:
        b.bar_sync()
    return warp_allreduce(b, gathered, op)
