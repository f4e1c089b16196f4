"""The on-disk cache entry: one file holding metadata and cubin, written atomically.

Layout (``v1``)::

    PTXGEN-CACHE-ENTRY v1\\n
    <sha256 of everything after this line>\\n
    <metadata JSON, one line>\\n
    <cubin bytes>

The metadata's shape is checked on every decode (``shape_problem``), so a well-formed entry whose
metadata has the wrong shape (a list, bad hex, a missing toolchain, wrong types) is refused like a
corrupt one, never half-read. ``created``, ``compile_ms``, ``ptx_bytes``, ``registers`` and
``local_bytes`` (spills) are informational (``ptxgen cache ls``); entries without them stay valid.

The checksum line tells corruption (truncation, flipped bits) apart from a well-formed entry whose
contents disagree with what was asked for (stale generator, another driver or link options, another
text). ``read`` is the one predicate for what an entry is, shared by the cache, ``ptxgen cache`` and
the disk audit, so none of them calls healthy what another refuses.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

from ptxgen.spec import KernelSpec, Target, generator_fingerprint, qualified_name, sha256_hex

LAYOUT = "v1"
MAGIC = f"PTXGEN-CACHE-ENTRY {LAYOUT}\n".encode()
SUFFIX = ".entry"


class EntryError(ValueError):
    """An entry that must not be loaded; the message says why."""


def metadata(spec: KernelSpec, target: Target, key: str, ptx: str, cubin: bytes,
             toolchain: dict[str, Any], link: dict[str, Any], **info: Any) -> dict[str, Any]:
    """The entry's metadata; ``link``: the options the cubin was linked with (``cache.link_options``);
    ``info``: any of the informational INFO fields."""
    canonical = spec.canonical()
    return {"layout": LAYOUT, "key": key, "kind": canonical["kind"], "fields": canonical["fields"],
            "target": {"arch": target.arch, "ptx_version": list(target.ptx_version)},
            "generator": generator_fingerprint(), "toolchain": toolchain, "link": link,
            "ptx_sha256": sha256_hex(ptx), "cubin_sha256": sha256_hex(cubin), "cubin_bytes": len(cubin),
            "ptx_bytes": len(ptx.encode()), **info}


def _hex64(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _int(v: Any) -> bool:
    return type(v) is int and v >= 0


def _number(v: Any) -> bool:
    try:
        return type(v) in (int, float) and math.isfinite(v) and 0 <= v < 2**53
    except OverflowError:  # an int past float's range
        return False


def _int_pair(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_int(x) for x in v)


def _fields(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)
                                       and isinstance(f[1], list) and f[1] and isinstance(f[1][0], str) for f in v)


REQUIRED: dict[str, Callable[[Any], bool]] = {
    "layout": lambda v: isinstance(v, str), "key": _hex64, "kind": lambda v: isinstance(v, str),
    "fields": _fields, "generator": lambda v: isinstance(v, str),
    "target": lambda v: isinstance(v, dict) and set(v) == {"arch", "ptx_version"}
    and isinstance(v["arch"], str) and _int_pair(v["ptx_version"]),
    "toolchain": lambda v: isinstance(v, dict) and set(v) == {"compute_capability", "driver_version"}
    and _int_pair(v["compute_capability"]) and _int(v["driver_version"]),
    "link": lambda v: isinstance(v, dict) and all(type(x) in (int, str) for x in v.values()),
    "ptx_sha256": _hex64, "cubin_sha256": _hex64, "cubin_bytes": _int,
}
INFO: dict[str, Callable[[Any], bool]] = {
    "ptx_bytes": _int, "registers": _int, "local_bytes": _int, "compile_ms": _number, "created": _number,
}


def shape_problem(meta: Any) -> str | None:
    """What is wrong with the metadata's shape (missing or ill-typed fields), or None."""
    if not isinstance(meta, dict):
        return f"metadata is a {type(meta).__name__}, not an object"
    for name, ok in REQUIRED.items():
        if name not in meta:
            return f"metadata has no {name!r}"
        if not ok(meta[name]):
            return f"metadata field {name!r} is malformed: {str(meta[name])[:80]}"
    for name, ok in INFO.items():
        if name in meta and not ok(meta[name]):
            return f"metadata field {name!r} is malformed: {str(meta[name])[:80]}"
    unknown = set(meta) - set(REQUIRED) - set(INFO)
    return f"metadata has unknown fields {sorted(unknown)}" if unknown else None


