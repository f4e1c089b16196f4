"""The runtime without a GPU: on-disk entries, the disk audit and its CLI, the cache's disk path
on a made-up driver, bf16 bits, no-GPU errors."""
import ctypes
import dataclasses
import hashlib
import os
from types import SimpleNamespace

import pytest

from ptxgen.files import write_atomic
from ptxgen.kernels.rmsnorm import RMSNormSpec
from ptxgen.kernels.rope import RopeSpec
from ptxgen.spec import Target
from runtime import entry
from runtime.audit import check_disk, main as audit_main
from runtime.cache import link_options, toolchain_dir

TARGET = Target()
TOOLCHAIN = {"compute_capability": [9, 0], "driver_version": 13000}
LINK = link_options(TARGET.arch)
CUBIN = b"\x7fELF" + bytes(range(256)) * 4


def write_entry(root, spec, toolchain=TOOLCHAIN, cubin=CUBIN):
    key = spec.key(TARGET)
    meta = entry.metadata(spec, TARGET, key, spec.emit(TARGET), cubin, toolchain, link_options(spec.arch(TARGET)))
    path = toolchain_dir(root, toolchain) / key[:2] / (key + entry.SUFFIX)
    write_atomic(path, entry.encode(meta, cubin))
    return path, meta


def test_entry_round_trips():
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    meta = entry.metadata(spec, TARGET, spec.key(TARGET), spec.emit(TARGET), CUBIN, TOOLCHAIN, LINK)
    assert entry.decode(entry.encode(meta, CUBIN)) == (meta, CUBIN)
    assert entry.mismatch(meta, spec, TARGET, spec.key(TARGET), TOOLCHAIN, LINK) is None


def test_truncated_and_bit_flipped_entries_are_refused():
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    blob = entry.encode(entry.metadata(spec, TARGET, spec.key(TARGET), spec.emit(TARGET), CUBIN,
                                       TOOLCHAIN, LINK), CUBIN)
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


def test_foreign_driver_other_link_options_stale_generator_and_other_spec_are_mismatches():
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6)
    key = spec.key(TARGET)
    meta = entry.metadata(spec, TARGET, key, spec.emit(TARGET), CUBIN, TOOLCHAIN, LINK)
    foreign = dict(TOOLCHAIN, driver_version=12080)
    assert "foreign toolchain" in entry.mismatch(meta, spec, TARGET, key, foreign, LINK)
    assert entry.mismatch(meta, spec, TARGET, key, TOOLCHAIN, {"CU_JIT_OPTIMIZATION_LEVEL": 3}) == \
        f"linked with options {LINK}, this links with {{'CU_JIT_OPTIMIZATION_LEVEL': 3}}"
    assert "stale" in entry.mismatch(dict(meta, generator="0.0.1+old"), spec, TARGET, key, TOOLCHAIN, LINK)
    other = dataclasses.replace(spec, theta=1e4)
    assert "differs" in entry.mismatch(meta, other, TARGET, other.key(TARGET), TOOLCHAIN, LINK)


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


# -- the cache's disk path on a made-up driver ------------------------------------------------------
class FakeDriver:
    """The driver calls a ModuleCache makes, without a GPU: a linked cubin is a digest of its PTX,
    and ``links`` records the options each cuLinkCreate was given (names, values)."""

    def __init__(self):
        self.links, self._images, self._ptx = [], [], b""

    def __call__(self, name, *args):
        if name == "cuLinkCreate":
            count, options, values = args
            assert count == len(options) == len(values)
            self.links.append(([o.name for o in options], values))
            return "link state"
        if name == "cuLinkAddData":
            self._ptx = args[2]
            return None
        if name == "cuLinkComplete":
            cubin = b"\x7fELF" + hashlib.sha256(self._ptx).digest()
            self._images.append(ctypes.create_string_buffer(cubin, len(cubin)))
            return ctypes.addressof(self._images[-1]), len(cubin)
        if name == "cuModuleLoadData":
            return "module"
        if name == "cuModuleGetFunction":
            return "function"
        if name in ("cuFuncGetAttribute", "cuLinkDestroy"):  # (registers and local bytes: 0)
            return 0 if name == "cuFuncGetAttribute" else None
        raise AssertionError(f"{name} is not a call the cache's disk path makes")


