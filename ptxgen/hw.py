"""Hardware facts (sm_90) that kernels and the runtime both rely on, written once: sizes, the
swizzle, shared-memory limits and the tensor cores' operand types.

A kernel's shared-memory layout and the host's description of it (a tensor map, a matrix
descriptor) must agree on these numbers; a second spelling of one could drift from the first.
"""
from __future__ import annotations

import enum

from .builder import T

CHUNK = 16           # bytes: one cp.async copy, one ldmatrix row, the widest vector access
SHARED_LINE = 128    # bytes: shared memory's 32 four-byte banks, 8 chunks (mma.sync tiles' swizzle span)
MBARRIER_BYTES = 8   # one mbarrier object in shared memory

# The 128-byte swizzle of TMA-fed and wgmma-read tiles: 16-byte chunk c of row r at c ^ (r % 8).
SWIZZLE_ROW = 128                # bytes of a swizzled row (the tensor map's CU_TENSOR_MAP_SWIZZLE_128B)
SWIZZLE_ATOM = 8 * SWIZZLE_ROW   # its period: 8 rows, and the alignment a swizzled tile needs
DESCRIPTOR_SWIZZLE = 1 << 62     # a wgmma matrix descriptor's bits 62-63 for it (1 = 128-byte)

SHARED_LIMIT = 227 * 1024        # dynamic shared memory one block may have
STATIC_SHARED_LIMIT = 48 * 1024  # static shared memory one block may have (more must be dynamic)


class MmaType(enum.Enum):
    """A tensor-core operand type. TF32 (fp32 in memory, read with a 10-bit mantissa) is wgmma's only:
    mma.sync m16n8k16 takes the two 16-bit types."""

    BF16 = T.BF16.value
    F16 = T.F16.value
    TF32 = "tf32"  # not a register type

    @property
    def bytes(self) -> int:
        return 4 if self is MmaType.TF32 else 2
