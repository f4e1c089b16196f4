"""RoPE (NeoX rotate-half) forward and backward over a [tokens, heads, head_dim] tensor (f32 or bf16).

Pairs (i, i + head_dim/2) are rotated by angle pos * theta^(-2i/head_dim). theta reaches the PTX
as a table of exact f64 frequencies; positions are a kernel argument (int32 per token). The angle
is formed and reduced modulo 2*pi in f64, so the f32 sin/cos see |angle| <= pi whatever the position.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Iterator

import numpy as np

from .. import exact
from ..builder import Addr, KernelBuilder, Reg, T
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, load_f32, offset, store_f32, vector_width
from .common import check_at_most, check_block_size, check_positive

MAX_HEADS = 128
MAX_HEAD_DIM = 1024  # the frequency table and the per-thread pairs stay small
MAX_THETA = float(2**1000)
MAX_VALUES_IN_FLIGHT = 64  # loaded values per thread before the first store
TWO_PI_EXACT = 2 * Fraction(exact.PI)
TWO_PI = exact.f64(TWO_PI_EXACT)
TWO_PI_LO = exact.f64(TWO_PI_EXACT - Fraction(TWO_PI))  # the second term of the Cody-Waite reduction
INV_TWO_PI = exact.f64(1 / TWO_PI_EXACT)


def frequency_table(head_dim: int, theta: float) -> tuple[float, ...]:
    """theta^(-2i/head_dim) for i < head_dim/2, each the f64 nearest the exact value: the kernel's
    table and the reference's, the same bits on every host (no numpy or libm power)."""
    return tuple(exact.f64(exact.power(theta, Fraction(-2 * i, head_dim))) for i in range(head_dim // 2))


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """``frequency_table`` as a float64 array."""
    return np.array(frequency_table(head_dim, theta), dtype=np.float64)


def check_frequencies(head_dim: int, theta: float) -> None:
    """A frequency table the module can bake: head_dim even and at most MAX_HEAD_DIM; theta in [1,
    2**1000], so frequencies in (2**-1000, 1]: normal f64, and an angle below 2**31 radians, which
    the f64 reduction modulo 2 pi (``rotation``) covers for every int32 position."""
    check_positive("head_dim", head_dim)
    if head_dim % 2:
        raise SpecError(f"head_dim must be even, got {head_dim}")
    check_at_most("head_dim", head_dim, MAX_HEAD_DIM, "the frequency table is baked into the module")
    if not 1.0 <= theta <= MAX_THETA:
        raise SpecError(f"theta must be in [1, 2**1000], got {theta!r}")


def rotation(b: KernelBuilder, pos: Reg, freq: Reg, inverse: bool = False) -> tuple[Reg, Reg]:
    """(cos, sin) in f32 of the angle ``pos`` x ``freq`` (both f64; ``inverse``: its negative),
    the angle reduced modulo 2 pi in f64 (Cody-Waite, two terms) so the f32 sin and cos see
    |angle| <= pi: the RoPE kernel's and the q/k/v GEMM's epilogue's, the same bits."""
    angle = b.mul(pos, freq)
    turns = b.neg(b.cvt(T.F64, b.mul(angle, INV_TWO_PI), rnd="rni"))
    r32 = b.cvt(T.F32, b.fma(turns, TWO_PI_LO, b.fma(turns, TWO_PI, angle)))
    cos = b.fn("cos", r32)
    return cos, b.neg(b.fn("sin", r32)) if inverse else b.fn("sin", r32)


def table_angles(b: KernelBuilder, table: Reg, row: Reg, quad: Reg, half: int, ok: Reg,
                 volatile: bool = False) -> Iterator[list[Reg]]:
    """From ``RopeTableSpec``'s table at ``table``: for each n8 tile j of a head's first half, a
    lane's (cos, sin) of i = 8 j + 2 ``quad`` and of i + 1 in row ``row``, 16 bytes (0 where not
    ``ok``), loaded as the caller takes them (``volatile``: issued right there, not hoisted)."""
    at = b.add(table, b.mul_wide(b.mad(row, half, b.shl(quad, 1)), 8))
    for j in range(half // 8):
        yield b.ld("global", T.F32, Addr(at, 64 * j), 4, volatile=volatile, guard=ok,
                   out=[b.mov(0.0, T.F32) for _ in range(4)])


def rotate(b: KernelBuilder, x1: Reg, x2: Reg, cos: Reg, sin: Reg) -> tuple[Reg, Reg]:
    """The pair (x1, x2) rotated: (x1 cos - x2 sin, x1 sin + x2 cos), each one fma."""
    return b.fma(x1, cos, b.neg(b.mul(x2, sin))), b.fma(x1, sin, b.mul(x2, cos))


@register
@dataclass(frozen=True)
class RopeSpec(KernelSpec):
    kind: ClassVar[str] = "rope"
    heads: int
    head_dim: int
    theta: float
    dtype: DType = DType.F32
    inverse: bool = False  # rotate by -angle: the backward (the transpose of a rotation)
    block_size: int = 256
    # y in bf16 whatever the storage of x: the attention's operand, or the backward's gradient, as they are read
    bf16_out: bool = False
    strided: bool = False   # rows of x and y are x_stride / y_stride elements apart (runtime), not heads x head_dim:
    #                         q or k read from (or the backward's written into) the fused q/k/v projection's rows

    def validate(self) -> None:
        check_positive("heads", self.heads)
        if self.heads > MAX_HEADS:
            raise SpecError(f"heads must be <= {MAX_HEADS} (the head loop is unrolled), got {self.heads}")
        check_frequencies(self.head_dim, self.theta)
        check_block_size(self.block_size)

    @property
    def vec(self) -> int:
        """Pairs per thread and head: contiguous i's, so x1 and x2 are each one vector access."""
        return vector_width(self.head_dim // 2, self.dtype)

    def launch_dims(self, n_tokens: int) -> tuple[int, int]:
        """(grid, block): one thread per token and group of ``vec`` pairs, looping over the heads."""
        threads = n_tokens * (self.head_dim // 2 // self.vec)
        if n_tokens * self.heads * self.head_dim >= 2**32:
            raise ValueError(f"{n_tokens} tokens x {self.heads} heads overflow the kernel's 32-bit index")
        return max(1, -(-threads // self.block_size)), self.block_size

    def arguments(self, x: int, y: int, positions: int, n_tokens: int, x_stride: int, y_stride: int
                  ) -> tuple[int, ...]:
        """A strided RoPE's arguments: each stride a multiple of the vector (aligned accesses) and
        at least a row of heads x head_dim."""
        if not self.strided:
            raise ValueError("rope: strides are a strided RoPE's arguments")
        if any(s % self.vec or s < self.heads * self.head_dim for s in (x_stride, y_stride)):
            raise ValueError(f"rope: strides must be multiples of {self.vec} of at least heads x head_dim = "
                             f"{self.heads * self.head_dim}, got {x_stride}, {y_stride}")
        if n_tokens * max(x_stride, y_stride) >= 2**32:
            raise ValueError(f"rope: {n_tokens} rows of {max(x_stride, y_stride)} overflow the kernel's 32-bit index")
        return x, y, positions, n_tokens, x_stride, y_stride

    def params(self) -> tuple[tuple[str, T], ...]:
        strides = (("x_stride", T.U32), ("y_stride", T.U32)) if self.strided else ()
        return (("x", T.U64), ("y", T.U64), ("positions", T.U64), ("n_tokens", T.U32)) + strides

    def outputs(self) -> tuple[str, ...]:
        return ('y',)

    def build(self, b: KernelBuilder) -> None:
        half, vec, size = self.head_dim // 2, self.vec, self.dtype.size
        groups = half // vec
        table = b.global_table("inv_freq", T.F64, frequency_table(self.head_dim, self.theta))
        x, y, positions = (b.cvta_global(b.ld_param(n)) for n in ("x", "y", "positions"))
        n_tokens = b.ld_param("n_tokens")
        idx = b.mad(b.special("%ctaid.x"), self.block_size, b.special("%tid.x"))
        done = b.new_label("done")
        b.bra(done, guard=b.setp("ge", idx, b.mul(n_tokens, groups)))

        # The angles depend on (token, i) only: computed once, applied to every head.
        token, i0 = b.div(idx, groups), b.mul(b.rem(idx, groups), vec)
        pos = b.cvt(T.F64, b.ld("global", T.S32, Addr(offset(b, positions, token, 4)), nc=True))
        freqs = offset(b, b.addr_of(table), i0, 8)
        angles = [rotation(b, pos, b.ld("global", T.F64, Addr(freqs, 8 * k), nc=True), self.inverse)
                  for k in range(vec)]
        if self.strided:
            x_elem, y_elem = (b.mad(token, b.ld_param(n), i0) for n in ("x_stride", "y_stride"))
        else:
            x_elem = y_elem = b.mad(token, self.heads * self.head_dim, i0)
        out = DType.BF16 if self.bf16_out else self.dtype
        src, dst = offset(b, x, x_elem, size), offset(b, y, y_elem, out.size)
        # Loads of a batch of heads go first: y may alias x (in-place), so ptxas cannot hoist
        # a head's loads above the previous head's stores by itself.
        batch = max(1, MAX_VALUES_IN_FLIGHT // (2 * vec))
        for first in range(0, self.heads, batch):
            heads = range(first, min(first + batch, self.heads))
            at = {h: h * self.head_dim * size for h in heads}
            xs = {h: (load_f32(b, self.dtype, Addr(src, at[h]), vec),
                      load_f32(b, self.dtype, Addr(src, at[h] + size * half), vec)) for h in heads}
            for h, (x1, x2) in xs.items():
                y1, y2 = zip(*(rotate(b, a, z, *cs) for a, z, cs in zip(x1, x2, angles)))
                store_f32(b, out, Addr(dst, h * self.head_dim * out.size), y1)
                store_f32(b, out, Addr(dst, (h * self.head_dim + half) * out.size), y2)
        b.place(done)

    @classmethod
    def examples(cls) -> list["RopeSpec"]:
        return [cls(heads=14, head_dim=64, theta=1e6), cls(heads=2, head_dim=64, theta=1e4),
                cls(heads=3, head_dim=6, theta=1e4, block_size=32),
                cls(heads=16, head_dim=128, theta=5e5, block_size=128),
                cls(heads=2, head_dim=64, theta=1e6, dtype=DType.BF16, inverse=True),
                cls(heads=14, head_dim=64, theta=1e6, bf16_out=True),
                cls(heads=2, head_dim=64, theta=1e6, bf16_out=True, strided=True),
                cls(heads=14, head_dim=64, theta=1e6, inverse=True, strided=True),
                cls(heads=2, head_dim=64, theta=1e6, inverse=True, strided=True, bf16_out=True)]


@register
@dataclass(frozen=True)
class RopeTableSpec(KernelSpec):
    """(cos, sin) of every angle RoPE rotates ``n_tokens`` rows by: table[token][i] = the f32 pair
    of positions[token] x theta^(-2i/head_dim), i < head_dim / 2 (``rotation``: the RoPE kernel's
    arithmetic, the same bits), for the q/k/v GEMM's epilogue (gemm_wgmma's ``rope_heads``), which
    every layer's rotates by: formed once a forward, not once a head and layer."""

    kind: ClassVar[str] = "rope_table"
    head_dim: int
    theta: float
    block_size: int = 256

    def validate(self) -> None:
        check_frequencies(self.head_dim, self.theta)
        check_block_size(self.block_size)

    def launch_dims(self, n_tokens: int) -> tuple[int, int]:
        """(grid, block): a thread a (token, i)."""
        pairs = n_tokens * (self.head_dim // 2)
        if pairs >= 2**31:
            raise ValueError(f"rope_table: {n_tokens} tokens overflow the kernel's 32-bit index")
        return max(1, -(-pairs // self.block_size)), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return ("positions", T.U64), ("table", T.U64), ("n_tokens", T.U32)

    def outputs(self) -> tuple[str, ...]:
        return ("table",)

    def build(self, b: KernelBuilder) -> None:
        half = self.head_dim // 2
        freqs = b.global_table("inv_freq", T.F64, frequency_table(self.head_dim, self.theta))
        positions, table = (b.cvta_global(b.ld_param(n)) for n in ("positions", "table"))
        idx = b.mad(b.special("%ctaid.x"), self.block_size, b.special("%tid.x"))
        done = b.new_label("done")
        b.bra(done, guard=b.setp("ge", idx, b.mul(b.ld_param("n_tokens"), half)))
        token, i = b.div(idx, half), b.rem(idx, half)
        pos = b.cvt(T.F64, b.ld("global", T.S32, Addr(offset(b, positions, token, 4)), nc=True))
        freq = b.ld("global", T.F64, Addr(offset(b, b.addr_of(freqs), i, 8)), nc=True)
        b.st("global", Addr(offset(b, table, idx, 8)), list(rotation(b, pos, freq)))
        b.place(done)

    @classmethod
    def examples(cls) -> list["RopeTableSpec"]:
        return [cls(head_dim=64, theta=1e6), cls(head_dim=6, theta=1e4, block_size=32)]


def rope_table_reference(positions: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
    """float64 [tokens][head_dim / 2][cos, sin]: what ``RopeTableSpec`` writes (in f32)."""
    angle = np.asarray(positions, dtype=np.float64)[:, None] * inverse_frequencies(head_dim, theta)
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def rope_reference(x: np.ndarray, positions: np.ndarray, theta: float, inverse: bool = False) -> np.ndarray:
    """float64 reference for x of shape [tokens, heads, head_dim]; ``inverse`` rotates by -angle."""
    x64 = np.asarray(x, dtype=np.float64)
    half = x64.shape[-1] // 2
    sign = -1.0 if inverse else 1.0
    angle = sign * np.asarray(positions, dtype=np.float64)[:, None] * inverse_frequencies(x64.shape[-1], theta)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x64[..., :half], x64[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
