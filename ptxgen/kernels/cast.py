"""Storage-type conversion: dst[i] = src[i] (f32 -> bf16 rounds to nearest even), e.g. the bf16
copies of weights and activations that the tensor-core GEMMs read; with ``strided``, rows of
``width`` elements between row strides of their own (src and dst of one type: a copy), e.g. v out
of the fused q/k/v projection's rows. Reference: ``vecio.round_to``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..builder import KernelBuilder, Reg, T
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, elementwise, elementwise_vec, flat_grid
from .common import check_block_size


@register
@dataclass(frozen=True)
class CastSpec(KernelSpec):
    """From ``src`` to ``dst`` storage."""

    kind: ClassVar[str] = "cast"
    src: DType = DType.F32
    dst: DType = DType.BF16
    block_size: int = 256
    strided: bool = False  # [rows, width] elements, rows src_stride / dst_stride elements apart (runtime)

    def validate(self) -> None:
        check_block_size(self.block_size)
        if self.src is self.dst and not self.strided:
            raise SpecError("cast: src and dst of one type is a copy, which only a strided cast makes")

    @property
    def vec(self) -> int:
        return elementwise_vec(self.src, self.dst)

    def launch_dims(self, n: int) -> tuple[int, int]:
        return flat_grid(n, self.vec, self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        strides = (("width", T.U32), ("src_stride", T.U32), ("dst_stride", T.U32)) if self.strided else ()
        return (("src", T.U64), ("dst", T.U64), ("n", T.U32)) + strides

    def outputs(self) -> tuple[str, ...]:
        return ('dst',)

    def arguments(self, src: int, dst: int, rows: int, width: int, src_stride: int, dst_stride: int
                  ) -> tuple[int, ...]:
        """A strided cast's arguments: ``rows`` x ``width`` elements."""
        if not self.strided:
            raise ValueError("cast: rows and strides are a strided cast's arguments")
        if width < 1 or any(x % self.vec for x in (width, src_stride, dst_stride)) or min(src_stride, dst_stride) < width:
            raise ValueError(f"cast: width and strides must be positive multiples of {self.vec} (a thread's vector "
                             f"stays in one row, aligned), strides >= width; got width {width}, strides "
                             f"{src_stride}, {dst_stride}")
        if rows * max(src_stride, dst_stride) >= 2**32:
            raise ValueError(f"cast: {rows} rows of {max(src_stride, dst_stride)} overflow the kernel's 32-bit index")
        return src, dst, rows * width, width, src_stride, dst_stride

    def build(self, b: KernelBuilder) -> None:
        index = None
        if self.strided:
            width = b.ld_param("width")
            stride = {n: b.ld_param(n + "_stride") for n in ("src", "dst")}

            def index(name: str, e: Reg) -> Reg:
                row = b.div(e, width)
                return b.mad(row, stride[name], b.sub(e, b.mul(row, width)))
        elementwise(b, self.block_size, {"src": self.src}, {"dst": self.dst}, lambda x: (x,), index=index)

    @classmethod
    def examples(cls) -> list["CastSpec"]:
        return [cls(), cls(src=DType.BF16, dst=DType.F32), cls(block_size=512), cls(strided=True),
                cls(dst=DType.F32, strided=True)]
