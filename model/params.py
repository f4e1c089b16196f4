"""Parameters by their HF Qwen2 tensor names: shapes, initialisation, and the flat-buffer layout."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .config import ModelConfig

INIT_STD = 0.02  # HF initializer_range


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def param_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        p = layer_prefix(i)
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, c.hidden_size)
            if c.qkv_bias:
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (c.hidden_size, q)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    shapes["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def check_params(c: ModelConfig, params: Mapping[str, Any]) -> None:
    """The tensors of a model of ``c``, exactly: each name ``param_shapes`` lists, at its shape, and no
    other. Every backend takes its parameters through this, so none can honour a tensor another
    drops (the reference added any q/k/v bias it was given, the GPU layout dropped one the config
    lacks; a tied model's lm_head.weight was ignored by both)."""
    shapes = param_shapes(c)
    missing, extra = [n for n in shapes if n not in params], sorted(set(params) - set(shapes))
    if missing:
        raise ValueError(f"the parameters lack {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))
    if extra:
        raise ValueError(f"{extra[0]} is not a parameter of this config (qkv_bias={c.qkv_bias}, "
                         f"tie_word_embeddings={c.tie_word_embeddings}, {c.num_layers} layers)")
    for name, shape in shapes.items():
        if tuple(np.shape(params[name])) != shape:
            raise ValueError(f"{name} has shape {tuple(np.shape(params[name]))}, the config's is {shape}")


def over_layers(c: ModelConfig, measure: Callable[[dict[str, tuple[int, ...]]], int]) -> int:
    """``measure(param_shapes(c))`` from one layer's shapes and two layers' (every layer's are the
    same): a config file's layer count can be any number, and a billion is to be refused at once,
    not after naming each layer's tensors."""
    one, two = (measure(param_shapes(c.replace(num_layers=n))) for n in (1, 2))
    return one + (c.num_layers - 1) * (two - one)


def init_params(c: ModelConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Normal(0, 0.02) matrices, zero biases, unit norm weights (as HF initialises Qwen2).

    An untied LM head is drawn with std 0.02 / sqrt(hidden) instead: its input is RMS-normalized,
    so HF's 0.02 gives logits of std 0.02 * sqrt(hidden), and an initial loss that depends on the
    draw; scaled, the first loss is ln(vocab) within a few thousandths, as an untrained model's should be.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(c).items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype)
        else:
            std = INIT_STD / np.sqrt(c.hidden_size) if name == "lm_head.weight" else INIT_STD
            params[name] = (std * rng.standard_normal(shape)).astype(dtype)
    return params


def lm_head_name(c: ModelConfig) -> str:
    return "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
