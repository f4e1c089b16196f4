"""A block-level PTX interpreter, so CPU tests can run the model's kernels' math: the fp32 training
step's (GEMMs, attention, norms, RoPE, SwiGLU, cross-entropy, optimizer), the tensor-core
attention's (wgmma, and mma.sync.m16n8k16 with ldmatrix: their fragment layouts as the PTX ISA
gives them, checked by the forwards, which pass their GPU tests, passing here too).

It interprets the instructions those kernels emit, nothing more (anything else raises
NotImplementedError; RoPE's sin and cos are numpy's, not sin.approx's). A block's threads run in
lockstep, one numpy lane each; threads that branch apart keep their own pc and the group at the
smallest runs next, so structured paths rejoin (a shuffle or wgmma reached by part of a warp or
warpgroup is an error, and so is a barrier that finds fewer threads than it counts). cp.async copies
land at their group's cp.async.wait_group (per thread), not before: a read of a stage before its
wait sees stale bytes.
Shared memory starts as garbage, global memory outside the outputs is read-only (asserted).

wgmma, per warpgroup, runs where wgmma.wait_group lets its committed group finish, and the
interpreter refuses what the hardware leaves undefined in between, since it may run any time from
issue to wait: another instruction of the warpgroup naming one of its accumulator or A registers;
its shared operands not yet landed (a cp.async not waited for) or written before its wait
(st.shared, cp.async), or, once it ran, written by another warpgroup before a barrier covers both;
a later wgmma reading its accumulators; an accumulator or A register touched by another
instruction since the warpgroup's last wgmma.fence; a warpgroup ending with one in flight.
Accumulators and A-from-registers are in the mma m16n8k16 fragment
layouts, shared operands through their matrix descriptors in the 128-byte swizzle (16-byte chunk
bits 4-6 of an absolute shared address XORed with bits 7-9): K-major element (row, k) at start +
(row / 8) * SBO + (row % 8) * 128 + 2k; MN-major (k, col) at start + (col / 64) * LBO + (k / 8) *
SBO + (k % 8) * 128 + 2 (col % 64). That reading of the hardware is checked by running the
forward, which passes its tests on an H200, through this interpreter (test_attention_sim).
"""
from __future__ import annotations

import re
import struct
from typing import NamedTuple, Sequence

import numpy as np

from ptxgen.spec import KernelSpec, Target

SMEM_BASE = 0x400  # the dynamic shared array's address: 1024-byte aligned, as its .align asks
WORD = np.arange(4)


def _f32(token: str) -> np.float32:
    return np.frombuffer(struct.pack("<I", int(token[2:], 16)), np.float32)[0]


def _to_16(x: np.ndarray, dtype: str) -> np.ndarray:
    """f32 -> bf16 / f16 bits, rounded to nearest even."""
    x = np.asarray(x, np.float32)
    if dtype.startswith("f16"):
        return x.astype(np.float16).view(np.uint16)
    bits = x.view(np.uint32).astype(np.uint64)
    return np.where(np.isnan(x), 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _from_16(bits: np.ndarray, dtype: str) -> np.ndarray:
    bits = np.asarray(bits, np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32) if dtype == "bf16" else bits.view(np.float16).astype(np.float32)


def _flush_subnormals(x: np.ndarray) -> np.ndarray:
    """An ``.ftz`` instruction's view of its f32 inputs and results: subnormals are zeros of their sign."""
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), x), x)


