"""Probe: the one-launch column sum (finish) over vector width, row groups and chunk sizes at the
model's two shapes: dgamma's partial rows (1024 x 896) and the q/k/v bias (8192 x 1152)."""
import sys
import torch
sys.path.insert(0, "bench")
from harness import time_ms  # noqa: E402
from ptxgen.kernels.colsum import ColumnSumSpec  # noqa: E402
from runtime import ModuleCache  # noqa: E402

cache = ModuleCache(use_disk=False)
p = lambda t: t.data_ptr()  # noqa: E731
for rows, cols in ((1024, 896), (8192, 1152)):
    src = torch.randn(rows, cols, device="cuda")
    dst = torch.empty(cols, device="cuda")
    counts = torch.zeros(64, device="cuda", dtype=torch.int32)
    want = src.double().sum(0)
    res = []
    for vec in (1, 4):
        for groups in (4, 8, 16):
            spec = ColumnSumSpec(row_groups=groups, vec=vec, finish=True)
            for chunk in (16, 32, 64, 128, 256):
                chunks = -(-rows // chunk)
                part = torch.empty(chunks, cols, device="cuda")
                k = cache.get(spec).bind(*spec.launch_dims(rows, cols, chunk), p(src), p(part), p(dst), p(counts),
                                         rows, cols, chunk)
                ms = min(time_ms(k, reps=100, warmup=10) for _ in range(3))
                err = (dst.double() - want).abs().max().item()
                res.append((ms, vec, groups, chunk))
                print(f"{rows}x{cols} vec={vec} groups={groups:2d} chunk={chunk:3d} ({chunks:3d} chunks): "
                      f"{ms * 1e3:6.2f} us  err {err:.1e}  counts {int(counts.abs().sum())}", flush=True)
    print("best", rows, cols, sorted(res)[:5], flush=True)
