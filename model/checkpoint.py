"""Checkpoints a run can resume from and Hugging Face transformers can load.

A run directory holds ``step-NNNNNNN/`` checkpoints and a ``latest`` file naming the newest. Each
checkpoint directory has ``config.json`` (HF Qwen2, or Llama for a model without Q/K/V biases),
``model.safetensors`` (HF tensor names, f32 or, with ``save_dtype="bf16"``, bf16 beside an f32
``master.safetensors`` so a resume stays exact), ``optimizer.safetensors`` (AdamW moments by
parameter name), ``trainer.json`` (step, data position, training settings) and, when the run has
them, ``tokenizer.json`` and ``generation_config.json``. ``load_checkpoint`` also reads directories
transformers wrote (model/hf.py). A checkpoint is written into a
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
from safetensors.numpy import save_file

from .config import ModelConfig
from .generation_config import Sampling
from .hf import (MASTER, SAVE_DTYPES, CheckpointError, copy_json, generation_defaults, model_params, read_config,
                 read_tensors, read_weights, write_weights)

LATEST = "latest"
__all__ = ["Checkpoint", "CheckpointError", "LATEST", "load_checkpoint", "resolve", "save_checkpoint"]


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    params: dict[str, np.ndarray]          # f32, our parameter set (no exported zero biases)
    optimizer: dict[str, np.ndarray]       # "exp_avg.<name>" / "exp_avg_sq.<name>", f32
    trainer: dict[str, Any]                # step, data position, settings, tokenizer
    sampling: Sampling = Sampling()        # generate's defaults and stop tokens (generation_config.json)

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / "tokenizer.json"
        return p if p.exists() else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.sampling.eos_token_ids

    @property
    def generation_config_path(self) -> Path | None:
        p = self.path / "generation_config.json"
        return p if p.exists() else None


def save_checkpoint(run_dir: Path, step: int, config: ModelConfig, params: dict[str, np.ndarray],
                    optimizer: dict[str, np.ndarray], trainer: dict[str, Any],
                    tokenizer_file: Path | None = None, keep: int = 2, save_dtype: str = "fp32",
                    generation_config: Path | None = None) -> Path:
    """Write ``run_dir/step-NNNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``save_dtype`` bf16 writes the model's weights in bf16 (as Qwen releases ship) and the f32
    master weights beside them, so a resume continues bit for bit."""
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=run_dir))
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_hf(SAVE_DTYPES[save_dtype][1]), indent=2) + "\n")
        write_weights(tmp / "model.safetensors", params, save_dtype)
        if save_dtype != "fp32":
            write_weights(tmp / MASTER, params, "fp32")
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in optimizer.items()},
                  str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        if generation_config is not None:
            copy_json(generation_config, tmp / "generation_config.json")
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
    """A checkpoint of ours or a directory transformers wrote: config through the closed key table,
    weights in their stored dtype (single or sharded), checked against the config."""
    path = resolve(path)
    hf = read_config(path)
    config = hf.config
    params = model_params(config, read_weights(path), path, zero_biases_exported=not config.qkv_bias)
    optimizer = read_tensors(path / "optimizer.safetensors") if (path / "optimizer.safetensors").exists() else {}
    trainer = json.loads((path / "trainer.json").read_text()) if (path / "trainer.json").exists() else {}
    return Checkpoint(path, config, {k: v.astype(np.float32) for k, v in params.items()}, optimizer, trainer,
                      generation_defaults(path, hf))
