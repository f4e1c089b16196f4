"""The disk audit and `ptxgen cache` on damaged, malformed and misplaced entries: every problem
reported, never a traceback; bad cache paths are bad input (one line, exit 2). No GPU needed."""
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.cli import main as cli_main
from ptxgen.kernels.adamw import AdamWSpec
from ptxgen.kernels.rmsnorm import RMSNormSpec
from ptxgen.spec import Target
from runtime import cachecli, entry
from runtime.audit import check_disk, examine, main as audit_main
from test_runtime_cpu import CUBIN, LINK, TARGET, TOOLCHAIN, write_entry

SPEC = RMSNormSpec(hidden=896, eps=1e-6)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rewrite(path, meta, cubin=CUBIN):
    """Write ``meta`` with a valid checksum: the entry is well-formed, its contents are wrong."""
    body = json.dumps(meta, separators=(",", ":")).encode() + b"\n" + cubin
    path.write_bytes(entry.MAGIC + entry.sha256_hex(body).encode() + b"\n" + body)


@pytest.mark.parametrize("damage, message", [
    (lambda m: [m], "metadata is a list"),
    (lambda m: None, "metadata is a NoneType"),
    (lambda m: dict(m, key="not-hex"), "'key' is malformed"),
    (lambda m: dict(m, ptx_sha256="zz" * 32), "'ptx_sha256' is malformed"),
    (lambda m: {k: v for k, v in m.items() if k != "toolchain"}, "no 'toolchain'"),
    (lambda m: dict(m, toolchain={"compute_capability": "90"}), "'toolchain' is malformed"),
    (lambda m: dict(m, target={"arch": "sm_90", "ptx_version": ["8", 5]}), "'target' is malformed"),
    (lambda m: dict(m, fields=[["eps", ["float", "zz"]]] + m["fields"][1:]), "cannot be rebuilt"),
    (lambda m: dict(m, fields=[["eps", ["martian", 1]]] + m["fields"][1:]), "cannot be rebuilt"),
    (lambda m: dict(m, fields=[["hidden", ["int", "-5"]]] + m["fields"][1:]), "cannot be rebuilt"),
    (lambda m: dict(m, cubin_bytes="1028"), "'cubin_bytes' is malformed"),
    (lambda m: dict(m, registers=-1), "'registers' is malformed"),
])
def test_well_formed_entries_with_malformed_metadata_are_findings_not_crashes(tmp_path, damage, message):
    path, meta = write_entry(tmp_path, SPEC)
    rewrite(path, damage(meta))
    [finding] = check_disk(tmp_path)
    assert message in finding.message
    [pruned] = check_disk(tmp_path, prune=True)
    assert pruned.message.endswith("(pruned)") and not path.exists()


def test_an_entry_of_a_class_the_audit_cannot_load_is_kept_where_it_belongs(tmp_path):
    """A script's or plugin's spec class: its key cannot be recomputed without the class, but its
    checksums hold and its place is checked; a valid entry is neither a finding nor pruned."""
    path, meta = write_entry(tmp_path, SPEC)
    rewrite(path, dict(meta, kind="__main__.Peak"))
    assert check_disk(tmp_path, prune=True) == [] and path.exists()
    wrong = path.parent.parent / ("00" if path.parent.name != "00" else "11") / path.name
    wrong.parent.mkdir()
    path.rename(wrong)
    [finding] = check_disk(tmp_path)
    assert finding.message.startswith("misplaced")


def test_a_directory_where_an_entry_belongs_is_reported_and_pruned(tmp_path):
    path, _ = write_entry(tmp_path, SPEC)
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")
    findings = check_disk(tmp_path)
    assert any(f.message == "not a cache entry: a directory" and f.subject.endswith(path.name) for f in findings)
    check_disk(tmp_path, prune=True)
    assert not path.exists() and check_disk(tmp_path) == []


