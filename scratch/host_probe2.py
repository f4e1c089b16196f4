"""train_step's wall time against its GPU time (events around the plan's run): the host's share."""
import statistics, sys, time
import numpy as np
sys.path.insert(0, "bench")
import bench_train
from model.config import preset
from model.cuda_model import CudaBackend
from model.optim import AdamWSettings
from model.precision import Precision
from runtime import Event, ModuleCache

b, s = (int(x) for x in (sys.argv[1:] or ["8", "1024"]))
cfg = preset("qwen2-0.5b")
model = CudaBackend(cfg, bench_train.initial_params("qwen2-0.5b"), AdamWSettings(), cache=ModuleCache(),
                    precision=Precision.BF16)
rng = np.random.default_rng(0)
ids = rng.integers(0, cfg.vocab_size, (b, s)); targets = np.roll(ids, -1, axis=1)
e0, e1 = Event(), Event()
run = model._run
def timed_run(*a, **k):
    e0.record(); run(*a, **k); e1.record()
model._run = timed_run
for _ in range(3):
    model.train_step(ids, targets, 1e-4)
wall, gpu = [], []
for _ in range(10):
    t0 = time.perf_counter(); model.train_step(ids, targets, 1e-4); wall.append(1e3 * (time.perf_counter() - t0))
    gpu.append(e0.elapsed_ms(e1))
print(f"{b}x{s}: train_step wall median {statistics.median(wall):.3f} ms, GPU (first launch to last) "
      f"{statistics.median(gpu):.3f} ms, host-only {statistics.median(w - g for w, g in zip(wall, gpu)):.3f} ms")
