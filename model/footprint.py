"""How much memory a run needs, and how much is free, so that a model too large is refused with
both figures before anything is allocated (not a MemoryError halfway through).

The estimates count what the backends hold: parameters, AdamW moments, gradients, the float64
copies the numpy reference computes in, the activations it keeps for the backward and the logits.
The CUDA training step's buffers are counted from the buffer classes it allocates (cuda_buffers),
so they follow the model's layout; the rest are meant to be about right (within a small factor),
never a precise bound.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ptxgen.hw import SHARED_LIMIT
from ptxgen.spec import KernelSpec

from .config import ModelConfig
from .kernels import LOSS_CHUNK_ROWS, ModelKernels
from .optim import AdamWSettings
from .params import over_layers, param_shapes
from .precision import Precision
from .reference import IGNORE_INDEX


class MemoryTooSmall(ValueError):
    """A run that cannot fit; one line with both figures."""


def n_params(config: ModelConfig) -> int:
    return over_layers(config, lambda shapes: sum(math.prod(shape) for shape in shapes.values()))


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

    def new(self, name: str, shape: tuple[int, ...], dtype: str = "f32"):
        from runtime.memory import DTYPES, View  # (imported here: the CPU-only commands never need it)

        self.bytes += math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        return View(name, 0, shape, dtype)


# the GPU waves (resident blocks of one GEMM) a split-K decision is bounded over: 114-, 132- and
# 148-SM parts (H100 PCIe, H100/H200 SXM, B200), one to eight blocks an SM
WAVES = tuple((sms, blocks) for sms in (114, 132, 148) for blocks in (1, 2, 4, 8))


def _wave(spec: KernelSpec, sms: int, blocks: int) -> int:
    """The blocks of ``spec`` a GPU of ``sms`` SMs runs at once, ``blocks`` an SM but where the
    spec's shared memory allows only one (a TMA-fed GEMM's stages: more than half an SM's)."""
    return sms * (1 if 2 * spec.dynamic_shared_bytes() > SHARED_LIMIT else blocks)
SMALL_BUFFERS = 1 << 20  # the GEMMs' tensor maps (256 bytes each), the gradient norm's partial sums


def _cuda_backend_bytes(config: ModelConfig, bf16: bool) -> int:
    """What a CudaBackend holds whatever it runs: f32 weights, gradients and two moments in the
    padded layout (+ the bf16 copies), and SMALL_BUFFERS."""
    from .cuda_buffers import ParamLayout

    return ParamLayout(config).total * (16 + (2 if bf16 else 0)) + SMALL_BUFFERS


def _zero_rank_bytes(config: ModelConfig, world: int, shapes: Iterable[tuple[int, int]], bf16: bool) -> int:
    """What a ZeRO-1 rank of ``world`` (parallel.zero_cuda) holds besides its steps' buffers: the
    padded flat weights and gradients in f32, its shard of the two moments and of the reduced
    gradients, the bf16 copies, SMALL_BUFFERS, a checkpoint's moment gathered whole in f32
    (``optimizer_state``), and for each shape (where the table's gradient is in row slabs) every
    rank's lookup-gradient rows in f32 and three int32 groupings of them. NCCL's own buffers are
    not counted."""
    from .cuda_buffers import ParamLayout
    from .parallel.zero_cuda import shard_plan

    shards, slab_rows = shard_plan(config, world, Precision.BF16 if bf16 else Precision.FP32)
    held = 12 * shards.padded_total + 12 * shards.shard_size + (2 * ParamLayout(config).decay_end if bf16 else 0)
    rows = 0 if slab_rows is None else sum(world * b * s * (4 * config.hidden_size + 12) + 4 for b, s in shapes)
    return held + rows + SMALL_BUFFERS


def cuda_step_buffer_bytes(config: ModelConfig, batch: int, seq: int, bf16: bool) -> int:
    """The bytes of the activations, keys/values and training buffers a CUDA training step of
    ``batch`` x ``seq`` allocates (cuda_buffers.step_buffers, as CudaBackend allocates them)."""
    from .cuda_buffers import step_buffers

    counter = _Counter()
    kernels = ModelKernels.of(config, AdamWSettings(), IGNORE_INDEX, Precision.BF16 if bf16 else Precision.FP32)
    step_buffers(counter, config, batch, seq, kernels, min(batch * seq, LOSS_CHUNK_ROWS))  # type: ignore[arg-type]
    return counter.bytes


def cuda_scratch_bytes(config: ModelConfig, tokens: int, bf16: bool) -> int:
    """The backward's scratch for ``tokens`` rows (cuda_ops.scratch_shapes), its split-K partial
    sums at the largest of the splits any of WAVES would choose."""
    from .cuda_buffers import linear_shapes
    from .cuda_ops import scratch_shapes

    # (the GEMMs of a data-parallel rank do not cut their tails: they split dW, whose partial sums count)
    kernels = ModelKernels.of(config, AdamWSettings(), IGNORE_INDEX, Precision.BF16 if bf16 else Precision.FP32,
                              cut_tails=False)
    matrices = linear_shapes(param_shapes(config))
    per_wave = [scratch_shapes(kernels, config, tokens, matrices, functools.partial(_wave, sms=sms, blocks=blocks))
                for sms, blocks in WAVES]
    counter = _Counter()
    for name, (_, dtype) in per_wave[0].items():
        counter.new(name, max((s[name][0] for s in per_wave), key=math.prod), dtype)
    return counter.bytes


