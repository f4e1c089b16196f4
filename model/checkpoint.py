"""Checkpoints a run can resume from and Hugging Face transformers can load.

A run directory holds ``step-NNNNNNN/`` checkpoints and a ``latest`` file naming the newest. Each
checkpoint directory has ``config.json`` (HF Qwen2), ``model.safetensors`` (HF tensor names, f32),
``optimizer.safetensors`` (AdamW moments by parameter name), ``trainer.json`` (step, data position,
training settings) and, when the run used one, ``tokenizer.json``. A checkpoint is written into a
temporary directory and renamed into place, then ``latest`` is replaced atomically, so a crash at
any point leaves the previous checkpoint whole and ``latest`` naming a complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .config import ConfigError, ModelConfig
from .params import param_shapes

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not match its config; one line for the user."""


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    params: dict[str, np.ndarray]          # f32, our parameter set (no exported zero biases)
    optimizer: dict[str, np.ndarray]       # "exp_avg.<name>" / "exp_avg_sq.<name>", f32
    trainer: dict[str, Any]                # step, data position, settings, tokenizer

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / "tokenizer.json"
        return p if p.exists() else None


def _hf_weights(config: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' Qwen2 always has Q/K/V biases: a bias-free model exports them as zeros."""
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
    if not config.qkv_bias:
        for name, shape in param_shapes(config.replace(qkv_bias=True)).items():
            if name.endswith(".bias"):
                out[name] = np.zeros(shape, np.float32)
    return out


def save_checkpoint(run_dir: Path, step: int, config: ModelConfig, params: dict[str, np.ndarray],
                    optimizer: dict[str, np.ndarray], trainer: dict[str, Any],
                    tokenizer_file: Path | None = None, keep: int = 2) -> Path:
    """Write ``run_dir/step-NNNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=run_dir))
    try:
        config.save(tmp / "config.json")
        save_file(_hf_weights(config, params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in optimizer.items()},
                  str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        if final.exists():  # a re-run of the same step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = run_dir / f".{LATEST}.{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, run_dir / LATEST)
    for old in sorted(run_dir.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a run directory whose ``latest`` names one."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no checkpoint at {path} (no config.json)")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    path = resolve(path)
    try:
        config = ModelConfig.load(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    weights = _read_tensors(path / "model.safetensors")
    expected = param_shapes(config)
    if not config.qkv_bias:
        for name in [n for n in weights if n.endswith(".bias")]:
            if np.any(weights.pop(name)):
                raise CheckpointError(f"config/weights mismatch: {name} is not zero but the config has no Q/K/V bias")
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"config/weights mismatch in {path}: {what} "
                              f"({len(missing)} missing, {len(extra)} unexpected)")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise CheckpointError(f"config/weights mismatch: {name} has shape {weights[name].shape}, "
                                  f"config says {shape}")
    optimizer = _read_tensors(path / "optimizer.safetensors") if (path / "optimizer.safetensors").exists() else {}
    trainer = json.loads((path / "trainer.json").read_text()) if (path / "trainer.json").exists() else {}
    return Checkpoint(path, config, {k: weights[k].astype(np.float32) for k in expected}, optimizer, trainer)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
