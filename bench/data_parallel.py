"""Data-parallel scaling of our training step: ``bench_train.py --gpus 1 2 ...`` (GPU machine).

For each GPU count N, N processes (``model.parallel.spawn``: torchrun's variables, NVLS off) each
run this file as a rank: its GPU pinned, the step of one GPU (N = 1: ``CudaBackend``) or a rank of
ZeRO-1 over NCCL (``ZeroCudaRank``), on a global batch of N x the per-GPU batch; a warm-up, then
``reps`` timed steps (each ends with the loss downloaded, so synchronized). Each rank writes its
figures to a JSON file; the parent reads them: the step time (the slowest rank's median), tokens/s
on the global batch, the speed-up over one GPU measured in the same sitting and its efficiency
(speed-up / N), the time the step waited for its overlapped collectives (``comm_wait_ms``: the
lookup-gradient rows at the backward's end, the gradient reduce-scatters before the optimizer;
median; 0 when they finished first), and the peak device memory per GPU (free
memory before the rank's backend minus after the steps; the largest rank's).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 2


def scaling(preset_name: str, batch: int, seq: int, precision: str, gpus: list[int], reps: int) -> list[dict]:
    """One row per GPU count (or its error), each measured by its own N processes."""
    from model.parallel.spawn import spawn_ranks

    rows = []
    for world in gpus:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, __file__, preset_name, str(batch), str(seq), precision, str(reps), tmp]
            code = spawn_ranks(world, command, os.environ)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        if code or len(ranks) != world:
            rows.append({"gpus": world, "error": f"the ranks exited with code {code}"})
            continue
        step_s = max(r["step_s"] for r in ranks)
        waits = [r["wait_ms"] for r in ranks if r["wait_ms"] is not None]
        rows.append({"gpus": world, "global_batch": batch * world, "step_s": step_s,
                     "tokens_per_s": batch * world * seq / step_s, "peak_bytes": max(r["peak_bytes"] for r in ranks),
                     "wait_ms": max(waits) if waits else None})
    return with_speedups(rows)


def with_speedups(rows: list[dict]) -> list[dict]:
    """Each measured row's speed-up over the one-GPU row (tokens/s) and its efficiency (speed-up
    / GPUs); none where one GPU was not measured."""
    base = next((r for r in rows if r["gpus"] == 1 and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["efficiency"] = r["speedup"] / r["gpus"]
    return rows


def format_scaling(title: str, rows: list[dict]) -> str:
    lines = [f"== data-parallel scaling: {title} (ZeRO-1 over NCCL, NVLS off)",
             f"  {'GPUs':>4}  {'global batch':>12}  {'tokens/s':>10}  {'per GPU':>9}  {'vs 1 GPU':>8}  "
             f"{'efficiency':>10}  {'ms/step':>8}  {'comm wait ms':>12}  {'peak GiB/GPU':>12}"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['gpus']:>4}  failed: {r['error']}")
            continue
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        efficiency = f"{100 * r['efficiency']:.1f}%" if "efficiency" in r else "-"
        wait = f"{r['wait_ms']:.2f}" if r["wait_ms"] is not None else "-"
        lines.append(f"  {r['gpus']:>4}  {r['global_batch']:>12}  {r['tokens_per_s']:>10,.0f}  "
                     f"{r['tokens_per_s'] / r['gpus']:>9,.0f}  {speedup:>8}  {efficiency:>10}  "
                     f"{1e3 * r['step_s']:>8.2f}  {wait:>12}  {r['peak_bytes'] / 2**30:>12.2f}")
    return "\n".join(lines)


def rank_main(preset_name: str, batch: int, seq: int, precision: str, reps: int, out: Path) -> None:
    """One rank: its GPU pinned before CUDA starts, then the timed steps; figures to ``out``."""
    from model.parallel.launch import from_environ

    env = from_environ(os.environ)
    env.pin_gpu(os.environ)
    import numpy as np

    from model.config import preset
    from model.cuda_model import CudaBackend
    from model.optim import AdamWSettings
    from model.params import init_params
    from model.precision import Precision
    from harness import free_bytes  # (after the pin: it imports the runtime)

    config = preset(preset_name)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (batch * env.world, seq))
    targets = np.roll(ids, -1, axis=1)
    params, settings = init_params(config, seed=0), dict(precision=Precision(precision))
    free0, comm = free_bytes(), None
    if env.world == 1:
        model = CudaBackend(config, params, AdamWSettings(), **settings)
    else:
        from model.parallel.nccl import NcclCommunicator
        from model.parallel.zero_cuda import ZeroCudaRank
        comm = NcclCommunicator(env)
        model = ZeroCudaRank(comm, config, params, AdamWSettings(), **settings)
    del params
    times, waits = [], []
    for i in range(WARMUP + reps):
        t0 = time.perf_counter()
        model.train_step(ids, targets, 1e-4)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
            waits.append(model.comm_wait_ms() if comm is not None else None)
    figures = {"rank": env.rank, "step_s": statistics.median(times), "peak_bytes": free0 - free_bytes(),
               "wait_ms": statistics.median(waits) if comm is not None else None}
    (out / f"rank{env.rank}.json").write_text(json.dumps(figures))
    model.close()
    if comm is not None:
        comm.close()


if __name__ == "__main__":
    name, b, s, p, r, where = sys.argv[1:]
    rank_main(name, int(b), int(s), p, int(r), Path(where))
