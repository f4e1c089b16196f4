"""What bench_train.py runs and prints, apart from the measuring: the runs, model FLOPs and MFU, the
rows, the table and the command line. Neither torch nor a GPU is needed here (the CPU tests read it).

Model FLOPs per step are PaLM's estimate (Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu):
``tokens * (6 N + 12 L H Q T)``, N the parameters that take part in a matmul per token (all but the
input embedding table; a tied table counts once, as the LM head), L layers, H query heads of Q dims,
T the sequence length. The attention term counts the full T x T scores, not the causal half, as
PaLM does. MFU = model FLOPs per step / step time / the GPU's rated dense peak in the row's precision.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.config import PRESETS, ModelConfig
from model.params import param_shapes
from ptxgen.cmdline import Parser, UsageError

PRECISIONS = ("fp32", "bf16")
TORCH_PRECISION = {"fp32": "fp32", "bf16": "bf16 autocast"}  # what the torch side runs for each of ours


@dataclass(frozen=True)
class Run:
    preset: str
    batch: int
    seq: int
    precision: str  # ours: Precision's value; torch: TORCH_PRECISION of it

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def config(self) -> ModelConfig:
        return PRESETS[self.preset]


# (batch, seq) of each preset's default runs; qwen2-0.5b's two hold the same 8192 tokens, the second
# with twice the attention work
SHAPES = {"tiny": ((16, 256),), "qwen2-0.5b": ((8, 1024), (4, 2048))}

# Rated dense (no sparsity) TFLOP/s by the name the driver gives: (bf16 tensor cores, fp32 without
# tensor cores, which is what both sides' fp32 rows run: TF32 is off). H100 SXM and H200 SXM share them.
RATED_TFLOPS = {"NVIDIA H100 80GB HBM3": {"bf16": 989.0, "fp32": 67.0},
                "NVIDIA H200": {"bf16": 989.0, "fp32": 67.0}}

FLOPS = ("PaLM's model FLOPs (appendix B): tokens * (6 N + 12 L H Q T), N the matmul parameters (the input "
         "embedding table left out, a tied one counted once), attention over the full T x T scores")
COMPILE_TIME = ("torch.compile's warm-up wall time minus as many steady steps (its first compile of forward and "
                "backward; inductor's on-disk cache shortens it on a second run)")

SYSTEMS = {"ours": "ours", "eager": "torch eager", "compile": "torch.compile"}  # key -> label, in table order
PEERS = ("eager", "compile")


def matmul_params(config: ModelConfig) -> int:
    """N of the FLOPs estimate: every parameter but the input embedding table (a lookup, no matmul);
    with tied embeddings the table is the LM head's matrix and counts once."""
    total = sum(math.prod(shape) for shape in param_shapes(config).values())
    return total if config.tie_word_embeddings else total - config.vocab_size * config.hidden_size


