"""Where a training step's wall time goes on the host side: qwen2-0.5b bf16 8x1024 (GPU idle gaps)."""
import statistics, sys, time
import numpy as np
sys.path.insert(0, "bench")
import bench_train
from model.config import preset
from model.cuda_model import CudaBackend
from model.optim import AdamWSettings
from model.precision import Precision
from model.cuda_model import embedding_backward_plan
from runtime import Event, ModuleCache
from runtime.driver import synchronize

b, s = (int(x) for x in (sys.argv[1:] or ["8", "1024"]))
cfg = preset("qwen2-0.5b")
model = CudaBackend(cfg, bench_train.initial_params("qwen2-0.5b"), AdamWSettings(), cache=ModuleCache(),
                    precision=Precision.BF16)
rng = np.random.default_rng(0)
ids = rng.integers(0, cfg.vocab_size, (b, s)); targets = np.roll(ids, -1, axis=1)
for _ in range(3):
    model.train_step(ids, targets, 1e-4)
T = {k: [] for k in ("wall", "prepare", "embplan", "set", "launch", "sync", "read", "gpu")}
e0, e1 = Event(), Event()
for _ in range(10):
    synchronize()
    t0 = time.perf_counter(); model.train_step(ids, targets, 1e-4); T["wall"].append(time.perf_counter() - t0)
    t0 = time.perf_counter(); shape = model._prepare(ids, targets); t1 = time.perf_counter()
    embedding_backward_plan(ids.astype(np.int32).reshape(-1)); t2 = time.perf_counter()
    shape.plan.set(lr=1e-4, bias_correction1=0.5, bias_correction2=0.5); t3 = time.perf_counter()
    e0.record(); shape.plan.run(graph=True); e1.record(); t4 = time.perf_counter()
    synchronize(); t5 = time.perf_counter()
    model._mean_loss(shape, targets); float(model.norm_out.to_numpy()[0]); t6 = time.perf_counter()
    for k, v in zip(("prepare", "embplan", "set", "launch", "sync", "read"), (t1-t0, t2-t1, t3-t2, t4-t3, t5-t4, t6-t5)):
        T[k].append(v)
    T["gpu"].append(e0.elapsed_ms(e1) / 1e3)
for k, v in T.items():
    print(f"{k:8s} median {1e3*statistics.median(v):8.3f} ms  min {1e3*min(v):8.3f}")
