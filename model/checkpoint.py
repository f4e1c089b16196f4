"""Checkpoints a run can resume from and Hugging Face transformers can load.

A run directory holds ``step-NNNNNNN/`` checkpoints and a ``latest`` file naming the newest. Each
checkpoint directory has ``config.json`` (HF Qwen2, or Llama for a model without Q/K/V biases),
``model.safetensors`` (HF tensor names, f32 or, with ``save_dtype="bf16"``, bf16 beside an f32
``master.safetensors`` so a resume stays exact), ``optimizer.safetensors`` (AdamW moments by
parameter name), ``trainer.json`` (step, data position, training settings), when the run has them
``tokenizer.json`` with the files transformers reads beside it (``tokenizer_config.json``, ...) and
``generation_config.json``, and ``manifest.json`` (written last: the size and
sha256 of every other file). A checkpoint is written into a temporary directory and renamed into
place, then ``latest`` is replaced atomically, so a crash at any point leaves the previous checkpoint
whole and ``latest`` naming a complete one. Rotation removes only checkpoints older than the one
just written, never the one ``latest`` names.

Loading verifies the manifest when there is one (checkpoints transformers wrote have none; model/hf.py
reads their config and weights), refuses non-finite weights and optimizer moments, and checks the
trainer state's types: a damaged file is one ``CheckpointError`` line, never loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ptxgen.files import default_mode, fsync_dir, fsync_fd, fsync_tree, read_file, write_atomic
from ptxgen.spec import sha256_hex

from .config import ModelConfig
from .data import TOKENIZER_SIDECARS
from .generation_config import Sampling
from .hf import (SAVE_DTYPES, MASTER, CheckpointError, generation_defaults, model_params, read_config,
                 read_tensors, read_weights, save_tensors, write_weights)
from .params import param_shapes

LATEST = "latest"
TOKENIZER_FILES = ("tokenizer.json", *TOKENIZER_SIDECARS)
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-(\d{7,})")
_LATEST_TEXT = re.compile(rb"(step-\d{7,})\n?")  # exactly as written: any other byte is damage
_HOST = socket.gethostname().replace(".", "_")
_ASIDE = ".aside."
# .step-NNNNNNN.<host>.<pid>.<random> (a checkpoint being written), .aside.step-NNNNNNN.<host>.<pid>.<random>
# (one moved aside for a same-step rewrite), .latest.<host>.<pid>.<random>; older versions: .step-N.<random>
_TEMP = re.compile(r"(?:(?P<aside>\.aside\.)|\.)(?P<name>step-\d{7,}|latest)\."
                   r"(?:(?P<host>[^.]+)\.(?P<pid>\d+)\.)?[A-Za-z0-9_]+")
_UNOWNED_GRACE_S = 3600
__all__ = ["Checkpoint", "CheckpointError", "LATEST", "STEP_DIR", "load_checkpoint", "resolve", "save_checkpoint",
           "step_of"]


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
        # anything by that name, a dangling link too, is the tokenizer: read (and refused if unreadable),
        # never skipped (a model of 256 tokens was then fed bytes)
        p = self.path / "tokenizer.json"
        return p if os.path.lexists(p) else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.sampling.eos_token_ids

    @property
    def generation_config_path(self) -> Path | None:
        p = self.path / "generation_config.json"
        return p if os.path.lexists(p) else None


def save_checkpoint(run_dir: Path, step: int, config: ModelConfig, params: dict[str, np.ndarray],
                    optimizer: dict[str, np.ndarray], trainer: dict[str, Any],
                    tokenizer: Mapping[str, bytes] | None = None, keep: int = 2, save_dtype: str = "fp32",
                    generation_config: Path | bytes | None = None) -> Path:
    """Write ``run_dir/step-NNNNNNN`` atomically with its manifest, point ``latest`` at it, and keep
    it and the newest ``keep - 1`` older ones (``keep`` <= 0: keep all).

    ``save_dtype`` bf16 writes the model's weights in bf16 (as Qwen releases ship) and the f32
    master weights beside them, so a resume continues bit for bit. ``tokenizer``: the tokenizer's files
    by name, as read when the run started (``Tokenizer.files``); ``generation_config`` is copied in (bytes
    read when the run started, or a file)."""
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner()}.", dir=run_dir))
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_hf(SAVE_DTYPES[save_dtype][1]), indent=2) + "\n")
        write_weights(tmp / "model.safetensors", params, save_dtype)
        if save_dtype != "fp32":
            write_weights(tmp / MASTER, params, "fp32")
        if optimizer:
            save_tensors(tmp / "optimizer.safetensors",
                         {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in optimizer.items()})
        if trainer:
            (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
        for name, data in (tokenizer or {}).items():
            if name not in TOKENIZER_FILES:  # (a name is a file of this folder, never a path)
                raise ValueError(f"{name!r} is not a tokenizer file ({', '.join(TOKENIZER_FILES)})")
            (tmp / name).write_bytes(data)
        if isinstance(generation_config, bytes):  # as read when the run started
            (tmp / "generation_config.json").write_bytes(generation_config)
        elif generation_config is not None:
            shutil.copyfile(generation_config, tmp / "generation_config.json")
        write_manifest(tmp)
        for entry in (*tmp.iterdir(), tmp):  # as the run's other files: mkdtemp's and safetensors' are private
            os.chmod(entry, default_mode(entry.is_dir()))
        fsync_tree(tmp)  # on disk before it is named: a crash never leaves a named checkpoint half written
        if final.exists():  # a re-run of the same step replaces it; moved aside first, put back on failure
            old = Path(tempfile.mkdtemp(prefix=f"{_ASIDE}{final.name}.{_owner()}.", dir=run_dir))
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(run_dir)  # the step's name, before latest points at it
    fd, pointer = tempfile.mkstemp(prefix=f".{LATEST}.{_owner()}.", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(final.name + "\n")
            os.fchmod(fd, default_mode())  # (mkstemp makes it private)
            f.flush()
            fsync_fd(fd, pointer)
        os.replace(pointer, run_dir / LATEST)
    except BaseException:  # (a failed sync, an interrupt: not left for the next run's cleanup)
        Path(pointer).unlink(missing_ok=True)
        raise
    fsync_dir(run_dir)  # latest's new target is durable before rotation removes older checkpoints
    _rotate(run_dir, final, keep)
    remove_stale_temporaries(run_dir)
    return final


def _owner() -> str:
    """In every temporary's name, so that a cleanup can tell live writers from dead ones."""
    return f"{_HOST}.{os.getpid()}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name (step-NNNNNNN), None for any other name."""
    m = STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def _rotate(run_dir: Path, final: Path, keep: int) -> None:
    """Remove checkpoints older than ``final`` beyond the newest ``keep - 1`` of them; never one
    ``latest`` names and never one newer than ``final`` (another run's history may live there)."""
    if keep <= 0:
        return
    current = step_of(final.name)
    older = sorted((s, d) for d in run_dir.iterdir() if (s := step_of(d.name)) is not None and s < current)
    latest = read_latest(run_dir)
    for _, old in older[:max(0, len(older) - (keep - 1))]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def _alive(host: str, pid: int) -> bool:
    """Whether a temporary's writer may still be running (this process counts as running)."""
    if host != _HOST:
        return True  # another machine's process: we cannot tell, so it is left alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporaries (``.step-NNNNNNN.*``, ``.latest.*``) that crashed writers left behind.

    A temporary names its writer (host and pid): one whose writer is alive on this host, or runs on
    another host, is left alone. A checkpoint moved aside for a same-step rewrite is put back when
    its writer died before the new one took its place. Temporaries of older versions, which carry no
    owner, are removed once they are an hour old. Returns what was removed."""
    removed = []
    for entry in Path(run_dir).iterdir():
        m = _TEMP.fullmatch(entry.name)
        if m is None:
            continue
        if m.group("host") is not None:
            if _alive(m.group("host"), int(m.group("pid"))):
                continue
        else:
            try:
                if time.time() - entry.lstat().st_mtime < _UNOWNED_GRACE_S:
                    continue
            except FileNotFoundError:
                continue
        target = Path(run_dir) / m.group("name")
        if m.group("aside") and step_of(target.name) is not None and not target.exists():
            os.replace(entry, target)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def read_latest(run_dir: Path) -> str | None:
    """The checkpoint name ``latest`` holds, checked to be one (None when there is no ``latest``)."""
    path = Path(run_dir) / LATEST
    if not path.exists():
        return None
    try:
        m = _LATEST_TEXT.fullmatch(read_file(path))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if m is None:
        raise CheckpointError(f"{path} is damaged: it does not hold one step-NNNNNNN name")
    return m.group(1).decode()


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a run directory whose ``latest`` names one."""
    path = Path(path)
    if (path / LATEST).exists():
        named = path / read_latest(path)
        if not named.is_dir():
            what = "is not a checkpoint folder" if os.path.lexists(named) else "does not exist"
            raise CheckpointError(f"{path / LATEST} names {named.name}, which {what}")
        path = named
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no checkpoint at {path} (no config.json)")
    return path


