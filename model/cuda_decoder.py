"""Incremental decoding on the GPU: the training forward's plan over per-layer KV caches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.plan import Plan

from runtime import View

from .cuda_buffers import KV, Activations, Arena
from .cuda_model import CudaBackend, forward, lm_head
from .reference import check_cache_room, check_cache_size, check_tokens


@dataclass
class _Call:
    """The plan of a call with some count of new tokens, and its buffers."""

    plan: Plan
    arena: Arena
    acts: Activations
    logits: View


class CudaDecoder:
    """Incremental decoding of one sequence on the GPU, with per-layer K/V caches on the device.

    Uses the backend's weights and its pre-warmed kernels (strict mode): the same ``forward`` as
    training, planned once per count of new tokens, with keys and values written into the caches
    from the plan's value ``cached`` (the cache's length) on and attention over the cached rows.
    ``prefill`` resets the cache; each call returns the last position's logits.
    """

    def __init__(self, backend: CudaBackend, max_len: int):
        c = backend.config
        max_len = check_cache_size(c, max_len)
        self.backend, self.max_len, self.length = backend, max_len, 0
        self._cache = Arena()
        self._kv = [KV.allocate(self._cache, i, max_len, c.num_kv_heads * c.head_dim, backend.bf16)
                    for i in range(c.num_layers)]
        self._plans: dict[int, _Call] = {}  # by the count of new tokens

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.length = 0
        return self._run(np.asarray(ids).reshape(-1))

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([token]))

    def close(self) -> None:
        for call in self._plans.values():
            call.plan.free()
            call.arena.free()
        self._cache.free()

    def _plan(self, new: int) -> _Call:
        be = self.backend
        plan, arena = Plan(be.cache), Arena()
        acts, logits = Activations(arena, be.config, 1, new, be.kernels), arena.new("logits", (1, be.config.vocab_size))
        ops = be.ops(plan, arena, new)
        lm_head(ops, forward(ops, acts, self._kv, kv_stride=self.max_len, cached=plan.value("cached", 0)), logits)
        return _Call(plan, arena, acts, logits)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        new = len(ids)
        check_cache_room(self.max_len, self.length, new)
        be = self.backend
        check_tokens(be.config, ids[None, :], self.length)
        with be.cache.strict_mode():
            if new not in self._plans:
                self._plans[new] = self._plan(new)
            call = self._plans[new]
            call.acts.ids.upload(ids.astype(np.int32))
            call.acts.pos.upload(np.arange(self.length, self.length + new, dtype=np.int32))
            call.plan.set(cached=self.length)
            call.plan.run()
        self.length += new
        return call.logits.to_numpy()[0]
