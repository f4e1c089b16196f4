"""Proof that the ranks hold the same weights: each one's digest, exchanged every K steps.

Data-parallel ranks must stay bit-identical in what the step reads. Under ZeRO-1 every weight is
all-gathered every step (on the GPU in bf16, the matrices the GEMMs alone read as their bf16
copies), so a rank's own arithmetic cannot make them differ; a faulty transport or memory can, and
so can state a rank derives for itself (on the GPU, the bf16 copies each rank casts). Such a rank
would train a different model without a word, so every ``K`` steps each rank hashes its weights
and all-gathers the digests; any difference stops every rank with one line naming those that differ.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ptxgen.spec import sha256_hex

from .comm import Communicator

DIGEST_BYTES = 32  # sha256


class ReplicaMismatch(RuntimeError):
    """Ranks whose weights differ; one line."""


def weights_digest(weights: np.ndarray) -> bytes:
    return bytes.fromhex(sha256_hex(np.ascontiguousarray(weights).tobytes()))


def check_replicas(comm: Communicator, weights: np.ndarray, step: int,
                   all_gather: Callable[[np.ndarray, np.ndarray], None] | None = None) -> None:
    """Collective: every rank's digest of ``weights``, compared with rank 0's on every rank.
    ``all_gather``: how host bytes travel where the communicator takes device buffers."""
    mine = np.frombuffer(weights_digest(weights), np.uint8).copy()
    every = np.zeros(DIGEST_BYTES * comm.world, np.uint8)
    (all_gather or comm.all_gather)(mine, every)
    rows = every.reshape(comm.world, DIGEST_BYTES)
    differ = [r for r in range(1, comm.world) if not np.array_equal(rows[r], rows[0])]
    if differ:
        raise ReplicaMismatch(
            f"step {step}: the weights of rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} "
            f"differ from rank 0's (sha256 {bytes(rows[differ[0]]).hex()[:12]} vs {bytes(rows[0]).hex()[:12]}); "
            "data-parallel ranks must hold bit-identical weights, so the run stops")
