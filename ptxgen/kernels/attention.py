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

A row is shared by ``lanes`` consecutive threads, each holding every lanes-th 4-float chunk of it
in registers (dot products finish with a shuffle across the lanes); interleaved chunks make the
lanes' broadcast reads of a staged row hit different banks. More lanes: fewer registers per thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import exact
from ..builder import Addr, KernelBuilder, Reg, T
from ..exact import LN2_F32, LOG2E_F32
from ..fastmath import exp2
from ..reductions import tree_sum, warp_allreduce
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, load_f32, store_f32
from .common import MAX_GRID_YZ, check_at_most, check_block_size, check_positive

MAX_REGS_PER_THREAD = 128  # row values held per thread (the dK/dV kernel holds four rows' shares)
PARTIALS = 4               # independent accumulators per dot product (shorter dependency chains)
CHUNK = 4                  # floats per 16-byte access


class _Rows:
    """This thread's share of a row, row addressing in [batch, seq, heads, head_dim] tensors, and
    staging of row tiles into shared memory."""

    def __init__(self, b: KernelBuilder, spec: "_AttentionBase"):
        self.b, self.d, self.lanes, self.block = b, spec.head_dim, spec.lanes, spec.block
        self.seq = b.ld_param("seq")
        self.batch = b.special("%ctaid.z")
        self.tid = b.special("%tid.x")
        self.part_bytes = b.mul(b.rem(self.tid, self.lanes), CHUNK * 4)  # this lane's first chunk
        self.first = b.mul(b.special("%ctaid.x"), spec.rows_per_block)
        self.row = b.add(self.first, b.div(self.tid, self.lanes))
        self.valid = b.setp("lt", self.row, self.seq)
        self.offsets = [i * self.lanes * CHUNK * 4 for i in range(self.d // (CHUNK * self.lanes))]
        self.is_lead = b.setp("eq", b.rem(self.tid, self.lanes), 0)  # one lane writes a row's statistic

    def row_ptr(self, ptr: Reg, heads: int, head: Reg, row: Reg, per_batch: Reg | None = None) -> Reg:
        """Address of row ``row`` of ``head`` in this block's batch (``per_batch`` rows each,
        default seq: a KV cache has room for more rows than it holds)."""
        b = self.b
        index = b.mad(b.mad(self.batch, self.seq if per_batch is None else per_batch, row), heads, head)
        return b.add(ptr, b.mul_wide(index, self.d * 4))

    def stat(self, ptr: Reg, heads: int, head: Reg, row: Reg) -> Reg:
        """Address of a [batch, heads, seq] statistic (lse, delta)."""
        b = self.b
        index = b.mad(b.mad(self.batch, heads, head), self.seq, row)
        return b.add(ptr, b.mul_wide(index, 4))

    def load(self, row_ptr: Reg, guard: Reg, scale: float | None = None) -> list[Reg]:
        """This lane's chunks of a global row (zeros where ``guard`` is off)."""
        base = self.b.add(row_ptr, self.b.cvt(T.U64, self.part_bytes))
        vals = [v for off in self.offsets for v in load_f32(self.b, DType.F32, Addr(base, off), CHUNK, guard=guard)]
        return vals if scale is None else [self.b.mul(v, scale) for v in vals]

    def store(self, row_ptr: Reg, vals: list[Reg], guard: Reg) -> None:
        base = self.b.add(row_ptr, self.b.cvt(T.U64, self.part_bytes))
        for k, off in enumerate(self.offsets):
            store_f32(self.b, DType.F32, Addr(base, off), vals[k * CHUNK:(k + 1) * CHUNK], guard=guard)

    def shared_rows(self, name: str, rows: int) -> Reg:
        """A [rows][head_dim] f32 shared array; returns this lane's address in its first row."""
        sym = self.b.shared_array(name, T.F32, rows * self.d, align=16)
        return self.b.add(self.b.addr_of(sym), self.part_bytes)

    def stage(self, dst: Reg, ptr: Reg, heads: int, head: Reg, row0: Reg, rows: int,
              limit: Reg | None = None, per_batch: Reg | None = None) -> None:
        """Copy rows row0 .. row0+rows of ``head`` into shared ``dst`` (a lane address from
        ``shared_rows``), zeros from row ``limit`` (default seq) on. Every thread takes part."""
        b = self.b
        base = b.sub(dst, self.part_bytes)
        per_row = self.d // CHUNK
        for i in range(-(-rows * per_row // self.block)):
            idx = b.add(self.tid, i * self.block)
            r, c = b.div(idx, per_row), b.mul(b.rem(idx, per_row), CHUNK)
            in_tile = b.setp("lt", idx, rows * per_row)
            ok = b.and_(in_tile, b.setp("lt", b.add(row0, r), self.seq if limit is None else limit))
            src = b.add(self.row_ptr(ptr, heads, head, b.add(row0, r), per_batch), b.mul_wide(c, 4))
            vals = load_f32(b, DType.F32, Addr(src), CHUNK, guard=ok)
            b.st("shared", Addr(b.add(base, b.mad(r, self.d * 4, b.mul(c, 4)))), vals, guard=in_tile)

    def dot(self, xs: list[Reg], row: Reg, j: int) -> Reg:
        """sum_i x[i] * row_j[i] over the whole row: this lane's chunks, then across the lanes."""
        b = self.b
        partial = [b.mov(0.0, T.F32) for _ in range(PARTIALS)]
        for k, off in enumerate(self.offsets):
            ys = b.ld("shared", T.F32, Addr(row, j * self.d * 4 + off), CHUNK, volatile=True)
            for m, y in enumerate(ys):
                i = k * CHUNK + m
                b.fma(xs[i], y, partial[i % PARTIALS], out=partial[i % PARTIALS])
        return warp_allreduce(b, tree_sum(b, partial), "add", self.lanes)

    def axpy(self, acc: list[Reg], scale: Reg, row: Reg, j: int) -> None:
        """acc[i] += scale * row_j[i] over this lane's chunks."""
        b = self.b
        for k, off in enumerate(self.offsets):
            ys = b.ld("shared", T.F32, Addr(row, j * self.d * 4 + off), CHUNK, volatile=True)
            for m, y in enumerate(ys):
                b.fma(scale, y, acc[k * CHUNK + m], out=acc[k * CHUNK + m])


class AttentionGrid:
    """What every attention spec (fp32 and tensor-core) shares: the GQA grouping, the baked scale,
    the parameters (``pointers`` then ``scalars``) and the launch grid: (row tiles of
    ``rows_per_block``, ``grid_heads``, batch) blocks of ``threads``."""

    pointers: ClassVar[tuple[str, ...]]
    written: ClassVar[tuple[str, ...]]  # the pointers it writes through
    scalars: ClassVar[tuple[str, ...]] = ("seq",)

    def params(self) -> tuple[tuple[str, T], ...]:
        return tuple((n, T.U64) for n in self.pointers) + tuple((n, T.U32) for n in self.scalars)

    def outputs(self) -> tuple[str, ...]:
        return self.written

    def check_heads(self, *fields: str) -> None:
        """heads, kv_heads, head_dim and ``fields`` positive; heads a multiple of kv_heads (GQA)."""
        for name in ("heads", "kv_heads", "head_dim", *fields):
            check_positive(name, getattr(self, name))
        if self.heads % self.kv_heads:
            raise SpecError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        check_at_most("heads", self.heads, MAX_GRID_YZ, "heads are a grid dimension")

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def scale(self) -> float:
        """1/sqrt(head_dim) as f32, rounded once from the exact value."""
        return exact.f32(exact.rsqrt(self.head_dim))

    @property
    def scale_log2e(self) -> float:
        """log2(e)/sqrt(head_dim) as f32, rounded once: the base-2 score scale."""
        return exact.f32(exact.product(exact.rsqrt(self.head_dim), exact.LOG2E_F32))

    @property
    def grid_heads(self) -> int:
        return self.heads

    def launch_dims(self, batch: int, seq: int) -> tuple[tuple[int, int, int], int]:
        return (-(-seq // self.rows_per_block), self.grid_heads, batch), self.threads


@dataclass(frozen=True)
class _AttentionBase(AttentionGrid, KernelSpec):
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    lanes: int = 2    # threads per row
    block: int = 128  # threads per block
    tile: int = 16    # rows staged in shared memory per step

    rows_held: ClassVar[int] = 2  # rows whose share each thread keeps in registers

    def _global_pointers(self, b: KernelBuilder) -> list[Reg]:
        return [b.cvta_global(b.ld_param(n)) for n in self.pointers]

    @property
    def threads(self) -> int:
        return self.block

    @property
    def rows_per_block(self) -> int:
        return self.block // self.lanes

    def validate(self) -> None:
        self.check_heads("tile")
        if self.lanes not in (1, 2, 4, 8):
            raise SpecError(f"lanes must be 1, 2, 4 or 8, got {self.lanes}")
        if self.head_dim % (CHUNK * self.lanes):
            raise SpecError(f"head_dim {self.head_dim} must be a multiple of {CHUNK * self.lanes} "
                            f"({self.lanes} lanes of 4-float chunks)")
        if self.rows_held * self.head_dim // self.lanes > MAX_REGS_PER_THREAD:
            raise SpecError(f"head_dim {self.head_dim} over {self.lanes} lanes holds "
                            f"{self.rows_held * self.head_dim // self.lanes} values per thread "
                            f"(max {MAX_REGS_PER_THREAD}); use more lanes")
        check_block_size(self.block)
        if self.tile > self.rows_per_block:
            raise SpecError(f"tile {self.tile} must be <= the {self.rows_per_block} rows of a block")

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
    pointers: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o", "lse")
    written: ClassVar[tuple[str, ...]] = ("o", "lse")
    scalars: ClassVar[tuple[str, ...]] = ("seq", "kv_len", "kv_stride", "q_start")

    def build(self, b: KernelBuilder) -> None:
        q, k, v, o, lse = self._global_pointers(b)
        r = _Rows(b, self)
        head = b.special("%ctaid.y")
        kv_head = b.div(head, self.group)
        qs = r.load(r.row_ptr(q, self.heads, head, r.row), r.valid, scale=self.scale_log2e)  # base-2 scores
        acc = [b.mov(0.0, T.F32) for _ in qs]
        m, l = b.mov(float("-inf"), T.F32), b.mov(0.0, T.F32)
        ks, vs = r.shared_rows("k_tile", self.tile), r.shared_rows("v_tile", self.tile)
        kv_len, kv_stride, q_start = (b.ld_param(n) for n in ("kv_len", "kv_stride", "q_start"))
        position = b.add(q_start, r.row)
        end = b.min(kv_len, b.add(q_start, b.add(r.first, self.rows_per_block))) if self.causal else kv_len
        key0 = b.mov(0, T.U32)
        with b.loop(b.div(b.add(end, self.tile - 1), self.tile), "kv_tile"):
            r.stage(ks, k, self.kv_heads, kv_head, key0, self.tile, kv_len, kv_stride)
            r.stage(vs, v, self.kv_heads, kv_head, key0, self.tile, kv_len, kv_stride)
            b.bar_sync()
            s = [self._masked(b, r.dot(qs, ks, j), position, b.add(key0, j), kv_len) for j in range(self.tile)]
            m_new = m
            for x in s:
                m_new = b.max(m_new, x)
            alpha = exp2(b, b.sub(m, m_new))
            p = [exp2(b, b.sub(x, m_new)) for x in s]
            b.fma(l, alpha, tree_sum(b, p), out=l)
            for a in acc:
                b.mul(a, alpha, out=a)
            for j, pj in enumerate(p):
                r.axpy(acc, pj, vs, j)
            b.mov(m_new, out=m)
            b.add(key0, self.tile, out=key0)
            b.bar_sync()
        inv = b.fn("rcp", l, "rn")
        r.store(r.row_ptr(o, self.heads, head, r.row), [b.mul(a, inv) for a in acc], r.valid)
        log_l = b.mul(b.add(m, b.fn("lg2", l)), LN2_F32)
        b.st("global", Addr(r.stat(lse, self.heads, head, r.row)), log_l, guard=b.and_(r.valid, r.is_lead))

    @classmethod
    def examples(cls) -> list["AttentionSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=4, kv_heads=2, head_dim=32, lanes=1, block=64),
                cls(heads=14, kv_heads=2, head_dim=128, lanes=4, block=256),
                cls(heads=3, kv_heads=3, head_dim=8, causal=False, block=32, tile=8)]


@register
@dataclass(frozen=True)
class AttentionBackwardQSpec(_AttentionBase):
    """dq = scale * sum_j ds_ij k_j, ds = p * (dp - delta), dp = do v^T; writes delta = rowsum(do * o)."""

    kind: ClassVar[str] = "attention_bwd_q"
    rows_held: ClassVar[int] = 3  # q, dO, dQ
    qkv_rows: ClassVar[bool] = False  # the tensor-core kernels' (dq into the fused projection's gradient rows)
    pointers: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o", "do", "lse", "dq", "delta")
    written: ClassVar[tuple[str, ...]] = ("dq", "delta")

    def build(self, b: KernelBuilder) -> None:
        q, k, v, o, do, lse, dq, delta = self._global_pointers(b)
        r = _Rows(b, self)
        head = b.special("%ctaid.y")
        kv_head = b.div(head, self.group)
        qs = r.load(r.row_ptr(q, self.heads, head, r.row), r.valid, scale=self.scale_log2e)
        dos = r.load(r.row_ptr(do, self.heads, head, r.row), r.valid)
        os_ = r.load(r.row_ptr(o, self.heads, head, r.row), r.valid)
        d_i = warp_allreduce(b, tree_sum(b, [b.mul(x, y) for x, y in zip(dos, os_)]), "add", self.lanes)
        b.st("global", Addr(r.stat(delta, self.heads, head, r.row)), d_i, guard=b.and_(r.valid, r.is_lead))
        lse2 = b.mul(b.ld("global", T.F32, Addr(r.stat(lse, self.heads, head, r.row)), guard=r.valid,
                          out=[b.mov(0.0, T.F32)]), LOG2E_F32)
        acc = [b.mov(0.0, T.F32) for _ in qs]
        ks, vs = r.shared_rows("k_tile", self.tile), r.shared_rows("v_tile", self.tile)
        end = b.min(r.seq, b.add(r.first, self.rows_per_block)) if self.causal else r.seq
        key0 = b.mov(0, T.U32)
        with b.loop(b.div(b.add(end, self.tile - 1), self.tile), "kv_tile"):
            r.stage(ks, k, self.kv_heads, kv_head, key0, self.tile)
            r.stage(vs, v, self.kv_heads, kv_head, key0, self.tile)
            b.bar_sync()
            for j in range(self.tile):
                p = exp2(b, b.sub(self._masked(b, r.dot(qs, ks, j), r.row, b.add(key0, j), r.seq), lse2))
                dp = r.dot(dos, vs, j)
                r.axpy(acc, b.mul(p, b.sub(dp, d_i)), ks, j)
            b.add(key0, self.tile, out=key0)
            b.bar_sync()
        r.store(r.row_ptr(dq, self.heads, head, r.row), [b.mul(a, self.scale) for a in acc], r.valid)

    @classmethod
    def examples(cls) -> list["AttentionBackwardQSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128, lanes=4, block=256),
                cls(heads=3, kv_heads=3, head_dim=8, causal=False, block=32, tile=8)]


@register
@dataclass(frozen=True)
class AttentionBackwardKVSpec(_AttentionBase):
    """dv_j = sum p_ij do_i, dk_j = scale * sum ds_ij q_i, summed over the group's query heads."""

    kind: ClassVar[str] = "attention_bwd_kv"
    rows_held: ClassVar[int] = 4  # k, v, dK, dV
    qkv_rows: ClassVar[bool] = False  # the tensor-core kernels' (dk, dv into the fused projection's gradient rows)
    pointers: ClassVar[tuple[str, ...]] = ("q", "k", "v", "do", "lse", "delta", "dk", "dv")
    written: ClassVar[tuple[str, ...]] = ("dk", "dv")

    @property
    def grid_heads(self) -> int:
        return self.kv_heads

    def build(self, b: KernelBuilder) -> None:
        q, k, v, do, lse, delta, dk, dv = self._global_pointers(b)
        r = _Rows(b, self)
        key, kv_head = r.row, b.special("%ctaid.y")
        c = self.scale_log2e
        k_row = r.load(r.row_ptr(k, self.kv_heads, kv_head, key), r.valid, scale=c)
        v_row = r.load(r.row_ptr(v, self.kv_heads, kv_head, key), r.valid)
        dks, dvs = [b.mov(0.0, T.F32) for _ in k_row], [b.mov(0.0, T.F32) for _ in v_row]
        qt, dot_ = r.shared_rows("q_tile", self.tile), r.shared_rows("do_tile", self.tile)
        stats = b.addr_of(b.shared_array("stats", T.F32, 2 * self.tile, align=16))  # lse*log2e, delta
        start = r.first if self.causal else b.mov(0, T.U32)  # (causal) earlier queries see none of these keys
        tiles = b.div(b.add(b.sub(r.seq, start), self.tile - 1), self.tile)
        is_stat_thread = b.setp("lt", r.tid, self.tile)
        with b.loop(b.mov(self.group, T.U32), "group") as member:
            head = b.mad(kv_head, self.group, member)
            query0 = b.mov(start, T.U32)
            with b.loop(tiles, "q_tile"):
                r.stage(qt, q, self.heads, head, query0, self.tile)
                r.stage(dot_, do, self.heads, head, query0, self.tile)
                i = b.add(query0, r.tid)
                in_tile = b.and_(is_stat_thread, b.setp("lt", i, r.seq))
                lse_i = b.ld("global", T.F32, Addr(r.stat(lse, self.heads, head, i)), guard=in_tile,
                             out=[b.mov(0.0, T.F32)])
                delta_i = b.ld("global", T.F32, Addr(r.stat(delta, self.heads, head, i)), guard=in_tile,
                               out=[b.mov(0.0, T.F32)])
                st = b.add(stats, b.mul(r.tid, 4))
                b.st("shared", Addr(st), b.mul(lse_i, LOG2E_F32), guard=is_stat_thread)
                b.st("shared", Addr(st, 4 * self.tile), delta_i, guard=is_stat_thread)
                b.bar_sync()
                for j in range(self.tile):
                    s = self._masked(b, r.dot(k_row, qt, j), b.add(query0, j), key, r.seq, r.seq)
                    p = exp2(b, b.sub(s, b.ld("shared", T.F32, Addr(stats, 4 * j))))
                    r.axpy(dvs, p, dot_, j)
                    dp = r.dot(v_row, dot_, j)
                    ds = b.mul(p, b.sub(dp, b.ld("shared", T.F32, Addr(stats, 4 * (self.tile + j)))))
                    r.axpy(dks, ds, qt, j)
                b.add(query0, self.tile, out=query0)
                b.bar_sync()
        r.store(r.row_ptr(dk, self.kv_heads, kv_head, key), [b.mul(x, self.scale) for x in dks], r.valid)
        r.store(r.row_ptr(dv, self.kv_heads, kv_head, key), dvs, r.valid)

    @classmethod
    def examples(cls) -> list["AttentionBackwardKVSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128, lanes=4, block=256),
                cls(heads=3, kv_heads=3, head_dim=8, causal=False, block=32, tile=8)]


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
