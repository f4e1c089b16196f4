"""A typed PTX builder: virtual registers, one method per instruction, exact immediates.

Registers are virtual (ptxas allocates); every instruction checks its operand types when it is
built, so a wrong-typed operand fails here with a message naming the instruction, not later in
ptxas. Float immediates are written by their bits (f32 ``0fXXXXXXXX``, f64 ``0dXXXXXXXXXXXXXXXX``)
so the value in the text is exactly the value used.
"""
from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence, Union

from . import exact


class PtxBuildError(TypeError):
    """A PTX instruction was built with operands it cannot take."""


class T(enum.Enum):
    """PTX fundamental types: value is the PTX spelling, then (class, bytes)."""

    PRED = "pred"
    B8 = "b8"  # shared byte arrays only: no register of this type is declared
    B16 = "b16"
    B32 = "b32"
    B64 = "b64"
    U16 = "u16"
    U32 = "u32"
    U64 = "u64"
    S16 = "s16"
    S32 = "s32"
    S64 = "s64"
    F16 = "f16"
    BF16 = "bf16"
    F32 = "f32"
    F64 = "f64"

    @property
    def cls(self) -> str:
        """'pred', 'b', 'u', 's', 'f' or 'bf'."""
        return self.value.rstrip("0123456789")

    @property
    def bits(self) -> int:
        return 1 if self is T.PRED else int(self.value.lstrip("bfsu"))

    @property
    def is_float(self) -> bool:
        return self.cls in ("f", "bf")

    @property
    def is_int(self) -> bool:
        return self.cls in ("u", "s")


# Register name prefix per type: one prefix per exact type keeps declarations one line each.
_PREFIX = {
    T.PRED: "p", T.B16: "bh", T.B32: "b", T.B64: "bd", T.U16: "h", T.U32: "r", T.U64: "rd",
    T.S16: "sh", T.S32: "s", T.S64: "sd", T.F16: "hf", T.F32: "f", T.F64: "fd",
}


@dataclass(frozen=True)
class Reg:
    name: str
    type: T

    def __str__(self) -> str:
        return self.name

    def __invert__(self) -> "Guard":
        if self.type is not T.PRED:
            raise PtxBuildError(f"~{self.name}: only a .pred register can be negated")
        return Guard(self, negated=True)


@dataclass(frozen=True)
class Guard:
    """An instruction predicate: ``@p`` or ``@!p``."""

    pred: Reg
    negated: bool = False

    def __str__(self) -> str:
        return f"@{'!' if self.negated else ''}{self.pred.name}"


@dataclass(frozen=True)
class Label:
    name: str


@dataclass(frozen=True)
class Symbol:
    """A module- or kernel-scope variable (shared array, initialised global table)."""

    name: str
    space: str
    type: T
    count: int


@dataclass(frozen=True)
class Addr:
    """A memory operand ``[base+offset]``; base is a 32/64-bit register or a symbol."""

    base: Union[Reg, Symbol]
    offset: int = 0

    def __str__(self) -> str:
        base = self.base.name
        return f"[{base}]" if self.offset == 0 else f"[{base}{self.offset:+d}]"


class _Loop:
    def __init__(self, b: "KernelBuilder", count: Reg, base: str):
        self.b, self.count = b, count
        self.top, self.end = b.new_label(base), b.new_label(base + "_end")

    def __enter__(self) -> Reg:
        b = self.b
        self.i = b.mov(0, T.U32)
        b.place(self.top)
        b.bra(self.end, guard=b.setp("ge", self.i, self.count))
        return self.i

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            b = self.b
            b.add(self.i, 1, out=self.i)
            b.bra(self.top)
            b.place(self.end)


Operand = Union[Reg, int, float]
GuardLike = Union[Reg, Guard, None]


def f32_hex(value: float) -> str:
    """Exact f32 immediate: the value rounded to the nearest f32 (by integer arithmetic, so no FPU
    rounding mode can reach it), written by its bits."""
    try:
        rounded = exact.f32(Fraction(value)) if math.isfinite(value) and value != 0 else value  # keeps -0.0
        bits = struct.unpack(">I", struct.pack(">f", rounded))[0]  # exact: rounded is an f32 value
    except OverflowError:
        raise PtxBuildError(f"{value!r} overflows f32") from None
    return f"0f{bits:08X}"


def f64_hex(value: float) -> str:
    bits = struct.unpack(">Q", struct.pack(">d", value))[0]
    return f"0d{bits:016X}"


def _int_range(t: T) -> tuple[int, int]:
    if t.cls == "s":
        return -(1 << (t.bits - 1)), (1 << (t.bits - 1)) - 1
    return 0 if t.cls == "u" else -(1 << (t.bits - 1)), (1 << t.bits) - 1


