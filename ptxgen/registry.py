"""Kind name -> spec class, for the CLI, the audit and the disk cache."""
from __future__ import annotations

import importlib
from typing import TypeVar

from .spec import KernelSpec, SpecError, qualified_name

_BY_KIND: dict[str, type[KernelSpec]] = {}
_BY_QUALNAME: dict[str, type[KernelSpec]] = {}

S = TypeVar("S", bound=type[KernelSpec])


def register(cls: S) -> S:
    """Class decorator: make a spec class known by its ``kind``."""
    kind = cls.kind
    if kind in _BY_KIND and _BY_KIND[kind] is not cls:
        raise ValueError(f"kernel kind {kind!r} registered twice")
    _BY_KIND[kind] = cls
    _BY_QUALNAME[qualified_name(cls)] = cls
    return cls


def _load() -> None:
    importlib.import_module("ptxgen.kernels")


def kinds() -> dict[str, type[KernelSpec]]:
    _load()
    return dict(sorted(_BY_KIND.items()))


def get_kind(name: str) -> type[KernelSpec]:
    _load()
    try:
        return _BY_KIND[name]
    except KeyError:
        raise SpecError(f"unknown kernel kind {name!r}; known: {', '.join(sorted(_BY_KIND))}") from None


def is_registered(name: str) -> bool:
    """Whether ``name`` (module-qualified) is one of the registered spec classes."""
    _load()
    return name in _BY_QUALNAME


def by_qualified_name(name: str) -> type[KernelSpec]:
    _load()
    try:
        return _BY_QUALNAME[name]
    except KeyError:
        raise SpecError(f"no registered spec class {name!r}") from None
