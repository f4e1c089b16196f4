"""How much memory a run needs, and how much is free, so that a model too large is refused with
both figures before anything is allocated (not a MemoryError halfway through).

The estimates count what the backends hold: parameters, AdamW moments, gradients, the float64
copies the numpy reference computes in, the activations it keeps for the backward and the logits.
They are meant to be about right (within a small factor), never a precise bound.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .config import ModelConfig
from .kernels import LOSS_CHUNK_ROWS
from .params import param_shapes


class MemoryTooSmall(ValueError):
    """A run that cannot fit; one line with both figures."""


def n_params(config: ModelConfig) -> int:
    return sum(math.prod(shape) for shape in param_shapes(config).values())


def _activations(c: ModelConfig, batch: int, seq: int) -> int:
    """Floats the forward keeps per batch (per layer: the residual stream, norms, Q/K/V, attention
    output, MLP; the attention scores and probabilities; then the logits, their softmax and gradient)."""
    tokens = batch * seq
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = tokens * (6 * c.hidden_size + 2 * q + 2 * kv + 4 * c.intermediate_size)
    per_layer += 2 * batch * c.num_heads * seq * seq
    return c.num_layers * per_layer + 3 * tokens * c.vocab_size


def train_bytes(config: ModelConfig, batch: int, seq: int, on_gpu: bool, bf16: bool = False) -> int:
    p = n_params(config)
    if on_gpu:  # f32 weights, gradients and two moments (+ bf16 operand copies); f32 activations;
        # the logits LOSS_CHUNK_ROWS rows at a time, their gradient (the LM head's operand) for every row
        tokens = batch * seq
        layers = _activations(config, batch, seq) - 3 * tokens * config.vocab_size
        logits = config.vocab_size * (4 * min(tokens, LOSS_CHUNK_ROWS) + (2 if bf16 else 4) * tokens)
        return p * (16 + (2 if bf16 else 0)) + 4 * layers + logits
    # f32 weights and moments, their f64 copy and f64 gradients each step, the initial weights;
    # f64 activations, about twice over while the backward runs
    return p * 36 + 8 * 2 * _activations(config, batch, seq)


def generate_bytes(config: ModelConfig, max_len: int, on_gpu: bool) -> int:
    p = n_params(config)
    kv = 2 * config.num_layers * max_len * config.num_kv_heads * config.head_dim
    if on_gpu:  # the backend's weights, gradients and moments; the KV cache and logits in f32
        return p * 16 + 4 * (kv + max_len * config.vocab_size)
    # the weights read (f32) and the reference's f64 copy; prefill activations and the KV cache in f64
    return p * 16 + 8 * (kv + _activations(config, 1, max_len))


def free_bytes(on_gpu: bool) -> int:
    """Free device memory on the GPU; else the memory available to this process (the smaller of
    the system's MemAvailable and what the cgroup limit still allows)."""
    if on_gpu:
        from runtime.driver import call, device

        device()
        free, _total = call("cuMemGetInfo")
        return int(free)
    sizes = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                sizes.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            sizes.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not sizes:
        sizes.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return max(0, min(sizes))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"


def check_fits(need: int, on_gpu: bool, what: str) -> None:
    free = free_bytes(on_gpu)
    if need > free:
        where = "free GPU memory" if on_gpu else "available memory"
        raise MemoryTooSmall(f"{what} needs about {_gib(need)}; {_gib(free)} of {where}")
