"""Runtime benchmark (GPU machine): launch overhead, cold JIT vs disk load, and the seed kernels vs torch.

    PYTHONPATH=$PWD python3 bench/bench_runtime.py [--json FILE]

1. Host cost of one launch: a cache hit (``cache.get(spec)`` + prepared launch) against a raw
   ``cuLaunchKernel`` with prepacked arguments; median of batches of launches (queue never full).
2. RMSNorm module: cold (emit + driver JIT + load + disk write) vs disk (emit + read + verify + load),
   with the driver's own JIT cache disabled.
3. RMSNorm and RoPE beside their torch equivalents, GB/s against a measured device copy.
"""
from __future__ import annotations

import os

# Before any CUDA call: the driver's own PTX JIT cache (~/.nv/ComputeCache) would turn the "cold"
# JIT below into a read of the driver's cache, hiding what a first compile costs.
os.environ.setdefault("CUDA_CACHE_DISABLE", "1")

import argparse
import ctypes
import json
import statistics
import tempfile
import time
from pathlib import Path

from cuda.bindings import driver as cu

from ptxgen.kernels.rmsnorm import RMSNormSpec
from ptxgen.kernels.rope import RopeSpec
from runtime import Event, ModuleCache
from runtime.driver import synchronize

BATCH, BATCHES = 200, 50


def launch_overhead() -> dict[str, float]:
    spec = RMSNormSpec(hidden=64, eps=1e-6, block_size=32)
    import torch
    x = torch.randn(1, 64, device="cuda")
    g, y = torch.ones(64, device="cuda"), torch.empty(1, 64, device="cuda")
    cache = ModuleCache(use_disk=False)
    kernel = cache.get(spec)
    launch = kernel.bind(1, 32, x.data_ptr(), g.data_ptr(), y.data_ptr())
    values = [ctypes.c_uint64(t.data_ptr()) for t in (x, g, y)]
    array = (ctypes.c_void_p * 3)(*(ctypes.addressof(v) for v in values))
    raw_args = ctypes.addressof(array)  # prepacked void** for the raw baseline
    fn, stream = kernel.function, cu.CUstream(0)

    def raw() -> None:
        cu.cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, stream, raw_args, 0)

    def hit() -> None:
        cache.get(spec)
        launch()

    def hit_and_pack() -> None:
        cache.get(spec).bind(1, 32, x.data_ptr(), g.data_ptr(), y.data_ptr())()

    variants = {"raw cuLaunchKernel": raw, "cache hit + prepared launch": hit,
                "cache hit + pack + launch": hit_and_pack}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(BATCHES):  # variants interleaved batch by batch, so drift hits all alike
        for name, fn_ in variants.items():
            synchronize()
            t0 = time.perf_counter()
            for _ in range(BATCH):
                fn_()
            samples[name].append((time.perf_counter() - t0) / BATCH * 1e6)
    out = {name: statistics.median(v) for name, v in samples.items()}
    synchronize()
    return out


def cold_vs_disk() -> dict[str, float]:
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    cold, disk, emit = [], [], []
    target = ModuleCache(use_disk=False).target
    for _ in range(7):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            ModuleCache(d).get(RMSNormSpec(hidden=896, eps=1e-6))
            cold.append(time.perf_counter() - t0)
            c = ModuleCache(d)
            t0 = time.perf_counter()
            c.get(RMSNormSpec(hidden=896, eps=1e-6))
            disk.append(time.perf_counter() - t0)
            assert c.stats.disk_hits == 1
        t0 = time.perf_counter()
        spec.emit(target)
        emit.append(time.perf_counter() - t0)
    return {"cold JIT (ms)": statistics.median(cold) * 1e3, "disk load (ms)": statistics.median(disk) * 1e3,
            "of which emit (ms)": statistics.median(emit) * 1e3}


def time_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = Event().record(), Event()
        fn()
        b.record()
        times.append(a.elapsed_ms(b))
    return statistics.median(times)


def kernels_vs_torch() -> list[dict]:
    import torch
    import torch.nn.functional as F
    rows = []
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    copy_gbs = 2 * big.numel() / (time_ms(lambda: dst.copy_(big)) * 1e-3) / 1e9
    cache = ModuleCache()

    n, h = 16384, 896
    x, g = torch.randn(n, h, device="cuda") * 0.02, torch.randn(h, device="cuda")
    y = torch.empty_like(x)
    spec = RMSNormSpec(hidden=h, eps=1e-6)
    launch = cache.get(spec).bind(*spec.launch_dims(n), x.data_ptr(), g.data_ptr(), y.data_ptr())
    nbytes = 2 * x.numel() * 4 + h * 4
    ours, theirs = time_ms(launch), time_ms(lambda: F.rms_norm(x, (h,), g, 1e-6))
    rows.append(("rmsnorm fwd f32 16384x896", nbytes, ours, theirs))

    t, heads, d = 16384, 14, 64
    q = torch.randn(t, heads, d, device="cuda")
    out = torch.empty_like(q)
    pos = torch.arange(t, device="cuda", dtype=torch.int32)
    rspec = RopeSpec(heads=heads, head_dim=d, theta=1e6)
    rlaunch = cache.get(rspec).bind(*rspec.launch_dims(t), q.data_ptr(), out.data_ptr(), pos.data_ptr(), t)
    inv = 1e6 ** -(torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d)

    def torch_rope():  # what HF computes per call: angles, cos/sin, rotate-half
        ang = pos.float()[:, None] * inv
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        rot = torch.cat([-q[..., d // 2:], q[..., : d // 2]], -1)
        return q * cos + rot * sin

    rows.append(("rope fwd f32 16384x14x64", 2 * q.numel() * 4 + t * 4, time_ms(rlaunch), time_ms(torch_rope)))
    return [{"kernel": name, "ours_ms": o, "torch_ms": th, "ours_GBs": nb / o / 1e6, "torch_GBs": nb / th / 1e6,
             "pct_copy": 100 * nb / o / 1e6 / copy_gbs, "ratio_vs_torch": th / o, "copy_GBs": copy_gbs}
            for name, nb, o, th in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args()
    overhead, jit, kernels = launch_overhead(), cold_vs_disk(), kernels_vs_torch()
    raw = overhead["raw cuLaunchKernel"]
    print("\n== launch host overhead (us per launch, median of %d batches of %d)" % (BATCHES, BATCH))
    for name, us in overhead.items():
        print(f"  {name:<30} {us:7.2f} us   {us / raw:5.2f}x raw")
    print("\n== RMSNorm module load (median of 7)")
    for name, ms in jit.items():
        print(f"  {name:<22} {ms:8.3f}")
    print(f"  disk is {jit['cold JIT (ms)'] / jit['disk load (ms)']:.1f}x faster than cold JIT")
    print(f"\n== kernels vs torch (copy bandwidth {kernels[0]['copy_GBs']:.0f} GB/s, read+write)")
    print(f"  {'kernel':<28} {'ours GB/s':>10} {'% copy':>7} {'torch GB/s':>11} {'ours/torch':>10}")
    for k in kernels:
        print(f"  {k['kernel']:<28} {k['ours_GBs']:10.0f} {k['pct_copy']:6.1f}% {k['torch_GBs']:11.0f} "
              f"{k['ratio_vs_torch']:9.2f}x")
    if ns.json:
        ns.json.write_text(json.dumps({"launch_us": overhead, "module_load_ms": jit, "kernels": kernels}, indent=2))


if __name__ == "__main__":
    main()