def test_an_entry_in_the_wrong_key_prefix_folder_is_reported_and_pruned(tmp_path):
    path, _ = write_entry(tmp_path, SPEC)
    wrong = path.parent.parent / ("00" if path.parent.name != "00" else "11") / path.name
    wrong.parent.mkdir()
    path.rename(wrong)
    [finding] = check_disk(tmp_path)
    assert finding.message.startswith("misplaced") and f"/{path.parent.name}/" in finding.message
    check_disk(tmp_path, prune=True)
    assert not wrong.exists() and check_disk(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root deletes read-only files")
def test_prune_reports_entries_it_cannot_delete(tmp_path, capsys):
    path, _ = write_entry(tmp_path, SPEC)
    path.write_bytes(b"junk")
    path.parent.chmod(0o500)
    try:
        assert audit_main(["--cache-dir", str(tmp_path), "--check", "disk", "--prune"]) == 1
        out = capsys.readouterr().out
        assert "could not prune" in out and "Traceback" not in out
    finally:
        path.parent.chmod(0o700)


def test_prune_failure_is_a_finding_not_a_traceback(tmp_path, monkeypatch):
    """The same as root can see it: unlink refused."""
    path, _ = write_entry(tmp_path, SPEC)
    path.write_bytes(b"junk")

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "unlink", refuse)
    [finding] = check_disk(tmp_path, prune=True)
    assert "could not prune: Permission denied" in finding.message and path.exists()
    assert audit_main(["--cache-dir", str(tmp_path), "--check", "disk", "--prune"]) == 1


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: (p / "file").write_text("x") and p / "file"])
def test_a_cache_path_that_is_missing_or_a_file_is_bad_input(tmp_path, monkeypatch, capsys, make):
    bad = make(tmp_path)
    monkeypatch.setenv("PTXGEN_CACHE_DIR", str(bad))
    for argv in (["--check", "disk"], ["--cache-dir", str(bad), "--check", "disk"]):
        with pytest.raises(SystemExit) as e:
            audit_main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and str(bad) in err
    assert cli_main(["cache", "ls"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("argv, says", [
    (["--check", "source", "--prune"], "--prune is for the disk check, which --check source leaves out"),
    (["--check", "source"], "--cache-dir is for the disk check"),  # (the fixture gives --cache-dir)
    (["--check", "disk", "--golden", __file__], "--golden is for the golden check, which --check disk leaves out"),
    (["--check", "disk", "--check", "source", "--check", "disk"], "--check: disk given twice"),  # (ran twice)
    (["--golden", "/nonexistent/ptx_digests.json"], "no such file"),
    (["--check", "golden", "--golden", "/"], "not a regular file"),
    (["--check", "golden", "--golden", "/dev/null"], "not a regular file"),
])
def test_flags_that_would_do_nothing_or_name_no_file_are_bad_input_before_any_check(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        audit_main(["--cache-dir", str(tmp_path), *argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and err.count("\n") == 1 and says in err and out == ""  # (no check ran)


def test_a_hand_edited_golden_float_too_large_for_a_float_is_a_finding(tmp_path):
    from ptxgen import golden
    from ptxgen.kernels.rope import RopeSpec
    from ptxgen.spec import Target
    path = tmp_path / "golden.json"
    golden.write(path, [(RopeSpec(heads=2, head_dim=64, theta=1e4), Target("sm_90", (8, 0)))])
    path.write_text(path.read_text().replace('0x1.3880000000000p+13', '0x1.0p+99999'))
    [finding] = golden.check(path)
    assert "cannot be rebuilt" in finding.message


# -- hypothesis: no byte or metadata damage makes the audit raise ---------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    path, meta = write_entry(root, SPEC)
    return root, path, meta


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       truncate=st.none() | st.integers(0, 10**6))
def test_corrupted_entry_bytes_never_crash_the_audit(pristine, cuts, truncate):
    _root, path, _meta = pristine
    blob = bytearray(path.read_bytes())
    for at, byte in cuts:
        blob[at % len(blob)] = byte
    damaged = path.with_name("d" + path.name)
    damaged.write_bytes(bytes(blob[:truncate] if truncate is not None else blob))
    try:
        assert examine(damaged, path.parents[2])[1] is not None
    finally:
        damaged.unlink()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["layout", "key", "kind", "fields", "target", "toolchain", "generator", "ptx_sha256",
                              "cubin_sha256", "cubin_bytes", "created", "registers", "link", "extra"]),
       value=json_values, drop=st.booleans())
def test_malformed_metadata_with_a_valid_checksum_never_crashes_the_audit(pristine, field, value, drop):
    root, path, meta = pristine
    damaged_meta = {k: v for k, v in meta.items() if k != field} if drop else dict(meta, **{field: value})
    copy = path.with_name(path.name)  # same name: key and folder checks run too
    saved = path.read_bytes()
    try:
        rewrite(copy, damaged_meta)
        problem = examine(copy, path.parents[2])[1]
        assert problem is None or isinstance(problem, str)
        findings = check_disk(root)
        assert all(isinstance(f.message, str) for f in findings)
        if field in ("created", "registers") and drop:
            assert problem is None  # informational fields may be absent
    finally:
        path.write_bytes(saved)


# -- ptxgen cache ls | show | diff --------------------------------------------------------------------
def test_cache_ls_show_and_diff(tmp_path, capsys):
    a, _ = write_entry(tmp_path, AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0))
    b, meta = write_entry(tmp_path, AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=-0.0))
    rewrite(b, dict(meta, created=1764500000.0, compile_ms=12.5, registers=40, local_bytes=0))
    c, _ = write_entry(tmp_path, AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1))
    damaged = tmp_path / "v1" / a.parent.parent.name / "ee" / ("e" * 64 + entry.SUFFIX)
    damaged.parent.mkdir()
    damaged.write_bytes(b"junk")
    root = ["cache", "--cache-dir", str(tmp_path)]
    assert cli_main(root + ["ls"]) == 0
    out = capsys.readouterr().out
    assert "4 entries" in out and "weight_decay=-0.0" in out and "damaged: not a v1 cache entry" in out
    assert cli_main(root + ["show", b.name[:12]]) == 0
    out = capsys.readouterr().out
    assert "registers   40" in out and "compile ms  12.5" in out and "2025-11-30" in out
    assert "link        the driver's defaults for the device" in out
    assert cli_main(root + ["diff", a.name[:12], b.name[:12]]) == 0
    out = capsys.readouterr().out
    assert "field       weight_decay: 0.0 -> -0.0" in out and "registers   ? -> 40" in out
    meta_c, cubin = entry.decode(c.read_bytes())
    rewrite(c, dict(meta_c, link={"CU_JIT_OPTIMIZATION_LEVEL": 3}), cubin)  # (as if linked so: the audit says why)
    assert cli_main(root + ["diff", a.name[:12], c.name[:12]]) == 0
    out = capsys.readouterr().out
    assert "link        the driver's defaults for the device -> CU_JIT_OPTIMIZATION_LEVEL=3" in out


