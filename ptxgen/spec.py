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
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from . import __version__
from .builder import KernelBuilder, T


class SpecError(ValueError):
    """A spec or target that cannot describe a kernel; the message is one line for the user."""


def sha256_hex(data: bytes | str) -> str:
    """Content digest (PTX text, cubins, source files)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@dataclass(frozen=True)
class Target:
    """What the PTX is written for: the SM architecture and the PTX ISA version."""

    arch: str = "sm_90"
    ptx_version: tuple[int, int] = (8, 5)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not re.fullmatch(r"sm_\d{2,3}a?", self.arch):
            raise SpecError(f"arch must look like sm_90 or sm_90a, got {self.arch!r}")
        v = tuple(self.ptx_version)
        if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            raise SpecError(f"ptx_version must be (major, minor), got {self.ptx_version!r}")
        object.__setattr__(self, "ptx_version", v)

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


@functools.cache
def generator_fingerprint() -> str:
    """Package version plus a digest of every source file of the generator."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(__version__.encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{h.hexdigest()[:16]}"


class KernelSpec:
    """Base of every kernel spec. Subclasses are ``@dataclass(frozen=True)`` and registered."""

    kind: ClassVar[str]  # the short name used by the CLI and the registry

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(type(self).__name__, f.name, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self.validate()
        object.__setattr__(self, "_keys", {})
        object.__setattr__(self, "_last_key", (None, ""))

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
        """Bytes the pointer argument ``param`` must be aligned to (16: kernels use 16-byte accesses)."""
        return 16

    def dynamic_shared_bytes(self) -> int:
        """Bytes of dynamic shared memory every launch of this kernel needs (0: static only)."""
        return 0

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

        The last target is remembered by identity, so a cache asking with its own Target object
        pays neither the hashing of the spec nor of the target on a hit.
        """
        last_target, last_key = self._last_key  # type: ignore[attr-defined]
        if last_target is target:
            return last_key
        keys: dict[Target, str] = self._keys  # type: ignore[attr-defined]
        k = keys.get(target)
        if k is None:
            k = keys[target] = spec_key(self, target)
        object.__setattr__(self, "_last_key", (target, k))
        return k


def spec_key(spec: KernelSpec, target: Target) -> str:
    """THE key function: nothing else may build a module cache key."""
    payload = {"spec": spec.canonical(), "arch": target.arch,
               "ptx_version": list(target.ptx_version), "generator": generator_fingerprint()}
    return sha256_hex(json.dumps(payload, separators=(",", ":"), ensure_ascii=True))


def decode_fields(cls: type[KernelSpec], encoded: list[list[Any]]) -> dict[str, Any]:
    """Inverse of ``canonical()['fields']`` for class ``cls``, for entries read back from disk."""

    def decode(tagged: list[Any]) -> Any:
        tag = tagged[0]
        if tag == "none":
            return None
        if tag in ("bool", "str"):
            return tagged[1]
        if tag == "int":
            return int(tagged[1])
        if tag == "float":
            return float.fromhex(tagged[1])
        if tag == "enum":
            return decode(tagged[2])  # the field's annotation turns the value back into its enum
        if tag == "tuple":
            return tuple(decode(v) for v in tagged[1])
        raise SpecError(f"unknown tag {tag!r} in a stored spec")

    return {name: decode(value) for name, value in encoded}
