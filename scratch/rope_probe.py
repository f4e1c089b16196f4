"""Time the q/k/v GEMM with RoPE in its epilogue at several tiles against the plain product (H200 probe)."""
import sys, dataclasses, torch
sys.path.insert(0, "bench")
from bench_compute import time_gemm
from runtime import ModuleCache
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
cache = ModuleCache()
m, n, k = 8192, 1152, 896
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
bias = torch.randn(n, device="cuda")
q = torch.empty(m, 896, device="cuda", dtype=torch.bfloat16)
kv = [torch.empty(m, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
table = torch.randn(m, 32, 2, device="cuda")
c32 = torch.empty(m, n, device="cuda")
rope = dict(rope_heads=14, rope_kv_heads=2, rope_head_dim=64)
for name, spec in [
        ("plain 128x128 f32 C", GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, bias=True, split_tail=True)),
        ("plain 128x64 f32 C", GemmWgmmaSpec(tma=True, pingpong=True, block_n=64, stages=8, bias=True, split_tail=True)),
        ("rope 128x64 bias", GemmWgmmaSpec(tma=True, pingpong=True, block_n=64, stages=8, bias=True, split_tail=True, **rope)),
        ("rope 128x64 nobias", GemmWgmmaSpec(tma=True, pingpong=True, block_n=64, stages=8, split_tail=True, **rope)),
        ("rope 128x128 bias (spills)", GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, bias=True, **rope)),
        ("rope 128x128 nobias", GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, **rope))]:
    extra = {"bias": bias.data_ptr()} if spec.bias else {}
    out = c32
    if spec.rope_heads:
        out = q
        extra["rope"] = (kv[0].data_ptr(), kv[1].data_ptr(), table.data_ptr())
    ms = min(time_gemm(cache, spec, a, b, out, m, n, k, **extra) for _ in range(3))
    print(f"{name:32s} {ms*1000:8.1f} us")
