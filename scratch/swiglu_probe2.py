"""Probe (device): where the fused down-projection dX + SwiGLU backward's time goes. Variants of the
epilogue patched in (each its own in-memory cache: the patches change PTX under the same key)."""
import contextlib, dataclasses, sys
import torch
sys.path.insert(0, "bench")
import ptxgen.kernels.gemm_wgmma as gw
from runtime import ModuleCache
import runtime.cache as rc
from runtime.tensormap import gemm_c_tensor_map
from bench_compute import time_gemm

m, n, k = 8192, 4864, 896
base = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, trans_b=False, split_tail=True)
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
gate_up = (torch.randn(m, 2 * n, device="cuda") * 3).to(torch.bfloat16)
c32 = torch.empty(m, n, device="cuda")
c16 = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
out = torch.empty(m, 2 * n, device="cuda", dtype=torch.bfloat16)
orig_store, orig_load = gw.StagedSwiGLU.store, gw.StagedSwiGLU.load


@contextlib.contextmanager
def patched(no_load=False, no_store=False, no_math=False):
    def store(self, *a, **kw):
        b = self.b
        if no_load:
            b.mbarrier_wait = lambda *x, **y: None
        if no_store:
            b.tma_store_3d = lambda *x, **y: None
        try:
            orig_store(self, *a, **kw)
        finally:
            for name in ("mbarrier_wait", "tma_store_3d"):
                b.__dict__.pop(name, None)
    gw.StagedSwiGLU.store = store
    grads = gw.swiglu_grads
    if no_math:
        gw.swiglu_grads = lambda b, g, u, d: (d, d)
    if no_load:
        gw.StagedSwiGLU.load = lambda *a, **kw: None
    try:
        yield
    finally:
        gw.StagedSwiGLU.store, gw.StagedSwiGLU.load = orig_store, orig_load
        gw.swiglu_grads = grads


def t(spec, c, **kw):
    rc._TEXTS.clear()  # the patched emitters make other PTX under the same key: this probe's own doing
    ms = [time_gemm(ModuleCache(use_disk=False), spec, a, b, c, m, n, k, **kw) for _ in range(2)]
    return " / ".join(f"{x:.4f}" for x in ms)


for stages in (5,):
    print(f"plain f32 C stages {stages}: {t(dataclasses.replace(base, stages=stages), c32)} ms", flush=True)
for stages in (5,):
    s = dataclasses.replace(base, stages=stages, bf16_out=True, tma_store=True)
    print(f"plain bf16 tma_store stages {stages}: {t(s, c16)} ms", flush=True)
gmap = gemm_c_tensor_map(dataclasses.replace(base, stages=5, tma_store=True, swiglu_grad=True), gate_up.data_ptr(), m, n)
for label, kw in (("as is", {}), ("no gate/up loads", dict(no_load=True)),
                  ("no loads, no stores", dict(no_load=True, no_store=True)), ("no stores", dict(no_store=True)),
                  ("no SwiGLU math (stores d twice)", dict(no_math=True)),
                  ("no math, no loads, no stores", dict(no_math=True, no_load=True, no_store=True))):
    for stages in (5,):
        spec = dataclasses.replace(base, stages=stages, tma_store=True, swiglu_grad=True)
        with patched(**kw):
            print(f"fused {label} stages {stages}: {t(spec, out, gate_up=gmap.ptr)} ms", flush=True)
spec64 = dataclasses.replace(base, block_n=64, stages=6, tma_store=True, swiglu_grad=True)
g64 = gemm_c_tensor_map(spec64, gate_up.data_ptr(), m, n)
print(f"fused block_n 64 stages 6: {t(spec64, out, gate_up=g64.ptr)} ms", flush=True)

# the LM head's forward: the plain bf16 product against the same with its rows' statistics
m, n, k = 8192, 151936, 896
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
logits = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
head = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, bf16_out=True, tma_store=True)
stats = torch.empty(-(-n // 128) * m * 2, device="cuda")
print(f"lm_head fwd bf16 C: {t(head, logits)} ms", flush=True)
print(f"lm_head fwd bf16 C + row_stats: {t(dataclasses.replace(head, row_stats=True), logits, stats=stats.data_ptr())} ms", flush=True)
print(f"lm_head fwd bf16 C, split_tail: {t(dataclasses.replace(head, split_tail=True), logits)} ms", flush=True)