def step_flops(config: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (forward and backward) on ``batch x seq`` tokens: PaLM's
    6 N + 12 L H Q T per token."""
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq
    return float(batch * seq * (6 * matmul_params(config) + attention))


def mfu(flops: float, step_s: float, peak_tflops: float) -> float:
    return flops / step_s / (peak_tflops * 1e12)


@dataclass
class Measured:
    """One system's figures for one run; ``error`` instead when it failed."""
    step_s: float | None = None     # median wall time of the timed steps (each ends synchronized)
    peak_bytes: int | None = None
    warmup_s: list[float] = field(default_factory=list)  # wall time of each warm-up step
    breakdown: dict | None = None   # ours, with --breakdown: one step's time by kernel kind
    error: str | None = None

    @property
    def compile_s(self) -> float | None:
        """The warm-up's wall time beyond as many steady steps: what compiling (and first-step
        allocation) cost. For torch.compile this is its compile time."""
        if self.step_s is None or not self.warmup_s:
            return None
        return sum(self.warmup_s) - len(self.warmup_s) * self.step_s


@dataclass
class Row:
    run: Run
    results: dict[str, Measured]  # SYSTEMS key -> figures, for the systems that ran

    @property
    def flops(self) -> float:
        return step_flops(self.run.config, self.run.batch, self.run.seq)

    def figures(self, system: str, peaks: dict[str, float] | None) -> dict:
        m = self.results[system]
        if m.step_s is None:
            return {"error": m.error}
        peak = peaks.get(self.run.precision) if peaks else None
        out = {"tokens_per_s": self.run.tokens / m.step_s, "ms_per_step": 1e3 * m.step_s,
               "mfu": mfu(self.flops, m.step_s, peak) if peak else None,
               "peak_bytes": m.peak_bytes, "peak_GiB": m.peak_bytes / 2**30,
               "warmup_step_s": m.warmup_s}
        if system == "compile":
            out["compile_s"] = m.compile_s
        if m.breakdown is not None:
            out["breakdown"] = m.breakdown
        return out

    def ratio(self, peer: str) -> dict | None:
        """Ours against a peer: tokens/s (the bar: >= 1.4 against torch.compile) and peak memory (<= 1)."""
        ours, theirs = self.results.get("ours"), self.results.get(peer)
        if ours is None or theirs is None or ours.step_s is None or theirs.step_s is None:
            return None
        return {"tokens_per_s": theirs.step_s / ours.step_s, "peak_memory": ours.peak_bytes / theirs.peak_bytes}

    def as_dict(self, peaks: dict[str, float] | None) -> dict:
        return {**asdict(self.run), "tokens": self.run.tokens, "torch_precision": TORCH_PRECISION[self.run.precision],
                "matmul_params": matmul_params(self.run.config), "model_flops_per_step": self.flops,
                **{system: self.figures(system, peaks) for system in self.results},
                **{f"ours_vs_{peer}": self.ratio(peer) for peer in PEERS if peer in self.results}}


def _cell(x: float | None, spec: str, width: int) -> str:
    """``x`` formatted, or a dash where there is no figure (MFU on an unknown GPU; compile s but for
    torch.compile)."""
    return format(x, f">{width}{spec}") if x is not None else f"{'-':>{width}}"


HEADER = (f"  {'preset':<12} {'batch x seq':>11}  {'prec':<4}  {'system':<14} {'tokens/s':>11} {'ms/step':>9} "
          f"{'MFU':>6} {'peak GiB':>9} {'compile s':>10}")


def table(rows: list[Row], peaks: dict[str, float] | None, device: str, reps: int) -> str:
    """The figures of every run, each system on its line, then ours / each peer."""
    rated = (", ".join(f"{peaks[p]:g} TFLOP/s {p}" for p in PRECISIONS) if peaks
             else "none known for this GPU, MFU left out")
    lines = [f"\n== training step: ours (CUDA) vs transformers' Qwen2 in torch eager and torch.compile "
             f"(default mode, dynamic=False) on {device}",
             f"  median of {reps} timed steps; MFU against the rated dense peak ({rated})", HEADER]
    for row in rows:
        r = row.run
        lead = f"  {r.preset:<12} {r.batch:>4} x {r.seq:<4}  {r.precision:<4}  "
        under = " " * len(lead)
        for system in row.results:
            f = row.figures(system, peaks)
            if "error" in f:
                body = f"failed: {f['error']}"
            else:
                body = (f"{f['tokens_per_s']:11,.0f} {f['ms_per_step']:9.2f} {_cell(f['mfu'], '.1%', 6)} "
                        f"{f['peak_GiB']:9.2f} {_cell(f.get('compile_s'), '.1f', 10)}")
            lines.append(f"{lead}{SYSTEMS[system]:<14} {body}".rstrip())
            lead = under
        for peer in PEERS:
            ratio = row.ratio(peer)
            if ratio is not None:
                lines.append(f"{under}ours / {SYSTEMS[peer]:<14} {ratio['tokens_per_s']:5.2f}x tokens/s, "
                             f"{ratio['peak_memory']:5.2f}x peak memory")
    lines.append(f"  model FLOPs per step, {FLOPS}:")
    lines += [f"    {r.run.preset} {r.run.batch} x {r.run.seq}: {r.flops / 1e12:.4g} TFLOP "
              f"(N = {matmul_params(r.run.config):,})" for r in unique_shapes(rows)]
    lines.append(f"  compile s: {COMPILE_TIME}")
    return "\n".join(lines)


def report(rows: list[Row], peaks: dict[str, float] | None, device: str, reps: int, warmup: dict[str, int],
           versions: dict[str, str]) -> dict:
    """The JSON: every figure of every row, and what they mean."""
    return {"device": device, "rated_peak_TFLOPs": peaks, "model_flops": FLOPS, "mfu": "model FLOPs per step / "
            "step time / rated_peak_TFLOPs of the row's precision", "compile_s": COMPILE_TIME,
            "step_time": f"median wall time of {reps} steps after warm-up, each ending synchronized",
            "warmup_steps": warmup, "versions": versions, "rows": [r.as_dict(peaks) for r in rows]}


def unique_shapes(rows: list[Row]) -> list[Row]:
    seen: dict[tuple, Row] = {}
    for row in rows:
        seen.setdefault((row.run.preset, row.run.batch, row.run.seq), row)
    return list(seen.values())


# Ops' GEMM labels: module and pass, then what its epilogue also does ("forward + RoPE"), counted as the pass
_GEMM_WHAT = re.compile(r"^gemm\S* (\S+ (?:forward|dX|dW))(?: \+ [^>]*)? -> ")
_LAYER = re.compile(r"^model\.layers\.\d+\.")


def gemm_role(label: str) -> str | None:
    """A GEMM launch's module and pass with the layer left out ("mlp.down_proj dW"), or None."""
    m = _GEMM_WHAT.match(label)
    return _LAYER.sub("", m[1]) if m else None


def breakdown(launches: list[tuple[str, tuple, float, str]], top: int = 10) -> dict:
    """Our step's launches, (kernel kind, grid, ms, label) each, summed by kind, by (kind, grid) and,
    for the GEMMs, by module and pass over the layers."""
    kinds: dict[str, float] = {}
    groups: dict[tuple[str, tuple], list] = {}
    roles: dict[str, list] = {}
    for kind, grid, ms, label in launches:
        kinds[kind] = kinds.get(kind, 0.0) + ms
        group = groups.setdefault((kind, tuple(grid)), [0.0, 0])
        group[0] += ms
        group[1] += 1
        if (role := gemm_role(label)) is not None:
            r = roles.setdefault(role, [0.0, 0])
            r[0] += ms
            r[1] += 1
    costliest = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"launches": len(launches), "ms": sum(kinds.values()),
            "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "costliest_groups": [{"kind": kind, "grid": list(grid), "launches": n, "ms": ms}
                                 for (kind, grid), (ms, n) in costliest],
            "gemms": [{"what": role, "launches": n, "ms": ms}
                      for role, (ms, n) in sorted(roles.items(), key=lambda kv: -kv[1][0])]}


