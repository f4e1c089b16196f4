"""`ptxgen train | generate`, and every generator command of ``ptxgen.cli``.

The console script lands here (through ``model.console``) so that the generator (``ptxgen``) never
imports the model; the generator's own commands are passed through unchanged. Bad input prints one
line and exits 2.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m model.cli (torchrun, srun, the ranks of --gpus N): as the console script,
    from model.console import main as console_main  # whose Ctrl-C handler holds during the imports below too

    sys.exit(console_main())

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import typing
from pathlib import Path
from typing import Callable, Iterator, Mapping, MutableMapping, Sequence

import numpy as np

from ptxgen import cli as ptxgen_cli
from ptxgen.cmdline import Parser, UsageError, print_error, silence_stdout
from ptxgen.files import read_file, why, write_atomic
from ptxgen.spec import SpecError, sha256_hex
from runtime.driver import CudaError

from . import rundir
from .checkpoint import (LATEST, STEP_DIR, Checkpoint, CheckpointError, load_checkpoint, manifest_digests,
                         read_latest, resolve, step_of)
from .config import PRESETS, ConfigError, ModelConfig, preset, read_json
from .console import INTERRUPTED
from .data import (ByteTokenizer, Corpus, DataError, HFTokenizer, Tokenizer, expand_paths, read_tokenizer_files,
                   stdlib_files, val_batch_count, val_batches)
from .defaults import default_run
from .footprint import MemoryTooSmall, check_model_fits, generate_bytes, n_params, train_bytes
from .generate import GenerateSettings, generate_as
from .generation_config import OUR_DEFAULTS, read_generation_config
from .hf import SAVE_DTYPES, read_config
from .hf_config import HFConfig, check_stop_tokens, parse_hf_config
from .kernels import ModelKernels
from .metrics import METRICS, PLOT, SAMPLE, MetricsError, read_for_resume
from .numpy_backend import NumpyBackend, NumpyDecoder
from .optim import AdamWSettings
from .parallel.batch import eval_rows
from .parallel.comm import CommError
from .parallel.launch import LaunchEnv, LaunchError, from_environ
from .parallel.rendezvous import RendezvousError
from .parallel.replicas import ReplicaMismatch
from .parallel.watchdog import DEFAULT_TIMEOUT_S
from .precision import Precision
from .reference import IGNORE_INDEX
from .settings import SettingsError, flag
from .train import RESUME_MAY_CHANGE, BackendFactory, TrainSettings, resume_conflict, saved_settings, train

DEVICES = ("auto", "cuda", "numpy")
PRECISIONS = tuple(p.value for p in Precision)


def _no_gpu(why: str) -> str:
    """The driver's reason as a plain sentence (``--device cuda`` shows the driver's own words)."""
    if "CUDA_ERROR_NO_DRIVER" in why:
        return "no CUDA GPU found (driver not installed)"
    if "CUDA_ERROR_NO_DEVICE" in why:
        return "no CUDA GPU found (the driver sees no device)"
    return "no usable CUDA GPU (--device cuda shows the driver's reason)"


def select_backend(device: str, precision: Precision = Precision.FP32) -> tuple[str, type]:
    """The backend class for ``--device``, and the line that says plainly which one runs (with
    ``--precision``) and why."""
    from runtime.driver import available

    ok, why = available()
    if device == "cuda" and not ok:
        raise UsageError(f"--device cuda: no CUDA GPU ({why})")
    gemms = f"{precision.value} GEMMs" + (" (fp32 master weights)" if precision is Precision.BF16 else "")
    if device == "cuda" or (device == "auto" and ok):
        from .cuda_model import CudaBackend

        return f"device: {CudaBackend.description}, {gemms}", CudaBackend
    reason = "as asked" if device == "numpy" else _no_gpu(why)
    return f"device: {NumpyBackend.description}, {gemms}, {reason}", NumpyBackend


def _tokenizer(path: str | Path | None) -> Tokenizer:
    return HFTokenizer(Path(path)) if path else ByteTokenizer()


def checkpoint_tokenizer(ckpt: Checkpoint) -> Path | None:
    """The tokenizer a checkpoint was trained with: its tokenizer.json, or bytes when it says so.

    A model with another vocabulary and no tokenizer.json (a transformers directory copied without
    it) is refused rather than fed bytes it was never trained on."""
    if ckpt.tokenizer_path is not None:
        return ckpt.tokenizer_path
    if ckpt.trainer.get("tokenizer", "byte") == "byte" and (ckpt.trainer or ckpt.config.vocab_size == 256):
        return None
    raise UsageError(f"{ckpt.path} has no tokenizer.json; copy the model's tokenizer.json into it")


CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "manifest.json")  # beside config.json
RUN_FILES = (METRICS, SAMPLE, PLOT)  # what a run writes into --out besides its checkpoints and ``latest``


def _real(path: Path, what: str) -> Path:
    """``path`` resolved, or one line: a symbolic link loop on its way was a RuntimeError traceback."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # (RuntimeError before Python 3.13, OSError ELOOP since)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "a symbolic link loop"
        raise UsageError(f"{what} {path} cannot be resolved: {reason}") from None


