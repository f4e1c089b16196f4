"""The contracts validator rejects broken contracts with a clear message; the real ones are valid."""
from pathlib import Path

import pytest
import yaml

from contracts.runner import main
from contracts.schema import Falsifier, load, missing_tests
from contracts.runner import check_status, to_run, verdict

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "id": "demo", "version": 1, "status": "active", "description": "d", "references": ["r"],
    "invariants": ["i"],
    "falsifiers": [{"id": "FALSIFY-DEMO-001", "rule": "r", "prediction": "p",
                    "test": "tests/test_contracts.py::test_the_projects_contracts_are_valid",
                    "planted": ["tests/test_contracts.py::test_a_planted_broken_contract_is_rejected"],
                    "tolerance": "exact", "gpu": False, "blocks_release": True}],
}


def write(tmp_path, name, data):
    (tmp_path / name).write_text(yaml.safe_dump(data))


def test_the_projects_contracts_are_valid(capsys):
    assert main(["validate", "--root", str(ROOT)]) == 0
    assert "all bound to existing tests" in capsys.readouterr().out


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c["falsifiers"][0].update(test="tests/test_contracts.py::test_that_does_not_exist"),
     "test tests/test_contracts.py::test_that_does_not_exist does not exist"),
    (lambda c: c["falsifiers"].append(dict(c["falsifiers"][0])), "duplicate falsifier id"),
    (lambda c: c.pop("invariants"), "missing field 'invariants'"),
    (lambda c: c["falsifiers"][0].pop("planted"), "missing field 'planted'"),
    (lambda c: c["falsifiers"][0].update(id="FALSIFY-1"), "must look like FALSIFY-<AREA>-NNN"),
    (lambda c: c["falsifiers"][0].update(gpu="no"), "'gpu' must be bool"),
    (lambda c: c.update(status="maybe"), "status must be one of"),
])
def test_a_planted_broken_contract_is_rejected(tmp_path, capsys, break_it, message):
    import copy
    data = copy.deepcopy(GOOD)
    break_it(data)
    write(tmp_path, "demo.yaml", data)
    assert main(["validate", "--root", str(ROOT), "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_contract_file_that_is_not_text_and_bad_arguments_are_one_line(tmp_path, capsys):
    (tmp_path / "x.yaml").write_bytes(bytes(range(128, 256)))
    assert main(["validate", "--root", str(ROOT), "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "x.yaml: cannot be read as text" in err and "Traceback" not in err
    for argv in ([], ["frob"], ["validate", "--bogus"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("contracts: error: ") and "usage:" not in err


@pytest.mark.parametrize("argv, says", [
    (["validate", "--dir", "missing"], "--dir {tmp}/missing is not a directory"),  # (read as 'no contract files')
    (["check", "--dir", "x.yaml"], "--dir {tmp}/x.yaml is not a directory"),
    (["validate", "--gpu-only"], "--gpu-only is for check"),  # (validate took it and did nothing)
])
def test_a_dir_that_is_not_one_and_a_flag_validate_ignores_are_refused_before_pytest_runs(tmp_path, capsys,
                                                                                          monkeypatch, argv, says):
    import contracts.runner
    monkeypatch.setattr(contracts.runner, "_pytest", lambda *a: pytest.fail("pytest ran"))
    (tmp_path / "x.yaml").write_text("")
    argv = [str(tmp_path / a) if a in ("missing", "x.yaml") else a for a in argv]
    assert main([*argv, "--root", str(ROOT)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"contracts: error: {says.format(tmp=tmp_path)}") and err.count("\n") == 1, err


def test_duplicate_contract_ids_across_files_are_rejected(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    other = dict(GOOD, falsifiers=[dict(GOOD["falsifiers"][0], id="FALSIFY-DEMO-002")])
    write(tmp_path, "b.yaml", other)
    assert any("duplicate contract id 'demo'" in e for e in load(tmp_path).errors)


def test_parametrized_tests_count_by_name():
    f = Falsifier("FALSIFY-X-001", "c", "r", "p", "tests/t.py::test_a", ("tests/t.py::test_b",), "exact", False, True)
    assert missing_tests([f], {"tests/t.py::test_a[1-2]", "tests/t.py::test_b"}) == []


def test_a_gpu_only_check_that_ran_none_of_them_fails_and_one_that_ran_some_passes():
    assert check_status(["not run (needs GPU)", "not run (needs GPU)"], gpu_only=True) == 1  # no GPU after all
    assert check_status(["discharged", "not run (needs GPU)"], gpu_only=True) == 0  # e.g. a 2-GPU one on 1 GPU
    assert check_status(["not run (needs GPU)"], gpu_only=False) == 0  # CI: the GPU ones are not its to run
    assert check_status(["discharged", "falsified"], gpu_only=False) == 1


def test_gpu_only_runs_just_the_falsifiers_that_need_a_gpu():
    cpu, gpu = (Falsifier(f"FALSIFY-X-00{i}", "c", "r", "p", "tests/t.py::a", (), "exact", g, True)
                for i, g in ((1, False), (2, True)))
    assert to_run([cpu, gpu], gpu_only=True) == [gpu]
    assert to_run([cpu, gpu], gpu_only=False) == [cpu, gpu]


@pytest.mark.parametrize("test, planted, gpu, expected", [
    (["PASSED", "PASSED"], [["PASSED"]], False, "discharged"),
    (["PASSED", "FAILED"], [["PASSED"]], False, "falsified"),
    (["SKIPPED"], [["PASSED"]], True, "not run (needs GPU)"),
    (["PASSED"], [["FAILED"]], False, "falsified (planted defect not caught)"),
    (["PASSED"], [[]], False, "falsified (planted defect not caught)"),
])
def test_verdicts(test, planted, gpu, expected):
    f = Falsifier("FALSIFY-X-001", "c", "r", "p", "tests/t.py::a", ("tests/t.py::b",), "exact", gpu, True)
    assert verdict(f, {"tests/t.py::a": test, "tests/t.py::b": planted[0]}) == expected
