"""Every device buffer of the CUDA model, allocated in one place and known by name.

The parameters live in four flat f32 buffers with one layout (``ParamLayout``): values, gradients
and the two AdamW moments; in bf16 precision the matrices also have a bf16 copy. ``Params`` gives
each tensor (HF name) as a ``Param``: value, gradient and the operand its GEMMs read, and each
``FUSED`` module (q/k/v, gate/up) as one. The activations of one batch shape are ``Activations``:
per layer a ``LayerActs`` with the names of ``reference.py``'s forward (x, h, q, o, x_mid, h2, gate
and up side by side, act; keys and values in ``KV``); in bf16 precision what the GEMMs and the
attention read is stored in bf16 by the kernel that makes it. The backward's activation gradients
are ``TrainingBuffers``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from runtime import DeviceArray, View

from .config import ModelConfig
from .kernels import ModelKernels
from .optim import decays
from .params import check_params, layer_prefix, param_shapes


# Linear layers run as one GEMM over adjacent weights (and biases): q, k and v ([q; k; v], what
# Phi-3 names qkv_proj) make one [tokens, q + 2 kv] output, gate and up ([gate; up], gate_up_proj)
# one [tokens, 2 x intermediate]: one launch each way instead of two or three, and more tiles to
# fill the GPU's waves with.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_parts(module: str) -> list[str]:
    """The part modules of ``FUSED`` module ``module`` ("model.layers.0.mlp.gate_up_proj" ->
    [...mlp.gate_proj, ...mlp.up_proj]), in layout order."""
    (local, parts), = ((f, ps) for f, ps in FUSED.items() if module.endswith("." + f))
    return [module[:-len(local)] + part for part in parts]


def _fused_continues(name: str) -> bool:
    """Whether the next parameter is the rest of ``name``'s fused module (no padding between)."""
    return any(name.endswith(f".{part}.{what}") for parts in FUSED.values() for part in parts[:-1]
               for what in ("weight", "bias"))