def _check_fresh_out(out: Path, run: Path) -> None:
    """A new run writes into a run directory of its own (``out``, resolved: ``run``): never into or below
    a checkpoint (a model folder transformers wrote, or one of ours, which rotation may delete), nor
    over another run."""
    # a file at --out or above it: rundir.prepare said so only after the corpus was read and tokenized
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is" if blocker == out else f"is below {blocker}, which is"
        raise UsageError(f"--out {out} {where} a file, not a directory")
    for folder in (out, *run.parents):
        if (folder / "config.json").exists() and any((folder / f).exists() for f in CHECKPOINT_FILES):
            raise UsageError(f"--out {out} is {'in ' if folder != out else ''}a checkpoint ({folder}); a run "
                             "writes into a run directory of its own")
    if (out / LATEST).exists():
        raise UsageError(f"--out {out} already holds a run; --resume continues it, or choose another --out")
    unnamed = _unnamed_checkpoints(out)
    if unnamed:  # not free to write over
        raise UsageError(f"--out {unnamed}")
    # the files a run writes beside its checkpoints: with none, they are the record of a run stopped
    # before its first checkpoint (nothing to resume) or a user's own; a new run would write over them
    for name in RUN_FILES:
        if (out / name).exists():
            raise UsageError(f"--out {out} holds {name} but no checkpoint (a run stopped before its first one, or "
                             "files of yours): a new run would write over it; move it away, or choose another --out")


def _unnamed_checkpoints(out: Path) -> str | None:
    """What is wrong with ``out`` when it holds checkpoints but no ``latest`` (a run stopped after its first
    checkpoint was renamed into place and before ``latest`` named it, or a ``latest`` removed), else None."""
    steps = sorted(p.name for p in out.iterdir() if STEP_DIR.fullmatch(p.name)) if out.is_dir() else []
    if not steps or (out / LATEST).exists():
        return None
    return (f"{out} holds checkpoints ({steps[-1]}, ...) but no {LATEST} file (a damaged run, or one stopped before "
            f"{LATEST} named its first): write {LATEST} (one line, the checkpoint's name) to --resume it, or choose "
            "another --out")


def _check_run_files(out: Path) -> None:
    """A resumed run rewrites metrics.jsonl as it starts, loss.png and sample.txt as it ends: one of them
    that is not a file (a folder, a device) stopped it there, after the work (the sample, after every step)."""
    for name in RUN_FILES:
        path = out / name
        if path.exists() and not path.is_file():
            raise UsageError(f"--out {out}: {name} is {'a directory' if path.is_dir() else 'not a regular file'}, "
                             "where the run writes a file of that name; move it away")


class Interrupted(KeyboardInterrupt):
    """An interrupted run, with what it leaves to resume from."""


def _left_behind(out: Path, steps: int) -> str:
    """What an interrupted run of ``steps`` steps in ``out`` can be resumed from."""
    try:
        name = read_latest(out)
    except CheckpointError as e:
        return str(e)
    if name is not None and step_of(name) == steps:  # stopped as it tidied up after its last checkpoint: nothing to resume
        return f"the run is done: {out / name} is its last checkpoint"
    if name is not None:
        return f"{out / name} stays; train --resume --out {out} continues from it"
    unnamed = _unnamed_checkpoints(out)
    if unnamed:
        return unnamed
    if (out / METRICS).exists():  # a new run into ``out`` is refused while it holds the record (_check_fresh_out)
        return f"before its first checkpoint: nothing to resume; remove {out / METRICS} or choose another --out " \
               "to start over"
    return "before its first checkpoint: nothing to resume, a new run starts over"


@contextlib.contextmanager
def _saying_what_stays(out: Path, steps: int, primary: bool) -> Iterator[None]:
    """A run stopped by an interrupt or a failed write (a full disk) says what it leaves to resume from
    (rank 0, which writes the run directory)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(_left_behind(out, steps) if primary else "") from None
    except OSError as e:
        raise rundir.RunDirError(why(e) + (f"; {_left_behind(out, steps)}" if primary else "")) from None


def _say(line: str) -> None:
    """A progress line on stdout. If its reader has gone (a closed pipe), the rest go nowhere and the
    run goes on: its checkpoints, metrics and sample are in --out."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        silence_stdout()


def _on_gpu(device: str) -> bool:
    from runtime.driver import available

    return device == "cuda" or (device == "auto" and available()[0])


