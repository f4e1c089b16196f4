"""The runtime without a GPU: on-disk entries, the disk audit and its CLI, bf16 bits, no-GPU errors."""
import dataclasses

import pytest

from ptxgen.files import write_atomic
from ptxgen.kernels.rmsnorm import RMSNormSpec
from ptxgen.kernels.rope import RopeSpec
from ptxgen.spec import Target
from runtime import entry
from runtime.audit import check_disk, main as audit_main
from runtime.cache import toolchain_dir

TARGET = Target()
TOOLCHAIN = {"compute_capability": [9, 0], "driver_version": 13000}
CUBIN = b"\x7fELF" + bytes(range(256)) * 4


def write_entry(root, spec, toolchain=TOOLCHAIN, cubin=CUBIN):
    key = spec.key(TARGET)
    meta = entry.metadata(spec, TARGET, key, spec.emit(TARGET), cubin, toolchain)
    path = toolchain_dir(root, toolchain) / key[:2] / (key + entry.SUFFIX)
    write_atomic(path, entry.encode(meta, cubin))
    return path, meta


def test_entry_round_trips():
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    meta = entry.metadata(spec, TARGET, spec.key(TARGET), spec.emit(TARGET), CUBIN, TOOLCHAIN)
    assert entry.decode(entry.encode(meta, CUBIN)) == (meta, CUBIN)
    assert entry.mismatch(meta, spec, TARGET, spec.key(TARGET), TOOLCHAIN) is None


def test_truncated_and_bit_flipped_entries_are_refused():
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    blob = entry.encode(entry.metadata(spec, TARGET, spec.key(TARGET), spec.emit(TARGET), CUBIN,
                                       TOOLCHAIN), CUBIN)
    with pytest.raises(entry.EntryError, match="checksum"):
        entry.decode(blob[:-100])
    flipped = bytearray(blob)
    flipped[-10] ^= 0x04
    with pytest.raises(entry.EntryError, match="checksum"):
        entry.decode(bytes(flipped))
    with pytest.raises(entry.EntryError, match="bad magic"):
        entry.decode(b"garbage")
    with pytest.raises(entry.EntryError, match="truncated"):
        entry.decode(blob[:len(entry.MAGIC) + 10])


def test_foreign_driver_stale_generator_and_other_spec_are_mismatches():
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6)
    key = spec.key(TARGET)
    meta = entry.metadata(spec, TARGET, key, spec.emit(TARGET), CUBIN, TOOLCHAIN)
    foreign = dict(TOOLCHAIN, driver_version=12080)
    assert "foreign toolchain" in entry.mismatch(meta, spec, TARGET, key, foreign)
    assert "stale" in entry.mismatch(dict(meta, generator="0.0.1+old"), spec, TARGET, key, TOOLCHAIN)
    other = dataclasses.replace(spec, theta=1e4)
    assert "differs" in entry.mismatch(meta, other, TARGET, other.key(TARGET), TOOLCHAIN)


def test_disk_audit_is_clean_on_valid_entries(tmp_path):
    write_entry(tmp_path, RMSNormSpec(hidden=896, eps=1e-6))
    write_entry(tmp_path, RopeSpec(heads=14, head_dim=64, theta=1e6))
    assert check_disk(tmp_path) == []


def test_disk_audit_reports_and_prunes_bad_entries(tmp_path):
    good, _ = write_entry(tmp_path, RMSNormSpec(hidden=896, eps=1e-6))
    truncated, _ = write_entry(tmp_path, RMSNormSpec(hidden=896, eps=1e-5))
    truncated.write_bytes(truncated.read_bytes()[:200])
    flipped, _ = write_entry(tmp_path, RopeSpec(heads=2, head_dim=64, theta=1e4))
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 1
    flipped.write_bytes(bytes(data))
    stale, meta = write_entry(tmp_path, RopeSpec(heads=2, head_dim=64, theta=1e6))
    stale.write_bytes(entry.encode(dict(meta, generator="0.0.1+old"), CUBIN))
    misplaced, meta = write_entry(tmp_path, RopeSpec(heads=4, head_dim=64, theta=1e6))
    misplaced.write_bytes(entry.encode(dict(meta, toolchain=dict(TOOLCHAIN, driver_version=1)), CUBIN))
    orphan = good.parent / ".leftover.tmp"
    orphan.write_bytes(b"partial")

    findings = {f.subject.split("/")[-1]: f.message for f in check_disk(tmp_path)}
    assert set(findings) == {truncated.name, flipped.name, stale.name, misplaced.name, orphan.name}
    assert "checksum" in findings[truncated.name] and "checksum" in findings[flipped.name]
    assert findings[stale.name].startswith("stale")
    assert findings[misplaced.name].startswith("misplaced")
    assert findings[orphan.name].startswith("orphaned")

    assert len(check_disk(tmp_path, prune=True)) == 5
    assert check_disk(tmp_path) == [] and good.exists()


def test_audit_cli_exit_codes(tmp_path, capsys):
    write_entry(tmp_path, RMSNormSpec(hidden=896, eps=1e-6))
    assert audit_main(["--cache-dir", str(tmp_path), "--check", "disk", "--check", "source"]) == 0
    assert "clean" in capsys.readouterr().out
    bad, _ = write_entry(tmp_path, RMSNormSpec(hidden=64, eps=1e-6, block_size=32))
    bad.write_bytes(b"junk")
    assert audit_main(["--cache-dir", str(tmp_path), "--check", "disk"]) == 1
    assert "1 finding(s)" in capsys.readouterr().out
    assert audit_main(["--cache-dir", str(tmp_path), "--check", "disk", "--prune"]) == 0
    assert audit_main(["--cache-dir", str(tmp_path), "--check", "disk"]) == 0
    with pytest.raises(SystemExit) as e:
        audit_main(["--cache-dir", str(tmp_path / "missing")])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_runtime_imports_without_a_gpu_and_says_why():
    from runtime import available
    ok, why = available()
    assert isinstance(ok, bool) and why


def test_bf16_conversion_rounds_to_nearest_even():
    import numpy as np
    from runtime.memory import from_bf16, to_bf16
    x = np.array([1.0, -2.5, 1e-3, 3.0e38, 1 + 2 ** -8, 1 + 3 * 2 ** -8], dtype=np.float32)
    back = from_bf16(to_bf16(x))
    assert back[0] == 1.0 and back[1] == -2.5
    assert back[4] == 1.0 and back[5] == 1 + 2 ** -6  # ties go to even
    np.testing.assert_allclose(back, x, rtol=2 ** -8)
    assert np.isnan(from_bf16(to_bf16(np.array([np.nan], dtype=np.float32))))[0]


def test_without_a_gpu_the_cache_fails_at_first_use_naming_cuinit():
    from runtime import CudaUnavailable, ModuleCache, available
    if available()[0]:
        pytest.skip("a GPU is present")
    with pytest.raises(CudaUnavailable, match="cuInit failed"):
        ModuleCache()
