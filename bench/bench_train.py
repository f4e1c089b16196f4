"""Training throughput (GPU machine): our CUDA model beside the same model in PyTorch eager.

    PYTHONPATH=$PWD python3 bench/bench_train.py [--json FILE] [--presets tiny qwen2-0.5b]

The PyTorch side is transformers' Qwen2ForCausalLM built from our config (SDPA attention, fused
AdamW), fp32 and bf16 autocast with fp32 master weights; ours is the fp32 CUDA backend. Each
figure is the median step time over timed steps after warm-up; tokens/s = batch * seq / step time.
Peak memory: torch.cuda.max_memory_allocated for torch; for ours, the device memory the backend
holds (free memory before construction minus free memory after the steps).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from harness import write_json
from model.config import preset
from model.cuda_model import CudaBackend
from model.optim import AdamWSettings
from model.params import init_params
from runtime import ModuleCache
from runtime.driver import call, synchronize

SHAPES = {"tiny": (16, 256), "qwen2-0.5b": (8, 1024)}  # (batch, seq)


def timed(step, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_bytes() -> int:
    synchronize()
    free, _total = call("cuMemGetInfo")
    return int(free)


def ours(config, batch, seq, ids, targets, reps):
    free0 = free_bytes()
    model = CudaBackend(config, init_params(config, seed=0), AdamWSettings(), cache=ModuleCache())
    try:
        dt = timed(lambda: model.train_step(ids, targets, 1e-4), 2, reps)  # each step ends in a download: synced
        return dt, free0 - free_bytes()
    finally:
        model.close()


def theirs(config, batch, seq, ids, reps, bf16: bool):
    import transformers
    hf = transformers.Qwen2Config(**{k: v for k, v in config.to_hf().items() if not k.startswith("ptxgen")})
    model = transformers.Qwen2ForCausalLM(hf).cuda().float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.tensor(ids, device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return timed(step, 2, reps), torch.cuda.max_memory_allocated()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--presets", nargs="+", default=list(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    ns = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name in ns.presets:
        config = preset(name)
        batch, seq = SHAPES[name]
        rng = np.random.default_rng(0)
        ids = rng.integers(0, config.vocab_size, (batch, seq))
        targets = np.roll(ids, -1, axis=1)
        tokens = batch * seq
        o_dt, o_mem = ours(config, batch, seq, ids, targets, ns.reps)
        for label, bf16 in (("fp32", False), ("bf16 autocast", True)):
            t_dt, t_mem = theirs(config, batch, seq, ids, ns.reps, bf16)
            torch.cuda.empty_cache()  # the model and optimizer died with theirs()
            rows.append(dict(preset=name, batch=batch, seq=seq, torch=label, ours_tokens_s=tokens / o_dt,
                             torch_tokens_s=tokens / t_dt, ratio=t_dt / o_dt, ours_peak_GiB=o_mem / 2**30,
                             torch_peak_GiB=t_mem / 2**30))
    print("\n== training step throughput: ours (fp32 CUDA) vs PyTorch eager (transformers Qwen2)")
    print(f"  {'preset':<12} {'batch x seq':>11} {'torch':>14} {'ours tok/s':>11} {'torch tok/s':>12} "
          f"{'ours/torch':>10} {'ours GiB':>9} {'torch GiB':>10}")
    for r in rows:
        print(f"  {r['preset']:<12} {r['batch']:>4} x {r['seq']:<4} {r['torch']:>14} {r['ours_tokens_s']:11.0f} "
              f"{r['torch_tokens_s']:12.0f} {r['ratio']:9.2f}x {r['ours_peak_GiB']:9.2f} {r['torch_peak_GiB']:10.2f}")
    write_json(ns.json, {"rows": rows})


if __name__ == "__main__":
    main()
