"""What tells two specs apart, field by field: the one-line answer to "why did this recompile".

Fields are compared by their canonical encoding (floats by bits), the way the key sees them, so
0.0 and -0.0 are reported as different even though Python calls them equal.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from .spec import KernelSpec, encode_value


def field_differences(a: KernelSpec, b: KernelSpec) -> list[tuple[str, Any, Any]]:
    """(field, value in a, value in b) for every field whose encoding differs; same class only."""
    if type(a) is not type(b):
        raise TypeError(f"{type(a).__name__} and {type(b).__name__} are different kinds")
    fa, fb = a.fields(), b.fields()
    return [(name, fa[name], fb[name]) for name in fa if encode_value(fa[name]) != encode_value(fb[name])]


def describe(differences: Sequence[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{name} {x!r} -> {y!r}" for name, x, y in differences)


def explain_miss(spec: KernelSpec, available: Iterable[KernelSpec]) -> str:
    """Name the nearest of ``available`` of the same kind (fewest differing fields) and what differs."""
    same_kind = [s for s in available if type(s) is type(spec)]
    if not same_kind:
        return f"no {spec.kind} spec was pre-warmed"
    nearest = min(same_kind, key=lambda s: len(field_differences(s, spec)))
    diff = field_differences(nearest, spec)
    if not diff:
        return f"an equal spec was pre-warmed under another key (another target or generator?): {nearest!r}"
    return f"nearest pre-warmed {spec.kind}: {nearest!r}; differs in {describe(diff)}"
