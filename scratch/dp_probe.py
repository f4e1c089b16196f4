"""Scratch: 2-GPU ZeRO step timing under knobs (not committed)."""
import json, os, statistics, sys, time
from pathlib import Path

def rank(cfg, out):
    from model.parallel.launch import from_environ
    env = from_environ(os.environ); env.pin_gpu(os.environ)
    import numpy as np
    from model.config import preset
    from model.optim import AdamWSettings
    from model.params import init_params
    from model.precision import Precision
    from model.parallel.nccl import NcclCommunicator
    from model.parallel.zero_cuda import ZeroCudaRank
    from runtime.driver import call
    from runtime.memory import Stream, Event
    import cuda.bindings.driver as cu
    config = preset("qwen2-0.5b"); B, S = 8, 1024
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (B * env.world, S)); targets = np.roll(ids, -1, axis=1)
    comm = NcclCommunicator(env)
    if cfg.get("prio"):
        lo, hi = call("cuCtxGetStreamPriorityRange")
        comm._side = Stream(call("cuStreamCreateWithPriority", cu.CUstream_flags.CU_STREAM_NON_BLOCKING, hi))
    if cfg.get("skip_gather"):
        comm.all_gather_overlapped = lambda s, r, done: done.record(comm._side)
    if cfg.get("skip_rs"):
        comm.reduce_scatter_overlapped = lambda s, r: None
    kw = {"bucket_elems": cfg["bucket"]} if "bucket" in cfg else {}
    end = Event()
    class Probe(ZeroCudaRank):
        def _optimizer(self, ops, plan):
            super()._optimizer(ops, plan)
            plan.host(lambda: end.record(comm._stream_obj), label="probe end")
    model = Probe(comm, config, init_params(config, seed=0), AdamWSettings(), precision=Precision("bf16"), **kw)
    times, waits, tails = [], [], []
    for i in range(2 + 6):
        t0 = time.perf_counter(); model.train_step(ids, targets, 1e-4); dt = time.perf_counter() - t0
        if i >= 2:
            times.append(dt); waits.append(model.comm_wait_ms()); tails.append(model._waits[-1][0].elapsed_ms(end))
    (out / f"rank{env.rank}.json").write_text(json.dumps({"ms": 1e3 * statistics.median(times),
        "wait": statistics.median(waits), "tail": statistics.median(tails)}))
    model.close(); comm.close()

if __name__ == "__main__":
    if sys.argv[1] == "rank":
        rank(json.loads(sys.argv[2]), Path(sys.argv[3])); sys.exit(0)
    import tempfile
    from model.parallel.spawn import spawn_ranks
    for c in sys.argv[1:]:
        cfg = json.loads(c)
        envs = {**os.environ, **cfg.get("env", {})}
        with tempfile.TemporaryDirectory() as tmp:
            code = spawn_ranks(cfg.get("world", 2), [sys.executable, __file__, "rank", c, tmp], envs)
            rs = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        print(c, "code", code, " ".join(f"r{i}: {r['ms']:.2f} ms wait {r['wait']:.2f} tail(backward end->step end) {r['tail']:.2f}" for i, r in enumerate(rs)), flush=True)
