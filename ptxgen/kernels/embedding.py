"""Embedding gather out[t] = table[ids[t]] and its deterministic backward.

The backward sums dout rows per token id in a fixed order: the host sorts token positions by id
(stable) into ``order`` with segment starts per unique id, and one block per unique id adds its
segment's rows in order. No atomics, so duplicate ids accumulate identically on every run.
Ids are checked on the host (the model owns them); the kernel trusts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..builder import Addr, KernelBuilder, T
from ..registry import register
from ..spec import KernelSpec
from ..vecio import DType, RowSlices, flat_elementwise, flat_grid, load_f32, offset, store_f32, vector_width
from .common import MAX_ROW_ELEMENTS, check_at_most, check_block_size, check_positive
from .rmsnorm import _check_row_fit


@register
@dataclass(frozen=True)
class EmbeddingSpec(KernelSpec):
    kind: ClassVar[str] = "embedding"
    dim: int
    dtype: DType = DType.F32
    block_size: int = 256

    def validate(self) -> None:
        check_positive("dim", self.dim)
        check_at_most("dim", self.dim, MAX_ROW_ELEMENTS, "32-bit index math")
        check_block_size(self.block_size)

    @property
    def vec(self) -> int:
        return vector_width(self.dim, self.dtype)

    def launch_dims(self, n_tokens: int) -> tuple[int, int]:
        return flat_grid(n_tokens * self.dim, self.vec, self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("table", T.U64), ("ids", T.U64), ("out", T.U64), ("n_tokens", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('out',)

    def build(self, b: KernelBuilder) -> None:
        table, ids, out = (b.cvta_global(b.ld_param(n)) for n in ("table", "ids", "out"))
        size = self.dtype.size

        def body(e, width, guard):
            token, col = b.div(e, self.dim), b.rem(e, self.dim)
            token_id = b.mov(0, T.S32)
            b.ld("global", T.S32, Addr(offset(b, ids, token, 4)), nc=True, out=[token_id], guard=guard)
            src = b.mad(token_id, self.dim, col, T.U32)
            vals = load_f32(b, self.dtype, Addr(offset(b, table, src, size)), width, guard=guard)
            store_f32(b, self.dtype, Addr(offset(b, out, e, size)), vals, guard=guard)

        flat_elementwise(b, b.mul(b.ld_param("n_tokens"), self.dim), self.vec, self.block_size, body)

    @classmethod
    def examples(cls) -> list["EmbeddingSpec"]:
        return [cls(dim=896), cls(dim=896, dtype=DType.BF16), cls(dim=5, block_size=32)]


@register
@dataclass(frozen=True)
class EmbeddingBackwardSpec(KernelSpec):
    kind: ClassVar[str] = "embedding_bwd"
    dim: int
    accumulate: bool = False  # add into dtable rows (tied LM head) instead of overwriting them
    block_size: int = 256

    def validate(self) -> None:
        check_positive("dim", self.dim)
        check_at_most("dim", self.dim, MAX_ROW_ELEMENTS, "32-bit index math")
        check_block_size(self.block_size)
        _check_row_fit(self.dim, DType.F32, self.block_size)

    def launch_dims(self, n_unique: int) -> tuple[int, int]:
        return max(1, n_unique), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("dout", T.U64), ("order", T.U64), ("seg_start", T.U64), ("seg_id", T.U64),
                ("dtable", T.U64))

    def outputs(self) -> tuple[str, ...]:
        return ('dtable',)

    def read_outputs(self) -> tuple[str, ...]:
        return ('dtable',) if self.accumulate else ()

    def build(self, b: KernelBuilder) -> None:
        ptr = {n: b.cvta_global(b.ld_param(n)) for n, _ in self.params()}
        seg, tid = b.special("%ctaid.x"), b.special("%tid.x")
        rows = RowSlices(b, self.dim, vector_width(self.dim, DType.F32), self.block_size, tid)
        start = b.ld("global", T.U32, Addr(offset(b, ptr["seg_start"], seg, 4)), nc=True)
        end = b.ld("global", T.U32, Addr(offset(b, ptr["seg_start"], seg, 4), 4), nc=True)
        vocab_row = b.ld("global", T.U32, Addr(offset(b, ptr["seg_id"], seg, 4)), nc=True)
        dst = rows.base(b, ptr["dtable"], vocab_row, 4)
        acc = rows.load(b, DType.F32, dst) if self.accumulate else \
            [[b.mov(0.0, T.F32) for _ in range(rows.vec)] for _ in rows.guards]
        with b.loop(b.sub(end, start), "tokens") as i:
            token = b.ld("global", T.U32, Addr(offset(b, ptr["order"], b.add(start, i), 4)), nc=True)
            for av, dv in zip(acc, rows.load(b, DType.F32, rows.base(b, ptr["dout"], token, 4))):
                for a, d in zip(av, dv):
                    b.add(a, d, out=a)
        rows.store(b, DType.F32, dst, acc)

    @classmethod
    def examples(cls) -> list["EmbeddingBackwardSpec"]:
        return [cls(dim=896), cls(dim=896, accumulate=True), cls(dim=7, block_size=32)]


def embedding_backward_plan(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host side of the backward: (order, seg_start, seg_id) as int32, from token ids."""
    ids = np.asarray(ids).reshape(-1)
    order = np.argsort(ids, kind="stable").astype(np.int32)
    seg_id, starts = np.unique(ids[order], return_index=True)
    seg_start = np.append(starts, len(ids)).astype(np.int32)
    return order, seg_start, seg_id.astype(np.int32)


def embedding_backward_reference(ids: np.ndarray, dout: np.ndarray, vocab: int) -> np.ndarray:
    d = np.zeros((vocab, dout.shape[-1]))
    np.add.at(d, np.asarray(ids).reshape(-1), np.asarray(dout, dtype=np.float64).reshape(-1, dout.shape[-1]))
    return d
