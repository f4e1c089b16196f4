"""Kernel specs, their canonical encoding, and the one function that turns a spec into a cache key.

A spec is a frozen dataclass whose fields are all of a kernel's emit parameters. The key is the
sha256 of the spec's type-tagged canonical encoding plus the target, PTX ISA version and a
fingerprint of the generator's own source, so nothing that shapes the PTX text can be left out.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import math
import re
import sys
import sysconfig
import types
import typing
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from . import __version__
from .builder import KernelBuilder, T
from .ptxtext import pointer_alignments


class SpecError(ValueError):
    """A spec or target that cannot describe a kernel; the message is one line for the user."""


def sha256_hex(data: bytes | str) -> str:
    """Content digest (PTX text, cubins, source files)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# the PTX ISA version that introduced each architecture (PTX ISA manual, "PTX ISA version" and
# "target" tables); the generator's kernels need sm_80's instructions, so none before it
FIRST_ISA: dict[str, tuple[int, int]] = {
    "sm_80": (7, 0), "sm_86": (7, 1), "sm_87": (7, 4), "sm_89": (7, 8), "sm_90": (7, 8), "sm_90a": (8, 0),
    "sm_100": (8, 6), "sm_100a": (8, 6), "sm_101": (8, 6), "sm_101a": (8, 6), "sm_120": (8, 7), "sm_120a": (8, 7)}
NEWEST_ISA = (9, 0)  # CUDA 13.0's


@dataclass(frozen=True)
class Target:
    """What the PTX is written for: the SM architecture and the PTX ISA version. Only targets the
    generator writes valid PTX for: an architecture from sm_80 on (its kernels use cp.async and bf16
    mma.sync, sm_80's), and an ISA version from the first that knows the architecture
    (``FIRST_ISA``) to the newest the generator knows (``NEWEST_ISA``)."""

    arch: str = "sm_90"
    ptx_version: tuple[int, int] = (8, 5)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not re.fullmatch(r"sm_\d{2,3}a?", self.arch):
            raise SpecError(f"arch must look like sm_90 or sm_90a, got {self.arch!r}")
        v = tuple(self.ptx_version)
        if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 99 for x in v):
            raise SpecError(f"ptx_version must be (major, minor), each 0..99, got {self.ptx_version!r}")
        object.__setattr__(self, "ptx_version", v)
        first = FIRST_ISA.get(self.arch)
        if first is None:
            raise SpecError(f"arch {self.arch} is not one the generator writes for: "
                            f"{', '.join(FIRST_ISA)}")
        if not first <= v <= NEWEST_ISA:
            raise SpecError(f"PTX ISA {v[0]}.{v[1]} for {self.arch}: the generator writes {first[0]}.{first[1]} "
                            f"(the first that knows {self.arch}) to {NEWEST_ISA[0]}.{NEWEST_ISA[1]}")

    @classmethod
    def parse(cls, arch: str, ptx_version: str) -> "Target":
        m = re.fullmatch(r"(\d+)\.(\d+)", ptx_version)
        if not m:
            raise SpecError(f"PTX version must look like 8.5, got {ptx_version!r}")
        return cls(arch, (int(m[1]), int(m[2])))

    @property
    def compute_capability(self) -> tuple[int, int]:
        digits = self.arch[3:].rstrip("a")
        return int(digits[:-1]), int(digits[-1])


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def encode_value(value: Any) -> Any:
    """Type-tagged, JSON-ready encoding: 1 vs 1.0 and 0.0 vs -0.0 encode differently."""
    if value is None:
        return ["none"]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", str(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpecError(f"{value!r} cannot be part of a spec (NaN and infinities are rejected)")
        return ["float", value.hex()]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, enum.Enum):
        return ["enum", qualified_name(type(value)), encode_value(value.value)]
    if isinstance(value, (tuple, list)):
        return ["tuple", [encode_value(v) for v in value]]
    raise SpecError(f"a spec field cannot hold a {type(value).__name__}")


