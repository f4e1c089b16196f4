"""Model configuration: one dataclass, presets, and HF ``config.json`` in and out.

eps and theta live here and nowhere else: every kernel spec the model builds takes them from the
config (no kernel constructor has a default for either).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptxgen.files import read_file, why
from ptxgen.kernels.rope import check_frequencies
from ptxgen.spec import SpecError


class ConfigError(ValueError):
    """A config that cannot describe a model; one line for the user."""


def finite_float(v: Any) -> float | None:
    """A JSON number as a finite float, or None: not a number (a bool is not), infinite, NaN, or an
    integer too large for a float (float() of it raises)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def shown(value: Any) -> str:
    """A value as a line names it: its repr, cut short (a 400-digit number is still one line)."""
    r = repr(value)
    return r if len(r) <= 80 else r[:60] + f"... ({len(r)} characters)"


def f32_normal(x: float) -> bool:
    """Whether ``x`` rounds to a finite, normal (not flushed, not zero) float32."""
    with np.errstate(over="ignore"):
        f = abs(float(np.float32(x)))
    return math.isfinite(f) and f >= float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31):
                raise ConfigError(f"{f.name} must be a positive integer below 2**31 (the kernels' sizes are "
                                  f"32-bit), got {shown(v)}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            f = finite_float(v)
            if f is None or f <= 0:
                raise ConfigError(f"{name} must be a finite positive number, got {shown(v)}")
            object.__setattr__(self, name, f)
        if not f32_normal(self.rms_norm_eps):
            raise ConfigError(f"rms_norm_eps {self.rms_norm_eps!r} is not a normal float32 number (the norm "
                              "kernels add it in f32)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        try:  # what the RoPE kernels can bake, refused here so that no device trains what another cannot
            check_frequencies(self.head_dim, self.rope_theta)
        except SpecError as e:
            raise ConfigError(f"rope_theta {self.rope_theta:g} with head_dim {self.head_dim}: {e}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- HF config.json (the closed key table lives in model/hf_config.py) -----------------
    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        from .hf_config import to_hf_config

        return to_hf_config(self, dtype)

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        from .hf_config import parse_hf_config

        return parse_hf_config(hf).config

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        return cls.from_hf(read_json(path))


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a key given twice is refused. Python's json keeps the last value,
    other readers the first or refuse the file: one file that two readers take as two models."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def read_json(path: Path) -> Any:
    """A JSON file, or one line saying why it cannot be read."""
    try:
        return json.loads(read_file(path).decode("utf-8"), object_pairs_hook=unique_keys)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise ConfigError(f"cannot read {path}: {why(e)}") from None


PRESETS: dict[str, ModelConfig] = {
    "qwen2-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                              num_kv_heads=2, intermediate_size=4864, rope_theta=1e6, rms_norm_eps=1e-6,
                              qkv_bias=True, tie_word_embeddings=True, max_position_embeddings=32768),
    "llama-style": ModelConfig(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                               num_kv_heads=12, intermediate_size=2048, rope_theta=1e4, rms_norm_eps=1e-5,
                               qkv_bias=False, tie_word_embeddings=False, max_position_embeddings=4096),
    # The default GPU run's model: 24M parameters, byte tokens; on an H200 its bf16 run of 6000 steps
    # of 32x512 bytes over the stdlib takes about a minute and a half.
    "small": ModelConfig(vocab_size=256, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                         intermediate_size=1408, rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=True,
                         tie_word_embeddings=False, max_position_embeddings=1024),
    # Untied head: with tied weights a random-init model already scores its own input token at
    # |e|*sqrt(hidden), which lifts the initial loss above ln(vocab) (see init_params).
    "tiny": ModelConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=352, rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=True,
                        tie_word_embeddings=False, max_position_embeddings=512),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