def format_breakdown(title: str, b: dict) -> str:
    whole = b["ms"] or 1.0  # an empty plan prints zeros rather than dividing by zero
    lines = [f"\n== where the step goes: {title}, {b['launches']} launches, {b['ms']:.2f} ms"]
    lines += [f"  {kind:<24} {ms:9.3f} ms {100 * ms / whole:6.1f}%" for kind, ms in b["by_kind_ms"].items()]
    lines.append(f"  the {len(b['costliest_groups'])} costliest (kind, grid) groups:")
    lines += [f"    {g['kind']:<22} grid {str(tuple(g['grid'])):<16} x{g['launches']:<4} {g['ms']:9.3f} ms "
              f"{100 * g['ms'] / whole:6.1f}%" for g in b["costliest_groups"]]
    if b.get("gemms"):
        lines.append("  the GEMMs by module and pass, over the layers:")
        lines += [f"    {g['what']:<32} x{g['launches']:<4} {g['ms']:9.3f} ms {100 * g['ms'] / whole:6.1f}%"
                  for g in b["gemms"]]
    if "host_ms" in b:
        lines.append(f"  host time to issue the step: {b['host_ms']['launched']:.2f} ms launch by launch, "
                     f"{b['host_ms']['graph']:.2f} ms as one CUDA graph (values set, one replay)")
    return "\n".join(lines)


