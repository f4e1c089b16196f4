"""The model on the GPU: forward, backward and AdamW as a launch plan of ``ModuleCache.get(spec)`` kernels.

``forward`` and ``backward`` below read line for line like ``reference.py``'s forward and
backward: each line is an operation of ``Ops`` that appends its launches (every argument by the
kernel's parameter name) to a ``Plan``. Every spec comes from ``ModelKernels`` (config + optimizer
settings + precision), is pre-warmed when the backend is built, and plans are built and run in
strict mode: a kernel that was not pre-warmed is an error. Buffers: ``cuda_buffers``. In bf16
precision the GEMMs and the attention read bf16 operands: written in bf16 by the kernel that makes
them (the norms, RoPE, v's copy out of the fused q/k/v projection's rows, the attention's output,
the SwiGLU in the gate/up GEMM's epilogue, its backward in the down projection's dX GEMM's), or
cast once right after they are computed (the attention's and the q/k/v projection's output
gradients; the residual stream's gradient is written in bf16 too by the norms' backward). Linear layers that read one input run as one GEMM (``cuda_buffers.FUSED``: q/k/v,
gate/up), each later kernel reading its part of the fused output's rows.

For each batch shape the backend builds one plan (sections forward, backward, optimizer) once; a
step uploads the token ids and targets, sets the plan's per-step values by name (loss scale,
learning rate, bias corrections) and runs it, by default as CUDA graphs: the forward's, then a host
step that groups the batch's rows by token for the embedding backward (and sets its segment count)
while the GPU runs the forward, then the rest's. Its loss and gradient norm come back in one wait.
All reductions are fixed-order, so runs repeat bit for bit.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ptxgen.kernels.embedding import embedding_backward_plan
from runtime import DeviceArray, ModuleCache, PinnedArray, Stream, View
from runtime.plan import Expr, Plan, Step

from .config import ModelConfig
from .cuda_buffers import KV, Activations, Arena, ParamLayout, Params, TrainingBuffers, step_buffers
from .cuda_ops import Ops, TailWorkspace, kv_rows
from .kernels import LOSS_CHUNK_ROWS, ModelKernels
from .optim import AdamWSettings
from .params import layer_prefix, lm_head_name
from .precision import Precision
from .reference import IGNORE_INDEX, check_targets, check_tokens

__all__ = ["CudaBackend", "ParamLayout", "backward", "forward", "lm_head", "loss"]


def forward(ops: Ops, acts: Activations, kv: list[KV], kv_stride: int, cached: int | Expr = 0) -> View:
    """reference.py's forward for ``acts``' new tokens, up to the LM head's input (returned).
    Layer i writes its keys and values into ``kv[i]`` from row ``cached`` on (rows of ``kv_stride``
    per sequence) and attends over the ``cached`` rows before them and its own: the training
    batch's own buffers, or a KV cache."""
    # the new keys and values go in as contiguous rows from ``cached`` on: one sequence's, or the
    # whole batch's where each sequence's rows are its seq new ones
    assert acts.batch == 1 or kv_stride == acts.seq, (acts.batch, acts.seq, kv_stride)
    ops.embed(acts.ids, "model.embed_tokens.weight", out=acts.layers[0].x)
    if acts.angles is not None:  # RoPE's (cos, sin) at every row's position, for every layer's q/k/v GEMM
        ops.rope_angles(acts.pos, out=acts.angles)
    for i, a in enumerate(acts.layers):
        p = layer_prefix(i)
        ops.rmsnorm(a.x, p + "input_layernorm.weight", out=a.h, rstd=a.rstd1)
        # q, k and v: one GEMM, [q | k | v] per row, then RoPE on q and k; this call's keys and
        # values into kv[i] (as the attention reads them) from row ``cached`` on
        ops.attention_inputs(a.h, p + "self_attn.qkv_proj", acts.pos, q=a.q, k=kv_rows(kv[i].k, cached),
                             v=kv_rows(kv[i].v, cached), qkv=acts.qkv, angles=acts.angles)
        ops.attention(a.q, kv[i].k, kv[i].v, out=a.o, lse=a.lse, batch=acts.batch, seq=acts.seq,
                      kv_len=cached + acts.seq, kv_stride=kv_stride, q_start=cached)
        # the residual adds are the GEMMs': x_mid = x + o_proj(o), the next layer's x = x_mid + down(act)
        ops.linear(a.o, p + "self_attn.o_proj", out=a.x_mid, residual=a.x)
        ops.rmsnorm(a.x_mid, p + "post_attention_layernorm.weight", out=a.h2, rstd=a.rstd2)
        # gate and up: one GEMM, [gate | up] per row; act = silu(gate) * up
        ops.swiglu(a.h2, p + "mlp.gate_up_proj", gate_up=a.gate_up, out=a.act)
        x_out = acts.layers[i + 1].x if i + 1 < len(acts.layers) else acts.x
        ops.linear(a.act, p + "mlp.down_proj", out=x_out, residual=a.x_mid)
    ops.rmsnorm(acts.x, "model.norm.weight", out=acts.hf, rstd=acts.rstd_f)
    return acts.hf


