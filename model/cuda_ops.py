"""The CUDA model's operations, each appending its launches to a launch plan.

One method per operation of ``reference.py`` (``linear``, ``rmsnorm``, ``rope``, ``attention``,
``swiglu``, ``cross_entropy`` and their backwards), each owning its kernels' launch dimensions,
the bf16 operand casts it needs and the split-K of a weight gradient; ``cuda_model.forward`` and
``backward`` call them line for line as the reference computes. Every spec comes from
``ModelKernels``; every argument is passed by the kernel's own parameter name (``Plan.add``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

from ptxgen.kernels.colsum import COLS_PER_BLOCK
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
from ptxgen.spec import KernelSpec
from runtime import View
from runtime.memory import DTYPES, Stream, fill_u32
from runtime.plan import Arg, Expr, Plan, Step
from runtime.tensormap import gemm_c_tensor_map, gemm_tensor_maps

from .config import ModelConfig
from .cuda_buffers import Arena, Params
from .kernels import LOSS_CHUNK_ROWS, Gemm, LinearKernels, ModelKernels, split_k

COLSUM_CHUNK = 256  # rows a block of a column sum adds up (more: chunks, finished in the same launch)
# what a GEMM whose tiles are all whole gets for the tail workspace, which it never touches: no bytes
NO_TAIL = tuple(View(f"no tail {x}", 0, (0,), "u8") for x in ("partial sums", "flags"))


def weight_splits(spec: Gemm, m: int, n: int, tokens: int, wave: int) -> int:
    """The parts a weight gradient's token contraction is split into (``split_k``): none where the
    GEMM cuts its own tail along K (``split_tail``), which fills its last wave itself."""
    return 1 if spec.split_tail else split_k(spec, m, n, tokens, wave)


def scratch_shapes(k: ModelKernels, c: ModelConfig, tokens: int, matrices: dict[str, tuple[int, int]],
                   wave: Callable[[Gemm], int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each scratch buffer the backward of ``tokens`` rows takes: the bf16 output
    gradients (bf16 precision), the down projection's dx where the SwiGLU backward's own kernel
    reads it (fp32), the RMSNorm's dgamma partial sums, the column sums' chunks and the
    largest split weight gradient's partial sums (each linear module's dW, ``matrices`` by module
    name, split as ``split_k`` splits it for a wave of ``wave(spec)`` blocks)."""
    H = c.hidden_size
    dws = {m: k.linear(m).grad_weight for m in matrices}
    parts = [(weight_splits(dws[m], *shape, tokens, wave(dws[m])), shape) for m, shape in matrices.items()]
    QKV = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # the fused q/k/v projection's output width
    shapes = {"rmsnorm dgamma partial": ((k.norm_bwd_residual.partial_rows(tokens), H), "f32"),
              "column sum chunks": ((-(-tokens // COLSUM_CHUNK), max(QKV, H)), "f32"),  # biases' and dgamma's
              "column sum counts": ((-(-max(QKV, H) // COLS_PER_BLOCK),), "i32"),  # ... and their blocks' counts
              "split-K partial sums": ((max((n * math.prod(s) for n, s in parts if n > 1), default=1),), "f32")}
    if k.swiglu_bwd is not None:  # the down projection's dx, read by the SwiGLU backward's own kernel
        shapes["d act"] = ((tokens, c.intermediate_size), "f32")
    return {"d y[bf16]": ((tokens * max(H, QKV),), "bf16"), **shapes} if k.to_bf16 is not None else shapes


def tail_shapes(k: ModelKernels, wave: Callable[[Gemm], int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of the workspace the model's ``split_tail`` GEMMs share (``TailWorkspace``):
    the slots of partial sums and their flags for the most blocks any of them runs (none without
    such GEMMs)."""
    sizes = [spec.tail_workspace(wave(spec)) for spec in k.specs() if getattr(spec, "split_tail", False)]
    return {"tail partial sums": ((max((p for p, _ in sizes), default=0) // 4,), "f32"),
            "tail flags": ((max((f for _, f in sizes), default=0) // 4,), "i32")}


def splits_a_tail(k: ModelKernels, c: ModelConfig, tokens: int, matrices: dict[str, tuple[int, int]],
                  wave: Callable[[Gemm], int]) -> bool:
    """Whether a training step of ``tokens`` rows has a GEMM that splits its tail (so needs the
    workspace): each linear module's forward, dX and dW, the loss's LM head on its chunks of rows."""
    gemms = [g for m, (d_out, d_in) in matrices.items() for g in k.linear(m).gemms(tokens, d_in, d_out)]
    if k.head_logits is not None:  # its chunks: whole ones and the last
        rows = {tokens, min(tokens, LOSS_CHUNK_ROWS), tokens % LOSS_CHUNK_ROWS} - {0}
        gemms += [(k.head_logits, r, c.vocab_size, c.hidden_size) for r in rows]
    return any(g.tail_parts(*dims, wave(g)) > 1 for g, *dims in gemms if g.split_tail)


def zeroed(view: View) -> View:
    """``view`` with every 32-bit word zero, before any launch on a plan's own stream reads it
    (counts and flags that every launch leaves zero after)."""
    fill_u32(view.ptr, 0, view.size)
    Stream.null().synchronize()
    return view


class TailWorkspace:
    """The split tails' partial sums and flags (``tail_shapes``), one for all of a backend's plans
    (they run one after another on one stream), allocated when a GEMM first splits its tail, the
    flags zeroed then: every launch leaves them down."""

    def __init__(self, kernels: ModelKernels, wave: Callable[[Gemm], int]):
        self.kernels, self.wave, self.arena = kernels, wave, Arena()
        self._views: tuple[View, View] | None = None

    def views(self) -> tuple[View, View]:
        """(partial sums, flags)."""
        if self._views is None:
            shapes = tail_shapes(self.kernels, self.wave)
            partials, flags = (self.arena.new(name, *shape) for name, shape in shapes.items())
            self._views = partials, zeroed(flags)
        return self._views

    def free(self) -> None:
        self.arena.free()
        self._views = None


class Ops:
    """Operations on ``tokens`` rows at a time into ``plan``; scratch comes from ``arena``."""

    def __init__(self, plan: Plan, kernels: ModelKernels, params: Params, config: ModelConfig, arena: Arena,
                 tokens: int, bf16: bool, tail: TailWorkspace):
        """``tail``: the workspace of the GEMMs that cut their tails along K (``split_tail``)."""
        self.plan, self.k, self.W, self.config, self.arena = plan, kernels, params, config, arena
        self.T, self.bf16, self.tail = tokens, bf16, tail

    # -- helpers ----------------------------------------------------------------------------
    def _add(self, spec, dims, result: Arg, /, **args: Arg) -> Step:
        """Launch ``spec`` with ``args``; labelled by what it makes, ``result``."""
        return self.plan.add(spec, dims, label=f"{spec.kind} -> {_name(result)}", **args)

    def cast(self, src: Arg, dst: Arg, count: int) -> None:
        """dst = bf16(src), ``count`` elements."""
        spec = self.k.to_bf16
        self._add(spec, spec.launch_dims(count), dst, src=src, dst=dst, n=count)

    def _linear(self, module: str) -> LinearKernels:
        return self.k.linear(module)

    def _gemm(self, spec: Gemm, what: str, a: View, b: View, c: Arg, m: int, n: int, k: int,
              bias: View | None = None, splits: int = 1, stats: View | None = None,
              gate_up: View | None = None, act: View | None = None, rope: tuple[Arg, Arg, View] | None = None,
              residual: View | None = None) -> None:
        """C = op(A) op(B) (+ bias) over ``splits`` parts of a ``k``-long contraction each (``gate_up``:
        a ``swiglu_grad`` spec's, C SwiGLU's backward of the product; ``act``: a ``swiglu_act``
        spec's, SwiGLU of C's halves; ``rope``: a ``rope_heads`` spec's keys, values and angles'
        table, C its q; ``residual``: a ``residual`` spec's R, C = R + the product); ``what``:
        the module and pass ("model.layers.0.mlp.down_proj dW"), in the launch's label for a profile.
        A TMA-fed kernel reads A and B through tensor maps (freed with the plan; with ``tma_store`` it
        writes C through one too) and its persistent blocks fill the GPU once."""
        kernel = self.plan.cache.get(spec)
        operands, result, extra = {}, c, {}
        # C (and a RoPE epilogue's k and v) in the dtype the spec stores: a bf16 C in f32 rows, or the
        # other way round, reads back as garbage with no error
        for out in (c, *(rope[:2] if rope is not None else ())):
            assert not isinstance(out, View) or out.dtype == spec.c_dtype.value, (out.name, out.dtype, spec)
        # R as C is laid out (f32, dense rows: its tensor map is C's geometry), and apart from it: the
        # kernel reads R's tiles while other blocks store C's (an overlap would read stored sums)
        if residual is not None and not (
                isinstance(c, View) and residual.dtype == "f32" and residual.shape == c.shape
                and (residual.ptr + residual.nbytes <= c.ptr or c.ptr + c.nbytes <= residual.ptr)):
            raise ValueError(f"{what}: the residual {residual.name} {residual.shape} {residual.dtype} must be an f32 "
                             f"matrix shaped as C ({_name(c)}) and apart from it")
        if isinstance(spec, GemmWgmmaSpec) and spec.tma:
            operands = {"tmap_a": a, "tmap_b": b}
            a, b = (self.plan.keep(x) for x in gemm_tensor_maps(spec, a.ptr, b.ptr, m, n, k * splits))
            if spec.tma_store:  # C too is written through a tensor map, which stands for the C view
                assert isinstance(c, View), c
                operands["tmap_c"], c = c, self.plan.keep(gemm_c_tensor_map(spec, c.ptr, m, n, splits=splits))
            if gate_up is not None:  # read through a map of C's geometry
                operands["tmap_gate_up"] = gate_up
                gate_up = self.plan.keep(gemm_c_tensor_map(spec, gate_up.ptr, m, n))
            if residual is not None and spec.tma_store:  # R too: into C's staging, through a map like C's
                operands["tmap_residual"] = residual
                residual = self.plan.keep(gemm_c_tensor_map(spec, residual.ptr, m, n))
            if act is not None:  # written through a map of its own
                operands["tmap_act"] = act
                act = self.plan.keep(gemm_c_tensor_map(spec, act.ptr, m, n, act=True))
            dims = spec.launch_dims(m, n, splits, resident=kernel.resident_blocks(spec.threads))
            if spec.split_tail:  # the tiles past its last full wave cut along K: the workspace
                blocks = dims[0][0]  # the grid: its x is the kernel's %nctaid.x
                parts = spec.tail_parts(m, n, k, blocks)
                if parts > 1:
                    partials, flags = self.tail.views()
                    need = spec.tail_workspace(blocks)
                    assert partials.nbytes >= need[0] and flags.nbytes >= need[1], (blocks, partials, flags)
                else:  # every tile whole: the kernel touches no workspace (allocated only if some GEMM needs it)
                    partials, flags = NO_TAIL
                extra = dict(partials=partials, flags=flags, tail_parts=parts, blocks=blocks)
        else:
            dims = spec.launch_dims(m, n, splits)
        if stats is not None:
            extra["stats"] = stats
        if gate_up is not None:
            extra["gate_up"] = gate_up
        if act is not None:
            extra["act"] = act
        if rope is not None:
            extra["rope"] = rope
        if residual is not None:
            extra["residual"] = residual
        args = spec.arguments(a, b, c, m, n, k, bias=bias, splits=splits, **extra)
        self.plan.add(spec, dims, label=f"{spec.kind} {what} -> {_name(result)}", operands=operands,
                      **_named(spec, args))

    def _wave(self, spec: Gemm) -> int:
        """How many of ``spec``'s blocks this GPU runs at once."""
        return self.plan.cache.get(spec).resident_blocks(spec.threads)

    def _split_k(self, spec: Gemm, m: int, n: int) -> int:
        return weight_splits(spec, m, n, self.T, self._wave(spec))

    # -- forward ------------------------------------------------------------------------------
    def embed(self, ids: View, table: str, out: View) -> None:
        spec = self.k.embed
        self._add(spec, spec.launch_dims(self.T), out, table=self.W[table].value, ids=ids, out=out,
                  n_tokens=self.T)

    def rmsnorm(self, x: View, gamma: str, out: View, rstd: View) -> None:
        spec = self.k.norm
        self._add(spec, spec.launch_dims(self.T), out, x=x, gamma=self.W[gamma].value, y=out, rstd=rstd,
                  n_rows=self.T)

    def linear(self, x: View, module: str, out: Arg, stats: View | None = None, residual: View | None = None
               ) -> None:
        """out = x W^T (+ b) for the linear layer ``module`` (its HF name without ``.weight``), on
        the rows of ``x``; ``stats``: the LM head's in the loss (bf16), also each column tile's row
        statistics, the cross-entropy's first pass; ``residual``: out = residual + x W^T, the
        residual stream's add (the o and down projections', whose GEMMs add it: ``residual_y``)."""
        w, bias = self.W[module + ".weight"], self.W.get(module + ".bias")
        d_out, d_in = w.shape
        spec = self._linear(module).forward if stats is None else self.k.head_logits
        assert stats is None or stats.size == 2 * -(-d_out // spec.block_n) * x.shape[0], (stats.name, stats.shape)
        self._gemm(spec, f"{module} forward", x, w.operand, out, x.shape[0], d_out, d_in,
                   bias=bias.value if bias is not None else None, stats=stats, residual=residual)

    def rope_angles(self, positions: View, out: View) -> None:
        """(cos, sin) of every angle RoPE rotates the rows at ``positions`` by, for the q/k/v GEMM's
        epilogue (``rope_in_gemm``): once a forward, every layer's."""
        spec = self.k.rope_table
        assert spec is not None and out.shape == (self.T, spec.head_dim // 2, 2), (out.name, out.shape)
        self._add(spec, spec.launch_dims(self.T), out, positions=positions, table=out, n_tokens=self.T)

    def attention_inputs(self, x: View, module: str, positions: View, q: View, k: Arg, v: Arg,
                         qkv: View | None, angles: View | None) -> None:
        """q, k and v of the rows of ``x`` as the attention reads them: [q | k | v] = x W^T (+ b), W
        the weight of ``module`` (the q, k and v projections as one), q and k rotated by RoPE at
        ``positions``; k and v into ``k`` and ``v`` (a KV cache's rows from its cached length on).
        Where ``rope_in_gemm``, the GEMM's epilogue makes all three, rotating by ``angles``
        (``rope_angles``'); else the GEMM writes [q | k | v] into ``qkv``, then RoPE's kernels
        rotate q and k out of it and v is copied."""
        c, spec = self.config, self._linear(module).forward
        Q, KV_ = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if not spec.rope_heads:
            assert qkv is not None, "the q/k/v projection's output needs its buffer"
            self.linear(x, module, out=qkv)
            self.rope(Columns(qkv, 0, Q), positions, c.num_heads, out=q)
            self.rope(Columns(qkv, Q, KV_), positions, c.num_kv_heads, out=k)
            self.copy_columns(Columns(qkv, Q + KV_, KV_), v, KV_)
            return
        w, bias = self.W[module + ".weight"], self.W.get(module + ".bias")
        assert angles is not None, "the q/k/v GEMM's RoPE needs the angles' table"
        self._gemm(spec, f"{module} forward + RoPE", x, w.operand, q, x.shape[0], Q + 2 * KV_, w.shape[1],
                   bias=bias.value if bias is not None else None, rope=(k, v, angles))

    def rope(self, x: Arg | Columns, positions: View, heads: int, out: Arg | Columns, inverse: bool = False) -> None:
        """RoPE on ``tokens`` rows of ``heads`` heads, from ``x`` into ``out`` (either may be
        columns of a wider buffer; bf16 precision: in bf16, the attention's operand or, ``inverse``
        (its backward), the q/k/v projection's output gradient as its GEMMs read it)."""
        k = self.k
        q_spec, k_spec = (k.rope_q_bwd, k.rope_k_bwd) if inverse else (k.rope_q, k.rope_k)
        spec = q_spec if heads == self.config.num_heads else k_spec
        assert spec is not None, "RoPE's kernels are not made where the q/k/v GEMM and the attention backward apply it"
        (x, x_stride), (y, y_stride) = (Columns.of(a, heads * spec.head_dim) for a in (x, out))
        args = spec.arguments(x, y, positions, self.T, x_stride, y_stride)
        self._add(spec, spec.launch_dims(self.T), y, **_named(spec, args))

    def copy_columns(self, src: Arg | Columns, out: Arg | Columns, width: int, backward: bool = False) -> None:
        """``tokens`` rows of ``width`` elements from ``src`` to ``out`` (either may be columns of a
        wider buffer): v out of the fused projection's rows, as the attention reads it, or
        (``backward``) dv into its gradient's, as its GEMMs read them (bf16 precision: the cast)."""
        spec = self.k.dv_copy if backward else self.k.v_copy
        assert spec is not None, "v's copies are not made where the q/k/v GEMM and the attention backward do them"
        (src, src_stride), (dst, dst_stride) = (Columns.of(a, width) for a in (src, out))
        args = spec.arguments(src, dst, self.T, width, src_stride, dst_stride)
        self._add(spec, spec.launch_dims(self.T * width), dst, **_named(spec, args))

    def attention(self, q: View, k: Arg, v: Arg, out: View, lse: View, batch: int, seq: int,
                  kv_len: int | Expr, kv_stride: int, q_start: int | Expr) -> None:
        """Causal GQA attention of ``seq`` new queries per sequence over ``kv_len`` cached keys."""
        spec = self.k.attention
        self._add(spec, spec.launch_dims(batch, seq), out, q=q, k=k, v=v, o=out, lse=lse, seq=seq, kv_len=kv_len,
                  kv_stride=kv_stride, q_start=q_start)

    def swiglu(self, x: View, module: str, gate_up: View, out: View) -> None:
        """[gate | up] per row of ``gate_up`` = x W^T, W the weight of ``module`` ([gate; up], the
        gate and up projections as one), and out = silu(gate) * up. bf16: one GEMM, whose epilogue
        also makes out (``swiglu_act``, from gate and up as stored); fp32: the GEMM, then the
        SwiGLU's kernel."""
        w = self.W[module + ".weight"]
        (d_out, d_in), spec = w.shape, self._linear(module).forward
        assert gate_up.shape == (self.T, d_out) == (out.shape[0], 2 * out.shape[1]), (gate_up.shape, out.shape)
        assert self.W.get(module + ".bias") is None, f"{module}: a gate/up bias is not modelled"
        fused = spec.swiglu_act
        self._gemm(spec, f"{module} forward", x, w.operand, gate_up, self.T, d_out, d_in, act=out if fused else None)
        if not fused:
            act, (rows, width) = self.k.swiglu, out.shape
            self._add(act, act.launch_dims(rows, width), out,
                      **_named(act, act.arguments(gate_up, out, rows, width)))

    def cross_entropy(self, logits: View, targets: View, losses: View, dlogits: View, grad_scale: Expr,
                      stats: View | None = None) -> None:
        """Per-row losses and, scaled by ``grad_scale``, their gradient with respect to the logits,
        for the rows of ``logits``; ``stats``: their row statistics, made by the LM head (bf16)."""
        spec = self.k.cross_entropy
        # the statistics of exactly these rows: the kernel takes their row stride from its grid
        assert (stats is None) == (spec.stats_block == 0), "the cross-entropy's statistics come with stats_block"
        assert stats is None or stats.size == 2 * spec.stats_tiles * logits.shape[0], (stats.name, stats.shape)
        assert logits.dtype == spec.dtype.value, (logits.name, logits.dtype, spec.dtype)
        self._add(spec, spec.launch_dims(logits.shape[0]), losses, logits=logits, targets=targets, loss=losses,
                  dlogits=dlogits, grad_scale=grad_scale, **({"stats": stats} if stats is not None else {}))

    # -- backward ------------------------------------------------------------------------------
    @functools.cached_property
    def _scratch(self) -> dict[str, tuple[tuple[int, ...], str]]:
        matrices = {m: self.W[m + ".weight"].shape for m in self.W.linear_modules()}
        return scratch_shapes(self.k, self.config, self.T, matrices, self._wave)

    def _scratch_buffer(self, name: str) -> View:
        return self.arena.new(name, *self._scratch[name])

    @functools.cached_property
    def _dy16(self) -> View:
        return self._scratch_buffer("d y[bf16]")

    @functools.cached_property
    def _gamma_partial(self) -> View:
        return self._scratch_buffer("rmsnorm dgamma partial")

    @functools.cached_property
    def _column_scratch(self) -> View:
        return self._scratch_buffer("column sum chunks")

    @functools.cached_property
    def _column_counts(self) -> View:
        """The one-launch column sums' count per column block (``ColumnSumSpec.finish``): zeroed
        here, and every launch leaves them so."""
        return zeroed(self._scratch_buffer("column sum counts"))

    @functools.cached_property
    def _d_act(self) -> View:
        return self._scratch_buffer("d act")

    @functools.cached_property
    def _split_scratch(self) -> View:
        return self._scratch_buffer("split-K partial sums")

    def grad_weight(self, dy: View, x: View, module: str) -> None:
        """dW = dy^T x. A dW whose tiles fill the GPU's waves badly splits the token dimension into
        parts whose partial dWs a fixed-order sum adds (deterministic)."""
        w = self.W[module + ".weight"]
        spec, (d_out, d_in) = self._linear(module).grad_weight, w.shape
        splits = self._split_k(spec, d_out, d_in)
        if splits == 1:
            self._gemm(spec, f"{module} dW", dy, x, w.grad, d_out, d_in, self.T)
            return
        scratch = self._split_scratch
        self._gemm(spec, f"{module} dW", dy, x, scratch, d_out, d_in, self.T // splits, splits=splits)
        ps = self.k.parts_sum
        self._add(ps, ps.launch_dims(d_out * d_in), w.grad, **_named(ps, ps.arguments(scratch, w.grad, splits,
                                                                                        d_out * d_in)))

    def grad_input(self, dy: View, module: str, dx: View) -> None:
        """dx = dy W."""
        w = self.W[module + ".weight"]
        d_out, d_in = w.shape
        self._gemm(self._linear(module).grad_input, f"{module} dX", dy, w.operand, dx, self.T, d_in, d_out)

    def column_sum(self, src: View, bias: str) -> None:
        """A bias's gradient: the sum over the rows of ``src``, its output gradient as the GEMMs read it."""
        self._column_sum(src, self.W[bias].grad, self.T, bias=True)

    def _column_sum(self, src: View, dst: View, rows: int, bias: bool = False) -> None:
        """dst = the sum over ``rows`` rows of ``src`` ([rows, dst.size]), in one or two fixed-order
        stages: up to COLSUM_CHUNK rows at once, more in chunks of them (a block per 32 columns
        and chunk: one chunk of 1024 rows of 896 columns is 28 blocks, which left the H200 all but
        idle for 10 us) and then the chunks' sums, by the last block of each column block to be
        done (``colsum_chunks``: one launch, not a second one)."""
        cols, k = dst.size, self.k
        one, chunked = (k.bias_sum, k.bias_sum_chunks) if bias else (k.colsum, k.colsum_chunks)
        assert one is not None and chunked is not None, "no bias sums: the kernels are of a model without q/k/v biases"
        assert src.dtype == one.dtype.value, (src.name, src.dtype, one)
        if rows <= COLSUM_CHUNK:
            spec = one
            self._add(spec, spec.launch_dims(rows, cols, rows), dst, src=src, dst=dst, n_rows=rows, n_cols=cols,
                      rows_per_chunk=rows)
            return
        spec, scratch, counts = chunked, self._column_scratch, self._column_counts
        dims = spec.launch_dims(rows, cols, COLSUM_CHUNK)
        (blocks, chunks), _ = dims
        assert scratch.size >= chunks * cols and counts.size >= blocks, (scratch.shape, counts.shape, dims)
        self._add(spec, dims, dst, src=src, partials=scratch, dst=dst, counters=counts, n_rows=rows, n_cols=cols,
                  rows_per_chunk=COLSUM_CHUNK)

    def rmsnorm_backward(self, x: View, gamma: str, dy: View, rstd: View, dx: View, residual: bool = False) -> View:
        """dx = the norm's input gradient (``residual``: added to dx, the residual stream's
        gradient, in place); gamma's gradient as per-chunk partial sums and their column sum.
        Returns dx as the GEMMs read it: itself, or (bf16 precision) the bf16 copy the kernel
        writes into the output gradients' shared scratch."""
        spec, g, T = self.k.norm_bwd_residual if residual else self.k.norm_bwd, self.W[gamma], self.T
        partial = self._gamma_partial
        assert dy.dtype == spec.dy_dtype.value, (dy.name, dy.dtype, spec)  # (bf16 bits read as f32: garbage)
        operand = View(dx.name + "[bf16]", self._dy16.ptr, dx.shape, "bf16") if spec.bf16_copy else dx
        self._add(spec, spec.launch_dims(T), dx, x=x, gamma=g.value, dy=dy, rstd=rstd, dx=dx,
                  dgamma_partial=partial, n_rows=T, **({"dres": dx} if residual else {}),
                  **({"dx16": operand} if spec.bf16_copy else {}))
        self._column_sum(partial, g.grad, spec.partial_rows(T))
        return operand

    def swiglu_backward(self, gate_up: View, dy: View, module: str, dgate_up: View) -> None:
        """[dgate | dup] per row of ``dgate_up``: SwiGLU's backward (gate and up from the forward's
        ``gate_up``) of its output's gradient dy W, W the weight of ``module``, the down projection
        SwiGLU feeds. bf16: one GEMM, whose epilogue takes the backward (``swiglu_grad``: dy W is
        never stored); fp32: dy W into scratch, then the SwiGLU backward's kernel."""
        w = self.W[module + ".weight"]
        (d_out, d_in), dx = w.shape, self._linear(module).grad_input
        assert gate_up.shape == dgate_up.shape == (self.T, 2 * d_in), (gate_up.shape, dgate_up.shape, w.shape)
        fused = dx.swiglu_grad
        self._gemm(dx, f"{module} dX", dy, w.operand, dgate_up if fused else self._d_act, self.T, d_in, d_out,
                   gate_up=gate_up if fused else None)
        if not fused:
            spec = self.k.swiglu_bwd
            self._add(spec, spec.launch_dims(self.T, d_in), dgate_up,
                      **_named(spec, spec.arguments(gate_up, self._d_act, dgate_up, self.T, d_in)))

    def attention_backward(self, q: View, k: View, v: View, o: View, do: View, lse: View, delta: View, batch: int,
                           seq: int, positions: View, into: View | None, angles: View | None,
                           scratch: tuple[View | None, View | None, View | None]) -> View:
        """[dq | dk | dv] per row: the gradient of the fused q/k/v projection's output, dq and dk
        through RoPE's backward, as its GEMMs (and its bias's column sum) read it: into ``into``
        (fp32; None in bf16, where the rows go, in bf16, into the scratch the backward's output
        gradients share); returned. dq (and delta, the rows' dO . O) in one kernel, dk and dv in
        another; where they write the rows themselves (their ``qkv_rows``, rotating back by the
        forward's ``angles``), that is all; else into ``scratch`` (dq, dk, dv), then the RoPE
        backward kernels and dv's copy write the rows."""
        bq, bkv = self.k.attention_bwd_q, self.k.attention_bwd_kv
        rows = bq.qkv_rows
        c = self.config
        Q, KV_ = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if self.bf16:  # (the rows, as every other output gradient, in the bf16 scratch they share)
            assert into is None, f"bf16: the rows go into the shared scratch, not {into.name}"
            out = View("d qkv[bf16]", self._dy16.ptr, (self.T, Q + 2 * KV_), "bf16")
        else:
            assert into is not None, "fp32: the attention backward needs the rows' buffer"
            out = into
        if rows:
            assert angles is not None, "qkv_rows: the angles' table"
            dq, dk, dv, extra = out, out, out, dict(angles=angles)
        else:
            (dq, dk, dv), extra = scratch, {}
            assert dq is not None and dk is not None and dv is not None, "the attention backward needs dq, dk and dv"
        self._add(bq, bq.launch_dims(batch, seq), dq, q=q, k=k, v=v, o=o, do=do, lse=lse, dq=dq, delta=delta,
                  seq=seq, **extra)
        self._add(bkv, bkv.launch_dims(batch, seq), dk, q=q, k=k, v=v, do=do, lse=lse, delta=delta, dk=dk, dv=dv,
                  seq=seq, **extra)
        if not rows:
            self.rope(dq, positions, c.num_heads, out=Columns(out, 0, Q), inverse=True)
            self.rope(dk, positions, c.num_kv_heads, out=Columns(out, Q, KV_), inverse=True)
            self.copy_columns(dv, Columns(out, Q + KV_, KV_), KV_, backward=True)
        return out

    def embedding_backward(self, dout: View, order: View, seg_start: View, seg_id: View, table: str,
                           segments: Expr, into: View | None = None) -> None:
        """The table's gradient: each of ``segments`` distinct tokens sums its rows of ``dout`` in
        a fixed order (``order`` groups the rows by token). An untied table is zeroed first; a tied
        one already holds the LM head's gradient, which this adds to. ``into``: rows of the table's
        gradient elsewhere (a data-parallel rank's slab of it, ``seg_id`` counted from its first row)."""
        spec, dtable = self.k.embed_bwd, self.W[table].grad if into is None else into
        if not spec.accumulate:
            self.plan.fill(dtable, dtable.size, label=f"zero {dtable.name}")
        self._add(spec, ((segments,), spec.launch_dims(1)[1]), dtable, dout=dout, order=order,
                  seg_start=seg_start, seg_id=seg_id, dtable=dtable)

    # -- optimizer -------------------------------------------------------------------------------
    def clip_grad_norm(self, grads: View, partial: View, out: View, max_norm: float,
                       across: Callable[[View], None] | None = None) -> None:
        """out = [the gradients' global norm, the clip scale AdamW reads]. ``across``: sums the
        per-block partial sums over the ranks of a data-parallel run (each rank holding a shard)."""
        k = self.k
        self._add(k.grad_norm_partial, k.grad_norm_partial.launch_dims(), partial, grad=grads, partial=partial,
                  n=grads.size)
        if across is not None:
            across(partial)
        self._add(k.grad_norm_final, k.grad_norm_final.launch_dims(), out, partial=partial, out=out,
                  max_norm=max_norm)

    def adamw(self, decay: bool, param: View, grad: View, exp_avg: View, exp_avg_sq: View, clip: View,
              lr: Expr, bias_correction1: Expr, bias_correction2: Expr, param16: View | None = None) -> None:
        """One AdamW step on ``param`` (clipped by ``clip``); the decayed matrices' step also
        writes their bf16 copy ``param16`` in bf16 precision."""
        spec = self.k.adamw_decay if decay else self.k.adamw_no_decay
        copy = {"param16": param16} if spec.bf16_copy else {}
        self._add(spec, spec.launch_dims(param.size), param, param=param, grad=grad, exp_avg=exp_avg,
                  exp_avg_sq=exp_avg_sq, clip=clip, n=param.size, lr=lr, bias_correction1=bias_correction1,
                  bias_correction2=bias_correction2, **copy)


@dataclass(frozen=True)
class Columns:
    """Columns [start, start + width) of a [rows, stride] view: q, k or v in the fused projection's
    rows, which a strided kernel reads (or writes) row by row."""

    view: View
    start: int
    width: int

    @staticmethod
    def of(arg: "Arg | Columns", row: int) -> tuple[Arg, int]:
        """(the argument a kernel gets, its row stride): columns as the view from their first
        element to the end of the buffer (the extent the plan records), anything else as rows of ``row``."""
        if not isinstance(arg, Columns):
            return arg, row
        view, size = arg.view, DTYPES[arg.view.dtype].itemsize
        rows, stride = view.shape
        assert arg.width == row and arg.start + arg.width <= stride, (view.name, arg.start, arg.width, row, stride)
        name = f"{view.name}[:, {arg.start}:{arg.start + arg.width}]"
        return View(name, view.ptr + arg.start * size, (rows * stride - arg.start,), view.dtype), stride


def _named(spec: KernelSpec, args: tuple[Arg, ...]) -> dict[str, Arg]:
    """A spec's ``arguments(...)`` by its parameters' names."""
    return dict(zip((n for n, _ in spec.params()), args))


def _name(arg: Arg) -> str:
    return getattr(arg, "name", None) or str(arg)


def kv_rows(view: View, first_row: int | Expr) -> Arg:
    """Where rows from ``first_row`` of a [rows, width] K or V buffer start."""
    return view if isinstance(first_row, int) and first_row == 0 else \
        Expr(base=view) + first_row * (view.shape[1] * DTYPES[view.dtype].itemsize)
