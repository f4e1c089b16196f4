"""Golden PTX digests: (spec, target) -> sha256 of the PTX text, committed and checked on every host.

Emission must be a function of the spec alone; the golden file proves it across machines: CI checks
it on its CPU host, the GPU run checks the same file on the GPU host. Each entry stores the spec's
canonical encoding, so checking needs only the registry (not the model that chose the specs).
The file is written by ``python -m model.golden --update`` (every registered kind's examples and
every preset's model kernels in both precisions); review the diff it prints before committing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .files import read_file, why, write_atomic
from .keyaudit import Finding
from .registry import by_qualified_name
from .spec import PACKAGE_ROOT, KernelSpec, SpecError, Target, decode_fields, sha256_hex

DEFAULT_PATH = PACKAGE_ROOT.parent / "tests" / "golden" / "ptx_digests.json"
UPDATE_COMMAND = "python -m model.golden --update"
FORMAT = 1


class GoldenError(ValueError):
    """The golden file is missing or malformed; the message is one line."""


def identity(spec: KernelSpec, target: Target) -> dict[str, Any]:
    canonical = spec.canonical()
    return {"kind": canonical["kind"], "fields": canonical["fields"],
            "target": {"arch": target.arch, "ptx_version": list(target.ptx_version)}}


def record(spec: KernelSpec, target: Target) -> dict[str, Any]:
    return {"spec": repr(spec), **identity(spec, target), "ptx_sha256": sha256_hex(spec.emit(target))}


def _sort_key(entry: dict[str, Any]) -> str:
    return json.dumps([entry["kind"], entry["target"], entry["fields"]], separators=(",", ":"))


def write(path: Path, pairs: Iterable[tuple[KernelSpec, Target]]) -> list[dict[str, Any]]:
    entries = sorted((record(s, t) for s, t in pairs), key=_sort_key)
    doc = {"format": FORMAT, "update": UPDATE_COMMAND, "entries": entries}
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())
    return entries


def read(path: Path = DEFAULT_PATH) -> list[dict[str, Any]]:
    try:
        doc = json.loads(read_file(path))
    except FileNotFoundError:
        raise GoldenError(f"no golden digest file at {path} (write it with {UPDATE_COMMAND})") from None
    except (OSError, ValueError, RecursionError) as e:  # (RecursionError: JSON nested too deep)
        raise GoldenError(f"unreadable golden digest file {path}: {why(e)}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), list):
        raise GoldenError(f"{path} is not a format-{FORMAT} golden digest file")
    return doc["entries"]


def rebuild(entry: dict[str, Any]) -> tuple[KernelSpec, Target]:
    """The (spec, target) an entry describes; SpecError if it no longer describes one."""
    if not isinstance(entry, dict):
        raise SpecError(f"golden entry {str(entry)[:60]!r} is not an object")
    try:
        cls = by_qualified_name(entry["kind"])
        spec = cls(**decode_fields(cls, entry["fields"]))
        target = Target(entry["target"]["arch"], tuple(entry["target"]["ptx_version"]))
    except (KeyError, TypeError, IndexError, ValueError, OverflowError, RecursionError) as e:  # (a hand-edited file)
        raise SpecError(f"golden entry {entry.get('spec', '?')} cannot be rebuilt: {e}") from None
    return spec, target


def check(path: Path = DEFAULT_PATH) -> list[Finding]:
    """One finding per entry whose spec now emits other text on this host (or cannot be rebuilt)."""
    try:
        entries = read(path)
    except GoldenError as e:
        return [Finding("golden", str(path), str(e))]
    findings = []
    for entry in entries:
        try:
            spec, target = rebuild(entry)
            digest = sha256_hex(spec.emit(target))
        except SpecError as e:
            findings.append(Finding("golden", str(entry.get("spec", "?")) if isinstance(entry, dict) else "?", str(e)))
            continue
        if digest != entry.get("ptx_sha256"):
            findings.append(Finding("golden", f"{spec!r} @ {target.arch}",
                                    f"PTX sha256 {digest[:16]} on this host, golden {str(entry.get('ptx_sha256'))[:16]} "
                                    f"(an intended change: {UPDATE_COMMAND}, and say why in the commit)"))
    return findings
