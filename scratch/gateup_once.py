"""One launch each (for ncu): the gate/up forward's product alone (bf16 C by TMA, 5 stages), then with
SwiGLU's act in its epilogue (the model's), at 8192 x 9728 x 896."""
import dataclasses
import sys

import torch

sys.path.insert(0, "bench")
import bench_compute  # noqa: E402
from model.config import preset  # noqa: E402
from model.kernels import ModelKernels  # noqa: E402
from model.optim import AdamWSettings  # noqa: E402
from model.precision import Precision  # noqa: E402
from runtime import ModuleCache  # noqa: E402
from runtime.tensormap import gemm_c_tensor_map  # noqa: E402

bench_compute.time_ms = lambda launch, reps, warmup: (launch(), torch.cuda.synchronize(), 0.0)[-1]
cache = ModuleCache()
spec = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16).gate_up.forward
m, n, k = 8192, 9728, 896
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
act = torch.empty(m, n // 2, device="cuda", dtype=torch.bfloat16)
plain = dataclasses.replace(spec, swiglu_act=False)
for s in (plain, spec):
    cache.get(s)
torch.cuda.synchronize()
bench_compute.time_gemm(cache, plain, a, b, c, m, n, k)
amap = gemm_c_tensor_map(spec, act.data_ptr(), m, n, act=True)
bench_compute.time_gemm(cache, spec, a, b, c, m, n, k, act=amap.ptr)
torch.cuda.synchronize()
print("ok", plain.stages, spec.stages)
