"""The training backend with no GPU: the float64 numpy reference over f32 parameters.

Parameters and AdamW moments are stored in f32 (as the CUDA model keeps its master weights), the
arithmetic is float64; so a checkpoint holds the exact state and a resumed run repeats bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

from ptxgen.kernels.adamw import adamw_reference

from .config import ModelConfig
from .optim import AdamWSettings, clip_scale, decays
from .precision import Precision
from .reference import KVCache, ReferenceModel, check_cache_room, check_cache_size


class NumpyBackend:
    name = "numpy"
    description = "numpy (float64 reference on the CPU)"

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray], adamw: AdamWSettings,
                 precision: Precision = Precision.FP32):
        self.config, self.adamw, self.precision = config, adamw, precision
        self.params = {k: np.asarray(v, dtype=np.float32).copy() for k, v in params.items()}
        self.exp_avg = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.step = 0

    def _model(self) -> ReferenceModel:
        return ReferenceModel(self.config, self.params, self.precision)

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> float:
        return self._model().loss(ids, targets)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self._model().forward(ids)

    def decoder(self, max_len: int) -> "NumpyDecoder":
        """Incremental decoding from the current weights, a KV cache of ``max_len`` (as the GPU's)."""
        return NumpyDecoder(self.config, self.params, self.precision, max_len)

    def train_step(self, ids: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        """One AdamW step on the mean cross-entropy; returns (loss, gradient global norm)."""
        a = self.adamw
        loss, grads = self._model().loss_and_grads(ids, targets)
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
        clip = clip_scale(norm, a.max_grad_norm)
        self.step += 1
        for name, g in grads.items():
            p, m, v = adamw_reference(self.params[name], g, self.exp_avg[name], self.exp_avg_sq[name],
                                      lr=lr, beta1=a.beta1, beta2=a.beta2, eps=a.eps,
                                      weight_decay=a.weight_decay if decays(name) else 0.0,
                                      step=self.step, clip=clip)
            self.params[name][...] = p
            self.exp_avg[name][...] = m
            self.exp_avg_sq[name][...] = v
        return loss, norm

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {**{f"exp_avg.{k}": v for k, v in self.exp_avg.items()},
                **{f"exp_avg_sq.{k}": v for k, v in self.exp_avg_sq.items()}}

    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None:
        for k in self.params:
            self.exp_avg[k][...] = state[f"exp_avg.{k}"]
            self.exp_avg_sq[k][...] = state[f"exp_avg_sq.{k}"]
        self.step = step


class NumpyDecoder:
    """Incremental decoding on the numpy reference with its KV cache.

    The cache holds ``max_len`` positions (default: the model's), refused past as ``CudaDecoder``
    refuses (its buffers are that size), so that a run on either backend stops at the same call."""

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray], precision: Precision = Precision.FP32,
                 max_len: int | None = None):
        self.model = ReferenceModel(config, params, precision)
        self.max_len = check_cache_size(config, config.max_position_embeddings if max_len is None else max_len)
        self.cache = KVCache()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.cache = KVCache()
        ids = np.asarray(ids).reshape(-1)  # (as CudaDecoder takes them)
        check_cache_room(self.max_len, 0, len(ids))
        return self.model.forward(ids[None, :], self.cache)[0, -1]

    def decode(self, token: int) -> np.ndarray:
        check_cache_room(self.max_len, self.cache.length, 1)
        return self.model.forward(np.array([[token]]), self.cache)[0, -1]
