"""The training loop: AdamW with warmup + cosine, clipping, validation, checkpoints and resume.

It drives any backend with ``train_step(ids, targets, lr) -> (loss, grad_norm)``, ``loss``,
``params``, ``step`` and the optimizer-state pair; the numpy reference and the CUDA model both are.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, remove_stale_temporaries, save_checkpoint
from .config import ModelConfig
from .data import ByteTokenizer, Corpus, Tokenizer, batch_at, val_batches
from .metrics import MetricsLog, plot_losses
from .optim import AdamWSettings, lr_at
from .params import init_params
from .settings import OutOfRange, check_types, require

if TYPE_CHECKING:
    from .parallel.comm import Communicator


MAX_STEPS = 2 ** 53  # the largest count float64 holds exactly along with every count below it


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    eval_every: int = 300
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        # steps are Python ints, but lr_at turns them to float64 (``peak * step / warmup``) and every reader
        # of metrics.jsonl (JSON numbers, loss.png's axis) does too: past 2**53 two steps are one float,
        # and a run that long never ends (--steps 100000000000000000000000 was taken and ran at peak lr)
        require(self.steps <= MAX_STEPS, "steps", "at most 2**53 = 9007199254740992", self.steps)
        for name in ("warmup", "checkpoint_every", "seed"):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        # the GPU takes the learning rate in f32, whichever backend runs now (1e-320 is 0 there: no step)
        with np.errstate(over="ignore"):
            require(np.finfo(np.float32).tiny <= np.float32(self.lr) < np.inf, "lr",
                    "> 0 and a normal number in f32", self.lr)
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)


# Settings a resumed run may change: neither alters a step, so the run stays bit for bit. Every other
# one is refused when it contradicts the saved run (``steps`` too: the cosine schedule is a function
# of the total, so extending a run would change the learning rates it has not taken yet).
RESUME_MAY_CHANGE = ("eval_every", "checkpoint_every")


def saved_settings(ckpt: Checkpoint) -> tuple[TrainSettings, AdamWSettings]:
    """The settings a checkpoint's run trained with, checked as the command line's are."""
    where = ckpt.path / "trainer.json"
    if "settings" not in ckpt.trainer or "adamw" not in ckpt.trainer or not ckpt.optimizer:
        raise CheckpointError(f"cannot resume from {ckpt.path}: it holds no trainer settings or optimizer state")
    for key, cls in (("settings", TrainSettings), ("adamw", AdamWSettings)):
        fields = {f.name for f in dataclasses.fields(cls)}
        saved = ckpt.trainer[key]
        if not isinstance(saved, dict) or set(saved) != fields:  # complete, or the defaults would fill in
            odd = sorted(fields ^ set(saved))[:1] if isinstance(saved, dict) else ["(not an object)"]
            raise CheckpointError(f"{where} is damaged: {key} does not hold the run's {key} {odd}")
    try:
        return TrainSettings(**ckpt.trainer["settings"]), AdamWSettings(**ckpt.trainer["adamw"])
    except OutOfRange as e:  # accepted by an older release (a tiny lr, a beta the GPU's AdamW cannot bake): not damage
        raise CheckpointError(f"cannot resume from {ckpt.path}: its run was saved with a setting this version "
                              f"refuses ({e}); train --init {ckpt.path} starts a run from its weights") from None
    except (TypeError, ValueError) as e:  # a value out of type or range
        raise CheckpointError(f"{where} is damaged: {e}") from None


def resume_conflict(saved: object, given: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first of ``given``'s settings that a resumed run may not change from ``saved``:
    (name, saved value, given value)."""
    for name, value in given.items():
        if name not in RESUME_MAY_CHANGE and getattr(saved, name) != value:
            return name, getattr(saved, name), value
    return None


class Backend(Protocol):
    name: str
    description: str
    params: dict[str, np.ndarray]
    step: int

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> float: ...

    def train_step(self, ids: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]: ...

    def optimizer_state(self) -> dict[str, np.ndarray]: ...

    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None: ...


BackendFactory = Callable[[ModelConfig, dict[str, np.ndarray], AdamWSettings], Backend]


@dataclass
class TrainResult:
    step: int
    train_losses: list[float] = field(default_factory=list)  # one per step run in this call
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    checkpoint: Path | None = None
    backend: Backend | None = field(default=None, repr=False)  # the trained model, for a sample


def evaluate(backend: Backend, batches: list[tuple[np.ndarray, np.ndarray]], progress: bool | None = None) -> float:
    """Mean validation loss over a fixed set of batches (token-weighted). ``progress``: the bar
    (None: when stderr is a terminal)."""
    from tqdm import tqdm

    bar = None if progress is None else not progress
    with np.errstate(all="ignore"):  # non-finite losses are reported by the caller
        total = sum(backend.loss(x, y) * x.size
                    for x, y in tqdm(batches, desc="validation", unit="batch", leave=False, disable=bar))
    return total / sum(x.size for x, _ in batches)


