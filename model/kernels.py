"""Every kernel spec the CUDA model runs, derived from the config and the optimizer settings alone.

This is the one place the model turns its config into kernels: eps and theta are read from the
config here (no spec has a default for them), and nothing depends on the batch shape, so the whole
set is known, and pre-warmed, before the first step.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from ptxgen.kernels.adamw import AdamWSpec, GradNormFinalSpec, GradNormPartialSpec
from ptxgen.kernels.attention import AttentionBackwardKVSpec, AttentionBackwardQSpec, AttentionSpec
from ptxgen.kernels.attention_tc import AttentionTCBackwardKVSpec, AttentionTCBackwardQSpec, AttentionTCSpec
from ptxgen.kernels.attention_wgmma import AttentionWgmmaBackwardKVSpec, AttentionWgmmaBackwardQSpec, AttentionWgmmaSpec
from ptxgen.kernels.cast import CastSpec
from ptxgen.kernels.colsum import ColumnSumSpec, PartsSumSpec
from ptxgen.kernels.cross_entropy import CrossEntropySpec
from ptxgen.kernels.embedding import EmbeddingBackwardSpec, EmbeddingSpec
from ptxgen.kernels.gemm import GemmSpec, widest_vec
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
from ptxgen.kernels.rmsnorm import RMSNormBackwardSpec, RMSNormSpec
from ptxgen.kernels.rope import RopeSpec, RopeTableSpec
from ptxgen.kernels.swiglu import SwiGLUBackwardSpec, SwiGLUSpec
from ptxgen.spec import KernelSpec, SpecError
from ptxgen.vecio import DType, RowSlices, vector_width

from .config import ModelConfig
from .optim import AdamWSettings
from .precision import Precision

SMALL_TILE = dict(block_m=64, block_n=64, thread_m=4, thread_n=8)
# the fastest wgmma tile at every Qwen2-0.5B layer shape (bench_compute bf16-layers, H200, 16384
# tokens): 128 x 128 with 6 stages, the two warpgroups taking tiles in turn. Against 128 x 256 tiles
# shared by both warpgroups (4 stages; 3 for the LM head's dX and dW) it ran the gate/up forward at
# 630 against 570 TFLOP/s, down's dX 622 / 568, the LM head's forward 531 / 469, dX 651 / 588 and
# dW 615 / 582
WGMMA_TILE = dict(block_n=128, stages=6, pingpong=True)
LOSS_CHUNK_ROWS = 1024  # the training step's logits are made, and their loss taken, this many rows at a time
SPLIT_K_MIN_ROWS = 256  # a dW GEMM splits its token contraction into parts of at least this many tokens
SPLIT_K_MAX = 16
# FLOPs a GEMM does in the time one byte moves through memory, as measured on the H100 by
# bench_compute / bench_kernels (fp32 SIMT ~47 TFLOP/s, wgmma ~600, copy ~3 TB/s):
# what a split's partial sums cost, in the GEMM's own currency.
FLOPS_PER_BYTE = {GemmSpec: 16, GemmWgmmaSpec: 200}
# the one-launch column sums' thread groups: on the H200, 4 took dgamma's 1024 x 896 partial rows
# in 10.5 us and the q/k/v bias's 8192 x 1152 in 15.8, against 11.5 and 17.7 with 8 (256-row chunks,
# each launch alone); in the step (two other H200s) all of them took 0.801 ms with 4 and 0.795 with 8
COLSUM_CHUNKS_GROUPS = 4
NORM_WARP_VALUES = 32  # a norm's row takes one warp if that is at most this many values a lane
NORM_BWD_ROWS = 8  # rows a block of the RMSNorm backward (each block writes a row of dgamma partial sums)
WIDE_OUTPUT = 512  # outputs at least this wide fill the GPU with 128x128 tiles at training batch sizes

Gemm = GemmSpec | GemmWgmmaSpec


def split_k(spec: Gemm, m: int, n: int, tokens: int, wave: int) -> int:
    """Parts to split a dW GEMM's ``tokens``-long contraction into (1: none). A GPU runs ``wave``
    blocks at once, so 266 tiles on 264 slots take two full waves' time, the second all but idle;
    more parts fill the waves, but each writes an m x n partial sum that a column sum reads back.
    The count (a power of two dividing ``tokens``, parts of at least SPLIT_K_MIN_ROWS tokens and a
    multiple of the spec's ``split_k_multiple``) is the one with the least estimated time: the
    waves' FLOPs, idle slots included, plus the partial sums' bytes at FLOPS_PER_BYTE. (Where a
    ``split_tail`` kernel cuts its own tail, it is not split: ``cuda_ops.weight_splits``.)"""
    tiles = -(-m // spec.block_m) * -(-n // spec.block_n)

    def cost(parts: int) -> float:
        waves = -(-tiles * parts // wave)
        flops = waves * wave * 2.0 * spec.block_m * spec.block_n * tokens / parts
        return flops + (FLOPS_PER_BYTE[type(spec)] * 4.0 * m * n * (2 * parts + 1) if parts > 1 else 0.0)

    options = [1]
    while (options[-1] < SPLIT_K_MAX and tokens % (2 * options[-1]) == 0
           and tokens // (2 * options[-1]) >= SPLIT_K_MIN_ROWS
           and tokens // (2 * options[-1]) % spec.split_k_multiple() == 0):
        options.append(2 * options[-1])
    return min(options, key=cost)


def rope_in_gemm(c: ModelConfig, precision: Precision) -> bool:
    """Whether the q/k/v projection's forward GEMM applies RoPE in its epilogue (``LinearKernels.of``'s
    ``rope``): bf16 precision, and heads that its tiles' columns hold whole, q's and k's widths in
    whole tiles."""
    widths, tile = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim), WGMMA_TILE["block_n"]
    return precision is Precision.BF16 and c.head_dim % 16 == 0 and tile % c.head_dim == 0 and \
        all(w % tile == 0 for w in widths)


def _lanes(head_dim: int) -> int:
    if head_dim % 4:
        raise SpecError(f"the fp32 attention needs head_dim a multiple of 4, got {head_dim}")
    lanes = max(1, min(8, head_dim // 32))
    while head_dim % (4 * lanes):
        lanes //= 2
    return lanes


@dataclass(frozen=True)
class LinearKernels:
    """The three GEMMs of ``y = x W^T (+ b)`` for W of shape [out, in]: fp32 SIMT, or in bf16
    precision Hopper's warpgroup MMA on bf16 operands (fp32 accumulate and output), fed by TMA:
    the warp-specialized persistent kernel, in all three layouts."""

    forward: Gemm          # y = x W^T (+ b)
    grad_input: Gemm       # dx = dy W
    grad_weight: Gemm      # dW = dy^T x

    @classmethod
    def of(cls, d_in: int, d_out: int, bias: bool = False, precision: Precision = Precision.FP32,
           bf16_out: bool = False, bf16_dx: bool = False, swiglu_dx: bool = False, swiglu_y: bool = False,
           rope: dict[str, int | float] | None = None, residual_y: bool = False, cut_tails: bool = True
           ) -> "LinearKernels":
        """``bf16_out`` (``bf16_dx``): in bf16 precision, y (dx) is stored in bf16, rounded as a cast
        of the f32 result would (what the next kernel reads). ``swiglu_dx``: x is a SwiGLU's output
        (the down projection's), and in bf16 precision the dX GEMM's epilogue takes SwiGLU's
        backward, storing [dgate | dup] (``swiglu_grad``; dx itself is never stored). ``swiglu_y``:
        y is [gate | up] (the gate/up projection's), and in bf16 precision the forward GEMM's
        epilogue also stores silu(gate) * up (``swiglu_act``). ``rope``: y is a fused q/k/v
        projection's, and in bf16 precision the forward GEMM's epilogue stores q, k and v as the
        attention reads them, q and k rotated (gemm_wgmma's ``rope_*`` fields, given here, where
        ``rope_in_gemm`` says so). ``residual_y``: y is added to the residual stream, and the forward
        GEMM adds it (y = r + x W^T: ``residual``; in bf16 precision R comes into C's staging by TMA
        and C leaves by TMA). ``cut_tails``: the bf16 GEMMs cut the
        tiles past their last full wave along K (``split_tail``), which needs them alone on the GPU;
        else a weight gradient's wave is filled by split-K."""
        if precision is Precision.BF16:
            # a bf16 C leaves through shared memory by TMA (tma_store): on the H200 the gate/up
            # forward's 8192 x 9728 x 896 took 0.196 ms against 0.234 stored by the threads (a tile
            # 5.32 us against 6.34; 5.03 with no store at all); a plain f32 C gained nothing (6.12
            # against 6.21 us a tile, and its staging costs a stage), so the threads store it, but
            # where R is added (residual_y) R and C go through the staging: R by the threads cost the
            # o projection's forward 49.5 us against 39.6 (8192 x 896 x 896, H200)
            # split_tail: the tiles past the last full wave cut along K (dX and dW at the model's
            # shapes leave 52 or 4 tiles for a fourth or fifth wave of 132 SMs)
            make = functools.partial(GemmWgmmaSpec, tma=True, split_tail=cut_tails, **WGMMA_TILE)
            # swiglu_y: the SwiGLU took 1.45 ms of the 8192-token step on the H200, reading the
            # gate and up the GEMM had just written; its act staged too leaves room for 5 stages
            # rope: the tail not cut (with it ptxas spilled the epilogue's registers beside the
            # partial sums' code; at the model's K = hidden it would not pay: tail_parts). On the
            # H200 at 8192 x 1152 x 896 the GEMM with RoPE in its epilogue as it is took 0.050 ms,
            # against 0.050 for the f32 product + 0.035 for the RoPE kernels and v's cast reading
            # it back; with 64-column tiles (no spills with the tail cut) 0.068
            # residual_y: R and C staged (64 KB) leave room for 5 stages
            fwd = make(trans_a=False, trans_b=True, bias=bias, bf16_out=bf16_out, tma_store=bf16_out or residual_y,
                       **(dict(swiglu_act=True, stages=5) if swiglu_y else {}),
                       **(dict(residual=True, stages=5) if residual_y else {}),
                       **(dict(split_tail=False, **rope) if rope else {}))
            # swiglu_dx: on the H200 the 8192-token step's SwiGLU backward took 2.81 ms reading the
            # f32 dx the down projection's dX had written (3.19 ms). Its gate and up staged beside
            # the stages (64 KB) leave room for 5 of them. Its tail is not cut (at K = hidden, a few
            # dozen slices a tile, a cut would not pay: tail_parts), and the uncut kernel ran 0.172
            # ms against 0.184 on the H200 at 8192 x 4864 x 896 (the GEMM + swiglu_bwd: 0.248)
            swiglu = dict(swiglu_grad=True, stages=5, split_tail=False) if swiglu_dx else {}
            dx = make(trans_a=False, trans_b=False, bf16_out=bf16_dx, tma_store=bf16_dx or swiglu_dx, **swiglu)
            dw = make(trans_a=True, trans_b=False)
        else:
            make = functools.partial(GemmSpec, vec=widest_vec(d_in, d_out))
            tile = lambda width: {} if width >= WIDE_OUTPUT else SMALL_TILE  # noqa: E731
            fwd = make(trans_a=False, trans_b=True, bias=bias, residual=residual_y, **tile(d_out))
            dx = make(trans_a=False, trans_b=False, **tile(d_in))
            dw = make(trans_a=True, trans_b=False, **tile(min(d_in, d_out)))
        return cls(fwd, dx, dw)

    def specs(self) -> list[KernelSpec]:
        return [self.forward, self.grad_input, self.grad_weight]

    def gemms(self, tokens: int, d_in: int, d_out: int) -> list[tuple[Gemm, int, int, int]]:
        """(spec, m, n, k) of each of the three GEMMs on ``tokens`` rows of a [d_out, d_in] weight."""
        return [(self.forward, tokens, d_out, d_in), (self.grad_input, tokens, d_in, d_out),
                (self.grad_weight, d_out, d_in, tokens)]


# a linear layer's kernels by its module's name (the tied LM head is the embedding's matrix)
LINEAR_KINDS = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down", "lm_head": "head",
                "embed_tokens": "head"}


@dataclass(frozen=True)
class ModelKernels:
    embed: EmbeddingSpec
    embed_bwd: EmbeddingBackwardSpec
    norm: RMSNormSpec            # every norm (the residual adds are the o and down projections' GEMMs')
    norm_bwd: RMSNormBackwardSpec           # the final norm's backward
    norm_bwd_residual: RMSNormBackwardSpec  # the layers' norms: dx adds the residual stream's gradient
    qkv: LinearKernels  # q, k and v as one GEMM ([q; k; v] weights and biases)
    o: LinearKernels
    gate_up: LinearKernels
    down: LinearKernels
    head: LinearKernels
    # bf16: the loss's LM head forward, storing the logits in bf16 (as transformers' bf16 model does;
    # half the bytes written and read back by the cross-entropy) and also each 128-column tile's row
    # (max, sum of exp) of them: the cross-entropy's first pass made while the logits are in
    # registers, not read back from memory
    head_logits: GemmWgmmaSpec | None
    # all four strided: q and k read from the fused projection's rows, their gradients written into
    # its gradient's. The forward's (and v's copy) are None where the projection's GEMM makes q, k
    # and v itself (``rope_in_gemm``), rotating by the angles' table of rope_table (else None)
    rope_table: RopeTableSpec | None
    rope_q: RopeSpec | None
    rope_k: RopeSpec | None
    rope_q_bwd: RopeSpec | None  # (None, and dv_copy: where the attention backward writes the
    rope_k_bwd: RopeSpec | None  # projection's gradient rows itself, rotated back: its qkv_rows)
    v_copy: CastSpec | None  # v out of the fused projection's rows, as the attention reads it (bf16: the cast)
    dv_copy: CastSpec | None  # dv into the fused projection's gradient rows, as its GEMMs read them
    attention: AttentionSpec | AttentionTCSpec | AttentionWgmmaSpec  # bf16: tensor cores, on bf16 q, k, v
    attention_bwd_q: AttentionBackwardQSpec | AttentionTCBackwardQSpec | AttentionWgmmaBackwardQSpec
    attention_bwd_kv: AttentionBackwardKVSpec | AttentionTCBackwardKVSpec | AttentionWgmmaBackwardKVSpec
    swiglu: SwiGLUSpec | None        # fp32 (None in bf16: the gate/up projection's forward GEMM makes it)
    swiglu_bwd: SwiGLUBackwardSpec | None  # fp32 (None in bf16: the down projection's dX GEMM takes it)
    cross_entropy: CrossEntropySpec
    colsum: ColumnSumSpec
    colsum_chunks: ColumnSumSpec  # more rows than a chunk: the chunks' sums finished in the same launch
    # the same for the q/k/v bias's gradient, over its output gradient as the GEMMs read it (None: no bias)
    bias_sum: ColumnSumSpec | None
    bias_sum_chunks: ColumnSumSpec | None
    parts_sum: PartsSumSpec  # split-K partial weight gradients
    grad_norm_partial: GradNormPartialSpec
    grad_norm_final: GradNormFinalSpec
    adamw_decay: AdamWSpec
    adamw_no_decay: AdamWSpec
    to_bf16: CastSpec | None  # bf16 precision: the weights' bf16 copies (the GEMMs' operands)

    @classmethod
    def of(cls, c: ModelConfig, adamw: AdamWSettings, ignore_index: int,
           precision: Precision = Precision.FP32, cut_tails: bool = True) -> "ModelKernels":
        """``cut_tails``: the GEMMs have the GPU to themselves and cut their tails (``LinearKernels.of``)."""
        h, d, q_dim, kv_dim = c.hidden_size, c.head_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        rope = dict(head_dim=d, theta=c.rope_theta)
        attn = dict(heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=d)
        if precision is Precision.BF16:
            # on wgmma where its 64-wide column chunks fit (head_dim 64, 128), else on mma.sync; each
            # kernel at its fastest layout on the H200: the forward at d64 with 64-key tiles (qwen2-0.5b
            # 8 x 1024: 55.2-56.7 us a layer against 59.3-59.6 with 128; 110 registers, 4 blocks a
            # multiprocessor against 158 and 3); dQ with 64-key tiles; dK/dV at d64 in two
            # teams of a warpgroup over 64-query tiles (qwen2-0.5b 8 x 1024: 2.86 ms a step against
            # 3.89 for one warpgroup a block, whose 256 blocks of 16 causal lengths leave SMs idle),
            # at d128 one warpgroup over 64-query tiles (b8 h14/2 s2048: 0.486 ms, two teams 0.494)
            # (where the q/k/v GEMM applies RoPE, the backward writes the projection's gradient
            # rows rotated back itself: qkv_rows, by the forward's angles)
            rows = dict(qkv_rows=rope_in_gemm(c, precision))
            if d in (64, 128):
                kv = dict(warps=8, teams=2, tile=64) if d == 64 else dict(tile=64)
                attention = (AttentionWgmmaSpec(**attn, tile=64 if d == 64 else 128, warps=8 if d == 128 else 4),
                             AttentionWgmmaBackwardQSpec(**attn, **rows),
                             AttentionWgmmaBackwardKVSpec(**attn, **kv, **rows))
            else:
                attention = (AttentionTCSpec(**attn), AttentionTCBackwardQSpec(**attn, **rows),
                             AttentionTCBackwardKVSpec(**attn, **rows))
        else:  # a row over lanes threads: about 32 of its values per thread (64 -> 2 lanes, 128 -> 4)
            attention = tuple(cls(**attn, lanes=_lanes(d))
                              for cls in (AttentionSpec, AttentionBackwardQSpec, AttentionBackwardKVSpec))
        bf16 = precision is Precision.BF16
        # bf16: the norms write the GEMMs' bf16 operand themselves (their f32 output is read by nothing else).
        # A warp a row where the row fits a warp's registers: on the H200 at 8192 x 896 (bf16 out) 15.4-16.3
        # us against 19.1-19.2 with a block a row (its block-wide sum waits at barriers)
        per_lane = RowSlices.values_per_thread(h, vector_width(h, DType.F32), 32)
        norm = RMSNormSpec(hidden=h, eps=c.rms_norm_eps, save_rstd=True, bf16_out=bf16,
                           warp_per_row=per_lane <= NORM_WARP_VALUES)
        partial = GradNormPartialSpec()
        linear = functools.partial(LinearKernels.of, precision=precision, cut_tails=cut_tails)
        gemm_operand = DType.BF16 if bf16 else DType.F32
        # fp32's SwiGLU kernels: a thread's elements stay in one row of intermediate_size, 16 bytes where it divides
        swiglu_vec = vector_width(c.intermediate_size, DType.F32)
        swiglu_vec = 0 if swiglu_vec == 16 // DType.F32.size else swiglu_vec
        # bf16: every dX GEMM stores its output in bf16, as torch's autocast does and as the next
        # kernel reads it (o's: the attention backward's dO; the rest: a norm backward's dy)
        head = linear(h, c.vocab_size, bf16_dx=True)
        fused_rope = rope_in_gemm(c, precision)
        qkv_rope = dict(rope_heads=c.num_heads, rope_kv_heads=c.num_kv_heads, rope_head_dim=d) if fused_rope else None
        stats_block = WGMMA_TILE["block_n"] if bf16 else 0
        return cls(
            embed=EmbeddingSpec(dim=h), embed_bwd=EmbeddingBackwardSpec(dim=h, accumulate=c.tie_word_embeddings),
            norm=norm,
            # bf16: the norms' backward also writes dx in bf16, the next GEMMs' operand. 8 rows a
            # block: on the H200 at 8192 x 896 (bf16 copy) 40.5 us with the residual, 34.7 without,
            # against 47.7 and 37.9 with 16 (fewer rows a block hide less latency, more add partials)
            norm_bwd=RMSNormBackwardSpec(hidden=h, bf16_copy=bf16, rows_per_block=NORM_BWD_ROWS,
                                         dy_dtype=gemm_operand),
            norm_bwd_residual=RMSNormBackwardSpec(hidden=h, residual=True, bf16_copy=bf16,
                                                  rows_per_block=NORM_BWD_ROWS, dy_dtype=gemm_operand),
            qkv=linear(h, q_dim + 2 * kv_dim, bias=c.qkv_bias, rope=qkv_rope, bf16_dx=True),
            # gate and up as one GEMM ([gate; up] weights); bf16: stored in bf16, as SwiGLU's backward reads them
            # bf16: the attention output's gradient stored in bf16, as the attention backward reads it
            # the o and down projections add the residual stream to their output themselves (the
            # norm after each reads the sum only)
            o=linear(q_dim, h, bf16_dx=True, residual_y=True),
            gate_up=linear(h, 2 * c.intermediate_size, bf16_out=True, swiglu_y=True, bf16_dx=True),
            down=linear(c.intermediate_size, h, swiglu_dx=True, residual_y=True), head=head,
            head_logits=dataclasses.replace(head.forward, row_stats=True, bf16_out=True, tma_store=True)
            if stats_block else None,
            # bf16 where the q/k/v GEMM does not apply RoPE (``rope_in_gemm``): RoPE writes the
            # attention's bf16 q and k itself (its f32 output is read by nothing else)
            rope_table=RopeTableSpec(**rope) if fused_rope else None,
            rope_q=None if fused_rope else RopeSpec(heads=c.num_heads, bf16_out=bf16, strided=True, **rope),
            rope_k=None if fused_rope else RopeSpec(heads=c.num_kv_heads, bf16_out=bf16, strided=True, **rope),
            # bf16: the backward's dq, dk and dv land in bf16, as the GEMMs and the bias's column sum read them
            rope_q_bwd=None if fused_rope else RopeSpec(heads=c.num_heads, inverse=True, strided=True,
                                                        bf16_out=bf16, **rope),
            rope_k_bwd=None if fused_rope else RopeSpec(heads=c.num_kv_heads, inverse=True, strided=True,
                                                        bf16_out=bf16, **rope),
            v_copy=None if fused_rope else CastSpec(dst=gemm_operand, strided=True),
            dv_copy=None if fused_rope else CastSpec(dst=gemm_operand, strided=True),
            attention=attention[0], attention_bwd_q=attention[1], attention_bwd_kv=attention[2],
            swiglu=None if bf16 else SwiGLUSpec(vec=swiglu_vec),
            swiglu_bwd=None if bf16 else SwiGLUBackwardSpec(vec=swiglu_vec),
            cross_entropy=CrossEntropySpec(vocab=c.vocab_size, ignore_index=ignore_index, dtype=gemm_operand,
                                           grad_dtype=gemm_operand, stats_block=stats_block),
            colsum=ColumnSumSpec(), colsum_chunks=ColumnSumSpec(row_groups=COLSUM_CHUNKS_GROUPS, finish=True),
            bias_sum=ColumnSumSpec(dtype=gemm_operand) if c.qkv_bias else None,
            bias_sum_chunks=ColumnSumSpec(row_groups=COLSUM_CHUNKS_GROUPS, finish=True, dtype=gemm_operand)
            if c.qkv_bias else None,
            parts_sum=PartsSumSpec(), grad_norm_partial=partial,
            grad_norm_final=GradNormFinalSpec(partials=partial.blocks),
            # bf16: the step on the matrices writes their bf16 copy too (no separate refresh pass)
            adamw_decay=AdamWSpec(beta1=adamw.beta1, beta2=adamw.beta2, eps=adamw.eps,
                                  weight_decay=adamw.weight_decay, bf16_copy=bf16),
            adamw_no_decay=AdamWSpec(beta1=adamw.beta1, beta2=adamw.beta2, eps=adamw.eps, weight_decay=0.0),
            to_bf16=CastSpec() if bf16 else None)

    def __post_init__(self) -> None:
        # the cross-entropy reads, tile for tile, the statistics the loss's LM head writes
        stats, head = self.cross_entropy.stats_block, self.head_logits
        if (head is None) != (stats == 0) or (head is not None and head.block_n != stats):
            raise ValueError(f"the loss's LM head ({self.head_logits}) and the cross-entropy's stats_block {stats} "
                             "disagree")
        loss_head = head if head is not None else self.head.forward  # ... and on how the logits are stored
        if loss_head.c_dtype is not self.cross_entropy.dtype:
            raise ValueError(f"the loss's LM head stores its logits in {loss_head.c_dtype.value}, the cross-entropy "
                             f"reads {self.cross_entropy.dtype.value}")
        # the SwiGLU and its backward run as their own kernels exactly where no GEMM makes them
        for kernel, gemm, flag in ((self.swiglu, self.gate_up.forward, "swiglu_act"),
                                   (self.swiglu_bwd, self.down.grad_input, "swiglu_grad"),
                                   (self.rope_q, self.qkv.forward, "rope_heads"),
                                   (self.rope_k, self.qkv.forward, "rope_heads"),
                                   (self.v_copy, self.qkv.forward, "rope_heads")):
            if (kernel is None) != bool(getattr(gemm, flag)):
                raise ValueError(f"{kernel} and the GEMM {gemm} disagree on who makes it ({flag})")
        for kernel in (self.rope_q_bwd, self.rope_k_bwd, self.dv_copy):  # their work, or the attention backward's
            for attention in (self.attention_bwd_q, self.attention_bwd_kv):
                if (kernel is None) != attention.qkv_rows:
                    raise ValueError(f"{kernel} and {attention} disagree on who writes the q/k/v gradient rows")
        if (self.rope_table is None) == bool(self.qkv.forward.rope_heads):  # the angles' table: the GEMM's RoPE's
            raise ValueError(f"{self.rope_table} and the GEMM {self.qkv.forward} disagree on the angles' table")

    @property
    def bf16(self) -> bool:
        """Whether these are bf16 precision's kernels (the GEMMs read bf16 copies of the weights)."""
        return self.to_bf16 is not None

    def linear(self, module: str) -> LinearKernels:
        """The kernels of the linear layer ``module`` (its HF name without ``.weight``)."""
        return getattr(self, LINEAR_KINDS[module.rsplit(".", 1)[-1]])

    def check_shapes(self, c: ModelConfig, tokens: int) -> None:
        """Refuse (ValueError, the GEMM's own message) a model whose linear layers the GEMM kernels
        cannot serve at ``tokens`` rows (their 16-byte copies need widths a multiple of 8 bf16 or
        ``vec`` f32 elements): what the plan would refuse at its first launch, said before any work."""
        h, q_dim, kv_dim, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        for name, lk, d_in, d_out in ((f"qkv_proj (q, k and v as one GEMM: {q_dim} + 2 x {kv_dim})", self.qkv, h,
                                       q_dim + 2 * kv_dim), ("o_proj", self.o, q_dim, h),
                                      (f"gate_up_proj (gate and up as one GEMM: 2 x intermediate_size {i})",
                                       self.gate_up, h, 2 * i),
                                      ("down_proj", self.down, i, h), ("lm_head", self.head, h, c.vocab_size)):
            try:
                for spec, m, n, k in lk.gemms(tokens, d_in, d_out):
                    spec.arguments(0, 0, 0, m, n, k, bias=0 if spec.bias else None,
                                   **({"gate_up": 0} if spec.swiglu_grad else {}),
                                   **({"act": 0} if spec.swiglu_act else {}),
                                   **({"rope": (0, 0, 0)} if spec.rope_heads else {}),
                                   **({"residual": 1 << 40} if spec.residual else {}))  # (apart from c = 0)
            except ValueError as e:
                raise ValueError(f"{name}, {d_in} -> {d_out}: {e}") from None
        for spec in (self.swiglu, self.swiglu_bwd):
            if spec is not None:
                spec.check(tokens, i)

    def specs(self) -> list[KernelSpec]:
        """Every spec, once: what the CUDA model pre-warms and then runs in strict mode. Deduplicated
        by the specs' canonical encoding, which is what their keys hash (specs compare and hash by
        it), so AdamW's decay and no-decay specs stay two when the decay is -0.0."""
        out: dict[KernelSpec, None] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out.update(dict.fromkeys(v.specs() if isinstance(v, LinearKernels) else [v] if v is not None else []))
        return list(out)
