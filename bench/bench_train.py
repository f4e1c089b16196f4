"""Training throughput (GPU machine): our CUDA model beside the same model in torch eager and under
torch.compile, in one process.

    PYTHONPATH=$PWD python3 bench/bench_train.py [--shapes PRESET[:BATCHxSEQ] ...] [--precisions fp32 bf16]
        [--peers eager compile | --peers none] [--reps N] [--breakdown] [--gpus N ...] [--json FILE]

By default: tiny at 16 x 256, qwen2-0.5b at 8 x 1024 and at 4 x 2048, each in fp32 and bf16
(about five minutes on an H200 by its parts' measured times, most of it torch.compile compiling:
40-52 s for each qwen2-0.5b run). The torch side is
transformers' Qwen2ForCausalLM built from our config (no download), SDPA attention, fused AdamW with
our optimizer's betas, eps and weight decay, gradient clipping at 1.0; in fp32 with TF32 off, and in
bf16 autocast with fp32 master weights. torch.compile is its default mode with dynamic=False (the
shape is fixed), wrapping the model (forward and backward; the fused optimizer runs as it is). Ours
is the CUDA backend as training runs it (each step as CUDA graphs), in fp32 and with bf16 GEMM
operands (fp32 master weights).

Figures, per system: the median wall time of ``--reps`` steps after a warm-up (each step ends
synchronized), tokens/s = batch * seq / that time, MFU = PaLM's model FLOPs per step (6 N + 12 L H Q T
per token; train_report.py says exactly) / step time / the GPU's rated dense peak: 989 TFLOP/s bf16
and 67 TFLOP/s fp32 (no tensor cores; TF32 is off on both sides) for H100 / H200 SXM, no MFU on
another GPU. torch.compile's compile time is stated apart: the wall time of its warm-up steps minus
as many steady steps. Peak memory: torch.cuda.max_memory_allocated after reset_peak_memory_stats,
per system and run (model, optimizer and compiled code freed between runs); for ours, the device
memory the backend holds (free memory before construction minus free memory after the steps).
``--gpus 2`` (or ``1 2 4 8``) adds our step data-parallel on that many GPUs of this host, the batch
given per GPU, with the speed-up over one GPU measured alike (bench/data_parallel.py says how).
``--breakdown`` adds where our step's time goes, by kernel kind (each launch timed by events), and the
host's time to issue the step: every launch one by one, or one replay of the step's CUDA graph.
"""
from __future__ import annotations

import functools
import gc
import statistics
import sys
import time
import traceback
from typing import Callable

import numpy as np
import torch
import transformers

from data_parallel import format_scaling, scaling
from harness import free_bytes, write_json
from model.config import preset
from model.cuda_model import CudaBackend
from model.optim import AdamWSettings
from model.params import init_params
from model.precision import Precision
from runtime import Event, ModuleCache
from runtime.driver import synchronize
from train_report import (RATED_TFLOPS, SYSTEMS, TORCH_PRECISION, Measured, Options, Row, Run, UsageError,
                          breakdown, format_breakdown, parse_args, report, table)

WARMUP = {"ours": 2, "eager": 2, "compile": 3}  # steps before timing; compile: the first compiles
LR = 1e-4


def timed(step: Callable[[], object], warmup: int, reps: int) -> Measured:
    """Wall seconds of each warm-up step and the median of ``reps`` steps after them; ``step`` ends
    synchronized."""
    def wall() -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0
    warm = [wall() for _ in range(warmup)]
    return Measured(step_s=statistics.median([wall() for _ in range(reps)]), warmup_s=warm)


@functools.lru_cache(maxsize=1)
def initial_params(name: str) -> dict[str, np.ndarray]:
    """Our initial weights for a preset, drawn once for its runs (qwen2-0.5b's take about 9 s)."""
    return init_params(preset(name), seed=0)


def ours(run: Run, ids: np.ndarray, targets: np.ndarray, reps: int, profile: bool) -> Measured:
    free0 = free_bytes()
    model = CudaBackend(run.config, initial_params(run.preset), AdamWSettings(), cache=ModuleCache(),
                        precision=Precision(run.precision))
    try:
        m = timed(lambda: model.train_step(ids, targets, LR), WARMUP["ours"], reps)  # each step ends in a download
        m.peak_bytes = free0 - free_bytes()
        if profile:
            m.breakdown = launch_times(model.step_launches(run.batch, run.seq))
            m.breakdown["host_ms"] = host_times(model.plan(run.batch, run.seq), model.step + 1)
        return m
    finally:
        model.close()


def host_times(plan, step: int, reps: int = 10) -> dict[str, float]:
    """The host's milliseconds to issue one training step from its plan (the per-step values set,
    as they change each step, then every launch, or the graphs' replays, and the host step between
    them, which runs while the GPU runs the forward), the GPU idle before each: median of ``reps``."""
    a = AdamWSettings()
    out = {}
    for how, graph in (("launched", False), ("graph", True)):
        times = []
        for rep in range(reps):
            synchronize()
            t0 = time.perf_counter()
            plan.set(lr=LR * (1 + rep) / reps, bias_correction1=1.0 - a.beta1 ** (step + rep),
                     bias_correction2=1.0 - a.beta2 ** (step + rep))
            plan.run(graph=graph)
            times.append(1e3 * (time.perf_counter() - t0))
        synchronize()
        out[how] = statistics.median(times)
    return out


