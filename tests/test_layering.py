"""DESIGN's one-way rule, read from the source: model -> runtime -> ptxgen, and runtime knows kernels
only as specs (never a kernel module)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> dict[str, set[str]]:
    """Per source file of ``package``: every absolute module it imports (relative ones resolved)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        here = path.relative_to(ROOT).with_suffix("").parts
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level]) if node.level else ""
                module = ".".join(x for x in (base, node.module) if x)
                names.add(module)
                names.update(f"{module}.{a.name}" for a in node.names)
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package, forbidden", [("ptxgen", ("runtime", "model")),
                                                ("runtime", ("model", "ptxgen.kernels"))])
def test_dependencies_point_one_way(package, forbidden):
    bad = {f: sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in forbidden))
           for f, mods in imported_modules(package).items()}
    assert {f: m for f, m in bad.items() if m} == {}


def test_the_scan_sees_relative_and_absolute_imports():
    mods = imported_modules("ptxgen")["ptxgen/kernels/gemm_tc.py"]
    assert {"ptxgen.hw", "ptxgen.kernels.ring", "dataclasses"} <= mods