def _coerce(cls_name: str, name: str, hint: Any, value: Any) -> Any:
    """Check a field value against its annotation; exact ints become floats, strings enums."""
    origin = typing.get_origin(hint)
    if hint is float:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53:
            value = float(value)
        if not isinstance(value, float):
            raise SpecError(f"{name} must be a float, got {value!r}")
        value = float(value)  # a float subclass could encode (hex()) other bits than it emits
        if not math.isfinite(value):
            raise SpecError(f"{name} must be finite, got {value!r}")
        return value
    if hint is int or hint is bool or hint is str:
        if type(value) is not hint:
            raise SpecError(f"{name} must be {hint.__name__}, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in hint)
            raise SpecError(f"{name} must be one of {choices}, got {value!r}") from None
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            raise SpecError(f"{name} must be a tuple, got {value!r}")
        return tuple(_coerce(cls_name, f"{name}[{i}]", item, v) for i, v in enumerate(value))
    raise TypeError(f"{cls_name}.{name}: unsupported field annotation {hint!r}")


PACKAGE_ROOT = Path(__file__).resolve().parent


@functools.cache
def generator_fingerprint() -> str:
    """Package version plus a digest of every source file of the generator."""
    h = hashlib.sha256(__version__.encode())
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{h.hexdigest()[:16]}"


# class -> digest of the source that defines it (or why it has none), taken when the class is made,
# while its module (a script's __main__ too) is the one in sys.modules
_CLASS_SOURCES: "weakref.WeakKeyDictionary[type, str | SpecError]" = weakref.WeakKeyDictionary()


_LIBRARY_ROOTS = tuple(Path(p).resolve() for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib",
                                                                                      "purelib", "platlib")})