# -- integrity: each check a small function the load path calls -----------------------------------
def _sha256(path: Path) -> str:
    try:
        return sha256_hex(read_file(path))  # released before the tensors are read
    except OSError as e:  # e.g. removed by a run's rotation while being read
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def write_manifest(path: Path) -> None:
    """Record the size and sha256 of every file in checkpoint ``path``; written last."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(Path(path).iterdir()) if f.is_file() and f.name != MANIFEST}
    write_atomic(Path(path) / MANIFEST, (json.dumps({"format": 1, "files": files}, indent=2) + "\n").encode())


def manifest_digests(path: Path) -> dict[str, str] | None:
    """{file name: sha256} of every file of checkpoint ``path`` as its manifest lists them (what
    ``load_checkpoint`` verified the files against), or None where it has no manifest."""
    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        return None
    return {name: entry["sha256"] for name, entry in sorted(_read_json(manifest)["files"].items())}


def verify_manifest(path: Path) -> bool:
    """Check every file of checkpoint ``path`` against its manifest; False when there is none
    (a checkpoint another tool wrote). A file missing, changed or not listed is refused."""
    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        if (Path(path) / "trainer.json").exists():  # ours: written with one, so one removed is damage
            raise CheckpointError(f"{manifest} is missing: a checkpoint of a run of ours without its manifest "
                                  "cannot be verified")
        return False
    data = _read_json(manifest)
    if not isinstance(data, dict) or data.get("format") != 1:
        raise CheckpointError(f"{manifest} is damaged: not a format-1 manifest")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and type(v.get("bytes")) is int
            for v in files.values()):
        raise CheckpointError(f"{manifest} is damaged: 'files' is not a map of name -> bytes, sha256")
    for name in sorted(files):
        f = Path(path) / name
        if "/" in name or name in ("", ".", "..") or not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {MANIFEST})")
        if f.stat().st_size != files[name]["bytes"] or _sha256(f) != files[name]["sha256"]:
            raise CheckpointError(f"{f} is damaged: its sha256 differs from the one in {MANIFEST}")
    extra = sorted(f.name for f in Path(path).iterdir()
                   if f.is_file() and f.name != MANIFEST and f.name not in files and not f.name.startswith("."))
    if extra:
        raise CheckpointError(f"{Path(path) / extra[0]} is not listed in {MANIFEST}")
    return True


def check_finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        raise CheckpointError(f"{name} holds non-finite values (NaN or infinity)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_file(path))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise CheckpointError(f"{path} is damaged: {(str(e).splitlines() or ['not JSON'])[0]}") from None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer.json`` as a dict whose step and data position are non-negative integers and whose
    settings, when present, are JSON objects ({} when the checkpoint has none)."""
    file = Path(path) / "trainer.json"
    if not file.exists():
        return {}
    state = _read_json(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is damaged: not a JSON object")
    for key in ("step", "data_position"):
        v = state.get(key)
        if type(v) is not int or v < 0:
            raise CheckpointError(f"{file} is damaged: {key} must be a non-negative integer, got {v!r}")
    for key in ("settings", "adamw"):
        if key in state and not isinstance(state[key], dict):
            raise CheckpointError(f"{file} is damaged: {key} must be a JSON object")
    return state


def read_optimizer_state(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """``optimizer.safetensors``: both AdamW moments of every parameter, f32, of its shape, finite,
    the second moment non-negative ({} when the checkpoint has none)."""
    file = Path(path) / "optimizer.safetensors"
    if not file.exists():
        return {}
    state = read_tensors(file)
    names = {f"{m}.{k}": shape for k, shape in expected.items() for m in ("exp_avg", "exp_avg_sq")}
    missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected {extra[0]}"
        raise CheckpointError(f"{file} does not match the model: it {what}")
    for name, shape in names.items():
        t = state[name]
        if t.dtype != np.float32 or t.shape != shape:
            raise CheckpointError(f"{file}: {name} is {t.dtype}{list(t.shape)}, expected float32{list(shape)}")
        check_finite(f"{file}: {name}", t)
        if name.startswith("exp_avg_sq.") and np.any(t < 0):
            raise CheckpointError(f"{file}: {name} holds negative values")
    return state


def load_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint of ours or a directory transformers wrote: config through the closed key table,
    weights in their stored dtype (single or sharded), checked against the config (its dtype too)."""
    path = resolve(path)
    verify_manifest(path)
    hf = read_config(path)
    config = hf.config
    params = model_params(config, read_weights(path, hf), path, zero_biases_exported=not config.qkv_bias)
    optimizer = read_optimizer_state(path, param_shapes(config))
    trainer = read_trainer_state(path)
    return Checkpoint(path, config, params, optimizer, trainer, generation_defaults(path, hf))