@pytest.fixture
def driver(monkeypatch):
    from runtime import cache, launch
    fake = FakeDriver()
    monkeypatch.setattr(cache, "call", fake)
    monkeypatch.setattr(launch, "call", fake)
    monkeypatch.setattr(cache, "device", lambda ordinal=0: SimpleNamespace(
        arch=TARGET.arch, compute_capability=tuple(TOOLCHAIN["compute_capability"]),
        driver_version=TOOLCHAIN["driver_version"]))
    return fake


def loaded(root, spec):
    """A fresh cache (another process's) after loading ``spec`` from ``root``."""
    from runtime.cache import ModuleCache
    cache = ModuleCache(root, target=TARGET)
    cache.get(spec)
    return cache


def test_jit_link_gives_the_driver_exactly_the_link_options_its_entry_records(tmp_path, driver):
    from cuda.bindings import driver as cu

    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    for spec in (RMSNormSpec(hidden=896, eps=1e-6), GemmWgmmaSpec()):
        cache = loaded(tmp_path, spec)
        meta, _ = entry.decode(cache.entry_path(spec.key(TARGET)).read_bytes())
        options, values = driver.links[-1]
        assert options == list(meta["link"]) and [getattr(v, "name", v) for v in values] == list(meta["link"].values())
    assert driver.links == [([], []), (["CU_JIT_TARGET"], [cu.CUjit_target.CU_TARGET_COMPUTE_90A])]  # (sm_90a: wgmma)


def test_an_entry_linked_with_other_options_is_reported_by_every_reader_then_rebuilt(tmp_path, driver, monkeypatch,
                                                                                    capsys):
    """The link options are not in the key or the toolchain: a change of them (a -lineinfo, an
    optimization level) made the cache load cubins linked with the old ones."""
    from model.cli import main as cli_main
    from runtime import audit, cache
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    path = loaded(tmp_path, spec).entry_path(spec.key(TARGET))
    now = {"CU_JIT_OPTIMIZATION_LEVEL": 3}
    for module in (cache, audit):
        monkeypatch.setattr(module, "link_options", lambda arch: now)
    said = f"linked with options {{}}, this links with {now}"
    assert [f.message for f in check_disk(tmp_path)] == [said]
    assert cli_main(["cache", "--cache-dir", str(tmp_path), "ls"]) == 0
    assert f"{said} (never loaded)" in capsys.readouterr().out
    rebuilt = loaded(tmp_path, spec)
    assert rebuilt.rejections == [(path, said)] and rebuilt.stats.jit_compiles == 1 and rebuilt.stats.disk_hits == 0
    assert driver.links[-1] == (["CU_JIT_OPTIMIZATION_LEVEL"], [3])
    assert entry.decode(path.read_bytes())[0]["link"] == now and check_disk(tmp_path) == []
    assert loaded(tmp_path, spec).stats.disk_hits == 1


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-300])


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _link_to_an_intact_copy(path):
    copy = path.parent.parent / "elsewhere"
    path.rename(copy)
    path.symlink_to(copy)


def _link_to_nothing(path):
    path.unlink()
    path.symlink_to(path.parent / "nothing")


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "checksum mismatch (truncated or corrupted)"),
    (_flip_a_bit, "checksum mismatch (truncated or corrupted)"),
    (lambda path: path.write_bytes(b""), "not a v1 cache entry (bad magic)"),
    (_link_to_an_intact_copy, "is a symbolic link"),
    (_link_to_nothing, "is a symbolic link"),
])
def test_a_damaged_entry_is_a_reported_miss_rebuilt_and_rewritten_whole(tmp_path, driver, damage, reason):
    """Damage (the entry's checksum fails, or it is not a file of its own) is not a second text
    under the key: a miss, reported, rebuilt, and the entry replaced by a whole file."""
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    path = loaded(tmp_path, spec).entry_path(spec.key(TARGET))
    damage(path)
    rebuilt = loaded(tmp_path, spec)
    [(where, why)] = rebuilt.rejections
    assert where == path and reason in why and rebuilt.stats.jit_compiles == 1
    assert not path.is_symlink() and entry.decode(path.read_bytes())[0]["key"] == spec.key(TARGET)
    assert os.listdir(path.parent) == [path.name]  # (no temp file left)
    assert loaded(tmp_path, spec).stats.disk_hits == 1


