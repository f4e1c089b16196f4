"""HF ``config.json`` through one closed table: every key consumed, known to have no effect, or refused.

A key the model does not implement, silently ignored, is a GPU path that silently defaults (a yarn
RoPE run as plain RoPE, a gelu MLP run as SiLU). So each key an HF Qwen2 or Llama config can hold
is listed in ``KEYS`` with what it does here; a key not in the table, or a value the model cannot
honour, is refused with one line that names the key and the value. Both transformers layouts map to
the same ``ModelConfig``: 4.x (``rope_theta`` at the top level, ``torch_dtype``) and 5.x
(``rope_parameters``, ``dtype``, ``layer_types``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .config import ConfigError, ModelConfig, f32_normal, finite_float, shown
from .params import INIT_STD

MODEL_TYPES = ("qwen2", "llama")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class HFConfig:
    """What a config.json says: the model, plus what only generation, saving and a new model's draw need."""

    config: ModelConfig
    model_type: str
    dtype: str | None             # the dtype transformers 5.x casts the weights to as it loads them
    eos_token_ids: tuple[int, ...]
    initializer_range: Any = INIT_STD  # the std transformers draws a new model's weights at (absent: its 0.02)
    attention_dropout: float = 0.0     # active only while training (transformers' eval mode drops it)
    dtype_key: str = "dtype"           # the key that said ``dtype`` (5.x dtype, or 4.x torch_dtype)

    def check_new_model(self) -> None:
        """Where a new model is drawn from this file (``train --config``): the std it asks for must be the
        one this project draws at (model/params.py), else the run starts from weights transformers would
        not have drawn from the same file. Loaded weights never read it."""
        v = self.initializer_range
        if isinstance(v, bool) or v != INIT_STD:
            raise _fail("initializer_range", v, f"a new model here is drawn at std {INIT_STD} (this project's init, "
                        f"model/params.py): say {INIT_STD} or drop the key")

    def check_trainable(self) -> None:
        """Where a run trains from this file (``train --config``, ``train --init``): the trainer has no
        dropout, so a nonzero ``attention_dropout`` (which generation ignores, as transformers does
        outside training) would be a run that silently trains another model than the file asks for."""
        if self.attention_dropout:
            raise _fail("attention_dropout", self.attention_dropout, "training here has no dropout (generate "
                        "ignores it, as transformers does outside training): say 0.0 to train from this file")


def _fail(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config.json: {key} = {shown(value)}: {why}")


# -- value checks: each returns the value the model uses, or raises one line naming key and value --
def _int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _fail(key, v, "must be a positive integer")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):  # "false" is a non-empty string: truthy, the opposite of what it says
        raise _fail(key, v, "must be true or false (a JSON boolean)")
    return v


def _positive_float(key: str, v: Any) -> float:
    f = finite_float(v)
    if f is None or f <= 0:
        raise _fail(key, v, "must be a finite positive number")
    return f


def _eps(key: str, v: Any) -> float:
    eps = _positive_float(key, v)
    if not f32_normal(eps):  # the kernels add eps in f32
        raise _fail(key, v, "is not a normal float32 number (the norm kernels add it in f32)")
    return eps


# Checks shared with generation_config.json's table: ``fail`` says which file the line names.
Fail = Callable[[str, Any, str], ConfigError]


def token_ids_check(fail: Fail) -> Callable[[str, Any], tuple[int, ...]]:
    """A token id, a list of them or null, as HF configs write stop tokens."""
    def check(key: str, v: Any) -> tuple[int, ...]:
        ids = v if isinstance(v, list) else [] if v is None else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise fail(key, v, "must be a token id, a list of them, or null")
        return tuple(ids)
    return check


def only_check(fail: Fail, *allowed: Any) -> Callable[[str, Any], Any]:
    """A feature this project lacks: allowed only at the values it implements (1 is not True here)."""
    def check(key: str, v: Any) -> Any:
        if not any(type(v) is type(a) and v == a for a in allowed):
            raise fail(key, v, "not implemented here (supported: " + ", ".join(map(repr, allowed)) + ")")
        return v
    return check


_token_ids = token_ids_check(_fail)


def _equals(*allowed: Any) -> Callable[[str, Any], Any]:
    return only_check(_fail, *allowed)


def _any(key: str, v: Any) -> Any:
    return v


def _one(key: str, v: Any) -> Any:
    """A scaling that is the identity at 1 (1.0 or 1, never true), refused at any other value."""
    if isinstance(v, bool) or finite_float(v) != 1.0:
        why = "partial RoPE is not implemented here" if key.endswith("partial_rotary_factor") else \
            "a scaling factor other than 1 under the default type (transformers ignores it): say 1.0 or drop it"
        raise _fail(key, v, why)
    return v