def _into_another_prefix_folder(path, meta):
    wrong = path.parent.parent / ("00" if path.parent.name != "00" else "11")
    wrong.mkdir()
    path.rename(wrong / path.name)


UNLOADABLE = [  # (damage, what the listing says of it): each one the cache rejects on load
    (lambda path, meta: path.rename(path.with_name("ab" * 32 + entry.SUFFIX)), "key mismatch: file abab"),
    (lambda path, meta: rewrite(path, dict(meta, fields=[["hidden", ["int", "1"]], *meta["fields"][1:]])),
     "key mismatch"),
    (lambda path, meta: rewrite(path, dict(meta, target=dict(meta["target"], arch="sm_80"))), "key mismatch"),
    (_into_another_prefix_folder, "misplaced: at"),
    (lambda path, meta: rewrite(path, dict(meta, generator="0" * 16)), "stale: built by generator 0000"),
    (lambda path, meta: rewrite(path, dict(meta, layout="v2")), "layout 'v2', expected v1"),
]


def _ls_and_show_of_an_unloadable_entry(tmp_path, capsys, damage) -> tuple[str, str]:
    """What `cache ls` and `cache show` print of the cache's one entry, damaged by ``damage``."""
    path, meta = write_entry(tmp_path, SPEC)
    damage(path, meta)
    root = ["cache", "--cache-dir", str(tmp_path)]
    assert cli_main(root + ["ls"]) == 0
    listed = capsys.readouterr().out
    key = next((tmp_path / entry.LAYOUT).glob(f"*/*/*{entry.SUFFIX}")).name[:12]
    assert cli_main(root + ["show", key]) == 0
    return listed, capsys.readouterr().out


def _says_never_loaded(listed: str, shown: str, message: str) -> bool:
    return message in listed and "(never loaded)" in listed and \
        "1 unusable: ptxgen-audit --check disk --prune" in listed and f"problem     {message}" in shown


@pytest.mark.parametrize("damage, message", UNLOADABLE)
def test_cache_ls_and_show_say_which_entries_are_never_loaded(tmp_path, capsys, damage, message):
    """An entry filed under another key's name, or built by another generator: what the cache
    would reject on load is not listed as a healthy entry."""
    assert _says_never_loaded(*_ls_and_show_of_an_unloadable_entry(tmp_path, capsys, damage), message)


