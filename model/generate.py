"""Text generation from a trained model: greedy or temperature / top-k sampling over a KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np

from .settings import check_types, require


@dataclass(frozen=True)
class GenerateSettings:
    max_new_tokens: int = 200
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # sample from the k most likely (0: all)
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("max_new_tokens", "temperature", "top_k", "seed"):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))


class Decoder(Protocol):
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Logits [V] of the last position after feeding ``ids`` [S] (resets the KV cache)."""

    def decode(self, token: int) -> np.ndarray:
        """Logits [V] after appending one token to the KV cache."""


def choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise sample from the top ``top_k`` (0: all) at ``temperature``."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < len(z):
        z = np.where(z >= np.partition(z, -top_k)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(decoder: Decoder, prompt: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, max_length: int | None = None,
             stop: Callable[[int], bool] | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` tokens after ``prompt`` (never past ``max_length`` in all)."""
    if temperature < 0 or top_k < 0:
        raise ValueError("temperature and top_k must be >= 0")
    rng = np.random.default_rng(seed)
    budget = max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(prompt))
    if budget <= 0:
        return
    logits = decoder.prefill(np.asarray(prompt))
    for i in range(budget):
        token = choose(logits, temperature, top_k, rng)
        yield token
        if (stop is not None and stop(token)) or i == budget - 1:
            return
        logits = decoder.decode(token)