def _dropout(key: str, v: Any) -> float:
    p = finite_float(v)
    if p is None or not 0 <= p <= 1:
        raise _fail(key, v, "must be a probability in [0, 1]")
    return p


def _rope_parameters(key: str, v: Any) -> float | None:
    """5.x's ``rope_parameters`` and 4.x's ``rope_scaling`` alike: null, or {"rope_type" (4.x:
    "type"): "default", "rope_theta": ...}; anything else changes the frequencies. (transformers
    5.x takes a ``rope_scaling`` over ``rope_parameters``, 4.x its top-level ``rope_theta``:
    ``_theta`` makes every theta given agree.)"""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _fail(key, v, "must be an object")
    for k in ("rope_type", "type"):  # first: a yarn or llama3 config is refused for its type, not its factor
        if k in v and v[k] != "default":
            raise _fail(f"{key}.{k}", v[k], "RoPE scaling is not implemented here (only 'default')")
    for k, x in v.items():
        if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"):
            raise _fail(f"{key}.{k}", x, "unknown RoPE parameter (not implemented here)")
        if k in ("partial_rotary_factor", "factor"):  # (a factor under the default type: transformers drops it)
            _one(f"{key}.{k}", x)
    return _positive_float(f"{key}.rope_theta", v["rope_theta"]) if "rope_theta" in v else None


def _layer_types(key: str, v: Any) -> Any:
    if v is not None and (not isinstance(v, list) or any(t != "full_attention" for t in v)):
        raise _fail(key, v, "only full attention in every layer is implemented here (no sliding window)")
    return v


def _dtype(key: str, v: Any) -> str | None:
    if v is not None and v not in DTYPES:
        raise _fail(key, v, f"must be one of {', '.join(DTYPES)}")
    return v


@dataclass(frozen=True)
class Key:
    """One config key: ``check`` validates the value and returns what the model takes from it."""

    check: Callable[[str, Any], Any]
    effect: str   # "model" (consumed), "none" (no effect on the math, said why), "generation", "init",
    #               "training" (a run refuses what it cannot honour) or "load" (checked against the weights)
    why: str


