"""Probe: the model's RMSNorm backward (bf16 copy, with/without residual) over rows_per_block and
block sizes, and the qkv bias column sum over chunk sizes / row groups, at 8192 rows."""
import sys

import torch

sys.path.insert(0, "bench")
from harness import time_ms  # noqa: E402
from ptxgen.kernels.colsum import ColumnSumSpec  # noqa: E402
from ptxgen.kernels.rmsnorm import RMSNormBackwardSpec  # noqa: E402
from runtime import ModuleCache  # noqa: E402

T, H, QKV = 8192, 896, 1152
cache = ModuleCache()
p = lambda t: t.data_ptr()  # noqa: E731
x, dy, dres = (torch.randn(T, H, device="cuda") for _ in range(3))
g = torch.randn(H, device="cuda")
rstd = torch.rand(T, device="cuda") + 0.5
dx, dx16 = torch.empty(T, H, device="cuda"), torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
partial = torch.empty(T, H, device="cuda")
for residual in (False, True):
    for r in (16, 8, 4, 2):
        for bs in (128, 256):
            spec = RMSNormBackwardSpec(hidden=H, rows_per_block=r, block_size=bs, residual=residual, bf16_copy=True)
            args = [p(x), p(g), p(dy), p(rstd)] + ([p(dres)] if residual else []) + [p(dx), p(dx16), p(partial), T]
            k = cache.get(spec).bind(*spec.launch_dims(T), *args)
            ms = time_ms(k, reps=50, warmup=5)
            nbytes = T * H * 4 * (4 if residual else 3) + T * H * 2
            print(f"rmsnorm_bwd residual={residual} rows/block={r} bs={bs}: {ms * 1e3:.1f} us "
                  f"{nbytes / ms / 1e9:.0f} GB/s", flush=True)

src = torch.randn(T, QKV, device="cuda")
db = torch.empty(QKV, device="cuda")
for per_chunk in (256, 128, 64):
    chunks = -(-T // per_chunk)
    part = torch.empty(chunks, QKV, device="cuda")
    for groups in (4, 8, 16, 32):
        cs = ColumnSumSpec(row_groups=groups)
        c1 = cache.get(cs).bind(*cs.launch_dims(T, QKV, per_chunk), p(src), p(part), T, QKV, per_chunk)
        c2 = cache.get(cs).bind(*cs.launch_dims(chunks, QKV, chunks), p(part), p(db), chunks, QKV, chunks)
        ms = time_ms(lambda: (c1(), c2()), reps=50, warmup=5)
        print(f"colsum {T}x{QKV} chunk={per_chunk} groups={groups}: {ms * 1e3:.1f} us "
              f"{T * QKV * 4 / ms / 1e9:.0f} GB/s", flush=True)
