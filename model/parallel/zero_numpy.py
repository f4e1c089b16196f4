"""ZeRO-1 data parallelism on the numpy backend: the protocol the GPU step follows, on the CPU.

Each rank holds the whole model's f32 weights, but only its shard of the AdamW moments
(``ShardPlan``). A step on a global batch: the rank's rows forward and backward, the loss scaled
by the GLOBAL batch's count of targets (so the ranks' gradients add up to the global mean);
bucket by bucket the gradients are reduce-scattered into the rank's shard; the global norm is
the all-reduced sum of the shards' squares; AdamW runs on the shard (weight decay by segment);
the updated pieces are all-gathered into every rank's weights. The arithmetic is the numpy
backend's (float64 over f32 parameters and moments): a run differs from one process on the same
global batch only by the order of its sums (each rank's partial sums, then across ranks).
"""
from __future__ import annotations

import math

import numpy as np

from ptxgen.kernels.adamw import adamw_reference

from ..config import ModelConfig
from ..cuda_buffers import ParamLayout
from ..optim import AdamWSettings, clip_scale
from ..precision import Precision
from ..reference import ReferenceModel
from .batch import global_targets, local_batch
from .comm import Communicator
from .replicas import check_replicas
from .shards import DEFAULT_BUCKET_ELEMS, ShardPlan


class ZeroNumpyRank:
    """One rank of a ZeRO-1 run on the numpy backend (the training backend's interface; the
    collectives mean every rank calls ``train_step`` and ``optimizer_state`` together)."""

    name = "numpy-zero1"
    description = "numpy (float64 reference), ZeRO-1 data parallel"

    def __init__(self, comm: Communicator, config: ModelConfig, params: dict[str, np.ndarray], adamw: AdamWSettings,
                 precision: Precision = Precision.FP32, bucket_elems: int = DEFAULT_BUCKET_ELEMS,
                 digest_every: int = 0):
        """``digest_every``: compare the ranks' weights every that many steps (0: never)."""
        self.comm, self.config, self.adamw, self.precision = comm, config, adamw, precision
        self.layout = ParamLayout(config)
        self.shards = ShardPlan.of(self.layout, comm.world, bucket_elems)
        self.weights = self.shards.pad(self.layout.flatten(params))  # every rank's whole replica, f32
        self.exp_avg = np.zeros(self.shards.shard_size, np.float32)  # this rank's shard only
        self.exp_avg_sq = np.zeros(self.shards.shard_size, np.float32)
        self.digest_every, self.step = digest_every, 0

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.layout.unflatten(self.weights[:self.layout.total])

    def _model(self) -> ReferenceModel:
        return ReferenceModel(self.config, self.params, self.precision)

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> float:
        """The whole batch's loss on this rank's replica (the same on every rank)."""
        return self._model().loss(ids, targets)

    def train_step(self, ids: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        """One AdamW step on the GLOBAL batch ``ids``/``targets`` (every rank passes the same one);
        returns (the global batch's mean loss, the global gradient norm), the same on every rank."""
        comm, shards, a = self.comm, self.shards, self.adamw
        x, y = local_batch(ids, targets, comm.rank, comm.world)
        part, grads = self._model().loss_and_grads(x, y, normalizer=global_targets(targets))
        grad = np.zeros(shards.shard_size, np.float64)
        shards.reduce_scatter(comm, shards.pad(self.layout.flatten(grads, np.float64)), grad)
        sums = np.array([part, float(np.dot(grad, grad))])  # one all-reduce for the loss and the squared norm
        comm.all_reduce(sums)
        loss, norm = float(sums[0]), math.sqrt(sums[1])
        clip = clip_scale(norm, a.max_grad_norm)
        self.step += 1
        shard = shards.shard_of(self.weights, comm.rank)
        for seg in shards.segments(comm.rank):
            s = slice(seg.shard, seg.shard + seg.size)
            p, m, v = adamw_reference(shard[s], grad[s], self.exp_avg[s], self.exp_avg_sq[s], lr=lr, beta1=a.beta1,
                                      beta2=a.beta2, eps=a.eps, weight_decay=a.weight_decay if seg.decays else 0.0,
                                      step=self.step, clip=clip)
            shard[s], self.exp_avg[s], self.exp_avg_sq[s] = p, m, v  # stored in f32, as one process stores them
        shards.all_gather(comm, shard, self.weights)
        if self.digest_every and self.step % self.digest_every == 0:
            check_replicas(comm, self.weights, self.step)
        return loss, norm

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Collective: both moments of every parameter, gathered from the shards (one process's format)."""
        out = {}
        for prefix, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            full = np.zeros(self.shards.padded_total, np.float32)
            self.shards.all_gather(self.comm, shard, full)
            out.update({f"{prefix}.{k}": v for k, v in self.layout.unflatten(full[:self.layout.total]).items()})
        return out

    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None:
        """This rank's shard of a checkpoint's moments (no communication: each rank reads its part)."""
        for prefix, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            flat = self.layout.flatten({k: state[f"{prefix}.{k}"] for k in self.layout.shapes})
            shard[...] = self.shards.shard_of(self.shards.pad(flat), self.comm.rank)
        self.step = step
