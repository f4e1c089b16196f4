"""The numpy reference of the whole decoder, forward and backward, in float64: the ground truth.

Embedding, RMSNorm, Q/K/V projections with optional bias, RoPE NeoX, GQA causal attention,
SwiGLU MLP, final norm, LM head, cross-entropy. The per-op math is the kernels' own numpy
references, so the model and the kernels cannot drift apart. Forward also runs incrementally with
a KV cache (for generation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptxgen.kernels.attention import attention_backward_reference, attention_reference
from ptxgen.kernels.cross_entropy import cross_entropy_reference
from ptxgen.kernels.rmsnorm import rmsnorm_backward_reference, rmsnorm_reference
from ptxgen.kernels.rope import rope_reference
from ptxgen.kernels.swiglu import swiglu_backward_reference, swiglu_reference

from .config import ModelConfig
from .params import check_params, layer_prefix, lm_head_name
from .precision import Precision

IGNORE_INDEX = -100


@dataclass
class KVCache:
    """Per-layer keys and values seen so far (after RoPE), for incremental decoding."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


def _integers(a: np.ndarray) -> bool:
    """An integer array, not a boolean one (numpy would index with it as a mask)."""
    return np.issubdtype(a.dtype, np.integer)


def check_tokens(c: ModelConfig, ids: np.ndarray, start: int = 0) -> np.ndarray:
    """Token ids [batch, seq] at positions ``start`` on, as every backend takes them (numpy
    indexing took id -1 as the vocabulary's last token, and positions past the config's)."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"ids must be [batch, seq] with at least one token, got shape {ids.shape}")
    if not _integers(ids):
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= c.vocab_size:
        raise ValueError(f"a token id is outside [0, {c.vocab_size})")
    if start + ids.shape[1] > c.max_position_embeddings:
        raise ValueError(f"sequence of {start + ids.shape[1]} exceeds max_position_embeddings "
                         f"{c.max_position_embeddings}")
    return ids


def check_cache_size(c: ModelConfig, max_len: int) -> int:
    """A decoder's KV cache size, as every backend takes it: between one position and the model's."""
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) \
            or not 1 <= max_len <= c.max_position_embeddings:
        raise ValueError(f"max_len must be in [1, {c.max_position_embeddings}], got {max_len!r}")
    return int(max_len)


def check_cache_room(max_len: int, length: int, new: int) -> None:
    """``new`` tokens after ``length`` cached ones fit a cache of ``max_len`` (before any is written)."""
    if length + new > max_len:
        raise ValueError(f"the KV cache holds {max_len} positions; {length + new} needed")


def check_targets(c: ModelConfig, targets: np.ndarray, size: int) -> np.ndarray:
    """Targets, flat: one per token, each a token id or IGNORE_INDEX (no other negative wraps around)."""
    if targets is None:
        raise ValueError("targets are None: a loss needs one per token (IGNORE_INDEX where none counts)")
    t = np.asarray(targets).reshape(-1)
    if t.size != size:
        raise ValueError("targets must have the shape of ids")
    if not _integers(t):  # (a float's NaN or 2.7 would be cast to some id)
        raise ValueError(f"targets must be integers, got {t.dtype}")
    valid = t != IGNORE_INDEX
    if np.any((t[valid] < 0) | (t[valid] >= c.vocab_size)):
        raise ValueError(f"a target is outside [0, {c.vocab_size})")
    return t


class ReferenceModel:
    """float64 forward/backward over a parameter dict with HF names. With ``Precision.BF16`` every
    linear layer's GEMM (forward, input and weight gradients) reads bf16-rounded operands, and the
    attention bf16-rounded q, k, v (and dO); its output is rounded as the o projection's operand;
    gate and up, the logits the loss reads, the input gradients the dX GEMMs store for the norms'
    backward and the q/k/v projection's output gradient (which its bias sums) are stored rounded
    (``Precision.store``), as torch's autocast stores them."""

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray], precision: Precision = Precision.FP32):
        check_params(config, params)
        self.c = config
        self.p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        self.mm, self.round, self.store = precision.matmul, precision.round, precision.store

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = self.mm(x, self.p[name + ".weight"].T)
        return y + self.p[name + ".bias"] if name + ".bias" in self.p else y

    def forward(self, ids: np.ndarray, cache: KVCache | None = None, tape: list | None = None) -> np.ndarray:
        """Logits [B, S, V] for token ids [B, S]; with ``cache``, continue after the cached tokens."""
        c = self.c
        start = cache.length if cache is not None else 0
        ids = check_tokens(c, ids, start)
        b, s = ids.shape
        positions = np.tile(np.arange(start, start + s), b)
        x = self.p["model.embed_tokens.weight"][ids.reshape(-1)]
        for i in range(c.num_layers):
            p = layer_prefix(i)
            h, rstd1 = rmsnorm_reference(x, self.p[p + "input_layernorm.weight"], c.rms_norm_eps)
            q = self._linear(h, p + "self_attn.q_proj").reshape(b * s, c.num_heads, c.head_dim)
            k = self._linear(h, p + "self_attn.k_proj").reshape(b * s, c.num_kv_heads, c.head_dim)
            v = self._linear(h, p + "self_attn.v_proj").reshape(b, s, c.num_kv_heads, c.head_dim)
            q = rope_reference(q, positions, c.rope_theta).reshape(b, s, c.num_heads, c.head_dim)
            k = rope_reference(k, positions, c.rope_theta).reshape(b, s, c.num_kv_heads, c.head_dim)
            if cache is not None:
                if len(cache.keys) <= i:
                    cache.keys.append(k[:, :0])
                    cache.values.append(v[:, :0])
                k = cache.keys[i] = np.concatenate([cache.keys[i], k], axis=1)
                v = cache.values[i] = np.concatenate([cache.values[i], v], axis=1)
            o, probs, _ = attention_reference(self.round(q), self.round(k), self.round(v), start)
            attn = self.mm(o.reshape(b * s, -1), self.p[p + "self_attn.o_proj.weight"].T)
            x_mid = x + attn
            h2, rstd2 = rmsnorm_reference(x_mid, self.p[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            gate = self.store(self.mm(h2, self.p[p + "mlp.gate_proj.weight"].T))
            up = self.store(self.mm(h2, self.p[p + "mlp.up_proj.weight"].T))
            act = swiglu_reference(gate, up)
            x_out = x_mid + self.mm(act, self.p[p + "mlp.down_proj.weight"].T)
            if tape is not None:
                tape.append(dict(x=x, h=h, q=q, k=k, v=v, o=o, probs=probs, x_mid=x_mid, h2=h2,
                                 gate=gate, up=up, act=act))
            x = x_out
        hf, _ = rmsnorm_reference(x, self.p["model.norm.weight"], c.rms_norm_eps)
        if tape is not None:
            tape.append(dict(x=x, hf=hf, positions=positions, shape=(b, s)))
        return self.mm(hf, self.p[lm_head_name(c)].T).reshape(b, s, -1)

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> float:
        t = check_targets(self.c, targets, np.size(ids))
        logits = self.store(self.forward(ids))
        losses, _ = cross_entropy_reference(logits.reshape(len(t), -1), t, IGNORE_INDEX, 1.0)
        return float(losses.sum() / max(1, int((t != IGNORE_INDEX).sum())))

    def loss_and_grads(self, ids: np.ndarray, targets: np.ndarray,
                       normalizer: int | None = None) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy over non-ignored targets and its gradient for every parameter.

        ``normalizer``: the count the sum of losses is divided by (default: these targets' own);
        a data-parallel rank passes the global batch's, so the ranks' results add up to its mean."""
        c = self.c
        tape: list[dict[str, Any]] = []
        t = check_targets(c, targets, np.size(ids))
        logits = self.store(self.forward(ids, tape=tape))
        n_valid = normalizer if normalizer is not None else max(1, int((t != IGNORE_INDEX).sum()))
        losses, dlogits = cross_entropy_reference(logits.reshape(len(t), -1), t, IGNORE_INDEX, 1.0 / n_valid)
        top = tape.pop()
        b, s = top["shape"]
        positions = top["positions"]
        g = {name: np.zeros_like(v) for name, v in self.p.items()}

        head = lm_head_name(c)
        g[head] += self.mm(dlogits.T, top["hf"])
        dhf = self.store(self.mm(dlogits, self.p[head]))
        dx, dgamma = rmsnorm_backward_reference(top["x"], self.p["model.norm.weight"], dhf, c.rms_norm_eps)
        g["model.norm.weight"] += dgamma
        for i in reversed(range(c.num_layers)):
            p, a = layer_prefix(i), tape[i]
            # MLP: x_out = x_mid + down(silu(gate) * up)
            wd = self.p[p + "mlp.down_proj.weight"]
            g[p + "mlp.down_proj.weight"] += self.mm(dx.T, a["act"])
            dgate, dup = swiglu_backward_reference(a["gate"], a["up"], self.mm(dx, wd))
            g[p + "mlp.gate_proj.weight"] += self.mm(dgate.T, a["h2"])
            g[p + "mlp.up_proj.weight"] += self.mm(dup.T, a["h2"])
            dh2 = self.store(self.mm(dgate, self.p[p + "mlp.gate_proj.weight"]) +
                             self.mm(dup, self.p[p + "mlp.up_proj.weight"]))
            dmid, dgamma = rmsnorm_backward_reference(a["x_mid"], self.p[p + "post_attention_layernorm.weight"],
                                                      dh2, c.rms_norm_eps)
            g[p + "post_attention_layernorm.weight"] += dgamma
            dx_mid = dx + dmid
            # attention: x_mid = x + o_proj(attn(rope(q), rope(k), v))
            o2d = a["o"].reshape(b * s, -1)
            g[p + "self_attn.o_proj.weight"] += self.mm(dx_mid.T, o2d)
            do = self.mm(dx_mid, self.p[p + "self_attn.o_proj.weight"]).reshape(a["o"].shape)
            dq, dk, dv = attention_backward_reference(*(self.round(a[n]) for n in "qkv"), a["probs"], self.round(do))
            dq = rope_reference(dq.reshape(b * s, c.num_heads, -1), positions, c.rope_theta, inverse=True)
            dk = rope_reference(dk.reshape(b * s, c.num_kv_heads, -1), positions, c.rope_theta, inverse=True)
            dh = np.zeros_like(a["h"])
            for name, d in (("q_proj", dq), ("k_proj", dk), ("v_proj", dv)):
                d = self.store(d.reshape(b * s, -1))  # (the bias's sum too reads it so)
                g[p + f"self_attn.{name}.weight"] += self.mm(d.T, a["h"])
                if c.qkv_bias:
                    g[p + f"self_attn.{name}.bias"] += d.sum(0)
                dh += self.mm(d, self.p[p + f"self_attn.{name}.weight"])
            dxn, dgamma = rmsnorm_backward_reference(a["x"], self.p[p + "input_layernorm.weight"], self.store(dh),
                                                     c.rms_norm_eps)
            g[p + "input_layernorm.weight"] += dgamma
            dx = dx_mid + dxn
        np.add.at(g["model.embed_tokens.weight"], np.asarray(ids).reshape(-1), dx)
        return float(losses.sum() / n_valid), g