def lm_head(ops: Ops, hf: View, logits: View, stats: View | None = None) -> None:
    """The logits of the last ``len(logits)`` rows of ``hf`` (and, ``stats``, their row statistics
    for the cross-entropy)."""
    rows = logits.shape[0]
    ops.linear(hf.rows(hf.shape[0] - rows, rows), lm_head_name(ops.config)[:-len(".weight")], out=logits,
               stats=stats)


def loss(ops: Ops, hf: View, d: TrainingBuffers, grad_scale: Expr) -> None:
    """reference.py's cross-entropy of the logits, and its gradient (scaled by ``grad_scale``):
    ``d.logits`` rows of logits at a time, so the [tokens, vocab] logits are never all in memory;
    the gradient is kept for every row (the LM head's backward reads it). bf16: the LM head's GEMM
    stores the logits in bf16 and also reduces each column tile of a row (``d.logit_stats``), so
    the cross-entropy reads them once."""
    chunk, tiles = d.logits.shape[0], ops.k.cross_entropy.stats_tiles
    for start in range(0, hf.shape[0], chunk):
        rows = min(chunk, hf.shape[0] - start)
        logits = d.logits.rows(0, rows)
        stats = d.logit_stats.rows(0, 2 * tiles * rows) if d.logit_stats is not None else None
        lm_head(ops, hf.rows(start, rows), logits, stats)
        ops.cross_entropy(logits, d.targets.rows(start, rows), d.losses.rows(start, rows),
                          d.dlogits.rows(start, rows), grad_scale, stats)


