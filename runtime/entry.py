"""The on-disk cache entry: one file holding metadata and cubin, written atomically.

Layout (``v1``)::

    PTXGEN-CACHE-ENTRY v1\\n
    <sha256 of everything after this line>\\n
    <metadata JSON, one line>\\n
    <cubin bytes>

The checksum line tells corruption (truncation, flipped bits) apart from a well-formed entry whose
contents disagree with what was asked for (stale generator, another driver, another text).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ptxgen.spec import KernelSpec, Target, generator_fingerprint, qualified_name, sha256_hex

LAYOUT = "v1"
MAGIC = f"PTXGEN-CACHE-ENTRY {LAYOUT}\n".encode()
SUFFIX = ".entry"


class EntryError(ValueError):
    """An entry that must not be loaded; the message says why."""


def metadata(spec: KernelSpec, target: Target, key: str, ptx: str, cubin: bytes,
             toolchain: dict[str, Any]) -> dict[str, Any]:
    canonical = spec.canonical()
    return {"layout": LAYOUT, "key": key, "kind": canonical["kind"], "fields": canonical["fields"],
            "target": {"arch": target.arch, "ptx_version": list(target.ptx_version)},
            "generator": generator_fingerprint(), "toolchain": toolchain,
            "ptx_sha256": sha256_hex(ptx), "cubin_sha256": sha256_hex(cubin), "cubin_bytes": len(cubin)}


def encode(meta: dict[str, Any], cubin: bytes) -> bytes:
    body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode() + b"\n" + cubin
    return MAGIC + sha256_hex(body).encode() + b"\n" + body


def decode(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Parse and checksum an entry; EntryError if it is truncated, corrupt or not an entry."""
    if not blob.startswith(MAGIC):
        raise EntryError("not a v1 cache entry (bad magic)")
    rest = blob[len(MAGIC):]
    digest, sep, body = rest.partition(b"\n")
    if not sep or len(digest) != 64:
        raise EntryError("truncated entry (no checksum line)")
    if sha256_hex(body) != digest.decode(errors="replace"):
        raise EntryError("checksum mismatch (truncated or corrupted)")
    header, sep, cubin = body.partition(b"\n")
    try:
        meta = json.loads(header)
    except ValueError:
        raise EntryError("unreadable metadata") from None
    if meta.get("cubin_bytes") != len(cubin) or meta.get("cubin_sha256") != sha256_hex(cubin):
        raise EntryError("cubin does not match its recorded size and digest")
    return meta, cubin


def mismatch(meta: dict[str, Any], spec: KernelSpec, target: Target, key: str,
             toolchain: dict[str, Any]) -> str | None:
    """Why a well-formed entry is not the one asked for, or None if it is."""
    if meta.get("layout") != LAYOUT:
        return f"layout {meta.get('layout')!r}, expected {LAYOUT}"
    if meta.get("generator") != generator_fingerprint():
        return f"stale: built by generator {meta.get('generator')}, this is {generator_fingerprint()}"
    if meta.get("toolchain") != toolchain:
        return f"foreign toolchain {meta.get('toolchain')}, this is {toolchain}"
    if meta.get("key") != key:
        return "stored key differs from the file's key"
    canonical = spec.canonical()
    if meta.get("kind") != qualified_name(type(spec)) or meta.get("fields") != canonical["fields"]:
        return "stored spec differs from the requested spec"
    if meta.get("target") != {"arch": target.arch, "ptx_version": list(target.ptx_version)}:
        return "stored target differs"
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then os.replace: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
