"""RMSNorm forward over rows: y = x * rsqrt(mean(x^2) + eps) * gamma (fp32).

One block per row; hidden size and eps are baked in. Each thread keeps its slice of the row in
registers (16-byte loads where the row allows), so x is read from device memory once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..builder import Addr, KernelBuilder, T
from ..reductions import block_allreduce
from ..registry import register
from ..spec import KernelSpec, SpecError
from .common import check_block_size, check_positive

MAX_VALUES_PER_THREAD = 64  # beyond this the row slice no longer fits in registers


@register
@dataclass(frozen=True)
class RMSNormSpec(KernelSpec):
    kind: ClassVar[str] = "rmsnorm"
    hidden: int
    eps: float
    block_size: int = 256
    save_rstd: bool = False  # also write rsqrt(mean(x^2) + eps) per row, for the backward

    def validate(self) -> None:
        check_positive("hidden", self.hidden)
        check_positive("eps", self.eps)
        check_block_size(self.block_size)
        per_thread = self.vectors_per_thread * self.vector_width
        if per_thread > MAX_VALUES_PER_THREAD:
            raise SpecError(f"hidden {self.hidden} needs {per_thread} values per thread at block_size "
                            f"{self.block_size} (max {MAX_VALUES_PER_THREAD}); raise block_size")

    @property
    def vector_width(self) -> int:
        """Elements per load: 4 (16 bytes) when rows stay 16-byte aligned, else 2 or 1."""
        return 4 if self.hidden % 4 == 0 else 2 if self.hidden % 2 == 0 else 1

    @property
    def vectors_per_thread(self) -> int:
        return math.ceil(self.hidden // self.vector_width / self.block_size)

    def launch_dims(self, rows: int) -> tuple[int, int]:
        """(grid, block) for ``rows`` rows: one block per row."""
        return rows, self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        names = ("x", "gamma", "y") + (("rstd",) if self.save_rstd else ())
        return tuple((n, T.U64) for n in names)

    def build(self, b: KernelBuilder) -> None:
        vec, block = self.vector_width, self.block_size
        nvec = self.hidden // vec
        x, gamma, y = (b.cvta_global(b.ld_param(n)) for n in ("x", "gamma", "y"))
        row, tid = b.special("%ctaid.x"), b.special("%tid.x")
        row_off = b.mul_wide(row, 4 * self.hidden)
        thread_off = b.mul_wide(tid, 4 * vec)
        x_t = b.add(b.add(x, row_off), thread_off)
        y_t = b.add(b.add(y, row_off), thread_off)
        g_t = b.add(gamma, thread_off)
        stride = 4 * vec * block

        # Only the last slice can run past the row end; it is predicated, the rest is not.
        guards = [b.setp("lt", tid, nvec - j * block) if (j + 1) * block > nvec else None
                  for j in range(self.vectors_per_thread)]
        xs = []
        sumsq = b.mov(0.0, T.F32)
        for j, guard in enumerate(guards):
            regs = [b.mov(0.0, T.F32) for _ in range(vec)] if guard is not None else None
            vals = b.ld("global", T.F32, Addr(x_t, j * stride), vec, out=regs, guard=guard)
            vals = (vals,) if vec == 1 else vals
            for v in vals:
                b.fma(v, v, sumsq, out=sumsq)
            xs.append(vals)

        total = block_allreduce(b, sumsq, "add", block, tid)
        rstd = b.fn("rsqrt", b.fma(total, 1.0 / self.hidden, self.eps))
        if self.save_rstd:
            rstd_ptr = b.cvta_global(b.ld_param("rstd"))
            first = b.setp("eq", tid, 0)
            b.st("global", Addr(b.add(rstd_ptr, b.mul_wide(row, 4))), rstd, guard=first)

        for j, (guard, vals) in enumerate(zip(guards, xs)):
            gs = b.ld("global", T.F32, Addr(g_t, j * stride), vec, nc=True, guard=guard)
            gs = (gs,) if vec == 1 else gs
            out = [b.mul(b.mul(v, rstd), g) for v, g in zip(vals, gs)]
            b.st("global", Addr(y_t, j * stride), out, guard=guard)

    @classmethod
    def examples(cls) -> list["RMSNormSpec"]:
        return [cls(hidden=896, eps=1e-6), cls(hidden=897, eps=1e-5, block_size=128),
                cls(hidden=4096, eps=1e-6, block_size=512, save_rstd=True),
                cls(hidden=64, eps=1e-6, block_size=32)]


def rmsnorm_reference(x: np.ndarray, gamma: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference: (y, rstd) for rows of ``x``."""
    x64 = np.asarray(x, dtype=np.float64)
    rstd = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1) + eps)
    return x64 * rstd[..., None] * np.asarray(gamma, dtype=np.float64), rstd