class ParamLayout:
    """Offsets (in f32 elements) of every parameter in the flat buffers; decayed tensors first, the
    parts of a ``FUSED`` module one after another."""

    def __init__(self, config: ModelConfig):
        self.config, self.shapes = config, param_shapes(config)
        self.offsets: dict[str, int] = {}
        self.total = 0
        for decayed in (True, False):
            if not decayed:
                self.decay_end = self.total
            for name in (n for n in self.shapes if decays(n) == decayed):
                self.offsets[name] = self.total
                self.total += math.prod(self.shapes[name])
                if not _fused_continues(name):
                    self.total = -(-self.total // 8) * 8  # 16-byte aligned starts in bf16 too

    def fused(self, module: str, what: str = "weight") -> tuple[int, tuple[int, ...]]:
        """Offset and shape of a ``FUSED`` module's weight or bias ("model.layers.0.mlp.gate_up_proj"):
        its parts' rows stacked."""
        names = [f"{part}.{what}" for part in fused_parts(module)]
        shapes = [self.shapes[n] for n in names]
        for before, after, shape in zip(names, names[1:], shapes):
            if self.offsets[after] != self.offsets[before] + math.prod(shape):
                raise AssertionError(f"{module}: {before} and {after} are not adjacent in the layout")
        return self.offsets[names[0]], (sum(s[0] for s in shapes), *shapes[0][1:])

    def flatten(self, tensors: dict[str, np.ndarray], dtype: type = np.float32) -> np.ndarray:
        """``dtype``: float64 for the numpy backend's gradients (data parallelism sums them so)."""
        check_params(self.config, tensors)
        flat = np.zeros(self.total, dtype)
        for name, off in self.offsets.items():
            flat[off:off + math.prod(self.shapes[name])] = np.asarray(tensors[name], dtype).reshape(-1)
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {name: flat[off:off + math.prod(self.shapes[name])].reshape(self.shapes[name]).copy()
                for name, off in self.offsets.items()}


class Arena:
    """Named device arrays allocated together and freed together."""

    def __init__(self) -> None:
        self._arrays: list[DeviceArray] = []

    def new(self, name: str, shape: tuple[int, ...], dtype: str = "f32") -> View:
        self._arrays.append(DeviceArray(shape, dtype))
        return self._arrays[-1].view(name)

    def free(self) -> None:
        for a in self._arrays:
            a.free()
        self._arrays.clear()


@dataclass(frozen=True)
class Param:
    """One parameter tensor: its value, its gradient, and what its GEMMs read (bf16: the copy)."""

    name: str
    value: View
    grad: View
    operand: View

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape


class Params:
    """The parameters by HF name, as views into the flat buffers; a ``FUSED`` module's weight too
    ("model.layers.0.mlp.gate_up_proj.weight": its parts' rows, one view)."""

    def __init__(self, layout: ParamLayout, weights: DeviceArray, grads: DeviceArray,
                 weights16: DeviceArray | None):
        def param(name: str, at: int, shape: tuple[int, ...], decayed: bool) -> Param:
            value = weights.view(name, at, shape)
            operand = weights16.view(name + "[bf16]", at, shape) if weights16 is not None and decayed else value
            return Param(name, value, grads.view("grad " + name, at, shape), operand)

        self._params = {name: param(name, layout.offsets[name], shape, decays(name))
                        for name, shape in layout.shapes.items()}
        for module in fused_modules(layout.shapes):
            self._params[module + ".weight"] = param(module + ".weight", *layout.fused(module), True)
            if fused_parts(module)[0] + ".bias" in layout.shapes:  # the parts have biases
                self._params[module + ".bias"] = param(module + ".bias", *layout.fused(module, "bias"), False)

    def __getitem__(self, name: str) -> Param:
        return self._params[name]

    def get(self, name: str) -> Param | None:
        return self._params.get(name)

    def linear_modules(self) -> list[str]:
        return linear_modules(self._params)


def fused_modules(names: Iterable[str]) -> list[str]:
    """The ``FUSED`` modules whose parts are all among parameter ``names``."""
    names = set(names)
    return [prefix + fused for name in sorted(names) for fused, parts in FUSED.items()
            for prefix in [name[:-len(parts[0] + ".weight")]] if name.endswith("." + parts[0] + ".weight")
            and all(prefix + part + ".weight" in names for part in parts)]


def linear_modules(names: Iterable[str]) -> list[str]:
    """The GEMMs' module names among parameter ``names``: each linear layer's (a matrix's name
    without ``.weight``; the tied LM head's is the embedding's), a ``FUSED`` module in place of
    its parts."""
    names = list(names)
    modules = [n[:-len(".weight")] for n in names if n.endswith("proj.weight") or n.endswith("lm_head.weight")
               ] + (["model.embed_tokens"] if "lm_head.weight" not in names else [])
    fused = fused_modules(names)
    parts = {part for f in fused for part in fused_parts(f)}
    return [m for m in modules if m not in parts and m not in fused] + fused


def linear_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Each GEMM's weight shape by module (``linear_modules`` of ``shapes``' names), a ``FUSED``
    module's parts' rows stacked."""
    def shape(module: str) -> tuple[int, int]:
        if module + ".weight" in shapes:
            return shapes[module + ".weight"]  # type: ignore[return-value]
        rows = [shapes[part + ".weight"] for part in fused_parts(module)]
        return sum(r[0] for r in rows), rows[0][1]
    return {m: shape(m) for m in linear_modules(shapes)}


@dataclass(frozen=True)
class KV:
    """A layer's keys (after RoPE) and values as its attention reads them (bf16 precision: bf16):
    this batch's own rows when training, a KV cache when decoding."""

    k: View
    v: View

    @classmethod
    def allocate(cls, arena: Arena, layer: int, rows: int, width: int, bf16: bool) -> "KV":
        dtype = "bf16" if bf16 else "f32"
        return cls(*(arena.new(f"{layer_prefix(layer)}{n}[{dtype}]", (rows, width), dtype) for n in ("k", "v")))


@dataclass(frozen=True)
class LayerActs:
    """One layer's forward activations (reference.py's names)."""

    x: View       # the residual stream into the layer
    rstd1: View   # input_layernorm's 1 / rms per row (for its backward)
    h: View       # input_layernorm(x) (bf16 precision: bf16, the q/k/v projection's operand as it is)
    q: View       # q_proj(h) after RoPE, as the attention reads it (bf16 precision: bf16)
    o: View       # attention output (bf16 precision: bf16, the o projection's operand as it is)
    lse: View     # attention's log-sum-exp per query row (for its backward)
    x_mid: View   # x + o_proj(o), added by the o projection's GEMM
    rstd2: View
    h2: View      # post_attention_layernorm(x_mid) (bf16 precision: bf16, as h)
    gate_up: View  # [gate_proj(h2) | up_proj(h2)] per row, one GEMM (bf16 precision: stored in bf16, as SwiGLU reads it)
    act: View     # silu(gate) * up (bf16 precision: bf16, the down projection's operand as it is)


