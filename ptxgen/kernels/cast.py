"""Storage-type conversion: dst[i] = src[i] (f32 -> bf16 rounds to nearest even), e.g. the bf16
copies of weights and activations that the tensor-core GEMMs read. Reference: ``vecio.round_to``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..builder import KernelBuilder, T
from ..registry import register
from ..spec import KernelSpec
from ..vecio import DType, elementwise, elementwise_vec, flat_grid
from .common import check_block_size


@register
@dataclass(frozen=True)
class CastSpec(KernelSpec):
    """From the other storage type to ``dst``."""

    kind: ClassVar[str] = "cast"
    dst: DType = DType.BF16
    block_size: int = 256

    @property
    def src(self) -> DType:
        return DType.F32 if self.dst is DType.BF16 else DType.BF16

    def validate(self) -> None:
        check_block_size(self.block_size)

    def launch_dims(self, n: int) -> tuple[int, int]:
        return flat_grid(n, elementwise_vec(self.src, self.dst), self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("src", T.U64), ("dst", T.U64), ("n", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('dst',)

    def build(self, b: KernelBuilder) -> None:
        elementwise(b, self.block_size, {"src": self.src}, {"dst": self.dst}, lambda x: (x,))

    @classmethod
    def examples(cls) -> list["CastSpec"]:
        return [cls(), cls(dst=DType.F32), cls(block_size=512)]
