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
    bf16_copy: bool = False  # dst (f32) also in bf16, into dst16 at dst's indices: a gradient as the GEMMs read it

    def validate(self) -> None:
        check_block_size(self.block_size)
        if self.src is self.dst and not self.strided:
            raise SpecError("cast: src and dst of one type is a copy, which only a strided cast makes")
        if self.bf16_copy and self.dst is not DType.F32:
            raise SpecError("cast: bf16_copy is a bf16 copy of an f32 dst")

    @property
    def vec(self) -> int:
        return elementwise_vec(self.src, self.dst, *((DType.BF16,) if self.bf16_copy else ()))

    def launch_dims(self, n: int) -> tuple[int, int]:
        return flat_grid(n, self.vec, self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        strides = (("width", T.U32), ("src_stride", T.U32), ("dst_stride", T.U32)) if self.strided else ()
        copy = (("dst16", T.U64),) if self.bf16_copy else ()
        return (("src", T.U64), ("dst", T.U64)) + copy + (("n", T.U32),) + strides

    def outputs(self) -> tuple[str, ...]:
        return ('dst', 'dst16') if self.bf16_copy else ('dst',)

    def arguments(self, src: int, dst: int, rows: int, width: int, src_stride: int, dst_stride: int,
                  dst16: int | None = None) -> tuple[int, ...]:
        """A strided cast's arguments: ``rows`` x ``width`` elements (``dst16``: a bf16_copy's)."""
        if (dst16 is not None) != self.bf16_copy:
            raise ValueError(f"cast: dst16 {'needs' if dst16 is not None else 'is required by'} bf16_copy")
        if not self.strided:
            raise ValueError("cast: rows and strides are a strided cast's arguments")
        if width < 1 or any(x % self.vec for x in (width, src_stride, dst_stride)) or min(src_stride, dst_stride) < width:
            raise ValueError(f"cast: width and strides must be positive multiples of {self.vec} (a thread's vector "
                             f"stays in one row, aligned), strides >= width; got width {width}, strides "
                             f"{src_stride}, {dst_stride}")
        if rows * max(src_stride, dst_stride) >= 2**32:
            raise ValueError(f"cast: {rows} rows of {max(src_stride, dst_stride)} overflow the kernel's 32-bit index")
        return (src, dst) + ((dst16,) if dst16 is not None else ()) + (rows * width, width, src_stride, dst_stride)

    def build(self, b: KernelBuilder) -> None:
        index = None
        if self.strided:
            width = b.ld_param("width")
            stride = {n: b.ld_param(n + "_stride") for n in ("src", "dst")}

            def index(name: str, e: Reg) -> Reg:
                row = b.div(e, width)
                return b.mad(row, stride["src" if name == "src" else "dst"], b.sub(e, b.mul(row, width)))
        outputs = {"dst": self.dst, **({"dst16": DType.BF16} if self.bf16_copy else {})}
        elementwise(b, self.block_size, {"src": self.src}, outputs, lambda x: (x,) * len(outputs), index=index,
                    vec=self.vec)

    @classmethod
    def examples(cls) -> list["CastSpec"]:
        return [cls(), cls(src=DType.BF16, dst=DType.F32), cls(block_size=512), cls(strided=True),
                cls(dst=DType.F32, strided=True), cls(dst=DType.F32, strided=True, bf16_copy=True)]
