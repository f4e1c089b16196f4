"""Probe: the qwen2-0.5b bf16 step with programmatic edges in its graph (dependents let launch at
each kernel's end, as emitted; or right after its wait) against without (same PTX as 'end':
griddepcontrol.wait is a no-op without the edges), alternating, median of 10 steps each."""
import statistics, sys, time
import numpy as np
sys.path.insert(0, "bench")
from bench_train import initial_params, LR
import runtime.cache
from ptxgen.builder import KernelBuilder
from model.cuda_model import CudaBackend
from model.optim import AdamWSettings
from model.precision import Precision
from model.config import preset
from runtime import ModuleCache

B, S = int(sys.argv[1]) if len(sys.argv) > 1 else 8, int(sys.argv[2]) if len(sys.argv) > 2 else 1024
cfg = preset("qwen2-0.5b")
params = initial_params("qwen2-0.5b")
make = lambda cache: CudaBackend(cfg, params, AdamWSettings(), cache=cache, precision=Precision.BF16)
models = {"end": make(ModuleCache())}
real = runtime.cache.waits_for_prior_grids
runtime.cache.waits_for_prior_grids = lambda target: False
models["plain"] = make(ModuleCache(use_disk=False))
runtime.cache.waits_for_prior_grids = real
wait, let = KernelBuilder.wait_for_prior_grids, KernelBuilder.let_dependents_launch
KernelBuilder.wait_for_prior_grids = lambda b: (wait(b), let(b))
KernelBuilder.let_dependents_launch = lambda b: None
runtime.cache._TEXTS.clear()
models["start"] = make(ModuleCache(use_disk=False))
KernelBuilder.wait_for_prior_grids, KernelBuilder.let_dependents_launch = wait, let
rng = np.random.default_rng(0)
ids = rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
losses = {name: [m.train_step(ids, ids, LR) for _ in range(3)] for name, m in models.items()}
print("losses equal:", all(v == losses["plain"] for v in losses.values()), losses["plain"][-1])
times = {k: [] for k in models}
for rep in range(4):
    for name, m in models.items():
        for _ in range(5):
            t0 = time.perf_counter(); m.train_step(ids, ids, LR); times[name].append(time.perf_counter() - t0)
for name, t in times.items():
    print(f"{name:6s} {B}x{S}: median {statistics.median(t)*1e3:.2f} ms  min {min(t)*1e3:.2f} ms  (n={len(t)})")
for m in models.values():
    m.close()
