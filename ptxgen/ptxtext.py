"""Read facts back out of PTX text: entries, params, registers, shared memory, float immediates."""
from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\((.*?)\)", re.S)
_PARAM = re.compile(r"\.param\s+\.(\w+)\s+(?:\.ptr\S*\s+)?(?:\.align\s+\d+\s+)?([\w$]+)")
_REG = re.compile(r"\.reg\s+\.(\w+)\s+%([A-Za-z_]\w*)<(\d+)>")
_VAR = re.compile(r"\.(shared|global|const)\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+([\w$]+)\[(\d+)\]")
_F32 = re.compile(r"\b0[fF]([0-9A-Fa-f]{8})\b")
_F64 = re.compile(r"\b0[dD]([0-9A-Fa-f]{16})\b")
_VERSION = re.compile(r"^\s*\.version\s+(\d+\.\d+)", re.M)
_TARGET = re.compile(r"^\s*\.target\s+([\w, ]+)", re.M)
_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2,
          "b32": 4, "u32": 4, "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


@dataclass(frozen=True)
class Immediate:
    text: str
    type: str
    value: str  # shortest decimal that round-trips in its own precision: 0f358637BD -> 1e-06
    count: int


@dataclass(frozen=True)
class Variable:
    space: str
    name: str
    type: str
    count: int

    @property
    def bytes(self) -> int:
        return self.count * _BYTES.get(self.type, 0)


@dataclass
class PtxFacts:
    version: str | None
    target: str | None
    entries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    registers: dict[str, int] = field(default_factory=dict)
    variables: list[Variable] = field(default_factory=list)
    immediates: list[Immediate] = field(default_factory=list)

    @property
    def shared_bytes(self) -> int:
        return sum(v.bytes for v in self.variables if v.space == "shared")


def decode_f32(hex8: str) -> str:
    return str(np.float32(struct.unpack(">f", bytes.fromhex(hex8))[0]))


def decode_f64(hex16: str) -> str:
    return repr(struct.unpack(">d", bytes.fromhex(hex16))[0])


def parse(text: str) -> PtxFacts:
    """Facts of a PTX module; raises ValueError when the text has no ``.entry``."""
    entries = {name: [(n, t) for t, n in _PARAM.findall(params)] for name, params in _ENTRY.findall(text)}
    if not entries:
        raise ValueError("no .entry found: not a PTX kernel module")
    version, target = _VERSION.search(text), _TARGET.search(text)
    registers: Counter[str] = Counter()
    for t, _prefix, n in _REG.findall(text):
        registers[t] += int(n)
    variables = [Variable(space, name, t, int(n)) for space, _a, t, name, n in _VAR.findall(text)]
    imms = [Immediate(f"0f{h.upper()}", "f32", decode_f32(h), c)
            for h, c in Counter(m.upper() for m in _F32.findall(text)).items()]
    imms += [Immediate(f"0d{h.upper()}", "f64", decode_f64(h), c)
             for h, c in Counter(m.upper() for m in _F64.findall(text)).items()]
    return PtxFacts(version[1] if version else None, target[1].strip() if target else None,
                    entries, dict(sorted(registers.items())), variables, imms)


_COMMENT = re.compile(r"//[^\n]*")
_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+([^;]*);", re.M)
_PARAM_POINTER = re.compile(r"ld\.param\.u64\s+(%\w+),\s*\[[\w$]+?_param_(\w+)\]")
_REGISTER = re.compile(r"%\w+")
_ADDRESS = re.compile(r"\[\s*(%\w+)")
_TENSOR_MAP = re.compile(r"\[\s*(%\w+)\s*,\s*\{")  # [tensor map, {coordinates}]
_TENSOR_MAP_ALIGNMENT = 64  # a CUtensorMap that TMA reads from global memory (PTX ISA: 64-byte aligned)
_BULK_ALIGNMENT = 16        # cp.async.bulk's global operand (PTX ISA: 16-byte aligned)
_SPACES = {"global", "shared", "local", "param", "const"}
# what these write is data, or nothing: no address derives from it
_NOT_AN_ADDRESS = ("ld", "atom", "st", "red", "cp", "bar", "wgmma", "mbarrier", "fence", "bra", "setp",
                   "prefetch", "ret", "exit")
