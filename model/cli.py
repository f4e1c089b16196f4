"""`ptxgen train | generate`, and every generator command of ``ptxgen.cli``.

The console script lands here so that the generator (``ptxgen``) never imports the model; the
generator's own commands are passed through unchanged. Bad input prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import typing
from pathlib import Path
from typing import Callable, Sequence

from ptxgen import cli as ptxgen_cli
from ptxgen.spec import sha256_hex

from . import rundir
from .checkpoint import LATEST, Checkpoint, CheckpointError, load_checkpoint, resolve
from .config import ConfigError, ModelConfig, preset
from .data import ByteTokenizer, Corpus, DataError, HFTokenizer, Tokenizer, expand_paths, stdlib_files
from .footprint import MemoryTooSmall, check_fits, generate_bytes, n_params, train_bytes
from .generate import GenerateSettings, generate
from .numpy_backend import NumpyBackend, NumpyDecoder
from .optim import AdamWSettings
from .precision import Precision
from .settings import SettingsError, flag
from .train import RESUME_MAY_CHANGE, BackendFactory, TrainSettings, resume_conflict, saved_settings, train

DEVICES = ("auto", "cuda", "numpy")
PRECISIONS = tuple(p.value for p in Precision)


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog}: {message}")


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


def _add_settings(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; a flag not given stays out of the namespace, so that a resumed run can
    tell the flags given from its saved settings."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p.add_argument(flag(f.name), type=hints[f.name], default=argparse.SUPPRESS, help=f"(default {f.default})")


def _given(ns: argparse.Namespace, cls: type) -> dict:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def _sha256_file(path: Path) -> str:
    try:
        return sha256_hex(Path(path).read_bytes())
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


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


def _resume_inputs(ns: argparse.Namespace, ckpt: Checkpoint) -> None:
    """Fill ``--data``, ``--tokenizer`` and ``--precision`` from the saved run, refusing ones given
    that differ from it."""
    t = ckpt.trainer
    data = [str(Path(d).resolve()) for d in ns.data] if ns.data else None
    if "data" in t:
        if not (t["data"] is None or (isinstance(t["data"], list) and all(isinstance(d, str) for d in t["data"]))):
            raise CheckpointError(f"{ckpt.path / 'trainer.json'} is damaged: data must be a list of paths or null")
        if ns.data and data != t["data"]:
            raise UsageError(f"--resume: --data {' '.join(ns.data)} contradicts the run's saved "
                             f"{' '.join(t['data'] or ['(the stdlib)'])}")
        ns.data = t["data"]
    saved_tok = ckpt.tokenizer_path
    if ns.tokenizer:
        if saved_tok is None or _sha256_file(Path(ns.tokenizer)) != _sha256_file(saved_tok):
            raise UsageError(f"--resume: --tokenizer {ns.tokenizer} is not the tokenizer the run was saved with")
    ns.tokenizer = saved_tok
    saved_precision = t.get("precision")
    if saved_precision is not None and saved_precision not in PRECISIONS:
        raise CheckpointError(f"{ckpt.path / 'trainer.json'} is damaged: unknown precision {saved_precision!r}")
    if getattr(ns, "precision", None) and saved_precision and ns.precision != saved_precision:
        raise UsageError(f"--resume: --precision {ns.precision} contradicts the run's saved {saved_precision}")
    ns.precision = getattr(ns, "precision", None) or saved_precision or "fp32"


def cmd_train(argv: Sequence[str]) -> int:
    p = _Parser(prog="ptxgen train", description="Train the model (default: tiny, on the stdlib's source).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="tiny (default), qwen2-0.5b, llama-style")
    src.add_argument("--config", type=Path, help="an HF config.json instead of a preset")
    p.add_argument("--data", nargs="+", metavar="PATH", help="files or directories (default: the stdlib's .py files)")
    p.add_argument("--tokenizer", help="an HF tokenizer.json (default: bytes, vocab 256)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default=argparse.SUPPRESS,
                   help="bf16: the linear layers' GEMMs read bf16 operands (fp32 master weights); default fp32")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out, with the run's saved settings, data, "
                        "tokenizer and precision (flags that contradict them are refused)")
    _add_settings(p, TrainSettings)
    _add_settings(p, AdamWSettings)
    ns = p.parse_args(argv)
    config = ModelConfig.load(ns.config) if ns.config else preset(ns.preset or "tiny")
    out = ns.out or Path("runs") / (ns.preset or (ns.config.parent.name if ns.config else "tiny"))
    if ns.resume:
        if not (out / LATEST).exists():
            raise UsageError(f"--resume: no checkpoint in {out} (no {LATEST} file)")
        ckpt = load_checkpoint(out)
        if ckpt.config != config and (ns.preset or ns.config):
            raise UsageError(f"--resume: the checkpoint in {out} has another config than the one given")
        config = ckpt.config
        settings, adamw = _resume_settings(ns, ckpt)
        _resume_inputs(ns, ckpt)
    else:
        ckpt = None
        settings, adamw = TrainSettings(**_given(ns, TrainSettings)), AdamWSettings(**_given(ns, AdamWSettings))
        ns.precision = getattr(ns, "precision", "fp32")
    if settings.seq_len > config.max_position_embeddings:
        raise UsageError(f"--seq-len {settings.seq_len} is above the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    tokenizer = _tokenizer(ns.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens; the model's vocab_size is "
                         f"{config.vocab_size}")
    precision = Precision(ns.precision)
    line, backend = select_backend(ns.device, precision)
    on_gpu = backend is not NumpyBackend
    check_fits(train_bytes(config, settings.batch_size, settings.seq_len, on_gpu, precision is Precision.BF16),
               on_gpu, f"training {n_params(config) / 1e6:.1f}M parameters at batch {settings.batch_size}x"
                       f"{settings.seq_len}")
    files = expand_paths(ns.data) if ns.data else stdlib_files()
    rundir.prepare(out)
    factory: BackendFactory = functools.partial(backend, precision=precision)
    print(line, flush=True)
    corpus = Corpus.from_files(files, tokenizer)
    if ckpt is not None and ckpt.trainer.get("data_sha256", corpus.sha256) != corpus.sha256:
        raise UsageError("--resume: the data the run was saved with has changed since (its tokens' sha256 differs)")
    print(f"data: {corpus.n_files} files, {len(corpus.train)} train / {len(corpus.val)} validation tokens "
          f"({tokenizer.name}); model: {n_params(config) / 1e6:.2f}M parameters, hidden {config.hidden_size}, "
          f"{config.num_layers} layers; run: {out}", flush=True)
    run_state = {"precision": precision.value, "data_sha256": corpus.sha256,
                 "data": [str(Path(d).resolve()) for d in ns.data] if ns.data else None}
    with rundir.hold(out):
        result = train(config, settings, adamw, corpus, factory, out, resume=ckpt or False,
                       tokenizer_file=Path(ns.tokenizer) if ns.tokenizer else None, tokenizer_name=tokenizer.name,
                       run_state=run_state, log=lambda m: print(m, flush=True))
    if result.checkpoint is None or not result.checkpoint.is_dir():
        raise CheckpointError(f"the run ended at step {result.step} but its checkpoint {result.checkpoint} is missing")
    last_val = result.val_losses[max(result.val_losses)] if result.val_losses else float("nan")
    print(f"done: step {result.step}, val_loss {last_val:.4f}, {result.tokens_per_s:.0f} tokens/s, "
          f"checkpoint {result.checkpoint}")
    return 0


def _prompt_bytes(prompt: str) -> bytes:
    try:
        return prompt.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates
    except UnicodeEncodeError:
        raise UsageError("--prompt is not valid UTF-8") from None


def cmd_generate(argv: Sequence[str]) -> int:
    p = _Parser(prog="ptxgen generate", description="Continue a prompt with a trained checkpoint.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint or run directory")
    p.add_argument("--prompt", required=True)
    _add_settings(p, GenerateSettings)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="the GEMMs' operands (default fp32)")
    ns = p.parse_args(argv)
    gs = GenerateSettings(**_given(ns, GenerateSettings))
    text = _prompt_bytes(ns.prompt)
    precision = Precision(ns.precision)
    line, backend = select_backend(ns.device, precision)
    on_gpu = backend is not NumpyBackend
    path = resolve(ns.checkpoint)
    config = ModelConfig.load(path / "config.json")
    max_len = config.max_position_embeddings
    bound = min(max_len, len(text) + gs.max_new_tokens)  # tokenizers give at most about a token per byte
    check_fits(generate_bytes(config, bound, on_gpu), on_gpu,
               f"generating {bound} tokens with {n_params(config) / 1e6:.1f}M parameters")
    ckpt = load_checkpoint(path)
    tokenizer = _tokenizer(ckpt.tokenizer_path)
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise CheckpointError(f"{ckpt.tokenizer_path} has {tokenizer.vocab_size} tokens; the model's vocab_size "
                              f"is {ckpt.config.vocab_size}")
    prompt = tokenizer.encode(text)
    if not len(prompt):
        raise UsageError("--prompt is empty" if not text else
                         f"the tokenizer drops every character of --prompt {ns.prompt!r} (no tokens)")
    if len(prompt) > max_len:
        raise UsageError(f"--prompt has {len(prompt)} tokens; the model takes at most {max_len}")
    print(f"{line}, with a KV cache", file=sys.stderr, flush=True)
    max_len = min(max_len, len(prompt) + gs.max_new_tokens)
    if backend is NumpyBackend:
        decoder = NumpyDecoder(ckpt.config, ckpt.params, precision)
    else:
        from .cuda_model import CudaDecoder

        decoder = CudaDecoder(backend(ckpt.config, ckpt.params, AdamWSettings(), precision=precision), max_len)
    out = list(prompt)
    sys.stdout.write(ns.prompt)
    shown = len(tokenizer.decode(out))
    for token in generate(decoder, prompt, gs.max_new_tokens, gs.temperature, gs.top_k, gs.seed,
                          max_length=ckpt.config.max_position_embeddings):
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


def _guarded(name: str, command: Callable[[Sequence[str]], int]) -> Callable[[Sequence[str]], int]:
    """The model's bad-input errors as one line and exit 2 (the generator's are handled by ptxgen.cli)."""

    def run(argv: Sequence[str]) -> int:
        try:
            return command(argv)
        except (UsageError, ConfigError, CheckpointError, DataError, SettingsError, rundir.RunDirError,
                MemoryTooSmall) as e:
            print(f"ptxgen {name}: error: {e}", file=sys.stderr)
            return 2
        except FloatingPointError as e:  # the loss diverged: the checkpoints written so far stay
            print(f"ptxgen {name}: error: {e} (training diverged; try a lower --lr)", file=sys.stderr)
            return 2
        except MemoryError:  # an estimate that was too low: still one line
            print(f"ptxgen {name}: error: out of memory", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"ptxgen {name}: interrupted", file=sys.stderr)
            return 130

    return run


COMMANDS = {name: _guarded(name, cmd) for name, cmd in
            (("train", cmd_train), ("generate", cmd_generate), ("contracts", cmd_contracts))}
USAGE = """
  train [--preset tiny] [--data PATH ...] [--device auto|cuda|numpy] [--precision fp32|bf16] [--out DIR]
        [--resume] ...
  generate --checkpoint DIR --prompt TEXT [--temperature T] [--top-k K] [--max-new-tokens N] [--precision P]
  contracts validate|check [--root REPO]"""


def main(argv: Sequence[str] | None = None) -> int:
    return ptxgen_cli.main(argv, more=COMMANDS, more_usage=USAGE)


if __name__ == "__main__":
    sys.exit(main())