# -- the command line ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    runs: tuple[Run, ...]
    peers: tuple[str, ...]
    reps: int
    breakdown: bool
    json: Path | None
    gpus: list[int] = field(default_factory=list)  # data-parallel GPU counts (empty: none)


SHAPE = re.compile(r"(?P<preset>[^:]+)(?::(?P<batch>[0-9]+)x(?P<seq>[0-9]+))?")


def runs_of(shapes: list[str], precisions: list[str]) -> tuple[Run, ...]:
    """Each of ``shapes`` (``PRESET``: its SHAPES; ``PRESET:BATCHxSEQ``: that one) in each of
    ``precisions``; repeats run once."""
    runs: list[Run] = []
    for text in shapes:
        m = SHAPE.fullmatch(text)
        if m is None:
            raise UsageError(f"--shapes {text!r}: expected PRESET or PRESET:BATCHxSEQ (e.g. qwen2-0.5b:4x2048)")
        name = m["preset"]
        if name not in PRESETS:
            raise UsageError(f"--shapes {text!r}: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        if m["batch"] is None and name not in SHAPES:
            raise UsageError(f"--shapes {text!r}: {name} has no default shape; name one, e.g. {name}:8x256")
        for batch, seq in SHAPES[name] if m["batch"] is None else [(int(m["batch"]), int(m["seq"]))]:
            if batch < 1 or seq < 1:
                raise UsageError(f"--shapes {text!r}: batch and seq must be positive")
            if seq > PRESETS[name].max_position_embeddings:
                raise UsageError(f"--shapes {text!r}: seq {seq} is past {name}'s max_position_embeddings "
                                 f"{PRESETS[name].max_position_embeddings}")
            runs += [r for r in (Run(name, batch, seq, p) for p in PRECISIONS if p in precisions) if r not in runs]
    return tuple(runs)


def parse_args(argv: list[str] | None = None) -> Options:
    ap = Parser(prog="bench_train.py", description="Training steps per second: ours beside transformers' "
                "Qwen2 in torch eager and under torch.compile, in one process.")
    ap.add_argument("--shapes", "--presets", nargs="+", default=list(SHAPES),
                    metavar="PRESET[:BATCHxSEQ]",
                    help="a preset alone runs its default shapes (tiny 16x256; qwen2-0.5b 8x1024 and 4x2048), "
                         "PRESET:BATCHxSEQ that shape; each in every --precisions")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--peers", nargs="+", choices=(*PEERS, "none"), default=list(PEERS),
                    help="the torch runs beside ours (default: both; none: ours alone, as for an A/B of our code)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per system (the median is reported)")
    ap.add_argument("--breakdown", action="store_true", help="time our step's launches by kernel kind")
    ap.add_argument("--json", type=Path, help="every figure, rewritten after each run")
    ap.add_argument("--gpus", type=int, nargs="+", default=None, metavar="N",
                    help="also our step data-parallel on each N GPUs of this host (batch per GPU), with the "
                         "speed-up over one GPU (bench/data_parallel.py)")
    ns = ap.parse_args(argv)
    if ns.reps < 1:
        raise UsageError(f"--reps must be at least 1, got {ns.reps}")
    if ns.gpus is not None and any(n < 1 for n in ns.gpus):
        raise UsageError(f"--gpus counts must be at least 1, got {' '.join(map(str, ns.gpus))}")
    if ns.json is not None and (ns.json.is_dir() or not ns.json.absolute().parent.is_dir()):
        raise UsageError(f"--json {ns.json}: not a file in an existing directory")
    if "none" in ns.peers and len(ns.peers) > 1:
        raise UsageError(f"--peers none runs ours alone; it takes no other peer, got {' '.join(ns.peers)}")
    peers = tuple(p for p in PEERS if p in ns.peers)
    gpus = sorted(set(ns.gpus) | {1}) if ns.gpus else []  # the speed-up is over one GPU measured alike
    return Options(runs_of(ns.shapes, ns.precisions), peers, ns.reps, ns.breakdown, ns.json, gpus)
