"""Runs the model's attention forward at 4 x 2048 and 8 x 1024 (seeded inputs) and saves o and lse to $OUT/<tag>_*.npy."""
import os, sys
import numpy as np
import torch
from model.config import preset
from model.kernels import ModelKernels
from model.optim import AdamWSettings
from model.precision import Precision
from runtime import ModuleCache
tag = sys.argv[1]
cache = ModuleCache()
spec = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16).attention
for b, s in ((4, 2048), (8, 1024), (1, 100)):
    g = torch.Generator(device="cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(b, s, 14, 64, generator=g, **bf) * 2
    k, v = (torch.randn(b, s, 2, 64, generator=g, **bf) for _ in range(2))
    o = torch.empty(b, s, 14, 64, **bf); lse = torch.empty(b, 14, s, device="cuda")
    cache.get(spec).bind(*spec.launch_dims(b, s), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), s, s, s, 0)()
    torch.cuda.synchronize()
    np.save(f"{os.environ['OUT']}/{tag}_o_{b}x{s}.npy", o.view(torch.int16).cpu().numpy())
    np.save(f"{os.environ['OUT']}/{tag}_lse_{b}x{s}.npy", lse.cpu().numpy())
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(7, 2).transpose(1, 2), v.repeat_interleave(7, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    print(tag, b, s, "max |o - sdpa|", (o.float() - ref.float()).abs().max().item())