def tail_workspace_bytes(config: ModelConfig, bf16: bool, tokens: Iterable[int] | None = None) -> int:
    """The split tails' workspace a backend allocates once (cuda_ops.TailWorkspace) on the widest
    of WAVES: if a training step of some ``tokens`` rows splits a GEMM's tail, or (None: decoding,
    whose prompts may be any length) if any GEMM can."""
    from .cuda_buffers import linear_shapes
    from .cuda_ops import splits_a_tail, tail_shapes

    kernels = ModelKernels.of(config, AdamWSettings(), IGNORE_INDEX, Precision.BF16 if bf16 else Precision.FP32)
    matrices = linear_shapes(param_shapes(config))
    waves = [functools.partial(_wave, sms=sms, blocks=blocks) for sms, blocks in WAVES]
    if tokens is not None and not any(splits_a_tail(kernels, config, t, matrices, w) for t in tokens for w in waves):
        return 0
    counter = _Counter()
    for name, shape in tail_shapes(kernels, waves[-1]).items():
        counter.new(name, *shape)
    return counter.bytes


def train_bytes(config: ModelConfig, shapes: Iterable[tuple[int, int]], on_gpu: bool, bf16: bool = False,
                world: int = 1) -> int:
    """Bytes a run training on ``shapes`` (batch, seq) holds: a GPU backend builds each shape's step
    (the training batch, and a partial validation batch when the validation data is short). On the
    GPU of a data-parallel run of ``world`` ranks: one rank's (its shapes, its rows of the batches),
    with every buffer our code allocates for the collectives (``_zero_rank_bytes``; the loss sum,
    barrier and weight-digest words within SMALL_BUFFERS). Not NCCL's own, which cannot be known
    before its communicator connects: protocol buffers for each channel and peer (NCCL_BUFFSIZE, 4
    MiB by default, and the LL and LL128 FIFOs) times the channels NCCL picks for the topology it
    finds, tens of channels making hundreds of MiB (arithmetic, not measured here): a run near the
    limit must leave that free (README)."""
    shapes = set(shapes)
    if on_gpu:  # the backend; each shape's step buffers and the backward's scratch; the split tails' workspace
        # (a data-parallel rank's GEMMs do not cut their tails: CudaBackend.gemms_alone)
        backend = _cuda_backend_bytes(config, bf16) if world == 1 else _zero_rank_bytes(config, world, shapes, bf16)
        tail = tail_workspace_bytes(config, bf16, {b * s for b, s in shapes}) if world == 1 else 0
        return backend + tail + sum(
            cuda_step_buffer_bytes(config, b, s, bf16) + cuda_scratch_bytes(config, b * s, bf16) for b, s in shapes)
    # f32 weights and moments, their f64 copy and f64 gradients each step, the initial weights;
    # f64 activations, about twice over while the backward runs
    return n_params(config) * 36 + 8 * 2 * max(_activations(config, b, s) for b, s in shapes)


def generate_bytes(config: ModelConfig, max_len: int, on_gpu: bool, bf16: bool = False) -> int:
    if on_gpu:  # the backend; the KV caches; a prompt's and one token's activations and logits
        # (CudaDecoder's buffers)
        from .cuda_buffers import KV, Activations

        counter, width = _Counter(), config.num_kv_heads * config.head_dim
        kernels = ModelKernels.of(config, AdamWSettings(), IGNORE_INDEX, Precision.BF16 if bf16 else Precision.FP32)
        for i in range(config.num_layers):
            KV.allocate(counter, i, max_len, width, bf16)  # type: ignore[arg-type]
        for new in {max_len, 1}:
            Activations(counter, config, 1, new, kernels)  # type: ignore[arg-type]
            counter.new("logits", (1, config.vocab_size))
        return _cuda_backend_bytes(config, bf16) + counter.bytes + tail_workspace_bytes(config, bf16)
    kv = 2 * config.num_layers * max_len * config.num_kv_heads * config.head_dim
    # the weights read (f32) and the reference's f64 copy; prefill activations and the KV cache in f64
    return n_params(config) * 16 + 8 * (kv + _activations(config, 1, max_len))


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


def check_model_fits(config: ModelConfig, need: Callable[[], int], on_gpu: bool, what: str) -> None:
    """``check_fits`` of ``need()``, after the model's f32 weights alone, which every backend holds and
    which are counted at once (the detailed estimates walk the layers: a config file may say a billion)."""
    check_fits(4 * n_params(config), on_gpu, what)
    check_fits(need(), on_gpu, what)