def test_cache_diff_of_an_entry_and_its_copy_filed_elsewhere_says_which_is_never_loaded(tmp_path, capsys):
    path, _ = write_entry(tmp_path, SPEC)
    shutil.copyfile(path, path.with_name("ab" * 32 + entry.SUFFIX))
    root = ["cache", "--cache-dir", str(tmp_path)]
    assert cli_main(root + ["diff", path.name[:12], "abab"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path.name[:16]} -> abababababababab") and "problem     none -> key mismatch" in out
    (path.parent.parent / "00").mkdir()
    shutil.copyfile(path, path.parent.parent / "00" / path.name)
    assert cli_main(root + ["show", path.name[:-len(entry.SUFFIX)]]) == 2  # the same full key in two folders
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ambiguous: 2 entries" in err and f"/00/{path.name}" in err


FIELD_LIST = "stored spec does not list RMSNormSpec's fields once each, in order"
# a stored spec that rebuilds to SPEC, whose key the entry holds, but is not SPEC's own encoding
NOT_ITS_ENCODING = [
    (lambda fields: [[n, ["str", "f32"]] if n == "dtype" else [n, v] for n, v in fields],
     "stored spec holds dtype as ['str', 'f32'], which RMSNormSpec encodes as ['enum', 'ptxgen.vecio.DType', ['str', 'f32']]"),
    (lambda fields: fields + [fields[1]], f"{FIELD_LIST} (missing: none; unknown or repeated: eps)"),
    (lambda fields: [[n, v] for n, v in fields if n != "residual"],
     f"{FIELD_LIST} (missing: residual; unknown or repeated: none)"),
]


@pytest.mark.parametrize("damage, message", NOT_ITS_ENCODING)
def test_a_stored_spec_that_is_not_its_own_encoding_is_never_listed_as_loadable(tmp_path, capsys, damage, message):
    """The cache compares the stored fields as they are, and never loads such an entry; the audit
    and the listing went by the spec rebuilt from them, whose key matched, and called it healthy."""
    listed, shown = _ls_and_show_of_an_unloadable_entry(
        tmp_path, capsys, lambda path, meta: rewrite(path, dict(meta, fields=damage(meta["fields"]))))
    assert _says_never_loaded(listed, shown, message)
    [path] = (tmp_path / entry.LAYOUT).glob(f"*/*/*{entry.SUFFIX}")
    meta, _ = entry.decode(path.read_bytes())
    assert entry.mismatch(meta, SPEC, TARGET, SPEC.key(TARGET), TOOLCHAIN, LINK) == "stored spec differs from the requested spec"
    [finding] = check_disk(tmp_path)
    assert finding.message == message


@pytest.mark.parametrize("damage, message", UNLOADABLE)
def test_planted_a_listing_that_trusts_any_readable_entry_is_caught(tmp_path, capsys, monkeypatch, damage, message):
    """The listing as it was before: every entry that decodes shown as healthy. The check above
    sees it."""
    monkeypatch.setattr(cachecli, "examine", lambda path, layout_dir: (entry.decode(path.read_bytes())[0], None))
    assert not _says_never_loaded(*_ls_and_show_of_an_unloadable_entry(tmp_path, capsys, damage), message)


@pytest.mark.parametrize("argv, message", [
    (["show", "abcd"], "no entry with key abcd"),
    (["show", "XYZ!"], "is not a cache key"),
    (["diff", "abcd"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_cache_command_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    write_entry(tmp_path, SPEC)
    assert cli_main(["cache", "--cache-dir", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("created", [10**400, 1e300])
def test_an_entry_with_a_date_past_any_clock_is_one_finding_or_a_question_mark(tmp_path, capsys, created):
    path, meta = write_entry(tmp_path, SPEC)
    rewrite(path, dict(meta, created=created))
    assert all("Traceback" not in f.message for f in check_disk(tmp_path))
    assert cli_main(["cache", "--cache-dir", str(tmp_path), "ls"]) in (0, 1)
    assert "Traceback" not in capsys.readouterr().err


def test_a_golden_file_whose_entries_are_not_objects_is_a_finding(tmp_path):
    from ptxgen import golden
    (tmp_path / "g.json").write_text(json.dumps({"format": golden.FORMAT, "entries": ["x", [1, 2]]}))
    findings = golden.check(tmp_path / "g.json")
    assert len(findings) == 2 and all("not an object" in f.message for f in findings)


def test_a_cache_named_in_bytes_that_are_not_utf8_is_listed_and_audited_not_a_traceback(tmp_path):
    """A cache directory, and an entry filed in a folder, named in bytes that are not UTF-8: `cache
    ls` and `ptxgen-audit` print them as the file system names them (their own bytes, as ``ls``
    does), on a strict UTF-8 stdout, where they died with a UnicodeEncodeError mid-listing."""
    import subprocess
    import sys
    root = tmp_path / os.fsdecode(b"cache\xff")
    path, _ = write_entry(root, SPEC)
    odd = path.parent.parent / os.fsdecode(b"\xfe")
    odd.mkdir()
    path.rename(odd / path.name)  # misplaced, under an undecodable name
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONPATH=str(ROOT))
    for argv, code in ((["-m", "model.cli", "cache", "--cache-dir", str(root), "ls"], 0),
                       (["-m", "runtime.audit", "--cache-dir", str(root), "--check", "disk"], 1)):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == code and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
        assert b"cache\xff" in proc.stdout and b"/\xfe/" in proc.stdout  # the names' own bytes
