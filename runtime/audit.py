"""`ptxgen-audit`: the cache audit. Non-zero exit on any finding.

1. completeness  every field that changes the PTX changes the key (plus random specs)
2. purity        emission does not depend on the environment or the process
3. disk          every entry's checksum, metadata and key recomputed from its stored spec;
                 stale, corrupt, truncated, misplaced and orphaned files reported; --prune removes them
4. source        no cache key built by hand anywhere in ptxgen/, runtime/, model/
The disk check reads files only: it needs no GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ptxgen.keyaudit import Finding, check_completeness, check_purity, check_source
from ptxgen.registry import by_qualified_name
from ptxgen.spec import SpecError, Target, decode_fields, generator_fingerprint, sha256_hex

from . import entry
from .cache import default_cache_dir, toolchain_dir

CHECKS = ("completeness", "purity", "disk", "source")


def _entry_problem(path: Path) -> str | None:
    """Why the entry at ``path`` is bad, or None if it is valid under this generator."""
    try:
        meta, _cubin = entry.decode(path.read_bytes())
    except (OSError, entry.EntryError) as e:
        return str(e)
    try:
        cls = by_qualified_name(meta["kind"])
        spec = cls(**decode_fields(cls, meta["fields"]))
        target = Target(meta["target"]["arch"], tuple(meta["target"]["ptx_version"]))
    except (KeyError, TypeError, SpecError) as e:
        return f"stored spec cannot be rebuilt: {e}"
    if meta.get("generator") != generator_fingerprint():
        return f"stale: built by generator {meta.get('generator')}, current is {generator_fingerprint()}"
    key = spec.key(target)
    if meta.get("key") != key or path.name != key + entry.SUFFIX:
        return f"key mismatch: file {path.name}, stored {str(meta.get('key'))[:16]}, recomputed {key[:16]}"
    if path.parents[1] != toolchain_dir(path.parents[3], meta["toolchain"]):
        return f"misplaced: recorded toolchain {meta['toolchain']} does not match its directory"
    if meta.get("ptx_sha256") != sha256_hex(spec.emit(target)):
        return "the stored spec now emits different PTX under the same key"
    return None


def check_disk(root: Path, prune: bool = False) -> list[Finding]:
    layout_dir = root / entry.LAYOUT
    if not layout_dir.is_dir():
        return []
    findings = []
    for path in sorted(p for p in layout_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if path.suffix != entry.SUFFIX or path.name.startswith("."):
            problem = "orphaned file (not a cache entry)"
        else:
            problem = _entry_problem(path)
        if problem is not None:
            findings.append(Finding("disk", str(rel), problem + (" (pruned)" if prune else "")))
            if prune:
                path.unlink(missing_ok=True)
    return findings


def run(checks: Sequence[str], cache_dir: Path, prune: bool, repo_root: Path) -> list[Finding]:
    findings: list[Finding] = []
    for check in checks:
        if check == "completeness":
            findings += check_completeness()
        elif check == "purity":
            findings += check_purity()
        elif check == "disk":
            findings += check_disk(cache_dir, prune)
        elif check == "source":
            findings += check_source(repo_root)
    return findings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        print(f"ptxgen-audit: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="ptxgen-audit", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache directory (default $PTXGEN_CACHE_DIR or the XDG cache dir)")
    p.add_argument("--check", action="append", choices=CHECKS,
                   help="run only this check (repeatable; default all four)")
    p.add_argument("--prune", action="store_true", help="delete bad disk entries")
    ns = p.parse_args(argv)
    checks = ns.check or list(CHECKS)
    cache_dir = ns.cache_dir or default_cache_dir()
    if ns.cache_dir is not None and not ns.cache_dir.is_dir():
        p.error(f"cache directory {ns.cache_dir} does not exist")
    findings = run(checks, cache_dir, ns.prune, Path(__file__).resolve().parents[1])
    for f in findings:
        print(f)
    summary = ", ".join(checks)
    print(f"audit ({summary}) of {cache_dir}: " + (f"{len(findings)} finding(s)" if findings else "clean"))
    return 1 if findings and not (ns.prune and all(f.check == "disk" for f in findings)) else 0


if __name__ == "__main__":
    sys.exit(main())
