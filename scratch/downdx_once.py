"""One launch each (for ncu): the down projection's dX product alone (f32 C by the threads, 6 stages), then
with SwiGLU's backward in its epilogue (the model's: gate/up in by TMA, [dgate | dup] out by TMA, 5 stages),
at 8192 x 4864 x 896."""
import dataclasses
import sys

import torch

sys.path.insert(0, "bench")
import bench_compute  # noqa: E402
from model.config import preset  # noqa: E402
from model.kernels import WGMMA_TILE, ModelKernels  # noqa: E402
from model.optim import AdamWSettings  # noqa: E402
from model.precision import Precision  # noqa: E402
from runtime import ModuleCache  # noqa: E402
from runtime.tensormap import gemm_c_tensor_map  # noqa: E402

bench_compute.time_ms = lambda launch, reps, warmup: (launch(), torch.cuda.synchronize(), 0.0)[-1]
cache = ModuleCache()
spec = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16).down.grad_input
m, n, k = 8192, 4864, 896
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
plain = dataclasses.replace(spec, swiglu_grad=False, tma_store=spec.bf16_out, stages=WGMMA_TILE["stages"])
for s in (plain, spec):
    cache.get(s)
torch.cuda.synchronize()
c32 = torch.empty(m, n, device="cuda")
bench_compute.time_gemm(cache, plain, a, b, c32, m, n, k)
gate_up = torch.randn(m, 2 * n, device="cuda", dtype=torch.bfloat16)
c = torch.empty(m, 2 * n, device="cuda", dtype=torch.bfloat16)
gmap = gemm_c_tensor_map(spec, gate_up.data_ptr(), m, n)
bench_compute.time_gemm(cache, spec, a, b, c, m, n, k, gate_up=gmap.ptr)
torch.cuda.synchronize()
print("ok", plain.stages, spec.stages)
