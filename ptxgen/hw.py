"""Hardware facts (sm_90) that kernels and the runtime both rely on, written once.

A kernel's shared-memory layout and the host's description of it (a tensor map, a matrix
descriptor) must agree on these numbers; a second spelling of one could drift from the first.
"""
from __future__ import annotations

MBARRIER_BYTES = 8   # one mbarrier object in shared memory