def _read_bytes(path: Path | None) -> bytes | None:
    try:
        return read_file(path) if path is not None else None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _add_settings(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; a flag not given stays out of the namespace, so that a resumed run can
    tell the flags given from its saved settings."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p.add_argument(flag(f.name), type=hints[f.name], default=argparse.SUPPRESS, help=f"(default {f.default})")


def _given(ns: argparse.Namespace, cls: type) -> dict:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def _resume_settings(ns: argparse.Namespace, ckpt: Checkpoint) -> tuple[TrainSettings, AdamWSettings]:
    """The saved run's settings, with the flags given checked against them (one line naming the
    first that contradicts)."""
    saved, saved_adamw = saved_settings(ckpt)
    given = _given(ns, TrainSettings)
    step = ckpt.trainer["step"]
    if "steps" in given and given["steps"] <= step:
        raise UsageError(f"--resume: --steps {given['steps']} is at or below the checkpoint's step {step} "
                         f"({ckpt.path})")
    clash = resume_conflict(saved, given) or resume_conflict(saved_adamw, _given(ns, AdamWSettings))
    if clash:
        name, old, new = clash
        raise UsageError(f"--resume: {flag(name)} {new} contradicts the run's saved {old} (a resumed run keeps "
                         f"its settings; only {', '.join(map(flag, RESUME_MAY_CHANGE))} may change)")
    if step >= saved.steps:
        raise UsageError(f"--resume: the run in {ckpt.path.parent} already finished (step {step} of {saved.steps})")
    safe = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    return dataclasses.replace(saved, **safe), saved_adamw


def run_inputs(corpus: Corpus, config: ModelConfig, settings: TrainSettings, adamw: AdamWSettings,
               ns: argparse.Namespace, ckpt: Checkpoint | None, init: Checkpoint | None) -> dict[str, str]:
    """What a rank was given to run, by digest: the tokens it read, the model and its training
    settings, the checkpoint it resumes (every file of it, by its manifest's digests), the weights
    it starts from (--init). Every rank reads its own (ranks on two hosts could read other files
    under one path, and the all-gathered weights would hide it), so the rendezvous holds each
    rank's against rank 0's."""
    def digest(value: object) -> str:  # JSON of plain values only: a str() of an object could differ by process
        return sha256_hex(json.dumps(value, sort_keys=True))[:16]

    weights = None if init is None else {name: sha256_hex(np.ascontiguousarray(w).data)
                                         for name, w in init.params.items()}
    return {"data": corpus.sha256[:16],
            "settings": digest([dataclasses.asdict(x) for x in (config, settings, adamw)]
                               + [ns.precision, ns.save_dtype]),
            "checkpoint": digest(None if ckpt is None else manifest_digests(ckpt.path) or ckpt.trainer),
            "init": digest(weights)}


def _resume_inputs(ns: argparse.Namespace, ckpt: Checkpoint) -> None:
    """Fill ``--data``, ``--tokenizer`` and ``--precision`` from the saved run, refusing ones given
    that differ from it."""
    t = ckpt.trainer
    data = [str(_real(Path(d), "--data")) for d in ns.data] if ns.data else None
    if "data" in t:
        if not (t["data"] is None or (isinstance(t["data"], list) and all(isinstance(d, str) for d in t["data"]))):
            raise CheckpointError(f"{ckpt.path / 'trainer.json'} is damaged: data must be a list of paths or null")
        if ns.data and data != t["data"]:
            raise UsageError(f"--resume: --data {' '.join(ns.data)} contradicts the run's saved "
                             f"{' '.join(t['data'] or ['(the stdlib)'])}")
        ns.data = t["data"]
    saved_tok = ckpt.tokenizer_path
    if ns.tokenizer:
        # (its files: a tokenizer_config.json beside it that the run's lacks, or says otherwise, is another tokenizer)
        if saved_tok is None or read_tokenizer_files(Path(ns.tokenizer)) != read_tokenizer_files(saved_tok):
            raise UsageError(f"--resume: --tokenizer {ns.tokenizer} is not the tokenizer the run was saved with")
    ns.tokenizer = saved_tok
    saved_precision = t.get("precision")
    if saved_precision is not None and saved_precision not in PRECISIONS:
        raise CheckpointError(f"{ckpt.path / 'trainer.json'} is damaged: unknown precision {saved_precision!r}")
    if getattr(ns, "precision", None) and saved_precision and ns.precision != saved_precision:
        raise UsageError(f"--resume: --precision {ns.precision} contradicts the run's saved {saved_precision}")
    ns.precision = getattr(ns, "precision", None) or saved_precision or "fp32"


def check_data_parallel(gpus: int | None, device: str, environ: MutableMapping[str, str]) -> LaunchEnv | int | None:
    """``--gpus N``, or a torchrun / srun launch, checked before any work. None: one process on
    one device, as before. An int N: this process is ``--gpus N``'s parent, which starts the N
    ranks (``parallel.spawn``) once the run's input is checked. A LaunchEnv: this process is one
    rank, its GPU pinned (CUDA_VISIBLE_DEVICES in ``environ``). Anything else is one line: what to
    install, how many GPUs there are, a launch that contradicts itself."""
    from .parallel.nccl import nccl_missing  # imports the runtime: only when a run asks

    launch = from_environ(environ)
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}")
    if gpus is not None and device == "numpy":  # (--gpus 1 too: it asks for a GPU, never the CPU in its place)
        raise UsageError(f"--gpus {gpus} trains on GPUs; --device numpy trains on the CPU")
    spawned = launch is not None and launch.source == "--gpus"
    if launch is not None and launch.world == 1 and not spawned and gpus:
        launch = None  # a one-task launch (an sbatch script's MASTER_ADDR, torchrun of 1): --gpus starts the ranks
    if spawned and gpus != launch.world:
        raise UsageError(f"--gpus {gpus} in a rank that ptxgen train --gpus {launch.world} started")
    if gpus is not None and launch is not None and launch.world > 1 and not spawned:
        raise UsageError(f"--gpus starts its own processes; under {launch.source} leave it out (the launcher "
                         f"started {launch.world})")
    world = gpus or (launch.world if launch is not None else 1)
    if world == 1:
        return None
    how = f"--gpus {gpus}" if gpus and not spawned else f"{launch.source} with {world} ranks"
    if device == "numpy":
        raise UsageError(f"{how} trains on GPUs; --device numpy trains on the CPU")
    if launch is not None:
        gpu = launch.pin_gpu(environ)  # before CUDA starts: this rank's GPU is the runtime's device 0
    missing = nccl_missing()
    if missing:
        raise UsageError(f"{how}: {missing}")
    from runtime.driver import device_count

    visible = device_count()
    if launch is None and gpus > visible:
        raise UsageError(f"{how}: needs {gpus} GPUs on this host, {visible} visible")
    if launch is not None and not visible:
        raise UsageError(f"{how}: rank {launch.rank} (local rank {launch.local_rank}) has no GPU "
                         f"(CUDA_VISIBLE_DEVICES={gpu}: none visible)")
    return launch if launch is not None else gpus


