"""SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g), and its backward (f32 arithmetic; gate
and up read, and the outputs written, in f32 or bf16).

Gate and up are the two halves of each row of one [rows, 2 * width] tensor: the output of the gate
and up projections as one GEMM (their weights are adjacent, [gate; up]); the backward writes dgate
and dup so too, the operand of that GEMM's backward. ``width`` is a runtime argument, a multiple of
the vector (16 bytes, or ``vec`` elements where the width asks for fewer) so that a thread's
elements stay in one row.

sigmoid(g) = 1 / (1 + 2^(-g * log2 e)) with fastmath's ex2.approx.ftz and rcp.approx.ftz (within 2
and 1 ulp; 0 at g < -87): rcp.rn's rarely taken slow path is a subroutine call, which made
both kernels ~12% slower on the H200.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from ..builder import KernelBuilder, Reg, T
from ..exact import LOG2E_F32
from ..fastmath import exp2, reciprocal
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, elementwise, elementwise_vec, flat_grid
from .common import check_block_size


def sigmoid(b: KernelBuilder, g: Reg) -> Reg:
    return reciprocal(b, b.add(exp2(b, b.mul(g, -LOG2E_F32)), 1.0))


def swiglu_act(b: KernelBuilder, g: Reg, u: Reg) -> Reg:
    """silu(g) * u of one element (f32): the forward's arithmetic, wherever it runs (this kernel,
    or the epilogue of the GEMM that makes gate and up)."""
    return b.mul(b.mul(g, sigmoid(b, g)), u)


def swiglu_grads(b: KernelBuilder, g: Reg, u: Reg, d: Reg) -> tuple[Reg, Reg]:
    """(dgate, dup) of one element from its gate, up and output gradient (f32): the backward's
    arithmetic, wherever it runs (this kernel, or a GEMM's epilogue that makes dout)."""
    s = sigmoid(b, g)
    silu = b.mul(g, s)
    dsilu = b.mul(s, b.fma(g, b.sub(1.0, s, T.F32), 1.0))
    return b.mul(b.mul(d, u), dsilu), b.mul(d, silu)


def _halves(b: KernelBuilder, pairs: dict[str, tuple[DType, tuple[str, str]]]
            ) -> tuple[dict[str, Reg], Callable[[str, Reg], Reg]]:
    """Base pointers of each paired tensor's halves (``pairs``: pointer param -> (dtype, the two
    halves' names)) and the index of flat element e of a [rows, width] half: e + (e / width) * width."""
    width = b.ld_param("width")
    pointers = {}
    for param, (dtype, (first, second)) in pairs.items():
        base = b.cvta_global(b.ld_param(param))
        pointers[first], pointers[second] = base, b.add(base, b.mul_wide(width, dtype.size))
    halves = set(pointers)
    return pointers, lambda name, e: b.mad(b.div(e, width), width, e) if name in halves else e


class _PairedSpec(KernelSpec):
    """Launch and argument checks shared by the forward and the backward."""

    dtype: DType
    out_dtype: DType
    block_size: int
    vec: int  # elements per thread; 0: 16 bytes of the narrowest type

    def validate(self) -> None:
        check_block_size(self.block_size)
        widest = elementwise_vec(self.dtype, DType.F32, self.out_dtype)
        if self.vec < 0 or self.vec and widest % self.vec:
            raise SpecError(f"{self.kind}: vec must be 0 (16 bytes) or divide {widest}, got {self.vec}")

    def elements(self) -> int:
        """Elements per thread."""
        return self.vec or elementwise_vec(self.dtype, DType.F32, self.out_dtype)

    def launch_dims(self, rows: int, width: int) -> tuple[int, int]:
        return flat_grid(rows * width, self.elements(), self.block_size), self.block_size

    def check(self, rows: int, width: int) -> None:
        """A thread's vector stays in one row; the paired tensor's index (up to 2 x rows x width) fits u32."""
        if width < 1 or width % self.elements():
            raise ValueError(f"{self.kind}: the row width (intermediate_size) must be a positive multiple of "
                             f"{self.elements()} (a thread's vector stays in one row), got {width}")
        if 2 * rows * width >= 2**32:
            raise ValueError(f"{self.kind}: {rows} rows of 2 x {width} overflow the kernel's 32-bit index")


@register
@dataclass(frozen=True)
class SwiGLUSpec(_PairedSpec):
    """out[r, j] = silu(gate_up[r, j]) * gate_up[r, width + j]."""

    kind: ClassVar[str] = "swiglu"
    dtype: DType = DType.F32      # gate_up
    out_dtype: DType = DType.F32  # out (or bf16: the down projection's bf16 operand, no cast)
    block_size: int = 256
    vec: int = 0

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("gate_up", T.U64), ("out", T.U64), ("n", T.U32), ("width", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('out',)

    def arguments(self, gate_up: int, out: int, rows: int, width: int) -> tuple[int, ...]:
        self.check(rows, width)
        return gate_up, out, rows * width, width

    def build(self, b: KernelBuilder) -> None:
        pointers, index = _halves(b, {"gate_up": (self.dtype, ("gate", "up"))})
        elementwise(b, self.block_size, {"gate": self.dtype, "up": self.dtype}, {"out": self.out_dtype},
                    lambda g, u: (swiglu_act(b, g, u),), pointers=pointers, index=index,
                    vec=self.elements())

    @classmethod
    def examples(cls) -> list["SwiGLUSpec"]:
        return [cls(), cls(dtype=DType.BF16, out_dtype=DType.BF16), cls(out_dtype=DType.BF16), cls(block_size=128),
                cls(vec=1)]


@register
@dataclass(frozen=True)
class SwiGLUBackwardSpec(_PairedSpec):
    """dgate = dout * up * s * (1 + g * (1 - s)), dup = dout * g * s, with s = sigmoid(g); gate and
    up read from gate_up's halves, dgate and dup written into dgate_up's."""

    kind: ClassVar[str] = "swiglu_bwd"
    dtype: DType = DType.F32      # gate_up, as the forward read it (dout is f32)
    out_dtype: DType = DType.F32  # dgate_up (bf16: the GEMMs' operand, no cast)
    block_size: int = 256
    vec: int = 0

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("gate_up", T.U64), ("dout", T.U64), ("dgate_up", T.U64), ("n", T.U32), ("width", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('dgate_up',)

    def arguments(self, gate_up: int, dout: int, dgate_up: int, rows: int, width: int) -> tuple[int, ...]:
        self.check(rows, width)
        return gate_up, dout, dgate_up, rows * width, width

    def build(self, b: KernelBuilder) -> None:
        out = self.out_dtype
        pointers, index = _halves(b, {"gate_up": (self.dtype, ("gate", "up")),
                                      "dgate_up": (out, ("dgate", "dup"))})
        elementwise(b, self.block_size, {"gate": self.dtype, "up": self.dtype, "dout": DType.F32},
                    {"dgate": out, "dup": out}, lambda g, u, d: swiglu_grads(b, g, u, d), pointers=pointers, index=index, vec=self.elements())

    @classmethod
    def examples(cls) -> list["SwiGLUBackwardSpec"]:
        return [cls(), cls(out_dtype=DType.BF16), cls(dtype=DType.BF16, out_dtype=DType.BF16), cls(block_size=512),
                cls(vec=2)]


def swiglu_reference(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = np.asarray(gate, dtype=np.float64)
    return g / (1 + np.exp(-g)) * np.asarray(up, dtype=np.float64)


def swiglu_backward_reference(gate: np.ndarray, up: np.ndarray, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, u, d = (np.asarray(a, dtype=np.float64) for a in (gate, up, dout))
    s = 1 / (1 + np.exp(-g))
    return d * u * s * (1 + g * (1 - s)), d * g * s
