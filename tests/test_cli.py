import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptxgen.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_kinds_fields_types_and_defaults(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "rmsnorm:" in out and "rope:" in out
    assert "--eps          float  (required)" in out
    assert "--block-size   int    = 256" in out
    assert "--dtype        {f32,bf16} = 'f32'" in out  # (was the enum's repr, <DType.F32: 'f32'>, no value to give)


@pytest.mark.parametrize("argv, shows", [(["list", "--help"], "usage: ptxgen COMMAND"),
                                         (["dump", "--help"], "usage: ptxgen COMMAND"),
                                         (["inspect", "-h"], "usage: ptxgen COMMAND"),
                                         (["dump", "rmsnorm", "--help"], "--eps          float  (required)"),
                                         (["inspect", "rmsnorm", "--hidden", "8", "-h"], "--block-size   int    = 256")])
def test_help_prints_the_usage_or_a_kinds_fields(capsys, argv, shows):
    """(dump --help read as an unknown kind '--help'; dump KIND --help as a spec missing its fields.)"""
    code, out, err = run(capsys, *argv)
    assert code == 0 and shows in out and err == ""


def test_dump_writes_ptx_that_assembles(capsys, tmp_path):
    from ptxgen.assemble import assemble
    path = tmp_path / "rms.ptx"
    code, _, _ = run(capsys, "dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "-o", str(path))
    assert code == 0
    text = path.read_text()
    assert "0f358637BD" in text
    assert assemble(text, "sm_90").cubin


def test_dump_to_stdout_and_underscore_spelling(capsys):
    code, out, _ = run(capsys, "dump", "rope", "--heads", "2", "--head_dim", "8", "--theta", "10000")
    assert code == 0 and out.startswith(".version 8.5\n.target sm_90")


def test_inspect_spec_decodes_eps_and_shows_key_and_ptxas(capsys):
    code, out, _ = run(capsys, "inspect", "rmsnorm", "--hidden", "896", "--eps", "1e-6")
    assert code == 0
    assert "0f358637BD  .f32  1e-06" in out
    assert "key          " in out and "text sha256  " in out
    assert "ptxas        sm_90: " in out and "registers" in out


def test_inspect_ptx_file_as_json(capsys, tmp_path):
    path = tmp_path / "rope.ptx"
    run(capsys, "dump", "rope", "--heads", "2", "--head-dim", "64", "--theta", "1e6", "-o", str(path))
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    report = json.loads(out)
    assert code == 0
    assert list(report["entries"]) == ["rope"]
    assert report["variables"] == [".global .f64 inv_freq[32] (256 bytes)"]
    assert {"text": "0d3FF0000000000000", "type": "f64", "value": "1.0", "count": 1} in report["immediates"]
    assert report["ptxas"]["registers"] > 0


@pytest.mark.parametrize("argv, message", [
    (["dump", "nope"], "unknown kernel kind 'nope'"),
    (["dump", "rmsnorm", "--hidden", "896"], "required: --eps"),
    (["dump", "rmsnorm", "--hidden", "896", "--eps", "0"], "eps must be > 0"),
    (["dump", "rmsnorm", "--hidden", "x", "--eps", "1e-6"], "invalid int value"),
    (["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--bogus", "1"], "unrecognized arguments"),
    (["dump", "rmsnorm", "--hid", "896", "--eps", "1e-6"], "required: --hidden"),
    (["dump", "rope", "--heads", "2", "--head-dim", "7", "--theta", "1e4"], "head_dim must be even"),
    (["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--arch", "sm90"], "arch must look like"),
    (["inspect", "/no/such/file.ptx"], "cannot read /no/such/file.ptx"),
    (["frob"], "unknown command 'frob'"),
    # targets the generator does not write valid PTX for: refused, not emitted or fed to nvJitLink
    (["inspect", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--arch", "sm_20"], "arch sm_20 is not one"),
    (["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--ptx-version", "99.9"], "PTX ISA 99.9"),
    (["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--ptx-version", "1.0"], "PTX ISA 1.0"),
    (["list", "--bogus"], "list takes no arguments"),
    (["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--residual", "maybe"],  # (it said "_parse_bool")
     "argument --residual: invalid bool value: 'maybe' (true/false, yes/no, on/off, 1/0)"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err and err.startswith("ptxgen: error: ")


def test_a_file_that_is_not_ptx_is_refused(capsys, tmp_path):
    path = tmp_path / "junk.ptx"
    path.write_text("hello")
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 2 and "no .entry found" in err


def test_inspect_of_a_directory_says_so_not_that_it_is_an_unknown_kind(capsys, tmp_path):
    """(A folder given where a .ptx file goes read as an unknown kernel kind named by its path, as did a
    dangling link and a link loop.)"""
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and err == f"ptxgen: error: cannot read {tmp_path}: Is a directory\n"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for name, why in (("loop", "Too many levels of symbolic links"), ("dangling", "No such file or directory")):
        code, _, err = run(capsys, "inspect", str(tmp_path / name))
        assert code == 2 and err == f"ptxgen: error: cannot read {tmp_path / name}: {why}\n"


def test_dump_into_a_folder_that_does_not_exist_is_refused_not_made(capsys, tmp_path):
    """(A mistyped -o made the folders it named, as no compiler's -o does.)"""
    out = tmp_path / "typo" / "deeper" / "rmsnorm.ptx"
    code, _, err = run(capsys, "dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "-o", str(out))
    assert code == 2 and err == f"ptxgen: error: cannot write {out}: no such folder {out.parent}\n"
    assert not (tmp_path / "typo").exists()


def test_an_architecture_nvjitlink_cannot_assemble_for_is_an_assembly_error_not_a_traceback():
    from ptxgen.assemble import AssemblerUnavailable, AssemblyError, assemble
    try:
        with pytest.raises(AssemblyError, match="sm_20"):
            assemble(".version 8.5\n.target sm_90\n.address_size 64\n", "sm_20")
    except AssemblerUnavailable:
        pytest.skip("nvJitLink is not installed")


def test_a_reader_that_stops_reading_ends_the_command_quietly(monkeypatch, capsys):
    """`ptxgen list | head -1`: the rest of the output has no reader; no error line, the status of a
    process SIGPIPE ended. (In-process, on a pipe whose reader is gone before the first write: a real
    `| head` may take everything into the pipe's buffer first.)"""
    import os
    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w", buffering=1)  # line-buffered: the first line meets the closed pipe
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(["list"]) == 141
    finally:
        stream.close()
    assert capsys.readouterr().err == ""


def test_console_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "ptxgen.cli", "dump", "rmsnorm", "--hidden", "8"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("body, reason", [
    (".target sm_90, debug\n.address_size 64\n.visible .entry k() { ret; }", "Debug information not found"),
    (".target sm_90\n.address_size 64\n.visible .entry k() { bogus.u32 %r1; ret; }", "'bogus'")])
def test_inspect_of_ptx_ptxas_refuses_says_ptxas_reason_in_its_one_line(capsys, tmp_path, body, reason):
    """(The header line, 'ptxas failed for sm_90: ERROR_PTX_COMPILE', was all it said.)"""
    path = tmp_path / "bad.ptx"
    path.write_text(".version 8.0\n" + body + "\n")
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("ptxgen: error: ptxas failed for sm_90") and reason in err


@pytest.mark.parametrize("argv, flag", [(["inspect", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "-o", "x.txt"], "-o"),
                                        (["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--json"], "--json")])
def test_the_other_commands_flag_is_refused_not_ignored(capsys, tmp_path, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and f"unrecognized arguments: {flag}" in err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("module, not_imported", [("contracts.runner", ["ptxgen.cli", "numpy"]),
                                                  ("bench.train_report", ["ptxgen.cli"])])
def test_the_command_lines_that_need_only_the_parser_do_not_import_the_generator(module, not_imported):
    """(contracts.runner imported ptxgen.cli, numpy with it, for its Parser: ptxgen.cmdline holds it.)"""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", f"import sys, {module}; print([m for m in {not_imported} "
                                                 "if m in sys.modules])"], capture_output=True, text=True, cwd=root)
    assert proc.stdout == "[]\n", proc.stderr
