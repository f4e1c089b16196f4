"""Softmax cross-entropy fused: per-row loss and dlogits over a [rows, vocab] logits matrix.

One block per row. Pass 1 keeps a running (max, sum of exp) per thread (online softmax), then
block-reduces them; pass 2 writes dlogits = (softmax - onehot(target)) * grad_scale. Rows whose
target is ``ignore_index`` get loss 0 and zero gradient. ``grad_scale`` (e.g. 1 / valid rows) is
an argument; vocab and ignore_index are baked in. Targets are checked on the host.

With ``stats_block`` the logits' GEMM has made pass 1's partial results already (gemm_wgmma's
``row_stats``: per ``stats_block`` columns of each row, their (max, sum of exp(x - max)) as
[column tiles][rows] f32 pairs, rows = the launch's grid, one block a row: the GEMM's m); the block
combines those instead of reading the logits twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..builder import Addr, KernelBuilder, T
from ..exact import LN2_F32, LOG2E_F32
from ..fastmath import exp2
from ..reductions import block_allreduce
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, load_f32, offset, row_sweep, store_f32, vector_width
from .common import MAX_ROW_ELEMENTS, check_at_most, check_block_size, check_positive

UNROLL = 4


@register
@dataclass(frozen=True)
class CrossEntropySpec(KernelSpec):
    kind: ClassVar[str] = "cross_entropy"
    vocab: int
    ignore_index: int = -100
    dtype: DType = DType.F32       # storage of logits
    grad_dtype: DType = DType.F32  # storage of dlogits (bf16: the LM head's GEMM operand, no cast)
    block_size: int = 1024
    stats_block: int = 0  # > 0: pass 1's (max, sum of exp) per this many columns come made (``stats``)

    def validate(self) -> None:
        check_positive("vocab", self.vocab)
        if self.stats_block < 0 or self.stats_block & (self.stats_block - 1):
            raise SpecError(f"stats_block must be 0 or a power of two, got {self.stats_block}")
        check_at_most("vocab", self.vocab, MAX_ROW_ELEMENTS, "32-bit index math")
        if not -2**31 <= self.ignore_index < 2**31:
            raise SpecError(f"ignore_index must fit the int32 targets, got {self.ignore_index}")
        check_block_size(self.block_size)

    def launch_dims(self, rows: int) -> tuple[int, int]:
        return rows, self.block_size

    @property
    def stats_tiles(self) -> int:
        """The column tiles whose statistics a row has (``stats_block``)."""
        return -(-self.vocab // self.stats_block) if self.stats_block else 0

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("logits", T.U64), ("targets", T.U64), ("loss", T.U64), ("dlogits", T.U64)) + (
            (("stats", T.U64),) if self.stats_block else ()) + (("grad_scale", T.F32),)

    def outputs(self) -> tuple[str, ...]:
        return ('loss', 'dlogits')

    def build(self, b: KernelBuilder) -> None:
        dt, size, vec = self.dtype, self.dtype.size, vector_width(self.vocab, self.dtype)
        logits, targets, loss, dlogits = (b.cvta_global(b.ld_param(n))
                                          for n in ("logits", "targets", "loss", "dlogits"))
        grad_scale = b.ld_param("grad_scale")
        row, tid = b.special("%ctaid.x"), b.special("%tid.x")
        row_in = offset(b, logits, row, self.vocab * size)
        row_out = offset(b, dlogits, row, self.vocab * self.grad_dtype.size)

        def exp(v):  # e^v as 2^(v log2 e)
            return exp2(b, b.mul(v, LOG2E_F32))

        m, s = b.mov(float("-inf"), T.F32), b.mov(0.0, T.F32)

        def accumulate(col, guard):
            vals = load_f32(b, dt, Addr(offset(b, row_in, col, size)), vec, guard=guard)
            if guard is not None:  # lanes past the row end must not count
                vals = [b.selp(v, float("-inf"), guard) for v in vals]
            local = vals[0]
            for v in vals[1:]:
                local = b.max(local, v)
            new_m = b.max(m, local)
            # fully masked slices keep m = -inf: exp(-inf - -inf) would be NaN, so scale by 0 instead
            total = b.selp(0.0, b.mul(s, exp(b.sub(m, new_m))), b.setp("eq", new_m, float("-inf")), T.F32)
            for v in vals:
                total = b.add(total, exp(b.sub(v, new_m)))
            b.mov(total, out=s)
            b.mov(new_m, out=m)

        if self.stats_block:  # the GEMM's pairs of this row: tile t at stats[t][row], rows = the grid
            stats, rows = b.cvta_global(b.ld_param("stats")), b.special("%nctaid.x")
            for i in range(-(-self.stats_tiles // self.block_size)):
                t = b.add(tid, i * self.block_size)
                ok = b.setp("lt", t, self.stats_tiles)
                pair = b.ld("global", T.F32, Addr(b.add(stats, b.mul_wide(b.mad(t, rows, row), 8))), 2, guard=ok,
                            out=[b.mov(float("-inf"), T.F32), b.mov(0.0, T.F32)])
                new_m = b.max(m, pair[0])
                empty = b.setp("eq", new_m, float("-inf"))  # as above: no NaN from -inf - -inf
                total = b.add(b.mul(s, exp(b.sub(m, new_m))), b.mul(pair[1], exp(b.sub(pair[0], new_m))))
                b.mov(b.selp(0.0, total, empty, T.F32), out=s)
                b.mov(new_m, out=m)
        else:
            row_sweep(b, self.vocab, vec, self.block_size, tid, UNROLL, accumulate)
        row_max = block_allreduce(b, m, "max", self.block_size, tid)
        scaled = b.selp(0.0, b.mul(s, exp(b.sub(m, row_max))), b.setp("eq", m, float("-inf")), T.F32)
        row_sum = block_allreduce(b, scaled, "add", self.block_size, tid)

        target = b.ld("global", T.S32, Addr(offset(b, targets, row, 4)), nc=True)
        ignored = b.setp("eq", target, self.ignore_index)
        target_logit = load_f32(b, dt, Addr(offset(b, row_in, target, size)), 1, guard=~ignored)[0]
        row_loss = b.sub(b.fma(b.fn("lg2", row_sum), LN2_F32, row_max), target_logit)
        b.st("global", Addr(offset(b, loss, row, 4)), b.selp(0.0, row_loss, ignored, T.F32),
             guard=b.setp("eq", tid, 0))

        scale = b.selp(0.0, grad_scale, ignored, T.F32)
        inv_sum = b.fn("rcp", row_sum, "rn")

        def gradient(col, guard):
            vals = load_f32(b, dt, Addr(offset(b, row_in, col, size)), vec, guard=guard)
            grads = []
            for k, v in enumerate(vals):
                p = b.mul(exp(b.sub(v, row_max)), inv_sum)
                is_target = b.setp("eq", b.add(col, k), target)
                grads.append(b.mul(b.sub(p, b.selp(1.0, 0.0, is_target, T.F32)), scale))
            store_f32(b, self.grad_dtype, Addr(offset(b, row_out, col, self.grad_dtype.size)), grads, guard=guard)

        row_sweep(b, self.vocab, vec, self.block_size, tid, UNROLL, gradient)

    @classmethod
    def examples(cls) -> list["CrossEntropySpec"]:
        return [cls(vocab=151936), cls(vocab=256, block_size=128), cls(vocab=1001, ignore_index=0),
                cls(vocab=151936, dtype=DType.BF16, grad_dtype=DType.BF16), cls(vocab=151936, grad_dtype=DType.BF16),
                cls(vocab=151936, grad_dtype=DType.BF16, stats_block=128)]


def row_stats_reference(logits: np.ndarray, block: int) -> np.ndarray:
    """float64 [column tiles][rows][2]: each ``block`` columns' (max, sum of exp(x - max)) of every
    row (the last tile's columns only up to the row's end): what gemm_wgmma's ``row_stats`` writes
    and ``stats_block`` reads."""
    x = np.asarray(logits, dtype=np.float64)
    tiles = [x[:, t:t + block] for t in range(0, x.shape[1], block)]
    return np.stack([np.stack([c.max(1), np.exp(c - c.max(1, keepdims=True)).sum(1)], -1) for c in tiles])


def cross_entropy_reference(logits: np.ndarray, targets: np.ndarray, ignore_index: int,
                            grad_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 (loss per row, dlogits) with dlogits = (softmax - onehot) * grad_scale."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1))
    t = np.asarray(targets)
    valid = t != ignore_index
    safe = np.where(valid, t, 0)
    rows = np.arange(len(t))
    loss = np.where(valid, logsumexp - z[rows, safe], 0.0)
    grad = np.exp(z - logsumexp[:, None])
    grad[rows[valid], safe[valid]] -= 1.0
    return loss, grad * np.where(valid, grad_scale, 0.0)[:, None]
