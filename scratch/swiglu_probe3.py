"""Probe (device): the down projection's dX + SwiGLU backward with gate and up brought ahead by a loader
warp (this tree) against the kernel before it (scratch/ptxgen_old: the tree at 91433c3), the plain
GEMM and the GEMM + swiglu_bwd, in one process; the new kernel bit for bit the GEMM + swiglu_bwd."""
import dataclasses, sys
import torch
sys.path.insert(0, "bench")
sys.path.insert(0, "scratch")
import ptxgen.kernels.gemm_wgmma as gw
import ptxgen_old.kernels.gemm_wgmma as old
from ptxgen.kernels.swiglu import SwiGLUBackwardSpec
from ptxgen.vecio import DType
from runtime import ModuleCache
from runtime.tensormap import gemm_c_tensor_map
from bench_compute import time_gemm, time_ms
import runtime.tensormap as tm
from ptxgen.hw import MmaType
from ptxgen_old.hw import MmaType as OldMmaType
tm._TYPES[OldMmaType.BF16] = tm._TYPES[MmaType.BF16]  # the old package's enum, the same type

torch.manual_seed(0)
cache = ModuleCache(use_disk=False)
for m, n, k in ((8192, 4864, 896), (4096, 4864, 896), (1000, 4800, 896)):
    base = dict(tma=True, pingpong=True, block_n=128, trans_b=False)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    gate_up = (torch.randn(m, 2 * n, device="cuda") * 3).to(torch.bfloat16)
    c32 = torch.empty(m, n, device="cuda")
    plain_spec = gw.GemmWgmmaSpec(**base, stages=6)
    plain = time_gemm(cache, plain_spec, a, b, c32, m, n, k)
    bwd = SwiGLUBackwardSpec(dtype=DType.BF16, out_dtype=DType.BF16)
    ref = torch.empty(m, 2 * n, device="cuda", dtype=torch.bfloat16)
    launch = cache.get(bwd).bind(*bwd.launch_dims(m, n), *bwd.arguments(gate_up.data_ptr(), c32.data_ptr(), ref.data_ptr(), m, n))
    t_bwd = time_ms(launch, reps=10, warmup=2)
    print(f"{m}x{n}x{k}: plain dX f32 {plain:.4f} ms + swiglu_bwd {t_bwd:.4f} = {plain + t_bwd:.4f}", flush=True)
    c16 = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    print(f"  plain bf16 tma_store stages 5: {time_gemm(cache, gw.GemmWgmmaSpec(**base, stages=5, bf16_out=True, tma_store=True), a, b, c16, m, n, k):.4f} ms", flush=True)
    variants = []
    for stages, block_n, tail in ((5, 128, False), (4, 128, False), (3, 128, False), (5, 128, True), (4, 128, True), (6, 64, False)):
        variants.append((f"new stages {stages} block_n {block_n} split_tail {tail}",
                         gw.GemmWgmmaSpec(**{**base, "block_n": block_n}, stages=stages, tma_store=True, swiglu_grad=True, split_tail=tail)))
    for label, spec in variants:
        out = torch.full((m, 2 * n), float("nan"), device="cuda", dtype=torch.bfloat16)
        gmap = gemm_c_tensor_map(spec, gate_up.data_ptr(), m, n)
        times = [time_gemm(cache, spec, a, b, out, m, n, k, gate_up=gmap.ptr) for _ in range(2)]
        gmap.free()
        same = torch.equal(out.view(torch.int16), ref.view(torch.int16))
        print(f"  {label} (slots {getattr(spec, 'source_slots', '-')}): {times[0]:.4f} / {times[1]:.4f} ms, "
              f"bit-equal to GEMM + swiglu_bwd: {same}", flush=True)
