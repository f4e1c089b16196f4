"""`ptxgen-audit`: the cache audit. Non-zero exit on any finding.

1. completeness  every field that changes the PTX changes the key (plus random specs)
2. purity        emission does not depend on the environment or the process, and reads no
                 environment variable, whatever its name
3. disk          every entry's checksum, metadata shape and key recomputed from its stored spec;
                 stale (generator or link options), corrupt, truncated, malformed, misplaced
                 (toolchain or key-prefix folder), linked (a symbolic link) and orphaned files
                 reported; --prune removes them and reports any it cannot remove (a key
                 collision, an intact entry whose text is not what its spec emits now, still fails:
                 the generator is at fault)
4. source        no cache key built by hand anywhere in ptxgen/, runtime/, model/; no
                 host-dependent math (libm, numpy transcendentals) and no read of the
                 environment in the generator
5. golden        host purity: every golden PTX digest (tests/golden/ptx_digests.json) is what this
                 host emits (run by default where the file is there, i.e. in a source tree)
The disk check reads files only: it needs no GPU. A cache path that is missing or not a directory
is bad input (one line, exit 2), not a clean cache.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from ptxgen import golden
from ptxgen.builder import PtxBuildError
from ptxgen.cmdline import Parser, UsageError, paths_as_named, print_error
from ptxgen.keyaudit import Finding, check_completeness, check_purity, check_source
from ptxgen.registry import by_qualified_name, is_registered
from ptxgen.spec import KernelSpec, SpecError, Target, decode_fields, generator_fingerprint, sha256_hex

from . import entry
from .cache import default_cache_dir, link_options, toolchain_dir

CHECKS = ("completeness", "purity", "disk", "source", "golden")


class CacheDirError(ValueError):
    """The cache path is missing or not a directory: bad input (one line, exit 2), not "clean"."""


def _stored_spec(meta: dict) -> tuple[KernelSpec, Target] | str:
    """The spec and target an entry of a registered kind was built for, or why they cannot be. The
    stored fields must be that spec's own encoding: the cache compares them as stored (an int for a
    float field, a field left out or given twice is a spec the cache never loads), not as rebuilt."""
    try:
        cls = by_qualified_name(meta["kind"])
        spec = cls(**decode_fields(cls, meta["fields"]))
        target = Target(meta["target"]["arch"], tuple(meta["target"]["ptx_version"]))
    except (TypeError, ValueError, IndexError, KeyError, OverflowError, RecursionError) as e:  # SpecError: a ValueError
        return f"stored spec cannot be rebuilt: {e}"
    encoded = spec.canonical()["fields"]
    if meta["fields"] != encoded:
        names, own = [n for n, _ in meta["fields"]], [n for n, _ in encoded]
        if names != own:
            missing = [n for n in own if n not in names]
            other = list(dict.fromkeys(n for n in names if n not in own or names.count(n) > 1))
            return (f"stored spec does not list {cls.__name__}'s fields once each, in order (missing: "
                    f"{', '.join(missing) or 'none'}; unknown or repeated: {', '.join(other) or 'none'})")
        name, stored, canonical = next((n, a, b) for (n, a), (_, b) in zip(meta["fields"], encoded) if a != b)
        return f"stored spec holds {name} as {stored}, which {cls.__name__} encodes as {canonical}"
    return spec, target


def _load_check(path: Path, layout_dir: Path, meta: dict) -> tuple[str | None, tuple[KernelSpec, Target] | None]:
    """Why a readable entry is never loaded, from its metadata and its place (its key recomputed
    from its stored spec): another layout or generator, a stored spec that cannot be rebuilt or
    that keys to another file or was linked with other options than its cubin would be now, or a
    file where its key and toolchain do not put it; and the stored spec and target it rebuilt
    (None: a kind not registered here, or a problem found before). A script's or plugin's class
    (not loaded here) keeps its stored key: only its place is checked (its checksums held, and the
    cache re-checks the text on load)."""
    if meta.get("layout") != entry.LAYOUT:
        return f"layout {meta.get('layout')!r}, expected {entry.LAYOUT}", None
    stored = _stored_spec(meta) if is_registered(meta["kind"]) else None
    if isinstance(stored, str):
        return stored, None
    if meta["generator"] != generator_fingerprint():
        return f"stale: built by generator {meta['generator']}, current is {generator_fingerprint()}", None
    key = meta["key"]
    if stored is not None:
        try:
            key = stored[0].key(stored[1])
        except (SpecError, PtxBuildError) as e:
            return f"stored spec cannot be emitted: {e}", None
        if meta["key"] != key or path.name != key + entry.SUFFIX:
            return f"key mismatch: file {path.name}, stored {meta['key'][:16]}, recomputed {key[:16]}", None
        link = link_options(stored[0].arch(stored[1]))
        if meta["link"] != link:
            return entry.link_mismatch(meta, link), None
    placed = path.relative_to(layout_dir).parts
    expected = toolchain_dir(layout_dir.parent, meta["toolchain"]).name, key[:2], key + entry.SUFFIX
    if placed != expected:
        return f"misplaced: at {'/'.join(placed)}, belongs at {'/'.join(expected)}", None
    return None, stored


COLLISION = "key collision"


def examine(path: Path, layout_dir: Path) -> tuple[dict | None, str | None]:
    """The metadata of the entry at ``path`` (None: not an entry, unreadable, or gone) and why the
    cache never loads it (None: valid under this generator): what the disk audit reports and
    ``ptxgen cache ls`` lists. Read by ``entry.read`` as the cache reads it, then a load problem,
    or (a registered kind) the PTX its stored spec emits now under its key. Never raises on
    anything a file can hold: the audit must get through a damaged cache."""
    try:
        meta, _cubin = entry.read(path, layout_dir)
    except FileNotFoundError:  # removed since it was listed (another prune)
        return None, None
    except entry.EntryError as e:
        return None, str(e)
    problem, stored = _load_check(path, layout_dir, meta)
    if stored is None:  # a load problem, or a kind whose PTX cannot be emitted here
        return meta, problem
    spec, target = stored
    try:
        ptx = spec.emit(target)
    except (SpecError, PtxBuildError) as e:
        return meta, f"stored spec cannot be emitted: {e}"
    if meta["ptx_sha256"] != sha256_hex(ptx):  # intact (checksummed): not damage, a second text under the key
        return meta, (f"{COLLISION}: the entry holds PTX {meta['ptx_sha256']}, its stored spec now emits "
                      f"{sha256_hex(ptx)} under the same key (an emitter is impure or the key misses a parameter)")
    return meta, None


def walk(layout_dir: Path) -> tuple[list[Path], list[Finding]]:
    """Every file under the layout directory, and every link or directory named as an entry is
    (no link followed: ``entry.read`` refuses what is reached through one); unreadable directories
    as findings."""
    found, findings = [], []

    def unreadable(e: OSError) -> None:
        findings.append(Finding("disk", str(e.filename), f"unreadable directory: {e.strerror}"))

    for folder, dirs, names in os.walk(layout_dir, onerror=unreadable):
        found += [Path(folder) / n for n in names]
        # a directory where an entry belongs, or a link to one (not followed): neither is an entry
        found += [Path(folder) / d for d in dirs if d.endswith(entry.SUFFIX) or (Path(folder) / d).is_symlink()]
    return sorted(found), findings


def check_disk(root: Path, prune: bool = False) -> list[Finding]:
    """Findings for every bad file of the cache at ``root``; with ``prune`` each is deleted, and one
    that cannot be is a finding of its own. CacheDirError if ``root`` is not a directory."""
    if not root.exists():
        raise CacheDirError(f"cache directory {root} does not exist")
    if not root.is_dir():
        raise CacheDirError(f"cache directory {root} is not a directory")
    layout_dir = root / entry.LAYOUT
    if not layout_dir.is_dir():
        return [Finding("disk", entry.LAYOUT, "not a directory")] if layout_dir.exists() else []
    paths, findings = walk(layout_dir)
    for path in paths:
        rel = path.relative_to(root)
        problem = examine(path, layout_dir)[1] if entry.named(path) else "orphaned file (not a cache entry)"
        if problem is None:
            continue
        if not prune:
            findings.append(Finding("disk", str(rel), problem))
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            findings.append(Finding("disk", str(rel), f"{problem}; could not prune: {e.strerror or e}"))
        else:
            findings.append(Finding("disk", str(rel), f"{problem} (pruned)"))
    return findings


def run(checks: Sequence[str], cache_dir: Path, prune: bool, repo_root: Path,
        golden_file: Path = golden.DEFAULT_PATH) -> list[Finding]:
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
        elif check == "golden":
            findings += golden.check(golden_file)
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    """Bad input (an argument, a cache directory that is not one) is one line and exit 2 (SystemExit, as
    argparse's own)."""
    try:
        return _audit(argv)
    except UsageError as e:
        print_error(f"ptxgen-audit: error: {e}")
        raise SystemExit(2) from None


def _audit(argv: Sequence[str] | None) -> int:
    p = Parser(prog="ptxgen-audit", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache directory (default $PTXGEN_CACHE_DIR or the XDG cache dir)")
    p.add_argument("--check", action="append", choices=CHECKS,
                   help="run only this check (repeatable; default all, golden where its file is there)")
    p.add_argument("--prune", action="store_true", help="delete bad disk entries")
    p.add_argument("--golden", type=Path, default=None,
                   help="golden PTX digest file (default: the source tree's tests/golden/ptx_digests.json)")
    ns = p.parse_args(argv)
    paths_as_named()  # (a cache directory, or an entry's folder, named in bytes that are not UTF-8)
    if ns.golden is not None and not ns.golden.is_file():
        p.error(f"--golden {ns.golden}: " + ("not a regular file" if ns.golden.exists() else "no such file"))
    golden_file = ns.golden or golden.DEFAULT_PATH
    checks = ns.check or [c for c in CHECKS if c != "golden" or golden_file.exists()]
    twice = next((c for c in checks if checks.count(c) > 1), None)
    if twice:  # (it ran twice and reported its findings twice)
        p.error(f"argument --check: {twice} given twice; give it once")
    # a flag for a check that does not run would do nothing
    for flag, given, check in (("--prune", ns.prune, "disk"), ("--cache-dir", ns.cache_dir, "disk"),
                               ("--golden", ns.golden, "golden")):
        if given and check not in checks:
            p.error(f"{flag} is for the {check} check, which --check {' --check '.join(checks)} leaves out: "
                    f"add --check {check}")
    cache_dir = ns.cache_dir or default_cache_dir()
    if "disk" in checks and not cache_dir.is_dir():
        p.error(f"cache directory {cache_dir} " + ("is not a directory" if cache_dir.exists() else "does not exist"))
    try:
        findings = run(checks, cache_dir, ns.prune, Path(__file__).resolve().parents[1], golden_file)
    except CacheDirError as e:  # removed between the check above and the walk
        p.error(str(e))
    for f in findings:
        print(f)
    summary = ", ".join(checks)
    print(f"audit ({summary}) of {cache_dir}: " + (f"{len(findings)} finding(s)" if findings else "clean"))
    # a key collision fails even when pruned: the generator emits two texts under one key, not the cache's fault
    pruned = ns.prune and all(f.check == "disk" and f.message.endswith("(pruned)")
                              and not f.message.startswith(COLLISION) for f in findings)
    return 1 if findings and not pruned else 0


if __name__ == "__main__":
    sys.exit(main())
