"""RMSNorm over rows: y = h * rsqrt(mean(h^2) + eps) * gamma, h = x (+ residual), and its backward.

A block per row, or a warp (``warp_per_row``); hidden size and eps are baked in. Each thread keeps
its slice of the row in registers (16-byte accesses where the row allows), so each input is read
from memory once.
Storage f32 or bf16, arithmetic f32; gamma is f32 (master weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np

from .. import exact
from ..builder import Addr, KernelBuilder, T
from ..reductions import block_allreduce, warp_allreduce
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, RowSlices, offset, vector_width
from .common import MAX_LOOP_BOUND, check_at_most, check_block_size, check_f32, check_positive

MAX_VALUES_PER_THREAD = 64  # beyond this the row slice no longer fits in registers


def _check_row_fit(hidden: int, dtype: DType, block_size: int) -> None:
    per_thread = RowSlices.values_per_thread(hidden, vector_width(hidden, dtype), block_size)
    if per_thread > MAX_VALUES_PER_THREAD:
        raise SpecError(f"hidden {hidden} needs {per_thread} values per thread at block_size "
                        f"{block_size} (max {MAX_VALUES_PER_THREAD}); raise block_size")


@register
@dataclass(frozen=True)
class RMSNormSpec(KernelSpec):
    kind: ClassVar[str] = "rmsnorm"
    hidden: int
    eps: float
    dtype: DType = DType.F32
    residual: bool = False   # h = x + residual, written to h_out, normalized (the model adds in its GEMMs)
    save_rstd: bool = False  # also write rsqrt(mean(h^2) + eps) per row, for the backward
    warp_per_row: bool = False  # a warp per row (shuffles only, block_size/32 rows a block), else a block
    block_size: int = 256
    bf16_out: bool = False  # y in bf16 whatever the storage of x: a GEMM's operand, written as it reads it

    @property
    def row_threads(self) -> int:
        return 32 if self.warp_per_row else self.block_size

    def validate(self) -> None:
        check_positive("hidden", self.hidden)
        check_f32("eps", self.eps, positive=True)
        check_block_size(self.block_size)
        _check_row_fit(self.hidden, self.dtype, self.row_threads)

    def launch_dims(self, rows: int) -> tuple[int, int]:
        """(grid, block) for ``rows`` rows."""
        return max(1, -(-rows // (self.block_size // self.row_threads))), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        names = (("x",) + (("residual",) if self.residual else ()) + ("gamma", "y") +
                 (("h_out",) if self.residual else ()) + (("rstd",) if self.save_rstd else ()))
        return tuple((n, T.U64) for n in names) + (("n_rows", T.U32),)

    def outputs(self) -> tuple[str, ...]:
        return ("y",) + (("h_out",) if self.residual else ()) + (("rstd",) if self.save_rstd else ())

    def build(self, b: KernelBuilder) -> None:
        dt, size = self.dtype, self.dtype.size
        ptr = {n: b.cvta_global(b.ld_param(n)) for n, t in self.params() if t is T.U64}
        done = b.new_label("done")
        if self.warp_per_row:
            tid = b.and_(b.special("%tid.x"), 31)
            row = b.mad(b.special("%ctaid.x"), self.block_size // 32, b.shr(b.special("%tid.x"), 5))
        else:
            row, tid = b.special("%ctaid.x"), b.special("%tid.x")
        b.bra(done, guard=b.setp("ge", row, b.ld_param("n_rows")))  # uniform per warp / block
        rows = RowSlices(b, self.hidden, vector_width(self.hidden, dt), self.row_threads, tid)
        hs = rows.load(b, dt, rows.base(b, ptr["x"], row, size))
        if self.residual:
            res = rows.load(b, dt, rows.base(b, ptr["residual"], row, size))
            hs = [[b.add(h, r) for h, r in zip(hv, rv)] for hv, rv in zip(hs, res)]
            if dt is DType.BF16:  # normalize the h that is stored, as the backward will see it
                hs = [[b.cvt(T.F32, b.cvt(T.BF16, h), src=T.BF16) for h in hv] for hv in hs]
            rows.store(b, dt, rows.base(b, ptr["h_out"], row, size), hs)

        sumsq = b.mov(0.0, T.F32)
        for h in (h for hv in hs for h in hv):
            b.fma(h, h, sumsq, out=sumsq)
        total = (warp_allreduce(b, sumsq, "add") if self.warp_per_row
                 else block_allreduce(b, sumsq, "add", self.block_size, tid))
        rstd = b.fn("rsqrt", b.fma(total, exact.f32(Fraction(1, self.hidden)), self.eps))
        if self.save_rstd:
            b.st("global", Addr(offset(b, ptr["rstd"], row, 4)), rstd, guard=b.setp("eq", tid, 0))

        gs = rows.load(b, DType.F32, rows.base(b, ptr["gamma"], None, 4), nc=True)
        ys = [[b.mul(b.mul(h, rstd), g) for h, g in zip(hv, gv)] for hv, gv in zip(hs, gs)]
        out = DType.BF16 if self.bf16_out else dt
        rows.store(b, out, rows.base(b, ptr["y"], row, out.size), ys)
        b.place(done)

    @classmethod
    def examples(cls) -> list["RMSNormSpec"]:
        return [cls(hidden=896, eps=1e-6), cls(hidden=897, eps=1e-5, block_size=128),
                cls(hidden=4096, eps=1e-6, block_size=512, save_rstd=True),
                cls(hidden=64, eps=1e-6, block_size=32),
                cls(hidden=896, eps=1e-6, dtype=DType.BF16, residual=True, save_rstd=True),
                cls(hidden=896, eps=1e-6, warp_per_row=True, save_rstd=True),
                cls(hidden=896, eps=1e-6, residual=True, save_rstd=True, bf16_out=True)]


@register
@dataclass(frozen=True)
class RMSNormBackwardSpec(KernelSpec):
    """dx for each row, and dgamma partial sums per block of ``rows_per_block`` rows (f32).

    dgamma is finished by a column sum over the partials (ColumnSumSpec): fixed order, no atomics,
    so it is deterministic run to run. With ``residual``, dx also adds the gradient that reached
    the norm's input along the residual stream (``dres``; may be the same buffer as dx).
    """

    kind: ClassVar[str] = "rmsnorm_bwd"
    hidden: int
    residual: bool = False
    rows_per_block: int = 16
    block_size: int = 256
    bf16_copy: bool = False  # also write dx in bf16 (dx16): the next GEMMs' operand, as a cast would
    dy_dtype: DType = DType.F32  # dy as the GEMM before stores it

    def validate(self) -> None:
        check_positive("hidden", self.hidden)
        if self.dy_dtype not in (DType.F32, DType.BF16):
            raise SpecError(f"rmsnorm_bwd: dy_dtype must be f32 or bf16, got {self.dy_dtype.value}")
        check_positive("rows_per_block", self.rows_per_block)
        check_at_most("rows_per_block", self.rows_per_block, MAX_LOOP_BOUND, "a baked row count")
        check_block_size(self.block_size)
        _check_row_fit(self.hidden, DType.F32, self.block_size)

    def launch_dims(self, rows: int) -> tuple[int, int]:
        return self.partial_rows(rows), self.block_size

    def partial_rows(self, rows: int) -> int:
        """Rows of the dgamma partials buffer [partial_rows, hidden] for ``rows`` input rows."""
        return max(1, -(-rows // self.rows_per_block))

    def params(self) -> tuple[tuple[str, T], ...]:
        names = (("x", "gamma", "dy", "rstd") + (("dres",) if self.residual else ()) + ("dx",) +
                 (("dx16",) if self.bf16_copy else ()) + ("dgamma_partial",))
        return tuple((n, T.U64) for n in names) + (("n_rows", T.U32),)

    def outputs(self) -> tuple[str, ...]:
        return ("dx",) + (("dx16",) if self.bf16_copy else ()) + ("dgamma_partial",)

    def build(self, b: KernelBuilder) -> None:
        ptr = {n: b.cvta_global(b.ld_param(n)) for n, t in self.params() if t is T.U64}
        n_rows = b.ld_param("n_rows")
        chunk, tid = b.special("%ctaid.x"), b.special("%tid.x")
        rows = RowSlices(b, self.hidden, vector_width(self.hidden, DType.F32), self.block_size, tid)
        gs = rows.load(b, DType.F32, rows.base(b, ptr["gamma"], None, 4), nc=True)
        acc = [[b.mov(0.0, T.F32) for _ in gv] for gv in gs]
        first = b.mul(chunk, self.rows_per_block)
        count = b.min(b.sub(n_rows, first), self.rows_per_block)
        with b.loop(count, "row") as i:
            row = b.add(first, i)
            xs = rows.load(b, DType.F32, rows.base(b, ptr["x"], row, 4))
            dys = rows.load(b, self.dy_dtype, rows.base(b, ptr["dy"], row, self.dy_dtype.size))
            r = b.ld("global", T.F32, Addr(offset(b, ptr["rstd"], row, 4)))
            gdy = [[b.mul(g, d) for g, d in zip(gv, dv)] for gv, dv in zip(gs, dys)]
            dot = b.mov(0.0, T.F32)
            for gd, x in zip((v for gv in gdy for v in gv), (v for xv in xs for v in xv)):
                b.fma(gd, x, dot, out=dot)
            dot = block_allreduce(b, dot, "add", self.block_size, tid, in_loop=True)
            # dx = r*g*dy - x * r^3 * dot / hidden
            c = b.mul(b.mul(b.mul(r, r), r), b.mul(dot, exact.f32(Fraction(1, self.hidden))))
            dxs = [[b.fma(b.neg(x), c, b.mul(r, gd)) for x, gd in zip(xv, gv)] for xv, gv in zip(xs, gdy)]
            if self.residual:
                dres = rows.load(b, DType.F32, rows.base(b, ptr["dres"], row, 4))
                dxs = [[b.add(g, d) for g, d in zip(gv, dv)] for gv, dv in zip(dxs, dres)]
            rows.store(b, DType.F32, rows.base(b, ptr["dx"], row, 4), dxs)
            if self.bf16_copy:
                rows.store(b, DType.BF16, rows.base(b, ptr["dx16"], row, 2), dxs)
            for av, dv, xv in zip(acc, dys, xs):
                for a, d, x in zip(av, dv, xv):
                    b.fma(b.mul(d, x), r, a, out=a)
        rows.store(b, DType.F32, rows.base(b, ptr["dgamma_partial"], chunk, 4), acc)

    @classmethod
    def examples(cls) -> list["RMSNormBackwardSpec"]:
        return [cls(hidden=896), cls(hidden=897, rows_per_block=3, block_size=128, residual=True),
                cls(hidden=4864, rows_per_block=8, block_size=512),
                cls(hidden=896, residual=True, bf16_copy=True),
                cls(hidden=896, residual=True, bf16_copy=True, dy_dtype=DType.BF16)]


def rmsnorm_reference(x: np.ndarray, gamma: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference: (y, rstd) for rows of ``x``."""
    x64 = np.asarray(x, dtype=np.float64)
    rstd = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1) + eps)
    return x64 * rstd[..., None] * np.asarray(gamma, dtype=np.float64), rstd


def rmsnorm_backward_reference(x: np.ndarray, gamma: np.ndarray, dy: np.ndarray,
                               eps: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference gradients (dx, dgamma) of sum(y * dy)."""
    x64, g64, dy64 = (np.asarray(a, dtype=np.float64) for a in (x, gamma, dy))
    _, rstd = rmsnorm_reference(x64, g64, eps)
    r = rstd[:, None]
    dot = np.sum(g64 * dy64 * x64, axis=-1, keepdims=True)
    dx = r * g64 * dy64 - x64 * r ** 3 * dot / x64.shape[-1]
    return dx, np.sum(dy64 * x64 * r, axis=0)
