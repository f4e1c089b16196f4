"""The contract schema and its validator: YAML contracts in, a list of one-line errors out.

A contract is a promise of the project with the falsifiers that could prove it wrong, each bound to
the pytest node that tests it and to the tests that plant the defect it guards against (so a
falsifier cannot pass vacuously). The schema is data (``SCHEMA``), documented in README.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ptxgen.files import read_file

CONTRACT_ID = re.compile(r"^[a-z][a-z0-9-]*$")
FALSIFIER_ID = re.compile(r"^FALSIFY-[A-Z]+-\d{3}$")
NODE_ID = re.compile(r"^tests/[\w/]+\.py::\w+$")

# field -> (type, required); lists give their item type as a one-element tuple
SCHEMA: dict[str, dict[str, tuple[Any, bool]]] = {
    "contract": {"id": (str, True), "version": (int, True), "status": (str, True), "description": (str, True),
                 "references": ((str,), True), "invariants": ((str,), True), "falsifiers": ((dict,), True)},
    "falsifier": {"id": (str, True), "rule": (str, True), "prediction": (str, True), "test": (str, True),
                  "planted": ((str,), True), "tolerance": (str, True), "gpu": (bool, True),
                  "blocks_release": (bool, True)},
}
STATUSES = ("active", "draft", "retired")


@dataclass(frozen=True)
class Falsifier:
    id: str
    contract: str
    rule: str
    prediction: str
    test: str
    planted: tuple[str, ...]
    tolerance: str
    gpu: bool
    blocks_release: bool


@dataclass
class Contracts:
    contracts: list[dict[str, Any]] = field(default_factory=list)
    falsifiers: list[Falsifier] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _check_fields(where: str, data: Any, kind: str) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where}: a {kind} must be a mapping, got {type(data).__name__}"]
    errors = []
    spec = SCHEMA[kind]
    for name, (typ, required) in spec.items():
        if name not in data:
            if required:
                errors.append(f"{where}: missing field '{name}'")
            continue
        value = data[name]
        if isinstance(typ, tuple):
            if not isinstance(value, list) or not value or not all(isinstance(v, typ[0]) for v in value):
                errors.append(f"{where}: '{name}' must be a non-empty list of {typ[0].__name__}")
        elif not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            errors.append(f"{where}: '{name}' must be {typ.__name__}, got {value!r}")
    errors += [f"{where}: unknown field '{name}'" for name in data if name not in spec]
    return errors


def load(directory: Path) -> Contracts:
    """Every ``*.yaml`` in ``directory``, checked against the schema (test existence is separate)."""
    out = Contracts()
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        out.errors.append(f"{directory}: no contract files (*.yaml)")
    seen_contracts: dict[str, str] = {}
    seen_falsifiers: dict[str, str] = {}
    for path in files:
        try:
            data = yaml.safe_load(read_file(path).decode())
        except yaml.YAMLError as e:
            out.errors.append(f"{path.name}: not valid YAML: {str(e).splitlines()[0]}")
            continue
        except RecursionError:
            out.errors.append(f"{path.name}: not valid YAML here: nested too deep")
            continue
        except (OSError, UnicodeDecodeError) as e:  # unreadable, or bytes that are not UTF-8 text
            out.errors.append(f"{path.name}: cannot be read as text: {getattr(e, 'strerror', None) or e}")
            continue
        errors = _check_fields(path.name, data, "contract")
        if errors:
            out.errors += errors
            if not isinstance(data, dict) or not isinstance(data.get("falsifiers"), list):
                continue
        cid = data.get("id")
        if isinstance(cid, str):
            if not CONTRACT_ID.match(cid):
                out.errors.append(f"{path.name}: contract id {cid!r} must be lower-case words joined by '-'")
            if cid in seen_contracts:
                out.errors.append(f"{path.name}: duplicate contract id {cid!r} (also in {seen_contracts[cid]})")
            seen_contracts[cid] = path.name
        if data.get("status") not in STATUSES:
            out.errors.append(f"{path.name}: status must be one of {', '.join(STATUSES)}, got {data.get('status')!r}")
        out.contracts.append(data)
        for i, f in enumerate(data.get("falsifiers") or []):
            where = f"{path.name}: falsifier {f.get('id', i) if isinstance(f, dict) else i}"
            errors = _check_fields(where, f, "falsifier")
            if errors:
                out.errors += errors
                continue
            if not FALSIFIER_ID.match(f["id"]):
                out.errors.append(f"{where}: id must look like FALSIFY-<AREA>-NNN")
            if f["id"] in seen_falsifiers:
                out.errors.append(f"{where}: duplicate falsifier id (also in {seen_falsifiers[f['id']]})")
            seen_falsifiers[f["id"]] = path.name
            for node in [f["test"], *f["planted"]]:
                if not NODE_ID.match(node):
                    out.errors.append(f"{where}: {node!r} is not a pytest node id (tests/file.py::test_name)")
            out.falsifiers.append(Falsifier(f["id"], str(cid), f["rule"], f["prediction"], f["test"],
                                            tuple(f["planted"]), f["tolerance"], f["gpu"], f["blocks_release"]))
    return out


def missing_tests(falsifiers: list[Falsifier], collected: set[str]) -> list[str]:
    """Errors for bound tests that pytest did not collect (a parametrized test counts by its name)."""
    names = {node.split("[", 1)[0] for node in collected}
    errors = []
    for f in falsifiers:
        for role, node in [("test", f.test), *(("planted", p) for p in f.planted)]:
            if node not in names:
                errors.append(f"{f.contract}: {f.id}: {role} {node} does not exist (pytest collected no such test)")
    return errors
