"""Bias add broadcast over rows: y[r, c] = x[r, c] + bias[c] (may run in place).

Its backward is a column sum of dy (ColumnSumSpec), the Q/K/V bias gradients of Qwen2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..builder import Addr, KernelBuilder, T
from ..registry import register
from ..spec import KernelSpec
from ..vecio import DType, flat_elementwise, flat_grid, load_f32, offset, store_f32, vector_width
from .common import MAX_ROW_ELEMENTS, check_at_most, check_block_size, check_positive


@register
@dataclass(frozen=True)
class BiasAddSpec(KernelSpec):
    kind: ClassVar[str] = "bias_add"
    cols: int
    dtype: DType = DType.F32
    block_size: int = 256

    def validate(self) -> None:
        check_positive("cols", self.cols)
        check_at_most("cols", self.cols, MAX_ROW_ELEMENTS, "32-bit index math")
        check_block_size(self.block_size)

    @property
    def vec(self) -> int:
        return vector_width(self.cols, self.dtype)  # divides cols: a vector never crosses a row

    def launch_dims(self, rows: int) -> tuple[int, int]:
        return flat_grid(rows * self.cols, self.vec, self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("x", T.U64), ("bias", T.U64), ("y", T.U64), ("n_rows", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('y',)

    def build(self, b: KernelBuilder) -> None:
        x, bias, y = (b.cvta_global(b.ld_param(n)) for n in ("x", "bias", "y"))
        n = b.mul(b.ld_param("n_rows"), self.cols)
        size = self.dtype.size

        def body(e, width, guard):
            col = b.rem(e, self.cols)
            xs = load_f32(b, self.dtype, Addr(offset(b, x, e, size)), width, guard=guard)
            bs = load_f32(b, DType.F32, Addr(offset(b, bias, col, 4)), width, guard=guard, nc=True)
            store_f32(b, self.dtype, Addr(offset(b, y, e, size)), [b.add(p, q) for p, q in zip(xs, bs)],
                      guard=guard)

        flat_elementwise(b, n, self.vec, self.block_size, body)

    @classmethod
    def examples(cls) -> list["BiasAddSpec"]:
        return [cls(cols=896), cls(cols=128, dtype=DType.BF16), cls(cols=7, block_size=64)]
