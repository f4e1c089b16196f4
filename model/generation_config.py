"""``generation_config.json`` through a closed table, as config.json is (model/hf_config.py).

transformers' ``generate()`` takes its defaults from this file: a Qwen2.5 Instruct release samples
at temperature 0.7, top-p 0.8, top-k 20 with a repetition penalty of 1.05. A key that changes what
is generated and is not implemented here (beam search, n-gram blocking, min-p ...) is refused with
one line rather than ignored; keys that only matter to other decoders are listed as having no effect.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError, finite_float, read_json, shown
from .hf_config import only_check, token_ids_check


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, with transformers' meaning and defaults."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50             # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    max_length: int | None = None    # prompt + new tokens, when max_new_tokens is not given
    eos_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.do_sample


def _fail(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"generation_config.json: {key} = {shown(value)}: {why}")


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail(key, v, "must be true or false (a JSON boolean)")
    return v


def _number(low: float, high: float, low_open: bool = False) -> Callable[[str, Any], float]:
    def check(key: str, v: Any) -> float:
        f = finite_float(v)
        if f is None or not (low < f if low_open else low <= f) or not f <= high:
            raise _fail(key, v, f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}]")
        return f
    return check


def _count(key: str, v: Any) -> int | None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise _fail(key, v, "must be a non-negative integer or null")
    return v


def _positive_count(key: str, v: Any) -> int | None:
    # transformers refuses max_new_tokens 0 (GenerationConfig.validate); here it read as "not given"
    # and the default length ran in its place
    if _count(key, v) == 0:
        raise _fail(key, v, "must be a positive integer or null (transformers refuses 0 too)")
    return v


def _top_k(key: str, v: Any) -> int | None:
    if v is None:  # 4.x keeps the null and filters nothing, 5.x fills in its default: one file, two decoders
        raise _fail(key, v, "transformers 4.x reads null as no top-k filter, 5.x as 50: say 0 or 50")
    return _count(key, v)


_token_ids = token_ids_check(_fail)


def _only(*defaults: Any) -> Callable[[str, Any], Any]:
    """A decoding feature not implemented here: allowed only at the value that turns it off."""
    return only_check(_fail, *defaults)


def _any(key: str, v: Any) -> None:
    return None


KEYS: dict[str, Callable[[str, Any], Any]] = {
    # consumed
    "do_sample": _bool,
    "temperature": _number(0.0, 100.0, low_open=True),
    "top_k": _top_k,
    "top_p": _number(0.0, 1.0, low_open=True),
    "repetition_penalty": _number(0.0, 100.0, low_open=True),
    "max_new_tokens": _positive_count,
    "eos_token_id": _token_ids,
    # features this decoder lacks: only their "off" value
    "num_beams": _only(1), "num_beam_groups": _only(1), "penalty_alpha": _only(None, 0, 0.0),
    "no_repeat_ngram_size": _only(0), "encoder_no_repeat_ngram_size": _only(0),
    "min_new_tokens": _only(None, 0), "min_length": _only(0), "typical_p": _only(1, 1.0),
    "epsilon_cutoff": _only(0, 0.0), "eta_cutoff": _only(0, 0.0), "min_p": _only(None, 0, 0.0),
    "diversity_penalty": _only(0, 0.0), "bad_words_ids": _only(None), "suppress_tokens": _only(None),
    "begin_suppress_tokens": _only(None), "forced_bos_token_id": _only(None), "forced_eos_token_id": _only(None),
    "guidance_scale": _only(None, 1, 1.0), "renormalize_logits": _only(False),
    "sequence_bias": _only(None), "exponential_decay_length_penalty": _only(None),
    # no effect here
    "bos_token_id": _token_ids, "pad_token_id": _token_ids, "decoder_start_token_id": _any,
    "max_length": _count,
    "length_penalty": _any,      # beam search only
    "early_stopping": _any,      # beam search only
    "num_return_sequences": _only(1),
    "use_cache": _any, "transformers_version": _any, "_from_model_config": _any,
    "output_scores": _any, "output_logits": _any, "output_attentions": _any, "output_hidden_states": _any,
    "return_dict_in_generate": _any,
}


def read_generation_config(path: Path, config_eos: tuple[int, ...] = ()) -> Sampling:
    """A checkpoint's generation defaults; without the file, transformers' own (greedy) and
    config.json's stop tokens ``config_eos``. With the file, its eos_token_id alone stops generation,
    none where it names none: transformers builds its generation config from config.json only when
    the file is missing (5.17, measured: a file without eos_token_id beside config.json's eos id ran
    past that token)."""
    if not os.path.lexists(path):
        return Sampling(eos_token_ids=config_eos)
    # anything else by that name (a directory, a dangling link) is refused by the read, not skipped
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    for key, value in data.items():
        if key not in KEYS:
            raise _fail(key, value, "unknown key: this project cannot tell whether it changes what is generated")
    v = {key: KEYS[key](key, value) for key, value in data.items()}
    defaults = Sampling()
    return Sampling(do_sample=v.get("do_sample", False),
                    temperature=v.get("temperature", defaults.temperature),
                    top_k=v.get("top_k", defaults.top_k),
                    top_p=v.get("top_p", defaults.top_p),
                    repetition_penalty=v.get("repetition_penalty", defaults.repetition_penalty),
                    max_new_tokens=v.get("max_new_tokens"), max_length=v.get("max_length"),
                    eos_token_ids=v.get("eos_token_id", ()))


# What this project's own checkpoints tell `generate` (and transformers) to do: sample, as a byte-level
# model trained for two minutes repeats itself under greedy decoding.
OUR_DEFAULTS = b'{\n  "do_sample": true,\n  "temperature": 0.8,\n  "top_k": 40\n}\n'
