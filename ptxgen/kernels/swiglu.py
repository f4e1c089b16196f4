"""SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g), and its backward (f32 arithmetic; gate
and up read, and the outputs written, in f32 or bf16).

sigmoid(g) = 1 / (1 + 2^(-g * log2 e)) with ex2.approx and a correctly rounded reciprocal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..builder import KernelBuilder, Reg, T
from ..exact import LOG2E_F32
from ..registry import register
from ..spec import KernelSpec
from ..vecio import DType, elementwise, elementwise_vec, flat_grid
from .common import check_block_size



def sigmoid(b: KernelBuilder, g: Reg) -> Reg:
    return b.fn("rcp", b.add(b.fn("ex2", b.mul(g, -LOG2E_F32)), 1.0), "rn")


@register
@dataclass(frozen=True)
class SwiGLUSpec(KernelSpec):
    kind: ClassVar[str] = "swiglu"
    dtype: DType = DType.F32      # gate and up
    out_dtype: DType = DType.F32  # out (bf16 from f32: the down projection's bf16 operand, no cast)
    block_size: int = 256

    def validate(self) -> None:
        check_block_size(self.block_size)

    def launch_dims(self, n: int) -> tuple[int, int]:
        return flat_grid(n, elementwise_vec(self.dtype, self.out_dtype), self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("gate", T.U64), ("up", T.U64), ("out", T.U64), ("n", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('out',)

    def build(self, b: KernelBuilder) -> None:
        elementwise(b, self.block_size, {"gate": self.dtype, "up": self.dtype}, {"out": self.out_dtype},
                    lambda g, u: (b.mul(b.mul(g, sigmoid(b, g)), u),))

    @classmethod
    def examples(cls) -> list["SwiGLUSpec"]:
        return [cls(), cls(dtype=DType.BF16, out_dtype=DType.BF16), cls(out_dtype=DType.BF16), cls(block_size=128)]


@register
@dataclass(frozen=True)
class SwiGLUBackwardSpec(KernelSpec):
    """dgate = dout * up * s * (1 + g * (1 - s)), dup = dout * g * s, with s = sigmoid(g)."""

    kind: ClassVar[str] = "swiglu_bwd"
    dtype: DType = DType.F32      # gate and up, as the forward read them (dout is f32)
    out_dtype: DType = DType.F32  # dgate and dup (bf16: the GEMMs' operands, no cast)
    block_size: int = 256

    def validate(self) -> None:
        check_block_size(self.block_size)

    def launch_dims(self, n: int) -> tuple[int, int]:
        return flat_grid(n, elementwise_vec(self.dtype, DType.F32, self.out_dtype), self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("gate", T.U64), ("up", T.U64), ("dout", T.U64), ("dgate", T.U64), ("dup", T.U64), ("n", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('dgate', 'dup')

    def build(self, b: KernelBuilder) -> None:
        def grads(g, u, d):
            s = sigmoid(b, g)
            silu = b.mul(g, s)
            dsilu = b.mul(s, b.fma(g, b.sub(1.0, s, T.F32), 1.0))
            return b.mul(b.mul(d, u), dsilu), b.mul(d, silu)

        out = self.out_dtype
        elementwise(b, self.block_size, {"gate": self.dtype, "up": self.dtype, "dout": DType.F32},
                    {"dgate": out, "dup": out}, grads)

    @classmethod
    def examples(cls) -> list["SwiGLUBackwardSpec"]:
        return [cls(), cls(out_dtype=DType.BF16), cls(dtype=DType.BF16, out_dtype=DType.BF16), cls(block_size=512)]


def swiglu_reference(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = np.asarray(gate, dtype=np.float64)
    return g / (1 + np.exp(-g)) * np.asarray(up, dtype=np.float64)


def swiglu_backward_reference(gate: np.ndarray, up: np.ndarray, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, u, d = (np.asarray(a, dtype=np.float64) for a in (gate, up, dout))
    s = 1 / (1 + np.exp(-g))
    return d * u * s * (1 + g * (1 - s)), d * g * s
