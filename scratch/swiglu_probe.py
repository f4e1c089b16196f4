"""Probe (device): the fused down-projection dX + SwiGLU backward against the GEMM + swiglu_bwd, timed and checked."""
import dataclasses, sys
import torch
sys.path.insert(0, "bench")
import ptxgen.kernels.gemm_wgmma as gw
from ptxgen.kernels.swiglu import SwiGLUBackwardSpec
from ptxgen.vecio import DType
from runtime import ModuleCache
from runtime.tensormap import gemm_c_tensor_map
from bench_compute import time_gemm, time_ms

m, n, k = 8192, 4864, 896
base = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, trans_b=False, split_tail=True)
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
gate_up = (torch.randn(m, 2 * n, device="cuda") * 3).to(torch.bfloat16)
c32 = torch.empty(m, n, device="cuda")
cache = ModuleCache(use_disk=False)
plain = time_gemm(cache, base, a, b, c32, m, n, k)
plain5 = time_gemm(cache, dataclasses.replace(base, stages=5), a, b, c32, m, n, k)
bwd = SwiGLUBackwardSpec(dtype=DType.BF16, out_dtype=DType.BF16)
ref = torch.empty(m, 2 * n, device="cuda", dtype=torch.bfloat16)
launch = cache.get(bwd).bind(*bwd.launch_dims(m, n), *bwd.arguments(gate_up.data_ptr(), c32.data_ptr(), ref.data_ptr(), m, n))
t_bwd = time_ms(launch, reps=10, warmup=2)
print(f"plain dX f32: {plain:.3f} ms (5 stages {plain5:.3f}); swiglu_bwd kernel {t_bwd:.3f} ms; sum {plain + t_bwd:.3f}")
for split_tail in (True, False):
    spec = dataclasses.replace(base, stages=5, tma_store=True, swiglu_grad=True, split_tail=split_tail)
    out = torch.full((m, 2 * n), float("nan"), device="cuda", dtype=torch.bfloat16)
    gmap = gemm_c_tensor_map(spec, gate_up.data_ptr(), m, n)
    ms = time_gemm(cache, spec, a, b, out, m, n, k, gate_up=gmap.ptr)
    gmap.free()
    same = torch.equal(out.view(torch.int16), ref.view(torch.int16))
    print(f"fused (split_tail {split_tail}): {ms:.3f} ms, bit-equal to GEMM + swiglu_bwd: {same}", flush=True)