def backward(ops: Ops, acts: Activations, kv: list[KV], hf: View, d: TrainingBuffers, segments: Expr,
             table_grad: Callable[[View], None] | None = None) -> None:
    """reference.py's loss_and_grads after the loss: every parameter's gradient from ``d.dlogits``
    (the cross-entropy's), the activation gradients in ``d`` reused layer by layer. ``table_grad``:
    how the embedding table's gradient is made from its lookup's output gradient instead (a
    data-parallel rank: from every rank's rows, into its shard)."""
    c = ops.config
    head = lm_head_name(c)[:-len(".weight")]
    ops.grad_weight(d.dlogits, hf, head)
    ops.grad_input(d.dlogits, head, d.dh)
    g = ops.rmsnorm_backward(acts.x, "model.norm.weight", d.dh, acts.rstd_f, dx=d.g)  # d.g as the GEMMs read it
    for i in reversed(range(c.num_layers)):
        p, a = layer_prefix(i), acts.layers[i]
        # MLP: x_out = x_mid + down(silu(gate) * up); g is the gradient of x_out
        ops.grad_weight(g, a.act, p + "mlp.down_proj")
        ops.swiglu_backward(a.gate_up, g, p + "mlp.down_proj", dgate_up=d.d_gate_up)  # of g W_down
        ops.grad_weight(d.d_gate_up, a.h2, p + "mlp.gate_up_proj")  # both weights' gradients, one GEMM
        ops.grad_input(d.d_gate_up, p + "mlp.gate_up_proj", d.dh)
        g = ops.rmsnorm_backward(a.x_mid, p + "post_attention_layernorm.weight", d.dh, a.rstd2, dx=d.g,
                                 residual=True)
        # attention: x_mid = x + o_proj(attn(rope(q), rope(k), v)); g is now the gradient of x_mid
        ops.grad_weight(g, a.o, p + "self_attn.o_proj")
        ops.grad_input(g, p + "self_attn.o_proj", d.d_o)  # bf16: stored as q, k and v are
        # the fused projection's output gradient, [dq | dk | dv] per row, RoPE's backward on dq and dk,
        # as its GEMMs read it (bf16: rounded, as torch's autocast stores it; the bias sums it so too)
        dy = ops.attention_backward(a.q, kv[i].k, kv[i].v, a.o, d.d_o, a.lse, delta=d.delta, batch=acts.batch,
                                    seq=acts.seq, positions=acts.pos, into=d.d_qkv, angles=acts.angles,
                                    scratch=(d.dq, d.dk, d.dv))
        if c.qkv_bias:
            ops.column_sum(dy, p + "self_attn.qkv_proj.bias")
        ops.grad_weight(dy, a.h, p + "self_attn.qkv_proj")  # the three weights' gradients, one GEMM
        ops.grad_input(dy, p + "self_attn.qkv_proj", d.dh)
        g = ops.rmsnorm_backward(a.x, p + "input_layernorm.weight", d.dh, a.rstd1, dx=d.g, residual=True)
    if table_grad is not None:
        table_grad(d.g)
    else:
        ops.embedding_backward(d.g, d.order, d.seg_start, d.seg_id, "model.embed_tokens.weight", segments)


@dataclass
class _Shape:
    """One batch shape's plan and the buffers it runs on; the plan of its every row's logits is
    made when asked for (``CudaBackend.logits``)."""

    plan: Plan
    arena: Arena
    acts: Activations
    kv: list[KV]
    bufs: TrainingBuffers
    staged: "_Staged"
    logits: tuple[Plan, View] | None = None


class _Staged:
    """A batch shape's page-locked host side: the step's inputs as they are copied to the GPU (ids,
    targets, the embedding backward's grouping), and its results as they come back (the per-token
    losses, the gradient norm and clip scale). A step starts after the last one's results were read,
    so one copy of each serves every step."""

    def __init__(self, tokens: int):
        self._inputs, self._results = PinnedArray(5 * tokens + 1, "i32"), PinnedArray(tokens + 2)
        cuts = np.cumsum([tokens, tokens, tokens, tokens + 1])
        self.ids, self.targets, self.order, self.seg_start, self.seg_id = np.split(self._inputs.array, cuts)
        self.losses, self.norm = np.split(self._results.array, [tokens])

    def free(self) -> None:
        self.ids = self.targets = self.order = self.seg_start = self.seg_id = self.losses = self.norm = None
        self._inputs.free()
        self._results.free()


def _group_tokens(staged: _Staged, bufs: TrainingBuffers, plan: Plan) -> None:
    """A training plan's host step before the backward, run while the GPU runs the forward: the
    batch's rows grouped by token id for the embedding backward, copied after the forward's
    launches, and their count of distinct tokens set."""
    order, starts, rows = embedding_backward_plan(staged.ids)
    staged.order[:] = order
    staged.seg_start[:len(starts)], staged.seg_start[len(starts):] = starts, 0
    staged.seg_id[:len(rows)], staged.seg_id[len(rows):] = rows, 0
    stream = Stream.null()  # (the plan's launches and graphs run there)
    for buf, host in ((bufs.order, staged.order), (bufs.seg_start, staged.seg_start), (bufs.seg_id, staged.seg_id)):
        buf.upload(host, stream)
    plan.set(segments=max(1, len(rows)))