def _config_file(path: Path, new_model: bool) -> HFConfig:
    """``--config``'s file, whose refusals name it (they said 'config.json', whatever its name);
    ``new_model``: a run draws a new model as the file says (``HFConfig.check_new_model``)."""
    data = read_json(path)
    try:
        given = parse_hf_config(data)
        if new_model:
            given.check_new_model()
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    return _trainable(given, f"--config {path}")


def _trainable(given: HFConfig, where: str) -> HFConfig:
    """A config a run trains from: one it can honour in training too (``HFConfig.check_trainable``)."""
    try:
        given.check_trainable()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return given


def cmd_train(argv: Sequence[str]) -> int:
    p = Parser(prog="ptxgen train", description="Train the model (default: the run planned for this machine, on "
                                                "the stdlib's source; it says what it will do before it starts).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: small in bf16 with a GPU, "
                                                    "tiny without)")
    src.add_argument("--config", type=Path, help="an HF config.json instead of a preset")
    # (given twice, both lists count: a later --data adds paths, it does not drop the earlier ones)
    p.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                   help="files or directories (default: the stdlib's .py files)")
    p.add_argument("--tokenizer", help="an HF tokenizer.json (default: bytes, vocab 256)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default=argparse.SUPPRESS,
                   help="bf16: the linear layers' GEMMs read bf16 operands (fp32 master weights); default fp32")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in --out, with the run's saved settings, data, "
                            "tokenizer and precision (flags that contradict them are refused)")
    start.add_argument("--init", type=Path, metavar="CHECKPOINT",
                       help="start from these weights (ours or a transformers directory), fresh optimizer")
    p.add_argument("--save-dtype", choices=tuple(SAVE_DTYPES), default=argparse.SUPPRESS,
                   help="the checkpoints' model weights (bf16: as Qwen releases ship; f32 masters kept); "
                        "default fp32")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="data-parallel training on N GPUs of this host (needs the distributed extra)")
    p.add_argument("--comm-timeout", type=float, default=None, metavar="SECONDS",
                   help="data-parallel runs: how long a rank waits for the others (to meet, then between "
                        f"collectives) before it stops with one line; default {DEFAULT_TIMEOUT_S:g}")
    _add_settings(p, TrainSettings)
    _add_settings(p, AdamWSettings)
    ns = p.parse_args(argv)
    if ns.comm_timeout is not None and not (math.isfinite(ns.comm_timeout) and ns.comm_timeout > 0):
        raise UsageError(f"--comm-timeout must be a positive number of seconds, got {ns.comm_timeout:g}")
    dp = check_data_parallel(ns.gpus, ns.device, os.environ)
    if ns.comm_timeout is None:
        ns.comm_timeout = DEFAULT_TIMEOUT_S
    elif dp is None:  # a flag that would silently do nothing
        raise UsageError("--comm-timeout is for data-parallel runs (--gpus N, torchrun, srun); this one trains "
                         "on one device")
    if ns.init and hasattr(ns, "seed"):  # the seed draws a new model's weights, and nothing else
        raise UsageError(f"--seed has no effect with --init (the weights are {ns.init}'s); drop it")
    if ns.gpus == 1 and not _on_gpu(ns.device):  # one GPU asked for and none here: never a CPU run in its place
        from runtime.driver import available

        raise UsageError(f"--gpus {ns.gpus}: {_no_gpu(available()[1])}")
    rank = dp if isinstance(dp, LaunchEnv) else None  # this process is one rank of a data-parallel run
    primary = rank is None or rank.rank == 0  # the process that writes the run directory and prints
    say = _say if primary else (lambda line: None)
    # a bare `ptxgen train`: the run this machine finishes in about two minutes (model/defaults.py)
    here = default_run(_on_gpu(ns.device))
    plan = None if (ns.preset or ns.config or ns.init or ns.resume) else here
    given = _config_file(ns.config, new_model=not (ns.init or ns.resume)) if ns.config else None
    config = given.config if given is not None else preset(ns.preset or here.preset)
    if ns.init:  # (its config alone first: a file the trainer cannot honour is refused before the weights are read)
        _trainable(read_config(resolve(ns.init)), f"--init {ns.init}")
    init = load_checkpoint(ns.init) if ns.init else None
    tokenizer_file = Path(ns.tokenizer) if ns.tokenizer else None
    generation_config = None  # what our checkpoints say generate should do (transformers' format)
    if init is not None:
        if (ns.preset or ns.config) and config != init.config:
            raise UsageError(f"--init: the checkpoint in {ns.init} has another config than the "
                             f"{'--preset' if ns.preset else '--config'} given (drop it: the checkpoint's is used)")
        if ns.tokenizer and init.tokenizer_path is not None:
            raise UsageError(f"--init: {init.path} brings its own tokenizer.json; drop --tokenizer")
        config, tokenizer_file = init.config, tokenizer_file or checkpoint_tokenizer(init)
        generation_config = _read_bytes(init.generation_config_path)
        if generation_config is None and init.eos_token_ids:  # config.json's stop tokens, kept (greedy as before)
            generation_config = json.dumps({"eos_token_id": list(init.eos_token_ids)}).encode()
    elif given is not None and given.eos_token_ids:  # config.json's stop tokens: the run's checkpoints keep them
        check_stop_tokens(given.eos_token_ids, config.vocab_size, f"{ns.config}: eos_token_id")
        generation_config = (json.dumps({**json.loads(OUR_DEFAULTS), "eos_token_id": list(given.eos_token_ids)},
                                        indent=2) + "\n").encode()
    if init is not None:  # named after the run (or model folder) it starts from
        name = init.path.parent.name if (init.path.parent / LATEST).exists() else init.path.name
    else:
        name = ns.preset or (ns.config.resolve().parent.name if ns.config else None) or here.preset
    out = ns.out or Path("runs") / name
    run = _real(out, "--out")
    if not ns.resume and primary:  # (the other ranks would find rank 0's files there)
        _check_fresh_out(out, run)
    cuts = []  # defaults shortened to fit (warmup to --steps, eval batches to the data), said when the run starts
    if ns.resume:
        if not (out / LATEST).exists():
            raise UsageError(f"--resume: {_unnamed_checkpoints(out) or f'no checkpoint in {out} (no {LATEST} file)'}")
        if primary:
            _check_run_files(out)
            read_for_resume(out / METRICS)  # refused now, not once the checkpoint has loaded (the run says a drop)
        ckpt = load_checkpoint(out)
        if ckpt.config != config and (ns.preset or ns.config):
            raise UsageError(f"--resume: the checkpoint in {out} has another config than the one given")
        config = ckpt.config
        settings, adamw = _resume_settings(ns, ckpt)
        _resume_inputs(ns, ckpt)
        tokenizer_file = Path(ns.tokenizer) if ns.tokenizer else None
        generation_config = _read_bytes(ckpt.generation_config_path)
        saved_dtype = ckpt.trainer.get("save_dtype", "fp32")
        if saved_dtype not in SAVE_DTYPES:
            raise CheckpointError(f"{ckpt.path / 'trainer.json'} is damaged: unknown save_dtype {saved_dtype!r}")
        if getattr(ns, "save_dtype", saved_dtype) != saved_dtype:
            raise UsageError(f"--resume: --save-dtype {ns.save_dtype} contradicts the run's saved {saved_dtype}")
        ns.save_dtype = saved_dtype
    else:
        ckpt = None
        settings = TrainSettings(**{**(plan.settings if plan else {}), **_given(ns, TrainSettings)})
        if hasattr(ns, "warmup"):  # given (a resumed run keeps both as saved)
            if settings.warmup > settings.steps:
                raise UsageError(f"--warmup {settings.warmup} is above --steps {settings.steps}: the learning rate "
                                 f"would never reach --lr {settings.lr:g}")
        elif settings.warmup > settings.steps // 2:
            # a default warmup meant for a longer run: the learning rate peaks half-way and then decays
            cuts.append(f"warmup {settings.steps // 2} (the default {settings.warmup} cut to half of --steps "
                        f"{settings.steps})")
            settings = dataclasses.replace(settings, warmup=settings.steps // 2)
        adamw = AdamWSettings(**_given(ns, AdamWSettings))
        ns.precision = getattr(ns, "precision", plan.precision if plan else "fp32")
        ns.save_dtype = getattr(ns, "save_dtype", "fp32")
    if generation_config is None:
        generation_config = OUR_DEFAULTS
    world = 1 if dp is None else dp if isinstance(dp, int) else dp.world  # GPUs of a data-parallel run
    if settings.batch_size % world:
        raise UsageError(f"--batch-size {settings.batch_size} does not split evenly among {world} GPUs "
                         f"(use a multiple of {world})")
    if settings.seq_len > config.max_position_embeddings:
        raise UsageError(f"--seq-len {settings.seq_len} is above the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    tokenizer = _tokenizer(tokenizer_file)
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens; the model's vocab_size is "
                         f"{config.vocab_size}")
    precision = Precision(ns.precision)
    line, backend = select_backend(ns.device, precision)
    on_gpu = backend is not NumpyBackend
    if on_gpu:
        check_gpu_kernels(config, precision, settings.batch_size * settings.seq_len, adamw)
    for d in map(Path, ns.data or ()):  # its checkpoints, metrics and samples would be its data (a resume: changed)
        inside = d.is_dir() and (run == d.resolve() or d.resolve() in run.parents)
        if inside and not any(part.startswith(".") for part in run.relative_to(d.resolve()).parts):
            raise UsageError(f"the run directory {out} is inside --data {d}: the run's own files would become its "
                             "training data (choose another --out)")
    try:
        files = expand_paths(ns.data) if ns.data else stdlib_files()
    except DataError as e:
        if ckpt is None:
            raise
        # the paths the run was saved with, which the user may not have given (said as a bare 'no such file')
        raise DataError(f"--resume: the run's saved --data: {e} (a resumed run reads the data it was saved with, "
                        "at the same path)") from None
    # the data is read and checked before the run directory is made: a refused run leaves nothing
    corpus = Corpus.from_files(files, tokenizer)
    corpus.check_fits(settings.batch_size, settings.seq_len, config.vocab_size)
    try:  # now, not once the run is done (the sample it ends with)
        sample_prompt = tokenizer.encode(SAMPLE_PROMPT.encode())
    except DataError as e:
        raise DataError(f"the run's sample prompt {SAMPLE_PROMPT!r}: {e}") from None
    if ckpt is not None and ckpt.trainer.get("data_sha256", corpus.sha256) != corpus.sha256:
        raise UsageError("--resume: the data the run was saved with has changed since (its tokens' sha256 differs)")
    held = val_batch_count(corpus.val, settings.batch_size, settings.seq_len)
    if settings.eval_batches > held:  # as --batch-size against the data: refused when given, a default cut and said
        rows = min(settings.batch_size, (len(corpus.val) - 1) // settings.seq_len)  # (fewer: one partial batch)
        split = f"the validation split's {len(corpus.val)} tokens hold {held} batch{'es' if held > 1 else ''} of " \
                f"{rows}x{settings.seq_len}"
        if ckpt is None and hasattr(ns, "eval_batches"):
            raise UsageError(f"--eval-batches {settings.eval_batches}: {split}; give at most {held}")
        # a resumed run keeps its saved settings (an older release cut them unsaid); a new one saves what it runs
        cuts.append(f"eval batches {held} (the {'default' if ckpt is None else 'saved'} {settings.eval_batches} cut: "
                    f"{split})")
        if ckpt is None:
            settings = dataclasses.replace(settings, eval_batches=held)
    # the training batch's shape and the validation batches' (a short validation set gives one
    # partial), on one GPU of a data-parallel run its rows of them (rank 0's, the most)
    shapes = {(settings.batch_size // world, settings.seq_len)} | {
        (eval_rows(len(x), 0, world).stop, x.shape[1])
        for x, _ in val_batches(corpus.val, settings.batch_size, settings.seq_len, settings.eval_batches)}
    check_model_fits(config, lambda: train_bytes(config, shapes, on_gpu, precision is Precision.BF16, world),
                     on_gpu, f"training {n_params(config) / 1e6:.1f}M parameters at batch {settings.batch_size}x"
                       f"{settings.seq_len}")
    if isinstance(dp, int):  # the input is good: start the ranks, each of which runs the checks above again
        from .parallel.spawn import rank_command, spawn_ranks

        from runtime.driver import release

        del ckpt, init, corpus  # the parent only waits: what it read for the checks is the ranks' to hold
        release()  # and its context on the first GPU (the GPU count, the memory check) is rank 0's memory
        return spawn_ranks(dp, rank_command(argv), os.environ)
    # the communicator and the run directory's lock, released however the run ends
    with contextlib.ExitStack() as stack:
        if primary:  # rank 0 alone writes the run directory (held before the ranks meet: a refusal is exit 2)
            rundir.prepare(out)
            stack.enter_context(rundir.hold(out))
        comm = None
        if rank is not None:
            from .parallel.nccl import NcclCommunicator
            from .parallel.zero_cuda import ZeroCudaRank

            # closed when the run ends; aborted when this rank fails (closing would wait for the others)
            given = run_inputs(corpus, config, settings, adamw, ns, ckpt, init)
            comm = stack.enter_context(NcclCommunicator(rank, timeout=ns.comm_timeout, inputs=given))
            factory: BackendFactory = functools.partial(ZeroCudaRank, comm, precision=precision,
                                                        digest_every=settings.eval_every)
            line += f"; data-parallel: {rank.world} GPUs (ZeRO-1 over NCCL, {rank.source})"
        else:
            factory = functools.partial(backend, precision=precision)
        say(line)
        if plan is not None:
            say(f"plan: the default run here, --preset {plan.preset} --precision {ns.precision} "
                + " ".join(f"{flag(k)} {getattr(settings, k)}" for k in plan.settings)
                + (f": {plan.expect}" if not (ns.data or _given(ns, TrainSettings) or ns.tokenizer) else
                   " (with the flags given; the time measured for the plan as it stands no longer applies)"))
        for cut in cuts:
            say(cut)
        say(f"data: {corpus.n_files} files, {len(corpus.train)} train / {len(corpus.val)} validation tokens "
            f"({tokenizer.name}); model: {n_params(config) / 1e6:.2f}M parameters, hidden {config.hidden_size}, "
            f"{config.num_layers} layers; run: {out}")
        run_state = {"precision": precision.value, "data_sha256": corpus.sha256,
                     "data": [str(Path(d).resolve()) for d in ns.data] if ns.data else None}
        if init is not None:
            say(f"init: weights from {init.path}, fresh optimizer state")
        stays = functools.partial(_saying_what_stays, out, settings.steps, primary)
        with stays():
            result = train(config, settings, adamw, corpus, factory, out, resume=ckpt or False,
                           tokenizer=tokenizer, run_state=run_state,
                           log=say, initial=init.params if init else None, save_dtype=ns.save_dtype,
                           generation_config=generation_config, comm=comm)
        if comm is not None:  # the ranks are done together: part before rank 0's sample
            stack.close()
        if not primary:
            result.backend.close()
            return 0
        if result.checkpoint is None or not result.checkpoint.is_dir():
            raise CheckpointError(f"the run ended at step {result.step} but its checkpoint {result.checkpoint} "
                                  "is missing")
        last_val = result.val_losses[max(result.val_losses)] if result.val_losses else float("nan")
        say(f"done: step {result.step}, val_loss {last_val:.4f}, {result.tokens_per_s:.0f} tokens/s, "
            f"checkpoint {result.checkpoint}")
        sample = sample_text(result.backend, tokenizer, sample_prompt,
                             read_generation_config(result.checkpoint / "generation_config.json"))
        with stays():
            write_atomic(out / SAMPLE, sample.encode())
        say(f"sample ({out / SAMPLE}):\n{sample}")
        return 0


SAMPLE_PROMPT, SAMPLE_TOKENS = "def ", 200


def sample_text(backend, tokenizer: Tokenizer, prompt: np.ndarray, sampling) -> str:
    """A continuation of ``prompt`` (SAMPLE_PROMPT, encoded) from the trained model, decoded as its
    checkpoint says."""
    gs = GenerateSettings.of(sampling, {"max_new_tokens": SAMPLE_TOKENS}, len(prompt))
    decoder = backend.decoder(min(backend.config.max_position_embeddings, len(prompt) + SAMPLE_TOKENS))
    try:
        tokens = list(generate_as(decoder, prompt, gs, backend.config.max_position_embeddings,
                                  sampling.eos_token_ids))
    finally:
        getattr(decoder, "close", lambda: None)()
    return tokenizer.decode(list(prompt) + tokens)


def _prompt_bytes(prompt: str) -> bytes:
    try:
        return prompt.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates
    except UnicodeEncodeError:
        raise UsageError("--prompt is not valid UTF-8") from None


def cmd_generate(argv: Sequence[str]) -> int:
    p = Parser(prog="ptxgen generate", description="Continue a prompt with a trained checkpoint.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint or run directory")
    p.add_argument("--prompt", required=True)
    hints = typing.get_type_hints(GenerateSettings)
    for f in dataclasses.fields(GenerateSettings):
        p.add_argument(flag(f.name), type=hints[f.name], default=argparse.SUPPRESS,
                       help="(default: the checkpoint's generation_config.json, else greedy)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="the GEMMs' operands (default fp32)")
    ns = p.parse_args(argv)
    given = _given(ns, GenerateSettings)
    GenerateSettings(**given)  # the flags' own ranges, before any file is read
    text = _prompt_bytes(ns.prompt)
    precision = Precision(ns.precision)
    line, backend = select_backend(ns.device, precision)
    on_gpu = backend is not NumpyBackend
    path = resolve(ns.checkpoint)
    config = read_config(path).config  # (named as load_checkpoint names it: the file's refusals say which checkpoint)
    if on_gpu:
        check_gpu_kernels(config, precision, 1)
    max_len = config.max_position_embeddings
    # tokenizers give at most about a token per byte
    bound = min(max_len, len(text) + given.get("max_new_tokens", GenerateSettings.max_new_tokens))
    check_model_fits(config, lambda: generate_bytes(config, bound, on_gpu, precision is Precision.BF16), on_gpu,
                     f"generating {bound} tokens with {n_params(config) / 1e6:.1f}M parameters")
    ckpt = load_checkpoint(path)
    tokenizer = _tokenizer(checkpoint_tokenizer(ckpt))
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise CheckpointError(f"{ckpt.tokenizer_path} has {tokenizer.vocab_size} tokens; the model's vocab_size "
                              f"is {ckpt.config.vocab_size}")
    try:
        prompt = tokenizer.encode(text)
    except DataError as e:
        raise DataError(f"--prompt: {e}") from None
    if len(prompt) <= tokenizer.added:  # (a BOS alone: generation would start from no prompt at all)
        raise UsageError(f"the tokenizer drops every character of --prompt {ns.prompt!r} (no tokens)")
    if len(prompt) > max_len:
        raise UsageError(f"--prompt has {len(prompt)} tokens; the model takes at most {max_len}")
    limit = ckpt.sampling.max_length
    if "max_new_tokens" not in given and ckpt.sampling.max_new_tokens is None and limit is not None \
            and len(prompt) >= limit:  # it left room for 0 new tokens: the prompt came back as the "answer"
        raise UsageError(f"--prompt has {len(prompt)} tokens: the max_length {limit} of {ckpt.generation_config_path} "
                         "(prompt and new tokens together) leaves no room for new ones; give --max-new-tokens N")
    gs = GenerateSettings.of(ckpt.sampling, given, len(prompt))
    room = max_len - len(prompt)  # positions left after the prompt
    if "max_new_tokens" in given and gs.max_new_tokens > room:
        raise UsageError(f"--max-new-tokens {gs.max_new_tokens}: the prompt's {len(prompt)} tokens leave "
                         f"{room} of the model's {max_len} positions (max_position_embeddings)")
    unused = [name for name in ("top_k", "top_p", "seed") if name in given] if gs.temperature == 0 else []
    if unused:  # a flag that would silently do nothing
        why = "--temperature 0" if "temperature" in given else \
            "the checkpoint's generation_config.json does not sample; add --temperature T to sample"
        raise UsageError(f"{flag(unused[0])} has no effect with greedy decoding ({why})")
    how = "greedy" if gs.temperature == 0 else (f"sampling at temperature {gs.temperature:g}, top-k {gs.top_k}"
                                                + (f", top-p {gs.top_p:g}" if gs.top_p < 1 else ""))
    if gs.repetition_penalty != 1:
        how += f", repetition penalty {gs.repetition_penalty:g}"
    if gs.max_new_tokens > room:  # the default (the checkpoint's) asks for more than there is room for
        how += f"; at most {room} new tokens (the model's {max_len} positions)"
    print(f"{line}, with a KV cache; {how}", file=sys.stderr, flush=True)
    max_len = min(max_len, len(prompt) + gs.max_new_tokens)
    if backend is NumpyBackend:
        decoder = NumpyDecoder(ckpt.config, ckpt.params, precision, max_len)
    else:
        from .cuda_decoder import CudaDecoder

        decoder = CudaDecoder(backend(ckpt.config, ckpt.params, AdamWSettings(), precision=precision), max_len)
    out = list(prompt)
    sys.stdout.write(ns.prompt)
    shown = len(tokenizer.decode(out))
    for token in generate_as(decoder, prompt, gs, ckpt.config.max_position_embeddings, ckpt.eos_token_ids):
        out.append(token)
        decoded = tokenizer.decode(out)
        sys.stdout.write(decoded[shown:])  # decode the whole so multi-byte characters come out whole
        sys.stdout.flush()
        shown = len(decoded)
    sys.stdout.write("\n")
    return 0


def cmd_contracts(argv: Sequence[str]) -> int:
    from contracts.runner import main as contracts_main

    return contracts_main(argv)


def check_gpu_kernels(config: ModelConfig, precision: Precision, tokens: int,
                      adamw: AdamWSettings = AdamWSettings()) -> None:
    """A model the CUDA kernels cannot run (a head_dim, a width they do not serve) as one line,
    before any file is written or kernel built; ``adamw``: the run's optimizer (generation: none)."""
    try:
        ModelKernels.of(config, adamw, IGNORE_INDEX, precision).check_shapes(config, tokens)
    except (SpecError, ValueError) as e:
        raise UsageError(f"the CUDA kernels cannot run this model: {e}") from None


def _guarded(name: str, command: Callable[[Sequence[str]], int]) -> Callable[[Sequence[str]], int]:
    """The model's bad-input errors as one line and exit 2 (the generator's are handled by ptxgen.cli)."""

    def run(argv: Sequence[str]) -> int:
        try:
            return command(argv)
        except (UsageError, ConfigError, CheckpointError, DataError, SettingsError, rundir.RunDirError,
                MetricsError, MemoryTooSmall, LaunchError) as e:
            print_error(f"ptxgen {name}: error: {e}")
            return 2
        except (CommError, RendezvousError, ReplicaMismatch) as e:  # a data-parallel run that broke off
            print_error(f"ptxgen {name}: error: {e}")
            return 1
        except FloatingPointError as e:  # the loss diverged: the checkpoints written so far stay
            print_error(f"ptxgen {name}: error: {e} (training diverged; try a lower --lr)")
            return 2
        except MemoryError:  # an estimate that was too low: still one line
            print_error(f"ptxgen {name}: error: out of memory")
            return 2
        except CudaError as e:
            if "OUT_OF_MEMORY" not in str(e):
                raise  # a driver failure: its traceback is the report
            where = "page-locked host memory" if e.call == "cuMemHostAlloc" else "GPU memory"  # (staging buffers)
            print_error(f"ptxgen {name}: error: out of {where} ({e}); try a smaller --batch-size")
            return 2
        except KeyboardInterrupt as e:
            print_error(f"ptxgen {name}: interrupted" + (f" ({e})" if str(e) else ""))
            return INTERRUPTED

    return run


COMMANDS = {name: _guarded(name, cmd) for name, cmd in
            (("train", cmd_train), ("generate", cmd_generate), ("contracts", cmd_contracts))}
COMMANDS["cache"] = lambda argv: __import__("runtime.cachecli").cachecli.main(argv)  # ls | show | diff
USAGE = """
  train [--preset P | --config config.json | --init CHECKPOINT] [--data PATH ...] [--device auto|cuda|numpy]
        [--precision fp32|bf16] [--out DIR] [--resume] [--save-dtype fp32|bf16] [--gpus N] ...
  generate --checkpoint DIR --prompt TEXT [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]
           [--max-new-tokens N] [--seed S] [--device auto|cuda|numpy] [--precision P]
  contracts validate|check [--root REPO] [--gpu-only]
  cache [--cache-dir DIR] ls | show KEY | diff KEY KEY"""


def main(argv: Sequence[str] | None = None) -> int:
    return ptxgen_cli.main(argv, more=COMMANDS, more_usage=USAGE)

