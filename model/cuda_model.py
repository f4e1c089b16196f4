"""The model on the GPU: forward, backward and AdamW built only from ``ModuleCache.get(spec)`` kernels.

Every spec comes from ``ModelKernels`` (config + optimizer settings + precision), is pre-warmed when
the backend is built, and each step runs in strict mode: a kernel that was not pre-warmed is an error.
Parameters, gradients and AdamW moments are four flat f32 buffers with one layout (each tensor
32-byte aligned, matrices first so weight decay covers one contiguous range). In bf16 precision the
matrices also have a bf16 copy (refreshed by one cast after each optimizer step), the GEMMs and the
attention read bf16 operands: cast once right after they are computed, or written in bf16 by the
kernel that makes them (the attention's output, the SwiGLU's both ways). For each batch shape
the backend allocates the activations once and prepares every launch with its arguments packed;
a step then uploads the token ids, sets the few per-step scalars (learning rate, bias corrections,
loss scale) and issues the launches. All reductions are fixed-order, so runs repeat bit for bit.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ptxgen.kernels.embedding import embedding_backward_plan
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
from runtime import DeviceArray, ModuleCache, fill_u32
from runtime.launch import Launch
from runtime.tensormap import gemm_tensor_maps

from .config import ModelConfig
from .kernels import Gemm, LinearKernels, ModelKernels, split_k
from .optim import AdamWSettings, decays
from .params import layer_prefix, lm_head_name, param_shapes
from .precision import Precision
from .reference import IGNORE_INDEX

COLSUM_CHUNK = 256  # rows per first-stage chunk of a two-stage column sum


class ParamLayout:
    """Offsets (in f32 elements) of every parameter in the flat buffers; decayed tensors first."""

    def __init__(self, config: ModelConfig):
        self.shapes = param_shapes(config)
        self.offsets: dict[str, int] = {}
        self.total = 0
        for decayed in (True, False):
            if not decayed:
                self.decay_end = self.total
            for name in (n for n in self.shapes if decays(n) == decayed):
                self.offsets[name] = self.total
                self.total += -(-math.prod(self.shapes[name]) // 8) * 8  # 16-byte aligned starts in bf16 too

    def flatten(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        flat = np.zeros(self.total, np.float32)
        for name, off in self.offsets.items():
            flat[off:off + math.prod(self.shapes[name])] = np.asarray(tensors[name], np.float32).reshape(-1)
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {name: flat[off:off + math.prod(self.shapes[name])].reshape(self.shapes[name]).copy()
                for name, off in self.offsets.items()}


class _Arrays:
    """Named device arrays of one batch shape, and the tensor maps that describe them, freed together."""

    def __init__(self) -> None:
        self._arrays: dict[str, DeviceArray] = {}
        self._kept: list[DeviceArray] = []

    def new(self, name: str, shape: tuple[int, ...], dtype: str = "f32") -> int:
        self._arrays[name] = DeviceArray(shape, dtype)
        return self._arrays[name].ptr

    def keep(self, array: DeviceArray) -> int:
        self._kept.append(array)
        return array.ptr

    def __getitem__(self, name: str) -> DeviceArray:
        return self._arrays[name]

    def free(self) -> None:
        for a in [*self._arrays.values(), *self._kept]:
            a.free()


@dataclass
class _LayerKV:
    """Where a layer writes its keys and values: f32 (GEMM outputs, RoPE in place) and, in bf16
    precision, the bf16 copies its attention reads (0: none)."""

    k: int
    v: int
    k16: int = 0
    v16: int = 0


class _KVWrite:
    """The arguments of one layer's launches that point at the rows its new keys and values go
    to: a decoding step moves them to the cache's current length."""

    def __init__(self, row_elems: int):
        self.row_elems = row_elems
        self.args: list[tuple[Launch, int, int, int]] = []  # launch, argument position, base, element bytes

    def add(self, launch: Launch, position: int, base: int, elem_bytes: int) -> Launch:
        self.args.append((launch, position, base, elem_bytes))
        return launch

    def move(self, rows: int) -> None:
        for launch, position, base, size in self.args:
            launch.set_arg(position, base + rows * self.row_elems * size)


