"""The model's plain bf16 GEMMs (8192 tokens) at its tile (128x128 pingpong, tail cut) beside
cooperative 128x256 tiles (both warpgroups on each tile: B read once for two m64 halves)."""
import dataclasses
import sys

import torch

sys.path.insert(0, "bench")
from bench_compute import time_gemm  # noqa: E402

from model.config import preset  # noqa: E402
from model.kernels import ModelKernels  # noqa: E402
from model.optim import AdamWSettings  # noqa: E402
from model.precision import Precision  # noqa: E402
from ptxgen.spec import SpecError  # noqa: E402
from runtime import ModuleCache  # noqa: E402

cache = ModuleCache()
k = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16)
tokens = 8192
VARIANTS = {"model": {}, "uncut": dict(split_tail=False),
            "coop256s4": dict(pingpong=False, split_tail=False, block_n=256, stages=4),
            "coop256s3": dict(pingpong=False, split_tail=False, block_n=256, stages=3),
            "coop128s6": dict(pingpong=False, split_tail=False, block_n=128, stages=6)}
for name, lin, d_in, d_out in (("qkv", k.qkv, 896, 1152), ("o", k.o, 896, 896), ("gate_up", k.gate_up, 896, 9728),
                               ("down", k.down, 4864, 896), ("head", k.head, 896, 151936)):
    for what, (spec, m, n, kk) in zip(("fwd", "dX", "dW"), lin.gemms(tokens, d_in, d_out)):
        if spec.swiglu_grad or spec.swiglu_act or spec.rope_heads or spec.bias or spec.tma_store:
            continue
        a = torch.randn(*((kk, m) if spec.trans_a else (m, kk)), device="cuda", dtype=torch.bfloat16)
        b = torch.randn(*((n, kk) if spec.trans_b else (kk, n)), device="cuda", dtype=torch.bfloat16)
        c = torch.empty(m, n, device="cuda")
        out = []
        for v, fields in VARIANTS.items():
            try:
                s = dataclasses.replace(spec, **fields)
            except SpecError as e:
                out.append(f"{v} -"); continue
            ms = min(time_gemm(cache, s, a, b, c, m, n, kk) for _ in range(3))
            out.append(f"{v} {ms * 1e3:.1f}us ({2 * m * n * kk / ms / 1e9:.0f} TF)")
        theirs = None
        at, bt = (a.t() if spec.trans_a else a), (b.t() if spec.trans_b else b)
        from harness import time_ms
        theirs = time_ms(lambda: torch.matmul(at, bt), reps=10, warmup=2)
        print(f"{name} {what} {m}x{n}x{kk}: " + ", ".join(out) + f", cuBLAS(bf16 C) {theirs * 1e3:.1f}us", flush=True)
        del a, b, c
