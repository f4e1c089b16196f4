"""How much memory a run needs, and how much is free, so that a model too large is refused with
both figures before anything is allocated (not a MemoryError halfway through).

The estimates count what the backends hold: parameters, AdamW moments, gradients, the float64
copies the numpy reference computes in, the activations it keeps for the backward and the logits.
The CUDA training step's buffers are counted from the buffer classes it allocates (cuda_buffers),
so they follow the model's layout; the rest are meant to be about right (within a small factor),
never a precise bound.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from runtime.memory import DTYPES, View

from .config import ModelConfig
from .kernels import LOSS_CHUNK_ROWS, SPLIT_K_MAX
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


class _Counter:
    """An arena that allocates nothing: the bytes of every buffer asked of it."""

    def __init__(self) -> None:
        self.bytes = 0

    def new(self, name: str, shape: tuple[int, ...], dtype: str = "f32") -> View:
        self.bytes += math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        return View(name, 0, shape, dtype)


def cuda_step_buffer_bytes(config: ModelConfig, batch: int, seq: int, bf16: bool) -> int:
    """The bytes of the activations, keys/values and training buffers a CUDA training step of
    ``batch`` x ``seq`` allocates (CudaBackend._build's buffers), without a device."""
    from .cuda_buffers import KV, Activations, TrainingBuffers

    counter, T, width = _Counter(), batch * seq, config.num_kv_heads * config.head_dim
    Activations(counter, config, batch, seq, bf16)  # type: ignore[arg-type]
    shared = (counter.new("k", (T, width)), counter.new("v", (T, width))) if bf16 else None
    for i in range(config.num_layers):
        KV.allocate(counter, i, T, width, bf16, shared)  # type: ignore[arg-type]
    TrainingBuffers(counter, config, batch, seq, bf16, min(T, LOSS_CHUNK_ROWS))  # type: ignore[arg-type]
    return counter.bytes


def train_bytes(config: ModelConfig, batch: int, seq: int, on_gpu: bool, bf16: bool = False) -> int:
    p = n_params(config)
    if on_gpu:  # f32 weights, gradients and two moments (+ the matrices' bf16 copies); the step's
        # buffers; the backward's scratch: bf16 output gradients and at most SPLIT_K_MAX partial
        # sums of a layer's largest matrix (the vocabulary's GEMMs are never split)
        widest = max(math.prod(s) for name, s in param_shapes(config).items() if ".layers." in name)
        scratch = 2 * batch * seq * max(config.hidden_size, config.num_heads * config.head_dim) \
            + 4 * SPLIT_K_MAX * widest
        return p * (16 + (2 if bf16 else 0)) + cuda_step_buffer_bytes(config, batch, seq, bf16) + scratch
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
