"""Text generation from a trained model: greedy or temperature / top-k sampling over a KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np

from .generation_config import Sampling
from .settings import check_types, require


@dataclass(frozen=True)
class GenerateSettings:
    max_new_tokens: int = 200
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # sample from the k most likely (0: all)
    seed: int = 0
    top_p: float = 1.0        # sample from the smallest set holding this much probability
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_types(self)
        # at least one new token, wherever the count comes from (flag, file or max_length): 0 printed the
        # prompt back as the answer, and transformers refuses it
        require(self.max_new_tokens >= 1, "max_new_tokens", "at least 1", self.max_new_tokens)
        for name in ("temperature", "top_k", "seed"):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        require(0 < self.repetition_penalty <= 100, "repetition_penalty", "in (0, 100]", self.repetition_penalty)

    @classmethod
    def of(cls, sampling: "Sampling", given: dict, prompt_len: int) -> "GenerateSettings":
        """A checkpoint's generation defaults (transformers' meaning), with the flags given on top.
        Without max_new_tokens, the file's max_length caps prompt and continuation together."""
        new = sampling.max_new_tokens or (max(0, sampling.max_length - prompt_len) if sampling.max_length
                                          else cls.max_new_tokens)
        from_file = {"max_new_tokens": new,
                     "temperature": sampling.temperature if sampling.do_sample else 0.0,
                     "top_k": sampling.top_k, "top_p": sampling.top_p,  # used once sampling, as transformers does
                     "repetition_penalty": sampling.repetition_penalty}
        return cls(**{**from_file, **given})


class Decoder(Protocol):
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Logits [V] of the last position after feeding ``ids`` [S] (resets the KV cache)."""

    def decode(self, token: int) -> np.ndarray:
        """Logits [V] after appending one token to the KV cache."""


def choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator, top_p: float = 1.0,
           history: np.ndarray | None = None, repetition_penalty: float = 1.0) -> int:
    """The next token, as transformers' ``generate`` picks it: the repetition penalty on every token
    seen so far (scores above 0 divided by it, below multiplied), then greedy at temperature 0, else
    a sample after temperature, top-k (0: all) and top-p (the smallest set holding ``top_p``)."""
    z = np.asarray(logits, dtype=np.float64).copy()
    if repetition_penalty != 1.0 and history is not None and len(history):
        seen = np.unique(history)
        z[seen] = np.where(z[seen] > 0, z[seen] / repetition_penalty, z[seen] * repetition_penalty)
    if temperature == 0:
        return int(np.argmax(z))
    with np.errstate(over="ignore"):  # the best score at 0 first: a tiny temperature sends the rest to -inf, never NaN
        z = (z - z.max()) / temperature
    if 0 < top_k < len(z):
        z = np.where(z >= np.partition(z, -top_k)[-top_k], z, -np.inf)
    p = np.exp(z)  # (the best at exp(0) = 1)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]  # the mass of the tokens more likely than each
        p[order[above >= top_p]] = 0.0
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate_as(decoder: Decoder, prompt: np.ndarray, gs: GenerateSettings, max_length: int,
                eos_token_ids: tuple[int, ...]) -> Iterator[int]:
    """``generate`` with a command's settings, stopping at the checkpoint's eos ids as transformers does."""
    return generate(decoder, prompt, gs.max_new_tokens, gs.temperature, gs.top_k, gs.seed, max_length=max_length,
                    stop=frozenset(eos_token_ids).__contains__, top_p=gs.top_p,
                    repetition_penalty=gs.repetition_penalty)


def generate(decoder: Decoder, prompt: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, max_length: int | None = None,
             stop: Callable[[int], bool] | None = None, top_p: float = 1.0,
             repetition_penalty: float = 1.0) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` tokens after ``prompt`` (never past ``max_length`` in all)."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or not repetition_penalty > 0:
        raise ValueError("temperature and top_k must be >= 0, top_p in (0, 1], repetition_penalty > 0")
    rng = np.random.default_rng(seed)
    budget = max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(prompt))
    if budget <= 0:
        return
    history = list(np.asarray(prompt).tolist())
    logits = decoder.prefill(np.asarray(prompt))
    for i in range(budget):
        token = choose(logits, temperature, top_k, rng, top_p, np.asarray(history), repetition_penalty)
        history.append(token)
        yield token
        if (stop is not None and stop(token)) or i == budget - 1:
            return
        logits = decoder.decode(token)