def _user_file(module: types.ModuleType | None) -> Path | None:
    """The source file of a module outside the generator, the standard library and installed
    packages (whose versions are not the spec's to fingerprint), else None."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    if PACKAGE_ROOT in path.parents or any(root in path.parents for root in _LIBRARY_ROOTS):
        return None
    return path


def _source_fingerprint(cls: type) -> str | SpecError:
    """Digest of the defining modules of ``cls`` and its bases outside the generator, and of every
    user module they reach through their globals (helpers a build() calls), transitively."""
    modules: list[types.ModuleType] = []
    for k in cls.__mro__:
        if k.__module__ == "builtins":
            continue
        if "<locals>" in k.__qualname__:
            return SpecError(f"spec class {qualified_name(cls)} is made inside a function ({k.__qualname__}): what "
                             f"it emits can depend on the enclosing call, which no key can cover; define it at "
                             f"module level")
        module = sys.modules.get(k.__module__)
        if module is None or not getattr(module, "__file__", None):
            return SpecError(f"spec class {qualified_name(cls)}: module {k.__module__} has no source file, so its "
                             f"emitting code cannot be part of its key")
        modules.append(module)
    files: dict[Path, str] = {}
    while modules:
        module = modules.pop()
        path = _user_file(module)
        if path is None or path in files:
            continue
        files[path] = module.__name__
        for value in list(vars(module).values()):
            if isinstance(value, types.ModuleType):
                modules.append(value)
                continue
            try:  # a global's __module__ names where a function or class it holds was written
                name = getattr(value, "__module__", None)
            except Exception:  # a proxy object whose attributes raise: not code the build calls
                continue
            if isinstance(name, str) and name in sys.modules:
                modules.append(sys.modules[name])
    h = hashlib.sha256()
    for path, name in sorted(files.items()):
        try:
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        except OSError as e:
            return SpecError(f"spec class {qualified_name(cls)}: cannot read its source {path}: {e.strerror}")
    return h.hexdigest() if files else ""


def class_fingerprint(cls: type) -> str:
    """A digest of the source that defines ``cls`` outside the generator ("" for the generator's own
    classes: ``generator_fingerprint`` covers them).

    A spec class in a script, a test or a plugin has its emitting code in that file: the defining
    module of every class in its MRO, and every user module those reach through their globals, is
    hashed (as it was when the class was made), so two scripts that each define ``__main__.Peak``,
    one script edited, or a helper module it imports edited, get other keys. A class made inside a
    function (a factory, a closure) cannot be fingerprinted, since what it emits can depend on the
    enclosing call: keying it raises SpecError.
    """
    fingerprint = _CLASS_SOURCES.get(cls)
    if fingerprint is None:
        fingerprint = _CLASS_SOURCES[cls] = _source_fingerprint(cls)
    if isinstance(fingerprint, SpecError):
        raise fingerprint
    return fingerprint


class _Field:
    """A spec field's attribute: written while the spec is built, read-only once it is sealed,
    ``object.__setattr__`` included (a data descriptor sees that call too). The key memoized on
    the instance can then never describe other field values than the ones it holds."""

    __slots__ = ("name", "default")

    def __init__(self, name: str, default: Any):
        self.name, self.default = name, default

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:  # the class's attribute: the dataclass default, as before
            if self.default is dataclasses.MISSING:
                raise AttributeError(self.name)
            return self.default
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj: Any, value: Any) -> None:
        if obj.__dict__.get("_sealed"):
            raise AttributeError(f"{type(obj).__name__}.{self.name} cannot change: a spec is immutable once "
                                 f"built (its key is memoized); make another with dataclasses.replace")
        obj.__dict__[self.name] = value

    def __delete__(self, obj: Any) -> None:
        raise AttributeError(f"{type(obj).__name__}.{self.name} cannot be deleted")


def _seal_fields(cls: type) -> None:
    """Once per class, after @dataclass has read its defaults: every field becomes a _Field."""
    if "_fields_sealed" not in cls.__dict__:
        for f in dataclasses.fields(cls):
            setattr(cls, f.name, _Field(f.name, f.default))
        cls._fields_sealed = True  # type: ignore[attr-defined]


def _rebuild(cls: type["KernelSpec"], fields: dict[str, Any]) -> "KernelSpec":
    return cls(**fields)


class KernelSpec:
    """Base of every kernel spec. Subclasses are ``@dataclass(frozen=True)`` and registered.

    Equality and hashing go by the canonical encoding (floats by their bits), so ``==``, ``in`` and
    sets agree with the key: 0.0 and -0.0 are different specs. Fields are sealed once the spec is
    built, against ``object.__setattr__`` too, so the key memoized on the instance always describes
    its fields. Pickling and copying rebuild the spec through its constructor, so no memo travels
    to another object or process.
    """

    kind: ClassVar[str]  # the short name used by the CLI and the registry

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASS_SOURCES[cls] = _source_fingerprint(cls)
        # set before @dataclass runs, which then keeps them instead of writing field-tuple ones
        cls.__eq__ = KernelSpec.__eq__  # type: ignore[method-assign]
        cls.__hash__ = KernelSpec.__hash__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        cls = type(self)
        _seal_fields(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(self):
            value = _coerce(cls.__name__, f.name, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self.validate()
        object.__setattr__(self, "_sealed", True)
        object.__setattr__(self, "_keys", {})
        object.__setattr__(self, "_last_key", (None, None, None, ""))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.canonical() == other.canonical()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(json.dumps(self.canonical(), separators=(",", ":")))

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.fields())

    # -- what subclasses provide -------------------------------------------------------------
    def validate(self) -> None:
        """Raise SpecError with a one-line reason if the fields cannot describe a kernel."""

    def params(self) -> tuple[tuple[str, T], ...]:
        """The kernel's parameters, in order, with their PTX types."""
        raise NotImplementedError

    def build(self, b: KernelBuilder) -> None:
        """Emit the kernel body into ``b``; reads nothing but ``self``."""
        raise NotImplementedError

    @classmethod
    def examples(cls) -> list["KernelSpec"]:
        """Representative specs: assembled in CI and the base of the key audit."""
        raise NotImplementedError

    # -- derived ------------------------------------------------------------------------------
    @property
    def entry(self) -> str:
        return self.kind

    def pointer_alignment(self, param: str) -> int:
        """Bytes the pointer argument ``param`` must be aligned to: the widest global access the
        kernel's own PTX makes through it (read from the text, so no declaration can drift from it)."""
        return _pointer_alignments(self).get(param, 1)

    def dynamic_shared_bytes(self) -> int:
        """Bytes of dynamic shared memory every launch of this kernel needs (0: static only)."""
        return 0

    def outputs(self) -> tuple[str, ...]:
        """The pointer parameters the kernel writes through (what a launch plan says it writes).
        The default, every pointer, is the safe over-estimate; kernels name exactly theirs."""
        return tuple(name for name, t in self.params() if t is T.U64)

    def read_outputs(self) -> tuple[str, ...]:
        """The outputs whose contents from before the launch it reads (an accumulating GEMM's C,
        AdamW's weights and moments, a count its blocks hand on): a launch plan counts the step
        among their readers. None by default; tests/test_read_outputs.py holds every registered
        kernel's to the loads in its PTX."""
        return ()

    def blocks_wait(self) -> bool:
        """Whether some of its blocks wait for others of the same launch to get an SM and finish (a
        split tail's part 0 for the other parts): two such launches must not run at once, or each
        could hold the SMs the other's awaited blocks need (runtime.plan orders them)."""
        return False

    def arch(self, target: Target) -> str:
        """The architecture the module is written and assembled for: the target's, or (a kernel
        using sm_90a-only instructions such as wgmma) its architecture-specific variant."""
        return target.arch

    def emit(self, target: Target) -> str:
        """The PTX module text: a pure function of (spec, target)."""
        b = KernelBuilder(self.entry, self.arch(target), target.ptx_version, self.params())
        self.build(b)
        b.ret()
        return b.text()

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def canonical(self) -> dict[str, Any]:
        return {"kind": qualified_name(type(self)),
                "fields": [[name, encode_value(v)] for name, v in self.fields().items()]}

    def key(self, target: Target) -> str:
        """The cache key; computed once per (spec instance, target).

        The last target is remembered by identity (its fields too, which a frozen Target could have
        changed behind its back), so a cache asking with its own Target object pays neither the
        hashing of the spec nor of the target on a hit.
        """
        last_target, arch, version, last_key = self._last_key  # type: ignore[attr-defined]
        if last_target is target and target.arch is arch and target.ptx_version is version:
            return last_key
        keys: dict[tuple[str, tuple[int, int]], str] = self._keys  # type: ignore[attr-defined]
        k = keys.get((target.arch, target.ptx_version))
        if k is None:
            k = keys[(target.arch, target.ptx_version)] = spec_key(self, target)
        object.__setattr__(self, "_last_key", (target, target.arch, target.ptx_version, k))
        return k


