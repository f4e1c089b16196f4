"""Fused causal self-attention with grouped K/V heads (GQA), fp32, forward and backward.

Tensors are [batch, seq, heads, head_dim] (q, o, dq, do with ``heads``; k, v, dk, dv with
``kv_heads``); the log-sum-exp and delta rows are [batch, heads, seq]. Query head h reads K/V head
h // (heads / kv_heads). The scale 1/sqrt(head_dim) is baked in; batch and seq are launch values.

* Forward: a thread per query row; K/V rows are staged in shared memory ``tile`` at a time and
  read by every thread (broadcast), with an online softmax in base 2 (one rescale per tile).
  Saves the natural-log log-sum-exp of each row for the backward.
* Backward dQ (run first): a thread per query row; it also writes delta = rowsum(dO * O).
* Backward dK/dV: a thread per key row of a K/V head, looping over every query head of its group
  and every query at or after it; so the group's sum needs no atomics and is deterministic.

Each thread's row lives in registers, or, where three rows would not fit in registers, in its own
row of shared memory padded by one float (so a warp reading its 32 rows hits 32 banks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..builder import Addr, KernelBuilder, Reg, T
from ..reductions import tree_sum
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, load_f32, store_f32, vector_width
from .common import check_block_size, check_positive

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
MAX_HEAD_DIM = 64  # three rows of registers per thread at most (the backward's q, dO and dQ)
PARTIALS = 4       # independent accumulators per dot product (shorter dependency chains)


class _Geometry:
    """Row addressing in a [batch, seq, heads, head_dim] tensor and staging of row tiles."""

    def __init__(self, b: KernelBuilder, spec: "_AttentionBase"):
        self.b, self.d, self.block, self.tile = b, spec.head_dim, spec.block, spec.tile
        self.vec = vector_width(spec.head_dim, DType.F32)
        self.seq = b.ld_param("seq")
        self.batch = b.special("%ctaid.z")

    def row(self, ptr: Reg, heads: int, head: Reg, row: Reg, per_batch: Reg | None = None) -> Reg:
        """Address of row ``row`` of head ``head`` in this block's batch (``per_batch`` rows each,
        default seq: a KV cache has room for more rows than it holds)."""
        b = self.b
        index = b.mad(b.mad(self.batch, self.seq if per_batch is None else per_batch, row), heads, head)
        return b.add(ptr, b.mul_wide(index, self.d * 4))

    def stat(self, ptr: Reg, heads: int, head: Reg, row: Reg) -> Reg:
        """Address of a [batch, heads, seq] statistic (lse, delta)."""
        b = self.b
        index = b.mad(b.mad(self.batch, heads, head), self.seq, row)
        return b.add(ptr, b.mul_wide(index, 4))

    def shared_rows(self, name: str, rows: int, pad: int) -> tuple[Reg, int]:
        """A [rows][head_dim + pad] f32 array: (address, row stride in bytes)."""
        stride = (self.d + pad) * 4
        sym = self.b.shared_array(name, T.F32, rows * (self.d + pad), align=16)
        return self.b.addr_of(sym), stride

    def stage(self, dst: Reg, stride: int, ptr: Reg, heads: int, head: Reg, row0: Reg, tid: Reg,
              rows: int, limit: Reg | None = None, per_batch: Reg | None = None) -> None:
        """Copy rows row0 .. row0+rows of ``head`` into shared ``dst``, zeros from row ``limit``
        (default seq) on."""
        b = self.b
        per_row = self.d // self.vec
        for i in range(-(-rows * per_row // self.block)):
            idx = b.add(tid, i * self.block)
            r, c = b.div(idx, per_row), b.mul(b.rem(idx, per_row), self.vec)
            ok = b.and_(b.setp("lt", idx, rows * per_row),
                        b.setp("lt", b.add(row0, r), self.seq if limit is None else limit))
            vals = load_f32(b, DType.F32, Addr(b.add(self.row(ptr, heads, head, b.add(row0, r), per_batch),
                                                     b.mul_wide(c, 4))), self.vec, guard=ok)
            at = b.add(dst, b.mad(r, stride, b.mul(c, 4)))
            in_tile = b.setp("lt", idx, rows * per_row)
            if stride % 16 == 0:
                b.st("shared", Addr(at), vals if len(vals) > 1 else vals[0], guard=in_tile)
            else:
                for j, v in enumerate(vals):
                    b.st("shared", Addr(at, 4 * j), v, guard=in_tile)

    def own_row(self, dst: Reg, stride: int, tid: Reg, vals: list[Reg]) -> Reg:
        """Store this thread's row into its padded shared row; returns that row's address."""
        b = self.b
        at = b.add(dst, b.mul(tid, stride))
        for j, v in enumerate(vals):
            b.st("shared", Addr(at, 4 * j), v)
        return at

    def load_row(self, ptr: Reg, guard: Reg) -> list[Reg]:
        return load_f32(self.b, DType.F32, Addr(ptr), self.d, guard=guard)


def dot_shared(b: KernelBuilder, xs: list[Reg] | Reg, row: Reg, offset: int, d: int) -> Reg:
    """sum_i x[i] * row[i]: ``row`` is a shared row every thread reads (16-byte broadcast reads);
    x is registers, or (a single address) this thread's own padded shared row, re-read each time
    (volatile) so that it is not promoted into registers the thread does not have."""
    partial = [b.mov(0.0, T.F32) for _ in range(PARTIALS)]
    for i0 in range(0, d, 4):
        ys = b.ld("shared", T.F32, Addr(row, offset + 4 * i0), 4, volatile=True)
        for j, y in enumerate(ys):
            i = i0 + j
            x = xs[i] if isinstance(xs, list) else b.ld("shared", T.F32, Addr(xs, 4 * i), volatile=True)
            b.fma(x, y, partial[i % PARTIALS], out=partial[i % PARTIALS])
    return tree_sum(b, partial)


def axpy_shared(b: KernelBuilder, acc: list[Reg], scale: Reg, row: Reg, offset: int) -> None:
    """acc[i] += scale * row[i] for a broadcast shared row."""
    for i0 in range(0, len(acc), 4):
        for j, y in enumerate(b.ld("shared", T.F32, Addr(row, offset + 4 * i0), 4, volatile=True)):
            b.fma(scale, y, acc[i0 + j], out=acc[i0 + j])


@dataclass(frozen=True)
class _AttentionBase(KernelSpec):
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    block: int = 64  # rows (threads) per block
    tile: int = 16   # rows staged in shared memory per step

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def validate(self) -> None:
        for name in ("heads", "kv_heads", "head_dim", "tile"):
            check_positive(name, getattr(self, name))
        if self.heads % self.kv_heads:
            raise SpecError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 4 or self.head_dim > MAX_HEAD_DIM:
            raise SpecError(f"head_dim must be a multiple of 4 and <= {MAX_HEAD_DIM}, got {self.head_dim}")
        check_block_size(self.block)
        if self.tile > self.block:
            raise SpecError(f"tile {self.tile} must be <= block {self.block}")

    @property
    def grid_heads(self) -> int:
        return self.heads

    def launch_dims(self, batch: int, seq: int) -> tuple[tuple[int, int, int], int]:
        return (-(-seq // self.block), self.grid_heads, batch), self.block

    def _row_setup(self, b: KernelBuilder) -> tuple[_Geometry, Reg, Reg, Reg, Reg]:
        """(geometry, tid, this thread's row, whether it is in the sequence, the block's first row)."""
        g = _Geometry(b, self)
        tid = b.special("%tid.x")
        first = b.mul(b.special("%ctaid.x"), self.block)
        row = b.add(first, tid)
        return g, tid, row, b.setp("lt", row, g.seq), first

    def _masked(self, b: KernelBuilder, s: Reg, query: Reg, key: Reg, keys: Reg, queries: Reg | None = None) -> Reg:
        """-inf where key >= keys, query >= queries (when given) or (causal) the key is after the query."""
        off = b.setp("ge", key, keys)
        if queries is not None:
            off = b.or_(off, b.setp("ge", query, queries))
        if self.causal:
            off = b.or_(off, b.setp("gt", key, query))
        return b.selp(float("-inf"), s, off, T.F32)


@register
@dataclass(frozen=True)
class AttentionSpec(_AttentionBase):
    """o = softmax(q k^T * scale, causal) v per head; lse = log-sum-exp of each score row.

    ``seq`` query rows at positions q_start .. q_start+seq-1 attend to ``kv_len`` key rows; k and v
    hold ``kv_stride`` rows per batch. Training passes kv_len = kv_stride = seq, q_start = 0;
    decoding with a KV cache passes the cache's length and capacity.
    """

    kind: ClassVar[str] = "attention_fwd"

    def params(self) -> tuple[tuple[str, T], ...]:
        return tuple((n, T.U64) for n in ("q", "k", "v", "o", "lse")) + \
            tuple((n, T.U32) for n in ("seq", "kv_len", "kv_stride", "q_start"))

    def build(self, b: KernelBuilder) -> None:
        q, k, v, o, lse = (b.cvta_global(b.ld_param(n)) for n in ("q", "k", "v", "o", "lse"))
        g, tid, row, valid, first = self._row_setup(b)
        head = b.special("%ctaid.y")
        kv_head = b.div(head, self.group)
        c = self.scale * LOG2E  # scores in base 2
        qs = [b.mul(x, c) for x in g.load_row(g.row(q, self.heads, head, row), valid)]
        acc = [b.mov(0.0, T.F32) for _ in range(self.head_dim)]
        m, l = b.mov(float("-inf"), T.F32), b.mov(0.0, T.F32)
        ks, stride = g.shared_rows("k_tile", self.tile, 0)
        vs, _ = g.shared_rows("v_tile", self.tile, 0)
        kv_len, kv_stride, q_start = (b.ld_param(n) for n in ("kv_len", "kv_stride", "q_start"))
        position = b.add(q_start, row)
        end = b.min(kv_len, b.add(q_start, b.add(first, self.block))) if self.causal else kv_len
        key0 = b.mov(0, T.U32)
        with b.loop(b.div(b.add(end, self.tile - 1), self.tile), "kv_tile"):
            g.stage(ks, stride, k, self.kv_heads, kv_head, key0, tid, self.tile, kv_len, kv_stride)
            g.stage(vs, stride, v, self.kv_heads, kv_head, key0, tid, self.tile, kv_len, kv_stride)
            b.bar_sync()
            s = [self._masked(b, dot_shared(b, qs, ks, j * stride, self.head_dim), position, b.add(key0, j), kv_len)
                 for j in range(self.tile)]
            m_new = m
            for x in s:
                m_new = b.max(m_new, x)
            alpha = b.fn("ex2", b.sub(m, m_new))
            p = [b.fn("ex2", b.sub(x, m_new)) for x in s]
            b.fma(l, alpha, tree_sum(b, p), out=l)
            for a in acc:
                b.mul(a, alpha, out=a)
            for j, pj in enumerate(p):
                axpy_shared(b, acc, pj, vs, j * stride)
            b.mov(m_new, out=m)
            b.add(key0, self.tile, out=key0)
            b.bar_sync()
        inv = b.fn("rcp", l, "rn")
        store_f32(b, DType.F32, Addr(g.row(o, self.heads, head, row)), [b.mul(a, inv) for a in acc], guard=valid)
        log_l = b.mul(b.add(m, b.fn("lg2", l)), LN2)
        b.st("global", Addr(g.stat(lse, self.heads, head, row)), log_l, guard=valid)

    @classmethod
    def examples(cls) -> list["AttentionSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=4, kv_heads=2, head_dim=32),
                cls(heads=3, kv_heads=3, head_dim=8, causal=False, block=32, tile=8)]


@register
@dataclass(frozen=True)
class AttentionBackwardQSpec(_AttentionBase):
    """dq = scale * sum_j ds_ij k_j, ds = p * (dp - delta), dp = do v^T; writes delta = rowsum(do * o)."""

    kind: ClassVar[str] = "attention_bwd_q"

    def params(self) -> tuple[tuple[str, T], ...]:
        return tuple((n, T.U64) for n in ("q", "k", "v", "o", "do", "lse", "dq", "delta")) + (("seq", T.U32),)

    def build(self, b: KernelBuilder) -> None:
        q, k, v, o, do, lse, dq, delta = (b.cvta_global(b.ld_param(n))
                                          for n in ("q", "k", "v", "o", "do", "lse", "dq", "delta"))
        g, tid, row, valid, first = self._row_setup(b)
        head = b.special("%ctaid.y")
        kv_head = b.div(head, self.group)
        c = self.scale * LOG2E
        own_q, own_stride = g.shared_rows("q_own", self.block, 1)
        q_row = g.own_row(own_q, own_stride, tid,
                          [b.mul(x, c) for x in g.load_row(g.row(q, self.heads, head, row), valid)])
        dos = g.load_row(g.row(do, self.heads, head, row), valid)
        os_ = g.load_row(g.row(o, self.heads, head, row), valid)
        d_i = tree_sum(b, [b.mul(x, y) for x, y in zip(dos, os_)])
        b.st("global", Addr(g.stat(delta, self.heads, head, row)), d_i, guard=valid)
        lse2 = b.mul(b.ld("global", T.F32, Addr(g.stat(lse, self.heads, head, row)), guard=valid,
                          out=[b.mov(0.0, T.F32)]), LOG2E)
        acc = [b.mov(0.0, T.F32) for _ in range(self.head_dim)]
        ks, stride = g.shared_rows("k_tile", self.tile, 0)
        vs, _ = g.shared_rows("v_tile", self.tile, 0)
        end = b.min(g.seq, b.add(first, self.block)) if self.causal else g.seq
        key0 = b.mov(0, T.U32)
        with b.loop(b.div(b.add(end, self.tile - 1), self.tile), "kv_tile"):
            g.stage(ks, stride, k, self.kv_heads, kv_head, key0, tid, self.tile)
            g.stage(vs, stride, v, self.kv_heads, kv_head, key0, tid, self.tile)
            b.bar_sync()
            for j in range(self.tile):
                s = dot_shared(b, q_row, ks, j * stride, self.head_dim)
                p = b.fn("ex2", b.sub(self._masked(b, s, row, b.add(key0, j), g.seq), lse2))
                dp = dot_shared(b, dos, vs, j * stride, self.head_dim)
                axpy_shared(b, acc, b.mul(p, b.sub(dp, d_i)), ks, j * stride)
            b.add(key0, self.tile, out=key0)
            b.bar_sync()
        store_f32(b, DType.F32, Addr(g.row(dq, self.heads, head, row)), [b.mul(a, self.scale) for a in acc],
                  guard=valid)

    @classmethod
    def examples(cls) -> list["AttentionBackwardQSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=3, kv_heads=3, head_dim=8, causal=False,
                                                               block=32, tile=8)]


@register
@dataclass(frozen=True)
class AttentionBackwardKVSpec(_AttentionBase):
    """dv_j = sum p_ij do_i, dk_j = scale * sum ds_ij q_i, summed over the group's query heads."""

    kind: ClassVar[str] = "attention_bwd_kv"

    @property
    def grid_heads(self) -> int:
        return self.kv_heads

    def params(self) -> tuple[tuple[str, T], ...]:
        return tuple((n, T.U64) for n in ("q", "k", "v", "do", "lse", "delta", "dk", "dv")) + (("seq", T.U32),)

    def build(self, b: KernelBuilder) -> None:
        q, k, v, do, lse, delta, dk, dv = (b.cvta_global(b.ld_param(n))
                                           for n in ("q", "k", "v", "do", "lse", "delta", "dk", "dv"))
        g, tid, key, valid, first = self._row_setup(b)
        kv_head = b.special("%ctaid.y")
        d = self.head_dim
        own_k, own_stride = g.shared_rows("k_own", self.block, 1)
        own_v, _ = g.shared_rows("v_own", self.block, 1)
        k_row = g.own_row(own_k, own_stride, tid, g.load_row(g.row(k, self.kv_heads, kv_head, key), valid))
        v_row = g.own_row(own_v, own_stride, tid, g.load_row(g.row(v, self.kv_heads, kv_head, key), valid))
        dks = [b.mov(0.0, T.F32) for _ in range(d)]
        dvs = [b.mov(0.0, T.F32) for _ in range(d)]
        qt, stride = g.shared_rows("q_tile", self.tile, 0)
        dot_, _ = g.shared_rows("do_tile", self.tile, 0)
        stats = b.addr_of(b.shared_array("stats", T.F32, 2 * self.tile, align=16))  # lse*log2e, delta
        c = self.scale * LOG2E
        start = first if self.causal else b.mov(0, T.U32)  # (causal) earlier queries see none of these keys
        tiles = b.div(b.add(b.sub(g.seq, start), self.tile - 1), self.tile)
        with b.loop(b.mov(self.group, T.U32), "group") as member:
            head = b.mad(kv_head, self.group, member)
            query0 = b.mov(start, T.U32)
            with b.loop(tiles, "q_tile"):
                g.stage(qt, stride, q, self.heads, head, query0, tid, self.tile)
                g.stage(dot_, stride, do, self.heads, head, query0, tid, self.tile)
                i = b.add(query0, tid)
                in_tile = b.and_(b.setp("lt", tid, self.tile), b.setp("lt", i, g.seq))
                lse_i = b.ld("global", T.F32, Addr(g.stat(lse, self.heads, head, i)), guard=in_tile,
                             out=[b.mov(0.0, T.F32)])
                delta_i = b.ld("global", T.F32, Addr(g.stat(delta, self.heads, head, i)), guard=in_tile,
                               out=[b.mov(0.0, T.F32)])
                is_stat_thread = b.setp("lt", tid, self.tile)
                st = b.add(stats, b.mul(tid, 4))
                b.st("shared", Addr(st), b.mul(lse_i, LOG2E), guard=is_stat_thread)
                b.st("shared", Addr(st, 4 * self.tile), delta_i, guard=is_stat_thread)
                b.bar_sync()
                for j in range(self.tile):
                    s = dot_shared(b, k_row, qt, j * stride, d)
                    s = self._masked(b, b.mul(s, c), b.add(query0, j), key, g.seq, g.seq)
                    p = b.fn("ex2", b.sub(s, b.ld("shared", T.F32, Addr(stats, 4 * j))))
                    axpy_shared(b, dvs, p, dot_, j * stride)
                    dp = dot_shared(b, v_row, dot_, j * stride, d)
                    ds = b.mul(p, b.sub(dp, b.ld("shared", T.F32, Addr(stats, 4 * (self.tile + j)))))
                    axpy_shared(b, dks, ds, qt, j * stride)
                b.add(query0, self.tile, out=query0)
                b.bar_sync()
        store_f32(b, DType.F32, Addr(g.row(dk, self.kv_heads, kv_head, key)), [b.mul(x, self.scale) for x in dks],
                  guard=valid)
        store_f32(b, DType.F32, Addr(g.row(dv, self.kv_heads, kv_head, key)), dvs, guard=valid)

    @classmethod
    def examples(cls) -> list["AttentionBackwardKVSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=3, kv_heads=3, head_dim=8, causal=False,
                                                               block=32, tile=8)]


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int = 0, causal: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 GQA attention with an explicit masked softmax; query i sits at position start + i.

    q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> (o [B, Sq, H, D], probabilities [B, H, Sq, Sk],
    log-sum-exp of the scaled scores [B, H, Sq]).
    """
    group = q.shape[2] // k.shape[2]
    scores = _heads_first(q) @ _heads_first(k, group).transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if causal:
        visible = np.arange(k.shape[1])[None, :] <= start + np.arange(q.shape[1])[:, None]
        scores = np.where(visible, scores, -np.inf)
    mx = scores.max(-1, keepdims=True)
    lse = mx + np.log(np.exp(scores - mx).sum(-1, keepdims=True))
    p = np.exp(scores - lse)
    return (p @ _heads_first(v, group)).transpose(0, 2, 1, 3), p, lse[..., 0]


def attention_backward_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, p: np.ndarray, do: np.ndarray
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (dq, dk, dv) of ``attention_reference`` given its probabilities; K/V grads summed per group."""
    b, s, hkv, d = k.shape
    group = q.shape[2] // hkv
    scale = 1.0 / math.sqrt(d)
    dout = _heads_first(do)
    dv = p.transpose(0, 1, 3, 2) @ dout
    dp = dout @ _heads_first(v, group).transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = (ds @ _heads_first(k, group)).transpose(0, 2, 1, 3) * scale
    dk = (ds.transpose(0, 1, 3, 2) @ _heads_first(q)) * scale

    def per_kv_head(x: np.ndarray) -> np.ndarray:  # [B, H, S, D] -> [B, S, Hkv, D], summed per group
        return x.reshape(b, hkv, group, s, d).sum(2).transpose(0, 2, 1, 3)

    return dq, per_kv_head(dk), per_kv_head(dv)


def _heads_first(x: np.ndarray, group: int = 1) -> np.ndarray:
    """[B, S, H, D] -> [B, H * group, S, D] in float64, each head repeated ``group`` times (GQA)."""
    return np.repeat(np.asarray(x, np.float64), group, axis=2).transpose(0, 2, 1, 3)
