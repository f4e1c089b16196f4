"""Training data: tokenizers, the corpus (default: the Python standard library's own source), batches.

Everything is deterministic: files in sorted order, a fixed train/validation split by file, and
batches taken in order from the token stream, so a data position (one integer) is enough to resume.
"""
from __future__ import annotations

import json
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

from ptxgen.files import read_file, why
from ptxgen.spec import sha256_hex

from .config import unique_keys

VAL_EVERY = 20  # every 20th file (in sorted order) is validation data: about 5%


class DataError(ValueError):
    """Data that cannot be trained on; one line for the user."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    files: dict[str, bytes]  # what a checkpoint keeps to load the same tokenizer: file name -> bytes as read
    added: int  # tokens encode adds to every text (a post-processor's BOS): a text's own tokens are the rest

    def encode(self, text: bytes) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """One token per byte: vocab 256, nothing to train or ship."""

    name = "byte"
    vocab_size = 256
    files: dict[str, bytes] = {}
    added = 0

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(text, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """The bytes as UTF-8 (malformed sequences, and ids past the 256 bytes that a model with a
        larger vocabulary may still produce, as U+FFFD): such an id reads as the byte 0xFF, which
        no UTF-8 sequence holds, so the decoder replaces it alone."""
        return bytes(i if 0 <= i < self.vocab_size else 0xFF for i in map(int, ids)).decode("utf-8", errors="replace")


# What transformers' AutoTokenizer reads beside tokenizer.json (vocab.json and merges.txt are the slow
# tokenizer's, which tokenizer.json replaces): the special tokens, add_bos_token, the chat template
TOKENIZER_SIDECARS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def read_tokenizer_files(path: Path) -> dict[str, bytes]:
    """A tokenizer.json (kept under that name whatever it is called) and the sidecars beside it, as read
    now: a run encodes with these bytes and copies the same into its checkpoints. A sidecar that is there
    but cannot be read (a dangling link) is refused, not skipped."""
    path = Path(path)
    files = {"tokenizer.json": path, **{name: path.parent / name for name in TOKENIZER_SIDECARS
                                        if os.path.lexists(path.parent / name)}}
    out = {}
    for name, file in files.items():
        try:
            out[name] = read_file(file)
        except OSError as e:
            raise DataError(f"cannot load tokenizer {file}: {why(e)}") from None
    return out


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` library), encoding as transformers'
    ``tokenizer(text)`` does: the file's post-processor adds its special tokens (a Llama tokenizer's
    BOS), nothing is truncated or padded, and ``tokenizer_config.json`` beside it is honoured where it
    changes the ids (``split_special_tokens``) and refused where it contradicts the file (``add_bos_token``,
    ``add_eos_token``: transformers 5.x rebuilds the post-processor from them, 4.x kept the file's)."""

    name = "tokenizer.json"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        self.files = read_tokenizer_files(self.path)
        try:
            self._tok = _Tokenizer.from_str(self.files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # the library raises its own types for unreadable and malformed files
            raise DataError(f"cannot load tokenizer {self.path}: {str(e).splitlines()[0]}") from None
        # transformers' tokenizer(text) turns off a truncation or padding the file stores (truncation=False,
        # padding=False): kept, each file of a corpus was cut to (or padded to) the stored length
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = self._tok.get_vocab_size()
        post = self._tok.post_processor
        self.added = post.num_special_tokens_to_add(False) if post is not None else 0
        config = self._json("tokenizer_config.json")
        split = config.get("split_special_tokens", False)
        if not isinstance(split, bool):
            raise self._refused(f"split_special_tokens = {split!r}", "must be true or false")
        self._tok.encode_special_tokens = split  # true: "<|endoftext|>" in a text is text, as transformers reads it
        self._check_bos_eos(config)

    def _json(self, name: str) -> dict:
        if name not in self.files:
            return {}
        try:
            data = json.loads(self.files[name].decode("utf-8"), object_pairs_hook=unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DataError(f"cannot read {self.path.parent / name}: {why(e)}") from None
        if not isinstance(data, dict):
            raise DataError(f"{self.path.parent / name} must hold a JSON object, got {type(data).__name__}")
        return data

    def _refused(self, said: str, reason: str) -> DataError:
        return DataError(f"{self.path.parent / 'tokenizer_config.json'}: {said}: {reason}")

    def _check_bos_eos(self, config: dict) -> None:
        """``add_bos_token`` / ``add_eos_token``, where either is given, must say what the post-processor
        adds: transformers 5.x then rebuilds it as [bos] text [eos] from them (the other one false, a token
        the files do not name left out), its 4.x generic tokenizer kept the file's. Two readings of one
        folder are refused, not resolved in favour of either."""
        given = {k: config[k] for k in ("add_bos_token", "add_eos_token") if k in config}
        if not given:
            return
        for key, value in given.items():
            if not isinstance(value, bool):
                raise self._refused(f"{key} = {value!r}", "must be true or false")
        special_map = self._json("special_tokens_map.json")
        added: dict[str, list[int]] = {}
        for key, role in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
            token = config.get(role, special_map.get(role))
            token = token.get("content") if isinstance(token, dict) else token
            if not given.get(key) or token is None:
                added[key] = []
            elif not isinstance(token, str) or self._tok.token_to_id(token) is None:
                raise self._refused(f"{role} = {token!r}", f"is not a token of {self.path}")
            else:
                added[key] = [self._tok.token_to_id(token)]
        probe = "a"
        try:
            text = self._tok.encode(probe, add_special_tokens=False).ids
        except Exception:  # a vocabulary without "a" and without an unknown token: the special tokens alone
            probe, text = "", []
        got, want = self._tok.encode(probe).ids, added["add_bos_token"] + text + added["add_eos_token"]
        if got != want:
            raise self._refused(", ".join(f"{k} = {v!r}" for k, v in given.items()),
                                f"tokenizer.json's post-processor encodes {probe!r} as {got}, this file as {want} "
                                "(transformers 5.x follows this file, 4.x tokenizer.json): make them agree")

    def encode(self, text: bytes) -> np.ndarray:
        # strict: a file that is not UTF-8 read with U+FFFD in place of its bad bytes trained the model on
        # text that is in no file (the UnicodeDecodeError's offset is said by the caller, with the file)
        text = text.decode("utf-8")
        try:
            ids = self._tok.encode(text).ids  # with the post-processor's special tokens
        except Exception as e:  # the library's own type: a word-level vocabulary without its unknown token
            raise DataError(f"{self.path} cannot encode it: {str(e).splitlines()[0]}") from None
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (third-party site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and every file under directories named (hidden ones skipped), sorted per argument."""
    files: list[Path] = []
    for arg in paths:
        p = Path(arg)
        try:
            mode = p.stat().st_mode
        except OSError as e:  # missing, a symbolic link loop, a folder that cannot be searched
            raise DataError(f"{(e.strerror or type(e).__name__).lower()}: {p}") from None
        if stat.S_ISDIR(mode):
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif stat.S_ISREG(mode):
            files.append(p)
        else:  # a device or a pipe: reading it could block or never end
            raise DataError(f"not a regular file or directory: {p}")
    return files


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # int32 token ids, files concatenated in order
    val: np.ndarray
    n_files: int

    @classmethod
    def from_files(cls, files: Sequence[Path], tokenizer: Tokenizer) -> "Corpus":
        train: list[np.ndarray] = []
        val: list[np.ndarray] = []
        for i, path in enumerate(files):
            try:
                ids = tokenizer.encode(path.read_bytes())
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror}") from None
            except DataError as e:
                raise DataError(f"{path}: {e}") from None
            except UnicodeDecodeError as e:  # a tokenizer.json reads text; the byte tokenizer never raises it
                raise DataError(f"{path} is not valid UTF-8 (byte {e.start}: 0x{e.object[e.start]:02x}); "
                                f"{tokenizer.name} reads UTF-8 text (the byte tokenizer reads any bytes)") from None
            (val if i % VAL_EVERY == VAL_EVERY - 1 else train).append(ids)
        # (a text's own tokens: files that hold no text the tokenizer keeps, each a lone BOS, are no corpus)
        if not files or not sum(len(t) - tokenizer.added for t in train):
            raise DataError("the corpus is empty: no tokens in the files given")
        if not val:  # too few files for a split by file: hold out the stream's tail instead
            stream = np.concatenate(train)
            cut = len(stream) - max(1, len(stream) // VAL_EVERY)
            return cls(stream[:cut], stream[cut:], len(files))
        return cls(np.concatenate(train), np.concatenate(val), len(files))

    @property
    def sha256(self) -> str:
        """Of the token streams: a resumed run checks it trains on the same data."""
        return sha256_hex(b"".join(len(s).to_bytes(8, "little") + np.ascontiguousarray(s, dtype="<i4").tobytes()
                                   for s in (self.train, self.val)))

    def check_fits(self, batch: int, seq: int, vocab_size: int) -> None:
        if len(self.train) < batch * seq + 1:
            raise DataError(f"the corpus has {len(self.train)} training tokens; a batch of "
                            f"{batch}x{seq} needs {batch * seq + 1}")
        if len(self.val) < seq + 1:
            raise DataError(f"the corpus has {len(self.val)} validation tokens; seq_len {seq} needs {seq + 1}")
        top = int(max(self.train.max(), self.val.max()))
        if top >= vocab_size:
            raise DataError(f"token id {top} does not fit the model's vocab_size {vocab_size}")


def batch_at(stream: np.ndarray, position: int, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(inputs [batch, seq], next-token targets, next position).

    The stream is cut into ``batch`` lanes, one row of each batch per lane, and ``position`` walks
    the lanes together (wrapping to their start): a batch's rows come from places far apart in the
    corpus (not from one file), every token is seen once an epoch, and one integer still says where
    a resumed run continues.
    """
    lane = (len(stream) - 1) // batch
    if position + seq > lane:
        position = 0
    starts = np.arange(batch) * lane + position
    rows = np.stack([stream[s:s + seq + 1] for s in starts])
    return rows[:, :-1], rows[:, 1:], position + seq


def val_batch_count(stream: np.ndarray, batch: int, seq: int) -> int:
    """How many validation batches the stream holds: ``val_batches`` gives at most these, whatever
    ``count`` it is asked for (a stream shorter than one batch: one, of the rows it holds)."""
    return max(1, (len(stream) - 1) // seq // batch)


def val_batches(stream: np.ndarray, batch: int, seq: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed set of validation batches spread evenly over the validation stream (``count``, or as
    many as it holds: ``val_batch_count``)."""
    windows = (len(stream) - 1) // seq
    rows = np.unique(np.linspace(0, windows - 1, min(windows, batch * count)).astype(np.int64))
    if len(rows) >= batch:  # whole batches only: a GPU backend then needs no second batch shape
        rows = rows[:len(rows) // batch * batch]
    starts = rows * seq
    xs = np.stack([stream[s:s + seq] for s in starts])
    ys = np.stack([stream[s + 1:s + seq + 1] for s in starts])
    return [(xs[i:i + batch], ys[i:i + batch]) for i in range(0, len(starts), batch)]
