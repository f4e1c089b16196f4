"""`python -m model.golden [--update]`: the golden PTX digests of every example and model kernel.

Without ``--update``: check this host's PTX against ``tests/golden/ptx_digests.json`` and that the
file covers exactly today's specs; exit 1 listing what differs. With ``--update``: rewrite the file
and print which specs changed, were added or dropped (an intended change says why in its commit).
The spec set is chosen here, where the model's presets are known; checking needs only ptxgen.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ptxgen import golden
from ptxgen.keyaudit import Finding
from ptxgen.registry import kinds
from ptxgen.spec import KernelSpec, Target

from .config import PRESETS
from .kernels import ModelKernels
from .optim import AdamWSettings
from .precision import Precision
from .reference import IGNORE_INDEX

TARGET = Target()


def golden_specs() -> list[tuple[KernelSpec, Target]]:
    """Every registered kind's examples, then every preset's model kernels in each precision, once
    (alone on a GPU, and as a data-parallel rank's: GEMMs that do not cut their tails)."""
    specs: dict[KernelSpec, None] = {}
    for cls in kinds().values():
        specs.update(dict.fromkeys(cls.examples()))
    for config in PRESETS.values():
        for precision in Precision:
            for cut_tails in (True, False):
                specs.update(dict.fromkeys(ModelKernels.of(config, AdamWSettings(), IGNORE_INDEX, precision,
                                                           cut_tails=cut_tails).specs()))
    return [(s, TARGET) for s in specs]


def _ident(entry: dict) -> str:
    return json.dumps([entry["kind"], entry["fields"], entry["target"]], separators=(",", ":"))


def coverage(path: Path = golden.DEFAULT_PATH) -> list[Finding]:
    """Specs missing from the file, and entries no longer among today's specs."""
    try:
        stored = {_ident(e): e for e in golden.read(path)}
    except golden.GoldenError as e:
        return [Finding("golden", str(path), str(e))]
    wanted = {_ident(golden.identity(s, t)): (s, t) for s, t in golden_specs()}
    return ([Finding("golden", repr(wanted[k][0]), f"not in the golden file ({golden.UPDATE_COMMAND})")
             for k in wanted.keys() - stored.keys()] +
            [Finding("golden", stored[k].get("spec", k), f"in the golden file but no longer an example or "
                                                         f"model kernel ({golden.UPDATE_COMMAND})")
             for k in stored.keys() - wanted.keys()])


def update(path: Path = golden.DEFAULT_PATH) -> list[str]:
    """Rewrite the file; return one line per spec whose digest changed, appeared or went away."""
    try:
        before = {_ident(e): e for e in golden.read(path)}
    except golden.GoldenError:
        before = {}
    after = {_ident(e): e for e in golden.write(path, golden_specs())}
    lines = [f"changed  {after[k]['spec']}" for k in after.keys() & before.keys()
             if after[k]["ptx_sha256"] != before[k].get("ptx_sha256")]
    lines += [f"added    {after[k]['spec']}" for k in after.keys() - before.keys()]
    lines += [f"dropped  {before[k].get('spec', k)}" for k in before.keys() - after.keys()]
    return sorted(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.golden", description=__doc__.split("\n")[0])
    p.add_argument("--update", action="store_true", help="rewrite the golden file from this tree")
    p.add_argument("--file", type=Path, default=golden.DEFAULT_PATH)
    ns = p.parse_args(argv)
    if ns.update:
        lines = update(ns.file)
        print("\n".join(lines) if lines else "no digest changed")
        print(f"wrote {ns.file}")
        return 0
    findings = golden.check(ns.file) + coverage(ns.file)
    for f in findings:
        print(f)
    print(f"golden digests ({ns.file}): " + (f"{len(findings)} finding(s)" if findings else "identical"))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
