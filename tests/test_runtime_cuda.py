"""The runtime on a GPU: parity of the seed's kernels, cache identity, disk integrity, memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptxgen.kernels.rmsnorm import RMSNormSpec, rmsnorm_reference
from ptxgen.kernels.rope import RopeSpec, rope_reference
from runtime import (CudaError, DeviceArray, Event, KeyCollisionError, ModuleCache, PinnedArray, StrictMissError,
                     Stream, from_bf16, to_bf16)
from runtime import entry
from runtime.audit import check_disk
from runtime.driver import synchronize

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
FILL = ROOT / "tests" / "gpu_helpers" / "fill_cache.py"
NAN_BITS = 0x7FC00000
ROPE_TOL = 1e-5  # abs and rel, unit-scale inputs: f32 rotation with sin/cos.approx after f64 reduction
RMS_TOL = 1e-4   # abs, outputs of order 1 (DESIGN: reductions at model magnitudes)


@pytest.fixture
def cache(tmp_path):
    return ModuleCache(tmp_path / "cache")


def run_rmsnorm(cache, spec, x, gamma):
    rows = x.shape[0]
    with DeviceArray.from_numpy(x) as dx, DeviceArray.from_numpy(gamma) as dg, \
            DeviceArray(x.shape) as dy, DeviceArray(rows) as dr:
        dy.fill_u32(NAN_BITS)
        dr.fill_u32(NAN_BITS)
        grid, block = spec.launch_dims(rows)
        cache.get(spec)(grid, block, dx, dg, dy, *([dr] if spec.save_rstd else []), rows)
        synchronize()
        return dy.to_numpy(), dr.to_numpy()


def run_rope(cache, spec, x, positions):
    with DeviceArray.from_numpy(x) as dx, DeviceArray.from_numpy(positions.astype(np.int32)) as dp, \
            DeviceArray(x.shape) as dy:
        dy.fill_u32(NAN_BITS)
        grid, block = spec.launch_dims(x.shape[0])
        cache.get(spec)(grid, block, dx, dy, dp, x.shape[0])
        synchronize()
        return dy.to_numpy()


def qwen_activations(rows, hidden, seed=0):
    rng = np.random.default_rng(seed)
    x = (0.02 * rng.standard_normal((rows, hidden))).astype(np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    return x, gamma


# -- the seed's falsifiers -------------------------------------------------------------------------
def test_rope_theta_10000_then_1000000_in_one_process_gives_two_entries_and_outputs(cache):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((257, 14, 64)).astype(np.float32)
    positions = np.arange(257) * 16  # up to 4096
    outputs = {}
    for theta in (10000.0, 1000000.0):
        spec = RopeSpec(heads=14, head_dim=64, theta=theta)
        y = run_rope(cache, spec, x, positions)
        np.testing.assert_allclose(y, rope_reference(x, positions, theta), atol=ROPE_TOL, rtol=ROPE_TOL)
        outputs[theta] = y
    assert cache.stats.jit_compiles == 2 and len(cache._kernels) == 2
    assert np.abs(outputs[10000.0] - outputs[1000000.0]).max() > 1e-3


def test_rmsnorm_eps_1e6_matches_numpy_within_1e4_on_4x896(cache):
    x, gamma = qwen_activations(4, 896)
    y, _ = run_rmsnorm(cache, RMSNormSpec(hidden=896, eps=1e-6), x, gamma)
    ref, _ = rmsnorm_reference(x, gamma, 1e-6)
    assert np.abs(y - ref).max() <= RMS_TOL


def test_rmsnorm_eps_1e5_then_1e6_in_one_process_gives_two_entries(cache):
    x, gamma = qwen_activations(4, 896)
    ys = [run_rmsnorm(cache, RMSNormSpec(hidden=896, eps=eps), x, gamma)[0] for eps in (1e-5, 1e-6)]
    assert cache.stats.jit_compiles == 2 and len(cache._kernels) == 2
    assert not np.array_equal(ys[0], ys[1])  # at std 0.02, eps 1e-5 vs 1e-6 moves y by ~1%


@pytest.mark.parametrize("rows, hidden, block, save, warp", [
    (1, 896, 256, True, False), (3, 897, 128, True, False), (3, 898, 256, False, False),
    (5, 4096, 512, True, False), (2, 64, 32, False, False), (7, 4864, 1024, True, False),
    (1, 1, 32, True, False), (1, 896, 256, True, True), (13, 897, 128, True, True), (9, 1, 64, True, True),
    (33, 2048, 256, False, True)])
def test_rmsnorm_odd_shapes_and_saved_rstd(cache, rows, hidden, block, save, warp):
    x, gamma = qwen_activations(rows, hidden, seed=hidden)
    spec = RMSNormSpec(hidden=hidden, eps=1e-6, block_size=block, save_rstd=save, warp_per_row=warp)
    y, rstd = run_rmsnorm(cache, spec, x, gamma)
    ref, ref_rstd = rmsnorm_reference(x, gamma, 1e-6)
    assert np.isfinite(y).all(), "an output element was never written"
    assert np.abs(y - ref).max() <= RMS_TOL
    if save:
        np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-5)


@pytest.mark.parametrize("tokens, heads, dim, block", [(1, 1, 2, 32), (3, 3, 6, 32), (1000, 2, 64, 256),
                                                        (5, 16, 128, 128)])
def test_rope_odd_shapes(cache, tokens, heads, dim, block):
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, heads, dim)).astype(np.float32)
    positions = rng.integers(-50, 32768, tokens)
    y = run_rope(cache, RopeSpec(heads=heads, head_dim=dim, theta=1e6, block_size=block), x, positions)
    np.testing.assert_allclose(y, rope_reference(x, positions, 1e6), atol=ROPE_TOL, rtol=ROPE_TOL)


def test_prewarmed_specs_run_in_strict_mode_with_zero_misses(cache):
    specs = [RMSNormSpec(hidden=896, eps=1e-6), RopeSpec(heads=14, head_dim=64, theta=1e6),
             RopeSpec(heads=2, head_dim=64, theta=1e6)]
    cache.prewarm(specs)
    compiles = cache.stats.jit_compiles
    x, gamma = qwen_activations(4, 896)
    with cache.strict_mode():
        run_rmsnorm(cache, RMSNormSpec(hidden=896, eps=1e-6), x, gamma)  # an equal, new instance
        q = np.ones((4, 14, 64), np.float32)
        run_rope(cache, RopeSpec(heads=14, head_dim=64, theta=1e6), q, np.arange(4))
        with pytest.raises(StrictMissError, match="not pre-warmed"):
            cache.get(RMSNormSpec(hidden=896, eps=1e-5))
    assert cache.stats.jit_compiles == compiles and cache.stats.memory_hits == 2


# -- disk cache ------------------------------------------------------------------------------------
def fill(directory):
    proc = subprocess.run([sys.executable, str(FILL), str(directory)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_from_disk_with_zero_jit_compiles(tmp_path):
    first, second = fill(tmp_path), fill(tmp_path)
    assert first["jit_compiles"] == 6 and first["disk_hits"] == 0
    assert second["jit_compiles"] == 0 and second["disk_hits"] == 6 and second["rejected"] == 0
    assert check_disk(tmp_path) == []


def test_two_processes_filling_one_directory_at_once_leave_it_valid(tmp_path):
    procs = [subprocess.Popen([sys.executable, str(FILL), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert check_disk(tmp_path) == []
    assert fill(tmp_path)["jit_compiles"] == 0


def truncate(path):
    path.write_bytes(path.read_bytes()[:-300])


def flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def foreign_driver(path):
    meta, cubin = entry.decode(path.read_bytes())
    meta["toolchain"] = dict(meta["toolchain"], driver_version=meta["toolchain"]["driver_version"] - 10)
    path.write_bytes(entry.encode(meta, cubin))


@pytest.mark.parametrize("damage, reason", [(truncate, "checksum"), (flip_bit, "checksum"),
                                            (foreign_driver, "foreign toolchain")])
def test_damaged_entries_are_detected_reported_and_rebuilt(tmp_path, damage, reason):
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    first = ModuleCache(tmp_path)
    first.get(spec)
    path = first.entry_path(spec.key(first.target))
    damage(path)
    second = ModuleCache(tmp_path)
    x, gamma = qwen_activations(4, 896)
    y, _ = run_rmsnorm(second, spec, x, gamma)
    assert second.stats.rejected == 1 and second.stats.jit_compiles == 1 and second.stats.disk_hits == 0
    assert reason in second.rejections[0][1] and second.rejections[0][0] == path
    assert np.abs(y - rmsnorm_reference(x, gamma, 1e-6)[0]).max() <= RMS_TOL
    assert check_disk(tmp_path) == []  # rebuilt in place
    third = ModuleCache(tmp_path)
    third.get(spec)
    assert third.stats.disk_hits == 1 and third.stats.rejected == 0


def test_two_texts_under_one_key_is_a_loud_error(tmp_path):
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6)
    first = ModuleCache(tmp_path)
    first.get(spec)
    path = first.entry_path(spec.key(first.target))
    meta, cubin = entry.decode(path.read_bytes())
    path.write_bytes(entry.encode(dict(meta, ptx_sha256="0" * 64), cubin))
    with pytest.raises(KeyCollisionError, match="emitter is impure or the key misses a parameter"):
        ModuleCache(tmp_path).get(spec)


def test_memory_only_cache_writes_nothing(tmp_path):
    c = ModuleCache(tmp_path, use_disk=False)
    c.get(RMSNormSpec(hidden=64, eps=1e-6, block_size=32))
    assert c.stats.jit_compiles == 1 and not any(tmp_path.iterdir())


# -- memory, streams, events, errors ---------------------------------------------------------------
@pytest.mark.parametrize("dtype, host", [
    ("f32", np.linspace(-1, 1, 1001, dtype=np.float32)), ("f16", np.linspace(-1, 1, 7, dtype=np.float16)),
    ("i32", np.arange(-5, 6, dtype=np.int32)), ("i64", np.arange(2**40, 2**40 + 9, dtype=np.int64)),
    ("bf16", to_bf16(np.array([1.0, -3.5, 1e-3], np.float32)))])
def test_device_arrays_round_trip_every_dtype(dtype, host):
    with DeviceArray.from_numpy(host, dtype) as d:
        assert d.shape == host.shape and d.nbytes == host.nbytes
        np.testing.assert_array_equal(d.to_numpy(), host)
    if dtype == "bf16":
        np.testing.assert_allclose(from_bf16(host), [1.0, -3.5, 1e-3], rtol=2**-8)


def test_async_copies_on_a_stream_and_event_timing():
    stream = Stream()
    host = np.arange(1 << 20, dtype=np.float32)
    out = np.zeros_like(host)
    with DeviceArray(host.shape) as d:
        start = Event().record(stream)
        d.upload(host, stream=stream)
        d.download(out, stream=stream)
        end = Event().record(stream)
        stream.synchronize()
        assert start.elapsed_ms(end) > 0
    np.testing.assert_array_equal(out, host)
    stream.destroy()


def test_views_copy_to_and_from_pinned_memory_in_stream_order():
    """A view's asynchronous upload runs after the stream's earlier work and its download after the
    later: the kernel-free round trip fill -> upload -> download sees the upload, not the fill."""
    stream = Stream()
    staged, back = PinnedArray(4096, "i32"), PinnedArray((2, 2048), "i32")
    staged.array[:] = np.arange(4096, dtype=np.int32)
    with DeviceArray(4096, "i32") as d:
        d.fill_u32(0xFFFFFFFF, stream)
        d.view("all").upload(staged.array, stream)
        d.view("rows", 0, (2, 2048)).download(back.array, stream)
        stream.synchronize()
        np.testing.assert_array_equal(back.array.reshape(-1), np.arange(4096))
        with pytest.raises(ValueError, match="contiguous i32 array as it is"):
            d.view("all").upload(np.arange(4096), stream)  # int64: a converted copy would be gone
    for p in (staged, back):
        p.free()
        p.free()  # (twice is harmless)
    stream.destroy()


def test_driver_errors_name_the_call_and_the_result():
    with pytest.raises(CudaError, match=r"cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY"):
        DeviceArray(1 << 50, "u8")


def test_wrong_argument_count_is_refused_before_launch(cache):
    kernel = cache.get(RMSNormSpec(hidden=64, eps=1e-6, block_size=32))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        kernel(1, 32, 0, 0)


def test_misaligned_pointers_are_refused_at_bind(cache):
    kernel = cache.get(RMSNormSpec(hidden=64, eps=1e-6, block_size=32))
    with DeviceArray(256) as d:
        with pytest.raises(ValueError, match="not 16-byte aligned"):
            kernel.bind(1, 32, d.ptr + 4, d, d, 1)


def test_a_strict_miss_names_the_nearest_prewarmed_spec(cache):
    cache.prewarm([RMSNormSpec(hidden=896, eps=1e-6), RopeSpec(heads=2, head_dim=64, theta=1e6)])
    with cache.strict_mode(), pytest.raises(StrictMissError) as e:
        cache.get(RMSNormSpec(hidden=896, eps=1e-5))
    assert "nearest pre-warmed rmsnorm: RMSNormSpec(hidden=896, eps=1e-06" in str(e.value)
    assert "differs in eps 1e-06 -> 1e-05" in str(e.value)


def test_a_compiled_entry_records_what_cache_ls_shows(cache, capsys):
    from model.cli import main as cli_main

    spec = RMSNormSpec(hidden=896, eps=1e-6)
    cache.get(spec)
    meta, _ = entry.decode(cache.entry_path(spec.key(cache.target)).read_bytes())
    assert meta["registers"] > 0 and meta["local_bytes"] >= 0 and meta["compile_ms"] > 0 and meta["created"] > 0
    assert meta["ptx_bytes"] == len(spec.emit(cache.target))
    assert cli_main(["cache", "--cache-dir", str(cache.root), "show", spec.key(cache.target)[:12]]) == 0
    assert f"registers   {meta['registers']}" in capsys.readouterr().out
    assert check_disk(cache.root) == []


def test_a_second_text_under_a_loaded_key_is_a_collision_even_in_memory(cache, monkeypatch):
    """The in-memory guard: the first load of a key records its text digest for the process; a
    later load of that key (another cache) emitting other text is refused, not served."""
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6)
    cache.get(spec)
    other = ModuleCache(use_disk=False)
    monkeypatch.setattr(RopeSpec, "emit", lambda self, target: "// another text under the same key\n")
    with pytest.raises(KeyCollisionError, match="impure or the key misses a parameter"):
        other.get(RopeSpec(heads=2, head_dim=64, theta=1e6))


def test_release_gives_the_primary_context_back_and_device_retains_it_anew():
    """A process done with the GPU (the parent of --gpus N, after its checks) holds no context
    there: its memory is the ranks'. In a child process, as releasing this one's would end it."""
    script = ("from runtime.driver import call, device, release\n"
              "d = device(); free0, _ = call('cuMemGetInfo')\n"
              "release()\n"
              "_, active = call('cuDevicePrimaryCtxGetState', d.handle)\n"
              "assert not active, 'the primary context is still active'\n"
              "d2 = device(); free1, _ = call('cuMemGetInfo')\n"
              "print('ok', bool(call('cuDevicePrimaryCtxGetState', d2.handle)[1]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.split() == ["ok", "True"], done.stderr[-2000:]