_HINTS = ("prefetch", "prefetchu", "applypriority", "discard")  # no access a misaligned address faults
_ELEMENT_BYTES = {**_BYTES, "bf16x2": 4, "f16x2": 4, "b128": 16}


def _operands(args: str) -> list[str]:
    """The comma-separated operands, a {vector} or [address, {coordinates}] kept whole."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(args[start:i].strip())
            start = i + 1
    return out + [args[start:].strip()]


def _element_access(op: str) -> int:
    parts = op.split(".")
    types = [p for p in parts if p in _ELEMENT_BYTES]
    if not types:
        raise ValueError(f"global access {op!r}: no element type to size it by")
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v[248]", p)), 1)
    return vector * _ELEMENT_BYTES[types[-1]]


def _global_accesses(op: str, args: str) -> list[tuple[str, int]]:
    """(address register, bytes it must be aligned to) of each global operand of one instruction;
    an instruction that takes an address and is none of these forms is an error, not a guess."""
    parts, addresses = op.split("."), _ADDRESS.findall(args)
    spaces = [p.split("::")[0] for p in parts[1:] if p.split("::")[0] in _SPACES]
    if op.startswith("cp.async.bulk.tensor"):  # the tensor map; the tile itself is the unit's
        return [(m, _TENSOR_MAP_ALIGNMENT) for m in _TENSOR_MAP.findall(args)]
    if op.startswith("cp.async.bulk"):  # [dst], [src], ...: spaces named in that order
        return [(a, _BULK_ALIGNMENT) for a, space in zip(addresses, spaces) if space == "global"]
    if op.startswith("cp.async"):  # cp.async.ca|cg.shared.global [dst], [src], cp-size{, src-size}
        return [(addresses[1], int(_operands(args)[2]))]
    if parts[0] in ("ld", "st", "red", "atom"):  # with .global, or generic (no space: may be global)
        return [(addresses[0], _element_access(op))] if not spaces or "global" in spaces else []
    if op.startswith("prefetch.tensormap"):
        return [(addresses[0], _TENSOR_MAP_ALIGNMENT)]
    if parts[0] in _HINTS:
        return []
    raise ValueError(f"{op!r}: an address operand in an instruction the alignment reader does not know")


def pointer_alignments(text: str) -> dict[str, int]:
    """{pointer parameter: the widest global access the kernel makes through it, in bytes}.

    A register derives from a parameter when an instruction that writes it reads the parameter
    or a register derived from it (flow-insensitive, so a register that may hold either of two
    pointers needs both aligned: safe); a loaded value is data, not derived from the address it
    was loaded from. A global access needs its address aligned to its width; the kernels' offsets
    are multiples of that width, so the parameter needs it. An instruction that takes an address
    derived from a parameter in a form not known here is an error. A pointer the kernel never
    dereferences is absent."""
    text = _COMMENT.sub("", text)
    derived: dict[str, set[str]] = {reg: {name} for reg, name in _PARAM_POINTER.findall(text)}
    instructions = _INSTR.findall(text)
    writes = []
    for op, args in instructions:
        operands = _operands(args)
        if len(operands) > 1 and op.split(".")[0] not in _NOT_AN_ADDRESS:
            writes.append((_REGISTER.findall(operands[0]), set(_REGISTER.findall(",".join(operands[1:])))))
    changed = True
    while changed:  # to a fixed point: loops carry pointers through movs
        changed = False
        for destinations, sources in writes:
            new = set().union(*(derived.get(r, ()) for r in sources))
            for dst in destinations:
                if new - derived.get(dst, set()):
                    derived.setdefault(dst, set()).update(new)
                    changed = True
    widths: dict[str, int] = {}
    for op, args in instructions:
        if op.startswith("ld.param") or not any(derived.get(a) for a in _ADDRESS.findall(args)):
            continue
        for address, width in _global_accesses(op, args):
            for name in derived.get(address, ()):
                widths[name] = max(widths.get(name, 1), width)
    return widths