def launch_times(launches: list) -> dict:
    """One step's launches (the plan's steps: kernels and fills), each between two events, summed by
    kind (and the GEMMs by module and pass)."""
    events = [Event() for _ in range(len(launches) + 1)]
    try:
        events[0].record()
        for launch, end in zip(launches, events[1:]):
            launch()
            end.record()
        return breakdown([(launch.kind, launch.grid, start.elapsed_ms(end), launch.label)
                          for launch, start, end in zip(launches, events, events[1:])])
    finally:
        for e in events:
            e.destroy()


def torch_model(run: Run) -> torch.nn.Module:
    """transformers' model for our config, built on the GPU from the config alone, with SDPA attention."""
    hf = run.config.to_hf()
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if model.config._attn_implementation != "sdpa":  # a silent fallback would time other attention
        raise RuntimeError(f"transformers chose {model.config._attn_implementation!r} attention, not sdpa")
    return model.to("cuda", torch.float32).train()


def theirs(run: Run, ids: np.ndarray, reps: int, compiled: bool) -> Measured:
    model = torch_model(run)
    a = AdamWSettings()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(a.beta1, a.beta2), eps=a.eps,
                            weight_decay=a.weight_decay, fused=True)
    forward = torch.compile(model, dynamic=False) if compiled else model
    x = torch.tensor(ids, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.precision == "bf16"):
            loss = forward(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    m = timed(step, WARMUP["compile" if compiled else "eager"], reps)
    m.peak_bytes = torch.cuda.max_memory_allocated()
    return m


def measure(what: str, run: Run, fn: Callable[[], Measured]) -> Measured:
    """``fn``'s figures, or the failure (traceback on stderr, one line in the table) so that the other
    runs still go ahead; the memory of what it built is handed back either way."""
    try:
        m = fn()
        # (peak memory here too: a run cut short before the table still has it)
        peak = f"peak {m.peak_bytes / 2**30:.2f} GiB  " if m.peak_bytes is not None else ""
        print(f"  {SYSTEMS[what]:<14} {run.tokens / m.step_s:12,.0f} tokens/s  {1e3 * m.step_s:9.2f} ms  {peak}"
              f"warm-up {', '.join(f'{s:.2f}' for s in m.warmup_s)} s", flush=True)
    except Exception as e:  # noqa: BLE001 -- one failed system must not lose the run's other figures
        traceback.print_exc()
        m = Measured(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120])
    gc.collect()
    torch._dynamo.reset()  # drops compiled graphs (and what they hold) before the next run
    torch.cuda.empty_cache()
    return m


def main(argv: list[str] | None = None) -> int:
    try:
        opts: Options = parse_args(argv)
    except UsageError as e:
        print(f"bench_train.py: error: {e}", file=sys.stderr)
        return 2
    if opts.gpus and max(opts.gpus) > torch.cuda.device_count():
        print(f"bench_train.py: error: --gpus {max(opts.gpus)}: {torch.cuda.device_count()} GPUs visible",
              file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("highest")  # fp32 rows: no TF32 on the torch side either
    device = torch.cuda.get_device_name(0)
    peaks = RATED_TFLOPS.get(device)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    rows: list[Row] = []
    scaled: dict[str, list[dict]] = {}
    for run in opts.runs:
        print(f"\n{run.preset} {run.batch} x {run.seq}: ours {run.precision}, torch "
              f"{TORCH_PRECISION[run.precision]}", flush=True)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, run.config.vocab_size, (run.batch, run.seq))
        targets = np.roll(ids, -1, axis=1)
        row = Row(run, {"ours": measure("ours", run, lambda: ours(run, ids, targets, opts.reps, opts.breakdown))})
        if row.results["ours"].breakdown:
            print(format_breakdown(f"{run.preset} {run.batch}x{run.seq} {run.precision}",
                                   row.results["ours"].breakdown))
        for peer in opts.peers:
            row.results[peer] = measure(peer, run, lambda: theirs(run, ids, opts.reps, peer == "compile"))
        rows.append(row)
        if opts.gpus:  # (each GPU count in processes of its own; this one holds nothing of ours by now)
            scaled[f"{run.preset} {run.batch}x{run.seq} {run.precision}"] = rows_of = scaling(
                run.preset, run.batch, run.seq, run.precision, opts.gpus, opts.reps)
            print(format_scaling(f"{run.preset} {run.precision}, {run.batch} x {run.seq} per GPU", rows_of),
                  flush=True)
        write_json(opts.json, {**report(rows, peaks, device, opts.reps, WARMUP, versions), "scaling": scaled})
    print(table(rows, peaks, device, opts.reps))
    failed = [f"{r.run.preset} {r.run.batch}x{r.run.seq} {r.run.precision} {SYSTEMS[s]}"
              for r in rows for s, m in r.results.items() if m.error]
    failed += [f"{what} on {r['gpus']} GPUs" for what, rs in scaled.items() for r in rs if "error" in r]
    if failed:
        print(f"bench_train.py: {len(failed)} failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