class CudaBackend:
    name = "cuda"
    description = "cuda (raw PTX kernels through the CUDA driver API)"
    # the step's GEMMs have the GPU to themselves (no other stream's kernels), so they may cut
    # their tails along K, whose parts wait on the GEMM's other blocks (ModelKernels' cut_tails)
    gemms_alone = True

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray], adamw: AdamWSettings,
                 cache: ModuleCache | None = None, precision: Precision = Precision.FP32, graph: bool = True,
                 loss_chunk_rows: int = LOSS_CHUNK_ROWS):
        """``graph``: run each training step as CUDA graphs (the forward's, then the rest's after
        the host step between them; else launch by launch; same results).
        ``loss_chunk_rows``: rows of logits made at a time by the loss (the results do not depend on it)."""
        if loss_chunk_rows < 1:
            raise ValueError(f"loss_chunk_rows must be >= 1, got {loss_chunk_rows}")
        self.config, self.adamw, self.graph, self.loss_chunk_rows = config, adamw, graph, loss_chunk_rows
        self.kernels = ModelKernels.of(config, adamw, IGNORE_INDEX, precision, cut_tails=self.gemms_alone)
        self.cache = cache if cache is not None else ModuleCache()
        self.cache.prewarm(self.kernels.specs())
        self.layout = ParamLayout(config)
        n, moments = self._flat_sizes()
        flat = self.layout.flatten(params)
        self.weights = DeviceArray.from_numpy(np.pad(flat, (0, n - flat.size)))
        self.grads = DeviceArray(n)
        self.exp_avg, self.exp_avg_sq = DeviceArray(moments), DeviceArray(moments)
        for buf in (self.grads, self.exp_avg, self.exp_avg_sq):
            buf.fill_u32(0)
        self.norm_partial = DeviceArray(self.kernels.grad_norm_partial.blocks)
        self.norm_out = DeviceArray(2)  # [global norm, clip scale]
        self.step = 0
        self._shapes: dict[tuple[int, int], _Shape] = {}
        # bf16: the matrices' bf16 copy (they are the decayed range [0, decay_end) of the layout)
        self.bf16 = precision is Precision.BF16
        self.weights16 = DeviceArray(self.layout.decay_end, "bf16") if self.bf16 else None
        self.params_view = Params(self.layout, self.weights, self.grads, self.weights16)
        self.tail = TailWorkspace(self.kernels, lambda spec: self.cache.get(spec).resident_blocks(spec.threads))
        with self.cache.strict_mode():
            start = Plan(self.cache)
            self._refresh(self.ops(start, Arena(), tokens=0))
            start.run()
            start.free()

    def _flat_sizes(self) -> tuple[int, int]:
        """Elements of the flat weights and gradients, and of each AdamW moment (a data-parallel
        rank pads the first and keeps a shard of the second)."""
        return self.layout.total, self.layout.total

    def ops(self, plan: Plan, arena: Arena, tokens: int) -> Ops:
        """The operations on this backend's weights and kernels, appending to ``plan``."""
        return Ops(plan, self.kernels, self.params_view, self.config, arena, tokens, self.bf16, self.tail)

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
        for s in self._shapes.values():
            for plan in (s.plan, s.logits[0] if s.logits else None):
                if plan is not None:
                    plan.free()
            s.arena.free()
            s.staged.free()
        self._shapes.clear()
        self.tail.free()
        for buf in (self.weights, self.grads, self.exp_avg, self.exp_avg_sq, self.norm_partial, self.norm_out,
                    self.weights16):
            if buf is not None:
                buf.free()

    # -- public steps -----------------------------------------------------------------------
    def decoder(self, max_len: int):
        """Incremental decoding on the GPU from the current weights, KV caches of ``max_len``."""
        from .cuda_decoder import CudaDecoder
        return CudaDecoder(self, max_len)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits (a forward over the training plan's buffers, with room for all
        of them)."""
        shape = self._prepare(ids, None)
        if shape.logits is None:
            with self.cache.strict_mode():
                plan = Plan(self.cache)
                ops = self.ops(plan, shape.arena, shape.acts.tokens)
                logits = shape.arena.new("every row's logits", (shape.acts.tokens, self.config.vocab_size))
                lm_head(ops, forward(ops, shape.acts, shape.kv, kv_stride=shape.acts.seq), logits)
                shape.logits = plan, logits
        plan, logits = shape.logits
        with self.cache.strict_mode():
            plan.run()
        b, s = np.asarray(ids).shape
        return logits.to_numpy().reshape(b, s, -1)

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> float:
        shape = self._prepare(ids, targets)
        self._run(shape, "forward")
        return self._mean_loss(shape, self._results(shape)[0])

    def loss_and_grads(self, ids: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss and every parameter's gradient (the numpy reference's interface, for parity)."""
        shape = self._prepare(ids, targets)
        self._run(shape, "forward", "backward")
        return self._mean_loss(shape, self._results(shape)[0]), self.layout.unflatten(self.grads.to_numpy())

    def train_step(self, ids: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        shape = self._prepare(ids, targets)
        self.step += 1
        a = self.adamw
        shape.plan.set(lr=lr, bias_correction1=1.0 - a.beta1 ** self.step,
                       bias_correction2=1.0 - a.beta2 ** self.step)
        self._run(shape, graph=self.graph)
        losses, norm = self._results(shape, norm=True)
        return self._mean_loss(shape, losses), norm

    def plan(self, batch: int, seq: int) -> Plan:
        """The training step's plan for ``batch x seq`` tokens (sections forward, backward,
        optimizer): for a profile or a reader; its per-step values are the last step's."""
        return self._shape(batch, seq).plan

    def step_launches(self, batch: int, seq: int) -> list[Step]:
        """Every step of a training step's plan on ``batch x seq`` tokens, in order (for a profile)."""
        return self.plan(batch, seq).of()

    # -- internals ----------------------------------------------------------------------------
    def _run(self, shape: _Shape, *sections: str, graph: bool = False) -> None:
        with self.cache.strict_mode():
            shape.plan.run(*sections, graph=graph)

    def _prepare(self, ids: np.ndarray, targets: np.ndarray | None, targets_counted: int | None = None) -> _Shape:
        """Check a batch, upload it and set the plan's loss scale: one over its targets, or over
        ``targets_counted`` (a data-parallel rank's: the global batch's). The embedding backward's
        grouping of it is ``_group_tokens``', a host step of the plan."""
        ids = check_tokens(self.config, ids)
        t = np.full(ids.size, IGNORE_INDEX, np.int32) if targets is None else \
            check_targets(self.config, targets, ids.size).astype(np.int32)
        valid = t != IGNORE_INDEX
        shape = self._shape(*ids.shape)
        staged, stream = shape.staged, Stream.null()  # (the plan's launches and graphs run there)
        staged.ids[:], staged.targets[:] = ids.reshape(-1), t
        shape.acts.ids.upload(staged.ids, stream)
        shape.bufs.targets.upload(staged.targets, stream)
        counted = int(valid.sum()) if targets_counted is None else targets_counted
        shape.plan.set(loss_scale=1.0 / max(1, counted))
        return shape

    def _results(self, shape: _Shape, norm: bool = False) -> tuple[np.ndarray, float]:
        """The last run's per-token losses (and the gradient norm), waited for once."""
        stream = Stream.null()
        shape.bufs.losses.download(shape.staged.losses, stream)
        if norm:
            self.norm_out.view("grad norm, clip scale").download(shape.staged.norm, stream)
        stream.synchronize()
        return shape.staged.losses, float(shape.staged.norm[0]) if norm else math.nan

    def _shape(self, batch: int, seq: int) -> _Shape:
        if (batch, seq) not in self._shapes:
            with self.cache.strict_mode():
                self._shapes[(batch, seq)] = self._build(batch, seq)
        return self._shapes[(batch, seq)]

    @staticmethod
    def _mean_loss(shape: _Shape, losses: np.ndarray) -> float:
        """The batch's mean loss over its targets (the ignored ones' losses are 0)."""
        counted = int((shape.staged.targets != IGNORE_INDEX).sum())
        return float(losses.astype(np.float64).sum() / max(1, counted))

    def _build(self, batch: int, seq: int) -> _Shape:
        """Allocate one batch shape's buffers and plan its training step."""
        c, T = self.config, batch * seq
        plan, arena = Plan(self.cache), Arena()
        ops = self.ops(plan, arena, T)
        acts, kv, bufs = step_buffers(arena, c, batch, seq, self.kernels, min(T, self.loss_chunk_rows))
        acts.pos.upload(np.tile(np.arange(seq, dtype=np.int32), batch))
        plan.section = "forward"
        hf = forward(ops, acts, kv, kv_stride=seq)
        loss(ops, hf, bufs, plan.value("loss_scale", 1.0))
        plan.section = "backward"
        segments, staged = plan.value("segments", 1), _Staged(T)
        table_grad = self._table_grad(ops, arena, batch, seq)
        if table_grad is None:  # the backward's own embedding backward reads the grouping
            # (the plan by a weak reference: no cycle keeps its memory past the backend's last reference)
            plan.host(functools.partial(_group_tokens, staged, bufs, weakref.proxy(plan)),
                      label="group the batch's rows by token", writes=[bufs.order, bufs.seg_start, bufs.seg_id],
                      sets=["segments"])
        backward(ops, acts, kv, hf, bufs, segments, table_grad)
        plan.section = "optimizer"
        self._optimizer(ops, plan)
        return _Shape(plan, arena, acts, kv, bufs, staged)

    def _table_grad(self, ops: Ops, arena: Arena, batch: int, seq: int) -> Callable[[View], None] | None:
        """How the embedding table's gradient is made (None: backward's own lookup backward)."""
        return None

    def _optimizer(self, ops: Ops, plan: Plan) -> None:
        """Clip by the global norm, AdamW on the decayed matrices (and their bf16 copy) and the rest."""
        lay, max_norm = self.layout, self.adamw.max_grad_norm if self.adamw.max_grad_norm > 0 else math.inf
        ops.clip_grad_norm(self.grads.view("gradients"), self.norm_partial.view("grad norm partial sums"),
                           self.norm_out.view("grad norm, clip scale"), max_norm)
        clip = self.norm_out.view("clip scale", 1, (1,))
        lr, bc1, bc2 = (plan.value(n, 1.0) for n in ("lr", "bias_correction1", "bias_correction2"))
        for decay, start, end in ((True, 0, lay.decay_end), (False, lay.decay_end, lay.total)):
            if end > start:
                part = "matrices" if decay else "norms and biases"
                param, grad, m, v = (buf.view(f"{what} of the {part}", start, (end - start,)) for what, buf in
                                     (("weights", self.weights), ("gradients", self.grads),
                                      ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)))
                ops.adamw(decay, param, grad, m, v, clip, lr, bc1, bc2,
                          param16=self.weights16.view("matrices[bf16]") if self.bf16 and decay else None)

    def _refresh(self, ops: Ops) -> None:
        """The matrices' bf16 copy of the initial weights (bf16 precision; each AdamW step then
        writes it with the weights)."""
        if self.bf16:
            end = self.layout.decay_end
            ops.cast(self.weights.view("matrices", 0, (end,)), self.weights16.view("matrices[bf16]"), end)