def link_mismatch(meta: dict[str, Any], link: dict[str, Any]) -> str:
    return f"linked with options {meta.get('link')}, this links with {link}"


def named(path: Path) -> bool:
    """Whether ``path`` is named as an entry is (a temp file of ``write_atomic`` is not)."""
    return path.suffix == SUFFIX and not path.name.startswith(".")


def read(path: Path, layout_dir: Path) -> tuple[dict[str, Any], bytes]:
    """The entry at ``path`` (under ``layout_dir``), decoded and checksummed. An entry is a regular
    file reached through no symbolic link below ``layout_dir``: ``write_atomic`` makes nothing else,
    and a link's target is another file's to change. FileNotFoundError if nothing is there;
    EntryError for anything else that is not an entry, or that cannot be read."""
    parts = path.relative_to(layout_dir).parts
    for depth in range(1, len(parts) + 1):
        if layout_dir.joinpath(*parts[:depth]).is_symlink():
            raise EntryError(f"not a cache entry: {'/'.join(parts[:depth])} is a symbolic link")
    try:  # (no link followed even if one is made meanwhile; no wait on a pipe)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise EntryError("not a cache entry: a symbolic link" if e.errno == errno.ELOOP
                         else f"unreadable: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise EntryError(f"not a cache entry: {'a directory' if stat.S_ISDIR(mode) else 'not a regular file'}")
    try:
        with os.fdopen(fd, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise EntryError(f"unreadable: {e.strerror or e}") from None
    return decode(blob)


def encode(meta: dict[str, Any], cubin: bytes) -> bytes:
    body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode() + b"\n" + cubin
    return MAGIC + sha256_hex(body).encode() + b"\n" + body


def decode(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Parse and checksum an entry; EntryError if it is truncated, corrupt, not an entry, or its
    metadata is not of the entry's shape."""
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
    except (ValueError, RecursionError):
        raise EntryError("unreadable metadata") from None
    problem = shape_problem(meta)
    if problem is not None:
        raise EntryError(problem)
    if meta.get("cubin_bytes") != len(cubin) or meta.get("cubin_sha256") != sha256_hex(cubin):
        raise EntryError("cubin does not match its recorded size and digest")
    return meta, cubin


def mismatch(meta: dict[str, Any], spec: KernelSpec, target: Target, key: str,
             toolchain: dict[str, Any], link: dict[str, Any]) -> str | None:
    """Why a well-formed entry is not the one asked for (``link``: the options a cubin of it is
    linked with now), or None if it is."""
    if meta.get("layout") != LAYOUT:
        return f"layout {meta.get('layout')!r}, expected {LAYOUT}"
    if meta.get("generator") != generator_fingerprint():
        return f"stale: built by generator {meta.get('generator')}, this is {generator_fingerprint()}"
    if meta.get("toolchain") != toolchain:
        return f"foreign toolchain {meta.get('toolchain')}, this is {toolchain}"
    if meta.get("link") != link:
        return link_mismatch(meta, link)
    if meta.get("key") != key:
        return "stored key differs from the file's key"
    canonical = spec.canonical()
    if meta.get("kind") != qualified_name(type(spec)) or meta.get("fields") != canonical["fields"]:
        return "stored spec differs from the requested spec"
    if meta.get("target") != {"arch": target.arch, "ptx_version": list(target.ptx_version)}:
        return "stored target differs"
    return None
