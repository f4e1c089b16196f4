"""`ptxgen cache ls | show KEY | diff KEY KEY`: what the on-disk module cache holds, judged as the disk audit judges it.

A KEY may be any unique prefix of a key (at least 4 hex digits). Bad input (a missing cache
directory, an unknown or ambiguous key) prints one line and exits 2. Needs no GPU.
"""
from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any, Sequence

from ptxgen.cmdline import Parser, UsageError
from ptxgen.spec import SpecError, decode_value

from . import entry
from .audit import examine, walk
from .cache import default_cache_dir

# the file; its metadata, or why it cannot be read; why a readable one is never loaded (or None)
Entry = tuple[Path, "dict[str, Any] | str", "str | None"]


def entries(root: Path) -> list[Entry]:
    """Every ``*.entry`` under the cache, as the disk audit walks and judges it (``audit.examine``):
    its metadata or why it is not an entry, and why a readable one is never loaded."""
    if not root.is_dir():
        raise UsageError(f"cache directory {root} " + ("is not a directory" if root.exists() else "does not exist"))
    out: list[Entry] = []
    layout_dir = root / entry.LAYOUT
    for path in filter(entry.named, walk(layout_dir)[0] if layout_dir.is_dir() else []):
        meta, problem = examine(path, layout_dir)
        if meta is not None:
            out.append((path, meta, problem))
        elif problem is not None:  # (neither: removed since it was listed)
            out.append((path, f"damaged: {problem}", None))
    return out


def find(root: Path, key: str) -> tuple[Path, dict[str, Any], str | None]:
    """The one readable entry whose key starts with ``key``: file, metadata, why it is never loaded."""
    if not re.fullmatch(r"[0-9a-f]{4,64}", key):
        raise UsageError(f"{key!r} is not a cache key (4 to 64 lower-case hex digits)")
    matches = [e for e in entries(root) if e[0].name.startswith(key)]
    if not matches:
        raise UsageError(f"no entry with key {key} in {root}")
    if len(matches) > 1:
        where = ", ".join(str(p.relative_to(root)) for p, *_ in matches[:3])
        raise UsageError(f"key {key} is ambiguous: {len(matches)} entries start with it ({where}"
                         f"{', ...' if len(matches) > 3 else ''})")
    path, meta, problem = matches[0]
    if isinstance(meta, str):
        raise UsageError(f"{path}: {meta}")
    return path, meta, problem


def fields(meta: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in meta["fields"]:
        try:
            out[name] = decode_value(value)
        except (SpecError, ValueError, OverflowError, RecursionError):  # shown as stored
            out[name] = value
    return out


def describe(meta: dict[str, Any], problem: str | None = None) -> dict[str, str]:
    """The entry as ordered (label, text) rows (``problem``: why it is never loaded)."""
    created = meta.get("created")
    spills = meta.get("local_bytes")
    return {
        "key": meta["key"],
        "kind": meta["kind"],
        "fields": ", ".join(f"{k}={v!r}" for k, v in fields(meta).items()),
        "target": f"{meta['target']['arch']}, PTX ISA {'.'.join(map(str, meta['target']['ptx_version']))}",
        "toolchain": "cc {}.{}, driver {}".format(*meta["toolchain"]["compute_capability"],
                                                 meta["toolchain"]["driver_version"]),
        "link": ", ".join(f"{k}={v}" for k, v in meta["link"].items()) or "the driver's defaults for the device",
        "generator": meta["generator"],
        "ptx": f"{meta.get('ptx_bytes', '?')} bytes, sha256 {meta['ptx_sha256']}",
        "cubin": f"{meta['cubin_bytes']} bytes, sha256 {meta['cubin_sha256']}",
        "registers": str(meta.get("registers", "?")),
        "spills": "?" if spills is None else f"{spills} bytes local memory",
        "compile ms": str(meta.get("compile_ms", "?")),
        "created": _when(created),
        **({"problem": f"{problem} (never loaded)"} if problem else {}),
    }


def _when(created: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):  # none, or no date a clock shows
        return "?"


def cmd_ls(root: Path) -> int:
    rows = entries(root)
    print(f"{'key':16}  {'kind':22} {'target':8} {'toolchain':20} {'cubin':>8} {'regs':>4} {'spill':>5} "
          f"{'ms':>7}  created              fields")
    bad = 0
    for path, meta, problem in rows:
        if isinstance(meta, str) or problem:
            print(f"{path.name[:16]:16}  {meta if isinstance(meta, str) else problem + ' (never loaded)'}")
            bad += 1
            continue
        d = describe(meta)
        kind = meta["kind"].rsplit(".", 1)[-1]
        print(f"{meta['key'][:16]:16}  {kind:22} {meta['target']['arch']:8} {d['toolchain']:20} "
              f"{meta['cubin_bytes']:>8} {d['registers']:>4} {str(meta.get('local_bytes', '?')):>5} "
              f"{str(meta.get('compile_ms', '?')):>7}  {d['created'][:19]:20} {d['fields']}")
    print(f"{len(rows)} entries in {root}" + (f" ({bad} unusable: ptxgen-audit --check disk --prune removes "
                                               f"them)" if bad else ""))
    return 0


def cmd_show(root: Path, key: str) -> int:
    path, meta, problem = find(root, key)
    for label, text in describe(meta, problem).items():
        print(f"{label:11} {text}")
    print(f"{'file':11} {path}")
    return 0


def cmd_diff(root: Path, a: str, b: str) -> int:
    (pa, ma, qa), (pb, mb, qb) = find(root, a), find(root, b)
    da, db = describe(ma, qa), describe(mb, qb)
    fa, fb = fields(ma), fields(mb)
    lines = []
    if ma["kind"] != mb["kind"]:
        lines.append(f"kind        {ma['kind']} -> {mb['kind']}")
    else:
        encoded_a, encoded_b = dict(map(tuple, ma["fields"])), dict(map(tuple, mb["fields"]))
        for name in dict.fromkeys([*encoded_a, *encoded_b]):
            if encoded_a.get(name) != encoded_b.get(name):
                lines.append(f"field       {name}: {fa.get(name, '(absent)')!r} -> {fb.get(name, '(absent)')!r}")
    for label in ("target", "toolchain", "link", "generator", "ptx", "cubin", "registers", "spills", "compile ms",
                  "created", "problem"):
        if da.get(label, "none") != db.get(label, "none"):
            lines.append(f"{label:11} {da.get(label, 'none')} -> {db.get(label, 'none')}")
    print(f"{pa.name[:16]} -> {pb.name[:16]}")  # (the files': a misplaced copy's stored key is another's)
    print("\n".join(lines) if lines else "no difference")
    return 0


def main(argv: Sequence[str]) -> int:
    p = Parser(prog="ptxgen cache", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache directory (default $PTXGEN_CACHE_DIR or the XDG cache dir)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("ls", help="every entry, one line each")
    sub.add_parser("show", help="one entry in full").add_argument("key")
    diff = sub.add_parser("diff", help="what differs between two entries")
    diff.add_argument("a")
    diff.add_argument("b")
    try:
        ns = p.parse_args(argv)
    except UsageError as e:  # (said after "ptxgen: error: ")
        raise UsageError(f"{p.prog}: {e}") from None
    root = ns.cache_dir or default_cache_dir()
    if ns.command == "ls":
        return cmd_ls(root)
    if ns.command == "show":
        return cmd_show(root, ns.key)
    return cmd_diff(root, ns.a, ns.b)
