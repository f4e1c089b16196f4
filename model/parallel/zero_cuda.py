"""ZeRO-1 data parallelism on the CUDA backend: ``ZeroNumpyRank``'s protocol, as a launch plan.

A rank is a ``CudaBackend`` whose flat weights and gradients are padded to the shard plan's size
and whose AdamW moments are its shard only. Its training step's plan is the one-GPU forward and
backward on the rank's rows of the global batch (the loss scaled by the GLOBAL count of targets),
then an optimizer section of its own:

1. each bucket of gradients reduce-scattered into the rank's gradient shard as soon as the
   backward has finished it (a host step in the backward after the bucket's last writer, in
   ``send_order``); NCCL runs them on a side stream, so the rest of the backward overlaps them,
   and the optimizer's first kernel waits for them (an event, no host sync);
2. the global norm: the grad-norm kernel's per-block partial sums over the shard, summed over the
   ranks (one all-reduce), then the one-GPU kernel that takes the norm and the clip scale;
3. AdamW on each segment of the shard (one weight-decay setting each), reading the rank's piece of
   the full weights, writing it (and its bf16 copy) and the moments' shard;
4. every bucket of weights all-gathered from the ranks' pieces, each as soon as AdamW has written
   this rank's piece of it (NCCL: on the side stream, overlapping the AdamW of the next pieces),
   and the step ends with the main stream joined to the side stream. In bf16 precision a bucket
   of matrices that the step reads only through their bf16 copies (the GEMMs' operands) is
   gathered as those copies, half the bytes, which AdamW wrote with this rank's piece; the f32
   weights that the step reads (the embedding table, by the lookup, and the norms and biases:
   ``f32_read``) are gathered in f32, and the other ranks' pieces of their bf16 copies cast here
   once their bucket has arrived. The other ranks' f32 masters of the bf16-gathered matrices are
   then not on this rank (ZeRO-1's shard of them is), until ``params`` gathers them; the plan is
   checked, when built, to read none of them before the optimizer.

The embedding table's gradient is two parts: the LM head's dense one (a tied table) and the
lookup's, which only the batch's token rows receive, and only at the very end of the backward. So
that the table's hundreds of MB are not reduce-scattered after the backward ends, each rank's piece
of the table is a slab of whole rows (one bucket, when the vocabulary splits evenly among the
ranks): its reduce-scatter carries the LM head's part as soon as that GEMM is done (untied: none
is sent), and at the backward's end every rank's lookup-gradient rows are all-gathered (tokens x
hidden, a few MB) and each rank adds those of its slab's tokens, in the order one process sums them
(``_table_grad``).

Collectives are host steps (``Plan.host``): a graph run launches the kernels between them as
graphs. They are ordered on the legacy default stream, where the plan's launches and graphs run
(``NcclCommunicator``'s default stream, the side stream forked from it and joined back;
``StagedCommunicator``'s blocking copies wait for it).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from ptxgen.kernels.embedding import embedding_backward_plan
from runtime import DeviceArray, Event, View
from runtime.plan import Plan

from ..config import ModelConfig
from ..cuda_buffers import Arena, ParamLayout
from ..cuda_model import CudaBackend
from ..cuda_ops import Ops
from ..optim import AdamWSettings
from ..precision import Precision
from .batch import eval_rows, global_targets, local_batch
from .comm import Communicator
from .replicas import check_replicas
from .shards import ALIGN, DEFAULT_BUCKET_ELEMS, ShardPlan, bucket_ready_steps, send_order


TABLE = "model.embed_tokens.weight"


def f32_read(layout: ParamLayout) -> list[tuple[int, int]]:
    """The flat ranges of weights the bf16 step reads in f32 (besides the GEMMs' bf16 copies): the
    embedding table, which the lookup reads, and the undecayed norms and biases."""
    table = layout.offsets[TABLE]
    ranges = [(table, table + math.prod(layout.shapes[TABLE])), (layout.decay_end, layout.total)]
    return [r for r in ranges if r[1] > r[0]]


def f32_ranges(layout: ParamLayout, precision: Precision) -> list[tuple[int, int]]:
    """The flat ranges a rank's step reads in f32: in bf16 ``f32_read``'s, in fp32 all of them."""
    return f32_read(layout) if precision is Precision.BF16 else [(0, layout.total)]


def shard_plan(config: ModelConfig, world: int, precision: Precision, bucket_elems: int = DEFAULT_BUCKET_ELEMS
               ) -> tuple[ShardPlan, int | None]:
    """The buckets and shards of a ZeRO-1 run on ``world`` ranks, and the table's rows a rank's
    slab (None: they do not split evenly, and the table is bucketed like the rest): buckets cut
    where the f32-read ranges start and end, the table as one bucket of row slabs where its rows
    split (see the module docstring)."""
    layout = ParamLayout(config)
    f32 = f32_ranges(layout, precision)
    table, unit = layout.offsets[TABLE], world * ALIGN
    end = table + config.vocab_size * config.hidden_size
    slabs = table % unit == 0 and end % unit == 0 and config.vocab_size % world == 0
    shards = ShardPlan.of(layout, world, bucket_elems, cuts=[e for r in f32 for e in r] + [table, end],
                          whole=(table, end) if slabs else None)
    return shards, config.vocab_size // world if slabs else None


class ZeroCudaRank(CudaBackend):
    """One rank of a ZeRO-1 run on the GPU (the training backend's interface; the collectives mean
    every rank calls ``train_step``, ``loss``, ``params`` (after a bf16 step), ``optimizer_state``
    and ``check_replicas`` together, while the communicator is open; ``close`` is the rank's own).
    ``comm`` takes device views."""

    name = "cuda-zero1"
    description = "cuda (raw PTX kernels through the CUDA driver API), ZeRO-1 data parallel"
    # the reduce-scatters' kernels run on a second stream beside the backward's GEMMs: a GEMM
    # whose tail parts waited on blocks kept off the SMs by them could wait on the other ranks
    gemms_alone = False

    def __init__(self, comm: Communicator, config: ModelConfig, params: dict[str, np.ndarray], adamw: AdamWSettings,
                 precision: Precision = Precision.FP32, bucket_elems: int = DEFAULT_BUCKET_ELEMS,
                 digest_every: int = 0, **backend):
        """``digest_every``: compare the ranks' weights (the f32 masters and the bf16 copies each
        rank casts for itself) every that many steps (0: never); see ``replicas``."""
        self.comm, self.digest_every = comm, digest_every
        layout = ParamLayout(config)
        self.shards, self.slab_rows = shard_plan(config, comm.world, precision, bucket_elems)
        table = layout.offsets[TABLE]
        self._table_bucket = next(b.index for b in self.shards.buckets if b.start == table) \
            if self.slab_rows is not None else None
        self._table_rows: dict[tuple[int, int], tuple[View, View, View]] = {}  # batch shape -> grouping buffers
        # per bucket: gathered as the bf16 copies (none of it read in f32), else in f32
        self.gathered_bf16 = [not any(b.start < hi and lo < b.end for lo, hi in f32_ranges(layout, precision))
                              for b in self.shards.buckets]
        self._masters_stale = False  # bf16-gathered buckets' f32 masters hold only this rank's pieces
        super().__init__(config, params, adamw, precision=precision, **backend)
        self.grad_shard = DeviceArray(self.shards.shard_size)
        # one event a bucket, recorded on the communicator's side stream after its all-gather
        overlapped = hasattr(comm, "all_gather_overlapped")
        self._gathered = [Event() for _ in self.shards.buckets] if overlapped else []
        # the lookup-gradient rows' all-gather
        self._rows_gathered = Event() if overlapped and self.slab_rows is not None else None
        # where the main stream waits for the side stream in the backward and before the
        # optimizer: (main's mark, the side's), their gaps the step's wait on communication
        self._waits = [(Event(), self._rows_gathered)] if self._rows_gathered else []
        self._waits += [(Event(), Event())] if overlapped else []
        self.grad_shard.fill_u32(0)
        self._loss_sum = DeviceArray(1)

    def _flat_sizes(self) -> tuple[int, int]:
        return self.shards.padded_total, self.shards.shard_size

    # -- the step ---------------------------------------------------------------------------
    def train_step(self, ids: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        """One AdamW step on the GLOBAL batch ``ids``/``targets`` (every rank passes the same one);
        returns (the global batch's mean loss, the global gradient norm), the same on every rank."""
        x, y = local_batch(np.asarray(ids), np.asarray(targets), self.comm.rank, self.comm.world)
        shape = self._prepare(x, y, targets_counted=global_targets(targets))
        if self.slab_rows is not None:
            self._group_slab_tokens(shape.plan, np.asarray(ids), x.shape)
        self.step += 1
        a = self.adamw
        shape.plan.set(lr=lr, bias_correction1=1.0 - a.beta1 ** self.step, bias_correction2=1.0 - a.beta2 ** self.step)
        self._masters_stale = any(self.gathered_bf16)  # from AdamW on (a failed run leaves them so too)
        self._run(shape, graph=self.graph)
        losses, norm = self._results(shape, norm=True)
        loss = self._global_mean(losses, targets)
        if self.digest_every and self.step % self.digest_every == 0:
            self.check_replicas()
        return loss, norm

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> float:
        """Collective: the GLOBAL batch's mean loss (every rank passes the same one), each rank's
        forward on its rows alone (``eval_rows``), so validation takes 1/N of one GPU's time and
        no batch shape of its own."""
        rows = eval_rows(len(ids), self.comm.rank, self.comm.world)
        losses = np.zeros(0, np.float32)
        if rows.stop > rows.start:
            shape = self._prepare(ids[rows], targets[rows])
            self._run(shape, "forward")
            losses = shape.bufs.losses.to_numpy()
        return self._global_mean(losses, targets)

    def _global_mean(self, losses: np.ndarray, targets: np.ndarray) -> float:
        """This rank's per-token losses summed, then over the ranks, over the global count of targets."""
        self._loss_sum.upload(np.array([losses.astype(np.float64).sum()], np.float32))
        self.comm.all_reduce(self._loss_sum.view("loss sum"))
        return float(self._loss_sum.to_numpy()[0]) / global_targets(targets)

    def _group_slab_tokens(self, plan: Plan, ids: np.ndarray, local: tuple[int, int]) -> None:
        """The lookup backward's grouping of the GLOBAL batch's positions (every rank's rows, in
        rank order: as the all-gather lays them out and one process sorts them), cut to the tokens
        of this rank's slab, counted from its first row."""
        order, starts, tokens = embedding_backward_plan(ids.reshape(-1))
        lo = self.comm.rank * self.slab_rows
        first, last = np.searchsorted(tokens, [lo, lo + self.slab_rows])
        if last == first:  # no token of the slab in this batch: one empty segment, which adds nothing
            starts, tokens, first, last = np.zeros(2, np.int32), np.full(1, lo, np.int32), 0, 1
        bufs = self._table_rows[local]
        for buf, host in zip(bufs, (order, starts[first:last + 1], tokens[first:last] - lo)):
            buf.upload(np.pad(host.astype(np.int32), (0, buf.size - len(host))))
        plan.set(slab_segments=int(last - first))

    def _table_grad(self, ops: Ops, arena: Arena, batch: int, seq: int) -> Callable[[View], None] | None:
        """The table's gradient into this rank's slab of the gradient shard: every rank's lookup
        gradient rows all-gathered (NCCL: on the side stream, after the LM head's part of the slab
        has arrived there), then the lookup backward over the slab's tokens. None: the table is
        not in slabs, so backward's own (its bucket then reduce-scattered when final)."""
        if self.slab_rows is None:
            return None
        comm, plan, tokens = self.comm, ops.plan, batch * seq
        every = comm.world * tokens
        rows = arena.new("every rank's lookup-gradient rows", (every, self.config.hidden_size))
        grouping = (arena.new("their order by token", (every,), "i32"),
                    arena.new("the slab's segment starts", (every + 1,), "i32"),
                    arena.new("the slab's tokens", (every,), "i32"))
        for buf in grouping:  # until a step groups a batch: empty segments, which add nothing
            buf.upload(np.zeros(buf.size, np.int32))
        self._table_rows[(batch, seq)] = grouping
        b = self.shards.buckets[self._table_bucket]
        p = self.shards.pieces(comm.rank)[b.index]
        slab = self.grad_shard.view("the table gradient's slab", p.shard, (p.size,))

        def made(g: View) -> None:
            if self._rows_gathered is not None:
                plan.host(functools.partial(comm.all_gather_overlapped, g, rows, self._rows_gathered),
                          label="all-gather the lookup-gradient rows", reads=[g], writes=[rows])
                plan.host(functools.partial(comm.wait_for, self._rows_gathered, self._waits[0][0]),
                          label="wait for them", reads=[rows])
            else:
                plan.host(functools.partial(comm.all_gather, g, rows), label="all-gather the lookup-gradient rows",
                          reads=[g], writes=[rows])
            ops.embedding_backward(rows, *self._table_rows[(batch, seq)], TABLE, plan.value("slab_segments", 1),
                                   into=slab)
        return made

    def comm_wait_ms(self) -> float | None:
        """How long the last step's main stream waited for the side stream's collectives: for the
        lookup-gradient rows at the backward's end, and for the gradients' reduce-scatters before
        the optimizer (None: this communicator does not overlap them)."""
        return sum(max(0.0, at.elapsed_ms(done)) for at, done in self._waits) if self._waits else None

    def check_replicas(self) -> None:
        """Collective: stop with one line (``ReplicaMismatch``) unless every rank holds the same bits
        (the f32 weights gathered in f32 and every bf16 copy: what the step reads)."""
        weights = self.weights.to_numpy()
        held = [weights[b.start:b.end].view(np.uint8) for b in self.shards.buckets if not self.gathered_bf16[b.index]]
        if self.weights16 is not None:
            held.append(self.weights16.to_numpy().view(np.uint8))
        check_replicas(self.comm, np.concatenate(held), self.step, self._all_gather_host)

    def _all_gather_host(self, mine: np.ndarray, every: np.ndarray) -> None:
        send, recv = DeviceArray.from_numpy(mine), DeviceArray(every.size, "u8")
        try:
            self.comm.all_gather(send, recv)
            every[:] = recv.to_numpy()
        finally:
            send.free()
            recv.free()

    def _optimizer(self, ops: Ops, plan: Plan) -> None:
        comm, shards, lay = self.comm, self.shards, self.layout
        pieces = shards.pieces(comm.rank)
        grads, gshard = self.grads, self.grad_shard
        bucket = lambda buf, b, what: buf.view(f"{what} bucket {b.index}", b.start, (b.size,))  # noqa: E731
        piece = lambda buf, p, what, at: buf.view(f"{what} piece {p.bucket}", at, (p.size,))  # noqa: E731
        # each bucket's reduce-scatter placed in the backward right after its last writer; a
        # communicator with a side stream (NCCL) runs them there while the backward goes on
        overlapped = getattr(comm, "reduce_scatter_overlapped", None)
        # an untied table's slab has nothing to send: only its lookup's gradient, made in the shard
        unsent = [self._table_bucket] if self._table_bucket is not None and not self.config.tie_word_embeddings else []
        ready, backward = bucket_ready_steps(plan, grads.ptr, shards, skip=unsent), plan.of("backward")
        for i in send_order(ready):
            b, p = shards.buckets[i], pieces[i]
            send, recv = bucket(grads, b, "gradients"), piece(gshard, p, "gradient shard", p.shard)
            plan.insert_host(backward[ready[i]], functools.partial(overlapped or comm.reduce_scatter, send, recv),
                             label=f"reduce-scatter gradient bucket {i}", reads=[send], writes=[recv])
        if overlapped:
            plan.host(functools.partial(comm.join_overlapped, *self._waits[-1]),
                      label="wait for the gradients' reduce-scatters",
                      reads=[gshard.view("gradient shard")])

        def across(partial: View) -> None:
            plan.host(lambda: comm.all_reduce(partial), label="all-reduce grad norm partial sums",
                      reads=[partial], writes=[partial])

        max_norm = self.adamw.max_grad_norm if self.adamw.max_grad_norm > 0 else math.inf
        ops.clip_grad_norm(gshard.view("gradient shard"), self.norm_partial.view("grad norm partial sums"),
                           self.norm_out.view("grad norm, clip scale"), max_norm, across=across)
        clip = self.norm_out.view("clip scale", 1, (1,))
        lr, bc1, bc2 = (plan.value(n, 1.0) for n in ("lr", "bias_correction1", "bias_correction2"))
        # bucket by bucket: AdamW on this rank's piece, then the piece sent to the others (NCCL: on
        # the side stream, while AdamW goes on with the next piece and the casts below proceed)
        gather = getattr(comm, "all_gather_overlapped", None)
        segments = shards.segments(comm.rank)
        for b, p in zip(shards.buckets, pieces):
            for seg in (s for s in segments if p.flat <= s.flat < p.flat + p.size):
                part = f"shard {seg.shard}..{seg.shard + seg.size}"
                param = self.weights.view(f"weights of {part}", seg.flat, (seg.size,))
                grad, m, v = (buf.view(f"{what} of {part}", seg.shard, (seg.size,)) for what, buf in
                              (("gradients", gshard), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)))
                param16 = self.weights16.view(f"weights of {part}[bf16]", seg.flat, (seg.size,)) \
                    if self.bf16 and seg.decays else None
                ops.adamw(seg.decays, param, grad, m, v, clip, lr, bc1, bc2, param16=param16)
            held, what = (self.weights16, "bf16 weights") if self.gathered_bf16[b.index] else (self.weights, "weights")
            send, recv = piece(held, p, what, p.flat), bucket(held, b, what)
            sent = functools.partial(gather, send, recv, self._gathered[b.index]) if gather else \
                functools.partial(comm.all_gather, send, recv)
            plan.host(sent, label=f"all-gather {what} bucket {b.index}", reads=[send], writes=[recv])
        if self.bf16:  # the other ranks' pieces of the f32-gathered matrices' copies (AdamW wrote ours)
            for b, p in zip(shards.buckets, pieces):
                for lo, hi in ((b.start, p.flat), (p.flat + p.size, b.end)):  # the bucket but this rank's piece
                    hi = min(hi, lay.decay_end)
                    if self.gathered_bf16[b.index] or lo >= hi:
                        continue
                    if gather:
                        plan.host(functools.partial(comm.wait_for, self._gathered[b.index]),
                                  label=f"wait for weight bucket {b.index}")
                    ops.cast(self.weights.view(f"matrices {lo}+{hi - lo}", lo, (hi - lo,)),
                             self.weights16.view(f"matrices {lo}+{hi - lo}[bf16]", lo, (hi - lo,)), hi - lo)
        if gather:  # the last bucket's arrival: every all-gather's (one stream)
            plan.host(functools.partial(comm.wait_for, self._gathered[-1]), label="wait for the weights' all-gathers",
                      reads=[self.weights.view("weights")])
        for b in (b for b in shards.buckets if self.gathered_bf16[b.index]):
            stale = plan.readers(self.weights.ptr + 4 * b.start, 4 * b.size, "forward", "backward")
            if stale:
                raise AssertionError(f"{stale[0].label} reads the f32 weights {b.start}..{b.end}, which a rank "
                                     "gathers only as bf16 copies: add them to f32_read")

    # -- state ------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """Every weight in f32. Collective after a bf16 step (the other ranks' master pieces of the
        bf16-gathered matrices are fetched): every rank reads it together, as train's checkpoints do."""
        self.gather_masters()
        return self.layout.unflatten(self.weights.to_numpy()[:self.layout.total])

    def gather_masters(self) -> None:
        """Collective after a bf16 step: the other ranks' f32 master pieces of the bf16-gathered
        matrices fetched into this rank's full weights (nothing to do otherwise)."""
        if not self._masters_stale:
            return
        if getattr(self.comm, "closed", False):
            raise RuntimeError("the other ranks' master weights went with the closed communicator: read params "
                               "(every rank together) before closing it")
        for b, p in zip(self.shards.buckets, self.shards.pieces(self.comm.rank)):
            if self.gathered_bf16[b.index]:
                self.comm.all_gather(self.weights.view(f"weights piece {b.index}", p.flat, (p.size,)),
                                     self.weights.view(f"weights bucket {b.index}", b.start, (b.size,)))
        self._masters_stale = False

    def loss_and_grads(self, ids: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        raise TypeError("a data-parallel rank holds only its shard of the summed gradients (train_step uses it); "
                        "use CudaBackend for every parameter's gradient")

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Collective: both moments of every parameter, gathered from the shards (one process's format)."""
        out = {}
        full = DeviceArray(self.shards.padded_total)
        try:
            for prefix, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                for b, p in zip(self.shards.buckets, self.shards.pieces(self.comm.rank)):
                    self.comm.all_gather(shard.view(prefix, p.shard, (p.size,)), full.view(prefix, b.start, (b.size,)))
                flat = full.to_numpy()[:self.layout.total]
                out.update({f"{prefix}.{k}": v for k, v in self.layout.unflatten(flat).items()})
        finally:
            full.free()
        return out

    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None:
        """This rank's shard of a checkpoint's moments (no communication: each rank reads its part)."""
        for prefix, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            flat = self.layout.flatten({k: state[f"{prefix}.{k}"] for k in self.layout.shapes})
            shard.upload(self.shards.shard_of(self.shards.pad(flat), self.comm.rank))
        self.step = step

    def close(self) -> None:
        super().close()
        for buf in (self.grad_shard, self._loss_sum):
            buf.free()
        for event in self._gathered + [event for pair in self._waits for event in pair]:
            event.destroy()
