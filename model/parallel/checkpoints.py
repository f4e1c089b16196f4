"""A data-parallel run's checkpoint: one process's format, written atomically by rank 0 alone.

The moments live in shards, so every rank takes part in gathering them (``optimizer_state`` is a
collective); rank 0 then writes the checkpoint as one process would (``save_checkpoint``: a
temporary directory renamed into place, then ``latest``), and the others wait at a barrier, so no
rank runs ahead (to rotate, exit, or a next checkpoint) before the write is done. Should rank 0
fail to write, it aborts its communicator and exits with its error line; the others, at the
barrier, are stopped by the launcher (``--gpus N``'s parent, torchrun) or by their watchdogs
(``--comm-timeout``). In-process ranks (``LocalGroup``) fail at once with one line naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..checkpoint import save_checkpoint
from ..config import ModelConfig
from .comm import Communicator


class ShardedBackend(Protocol):
    def optimizer_state(self) -> dict[str, np.ndarray]: ...


def save_consolidated(comm: Communicator, backend: ShardedBackend, params: dict[str, np.ndarray], run_dir: Path,
                      step: int, config: ModelConfig, trainer: dict[str, Any], **save: Any) -> Path | None:
    """Collective: the run's checkpoint at ``step`` (rank 0 writes it; its path there, None elsewhere).
    ``params``: the backend's, which every rank reads together (a bf16 ZeRO rank gathers the f32
    masters to make them). ``save``: ``save_checkpoint``'s keyword arguments (tokenizer, keep,
    save_dtype, generation config)."""
    optimizer = backend.optimizer_state()  # every rank: the moments are gathered from all shards
    path = None
    if comm.rank == 0:
        try:
            path = save_checkpoint(run_dir, step, config, params, optimizer, trainer, **save)
        except BaseException as e:
            comm.abort(f"writing the step {step} checkpoint failed: {type(e).__name__}: {e}")
            raise
    comm.barrier()
    return path