def _operands(text: str) -> list[str]:
    """Comma-separated operands, a {vector} being one."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()] if cur.strip() else out


def _vector(token: str) -> list[str]:
    return [x.strip() for x in token[1:-1].split(",")] if token.startswith("{") else [token]


class Program:
    """A kernel's parameter names and instructions: (guard (register, negated) or None, opcode, operands)."""

    def __init__(self, ptx: str):
        self.params = re.findall(r"\.param \.\w+ (\w+)", ptx)
        # module-level constant tables: .global .align A .f64 name[N] = {0d..., ...}
        self.tables = {name: np.array([struct.unpack("<d", bytes.fromhex(v.strip()[2:])[::-1])[0]
                                       for v in values.split(",")], np.float64)
                       for name, values in re.findall(r"\.global \.align \d+ \.f64 (\w+)\[\d+\] = \{([^}]*)\}", ptx)}
        self.instrs: list[tuple[tuple[str, bool] | None, list[str], list[str]]] = []
        self.labels: dict[str, int] = {}
        self.names: list[frozenset[str]] = []  # the registers each instruction names
        # static shared arrays: .shared .align A .TYPE name[N] (bytes each)
        self.shared = {name: size for name, size in
                       ((n, int(c) * int(re.sub(r"\D", "", t)) // 8)
                        for t, n, c in re.findall(r"\.shared \.align \d+ \.(\w+) (\w+)\[(\d+)\]", ptx))}
        for line in ptx[ptx.index("{", ptx.index(".entry")) + 1:].splitlines():
            line = line.strip().rstrip(";")
            if not line or line.startswith((".reg", ".shared", "}", "//")):
                continue
            if line.endswith(":"):
                self.labels[line[:-1]] = len(self.instrs)
                continue
            guard = None
            if line.startswith("@"):
                g, line = line.split(None, 1)
                guard = (g.lstrip("@!"), g[1] == "!")
            op, _, rest = line.partition(" ")
            self.instrs.append((guard, op.split("."), _operands(rest)))
            self.names.append(frozenset(re.findall(r"%\w+", rest)) | ({guard[0]} if guard else set()))
        self.wgmma = any(op[0] == "wgmma" for _, op, _ in self.instrs)


class Memory:
    """Global memory: the arguments side by side; only the spec's outputs may be written."""

    def __init__(self):
        self.bytes = np.zeros(256, np.uint8)
        self.writable: list[tuple[int, int]] = []

    def put(self, array: np.ndarray, writable: bool) -> int:
        raw = np.ascontiguousarray(array).view(np.uint8).ravel()
        at = -(-len(self.bytes) // 256) * 256
        self.bytes = np.concatenate([self.bytes, np.zeros(at - len(self.bytes), np.uint8), raw, np.zeros(256, np.uint8)])
        if writable:
            self.writable.append((at, at + raw.size))
        return at

    def get(self, at: int, like: np.ndarray) -> np.ndarray:
        return self.bytes[at:at + like.nbytes].copy().view(like.dtype).reshape(like.shape)


class Block:
    def __init__(self, program: Program, threads: int | tuple[int, ...], ctaid: tuple[int, int, int],
                 nctaid: tuple[int, int, int],
                 params: dict[str, int], memory: Memory, shared_bytes: int):
        shape = (threads,) if isinstance(threads, int) else tuple(threads)
        threads = int(np.prod(shape))  # a 2-D block's threads, x fastest (warps take consecutive linear ids)
        self.program, self.threads, self.memory, self.params = program, threads, memory, params
        linear = np.arange(threads, dtype=np.uint32)
        self.special = {"%tid.x": linear % shape[0], "%tid.y": linear // shape[0] % (shape[1] if len(shape) > 1 else 1),
                        "%ntid.x": np.full(threads, shape[0], np.uint32)}
        self.lane_id = linear
        for i, axis in enumerate("xyz"):
            self.special[f"%ctaid.{axis}"] = np.full(threads, ctaid[i], np.uint32)
            self.special[f"%nctaid.{axis}"] = np.full(threads, nctaid[i], np.uint32)
        # the dynamic array at SMEM_BASE, then the static ones, 16-byte aligned
        self.static, at = {}, SMEM_BASE + -(-shared_bytes // 16) * 16
        for name, size in program.shared.items():
            self.static[name], at = at, at + -(-size // 16) * 16
        self.shared = np.full(at, 0xAB, np.uint8)  # garbage until written
        self.regs: dict[str, np.ndarray] = {}
        # cp.async, per thread: copies not yet committed (threads, dst, data), committed ones with
        # each row's group number (threads, dst, data, group), and each thread's commits so far
        self.pending: list = []
        self.committed: list = []
        self.commits = np.zeros(threads, np.int64)
        self.warpgroups = [_Warpgroup(len(self.shared)) for _ in range(-(-threads // 128))]

    def run(self) -> None:
        """Every thread from the first instruction to ``ret``. Threads that branch apart each keep
        their own pc; the group at the smallest pc runs next (threads ahead wait), so paths rejoin
        where structured code rejoins: after an if, after a loop's last trip. A shuffle must find
        whole warps there, a wgmma whole warpgroups, a bar.sync every thread it counts."""
        instrs = self.program.instrs
        pcs = np.zeros(self.threads, np.int64)
        done = np.zeros(self.threads, bool)
        while not done.all():
            pc = int(pcs[~done].min())
            group = ~done & (pcs == pc)
            active = None if group.all() else group  # None: every thread, the fast path
            if pc >= len(instrs):
                done |= group
                continue
            guard, op, ops = instrs[pc]
            mask = active
            if guard is not None:
                taken = self.regs[guard[0]] != guard[1]
                mask = taken if active is None else taken & active
            if op[0] == "bra":
                taken = group if mask is None else mask & group
                pcs[taken] = self.program.labels[ops[0]]
                pcs[group & ~taken] = pc + 1
                continue
            if op[0] == "ret":
                done |= group if mask is None else mask & group
                pcs[group] = pc + 1
                for g, wg in enumerate(self.warpgroups):
                    assert not (done[128 * g:128 * g + 128].all() and wg.flying()), \
                        f"warpgroup {g} ends with a wgmma in flight"
                continue
            if op[0] != "wgmma" and self.program.wgmma:
                self._other_instruction(pc, group if mask is None else mask & group)
            if op[0] in ("shfl", "ldmatrix", "mma", "wgmma"):  # warp- or warpgroup-collective: whole ones here
                unit = 128 if op[0] == "wgmma" else 32
                whole = group.reshape(-1, unit)
                assert (whole.all(axis=1) | ~whole.any(axis=1)).all(), f"{'.'.join(op)} reached by part of a {unit}"
            elif op[:2] == ["bar", "sync"]:
                for met in self._barrier_met(ops, group, done):  # what a wgmma read is the others' again
                    for g, wg in enumerate(self.warpgroups):
                        if met[128 * g:128 * g + 128].all():
                            wg.retired[:] = False
            handler = getattr(self, "_" + op[0], None)
            if handler is None:
                raise NotImplementedError(".".join(op))
            handler(op, ops, mask)
            pcs[group] = pc + 1

    # -- registers ------------------------------------------------------------------------------
    def value(self, token: str, t: str) -> np.ndarray:
        if token in self.special:
            return self.special[token]
        if token.startswith("%"):
            return self.regs[token]
        if token == "tiles":
            return np.full(self.threads, SMEM_BASE, np.uint32)
        if token in self.static:  # a static shared array's address
            return np.full(self.threads, self.static[token], np.uint32)
        if t == "f32":
            return np.full(self.threads, _f32(token), np.float32)
        if t == "f64":
            return np.full(self.threads, struct.unpack("<d", bytes.fromhex(token[2:])[::-1])[0], np.float64)
        if token in self.program.tables:  # a table's address (mov.u64 %rd, name)
            return np.full(self.threads, self.params[token], np.uint64)
        if t == "s32":
            return np.full(self.threads, int(token, 0), np.int32)
        wide = t in ("u64", "b64")
        return np.full(self.threads, int(token, 0) & (2**64 - 1 if wide else 2**32 - 1), np.uint64 if wide else np.uint32)

    def write(self, name: str, value: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is None:
            self.regs[name] = np.array(value, copy=True)
        else:
            self.regs[name] = np.where(mask, value, self.regs.get(name, np.zeros_like(value))).astype(value.dtype)

    @staticmethod
    def _type(op: list[str]) -> str:
        return next(p for p in reversed(op) if p in ("u32", "b32", "u64", "b64", "f32", "f64", "s32", "pred"))

    def _binary(self, op, ops, mask, f) -> None:
        t = self._type(op)
        a, b = self.value(ops[1], t), self.value(ops[2], t)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            self.write(ops[0], np.asarray(f(a, b)).astype(a.dtype), mask)

    def _add(self, op, ops, mask):
        self._binary(op, ops, mask, np.add)

    def _sub(self, op, ops, mask):
        self._binary(op, ops, mask, np.subtract)

    def _mul(self, op, ops, mask):
        if op[1] == "wide":
            self.write(ops[0], self.value(ops[1], "u32").astype(np.uint64) * self.value(ops[2], "u32"), mask)
        else:
            self._binary(op, ops, mask, np.multiply)

    def _div(self, op, ops, mask):
        self._binary(op, ops, mask, np.divide if op[-1] == "f32" else np.floor_divide)  # div.rn.f32: IEEE

    def _sqrt(self, op, ops, mask):
        self._unary(ops, mask, np.sqrt, ftz="ftz" in op)

    def _rsqrt(self, op, ops, mask):
        self._unary(ops, mask, lambda x: np.float32(1) / np.sqrt(x), ftz="ftz" in op)

    def _rem(self, op, ops, mask):
        self._binary(op, ops, mask, np.remainder)

    def _min(self, op, ops, mask):
        self._binary(op, ops, mask, np.minimum)

    def _max(self, op, ops, mask):
        self._binary(op, ops, mask, np.maximum)

    def _and(self, op, ops, mask):
        self._binary(op, ops, mask, np.bitwise_and)

    def _or(self, op, ops, mask):
        self._binary(op, ops, mask, np.bitwise_or)

    def _xor(self, op, ops, mask):
        self._binary(op, ops, mask, np.bitwise_xor)

    def _shl(self, op, ops, mask):
        self._binary(op, ops, mask, lambda a, b: (a.astype(np.uint64) << b.astype(np.uint64)) & 0xFFFFFFFF)

    def _shr(self, op, ops, mask):
        self._binary(op, ops, mask, np.right_shift)

    def _mad(self, op, ops, mask):
        a, b, c = (self.value(x, "u32") for x in ops[1:4])
        with np.errstate(over="ignore"):
            self.write(ops[0], a * b + c, mask)

    def _fma(self, op, ops, mask):
        if op[-1] == "f64":  # not fused: the product rounds once more (an ulp of f64, for tests with tolerances)
            a, b, c = (self.value(x, "f64") for x in ops[1:4])
            self.write(ops[0], a * b + c, mask)
            return
        # the f64 product of two f32 is exact: one rounding of the sum, then to f32
        a, b, c = (self.value(x, "f32").astype(np.float64) for x in ops[1:4])
        self.write(ops[0], (a * b + c).astype(np.float32), mask)

    def _unary(self, ops, mask, f, t: str = "f32", ftz: bool = False) -> None:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            v = self.value(ops[1], t)
            out = _flush_subnormals(f(_flush_subnormals(v))) if ftz else f(v)
            self.write(ops[0], out.astype(v.dtype), mask)

    def _neg(self, op, ops, mask):
        self._unary(ops, mask, np.negative, op[-1])

    def _sin(self, op, ops, mask):
        self._unary(ops, mask, np.sin, ftz="ftz" in op)

    def _cos(self, op, ops, mask):
        self._unary(ops, mask, np.cos, ftz="ftz" in op)

    def _ex2(self, op, ops, mask):
        self._unary(ops, mask, np.exp2, ftz="ftz" in op)

    def _lg2(self, op, ops, mask):
        self._unary(ops, mask, np.log2, ftz="ftz" in op)

    def _rcp(self, op, ops, mask):
        self._unary(ops, mask, lambda x: np.float32(1) / x, ftz="ftz" in op)

    def _setp(self, op, ops, mask):
        compare = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
                   "ge": np.greater_equal}[op[1]]
        self.write(ops[0], compare(self.value(ops[1], op[2]), self.value(ops[2], op[2])), mask)

    def _selp(self, op, ops, mask):
        a, b = self.value(ops[1], op[1]), self.value(ops[2], op[1])
        self.write(ops[0], np.where(self.regs[ops[3]], a, b).astype(a.dtype), mask)

    def _mov(self, op, ops, mask):
        if ops[0].startswith("{"):  # a 32-bit register's two 16-bit halves, low first
            low, high = _vector(ops[0])
            v = self.value(ops[1], "b32")
            self.write(low, (v & 0xFFFF).astype(np.uint16), mask)
            self.write(high, (v >> 16).astype(np.uint16), mask)
        else:
            self.write(ops[0], self.value(ops[1], op[1]), mask)

    def _cvt(self, op, ops, mask):
        kind = ".".join(op[1:])
        if kind in ("rn.bf16x2.f32", "rn.f16x2.f32"):  # the first source to the upper half
            high, low = (_to_16(self.value(x, "f32"), op[2]).astype(np.uint32) for x in ops[1:3])
            self.write(ops[0], (high << 16) | low, mask)
        elif kind in ("rn.bf16.f32", "rn.f16.f32"):
            self.write(ops[0], _to_16(self.value(ops[1], "f32"), op[2]), mask)
        elif kind in ("f32.bf16", "f32.f16"):
            self.write(ops[0], _from_16(self.regs[ops[1]], op[2]), mask)
        elif kind == "u64.u32":
            self.write(ops[0], self.value(ops[1], "u32").astype(np.uint64), mask)
        elif kind == "rn.f64.s32":
            self.write(ops[0], self.regs[ops[1]].view(np.int32).astype(np.float64), mask)
        elif kind == "rni.f64.f64":
            self.write(ops[0], np.rint(self.value(ops[1], "f64")), mask)  # to nearest, ties to even
        elif kind == "rn.f32.f64":
            self.write(ops[0], self.value(ops[1], "f64").astype(np.float32), mask)
        else:
            raise NotImplementedError("cvt." + kind)

    def _cvta(self, op, ops, mask):
        self.write(ops[0], self.value(ops[1], "u64"), mask)

    def _shfl(self, op, ops, mask):
        lane = self.lane_id & 31
        other = self.value(ops[2], "u32")
        source = (lane ^ other) if op[2] == "bfly" else (other & 31)
        self.write(ops[0], self.value(ops[1], "b32")[self.lane_id - lane + source], mask)

    def _ldmatrix(self, op, ops, mask):
        """ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16: lane 8i + r of a warp gives the address
        of row r of matrix i; lane t gets matrix i's row t / 4, columns 2 (t % 4) and the next (the
        lower in the lower half) into register i, or with .trans its column t / 4, rows 2 (t % 4) and
        the next."""
        _whole(op, mask, 32)
        at, lane = self._address(ops[1], "shared"), self.lane_id & 31
        base = self.lane_id - lane  # each thread's warp's lane 0
        trans, names = "trans" in op, _vector(ops[0])
        assert op[4] == f"x{len(names)}" and (at % 16 == 0).all(), ".".join(op)  # 16-byte rows
        rows = at[base[:, None] + np.arange(8 * len(names))]  # every address a lane's warp gives
        self._landed(np.unique(rows)[:, None] + np.arange(16), "ldmatrix")
        for i, name in enumerate(names):
            pair = []
            for e in range(2):
                row, col = (2 * (lane % 4) + e, lane // 4) if trans else (lane // 4, 2 * (lane % 4) + e)
                pair.append(self._halves(at[base + 8 * i + row] + 2 * col).astype(np.uint32))
            self.write(name, pair[0] | (pair[1] << 16), mask)

    def _mma(self, op, ops, mask):
        """mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 d, a, b, c per warp: A in the m16k16
        fragment layout (``_a_registers``), B's register r: rows 2 (t % 4) + 8 r and the next of
        column t / 4, D and C: ``_accumulator``'s first four."""
        assert op[3:7] == ["m16n8k16", "row", "col", "f32"] and op[-1] == "f32", ".".join(op)
        assert op[7] == op[8] and op[7] in ("bf16", "f16"), ".".join(op)
        assert [len(_vector(x)) for x in ops] == [4, 4, 2, 4], ".".join(op)
        _whole(op, mask, 32)
        dtype = op[7]
        for w in range(self.threads // 32):
            lanes = slice(32 * w, 32 * w + 32)
            if mask is not None and not mask[lanes].any():
                continue
            t = np.arange(32)
            a = self._a_registers(_vector(ops[1]), lanes, dtype)
            b = np.zeros((16, 8), np.float32)
            for r, name in enumerate(_vector(ops[2])):
                v = self.regs[name][lanes].astype(np.uint32)
                row, col = 2 * (t % 4) + 8 * r, t // 4
                b[row, col], b[row + 1, col] = _from_16(v & 0xFFFF, dtype), _from_16(v >> 16, dtype)
            d = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
            c = [self.regs[name][lanes].astype(np.float32) for name in _vector(ops[3])]
            for i, name in enumerate(_vector(ops[0])):
                row, col = _accumulator(i, 32)
                out = self.regs.setdefault(name, np.zeros(self.threads, np.float32))
                assert out.dtype == np.float32, f"{name}: an mma accumulator holding {out.dtype}"
                out[lanes] = d[row, col] + c[i]

    # -- memory -----------------------------------------------------------------------------------
    def _address(self, token: str, space: str) -> np.ndarray:
        m = re.fullmatch(r"\[([%\w.]+)(?:\+(\d+))?\]", token)
        return self.value(m[1], "u64" if space == "global" else "u32").astype(np.int64) + int(m[2] or 0)

    def _space(self, space: str) -> np.ndarray:
        return self.shared if space == "shared" else self.memory.bytes

    def _ld(self, op, ops, mask):
        space = next(p for p in op[1:] if p in ("param", "global", "shared"))  # past .volatile, .relaxed
        if space == "param":
            value = self.params[ops[1][1:-1]]
            if op[2] == "f32":  # a float argument
                self.write(ops[0], np.full(self.threads, value, np.float32), mask)
            else:
                self.write(ops[0], np.full(self.threads, value, np.uint64 if op[2] == "u64" else np.uint32), mask)
            return
        at, on = self._address(ops[1], space), np.ones(self.threads, bool) if mask is None else mask
        wide = op[-1] in ("f64", "u64", "b64")
        if space == "shared":
            width = len(_vector(ops[0])) * (8 if wide else 4)
            self._landed(at[on][:, None] + np.arange(width), "ld.shared")
        for i, name in enumerate(_vector(ops[0])):
            size = 8 if wide else 4
            words = np.zeros(self.threads, np.uint64 if wide else np.uint32)
            where = at[on, None] + size * i + np.arange(size)
            words[on] = np.ascontiguousarray(self._space(space)[where]).view(words.dtype)[:, 0]
            self.write(name, words.view({"f32": np.float32, "f64": np.float64, "s32": np.int32}.get(op[-1], words.dtype)),
                       mask)

    def _st(self, op, ops, mask):
        space = next(p for p in op[1:] if p in ("param", "global", "shared"))  # past .volatile, .relaxed
        at, on = self._address(ops[0], space), np.ones(self.threads, bool) if mask is None else mask
        size = 2 if op[-1] in ("b16", "u16") else 4
        for i, name in enumerate(_vector(ops[1])):
            v = self.value(name, op[-1])
            words = v.astype(np.float32).view(np.uint32) if op[-1] == "f32" else v.astype(np.uint32)
            where = at[on] + size * i
            if space == "global":
                assert all(any(lo <= w < hi for lo, hi in self.memory.writable) for w in where), "a write outside the outputs"
            data = np.ascontiguousarray(words[on]).view(np.uint8).reshape(-1, 4)[:, :size]
            if space == "shared":
                self._shared_written(np.nonzero(on)[0], where[:, None] + np.arange(size))
            self._space(space)[where[:, None] + np.arange(size)] = data

    def _atom(self, op, ops, mask):
        """atom.global.add.u32 d, [a], v: the block's threads one after another (lockstep)."""
        assert op[1:] == ["global", "add", "u32"], ".".join(op)
        at, on = self._address(ops[1], "global"), np.ones(self.threads, bool) if mask is None else mask
        value, old = self.value(ops[2], "u32"), np.zeros(self.threads, np.uint32)
        for t in np.nonzero(on)[0]:
            assert any(lo <= at[t] < hi for lo, hi in self.memory.writable), "an atomic outside the outputs"
            word = self.memory.bytes[at[t]:at[t] + 4].view(np.uint32)
            old[t] = word[0]
            word[0] = old[t] + value[t]
        self.write(ops[0], old, mask)

    def _cp(self, op, ops, mask):
        """cp.async per thread, as the hardware keeps it: a thread's copies join its next commit's
        group, and its wait_group N lands its copies of all but its N newest groups (so threads
        that commit and wait apart, a block's teams, keep apart groups)."""
        kind = op[2]
        on = np.ones(self.threads, bool) if mask is None else mask
        if kind == "cg":  # cp.async.cg.shared.global [dst], [src], 16, src_size: zeros past src_size
            dst, src = self._address(ops[0], "shared")[on], self._address(ops[1], "global")[on]
            size = self.value(ops[3], "u32")[on].astype(np.int64)
            valid = np.arange(16) < size[:, None]
            data = np.where(valid, self.memory.bytes[np.where(valid, src[:, None] + np.arange(16), 0)], 0).astype(np.uint8)
            assert (dst % 16 == 0).all() and (dst >= SMEM_BASE).all() and (dst + 16 <= len(self.shared)).all()
            self._shared_written(np.nonzero(on)[0], dst[:, None] + np.arange(16))  # it may land any time from now
            self.pending.append((np.nonzero(on)[0], dst, data))
        elif kind == "commit_group":
            kept = []
            for threads, dst, data in self.pending:
                mine = on[threads]
                if mine.any():
                    self.committed.append((threads[mine], dst[mine], data[mine], self.commits[threads[mine]]))
                if not mine.all():
                    kept.append((threads[~mine], dst[~mine], data[~mine]))
            self.pending = kept
            self.commits[on] += 1
        elif kind == "wait_group":
            rest = []
            for threads, dst, data, group in self.committed:  # oldest first: a later copy lands over it
                due = on[threads] & (group < self.commits[threads] - int(ops[0]))
                self.shared[dst[due][:, None] + np.arange(16)] = data[due]
                if not due.all():
                    rest.append((threads[~due], dst[~due], data[~due], group[~due]))
            self.committed = rest
        else:
            raise NotImplementedError(".".join(op))

    def _barrier_met(self, ops, group: np.ndarray, done: np.ndarray) -> list[np.ndarray]:
        """bar.sync id[, count]: lockstep brings every thread that reaches the barrier here
        together, so each id must find its whole count (no count: every live thread). Returns the
        threads that met, by barrier."""
        if len(ops) < 2:
            assert (group == ~done).all(), "bar.sync reached by some of the block's threads only"
            return [group]
        ids, count = self.value(ops[0], "u32"), int(ops[1], 0)
        met = []
        for i in np.unique(ids[group]):
            met.append(group & (ids == i))
            assert met[-1].sum() == count, f"barrier {i}: {met[-1].sum()} threads here, {count} expected"
        return met

    def _bar(self, op, ops, mask):  # lockstep: the threads that meet are already here
        pass

    def _fence(self, op, ops, mask):
        pass

    # -- wgmma ------------------------------------------------------------------------------------
    def _other_instruction(self, pc: int, threads: np.ndarray) -> None:
        """An instruction other than wgmma's, by ``threads``: none may name a register of its
        warpgroup's wgmmas in flight; what it names is touched until the warpgroup's next wgmma.fence."""
        names = self.program.names[pc]
        for g, wg in enumerate(self.warpgroups):
            if not threads[128 * g:128 * g + 128].any():
                continue
            flying = names & wg.in_flight
            assert not flying, (f"instruction {pc} ({'.'.join(self.program.instrs[pc][1])}) names {sorted(flying)} "
                                f"while a wgmma of warpgroup {g} is in flight")
            wg.touched |= names

    def _landed(self, at: np.ndarray, reader: str) -> None:
        """No cp.async still to land (this thread's or another's) writes shared bytes ``at``."""
        landing = [dst for _, dst, *_ in self.pending + self.committed]
        if landing:
            copied = np.zeros(len(self.shared), bool)
            copied[np.concatenate(landing)[:, None] + np.arange(16)] = True
            assert not copied[at].any(), f"{reader} reads shared bytes a cp.async has not landed"

    def _shared_written(self, threads: np.ndarray, at: np.ndarray) -> None:
        """Threads ``threads`` write shared bytes ``at`` (a row of byte addresses each): none a
        wgmma in flight reads, none another warpgroup's wgmma read since a barrier covered both."""
        for g, wg in enumerate(self.warpgroups):
            mine = (threads // 128) == g
            if wg.flying():
                assert not wg.reading()[at].any(), f"a shared write onto bytes a wgmma of warpgroup {g} in flight reads"
            assert not wg.retired[at[~mine]].any(), \
                f"a shared write onto bytes a wgmma of warpgroup {g} read, with no barrier between them"

    def _wgmma(self, op, ops, mask):
        _whole(op, mask, 128)
        for g, wg in enumerate(self.warpgroups):
            lanes = slice(128 * g, 128 * g + 128)
            if mask is not None and not mask[lanes].any():  # a warpgroup elsewhere
                continue
            if op[1] == "fence":
                wg.touched.clear()
            elif op[1] == "mma_async":
                wg.issued.append(self._issue(op, ops, lanes, wg))
                wg.in_flight.update(wg.issued[-1].accs + wg.issued[-1].a_regs)
            elif op[1] == "commit_group":
                wg.groups.append(wg.issued)
                wg.issued = []
            elif op[1] == "wait_group":
                while len(wg.groups) > int(ops[0]):
                    for product in wg.groups.pop(0):
                        self._product(lanes, product)
                        wg.retired[product.at] = True
                wg.in_flight = {r for p in wg.flying() for r in p.accs + p.a_regs}

    def _issue(self, op: list[str], ops: list[str], lanes: slice, wg: "_Warpgroup") -> "_Product":
        """A wgmma.mma_async, checked and recorded: its descriptors and scale-d are read now, its
        registers and shared bytes when it runs."""
        accs = _vector(ops[0])
        a = _vector(ops[1]) if ops[1].startswith("{") else self._descriptor(ops[1], lanes)
        scale_d = self.regs[ops[3]][lanes]
        assert scale_d.all() or not scale_d.any()
        n, flags = int(re.fullmatch(r"m64n(\d+)k16", op[4])[1]), [int(x) for x in ops[4:]]
        b_at = _operand_at(self._descriptor(ops[2], lanes), n, bool(flags[-1]))
        a_at = None if isinstance(a, list) else _operand_at(a, 64, bool(flags[2]))
        a_regs = a if isinstance(a, list) else []
        at = np.concatenate([x.ravel() for x in (a_at, b_at) if x is not None])
        at = np.concatenate([at, at + 1])  # each element's two bytes
        touched = (set(accs) | set(a_regs)) & wg.touched
        assert not touched, f"wgmma registers {sorted(touched)} touched since the warpgroup's last wgmma.fence"
        for other in wg.flying():
            assert not set(a_regs) & set(other.accs), "a wgmma reads the accumulators of one in flight"
            assert accs == other.accs or not set(accs) & (set(other.accs) | set(other.a_regs)), \
                "a wgmma writes registers of one in flight (other than the same accumulators)"
        self._landed(at, "a wgmma")
        return _Product(accs, a_regs, a_at, b_at, at, self.shared[at].copy(), bool(scale_d[0]), op[6])

    def _product(self, lanes: slice, p: "_Product") -> None:
        """One wgmma.mma_async of the warpgroup at ``lanes``, run now."""
        assert (self.shared[p.at] == p.bytes).all(), "a wgmma's shared operand changed between its issue and wait"
        a = self._a_registers(p.a_regs, lanes, p.dtype) if p.a_at is None else self._shared_operand(p.a_at, p.dtype)
        b = self._shared_operand(p.b_at, p.dtype)
        d = (a.astype(np.float64) @ b.astype(np.float64).T).astype(np.float32)
        for i, name in enumerate(p.accs):
            rows, cols = _accumulator(i)
            old = self.regs.setdefault(name, np.zeros(self.threads, np.float32))
            old[lanes] = d[rows, cols] + (old[lanes] if p.accumulate else 0)

    def _descriptor(self, token: str, lanes: slice) -> int:
        values = self.regs[token][lanes]
        assert (values == values[0]).all(), "a descriptor that differs across the warpgroup"
        return int(values[0])

    def _a_registers(self, names: Sequence[str], lanes: slice, dtype: str) -> np.ndarray:
        """A (16 rows a warp of ``lanes`` x 16) from each warp's m16k16 fragments: register r holds
        rows group + 8 (r % 2), columns 2 quad + 8 (r // 2) and the next, the lower column in the
        lower half."""
        t = np.arange(lanes.stop - lanes.start)
        a = np.zeros((len(t) // 2, 16), np.float32)
        row0, col0 = 16 * (t // 32) + (t % 32) // 4, 2 * (t % 4)
        for r, name in enumerate(names):
            v = self.regs[name][lanes].astype(np.uint32)
            row, col = row0 + 8 * (r % 2), col0 + 8 * (r // 2)
            a[row, col], a[row, col + 1] = _from_16(v & 0xFFFF, dtype), _from_16(v >> 16, dtype)
        return a

    def _halves(self, at: np.ndarray) -> np.ndarray:
        """The 16-bit words (little-endian) at shared byte addresses ``at``."""
        return self.shared[at].astype(np.uint16) | (self.shared[at + 1].astype(np.uint16) << 8)

    def _shared_operand(self, at: np.ndarray, dtype: str) -> np.ndarray:
        """The 16-bit values at byte addresses ``at`` (``_operand_at``'s)."""
        return _from_16(self._halves(at), dtype)


def _whole(op: list[str], mask: np.ndarray | None, unit: int) -> None:
    """A warp- (warpgroup-) collective's guard is the same for every thread of each unit."""
    assert mask is None or (mask.reshape(-1, unit).all(axis=1) | ~mask.reshape(-1, unit).any(axis=1)).all(), \
        f"{'.'.join(op)} guarded off for part of a {unit}-thread unit"


def _operand_at(desc: int, outer: int, mn_major: bool) -> np.ndarray:
    """The shared address of each element [outer][16 k] of the operand ``desc`` describes (the
    layouts in the module's docstring)."""
    start, lbo, sbo = ((desc >> shift & 0x3FFF) << 4 for shift in (0, 16, 32))
    assert desc >> 62 == 1 and (desc >> 49) & 7 == 0, "not a 128-byte swizzled operand at a 1024-byte phase"
    o, k = np.arange(outer)[:, None], np.arange(16)[None, :]
    at = (start + (o // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + (o % 64) * 2 if mn_major
          else start + (o // 8) * sbo + (o % 8) * 128 + k * 2)
    return at ^ (((at >> 7) & 7) << 4)


class _Product(NamedTuple):
    """A wgmma.mma_async issued: its registers, the shared addresses of its operands (A's: None
    where A is in registers) and the bytes there at issue."""

    accs: list[str]
    a_regs: list[str]
    a_at: np.ndarray | None
    b_at: np.ndarray
    at: np.ndarray  # every shared byte it reads
    bytes: np.ndarray
    accumulate: bool
    dtype: str


class _Warpgroup:
    """One warpgroup's wgmmas: issued but not committed, committed groups not yet run, and their
    registers; the registers its other instructions touched since its last wgmma.fence; the shared bytes its
    finished wgmmas read, which other warpgroups may not write until a barrier covers it."""

    def __init__(self, shared_bytes: int):
        self.issued: list[_Product] = []
        self.groups: list[list[_Product]] = []
        self.in_flight: set[str] = set()  # their registers (kept: every other instruction is checked against them)
        self.touched: set[str] = set()
        self.retired = np.zeros(shared_bytes, bool)

    def flying(self) -> list[_Product]:
        return [p for group in self.groups for p in group] + self.issued

    def reading(self) -> np.ndarray:
        out = np.zeros(len(self.retired), bool)
        for p in self.flying():
            out[p.at] = True
        return out


def _accumulator(i: int, threads: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of accumulator register i of each of a warpgroup's 128 threads (or a warp's:
    mma.sync's m16n8, registers 0-3)."""
    t = np.arange(threads)
    return 16 * (t // 32) + (t % 32) // 4 + 8 * ((i % 4) // 2), 8 * (i // 4) + 2 * (t % 4) + i % 2


def launch(spec: KernelSpec, dims: tuple[tuple[int, int, int], int | tuple[int, ...]], *args: np.ndarray | int,
           reverse: bool = False) -> list[np.ndarray]:
    """Run ``spec`` (sm_90) over its grid on ``args`` (arrays or ints, in parameter order); returns
    every array argument after the run, as ``cudacall.call`` does on a GPU. The blocks run one after
    another in grid order (``reverse``: the other way round, so the last block is the first)."""
    program = Program(spec.emit(Target("sm_90")))
    (gx, gy, gz), threads = dims
    memory, outputs = Memory(), set(spec.outputs())
    at = [memory.put(a, name in outputs) if isinstance(a, np.ndarray) else a
          for (name, _), a in zip(spec.params(), args)]
    params = dict(zip(program.params, at))
    params.update({name: memory.put(table, False) for name, table in program.tables.items()})
    blocks = [(x, y, z) for z in range(gz) for y in range(gy) for x in range(gx)]
    for ctaid in reversed(blocks) if reverse else blocks:
        Block(program, threads, ctaid, (gx, gy, gz), params, memory, spec.dynamic_shared_bytes()).run()
    return [memory.get(p, a) for p, a in zip(at, args) if isinstance(a, np.ndarray)]