def test_an_intact_entry_holding_another_text_under_its_key_is_a_collision_naming_both_digests(tmp_path, driver,
                                                                                               capsys):
    """Loud everywhere: the cache raises, `cache ls` lists it as never loaded (it read files only and
    called it healthy), and the audit fails even once it has pruned it (the generator is at fault)."""
    from model.cli import main as cli_main
    from runtime.cache import KeyCollisionError
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    path = loaded(tmp_path, spec).entry_path(spec.key(TARGET))
    meta, cubin = entry.decode(path.read_bytes())
    other = hashlib.sha256(b"another text").hexdigest()
    path.write_bytes(entry.encode(dict(meta, ptx_sha256=other), cubin))  # checksummed: not damage
    kept = path.read_bytes()
    with pytest.raises(KeyCollisionError) as e:
        loaded(tmp_path, spec)
    assert f"holds PTX {other} but" in str(e.value) and f"emits {meta['ptx_sha256']}:" in str(e.value)
    assert path.read_bytes() == kept  # neither loaded nor replaced
    said = f"key collision: the entry holds PTX {other}, its stored spec now emits {meta['ptx_sha256']}"
    assert cli_main(["cache", "--cache-dir", str(tmp_path), "ls"]) == 0
    listed = capsys.readouterr().out
    assert said in listed and "(never loaded)" in listed and "1 unusable" in listed
    [finding] = check_disk(tmp_path)
    assert finding.message.startswith(said)
    assert audit_main(["--cache-dir", str(tmp_path), "--check", "disk", "--prune"]) == 1
    assert "(pruned)" in capsys.readouterr().out and not path.exists()


@pytest.mark.parametrize("linked, audit_says, listed", [
    (lambda path: path, "not a cache entry: {rel} is a symbolic link", "1 entries"),
    (lambda path: path.parent, "orphaned file (not a cache entry)", "0 entries"),  # (not walked into)
    (lambda path: path.parent.parent, "orphaned file (not a cache entry)", "0 entries"),
], ids=["entry", "prefix folder", "toolchain folder"])
def test_the_cache_its_listing_and_the_audit_agree_on_an_entry_reached_through_a_link(tmp_path, driver, capsys,
                                                                                      linked, audit_says, listed):
    """`ptxgen cache ls` called a linked entry healthy and the cache loaded it, while the audit
    called it an orphan and pruned it: one predicate (entry.read) now says what an entry is, and
    none of the three takes one reached through a link below the layout folder."""
    from model.cli import main as cli_main
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    path = loaded(tmp_path, spec).entry_path(spec.key(TARGET))
    link, moved = linked(path), tmp_path / "elsewhere"
    link.rename(moved)
    link.symlink_to(moved)
    assert entry.decode(path.read_bytes())  # intact, through the link
    rel = link.relative_to(tmp_path / entry.LAYOUT)
    findings = [(f.subject, f.message) for f in check_disk(tmp_path)]
    assert findings == [(f"{entry.LAYOUT}/{rel}", audit_says.format(rel=rel))]
    assert cli_main(["cache", "--cache-dir", str(tmp_path), "ls"]) == 0
    out = capsys.readouterr().out
    assert listed in out and (f"damaged: not a cache entry: {rel} is a symbolic link" in out) == (link == path)
    cache = loaded(tmp_path, spec)
    assert cache.stats.disk_hits == 0 and cache.rejections == [(path, f"not a cache entry: {rel} is a symbolic link")]
    check_disk(tmp_path, prune=True)  # the link gone (not what it pointed to): the cache's own entry again
    assert moved.exists() and check_disk(tmp_path) == [] and loaded(tmp_path, spec).stats.rejected == 0


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
