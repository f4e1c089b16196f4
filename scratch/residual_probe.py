"""Residual add in the GEMM vs in the norm: the o (8192x896x896) and down (8192x896x4864) forward
GEMMs plain / with R staged by TMA / with R read by the threads, and the RMSNorm plain / with the
residual, each timed alone (min of 3 x median of 10), alternating twice."""
import dataclasses
import sys

import torch

sys.path.insert(0, "bench")
from bench_compute import time_gemm  # noqa: E402
from harness import time_ms  # noqa: E402

from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec  # noqa: E402
from ptxgen.kernels.rmsnorm import RMSNormSpec  # noqa: E402
from runtime import ModuleCache  # noqa: E402
from runtime.tensormap import gemm_c_tensor_map  # noqa: E402

cache = ModuleCache()
base = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, split_tail=True)
VARIANTS = {"plain s6": base,
            "R staged s5": dataclasses.replace(base, residual=True, tma_store=True, stages=5),
            "R threads s6": dataclasses.replace(base, residual=True),
            "plain tma_store s5": dataclasses.replace(base, tma_store=True, stages=5)}
m, n = 8192, 896
r = torch.randn(m, n, device="cuda")
for rnd in range(2):
    for kk in (896, 4864):
        a = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, kk, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(m, n, device="cuda")
        out = []
        for name, spec in VARIANTS.items():
            extra = {}
            rmap = None
            if spec.residual:
                rmap = gemm_c_tensor_map(spec, r.data_ptr(), m, n) if spec.tma_store else None
                extra["residual"] = rmap.ptr if rmap is not None else r.data_ptr()
            ms = min(time_gemm(cache, spec, a, b, c, m, n, kk, **extra) for _ in range(3))
            if rmap is not None:
                rmap.free()
            out.append(f"{name} {ms * 1e3:.1f}us")
        print(f"round {rnd} gemm {m}x{n}x{kk}: " + ", ".join(out), flush=True)
    x, res = (torch.randn(m, n, device="cuda") for _ in range(2))
    gamma = torch.randn(n, device="cuda")
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    h_out, rstd = torch.empty(m, n, device="cuda"), torch.empty(m, device="cuda")
    out = []
    for residual, per_warp in ((False, False), (True, False), (False, True), (True, True)):
        spec = RMSNormSpec(hidden=n, eps=1e-6, save_rstd=True, bf16_out=True, residual=residual,
                           warp_per_row=per_warp)
        args = dict(x=x.data_ptr(), gamma=gamma.data_ptr(), y=y.data_ptr(), rstd=rstd.data_ptr(), n_rows=m)
        if residual:
            args.update(residual=res.data_ptr(), h_out=h_out.data_ptr())
        launch = cache.get(spec).bind_named(*spec.launch_dims(m), args)
        ms = min(time_ms(launch, reps=10, warmup=2) for _ in range(3))
        out.append(f"{'residual' if residual else 'plain'}{' warp/row' if per_warp else ''} {ms * 1e3:.1f}us")
    print(f"round {rnd} rmsnorm {m}x{n}: " + ", ".join(out), flush=True)
