"""Shared benchmark harness: CUDA-event timing (warm-up, median), copy bandwidth, the table."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ptxgen.files import write_atomic
from runtime import Event
from runtime.driver import call, synchronize


def time_ms(fn: Callable[[], object], reps: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` on the default stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    start, end = Event(), Event()
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        times.append(start.elapsed_ms(end))
    start.destroy()
    end.destroy()
    return statistics.median(times)


def copy_bandwidth_gbs(total_bytes: int = 2 << 30) -> float:
    """Device-to-device copy moving ``total_bytes`` (half read, half written) through torch."""
    import torch
    src = torch.empty(total_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return total_bytes / (time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


@dataclass
class Row:
    kernel: str
    bytes: int
    ours_ms: float
    torch_ms: float
    copy_gbs: float       # a large copy: the bandwidth ceiling
    same_copy_gbs: float  # a copy moving this row's bytes: what a kernel of this size can reach

    @property
    def ours_gbs(self) -> float:
        return self.bytes / self.ours_ms / 1e6

    @property
    def torch_gbs(self) -> float:
        return self.bytes / self.torch_ms / 1e6

    def as_dict(self) -> dict:
        return {**asdict(self), "ours_GBs": self.ours_gbs, "torch_GBs": self.torch_gbs,
                "pct_copy": 100 * self.ours_gbs / self.copy_gbs,
                "pct_same_size_copy": 100 * self.ours_gbs / self.same_copy_gbs,
                "ratio_vs_torch": self.torch_ms / self.ours_ms}


def print_table(rows: list[Row], copy_gbs: float) -> None:
    print(f"\n== memory-bound kernels vs torch (copy bandwidth {copy_gbs:.0f} GB/s, read+write)")
    print(f"  {'kernel':<72} {'ours ms':>8} {'ours GB/s':>10} {'% copy':>7} {'% same-size copy':>17} "
          f"{'torch GB/s':>11} {'ours/torch':>10}")
    for r in rows:
        d = r.as_dict()
        print(f"  {r.kernel:<72} {r.ours_ms:8.3f} {r.ours_gbs:10.0f} {d['pct_copy']:6.1f}% "
              f"{d['pct_same_size_copy']:16.1f}% {r.torch_gbs:11.0f} {d['ratio_vs_torch']:9.2f}x")


def write_json(path: Path | None, payload: dict) -> None:
    """``payload`` as JSON at ``path`` (none: nothing), replaced whole: a run stopped while writing
    leaves the previous file."""
    if path is not None:
        write_atomic(path, json.dumps(payload, indent=2).encode())


def free_bytes() -> int:
    """The device's free memory once its work is done (a backend's footprint: before minus after)."""
    synchronize()
    free, _total = call("cuMemGetInfo")
    return int(free)
