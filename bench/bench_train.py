"""Training throughput (GPU machine): our CUDA model beside the same model in PyTorch eager.

    PYTHONPATH=$PWD python3 bench/bench_train.py [--json FILE] [--presets tiny qwen2-0.5b]

The PyTorch side is transformers' Qwen2ForCausalLM built from our config (SDPA attention, fused
AdamW), fp32 and bf16 autocast with fp32 master weights; ours is the CUDA backend in fp32 and with
bf16 GEMM operands (fp32 master weights), each beside torch in the same precision. Each figure is
the median step time over timed steps after warm-up; tokens/s = batch * seq / step time.
``--breakdown`` adds where our step's time goes, by kernel kind (each launch timed by events).
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
from model.precision import Precision
from runtime import Event, ModuleCache
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


def ours(name, config, batch, seq, ids, targets, reps, precision, breakdown):
    free0 = free_bytes()
    model = CudaBackend(config, init_params(config, seed=0), AdamWSettings(), cache=ModuleCache(),
                        precision=precision)
    try:
        dt = timed(lambda: model.train_step(ids, targets, 1e-4), 2, reps)  # each step ends in a download: synced
        used = free0 - free_bytes()
        if breakdown:
            print_breakdown(f"{name} {batch}x{seq} {precision.value}", model.step_launches(batch, seq))
        return dt, used
    finally:
        model.close()


def print_breakdown(title: str, launches: list) -> None:
    """Milliseconds per kernel kind over one step's launches, each between two events."""
    events = [Event() for _ in range(len(launches) + 1)]
    events[0].record()
    for launch, end in zip(launches, events[1:]):
        launch()
        end.record()
    totals: dict[str, float] = {}
    shapes: dict[tuple, list[float]] = {}  # (kind, grid) -> [ms, launches]
    for launch, start, end in zip(launches, events, events[1:]):
        kind, ms = launch.kernel.spec.kind, start.elapsed_ms(end)
        totals[kind] = totals.get(kind, 0.0) + ms
        entry = shapes.setdefault((kind, launch.grid), [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    for e in events:
        e.destroy()
    whole = sum(totals.values())
    print(f"\n== where the step goes: {title}, {len(launches)} launches, {whole:.2f} ms")
    for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<24} {ms:9.3f} ms {100 * ms / whole:6.1f}%")
    print("  the ten costliest (kind, grid) groups:")
    for (kind, grid), (ms, count) in sorted(shapes.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"    {kind:<22} grid {str(grid):<16} x{count:<4} {ms:9.3f} ms {100 * ms / whole:6.1f}%")


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
    ap.add_argument("--breakdown", action="store_true", help="time our step's launches by kernel kind")
    names = [p.value for p in Precision]
    ap.add_argument("--precisions", nargs="+", choices=names, default=names)
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
        for precision, label in ((Precision.FP32, "fp32"), (Precision.BF16, "bf16 autocast")):
            if precision.value not in ns.precisions:
                continue
            o_dt, o_mem = ours(name, config, batch, seq, ids, targets, ns.reps, precision, ns.breakdown)
            t_dt, t_mem = theirs(config, batch, seq, ids, ns.reps, precision is Precision.BF16)
            torch.cuda.empty_cache()  # the model and optimizer died with theirs()
            rows.append(dict(preset=name, batch=batch, seq=seq, ours=precision.value, torch=label,
                             ours_tokens_s=tokens / o_dt,
                             torch_tokens_s=tokens / t_dt, ratio=t_dt / o_dt, ours_peak_GiB=o_mem / 2**30,
                             torch_peak_GiB=t_mem / 2**30))
    print("\n== training step throughput: ours (CUDA) vs PyTorch eager (transformers Qwen2)")
    print(f"  {'preset':<12} {'batch x seq':>11} {'ours':>5} {'torch':>14} {'ours tok/s':>11} {'torch tok/s':>12} "
          f"{'ours/torch':>10} {'ours GiB':>9} {'torch GiB':>10}")
    for r in rows:
        print(f"  {r['preset']:<12} {r['batch']:>4} x {r['seq']:<4} {r['ours']:>5} {r['torch']:>14} "
              f"{r['ours_tokens_s']:11.0f} "
              f"{r['torch_tokens_s']:12.0f} {r['ratio']:9.2f}x {r['ours_peak_GiB']:9.2f} {r['torch_peak_GiB']:10.2f}")
    write_json(ns.json, {"rows": rows})


if __name__ == "__main__":
    main()