@dataclass
class _Forward:
    launches: list
    kv_writes: list[_KVWrite]  # per layer
    attention: list            # per layer: the attention launch (kv_len, q_start set by decoding)


@dataclass
class _Step:
    forward: list[Callable[[], None]]
    backward: list[Callable[[], None]]
    arrays: _Arrays
    set_loss_scale: Callable[[float], None]
    embed_bwd: Callable[[np.ndarray], None]


class CudaBackend:
    name = "cuda"
    description = "cuda (raw PTX kernels through the CUDA driver API)"

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray], adamw: AdamWSettings,
                 cache: ModuleCache | None = None, precision: Precision = Precision.FP32):
        self.config, self.adamw = config, adamw
        self.kernels = ModelKernels.of(config, adamw, IGNORE_INDEX, precision)
        self.cache = cache if cache is not None else ModuleCache()
        self.cache.prewarm(self.kernels.specs())
        self.layout = ParamLayout(config)
        n = self.layout.total
        self.weights = DeviceArray.from_numpy(self.layout.flatten(params))
        self.grads, self.exp_avg, self.exp_avg_sq = (DeviceArray(n) for _ in range(3))
        for buf in (self.grads, self.exp_avg, self.exp_avg_sq):
            buf.fill_u32(0)
        self.norm_partial = DeviceArray(self.kernels.grad_norm_partial.blocks)
        self.norm_out = DeviceArray(2)  # [global norm, clip scale]
        self.step = 0
        self._steps: dict[tuple[int, int], _Step] = {}
        # bf16: the matrices' bf16 copy (they are the decayed range [0, decay_end) of the layout)
        self.bf16 = precision is Precision.BF16
        self.weights16 = DeviceArray(self.layout.decay_end, "bf16") if self.bf16 else None
        self._gemm_bytes = 2 if self.bf16 else 4  # per element of a GEMM operand
        with self.cache.strict_mode():
            self._optimizer = self._optimizer_launches()
            # after each optimizer step: the matrices' bf16 copy
            self._refresh = [self._cast(self.weights.ptr, self.weights16.ptr, self.layout.decay_end)] \
                if self.bf16 else []
            for launch in self._refresh:
                launch()

    # -- state ------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.layout.unflatten(self.weights.to_numpy())

    def optimizer_state(self) -> dict[str, np.ndarray]:
        m, v = (self.layout.unflatten(b.to_numpy()) for b in (self.exp_avg, self.exp_avg_sq))
        return {**{f"exp_avg.{k}": x for k, x in m.items()}, **{f"exp_avg_sq.{k}": x for k, x in v.items()}}

    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None:
        for prefix, buf in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            buf.upload(self.layout.flatten({k: state[f"{prefix}.{k}"] for k in self.layout.shapes}))
        self.step = step

    def close(self) -> None:
        for s in self._steps.values():
            s.arrays.free()
        self._steps.clear()
        for buf in (self.weights, self.grads, self.exp_avg, self.exp_avg_sq, self.norm_partial, self.norm_out,
                    self.weights16):
            if buf is not None:
                buf.free()

    # -- public steps -----------------------------------------------------------------------
    def decoder(self, max_len: int) -> "CudaDecoder":
        """Incremental decoding on the GPU from the current weights, KV caches of ``max_len``."""
        return CudaDecoder(self, max_len)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        step = self._run_forward(ids, None)
        b, s = np.asarray(ids).shape
        return step.arrays["logits"].to_numpy().reshape(b, s, -1)

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> float:
        step = self._run_forward(ids, targets)
        return self._mean_loss(step, targets)

    def loss_and_grads(self, ids: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss and every parameter's gradient (the numpy reference's interface, for parity)."""
        step = self._forward_backward(ids, targets)
        return self._mean_loss(step, targets), self.layout.unflatten(self.grads.to_numpy())

    def train_step(self, ids: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        step = self._forward_backward(ids, targets)
        self.step += 1
        a = self.adamw
        with self.cache.strict_mode():
            for launch in self._optimizer:
                launch.set_arg(6, lr)
                launch.set_arg(7, 1.0 - a.beta1 ** self.step)
                launch.set_arg(8, 1.0 - a.beta2 ** self.step)
            for launch in self._norm + self._optimizer + self._refresh:
                launch()
        return self._mean_loss(step, targets), float(self.norm_out.to_numpy()[0])

    def step_launches(self, batch: int, seq: int) -> list:
        """Every prepared launch of a training step on ``batch x seq`` tokens, in order (for a
        profile; the embedding backward is left out: it is planned per batch)."""
        with self.cache.strict_mode():
            step = self._steps.get((batch, seq)) or self._build(batch, seq)
        return step.forward + step.backward + self._norm + self._optimizer + self._refresh

    def _forward_backward(self, ids: np.ndarray, targets: np.ndarray) -> _Step:
        step = self._run_forward(ids, targets)
        with self.cache.strict_mode():
            for launch in step.backward:
                launch()
            step.embed_bwd(np.asarray(ids))
        return step

    # -- internals ----------------------------------------------------------------------------
    def _run_forward(self, ids: np.ndarray, targets: np.ndarray | None) -> _Step:
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, seq], got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"a token id is outside [0, {self.config.vocab_size})")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        with self.cache.strict_mode():
            step = self._steps.get(ids.shape) or self._build(*ids.shape)
            step.arrays["ids"].upload(ids.astype(np.int32).reshape(-1))
            t = np.full(ids.size, IGNORE_INDEX, np.int32) if targets is None else \
                np.asarray(targets, np.int32).reshape(-1)
            if t.size != ids.size:
                raise ValueError("targets must have the shape of ids")
            valid = t != IGNORE_INDEX
            if np.any((t[valid] < 0) | (t[valid] >= self.config.vocab_size)):
                raise ValueError(f"a target is outside [0, {self.config.vocab_size})")
            step.arrays["targets"].upload(t)
            step.set_loss_scale(1.0 / max(1, int(valid.sum())))
            for launch in step.forward:
                launch()
        return step

    @staticmethod
    def _mean_loss(step: _Step, targets: np.ndarray) -> float:
        losses = step.arrays["losses"].to_numpy().astype(np.float64)
        return float(losses.sum() / max(1, int((np.asarray(targets) != IGNORE_INDEX).sum())))

    def _bind(self, spec, dims, *args):
        grid, block = dims
        return self.cache.get(spec).bind(grid, block, *args)

    def _optimizer_launches(self) -> list:
        k, lay = self.kernels, self.layout
        g = self.grads.ptr
        max_norm = self.adamw.max_grad_norm if self.adamw.max_grad_norm > 0 else math.inf
        self._norm = [
            self._bind(k.grad_norm_partial, k.grad_norm_partial.launch_dims(), g, self.norm_partial.ptr, lay.total),
            self._bind(k.grad_norm_final, k.grad_norm_final.launch_dims(), self.norm_partial.ptr,
                       self.norm_out.ptr, max_norm)]
        clip = self.norm_out.ptr + 4
        out = []
        for spec, start, end in ((k.adamw_decay, 0, lay.decay_end), (k.adamw_no_decay, lay.decay_end, lay.total)):
            if end > start:
                ptrs = [buf.ptr + 4 * start for buf in (self.weights, self.grads, self.exp_avg, self.exp_avg_sq)]
                out.append(self._bind(spec, spec.launch_dims(end - start), *ptrs, clip, end - start, 0.0, 1.0, 1.0))
        return out

    def _w(self, name: str) -> int:
        return self.weights.ptr + 4 * self.layout.offsets[name]

    def _gemm_w(self, name: str) -> int:
        """A weight as the linear layers' GEMMs read it: fp32, or its bf16 copy."""
        if not self.bf16:
            return self._w(name)
        return self.weights16.ptr + 2 * self.layout.offsets[name]

    def _gemm(self, A: _Arrays, spec: Gemm, a: int, b: int, c: int, m: int, n: int, k: int,
              bias: int | None = None, splits: int = 1) -> Launch:
        """C = op(A) op(B) (+ bias) over ``splits`` parts of a ``k``-long contraction each. A
        TMA-fed kernel reads A and B through tensor maps (made here, freed with ``A``) and its
        persistent blocks fill the GPU once."""
        kernel = self.cache.get(spec)
        if isinstance(spec, GemmWgmmaSpec) and spec.tma:
            a, b = (A.keep(x) for x in gemm_tensor_maps(spec, a, b, m, n, k * splits))
            dims = spec.launch_dims(m, n, splits, resident=kernel.resident_blocks(spec.threads))
        else:
            dims = spec.launch_dims(m, n, splits)
        return kernel.bind(*dims, *spec.arguments(a, b, c, m, n, k, bias=bias, splits=splits))

    def _split_k(self, spec: Gemm, m: int, n: int, tokens: int) -> int:
        """``split_k`` for this GPU's wave of ``spec``'s blocks."""
        return split_k(spec, m, n, tokens, self.cache.get(spec).resident_blocks(spec.threads))

    def _cast(self, src: int, dst: int, count: int):
        spec = self.kernels.to_bf16
        return self._bind(spec, spec.launch_dims(count), src, dst, count)

    def _gemm_input(self, launches: list, A: "_Arrays", name: str, shape: tuple[int, ...]) -> int:
        """Activation ``name`` as the GEMMs read it: itself (fp32), or a bf16 copy ``name16`` that
        a cast appended to ``launches`` makes."""
        if not self.bf16:
            return A[name].ptr
        copy = A.new(name + "16", shape, "bf16")
        launches.append(self._cast(A[name].ptr, copy, math.prod(shape)))
        return copy

    def _forward(self, A: _Arrays, batch: int, seq: int, kv: list[_LayerKV], kv_stride: int,
                 last_row_logits: bool) -> _Forward:
        """The forward launches for ``batch x seq`` new tokens into arrays of ``A``.

        Layer i writes its keys and values (after RoPE) at ``kv[i]`` (rows of ``kv_stride`` per
        batch) and attends over them: the training tensors themselves, or a KV cache whose write
        position moves with every call (``_KVWrite.move``). Logits for every row, or the last only.
        In bf16 precision the attention reads bf16 copies of q, k, v and writes o in bf16: the
        o projection's operand as it is.
        """
        c, k, w = self.config, self.kernels, self._w
        T, H, I, V = batch * seq, c.hidden_size, c.intermediate_size, c.vocab_size
        Q, KV, L = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_layers
        ids, pos = A.new("ids", (T,), "i32"), A.new("pos", (T,), "i32")
        xs = [A.new(f"x{i}", (T, H)) for i in range(L + 1)]          # residual stream into layer i
        mids = [A.new(f"mid{i}", (T, H)) for i in range(L)]          # after attention
        h1s, h2s = [A.new(f"h1_{i}", (T, H)) for i in range(L)], [A.new(f"h2_{i}", (T, H)) for i in range(L)]
        r1s, r2s = [A.new(f"r1_{i}", (T,)) for i in range(L)], [A.new(f"r2_{i}", (T,)) for i in range(L)]
        qs = [A.new(f"q{i}", (T, Q)) for i in range(L)]
        bf16 = self.bf16
        os_ = [A.new(f"o{i}16", (T, Q), "bf16") if bf16 else A.new(f"o{i}", (T, Q)) for i in range(L)]
        lses = [A.new(f"lse{i}", (batch, c.num_heads, seq)) for i in range(L)]
        gates, ups = ([A.new(f"{n}{i}", (T, I)) for i in range(L)] for n in ("gate", "up"))
        acts = [A.new(f"act{i}16", (T, I), "bf16") if bf16 else A.new(f"act{i}", (T, I)) for i in range(L)]
        tmp, hf, rf = A.new("tmp", (T, H)), A.new("hf", (T, H)), A.new("rf", (T,))
        head_rows = 1 if last_row_logits else T
        logits = A.new("logits", (head_rows, V))
        out = _Forward([], [], [])
        fwd, bind = out.launches, self._bind
        gemm_input = functools.partial(self._gemm_input, fwd, A)

        def linear(lk: LinearKernels, x: int, weight: str, y: int, d_in: int, d_out: int,
                   bias: str | None = None, rows: int = T):
            fwd.append(self._gemm(A, lk.forward, x, self._gemm_w(weight), y, rows, d_out, d_in,
                                  bias=w(bias) if bias else None))
            return fwd[-1]

        fwd.append(bind(k.embed, k.embed.launch_dims(T), w("model.embed_tokens.weight"), ids, xs[0], T))
        for i in range(L):
            p = layer_prefix(i)
            if i == 0:
                fwd.append(bind(k.norm, k.norm.launch_dims(T), xs[0], w(p + "input_layernorm.weight"), h1s[0],
                                r1s[0], T))
            else:  # x_i = mid_{i-1} + mlp_{i-1}, normalized into h1_i
                fwd.append(bind(k.norm_residual, k.norm_residual.launch_dims(T), tmp, mids[i - 1],
                                w(p + "input_layernorm.weight"), h1s[i], xs[i], r1s[i], T))
            bias = (lambda n: p + f"self_attn.{n}.bias") if c.qkv_bias else (lambda n: None)
            at, moves = kv[i], _KVWrite(KV)
            h1 = gemm_input(f"h1_{i}", (T, H))
            linear(k.q, h1, p + "self_attn.q_proj.weight", qs[i], H, Q, bias("q_proj"))
            moves.add(linear(k.kv, h1, p + "self_attn.k_proj.weight", at.k, H, KV, bias("k_proj")), 2, at.k, 4)
            moves.add(linear(k.kv, h1, p + "self_attn.v_proj.weight", at.v, H, KV, bias("v_proj")), 2, at.v, 4)
            fwd.append(bind(k.rope_q, k.rope_q.launch_dims(T), qs[i], qs[i], pos, T))
            fwd.append(moves.add(moves.add(bind(k.rope_k, k.rope_k.launch_dims(T), at.k, at.k, pos, T),
                                           0, at.k, 4), 1, at.k, 4))
            inputs = (qs[i], at.k, at.v)
            if bf16:
                inputs = (gemm_input(f"q{i}", (T, Q)), at.k16, at.v16)
                for src, dst in ((at.k, at.k16), (at.v, at.v16)):
                    fwd.append(moves.add(moves.add(self._cast(src, dst, T * KV), 0, src, 4), 1, dst, 2))
            attention = bind(k.attention, k.attention.launch_dims(batch, seq), *inputs, os_[i], lses[i],
                             seq, seq, kv_stride, 0)
            fwd.append(attention)
            out.kv_writes.append(moves)
            out.attention.append(attention)
            linear(k.o, os_[i], p + "self_attn.o_proj.weight", tmp, Q, H)
            fwd.append(bind(k.norm_residual, k.norm_residual.launch_dims(T), tmp, xs[i],
                            w(p + "post_attention_layernorm.weight"), h2s[i], mids[i], r2s[i], T))
            h2 = gemm_input(f"h2_{i}", (T, H))
            linear(k.gate_up, h2, p + "mlp.gate_proj.weight", gates[i], H, I)
            linear(k.gate_up, h2, p + "mlp.up_proj.weight", ups[i], H, I)
            fwd.append(bind(k.swiglu, k.swiglu.launch_dims(T * I), gates[i], ups[i], acts[i], T * I))
            linear(k.down, acts[i], p + "mlp.down_proj.weight", tmp, I, H)
        fwd.append(bind(k.norm_residual, k.norm_residual.launch_dims(T), tmp, mids[L - 1], w("model.norm.weight"),
                        hf, xs[L], rf, T))
        linear(k.head, gemm_input("hf", (T, H)) + self._gemm_bytes * H * (T - head_rows), lm_head_name(c), logits,
               H, V, rows=head_rows)
        return out

    def _build(self, batch: int, seq: int) -> _Step:
        """Allocate one batch shape's activations and prepare its training launches."""
        c, k, lay = self.config, self.kernels, self.layout
        T, H, I, V = batch * seq, c.hidden_size, c.intermediate_size, c.vocab_size
        Q, KV, L = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_layers
        A = _Arrays()
        w, gr = self._w, (lambda name: self.grads.ptr + 4 * lay.offsets[name])
        bf16 = self.bf16
        kv = [_LayerKV(*(A.new(f"{n}{i}", (T, KV)) for n in "kv"),
                       *((A.new(f"{n}{i}16", (T, KV), "bf16") for n in "kv") if bf16 else ())) for i in range(L)]
        out = self._forward(A, batch, seq, kv, seq, last_row_logits=False)
        A["pos"].upload(np.tile(np.arange(seq, dtype=np.int32), batch))
        fwd, bind = out.launches, self._bind
        ptr = lambda name: A[name].ptr  # noqa: E731
        xs, mids = [ptr(f"x{i}") for i in range(L + 1)], [ptr(f"mid{i}") for i in range(L)]
        r1s, r2s = [ptr(f"r1_{i}") for i in range(L)], [ptr(f"r2_{i}") for i in range(L)]
        lses = [ptr(f"lse{i}") for i in range(L)]
        gates, ups = ([ptr(f"{n}{i}") for i in range(L)] for n in ("gate", "up"))
        rf, logits, pos = ptr("rf"), ptr("logits"), ptr("pos")
        # the copies the GEMMs and the attention read (``_gemm_input``; bf16: name16) and the scratch
        # the output gradients are cast into
        gin = (lambda name: A[name + "16"].ptr) if bf16 else ptr
        dy16 = A.new("dy16", (T * max(H, Q),), "bf16") if bf16 else 0
        targets, losses = A.new("targets", (T,), "i32"), A.new("losses", (T,))
        dlogits = A.new("dlogits", (T, V), "bf16" if bf16 else "f32")  # the LM head's GEMM operand as it is
        ce = bind(k.cross_entropy, k.cross_entropy.launch_dims(T), logits, targets, losses, dlogits, 1.0)
        fwd.append(ce)

        # -- backward ------------------------------------------------------------------------
        bwd: list = []
        g = A.new("g", (T, H))            # gradient of the residual stream, updated in place
        dh = A.new("dh", (T, H))
        d_act = A.new("d_act", (T, I))
        # the GEMMs' operands as the SwiGLU backward writes them (bf16: no cast)
        d_gate, d_up = (A.new(n, (T, I), "bf16" if bf16 else "f32") for n in ("d_gate", "d_up"))
        d_o, dq = A.new("d_o", (T, Q)), A.new("dq", (T, Q))
        dk, dv = A.new("dk", (T, KV)), A.new("dv", (T, KV))
        delta = A.new("delta", (batch, c.num_heads, seq))
        nb = k.norm_bwd_residual
        partial = A.new("gamma_partial", (nb.partial_rows(T), H))
        col_scratch = A.new("col_scratch", (-(-T // COLSUM_CHUNK), max(Q, KV)))

        shapes = [(k.q, Q, H), (k.kv, KV, H), (k.o, H, Q), (k.gate_up, I, H), (k.down, H, I), (k.head, V, H)]
        splits = {(m, n): self._split_k(lk.grad_weight, m, n, T) for lk, m, n in shapes}
        partials = [parts * m * n for (m, n), parts in splits.items() if parts > 1]
        split_scratch = A.new("split_scratch", (max(partials, default=1),))

        def gemm_dy(dy: int, width: int) -> int:
            """An output gradient as the GEMMs read it: itself (fp32), or cast into the bf16 scratch."""
            if not dy16:
                return dy
            bwd.append(self._cast(dy, dy16, T * width))
            return dy16

        def grad_input(lk: LinearKernels, dy: int, weight: str, dx: int, d_in: int, d_out: int, acc: bool = False):
            bwd.append(self._gemm(A, lk.grad_input_acc if acc else lk.grad_input, dy, self._gemm_w(weight), dx,
                                  T, d_in, d_out))

        def grad_weight(lk: LinearKernels, dy: int, x: int, weight: str, d_in: int, d_out: int):
            """dW = dy^T x. A dW whose tiles fill the GPU's waves badly splits the token dimension
            into parts whose partial dWs a fixed-order sum adds (deterministic)."""
            spec: Gemm = lk.grad_weight
            splits = self._split_k(spec, d_out, d_in, T)
            if splits == 1:
                bwd.append(self._gemm(A, spec, dy, x, gr(weight), d_out, d_in, T))
                return
            bwd.append(self._gemm(A, spec, dy, x, split_scratch, d_out, d_in, T // splits, splits=splits))
            ps = k.parts_sum
            bwd.append(bind(ps, ps.launch_dims(d_out * d_in), *ps.arguments(split_scratch, gr(weight), splits,
                                                                          d_out * d_in)))

        def column_sum(src: int, dst: int, cols: int):
            """dst[cols] = sum over the T rows of src, in one or two fixed-order stages."""
            cs = k.colsum
            if T <= COLSUM_CHUNK:
                bwd.append(bind(cs, cs.launch_dims(T, cols, T), src, dst, T, cols, T))
                return
            chunks = -(-T // COLSUM_CHUNK)
            bwd.append(bind(cs, cs.launch_dims(T, cols, COLSUM_CHUNK), src, col_scratch, T, cols, COLSUM_CHUNK))
            bwd.append(bind(cs, cs.launch_dims(chunks, cols, chunks), col_scratch, dst, chunks, cols, chunks))

        def norm_backward(spec, x: int, gamma: str, dy: int, rstd: int, dx: int, residual: bool):
            args = (x, w(gamma), dy, rstd) + ((dx,) if residual else ()) + (dx, partial, T)
            bwd.append(bind(spec, spec.launch_dims(T), *args))
            rows = spec.partial_rows(T)
            bwd.append(bind(k.colsum, k.colsum.launch_dims(rows, H, rows), partial, gr(gamma), rows, H, rows))

        head = lm_head_name(c)
        grad_weight(k.head, dlogits, gin("hf"), head, H, V)
        grad_input(k.head, dlogits, head, dh, H, V)
        norm_backward(k.norm_bwd, xs[L], "model.norm.weight", dh, rf, g, residual=False)
        for i in reversed(range(L)):
            p = layer_prefix(i)
            # MLP: x_{i+1} = mid_i + down(silu(gate) * up); g is the gradient of x_{i+1}
            dy = gemm_dy(g, H)
            grad_weight(k.down, dy, gin(f"act{i}"), p + "mlp.down_proj.weight", I, H)
            grad_input(k.down, dy, p + "mlp.down_proj.weight", d_act, I, H)
            bwd.append(bind(k.swiglu_bwd, k.swiglu_bwd.launch_dims(T * I), gates[i], ups[i], d_act, d_gate, d_up,
                            T * I))
            for name, d in (("gate_proj", d_gate), ("up_proj", d_up)):
                grad_weight(k.gate_up, d, gin(f"h2_{i}"), p + f"mlp.{name}.weight", H, I)
                grad_input(k.gate_up, d, p + f"mlp.{name}.weight", dh, H, I, acc=name == "up_proj")
            norm_backward(nb, mids[i], p + "post_attention_layernorm.weight", dh, r2s[i], g, residual=True)
            # attention: mid_i = x_i + o_proj(attn(rope(q), rope(k), v)); g is now the gradient of mid_i
            dy = gemm_dy(g, H)
            grad_weight(k.o, dy, gin(f"o{i}"), p + "self_attn.o_proj.weight", Q, H)
            grad_input(k.o, dy, p + "self_attn.o_proj.weight", d_o, Q, H)
            qkv = [gin(f"{n}{i}") for n in "qkv"]
            d_o_in = gemm_dy(d_o, Q)  # the attention reads dO as it reads q, k, v
            bwd.append(bind(k.attention_bwd_q, k.attention_bwd_q.launch_dims(batch, seq), *qkv, gin(f"o{i}"),
                            d_o_in, lses[i], dq, delta, seq))
            bwd.append(bind(k.attention_bwd_kv, k.attention_bwd_kv.launch_dims(batch, seq), *qkv, d_o_in, lses[i],
                            delta, dk, dv, seq))
            bwd.append(bind(k.rope_q_bwd, k.rope_q_bwd.launch_dims(T), dq, dq, pos, T))
            bwd.append(bind(k.rope_k_bwd, k.rope_k_bwd.launch_dims(T), dk, dk, pos, T))
            for name, d, lk, width in (("q_proj", dq, k.q, Q), ("k_proj", dk, k.kv, KV), ("v_proj", dv, k.kv, KV)):
                if c.qkv_bias:
                    column_sum(d, gr(p + f"self_attn.{name}.bias"), width)
                dy = gemm_dy(d, width)
                grad_weight(lk, dy, gin(f"h1_{i}"), p + f"self_attn.{name}.weight", H, width)
                grad_input(lk, dy, p + f"self_attn.{name}.weight", dh, H, width, acc=name != "q_proj")
            norm_backward(nb, xs[i], p + "input_layernorm.weight", dh, r1s[i], g, residual=True)

        # embedding: its plan (rows grouped by token id) changes with every batch
        order, seg_start, seg_id = (A.new(n, (size,), "i32") for n, size in
                                    (("order", T), ("seg_start", T + 1), ("seg_id", T)))
        emb, tied = gr("model.embed_tokens.weight"), c.tie_word_embeddings

        def embed_backward(batch_ids: np.ndarray) -> None:
            """After the rest of the backward (a tied head has already written its gradient there)."""
            o, starts, rows = embedding_backward_plan(batch_ids)
            A["order"].upload(o)
            A["seg_start"].upload(np.pad(starts, (0, T + 1 - len(starts))))
            A["seg_id"].upload(np.pad(rows, (0, T - len(rows))))
            if not tied:
                fill_u32(emb, 0, V * H)
            bind(k.embed_bwd, k.embed_bwd.launch_dims(len(rows)), g, order, seg_start, seg_id, emb)()

        step = _Step(fwd, bwd, A, lambda scale: ce.set_arg(4, scale), embed_backward)
        self._steps[(batch, seq)] = step
        return step


class CudaDecoder:
    """Incremental decoding of one sequence on the GPU, with per-layer K/V caches on the device.

    Uses the backend's weights and its pre-warmed kernels (strict mode): the same forward launches
    as training, with keys and values written into the caches at the current length and attention
    over the cached rows. ``prefill`` resets the cache; each call returns the last position's logits.
    """

    def __init__(self, backend: CudaBackend, max_len: int):
        c = backend.config
        if not 1 <= max_len <= c.max_position_embeddings:
            raise ValueError(f"max_len must be in [1, {c.max_position_embeddings}], got {max_len}")
        self.backend, self.max_len, self.length = backend, max_len, 0
        kv = c.num_kv_heads * c.head_dim
        self._cache = _Arrays()
        bf16 = backend.bf16  # the attention's bf16 copies of the caches too
        self._kv = [_LayerKV(*(self._cache.new(f"{n}{i}", (max_len, kv)) for n in "kv"),
                             *((self._cache.new(f"{n}{i}16", (max_len, kv), "bf16") for n in "kv") if bf16 else ()))
                    for i in range(c.num_layers)]
        self._plans: dict[int, tuple[_Arrays, _Forward]] = {}

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.length = 0
        return self._run(np.asarray(ids).reshape(-1))

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([token]))

    def close(self) -> None:
        for arrays, _ in self._plans.values():
            arrays.free()
        self._cache.free()

    def _run(self, ids: np.ndarray) -> np.ndarray:
        new = len(ids)
        if self.length + new > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.length + new} needed")
        be = self.backend
        if ids.min() < 0 or ids.max() >= be.config.vocab_size:
            raise ValueError(f"a token id is outside [0, {be.config.vocab_size})")
        with be.cache.strict_mode():
            if new not in self._plans:
                arrays = _Arrays()
                self._plans[new] = arrays, be._forward(arrays, 1, new, self._kv, self.max_len, last_row_logits=True)
            arrays, fwd = self._plans[new]
            arrays["ids"].upload(ids.astype(np.int32))
            arrays["pos"].upload(np.arange(self.length, self.length + new, dtype=np.int32))
            for moves, attention in zip(fwd.kv_writes, fwd.attention):
                moves.move(self.length)
                attention.set_arg(6, self.length + new)  # kv_len
                attention.set_arg(8, self.length)        # q_start
            for launch in fwd.launches:
                launch()
        self.length += new
        return arrays["logits"].to_numpy()[0]