def immediate(value: object, t: T) -> str:
    """Format a Python number as an immediate of PTX type ``t``, refusing lossy or ill-typed ones."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PtxBuildError(f"immediate {value!r} is not a number for .{t.value}")
    if t in (T.F32, T.F64):
        if isinstance(value, int) and float(value) != value:
            raise PtxBuildError(f"integer immediate {value} is not exact as .{t.value}")
        return f32_hex(float(value)) if t is T.F32 else f64_hex(float(value))
    if t.is_float:
        raise PtxBuildError(f".{t.value} immediates are not supported; convert from f32")
    if isinstance(value, float):
        raise PtxBuildError(f"float immediate {value!r} given for integer type .{t.value}")
    lo, hi = _int_range(t)
    if not lo <= value <= hi:
        raise PtxBuildError(f"immediate {value} out of range for .{t.value}")
    return str(value)


def compatible(want: T, have: T) -> bool:
    """PTX operand compatibility: same type, same-size integers, or a bit type of the same size."""
    if want is have:
        return True
    if T.PRED in (want, have) or want.bits != have.bits:
        return False
    return "b" in (want.cls, have.cls) or (want.is_int and have.is_int)


_SPECIAL = {"%tid.x", "%tid.y", "%tid.z", "%ntid.x", "%ntid.y", "%ntid.z", "%ctaid.x", "%ctaid.y",
            "%ctaid.z", "%nctaid.x", "%nctaid.y", "%nctaid.z", "%laneid", "%warpid"}
_CMP = {"eq", "ne", "lt", "le", "gt", "ge"}
# The float functions PTX has, per type, with the rounding modes each exists in.
# approx.ftz: an f32 function's one-instruction form (MUFU), subnormal inputs and results flushed to
# zero; plain approx handles subnormals with extra instructions around it (fastmath)
_FN_MODES = {
    ("rsqrt", T.F32): ("approx", "approx.ftz"), ("rsqrt", T.F64): ("approx", "approx.ftz"),
    ("sqrt", T.F32): ("approx", "approx.ftz", "rn"), ("sqrt", T.F64): ("rn",),
    ("rcp", T.F32): ("approx", "approx.ftz", "rn"), ("rcp", T.F64): ("approx.ftz", "rn"),
    ("ex2", T.F32): ("approx", "approx.ftz"), ("lg2", T.F32): ("approx", "approx.ftz"),
    ("sin", T.F32): ("approx", "approx.ftz"), ("cos", T.F32): ("approx", "approx.ftz"),
}


class KernelBuilder:
    """Builds one ``.entry`` and the module-scope data it uses, then renders the module text."""

    def __init__(self, name: str, arch: str, ptx_version: tuple[int, int],
                 params: Sequence[tuple[str, T]]):
        self.name = name
        self.arch = arch
        self.ptx_version = ptx_version
        self.params = tuple(params)
        self._param_types = dict(self.params)
        if len(self._param_types) != len(self.params):
            raise PtxBuildError(f"{name}: duplicate parameter names")
        self._counts: dict[T, int] = {}
        self._body: list[str] = []
        self._module_vars: list[str] = []
        self._kernel_vars: list[str] = []
        self._directives: list[str] = []
        self._names: set[str] = set()
        self._labels = 0

    # -- registers, names, operands -------------------------------------------------------
    def reg(self, t: T) -> Reg:
        if t is T.BF16:  # PTX holds bf16 values in .b16 registers
            t = T.B16
        n = self._counts.get(t, 0) + 1
        self._counts[t] = n
        return Reg(f"%{_PREFIX[t]}{n}", t)

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def _op(self, ins: str, value: object, t: T, what: str) -> str:
        if isinstance(value, Reg):
            if not compatible(t, value.type):
                raise PtxBuildError(f"{ins}: {what} is {value.name} of type .{value.type.value}, "
                                    f"expected .{t.value}")
            return value.name
        try:
            return immediate(value, t)
        except PtxBuildError as e:
            raise PtxBuildError(f"{ins}: {what}: {e}") from None

    def _emit(self, text: str, guard: GuardLike = None) -> None:
        if guard is not None:
            g = guard if isinstance(guard, Guard) else Guard(guard)
            if g.pred.type is not T.PRED:
                raise PtxBuildError(f"{text.split()[0]}: guard {g.pred.name} is not a .pred register")
            text = f"{g} {text}"
        self._body.append(f"\t{text};")

    @staticmethod
    def _type_of(ins: str, *values: object, t: T | None = None) -> T:
        if t is not None:
            return t
        for v in values:
            if isinstance(v, Reg):
                return v.type
        raise PtxBuildError(f"{ins}: cannot infer the type from immediates alone; pass t=")

    def _dst(self, ins: str, out: Reg | None, t: T) -> Reg:
        if out is None:
            return self.reg(t)
        if not compatible(t, out.type):
            raise PtxBuildError(f"{ins}: destination {out.name} is .{out.type.value}, expected .{t.value}")
        return out

    # -- parameters, special registers, moves -----------------------------------------------
    def ld_param(self, name: str) -> Reg:
        if name not in self._param_types:
            raise PtxBuildError(f"ld.param: {self.name} has no parameter {name!r}")
        t = self._param_types[name]
        d = self.reg(t)
        self._emit(f"ld.param.{t.value} {d}, [{self.name}_param_{name}]")
        return d

    def special(self, sreg: str) -> Reg:
        if sreg not in _SPECIAL:
            raise PtxBuildError(f"mov: unknown special register {sreg}")
        d = self.reg(T.U32)
        self._emit(f"mov.u32 {d}, {sreg}")
        return d

    def mov(self, src: Operand, t: T | None = None, *, out: Reg | None = None,
            guard: GuardLike = None) -> Reg:
        t = self._type_of("mov", out, src, t=t)
        d = self._dst("mov", out, t)
        self._emit(f"mov.{t.value} {d}, {self._op('mov', src, t, 'source')}", guard)
        return d

    def addr_of(self, sym: Symbol) -> Reg:
        """Address of a variable: 32-bit for shared memory, 64-bit generic-to-space otherwise."""
        t = T.U32 if sym.space == "shared" else T.U64
        d = self.reg(t)
        self._emit(f"mov.{t.value} {d}, {sym.name}")
        return d

    def cvta_global(self, ptr: Reg) -> Reg:
        d = self.reg(T.U64)
        self._emit(f"cvta.to.global.u64 {d}, {self._op('cvta', ptr, T.U64, 'address')}")
        return d

    # -- arithmetic ---------------------------------------------------------------------------
    def _binary(self, op: str, a: Operand, b: Operand, t: T | None, out: Reg | None,
                guard: GuardLike, float_mod: str = ".rn", int_mod: str = "") -> Reg:
        t = self._type_of(op, a, b, out, t=t)
        mod = float_mod if t.is_float else int_mod
        ins = f"{op}{mod}.{t.value}"
        d = self._dst(ins, out, t)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}, {self._op(ins, b, t, 'b')}", guard)
        return d

    def add(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None,
            guard: GuardLike = None) -> Reg:
        return self._binary("add", a, b, t, out, guard)

    def sub(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None,
            guard: GuardLike = None) -> Reg:
        return self._binary("sub", a, b, t, out, guard)

    def mul(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None,
            guard: GuardLike = None) -> Reg:
        return self._binary("mul", a, b, t, out, guard, int_mod=".lo")

    def div(self, a: Operand, b: Operand, t: T | None = None, *, approx: bool = False,
            out: Reg | None = None, guard: GuardLike = None) -> Reg:
        return self._binary("div", a, b, t, out, guard, float_mod=".approx" if approx else ".rn")

    def rem(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None) -> Reg:
        t = self._type_of("rem", a, b, out, t=t)
        if not t.is_int:
            raise PtxBuildError(f"rem.{t.value}: rem takes integer types")
        return self._binary("rem", a, b, t, out, None)

    def min(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None) -> Reg:
        return self._binary("min", a, b, t, out, None, float_mod="")

    def max(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None) -> Reg:
        return self._binary("max", a, b, t, out, None, float_mod="")

    def _bitwise(self, op: str, a: Operand, b: Operand, t: T | None, out: Reg | None) -> Reg:
        t = self._type_of(op, a, b, out, t=t)
        if t.is_float or t is T.PRED and op not in ("and", "or", "xor"):
            raise PtxBuildError(f"{op}.{t.value}: bitwise ops take integer, bit or pred types")
        bt = t if t is T.PRED else T(f"b{t.bits}")
        ins = f"{op}.{bt.value}"
        d = self._dst(ins, out, t)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}, {self._op(ins, b, t, 'b')}")
        return d

    def and_(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None) -> Reg:
        return self._bitwise("and", a, b, t, out)

    def or_(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None) -> Reg:
        return self._bitwise("or", a, b, t, out)

    def xor(self, a: Operand, b: Operand, t: T | None = None, *, out: Reg | None = None) -> Reg:
        return self._bitwise("xor", a, b, t, out)

    def _shift(self, op: str, a: Reg, n: Operand) -> Reg:
        if not a.type.is_int and a.type.cls != "b":
            raise PtxBuildError(f"{op}: shifts take integer or bit registers, got .{a.type.value}")
        t = a.type if op == "shr" else T(f"b{a.type.bits}")
        ins = f"{op}.{t.value}"
        d = self.reg(a.type)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}, {self._op(ins, n, T.U32, 'shift')}")
        return d

    def shl(self, a: Reg, n: Operand) -> Reg:
        return self._shift("shl", a, n)

    def shr(self, a: Reg, n: Operand) -> Reg:
        return self._shift("shr", a, n)

    def mul_wide(self, a: Operand, b: Operand) -> Reg:
        """32 x 32 -> 64-bit product (u32 -> u64, s32 -> s64), for byte offsets."""
        t = self._type_of("mul.wide", a, b)
        if t not in (T.U32, T.S32):
            raise PtxBuildError(f"mul.wide.{t.value}: takes .u32 or .s32")
        ins = f"mul.wide.{t.value}"
        d = self.reg(T.U64 if t is T.U32 else T.S64)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}, {self._op(ins, b, t, 'b')}")
        return d

    def mad(self, a: Operand, b: Operand, c: Operand, t: T | None = None, *,
            out: Reg | None = None) -> Reg:
        """Integer a*b+c (low half)."""
        t = self._type_of("mad", a, b, c, out, t=t)
        if not t.is_int:
            raise PtxBuildError(f"mad.lo.{t.value}: use fma for floats")
        ins = f"mad.lo.{t.value}"
        d = self._dst(ins, out, t)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}, {self._op(ins, b, t, 'b')}, "
                   f"{self._op(ins, c, t, 'c')}")
        return d

    def fma(self, a: Operand, b: Operand, c: Operand, t: T | None = None, *,
            out: Reg | None = None, guard: GuardLike = None) -> Reg:
        """Float a*b+c with one rounding."""
        t = self._type_of("fma", a, b, c, out, t=t)
        if t not in (T.F32, T.F64):
            raise PtxBuildError(f"fma.rn.{t.value}: fma takes .f32 or .f64")
        ins = f"fma.rn.{t.value}"
        d = self._dst(ins, out, t)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}, {self._op(ins, b, t, 'b')}, "
                   f"{self._op(ins, c, t, 'c')}", guard)
        return d

    def _unary(self, ins: str, a: Reg, t: T, out: Reg | None = None) -> Reg:
        d = self._dst(ins, out, t)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}")
        return d

    def neg(self, a: Reg, *, out: Reg | None = None) -> Reg:
        return self._unary(f"neg.{a.type.value}", a, a.type, out)

    def abs(self, a: Reg, *, out: Reg | None = None) -> Reg:
        return self._unary(f"abs.{a.type.value}", a, a.type, out)

    def fn(self, name: str, a: Reg, mode: str = "approx", *, out: Reg | None = None) -> Reg:
        """Float functions: rsqrt, sqrt, rcp, ex2, lg2, sin, cos, in the modes PTX has them."""
        modes = _FN_MODES.get((name, a.type))
        if modes is None:
            raise PtxBuildError(f"{name}.{a.type.value} does not exist in PTX")
        if mode not in modes:
            raise PtxBuildError(f"{name}.{mode}.{a.type.value} does not exist; modes: {modes}")
        return self._unary(f"{name}.{mode}.{a.type.value}", a, a.type, out)

    # -- comparisons, selection, conversion ----------------------------------------------------
    def setp(self, cmp: str, a: Operand, b: Operand, t: T | None = None) -> Reg:
        if cmp not in _CMP:
            raise PtxBuildError(f"setp: unknown comparison {cmp!r}")
        t = self._type_of("setp", a, b, t=t)
        ins = f"setp.{cmp}.{t.value}"
        d = self.reg(T.PRED)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}, {self._op(ins, b, t, 'b')}")
        return d

    def selp(self, a: Operand, b: Operand, p: Reg, t: T | None = None) -> Reg:
        """``p ? a : b``."""
        t = self._type_of("selp", a, b, t=t)
        ins = f"selp.{t.value}"
        d = self.reg(t)
        self._emit(f"{ins} {d}, {self._op(ins, a, t, 'a')}, {self._op(ins, b, t, 'b')}, "
                   f"{self._op(ins, p, T.PRED, 'predicate')}")
        return d

    def cvt(self, to: T, a: Reg, rnd: str | None = None, *, src: T | None = None) -> Reg:
        """Conversion; the rounding PTX requires (float narrowing, int<->float) is filled in.

        ``src`` names the source type when the register is a bit type (bf16 lives in .b16).
        """
        src = src or a.type
        if not compatible(src, a.type):
            raise PtxBuildError(f"cvt: {a.name} is .{a.type.value}, not .{src.value}")
        if rnd is None:
            if to.is_float and (src.is_int or to.bits < src.bits):
                rnd = "rn"
            elif to.is_int and src.is_float:
                rnd = "rzi"
        ins = f"cvt{'.' + rnd if rnd else ''}.{to.value}.{src.value}"
        d = self.reg(to)
        self._emit(f"{ins} {d}, {a}")
        return d

    def cvt_bf16x2(self, hi: Reg, lo: Reg) -> Reg:
        """Two f32 -> one .b32 holding two bf16 (``lo`` in the low half), round to nearest."""
        return self.cvt_x2(T.BF16, hi, lo)

    def cvt_x2(self, to: T, hi: Reg, lo: Reg) -> Reg:
        """Two f32 -> one .b32 holding two ``to`` (bf16 or f16; ``lo`` in the low half), round to nearest."""
        if to not in (T.BF16, T.F16):
            raise PtxBuildError(f"cvt.rn.{to.value}x2.f32 does not exist; bf16 or f16")
        ins = f"cvt.rn.{to.value}x2.f32"
        d = self.reg(T.B32)
        self._emit(f"{ins} {d}, {self._op(ins, hi, T.F32, 'hi')}, {self._op(ins, lo, T.F32, 'lo')}")
        return d

    def unpack(self, word: Reg) -> tuple[Reg, Reg]:
        """A 32-bit register -> its (low, high) 16-bit halves."""
        ins = "mov.b32"
        lo, hi = self.reg(T.B16), self.reg(T.B16)
        self._emit(f"{ins} {{{lo}, {hi}}}, {self._op(ins, word, T.B32, 'word')}")
        return lo, hi

    def pack(self, lo: Reg, hi: Reg) -> Reg:
        ins = "mov.b32"
        d = self.reg(T.B32)
        self._emit(f"{ins} {d}, {{{self._op(ins, lo, T.B16, 'lo')}, {self._op(ins, hi, T.B16, 'hi')}}}")
        return d

    # -- memory --------------------------------------------------------------------------------
    def shared_array(self, base: str, t: T, count: int, align: int | None = None) -> Symbol:
        name = self._unique(base)
        align = align or max(4, t.bits // 8)
        self._kernel_vars.append(f"\t.shared .align {align} .{t.value} {name}[{count}];")
        return Symbol(name, "shared", t, count)

    def dynamic_shared(self, base: str, align: int = 16) -> Symbol:
        """The block's dynamic shared memory (bytes given at launch; the spec's
        ``dynamic_shared_bytes``): the only way past the 48 KB a static array may take."""
        name = self._unique(base)
        self._module_vars.append(f".extern .shared .align {align} .{T.B8.value} {name}[];")  # module scope only
        return Symbol(name, "shared", T.B8, 0)

    def global_table(self, base: str, t: T, values: Iterable[float | int]) -> Symbol:
        """An initialised, read-only module-scope table (e.g. RoPE frequencies)."""
        vals = [immediate(v, t) for v in values]
        if not vals:
            raise PtxBuildError(f"{base}: a table needs at least one value")
        name = self._unique(base)
        body = ", ".join(vals)
        self._module_vars.append(
            f".global .align {max(8, t.bits // 8)} .{t.value} {name}[{len(vals)}] = {{{body}}};")
        return Symbol(name, "global", t, len(vals))

    @staticmethod
    def _check_addr(ins: str, addr: Addr, space: str) -> None:
        base = addr.base
        if isinstance(base, Symbol):
            if base.space != space:
                raise PtxBuildError(f"{ins}: {base.name} is in .{base.space}, not .{space}")
            return
        want = (T.U32, T.U64) if space == "shared" else (T.U64,)
        if not any(compatible(w, base.type) for w in want):
            raise PtxBuildError(f"{ins}: address register {base.name} is .{base.type.value}")

    def ld(self, space: str, t: T, addr: Addr, vec: int = 1, *, nc: bool = False, volatile: bool = False,
           cg: bool = False, out: Sequence[Reg] | None = None, guard: GuardLike = None) -> Reg | tuple[Reg, ...]:
        """``volatile``: the load is issued where it stands (ptxas may not merge or hoist it), which
        keeps a value that is cheap to re-read from being held in a register across a long loop.
        ``cg``: cached in L2 only, not in the SM's L1 (which is not coherent with other SMs' writes)."""
        if vec not in (1, 2, 4):
            raise PtxBuildError(f"ld: vector width {vec} is not 1, 2 or 4")
        if nc + volatile + cg > 1:
            raise PtxBuildError("ld: .nc, .volatile and .cg exclude each other")
        ins = f"ld{'.volatile' if volatile else ''}.{space}{'.nc' if nc else ''}{'.cg' if cg else ''}" \
              f"{f'.v{vec}' if vec > 1 else ''}.{t.value}"
        self._check_addr(ins, addr, space)
        regs = tuple(out) if out is not None else tuple(self.reg(t) for _ in range(vec))
        if len(regs) != vec:
            raise PtxBuildError(f"{ins}: {len(regs)} destinations for a .v{vec} load")
        for r in regs:
            self._dst(ins, r, t)
        dst = regs[0].name if vec == 1 else "{" + ", ".join(r.name for r in regs) + "}"
        self._emit(f"{ins} {dst}, {addr}", guard)
        return regs[0] if vec == 1 else regs

    def st(self, space: str, addr: Addr, values: Operand | Sequence[Operand], t: T | None = None,
           guard: GuardLike = None) -> None:
        vals = list(values) if isinstance(values, (list, tuple)) else [values]
        if len(vals) not in (1, 2, 4):
            raise PtxBuildError(f"st: vector width {len(vals)} is not 1, 2 or 4")
        t = self._type_of("st", *vals, t=t)
        vec = len(vals)
        ins = f"st.{space}{f'.v{vec}' if vec > 1 else ''}.{t.value}"
        self._check_addr(ins, addr, space)
        ops = [self._op(ins, v, t, "value") for v in vals]
        src = ops[0] if vec == 1 else "{" + ", ".join(ops) + "}"
        self._emit(f"{ins} {addr}, {src}", guard)

    def atom(self, space: str, op: str, addr: Addr, value: Operand, t: T | None = None) -> Reg:
        t = self._type_of("atom", value, t=t)
        ins = f"atom.{space}.{op}.{t.value}"
        self._check_addr(ins, addr, space)
        d = self.reg(t)
        self._emit(f"{ins} {d}, {addr}, {self._op(ins, value, t, 'value')}")
        return d

    def red(self, space: str, op: str, addr: Addr, value: Operand, t: T | None = None,
            guard: GuardLike = None) -> None:
        t = self._type_of("red", value, t=t)
        ins = f"red.{space}.{op}.{t.value}"
        self._check_addr(ins, addr, space)
        self._emit(f"{ins} {addr}, {self._op(ins, value, t, 'value')}", guard)

    def ld_acquire(self, addr: Addr, guard: GuardLike = None) -> Reg:
        """A u32 load with acquire semantics at GPU scope: what the writer did before its release of
        this word (``st_release``) is visible to this thread after it."""
        ins = "ld.acquire.gpu.global.u32"
        self._check_addr(ins, addr, "global")
        d = self.reg(T.U32)
        self._emit(f"{ins} {d}, {addr}", guard)
        return d

    def st_release(self, addr: Addr, value: Operand, guard: GuardLike = None) -> None:
        """A u32 store with release semantics at GPU scope (the other side of ``ld_acquire``)."""
        ins = "st.release.gpu.global.u32"
        self._check_addr(ins, addr, "global")
        self._emit(f"{ins} {addr}, {self._op(ins, value, T.U32, 'value')}", guard)

    def fence_gpu(self) -> None:
        """Order this thread's memory operations before and after at GPU scope (fence.acq_rel.gpu)."""
        self._emit("fence.acq_rel.gpu")

    # -- asynchronous copies and tensor cores (sm_80+) ------------------------------------------
    def cp_async(self, dst: Reg, src: Reg, src_bytes: Operand, dst_offset: int = 0) -> None:
        """16 bytes global -> shared ``[dst+dst_offset]`` without a register stop; bytes past
        ``src_bytes`` are zero-filled (0: the whole chunk, so an out-of-range tile edge loads zeros)."""
        ins = "cp.async.cg.shared.global"
        self._op(ins, dst, T.U32, "shared address")
        size = self._op(ins, src_bytes, T.U32, "src-size")
        self._emit(f"{ins} {Addr(dst, dst_offset)}, [{self._op(ins, src, T.U64, 'global address')}], 16, {size}")

    def cp_async_commit(self) -> None:
        self._emit("cp.async.commit_group")

    def cp_async_wait(self, pending: int) -> None:
        """Wait until at most ``pending`` of this thread's committed groups are still in flight."""
        self._emit(f"cp.async.wait_group {immediate(pending, T.U32)}")

    def ldmatrix(self, addr: Reg, count: int = 4, trans: bool = False, offset: int = 0,
                 out: Sequence[Reg] | None = None) -> tuple[Reg, ...]:
        """``count`` 8x8 16-bit matrices from shared memory at ``[addr+offset]`` into mma fragment
        order (.b32 each)."""
        if count not in (1, 2, 4):
            raise PtxBuildError(f"ldmatrix: .x{count} does not exist; use 1, 2 or 4")
        ins = f"ldmatrix.sync.aligned.m8n8.x{count}{'.trans' if trans else ''}.shared.b16"
        regs = tuple(out) if out is not None else tuple(self.reg(T.B32) for _ in range(count))
        if len(regs) != count:
            raise PtxBuildError(f"{ins}: {len(regs)} destinations for {count} matrices")
        for r in regs:
            self._dst(ins, r, T.B32)
        at = Addr(addr, offset)
        self._check_addr(ins, at, "shared")
        self._emit(f"{ins} {{{', '.join(r.name for r in regs)}}}, {at}")
        return regs

    def mma_m16n8k16(self, acc: Sequence[Reg], a: Sequence[Reg], b: Sequence[Reg], dtype: str) -> None:
        """acc (4 x f32) += A (16x16, 4 x b32 of ``dtype`` pairs, row) @ B (16x8, 2 x b32, col)."""
        if dtype not in ("bf16", "f16"):
            raise PtxBuildError(f"mma.m16n8k16: input type {dtype} is not bf16 or f16")
        ins = f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32"
        for regs, n, t, what in ((acc, 4, T.F32, "accumulator"), (a, 4, T.B32, "A"), (b, 2, T.B32, "B")):
            if len(regs) != n:
                raise PtxBuildError(f"{ins}: {what} takes {n} registers, got {len(regs)}")
            for r in regs:
                self._op(ins, r, t, what)
        c = ", ".join(r.name for r in acc)
        self._emit(f"{ins} {{{c}}}, {{{', '.join(r.name for r in a)}}}, {{{', '.join(r.name for r in b)}}}, {{{c}}}")

    # -- warps, barriers, control flow ----------------------------------------------------------
    # -- warpgroup MMA (sm_90a) -----------------------------------------------------------------
    def fence_proxy_async(self) -> None:
        """Order this thread's generic-proxy shared-memory accesses before later async-proxy ones
        (wgmma's reads, TMA's writes): writes by st / cp.async that wgmma will read, or reads by
        ld / ldmatrix of a buffer a bulk copy will refill."""
        self._emit("fence.proxy.async.shared::cta")

    def wgmma_fence(self) -> None:
        """Order register accesses to the accumulators before the wgmma that follow."""
        self._emit("wgmma.fence.sync.aligned")

    def wgmma_commit(self) -> None:
        self._emit("wgmma.commit_group.sync.aligned")

    def wgmma_wait(self, pending: int) -> None:
        """Wait until at most ``pending`` of this warpgroup's committed wgmma groups are in flight."""
        self._emit(f"wgmma.wait_group.sync.aligned {immediate(pending, T.U32)}")

    def wgmma(self, acc: Sequence[Reg], desc_a: Reg | Sequence[Reg], desc_b: Reg, dtype: str, n: int, scale_d: Reg,
              mn_major: tuple[bool, bool] = (False, False)) -> None:
        """acc (64 x n f32 over the warpgroup: n / 2 registers a thread) (+)= A (64 x k) @ B (k x n),
        both from shared memory by matrix descriptors, K-major unless ``mn_major`` says otherwise
        for A, B (the transpose flags; 16-bit types only); k is 32 bytes of ``dtype`` (16 of
        bf16/f16, 8 of tf32); ``scale_d`` false: acc = A @ B. A may instead be 4 .b32 registers a
        thread (16-bit pairs; each warp's 16 rows in mma.m16n8k16's A fragment layout)."""
        in_regs = not isinstance(desc_a, Reg)
        if in_regs and dtype not in ("bf16", "f16"):
            raise PtxBuildError(f"wgmma with A in registers: input type {dtype} is not bf16 or f16")
        if dtype not in ("bf16", "f16", "tf32"):
            raise PtxBuildError(f"wgmma: input type {dtype} is not bf16, f16 or tf32")
        if n % 8 or not 8 <= n <= 256:
            raise PtxBuildError(f"wgmma: N={n} is not a multiple of 8 in [8, 256]")
        if dtype == "tf32" and any(mn_major):
            raise PtxBuildError("wgmma: tf32 operands are K-major only")
        # tf32 takes no transpose flags at all, A in registers none of its own
        k, layout = (8, "") if dtype == "tf32" else (16, f", {int(mn_major[1])}" if in_regs else
                                                      f", {int(mn_major[0])}, {int(mn_major[1])}")
        ins = f"wgmma.mma_async.sync.aligned.m64n{n}k{k}.f32.{dtype}.{dtype}"
        if in_regs and (len(acc) != n // 2 or len(desc_a) != 4):
            raise PtxBuildError(f"{ins}: {n // 2} accumulator and 4 A registers, got {len(acc)} and {len(desc_a)}")
        if len(acc) != n // 2:
            raise PtxBuildError(f"{ins}: {n // 2} accumulator registers, got {len(acc)}")
        for r in acc:
            self._op(ins, r, T.F32, "accumulator")
        if in_regs:
            for r in desc_a:
                self._op(ins, r, T.B32, "A")
            a_operand = f"{{{', '.join(r.name for r in desc_a)}}}"
        else:
            a_operand = self._op(ins, desc_a, T.U64, "A descriptor")
        self._op(ins, desc_b, T.U64, "B descriptor")
        self._op(ins, scale_d, T.PRED, "scale-d")
        self._emit(f"{ins} {{{', '.join(r.name for r in acc)}}}, {a_operand}, {desc_b}, {scale_d}, 1, 1{layout}")

    # -- mbarriers and TMA bulk tensor copies (sm_90) ---------------------------------------------
    def mbarrier_init(self, bar: Reg, count: int, guard: GuardLike = None) -> None:
        """Initialise the shared-memory mbarrier at ``bar`` to expect ``count`` arrivals a phase."""
        ins = "mbarrier.init.shared::cta.b64"
        self._emit(f"{ins} [{self._op(ins, bar, T.U32, 'barrier address')}], {immediate(count, T.U32)}", guard)

    def fence_mbarrier_init(self, guard: GuardLike = None) -> None:
        """Make initialised mbarriers visible to the async proxy (the TMA units that complete them)."""
        self._emit("fence.mbarrier_init.release.cluster", guard)

    def mbarrier_expect_tx(self, bar: Reg, nbytes: int, guard: GuardLike = None) -> None:
        """Arrive on ``bar`` and add ``nbytes`` to the bytes its current phase waits for."""
        ins = "mbarrier.arrive.expect_tx.shared::cta.b64"
        state = self.reg(T.B64)
        self._emit(f"{ins} {state}, [{self._op(ins, bar, T.U32, 'barrier address')}], {immediate(nbytes, T.U32)}",
                   guard)

    def mbarrier_arrive(self, bar: Reg, guard: GuardLike = None) -> None:
        """Count this thread's arrival on the mbarrier at ``bar`` (its phase completes when all have)."""
        ins = "mbarrier.arrive.shared::cta.b64"
        state = self.reg(T.B64)
        self._emit(f"{ins} {state}, [{self._op(ins, bar, T.U32, 'barrier address')}]", guard)

    def mbarrier_wait(self, bar: Reg, parity: Reg) -> None:
        """Spin until phase ``parity`` (0/1) of the mbarrier at ``bar`` has completed."""
        ins = "mbarrier.try_wait.parity.shared::cta.b64"
        done, again = self.reg(T.PRED), self.new_label("mbarrier_wait")
        self.place(again)
        self._emit(f"{ins} {done}, [{self._op(ins, bar, T.U32, 'barrier address')}], "
                   f"{self._op(ins, parity, T.U32, 'parity')}")
        self.bra(again, guard=Guard(done, negated=True))

    def tma_load(self, dst: Reg, tensor_map: Reg, coords: tuple[Operand, ...], bar: Reg,
                 guard: GuardLike = None) -> None:
        """The box of ``tensor_map`` (2- or 3-D) at element coordinates ``coords`` (x innermost)
        into shared ``dst``; completes its bytes on the mbarrier at ``bar``. Out-of-bounds elements
        arrive as zeros."""
        if len(coords) not in (2, 3):
            raise PtxBuildError(f"tma_load: 2 or 3 coordinates, got {len(coords)}")
        ins = f"cp.async.bulk.tensor.{len(coords)}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        at = ", ".join(self._op(ins, x, T.S32, name) for x, name in zip(coords, "xyz"))
        self._emit(f"{ins} [{self._op(ins, dst, T.U32, 'shared address')}], "
                   f"[{self._op(ins, tensor_map, T.U64, 'tensor map')}, {{{at}}}], "
                   f"[{self._op(ins, bar, T.U32, 'barrier')}]", guard)

    def tma_store_3d(self, tensor_map: Reg, x: Reg, y: Reg, z: Reg, src: Reg, guard: GuardLike = None) -> None:
        """The box of ``tensor_map`` at element coordinates (x innermost, y, z) from shared ``src``
        to global memory, in this thread's bulk group; elements past the tensor's edges are not written."""
        ins = "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group"
        ops = [self._op(ins, tensor_map, T.U64, "tensor map"), self._op(ins, x, T.S32, "x"),
               self._op(ins, y, T.S32, "y"), self._op(ins, z, T.S32, "z"), self._op(ins, src, T.U32, "shared address")]
        self._emit(f"{ins} [{ops[0]}, {{{ops[1]}, {ops[2]}, {ops[3]}}}], [{ops[4]}]", guard)

    def bulk_commit(self, guard: GuardLike = None) -> None:
        """Close this thread's bulk group of the bulk copies issued since the last."""
        self._emit("cp.async.bulk.commit_group", guard)

    def bulk_wait(self, pending: int = 0, read: bool = False, guard: GuardLike = None) -> None:
        """Wait until at most ``pending`` of this thread's bulk groups are outstanding (``read``: have
        not yet read their shared memory source, so it may be overwritten)."""
        self._emit(f"cp.async.bulk.wait_group{'.read' if read else ''} {pending}", guard)

    def shfl(self, mode: str, value: Reg, b: Operand, c: int = 0x1F,
             membermask: int = 0xFFFFFFFF) -> Reg:
        if mode not in ("up", "down", "bfly", "idx"):
            raise PtxBuildError(f"shfl.sync: unknown mode {mode!r}")
        if value.type.bits != 32:
            raise PtxBuildError(f"shfl.sync.{mode}.b32: value {value.name} is .{value.type.value}")
        ins = f"shfl.sync.{mode}.b32"
        d = self.reg(value.type)
        self._emit(f"{ins} {d}, {value}, {self._op(ins, b, T.U32, 'lane')}, "
                   f"{self._op(ins, c, T.U32, 'clamp')}, {self._op(ins, membermask, T.U32, 'mask')}")
        return d

    def bar_sync(self, barrier: Operand = 0, threads: int | None = None) -> None:
        """Wait at named barrier ``barrier`` (a register or a number) until ``threads`` (default:
        the whole block) have arrived or waited there."""
        count = f", {immediate(threads, T.U32)}" if threads is not None else ""
        self._emit(f"bar.sync {self._op('bar.sync', barrier, T.U32, 'barrier')}{count}")

    def bar_arrive(self, barrier: Operand, threads: int) -> None:
        """Count this warp's arrival at named barrier ``barrier`` without waiting (the other
        ``threads`` minus these wait there with ``bar_sync``)."""
        self._emit(f"bar.arrive {self._op('bar.arrive', barrier, T.U32, 'barrier')}, {immediate(threads, T.U32)}")

    def new_label(self, base: str) -> Label:
        self._labels += 1
        return Label(f"$L_{base}_{self._labels}")

    def place(self, label: Label) -> None:
        self._body.append(f"{label.name}:")

    def bra(self, label: Label, guard: GuardLike = None) -> None:
        self._emit(f"bra.uni {label.name}" if guard is None else f"bra {label.name}", guard)

    def ret(self) -> None:
        self._emit("ret")

    def loop(self, count: Reg, base: str = "loop"):
        """Context manager for ``for i in range(count)`` with a runtime u32 ``count``; yields ``i``.

        The body runs zero times when ``count`` is 0 (the test is at the top).
        """
        return _Loop(self, count, base)

    def launch_bounds(self, threads: int, min_blocks: int | None = None) -> None:
        """Promise ptxas at most ``threads`` per block (and ask for ``min_blocks`` resident per SM),
        so it can budget registers for that occupancy."""
        self._directives = [f".maxntid {threads}, 1, 1"] + ([f".minnctapersm {min_blocks}"] if min_blocks else [])

    # -- output --------------------------------------------------------------------------------
    def text(self) -> str:
        major, minor = self.ptx_version
        params = ",\n".join(f"\t.param .{t.value} {self.name}_param_{n}" for n, t in self.params)
        regs = [f"\t.reg .{t.value} %{_PREFIX[t]}<{n + 1}>;"
                for t, n in sorted(self._counts.items(), key=lambda kv: kv[0].value)]
        lines = [f".version {major}.{minor}", f".target {self.arch}", ".address_size 64", "",
                 *self._module_vars, *([""] if self._module_vars else []),
                 f".visible .entry {self.name}(", params, ")", *self._directives, "{", *regs, *self._kernel_vars, "",
                 *self._body, "}", ""]
        return "\n".join(lines)