NO_EFFECT = "none"
KEYS: dict[str, Key] = {
    # consumed: the model's shape and math
    "vocab_size": Key(_int, "model", "embedding and LM head rows"),
    "hidden_size": Key(_int, "model", "model width"),
    "intermediate_size": Key(_int, "model", "MLP width"),
    "num_hidden_layers": Key(_int, "model", "decoder layers"),
    "num_attention_heads": Key(_int, "model", "query heads"),
    "num_key_value_heads": Key(lambda k, v: None if v is None else _int(k, v), "model",
                               "KV heads (null: as many as query heads)"),
    "head_dim": Key(lambda k, v: None if v is None else _int(k, v), "model",
                    "must equal hidden_size / num_attention_heads (null: that, as transformers reads it)"),
    "rms_norm_eps": Key(_eps, "model", "RMSNorm eps, baked into the norm kernels"),
    "rope_theta": Key(_positive_float, "model", "RoPE base (4.x layout), baked into the RoPE kernels"),
    "rope_parameters": Key(_rope_parameters, "model", "RoPE base and type (5.x layout)"),
    "rope_scaling": Key(_rope_parameters, "model", "null or default RoPE (4.x layout; its rope_theta must agree)"),
    "partial_rotary_factor": Key(_one, "model", "the share of each head RoPE rotates (5.x moves it into "
                                 "rope_parameters): all of it, 1.0, here"),
    "tie_word_embeddings": Key(_bool, "model", "LM head shares the embedding"),
    "max_position_embeddings": Key(_int, "model", "longest sequence (plain RoPE does not depend on it)"),
    "attention_bias": Key(_bool, "model", "Q/K/V biases (Llama); Qwen2 always has them"),
    "ptxgen_qkv_bias": Key(_bool, "model", "this project's older checkpoints: Q/K/V biases or exported zeros"),
    "model_type": Key(_equals(*MODEL_TYPES), "model", "qwen2 or llama"),
    "architectures": Key(lambda k, v: v, "model", "one causal-LM class matching model_type"),
    # allowed only at the value the model implements
    "hidden_act": Key(_equals("silu", "swish"), "model", "the MLP's activation: SwiGLU (swish is transformers' "
                      "other name for silu, ACT2FN)"),
    "mlp_bias": Key(_equals(False), "model", "no MLP biases here"),
    "attention_dropout": Key(_dropout, "training", "inactive in generation (as transformers' eval mode); "
                             "train refuses any but 0, having no dropout"),
    "use_sliding_window": Key(lambda k, v: _equals(False)(k, _bool(k, v)), "model", "no sliding window here"),
    "layer_types": Key(_layer_types, "model", "every layer full attention"),
    "use_mrope": Key(_equals(False), "model", "no multimodal RoPE here"),
    "is_encoder_decoder": Key(_equals(False), "model", "a decoder only"),
    # read for generation (stop tokens) and saving (dtype)
    "eos_token_id": Key(_token_ids, "generation", "stop tokens where there is no generation_config.json (with "
                        "one, transformers reads that file's alone)"),
    "dtype": Key(_dtype, "load", "what transformers 5.x casts the weights to (agrees with torch_dtype): a stored "
                 "value it would round is refused (model/hf.py); computed in f32"),
    "torch_dtype": Key(_dtype, "load", "4.x's name of dtype (agrees with it)"),
    # no effect on the math
    "sliding_window": Key(_any, NO_EFFECT, "unused while use_sliding_window is false (transformers from 4.50 "
                          "until transformers#38002's fix applied it anyway)"),
    "max_window_layers": Key(_any, NO_EFFECT, "unused while use_sliding_window is false"),
    "bos_token_id": Key(_token_ids, NO_EFFECT, "a tokenizer matter"),
    "pad_token_id": Key(_token_ids, NO_EFFECT, "a tokenizer matter"),
    "use_cache": Key(_bool, NO_EFFECT, "transformers' inference switch"),
    "initializer_range": Key(_any, "init", "std of a new model's random weights: train --config refuses any but "
                             "this project's 0.02; loaded weights never read it"),
    "transformers_version": Key(_any, NO_EFFECT, "provenance"),
    "_name_or_path": Key(_any, NO_EFFECT, "provenance"),
    "pretraining_tp": Key(_int, NO_EFFECT, "tensor-parallel slicing of the same products"),
    "output_attentions": Key(_any, NO_EFFECT, "transformers' output switch"),
    "output_hidden_states": Key(_any, NO_EFFECT, "transformers' output switch"),
    "return_dict": Key(_any, NO_EFFECT, "transformers' output switch"),
    "chunk_size_feed_forward": Key(_any, NO_EFFECT, "chunking of the same products"),
    "id2label": Key(_any, NO_EFFECT, "classification heads only"),
    "label2id": Key(_any, NO_EFFECT, "classification heads only"),
    "problem_type": Key(_any, NO_EFFECT, "classification heads only"),
    "_attn_implementation_autoset": Key(_any, NO_EFFECT, "which attention code transformers picked"),
    "attn_implementation": Key(_any, NO_EFFECT, "which attention code transformers runs: the same math"),
}
DEFAULTS = {  # transformers' own defaults where a config leaves a key out
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
MAX_POSITIONS = {"qwen2": 32768, "llama": 2048}


def parse_hf_config(hf: Any) -> HFConfig:
    """The ``ModelConfig`` an HF config describes, or one line naming the first key it cannot honour."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    for key in hf:
        if key not in KEYS:
            raise _fail(key, hf[key], "unknown key: this project cannot tell whether it changes the model")
    v = {key: KEYS[key].check(key, value) for key, value in hf.items()}
    model_type = v.get("model_type")
    if model_type is None:
        raise ConfigError("config.json lacks 'model_type' (qwen2 or llama)")
    arch = v.get("architectures")
    if arch is not None and arch != [ARCHITECTURES[model_type]]:
        raise _fail("architectures", arch, f"a {model_type} config must name [{ARCHITECTURES[model_type]!r}]")

    def need(key: str) -> Any:
        if v.get(key) is None:
            raise ConfigError(f"config.json lacks {key!r}")
        return v[key]

    heads, hidden = need("num_attention_heads"), need("hidden_size")
    if v.get("head_dim") is not None and v["head_dim"] * heads != hidden:
        raise _fail("head_dim", v["head_dim"], f"differs from hidden_size / num_attention_heads = "
                    f"{hidden / heads:g} (not implemented here)")
    theta = _theta(v)
    qkv_bias = _qkv_bias(model_type, v)
    kv_heads = v.get("num_key_value_heads")
    if kv_heads is None:
        if "num_key_value_heads" not in hf and model_type == "qwen2":
            raise ConfigError("config.json lacks 'num_key_value_heads' (transformers' Qwen2 default is 32, "
                              "not the number of query heads: say which)")
        kv_heads = heads
    layers = need("num_hidden_layers")
    if v.get("layer_types") is not None and len(v["layer_types"]) != layers:
        raise _fail("layer_types", v["layer_types"], f"names {len(v['layer_types'])} layers, not {layers}")
    try:
        config = ModelConfig(
            vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, intermediate_size=need("intermediate_size"), rope_theta=theta,
            rms_norm_eps=need("rms_norm_eps"), qkv_bias=qkv_bias,
            tie_word_embeddings=v.get("tie_word_embeddings", DEFAULTS["tie_word_embeddings"]),
            max_position_embeddings=v.get("max_position_embeddings", MAX_POSITIONS[model_type]))
    except ConfigError as e:  # its own checks (heads divide, sizes 32-bit, ...) name its fields: say the file's keys
        raise ConfigError("config.json: " + _FIELD.sub(lambda m: HF_NAMES[m[0]], str(e))) from None
    dtypes = [(k, v[k]) for k in ("dtype", "torch_dtype") if v.get(k) is not None]
    return HFConfig(config, model_type, _agreed(dtypes), v.get("eos_token_id", ()),
                    v.get("initializer_range", INIT_STD), v.get("attention_dropout", 0.0),
                    dtypes[0][0] if dtypes else "dtype")


# ModelConfig's fields that config.json spells otherwise (hidden_size, vocab_size, ... are the same)
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}
_FIELD = re.compile(r"\b(?:" + "|".join(HF_NAMES) + r")\b")


def _agreed(given: list[tuple[str, Any]]) -> Any:
    """The one value that keys saying the same thing give (None: none is given). Each is the key some
    reader takes (transformers 4.x ``torch_dtype`` and ``rope_theta``, 5.x ``dtype`` and ``rope_parameters``):
    two that differ are one file that two readers load as two models, so neither is picked."""
    for (key, value), (other, then) in zip(given, given[1:]):
        if value != then:
            raise _fail(key, value, f"disagrees with {other} = {then!r}")
    return given[0][1] if given else None


def check_stop_tokens(ids: tuple[int, ...], vocab_size: int, where: str) -> None:
    """Stop tokens the model can produce (one outside the vocabulary never stops generation); checked
    where they are used: a checkpoint's generation_config.json replaces config.json's."""
    odd = [i for i in ids if i >= vocab_size]
    if odd:
        raise ConfigError(f"{where}: eos token id {odd[0]} is outside the vocabulary of {vocab_size}")


def _theta(v: dict[str, Any]) -> float:
    theta = _agreed([(k if k == "rope_theta" else f"{k}.rope_theta", v[k])
                     for k in ("rope_theta", "rope_parameters", "rope_scaling") if v.get(k) is not None])
    if theta is None:  # transformers would assume 10000: that is the very default this project refuses to guess
        raise ConfigError("config.json lacks 'rope_theta' (or 'rope_parameters.rope_theta'); transformers would "
                          "assume 10000: add \"rope_theta\": 10000.0 if that is the model's")
    return theta


def _qkv_bias(model_type: str, v: dict[str, Any]) -> bool:
    if model_type == "qwen2":
        if v.get("attention_bias") is False:
            raise _fail("attention_bias", False, "transformers' Qwen2 always has Q/K/V biases")
        # ptxgen_qkv_bias false (our older bias-free exports: their zero biases dropped) beside attention_bias true
        # is a file stating both
        return _agreed([(k, v[k]) for k in ("ptxgen_qkv_bias", "attention_bias") if k in v]) is not False
    if "ptxgen_qkv_bias" in v:
        raise _fail("ptxgen_qkv_bias", v["ptxgen_qkv_bias"], "belongs to qwen2 configs only")
    if v.get("attention_bias"):  # Llama's attention_bias also puts a bias on o_proj, which this model lacks
        raise _fail("attention_bias", True, "Llama's attention_bias adds an o_proj bias, not implemented here")
    return False


def to_hf_config(config: ModelConfig, dtype: str = "float32",
                 eos_token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
    """The config.json transformers 4.x and 5.x both read as this model: qwen2 with Q/K/V biases,
    llama without. RoPE theta is written in both layouts (4.x reads only the top-level key)."""
    model_type = "qwen2" if config.qkv_bias else "llama"
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "intermediate_size": config.intermediate_size,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings, "attention_dropout": 0.0,
        "dtype": dtype, "torch_dtype": dtype, "initializer_range": 0.02, "use_cache": True,
    }
    if model_type == "qwen2":
        # a window stated as none, not left to the default: transformers from 4.50 until transformers#38002
        # was fixed (mid-2025) applied sliding_window (Qwen2Config's default 4096) whatever use_sliding_window
        # said, so an export without it was read there as attending to 4096 tokens only
        hf.update(use_sliding_window=False, sliding_window=None)
        hf.pop("head_dim")  # not a Qwen2Config field in 4.x
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    if eos_token_ids:
        hf["eos_token_id"] = list(eos_token_ids)
    return hf
