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
from typing import Any, Callable, Protocol

import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig
from .data import Corpus, batch_at, val_batches
from .metrics import MetricsLog, plot_losses
from .optim import AdamWSettings, lr_at
from .params import init_params


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
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{f.name} must be a non-negative number, got {v!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1]")


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


def evaluate(backend: Backend, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean validation loss over a fixed set of batches (token-weighted)."""
    from tqdm import tqdm

    total = sum(backend.loss(x, y) * x.size
                for x, y in tqdm(batches, desc="validation", unit="batch", leave=False, disable=None))
    return total / sum(x.size for x, _ in batches)


def train(config: ModelConfig, settings: TrainSettings, adamw: AdamWSettings, corpus: Corpus,
          make_backend: BackendFactory, out_dir: Path | None, *, resume: bool = False,
          tokenizer_file: Path | None = None, tokenizer_name: str = "byte",
          log: Callable[[str], None] = print, progress: bool | None = None,
          initial: dict[str, np.ndarray] | None = None, save_dtype: str = "fp32",
          generation_config: Path | None = None) -> TrainResult:
    """Train to ``settings.steps`` (from the latest checkpoint in ``out_dir`` when ``resume``).

    ``initial``: populated weights to start from (fresh optimizer state) instead of a random init.
    ``save_dtype``: the dtype of the checkpoints' model weights (fp32, or bf16 beside f32 masters);
    ``generation_config``: a generation_config.json copied into every checkpoint."""
    s = settings
    corpus.check_fits(s.batch_size, s.seq_len, config.vocab_size)
    position, start = 0, 0
    if resume:
        ckpt = load_checkpoint(out_dir)
        backend = make_backend(config, ckpt.params, adamw)
        start, position = int(ckpt.trainer["step"]), int(ckpt.trainer["data_position"])
        backend.load_optimizer_state(ckpt.optimizer, start)
        log(f"resumed from {ckpt.path} at step {start}")
    else:
        backend = make_backend(config, init_params(config, seed=s.seed) if initial is None else initial, adamw)
    val = val_batches(corpus.val, s.batch_size, s.seq_len, s.eval_batches)
    result = TrainResult(step=start)

    def checkpoint(step: int) -> None:
        trainer: dict[str, Any] = {"step": step, "data_position": position, "backend": backend.name,
                                   "tokenizer": tokenizer_name, "settings": dataclasses.asdict(s),
                                   "adamw": dataclasses.asdict(adamw),
                                   "val_loss": result.val_losses.get(step), "save_dtype": save_dtype}
        result.checkpoint = save_checkpoint(out_dir, step, config, backend.params,
                                            backend.optimizer_state(), trainer, tokenizer_file,
                                            save_dtype=save_dtype, generation_config=generation_config)

    metrics = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out_dir, start)
    started = time.perf_counter()

    def record(step: int, loss: float | None = None, lr: float | None = None, norm: float | None = None) -> None:
        if metrics is not None:
            metrics.record(step=step, train_loss=loss, val_loss=result.val_losses.get(step), lr=lr, grad_norm=norm,
                           tokens_per_s=result.tokens_per_s if loss is not None else None,
                           elapsed_s=round(time.perf_counter() - started, 3))

    if start == 0:
        result.val_losses[0] = evaluate(backend, val)
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
            result.val_losses[step] = evaluate(backend, val)
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