class Activations:
    """The activations of ``batch x seq`` new tokens, up to the LM head's input, as the kernels ``k``
    read and write them."""

    def __init__(self, arena: Arena, c: ModelConfig, batch: int, seq: int, k: ModelKernels):
        T, H, I, bf16 = batch * seq, c.hidden_size, c.intermediate_size, k.bf16
        Q, KV_ = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        new = arena.new
        operand = (lambda name, shape: new(name + "[bf16]", shape, "bf16")) if bf16 else new  # what GEMMs read
        self.batch, self.seq, self.tokens = batch, seq, T
        self.ids, self.pos = new("ids", (T,), "i32"), new("positions", (T,), "i32")
        # [q | k | v] per row before RoPE, the fused projection's output: read by nothing but the
        # layer's own RoPE and v copy, so the layers share it (none where the GEMM applies RoPE)
        fused = k.rope_table is not None
        self.qkv = None if fused else new("qkv before RoPE (every layer's)", (T, Q + 2 * KV_))
        # where the q/k/v GEMM applies RoPE: each row's (cos, sin) of every frequency, made once for every layer
        self.angles = new("RoPE angles (cos, sin)", (T, c.head_dim // 2, 2)) if fused else None

        def layer(i: int) -> LayerActs:
            p = layer_prefix(i)
            return LayerActs(
                x=new(p + "x", (T, H)), rstd1=new(p + "rstd1", (T,)), h=operand(p + "h", (T, H)),
                q=operand(p + "q", (T, Q)), o=operand(p + "o", (T, Q)), lse=new(p + "lse", (batch, c.num_heads, seq)),
                x_mid=new(p + "x_mid", (T, H)), rstd2=new(p + "rstd2", (T,)), h2=operand(p + "h2", (T, H)),
                gate_up=operand(p + "gate_up", (T, 2 * I)), act=operand(p + "act", (T, I)))

        self.layers = [layer(i) for i in range(c.num_layers)]
        self.x = new("x", (T, H))  # the residual stream after the last layer
        self.rstd_f, self.hf = new("rstd_f", (T,)), operand("hf", (T, H))  # hf: the LM head's input


class TrainingBuffers:
    """What a training step adds to the activations: targets, losses, ``logit_rows`` rows of logits
    (the loss takes them a chunk at a time), the logits' gradient and the backward's activation
    gradients (reused layer by layer), and the embedding backward's plan."""

    def __init__(self, arena: Arena, c: ModelConfig, batch: int, seq: int, k: ModelKernels, logit_rows: int):
        T, H, I, V = batch * seq, c.hidden_size, c.intermediate_size, c.vocab_size
        bf16, stats_tiles = k.bf16, k.cross_entropy.stats_tiles
        Q, KV_ = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        new, operand = arena.new, "bf16" if bf16 else "f32"
        self.targets, self.losses = new("targets", (T,), "i32"), new("losses", (T,))
        self.logits = new("logits", (logit_rows, V), operand)  # bf16: stored so by the loss's LM head
        # the LM head's (max, sum of exp) of each of ``stats_tiles`` column tiles of each logit row,
        # flat: a chunk of r rows uses the first stats_tiles x r pairs, [tile][row] (None: the
        # cross-entropy makes them itself)
        self.logit_stats = new("logit row statistics", (logit_rows * stats_tiles * 2,)) if stats_tiles else None
        self.dlogits = new("dlogits", (T, V), operand)  # the LM head's GEMM operand as it is
        self.g = new("d x", (T, H))     # gradient of the residual stream, updated in place
        self.dh = new("d h", (T, H), operand)  # the norms' output gradient, as the dX GEMMs store it
        self.d_gate_up = new("d gate_up", (T, 2 * I), operand)  # [d gate | d up]: the fused GEMM's operand
        self.d_o = new("d o", (T, Q), operand)  # as the attention reads it
        # the attention's dq, dk, dv, read by RoPE's backward and dv's copy (none where the attention
        # backward writes the rows itself, rotated back: its qkv_rows), and fp32's rows they write,
        # [dq | dk | dv] (after RoPE's backward): the fused projection's output gradient (bf16's go
        # into the scratch the backward's bf16 output gradients share: cuda_ops.scratch_shapes)
        unfused = k.dv_copy is not None
        self.dq, self.dk, self.dv = (new(name, (T, width)) if unfused else None
                                     for name, width in (("d q", Q), ("d k", KV_), ("d v", KV_)))
        self.d_qkv = new("d qkv", (T, Q + 2 * KV_)) if unfused and not bf16 else None
        self.delta = new("attention delta", (batch, c.num_heads, seq))
        self.order, self.seg_start, self.seg_id = (new(n, (size,), "i32") for n, size in
                                                   (("embedding order", T), ("embedding seg_start", T + 1),
                                                    ("embedding seg_id", T)))


def step_buffers(arena: Arena, c: ModelConfig, batch: int, seq: int, k: ModelKernels, logit_rows: int
                 ) -> tuple[Activations, list[KV], TrainingBuffers]:
    """A training step's buffers for ``batch`` x ``seq`` tokens, as the kernels ``k`` use them: the
    activations, each layer's keys and values and the training buffers with ``logit_rows`` rows of
    logits (and their column tiles' statistics where the cross-entropy reads them made:
    ``stats_tiles``)."""
    T, width = batch * seq, c.num_kv_heads * c.head_dim
    acts = Activations(arena, c, batch, seq, k)
    kv = [KV.allocate(arena, i, T, width, k.bf16) for i in range(c.num_layers)]
    return acts, kv, TrainingBuffers(arena, c, batch, seq, k, logit_rows)