def train(config: ModelConfig, settings: TrainSettings, adamw: AdamWSettings, corpus: Corpus,
          make_backend: BackendFactory, out_dir: Path | None, *, resume: bool | Checkpoint = False,
          tokenizer: Tokenizer = ByteTokenizer(), run_state: dict[str, Any] | None = None,
          log: Callable[[str], None] = print, progress: bool | None = None,
          initial: dict[str, np.ndarray] | None = None, save_dtype: str = "fp32",
          generation_config: Path | None = None, comm: Communicator | None = None) -> TrainResult:
    """Train to ``settings.steps`` (from the latest checkpoint in ``out_dir``, or the one given, when
    ``resume``; with the settings it was saved with). ``run_state`` goes into every checkpoint's
    trainer state (what the command line needs to restore the run: precision, data).

    ``initial``: populated weights to start from (fresh optimizer state) instead of a random init.
    ``save_dtype``: the dtype of the checkpoints' model weights (fp32, or bf16 beside f32 masters);
    ``generation_config``: a generation_config.json copied into every checkpoint.
    ``comm``: a data-parallel run's communicator, the backend being its rank: every rank runs this
    loop on the same global batches (each backend takes its rows); rank 0 alone logs and writes the
    run's files, each checkpoint gathered from every rank's shard (``save_consolidated``)."""
    s = settings
    primary = comm is None or comm.rank == 0
    if not primary:
        log, progress = (lambda message: None), False
    corpus.check_fits(s.batch_size, s.seq_len, config.vocab_size)
    if primary and out_dir is not None and Path(out_dir).is_dir():
        remove_stale_temporaries(out_dir)  # crashed runs' left-overs
    position, start = 0, 0
    if resume:
        ckpt = resume if isinstance(resume, Checkpoint) else load_checkpoint(out_dir)
        saved, saved_adamw = saved_settings(ckpt)
        clash = resume_conflict(saved, dataclasses.asdict(s)) or resume_conflict(saved_adamw, dataclasses.asdict(adamw))
        if clash:
            raise CheckpointError(f"cannot resume {ckpt.path} with {clash[0]} {clash[2]!r}: the run was saved "
                                  f"with {clash[1]!r}")
        if ckpt.trainer["step"] >= s.steps:
            raise CheckpointError(f"{ckpt.path} is at step {ckpt.trainer['step']}: nothing left of {s.steps} steps")
        backend = make_backend(config, ckpt.params, adamw)
        start, position = ckpt.trainer["step"], ckpt.trainer["data_position"]
        backend.load_optimizer_state(ckpt.optimizer, start)
        log(f"resumed from {ckpt.path} at step {start}")
    else:
        backend = make_backend(config, init_params(config, seed=s.seed) if initial is None else initial, adamw)
    val = val_batches(corpus.val, s.batch_size, s.seq_len, s.eval_batches)
    result = TrainResult(step=start)

    def checkpoint(step: int) -> None:
        trainer: dict[str, Any] = {"step": step, "data_position": position, "backend": backend.name,
                                   "tokenizer": tokenizer.name, "settings": dataclasses.asdict(s),
                                   "adamw": dataclasses.asdict(adamw),
                                   "val_loss": result.val_losses.get(step), "save_dtype": save_dtype,
                                   **(run_state or {})}
        params = backend.params  # every rank: a data-parallel rank's may be a collective
        if not all(np.isfinite(v).all() for v in params.values()):  # never rotate good checkpoints out for it
            raise FloatingPointError(f"the weights are not finite at step {step}")
        # the tokenizer's files as read when it was loaded: the bytes the corpus was encoded with (the file, or
        # the checkpoint it came from, rotated out later, may have changed or be gone by the next save)
        save = dict(tokenizer=tokenizer.files, save_dtype=save_dtype, generation_config=generation_config)
        if comm is None:
            result.checkpoint = save_checkpoint(out_dir, step, config, params, backend.optimizer_state(), trainer,
                                                **save)
        else:
            from .parallel.checkpoints import save_consolidated
            result.checkpoint = save_consolidated(comm, backend, params, out_dir, step, config, trainer, **save)

    metrics = None
    if primary and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out_dir, start)
    started = time.perf_counter()

    def record(step: int, loss: float | None = None, lr: float | None = None, norm: float | None = None) -> None:
        if metrics is not None:
            metrics.record(step=step, train_loss=loss, val_loss=result.val_losses.get(step), lr=lr, grad_norm=norm,
                           tokens_per_s=result.tokens_per_s if loss is not None else None,
                           elapsed_s=round(time.perf_counter() - started, 3))

    if start == 0:
        result.val_losses[0] = evaluate(backend, val, progress)
        log(f"step 0: val_loss {result.val_losses[0]:.4f} (ln vocab = {math.log(config.vocab_size):.4f})")
        record(0)

    from tqdm import tqdm  # the progress bar; silent when stderr is not a terminal

    train_time = 0.0
    bar = tqdm(total=s.steps, initial=start, disable=None if progress is None else not progress,
               unit="step", dynamic_ncols=True)
    say = log if bar.disable else bar.write  # keep the bar intact below the log lines
    for step in range(start + 1, s.steps + 1):
        t0 = time.perf_counter()
        ids, targets, position = batch_at(corpus.train, position, s.batch_size, s.seq_len)
        lr = lr_at(step, s.steps, s.lr, s.warmup, s.min_lr_ratio)
        with np.errstate(all="ignore"):  # a diverging run is one error below, not pages of warnings
            loss, norm = backend.train_step(ids, targets, lr)
        train_time += time.perf_counter() - t0
        result.train_losses.append(loss)
        result.step = step
        result.tokens_per_s = len(result.train_losses) * ids.size / train_time
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{result.tokens_per_s:.0f}", refresh=False)
        bar.update()
        if not math.isfinite(loss):
            bar.close()
            raise FloatingPointError(f"the loss is {loss} at step {step}")
        if step % s.eval_every == 0 or step == s.steps:
            result.val_losses[step] = evaluate(backend, val, progress)
            say(f"step {step}: train_loss {loss:.4f} val_loss {result.val_losses[step]:.4f} "
                      f"grad_norm {norm:.3f} lr {lr:.2e} tokens/s {result.tokens_per_s:.0f}")
        record(step, loss, lr, norm)
        if out_dir is not None and ((s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.steps):
            checkpoint(step)
    bar.close()
    if metrics is not None:
        metrics.close()
        plot_losses(out_dir)
    result.backend = backend
    return result