def _outside_generator(cls: type) -> bool:
    return any(k.__module__ != "builtins" and not (k.__module__ == "ptxgen" or k.__module__.startswith("ptxgen."))
               for k in cls.__mro__)


def spec_key(spec: KernelSpec, target: Target) -> str:
    """THE key function: nothing else may build a module cache key.

    A spec class written outside the generator (a script, a test, an installed plugin) can reach code
    and data no fingerprint of its source sees (a constant imported from elsewhere, an import inside
    build(), a class made by ``type()``), so its key also carries the digest of the text it emits:
    for such a class, one key is one text by construction. Computed once per instance and target."""
    payload = {"spec": spec.canonical(), "class_source": class_fingerprint(type(spec)), "arch": target.arch,
               "ptx_version": list(target.ptx_version), "generator": generator_fingerprint()}
    if _outside_generator(type(spec)):
        payload["text"] = sha256_hex(spec.emit(target))
    return sha256_hex(json.dumps(payload, separators=(",", ":"), ensure_ascii=True))


def decode_value(tagged: list[Any]) -> Any:
    """Inverse of ``encode_value`` (enums come back as their value; the field's annotation turns
    them back into the enum); SpecError on anything that is not an encoding."""
    if not isinstance(tagged, list) or not tagged:
        raise SpecError(f"{tagged!r} is not an encoded value")
    tag = tagged[0]
    if tag == "none":
        return None
    if tag in ("bool", "str") and len(tagged) == 2:
        return tagged[1]
    if tag == "int" and len(tagged) == 2 and isinstance(tagged[1], str):
        return int(tagged[1])
    if tag == "float" and len(tagged) == 2 and isinstance(tagged[1], str):
        return float.fromhex(tagged[1])
    if tag == "enum" and len(tagged) == 3:
        return decode_value(tagged[2])
    if tag == "tuple" and len(tagged) == 2 and isinstance(tagged[1], list):
        return tuple(decode_value(v) for v in tagged[1])
    raise SpecError(f"unknown encoding {str(tagged)[:60]} in a stored spec")


def decode_fields(cls: type[KernelSpec], encoded: list[list[Any]]) -> dict[str, Any]:
    """Inverse of ``canonical()['fields']`` for class ``cls``, for entries read back from disk; the
    constructor then checks the values against ``cls``'s annotations and validation."""
    return {name: decode_value(value) for name, value in encoded}


@functools.lru_cache(maxsize=None)
def _pointer_alignments(spec: KernelSpec) -> dict[str, int]:
    return pointer_alignments(spec.emit(Target()))  # access widths do not depend on the target
