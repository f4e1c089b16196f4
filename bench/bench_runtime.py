"""Runtime benchmark (GPU machine): launch overhead and cold JIT vs disk load.

    PYTHONPATH=$PWD python3 bench/bench_runtime.py [--json FILE]

1. Host cost of one launch: a cache hit (``cache.get(spec)`` + prepared launch) against a raw
   ``cuLaunchKernel`` with prepacked arguments; median of batches of launches (queue never full).
2. RMSNorm module: cold (emit + driver JIT + load + disk write) vs disk (emit + read + verify + load),
   with the driver's own JIT cache disabled.
"""
from __future__ import annotations

import os

# Before any CUDA call: the driver's own PTX JIT cache (~/.nv/ComputeCache) would turn the "cold"
# JIT below into a read of the driver's cache, hiding what a first compile costs.
os.environ.setdefault("CUDA_CACHE_DISABLE", "1")

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

from cuda.bindings import driver as cu

from ptxgen.kernels.rmsnorm import RMSNormSpec
from harness import write_json
from runtime import ModuleCache
from runtime.driver import synchronize

BATCH, BATCHES = 200, 50


def launch_overhead() -> dict[str, float]:
    spec = RMSNormSpec(hidden=64, eps=1e-6, block_size=32)
    import torch
    x = torch.randn(1, 64, device="cuda")
    g, y = torch.ones(64, device="cuda"), torch.empty(1, 64, device="cuda")
    cache = ModuleCache(use_disk=False)
    kernel = cache.get(spec)
    launch = kernel.bind(1, 32, x.data_ptr(), g.data_ptr(), y.data_ptr(), 1)
    values = [ctypes.c_uint64(t.data_ptr()) for t in (x, g, y)] + [ctypes.c_uint32(1)]
    array = (ctypes.c_void_p * 4)(*(ctypes.addressof(v) for v in values))
    raw_args = ctypes.addressof(array)  # prepacked void** for the raw baseline
    fn, stream = kernel.function, cu.CUstream(0)

    def raw() -> None:
        cu.cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, stream, raw_args, 0)

    def hit() -> None:
        cache.get(spec)
        launch()

    def hit_and_pack() -> None:
        cache.get(spec).bind(1, 32, x.data_ptr(), g.data_ptr(), y.data_ptr(), 1)()

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args()
    overhead, jit = launch_overhead(), cold_vs_disk()
    raw = overhead["raw cuLaunchKernel"]
    print("\n== launch host overhead (us per launch, median of %d batches of %d)" % (BATCHES, BATCH))
    for name, us in overhead.items():
        print(f"  {name:<30} {us:7.2f} us   {us / raw:5.2f}x raw")
    print("\n== RMSNorm module load (median of 7)")
    for name, ms in jit.items():
        print(f"  {name:<22} {ms:8.3f}")
    print(f"  disk is {jit['cold JIT (ms)'] / jit['disk load (ms)']:.1f}x faster than cold JIT")
    write_json(ns.json, {"launch_us": overhead, "module_load_ms": jit})


if __name__ == "__main__":
    main()
