"""`ptxgen train | generate`, and every generator command of ``ptxgen.cli``.

The console script lands here so that the generator (``ptxgen``) never imports the model; the
generator's own commands are passed through unchanged. Bad input prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import typing
from pathlib import Path
from typing import Callable, Sequence

from ptxgen import cli as ptxgen_cli

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, ModelConfig, preset
from .data import ByteTokenizer, Corpus, DataError, HFTokenizer, Tokenizer, expand_paths, stdlib_files
from .generate import generate
from .numpy_backend import NumpyBackend, NumpyDecoder
from .optim import AdamWSettings
from .params import param_shapes
from .precision import Precision
from .train import BackendFactory, TrainSettings, train

DEVICES = ("auto", "cuda", "numpy")
PRECISIONS = tuple(p.value for p in Precision)


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog}: {message}")


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
    reason = "as asked" if device == "numpy" else f"no CUDA GPU: {why}"
    return f"device: {NumpyBackend.description}, {gemms}, {reason}", NumpyBackend


def _tokenizer(path: str | Path | None) -> Tokenizer:
    return HFTokenizer(Path(path)) if path else ByteTokenizer()


def _add_settings(p: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p.add_argument("--" + f.name.replace("_", "-"), type=hints[f.name], default=f.default,
                       help=f"(default {f.default})")


def cmd_train(argv: Sequence[str]) -> int:
    p = _Parser(prog="ptxgen train", description="Train the model (default: tiny, on the stdlib's source).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="tiny (default), qwen2-0.5b, llama-style")
    src.add_argument("--config", type=Path, help="an HF config.json instead of a preset")
    p.add_argument("--data", nargs="+", metavar="PATH", help="files or directories (default: the stdlib's .py files)")
    p.add_argument("--tokenizer", help="an HF tokenizer.json (default: bytes, vocab 256)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: the linear layers' GEMMs read bf16 operands (fp32 master weights); default fp32")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _add_settings(p, TrainSettings)
    _add_settings(p, AdamWSettings)
    ns = p.parse_args(argv)
    try:
        settings = TrainSettings(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainSettings)})
        adamw = AdamWSettings(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(AdamWSettings)})
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = ModelConfig.load(ns.config) if ns.config else preset(ns.preset or "tiny")
    out = ns.out or Path("runs") / (ns.preset or (ns.config.parent.name if ns.config else "tiny"))
    if ns.resume:
        saved = load_checkpoint(out)
        if saved.config != config and (ns.preset or ns.config):
            raise UsageError(f"--resume: the checkpoint in {out} has another config than the one given")
        config = saved.config
    tokenizer = _tokenizer(ns.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens; the model's vocab_size is "
                         f"{config.vocab_size}")
    precision = Precision(ns.precision)
    line, backend = select_backend(ns.device, precision)
    factory: BackendFactory = functools.partial(backend, precision=precision)
    print(line, flush=True)
    files = expand_paths(ns.data) if ns.data else stdlib_files()
    corpus = Corpus.from_files(files, tokenizer)
    n_params = sum(math.prod(shape) for shape in param_shapes(config).values())
    print(f"data: {corpus.n_files} files, {len(corpus.train)} train / {len(corpus.val)} validation tokens "
          f"({tokenizer.name}); model: {n_params / 1e6:.2f}M parameters, hidden {config.hidden_size}, "
          f"{config.num_layers} layers; run: {out}", flush=True)
    result = train(config, settings, adamw, corpus, factory, out, resume=ns.resume,
                   tokenizer_file=Path(ns.tokenizer) if ns.tokenizer else None, tokenizer_name=tokenizer.name,
                   log=lambda m: print(m, flush=True))
    last_val = result.val_losses[max(result.val_losses)] if result.val_losses else float("nan")
    print(f"done: step {result.step}, val_loss {last_val:.4f}, {result.tokens_per_s:.0f} tokens/s, "
          f"checkpoint {result.checkpoint}")
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    p = _Parser(prog="ptxgen generate", description="Continue a prompt with a trained checkpoint.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint or run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="the GEMMs' operands (default fp32)")
    ns = p.parse_args(argv)
    if ns.temperature < 0 or ns.top_k < 0 or ns.max_new_tokens < 0:
        raise UsageError("--temperature, --top-k and --max-new-tokens must be >= 0")
    ckpt = load_checkpoint(ns.checkpoint)
    tokenizer = _tokenizer(ckpt.tokenizer_path)
    prompt = tokenizer.encode(ns.prompt.encode())
    if not len(prompt):
        raise UsageError("--prompt is empty")
    if len(prompt) > ckpt.config.max_position_embeddings:
        raise UsageError(f"--prompt has {len(prompt)} tokens; the model takes at most "
                         f"{ckpt.config.max_position_embeddings}")
    precision = Precision(ns.precision)
    line, backend = select_backend(ns.device, precision)
    print(f"{line}, with a KV cache", file=sys.stderr, flush=True)
    max_len = min(ckpt.config.max_position_embeddings, len(prompt) + ns.max_new_tokens)
    if backend is NumpyBackend:
        decoder = NumpyDecoder(ckpt.config, ckpt.params, precision)
    else:
        from .cuda_model import CudaDecoder

        decoder = CudaDecoder(backend(ckpt.config, ckpt.params, AdamWSettings(), precision=precision), max_len)
    out = list(prompt)
    sys.stdout.write(ns.prompt)
    shown = len(tokenizer.decode(out))
    for token in generate(decoder, prompt, ns.max_new_tokens, ns.temperature, ns.top_k, ns.seed,
                          max_length=ckpt.config.max_position_embeddings):
        out.append(token)
        text = tokenizer.decode(out)
        sys.stdout.write(text[shown:])  # decode the whole so multi-byte characters come out whole
        sys.stdout.flush()
        shown = len(text)
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
        except (UsageError, ConfigError, CheckpointError, DataError) as e:
            print(f"ptxgen {name}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"ptxgen {name}: interrupted", file=sys.stderr)
            return 130

    return run


COMMANDS = {name: _guarded(name, cmd) for name, cmd in
            (("train", cmd_train), ("generate", cmd_generate), ("contracts", cmd_contracts))}
COMMANDS["cache"] = lambda argv: __import__("runtime.cachecli").cachecli.main(argv)  # ls | show | diff
USAGE = """
  train [--preset tiny] [--data PATH ...] [--device auto|cuda|numpy] [--precision fp32|bf16] [--out DIR]
        [--resume] ...
  generate --checkpoint DIR --prompt TEXT [--temperature T] [--top-k K] [--max-new-tokens N] [--precision P]
  contracts validate|check [--root REPO]
  cache [--cache-dir DIR] ls | show KEY | diff KEY KEY"""


def main(argv: Sequence[str] | None = None) -> int:
    return ptxgen_cli.main(argv, more=COMMANDS, more_usage=USAGE)
