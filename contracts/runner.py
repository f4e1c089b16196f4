"""`ptxgen contracts validate | check`: is every promise bound to a real test, and did it hold?

``validate`` checks the schema, duplicate ids and that every bound test exists (collected by
pytest); errors print one per line and exit 2. ``check`` runs the bound tests and the
planted-defect tests and prints one row per falsifier: discharged, falsified, or not run (needs a
GPU); it exits 1 when any falsifier that could run was falsified (or its planted defect went unseen).
``check --gpu-only`` runs only the falsifiers that need a GPU: the GPU machine's share, where the
CPU ones (CI's, minutes of interpreted kernels) would not fit a timed call; there, none of them
run (no GPU visible after all) fails the check too, since running them is all it is for.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ptxgen.cmdline import Parser, UsageError, print_error

from .schema import Contracts, Falsifier, load, missing_tests

HERE = Path(__file__).resolve().parent
# a verbose result line: "tests/f.py::name[params] OUTCOME [ 50%]"; params may hold spaces
OUTCOME = re.compile(r"^(tests/[^\s\[]+)(?:\[.*?\])? (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def _pytest(root: Path, args: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=root,
                          capture_output=True, text=True)


def collect(root: Path) -> set[str]:
    proc = _pytest(root, ["--collect-only", "-q"])
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


def outcomes(root: Path, nodes: Sequence[str]) -> dict[str, list[str]]:
    """Outcome of every item of each node (a parametrized test has several), by node id."""
    proc = _pytest(root, ["-v", "--no-header", *sorted(set(nodes))])
    found: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        m = OUTCOME.match(line.strip())
        if m:
            found.setdefault(m[1], []).append(m[2])
    return found


def verdict(f: Falsifier, results: dict[str, list[str]]) -> str:
    test = results.get(f.test, [])
    planted = [results.get(p, []) for p in f.planted]
    if not test or all(r == "SKIPPED" for r in test):
        return "not run (needs GPU)" if f.gpu else "not run"
    if any(r in ("FAILED", "ERROR") for r in test):
        return "falsified"
    if any(not r or any(x in ("FAILED", "ERROR") for x in r) for r in planted):
        return "falsified (planted defect not caught)"
    return "discharged"


def _validated(root: Path, directory: Path) -> Contracts | None:
    """The contracts, or None after printing every error (schema, ids, tests pytest cannot find)."""
    c = load(directory)
    errors = c.errors + missing_tests(c.falsifiers, collect(root))
    for e in errors:
        print_error(f"contracts: {e}")
    if errors:
        return None
    print(f"contracts: {len(c.contracts)} contracts, {len(c.falsifiers)} falsifiers, all bound to existing tests")
    return c


def cmd_validate(root: Path, directory: Path) -> int:
    return 0 if _validated(root, directory) is not None else 2


def to_run(falsifiers: Sequence[Falsifier], gpu_only: bool) -> list[Falsifier]:
    """The falsifiers a check runs: every one, or (``gpu_only``) those that need a GPU."""
    return [f for f in falsifiers if f.gpu or not gpu_only]


def cmd_check(root: Path, directory: Path, gpu_only: bool = False) -> int:
    c = _validated(root, directory)
    if c is None:
        return 2
    run = {f.id for f in to_run(c.falsifiers, gpu_only)}
    nodes = [n for f in c.falsifiers if f.id in run for n in (f.test, *f.planted)]
    results = outcomes(root, nodes) if nodes else {}  # no node ids would make pytest run every test
    rows = [(f, verdict(f, results) if f.id in run else "not run (--gpu-only: CI's)") for f in c.falsifiers]
    print(f"\n  {'falsifier':<18} {'contract':<26} {'gpu':<4} {'release':<8} verdict")
    for f, v in rows:
        print(f"  {f.id:<18} {f.contract:<26} {'yes' if f.gpu else 'no':<4} {'blocks' if f.blocks_release else '-':<8} {v}")
    counts = {v: sum(1 for _, x in rows if x == v) for v in sorted({x for _, x in rows})}
    print("\n  " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return check_status([v for f, v in rows if f.id in run], gpu_only)


def check_status(verdicts: Sequence[str], gpu_only: bool) -> int:
    """1 when a falsifier that ran was falsified, or (``gpu_only``) when none of them ran at all."""
    if gpu_only and verdicts and all(v.startswith("not run") for v in verdicts):
        print("contracts: --gpu-only ran none of the GPU falsifiers (is a GPU visible?)", file=sys.stderr)
        return 1
    return 1 if any(v.startswith("falsified") for v in verdicts) else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="ptxgen contracts", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("validate", "check"))
    p.add_argument("--root", type=Path, default=HERE.parent, help="the repository (holds tests/)")
    p.add_argument("--dir", type=Path, default=HERE, help="the contract files (default: this package)")
    p.add_argument("--gpu-only", action="store_true",
                   help="check: run only the falsifiers that need a GPU (CI discharges the others)")
    try:
        ns = p.parse_args(argv)
    except UsageError as e:  # one line, not argparse's usage block
        print_error(f"contracts: error: {e} (ptxgen contracts validate|check [--root REPO] [--dir DIR] [--gpu-only])")
        return 2
    # each said before any work: pytest collects the whole repository first (a missing --dir read as a folder
    # without contracts after it, --gpu-only with validate did nothing)
    why = (f"{ns.root} has no tests/ directory; pass --root REPO, the repository that holds the contracts' tests"
           if not (ns.root / "tests").is_dir() else
           f"--dir {ns.dir} is not a directory" if not ns.dir.is_dir() else
           "--gpu-only is for check (validate runs no test)" if ns.gpu_only and ns.command == "validate" else None)
    if why:
        print_error(f"contracts: error: {why}")
        return 2
    if ns.command == "validate":
        return cmd_validate(ns.root, ns.dir)
    return cmd_check(ns.root, ns.dir, ns.gpu_only)
