"""Probe: every launch of the qwen2-0.5b 8x1024 bf16 training step timed alone (events, min of N
passes), printed in order for one layer and summed by label pattern."""
import re, sys, collections
import numpy as np
sys.path.insert(0, "bench")
from bench_train import initial_params, LR
from model.cuda_model import CudaBackend
from model.optim import AdamWSettings
from model.precision import Precision
from model.config import preset
from runtime import ModuleCache
from runtime.memory import Event

B, S = 8, 1024
cfg = preset("qwen2-0.5b")
model = CudaBackend(cfg, initial_params("qwen2-0.5b"), AdamWSettings(), cache=ModuleCache(), precision=Precision.BF16)
rng = np.random.default_rng(0)
ids = rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
for _ in range(3):
    model.train_step(ids, ids, LR)
launches = model.step_launches(B, S)
best = [float("inf")] * len(launches)
for rep in range(5):
    ev = [Event() for _ in range(len(launches) + 1)]
    ev[0].record()
    for l, e in zip(launches, ev[1:]):
        l(); e.record()
    ev[-1].synchronize()
    for i in range(len(launches)):
        best[i] = min(best[i], ev[i].elapsed_ms(ev[i + 1]))
    for e in ev: e.destroy()
print(f"{len(launches)} launches, sum of per-launch minima {sum(best):.3f} ms")
for l, t in zip(launches, best):
    if ".layers.5." in l.label or "layers" not in l.label and not re.search(r"\.\d+\.", l.label):
        print(f"  {t*1e3:8.1f} us  {l.kind:24s} {tuple(l.grid)}  {l.label}")
groups = collections.defaultdict(lambda: [0.0, 0])
for l, t in zip(launches, best):
    key = re.sub(r"layers\.\d+\.", "", l.label)
    key = re.sub(r"(\S*)\.\d+\b", r"\1.N", key)
    groups[key][0] += t; groups[key][1] += 1
print("by label:")
for k, (t, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
    print(f"  {t:8.3f} ms x{n:<4} {k}")
model.close()
