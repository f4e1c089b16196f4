"""The GPU ZeRO-1 step (model/parallel/zero_cuda.py) without a GPU: each rank's plan built on the dry
device as the GPU runs it, its optimizer section run in the PTX interpreter over a made-up device
memory, the collectives staged through a LocalGroup. Two ranks holding different gradients end the
step with the same weights, which are what one process's AdamW makes of the summed gradients; each
keeps its shard of the moments. Three ranks train the tiny model too, whose 256-row table does not
split among them: its gradient then goes as every other bucket does."""
import dataclasses
import math

import numpy as np
import pytest

from dry_device import DryCache, dry_device
from fake_memory import FakeMemory
from model.config import preset
from model.cuda_buffers import ParamLayout
from model.optim import AdamWSettings, clip_scale
from model.params import init_params
from model.parallel.comm import LocalGroup, StagedCommunicator
from model.parallel.zero_cuda import ZeroCudaRank
from model.precision import Precision
from ptxgen.kernels.adamw import adamw_reference
from ptxgen.vecio import to_bf16
from runtime.plan import Host

CONFIG = preset("tiny")
BUCKET = 1 << 15  # elements: a dozen buckets, one straddling the end of the decayed matrices
LR, STEP = 3e-3, 1
PARAMS = init_params(CONFIG, seed=1)
# the optimizer sections' model: a tied table, whose slab of every rank's piece carries the LM
# head's (here made-up) gradient through its reduce-scatter, as every other bucket does
TIED = dataclasses.replace(CONFIG, tie_word_embeddings=True)
TIED_PARAMS = init_params(TIED, seed=1)
ADAMW = AdamWSettings(max_grad_norm=0.5)  # the summed gradients' norm is larger: clipped


def zero_step(monkeypatch, precision):
    """Two ranks' optimizer sections in the interpreter on made-up gradients: (the gradients, every
    rank's weights, norm-and-clip, moments and bf16 copies after the step)."""
    layout = ParamLayout(TIED)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(layout.total).astype(np.float32) * 1e-2 for _ in range(2)]
    with dry_device(monkeypatch) as allocations:
        memory, group = FakeMemory(allocations), LocalGroup(2)
        ranks = [ZeroCudaRank(StagedCommunicator(group.communicator(r), memory.get, memory.put), TIED, TIED_PARAMS,
                              ADAMW, precision=precision, bucket_elems=BUCKET, cache=DryCache()) for r in range(2)]
        plans = [rank.plan(1, 32) for rank in ranks]
        shards = ranks[0].shards
        assert len(shards.buckets) > 3  # in fp32, one straddles the end of the decayed matrices (bf16 cuts there)
        assert precision is Precision.BF16 or any(b.start < layout.decay_end < b.end for b in shards.buckets)
        for rank, plan, grad in zip(ranks, plans, grads):
            memory.put(rank.weights.view("w"), shards.pad(layout.flatten(TIED_PARAMS)))
            memory.put(rank.grads.view("g"), shards.pad(grad))
            for buf in (rank.exp_avg, rank.exp_avg_sq):
                memory.put(buf.view("m"), np.zeros(shards.shard_size, np.float32))
            plan.set(lr=LR, bias_correction1=1 - ADAMW.beta1 ** STEP, bias_correction2=1 - ADAMW.beta2 ** STEP)

        def optimizer(comm) -> None:  # each rank's thread; its host steps meet the other's in the group
            plan = plans[comm.rank]  # the reduce-scatters (in the backward, where each bucket is final), the rest
            for step in [s for s in plan.of("backward") if isinstance(s, Host)] + plan.of("optimizer"):
                memory.run(step, plan._values)

        group.run(optimizer)  # a rank's error is raised here
        out = {"weights": [memory.get(r.weights.view("w"))[:layout.total] for r in ranks],
               "norms": [memory.get(r.norm_out.view("n")) for r in ranks],
               "moments": [(memory.get(r.exp_avg.view("m")), memory.get(r.exp_avg_sq.view("v"))) for r in ranks],
               "copies": [memory.get(r.weights16.view("w16")) for r in ranks] if precision is Precision.BF16 else [],
               "held": [held_in_f32(r) for r in ranks], "shards": shards}
        if precision is Precision.BF16:  # params' collective: every f32 master on every rank again
            for rank in ranks:
                rank._masters_stale = True  # as train_step marks it (its sections run here directly)
            group.run(lambda comm: ranks[comm.rank].gather_masters())
        out["masters"] = [memory.get(r.weights.view("w"))[:layout.total] for r in ranks]
        for rank in ranks:
            rank.close()
    return grads, out


def held_in_f32(rank) -> np.ndarray:
    """Where a rank's f32 weights are current after a step: everywhere in fp32; in bf16, the buckets
    gathered in f32 and its own pieces of the others (gathered as bf16 copies)."""
    held = np.zeros(rank.shards.padded_total, bool)
    for b, p in zip(rank.shards.buckets, rank.shards.pieces(rank.comm.rank)):
        held[b.start:b.end] = not rank.gathered_bf16[b.index]
        held[p.flat:p.flat + p.size] = True
    return held[:rank.layout.total]


def check_against_one_process(grads, out) -> None:
    """What one process's AdamW makes of the summed gradients, clipped by their global norm: the
    f32 weights where each rank holds them, every bf16 copy on every rank."""
    layout = ParamLayout(TIED)
    total = grads[0] + grads[1]  # in f32, rank 0's first: the order the collectives sum in
    norm = math.sqrt(float(np.dot(total.astype(np.float64), total)))
    norms, after = out["norms"], out["weights"]
    assert norms[0][0] == pytest.approx(norm, rel=1e-5)
    assert norms[0][1] == pytest.approx(clip_scale(norm, ADAMW.max_grad_norm), rel=1e-5)
    flat = layout.flatten(TIED_PARAMS)
    expected, m_exp, v_exp = (np.zeros(layout.total, np.float32) for _ in range(3))
    for decays, part in ((True, slice(0, layout.decay_end)), (False, slice(layout.decay_end, layout.total))):
        expected[part], m_exp[part], v_exp[part] = adamw_reference(
            flat[part], total[part], m_exp[part], v_exp[part], lr=LR, beta1=ADAMW.beta1, beta2=ADAMW.beta2,
            eps=ADAMW.eps, weight_decay=ADAMW.weight_decay if decays else 0.0, step=STEP, clip=norms[0][1])
    both = out["held"][0] & out["held"][1]
    assert np.array_equal(after[0][both], after[1][both]) and np.array_equal(norms[0], norms[1])  # the same bits
    for weights, held in zip(after, out["held"]):
        np.testing.assert_allclose(weights[held], expected[held], rtol=1e-6, atol=1e-7)
    for masters in out["masters"]:  # bf16: after gather_masters; fp32: as the step left them
        np.testing.assert_allclose(masters, expected, rtol=1e-6, atol=1e-7)
        assert np.array_equal(masters, out["masters"][0])
    shards = out["shards"]
    for r, (m, v) in enumerate(out["moments"]):
        np.testing.assert_allclose(m, shards.shard_of(shards.pad(m_exp), r), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(v, shards.shard_of(shards.pad(v_exp), r), rtol=1e-6, atol=1e-12)
    current = np.where(out["held"][0], after[0], after[1])[:layout.decay_end]  # each piece from a rank holding it
    for copy in out["copies"]:  # the GEMMs' bf16 copy of every matrix, the other rank's pieces too: its rounding
        assert np.array_equal(copy, to_bf16(current))


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16], ids=["fp32", "bf16"])
def test_two_ranks_end_a_step_with_one_processs_adamw_of_the_summed_gradients(monkeypatch, precision):
    check_against_one_process(*zero_step(monkeypatch, precision))


def test_planted_a_rank_that_skips_the_weights_all_gather_is_caught(monkeypatch):
    """Each rank then updates only its own shard of the weights: the replicas differ, and each is
    stale where the other rank's shard lies."""
    monkeypatch.setattr(StagedCommunicator, "all_gather", lambda self, send, recv: None)
    with pytest.raises(AssertionError):
        check_against_one_process(*zero_step(monkeypatch, Precision.FP32))


def test_planted_a_norm_of_the_local_shard_alone_is_caught(monkeypatch):
    """The grad-norm partial sums left un-reduced: each rank clips by its shard's norm."""
    monkeypatch.setattr(StagedCommunicator, "all_reduce", lambda self, buf: None)
    with pytest.raises(AssertionError):
        check_against_one_process(*zero_step(monkeypatch, Precision.FP32))


def train_ranks_against_numpy(monkeypatch, config, params, world: int = 2) -> None:
    """ZeroCudaRank.train_step itself on the interpreted device (tests/fake_memory.py): each of
    ``world`` ranks' forward and backward on its row of the global batch, the collectives through
    the host, two steps; against the numpy backend on the whole batches. Tolerance as
    tests/test_model_sim.py's."""
    from fake_memory import interpreted_device
    from model.numpy_backend import NumpyBackend
    from model.reference import IGNORE_INDEX

    rng = np.random.default_rng(3)
    batches = []
    for _ in range(2):
        ids, targets = (rng.integers(0, config.vocab_size, (world, 8)) for _ in range(2))
        targets[0, :3] = IGNORE_INDEX  # rank 0's half has fewer targets: the mean must be the global batch's
        batches.append((ids, targets))
    odd = batches[1][0][:1], batches[1][1][:1]  # validation's partial batch: one row, ranks past 0 have none
    numpy = NumpyBackend(config, params, ADAMW)
    expected = [numpy.train_step(ids, targets, LR) for ids, targets in batches]
    expected_val = [numpy.loss(*batches[0]), numpy.loss(*odd)]
    with interpreted_device(monkeypatch):
        group = LocalGroup(world)

        def rank(comm):
            r = ZeroCudaRank(StagedCommunicator(comm), config, params, ADAMW, bucket_elems=BUCKET, cache=DryCache(),
                             digest_every=1)  # the replicas' digests compared after every step
            # the table in row slabs where its rows split evenly (256 among 2), else reduce-scattered whole
            assert r.slab_rows == (config.vocab_size // world if config.vocab_size % world == 0 else None)
            try:
                steps = [r.train_step(ids, targets, LR) for ids, targets in batches]
                return steps, r.params, [r.loss(*batches[0]), r.loss(*odd)]  # validation: each rank its rows
            finally:
                r.close()

        results = group.run(rank)
    theirs = np.concatenate([numpy.params[n].reshape(-1) for n in sorted(numpy.params)])
    for steps, weights, val in results:
        assert val == pytest.approx(expected_val, rel=1e-5)  # after two steps: the weights' tolerance below
        for (loss, norm), (loss1, norm1) in zip(steps, expected):
            assert loss == pytest.approx(loss1, rel=1e-6) and norm == pytest.approx(norm1, rel=1e-5)
        ours = np.concatenate([weights[n].reshape(-1) for n in sorted(weights)])
        assert (~np.isclose(ours, theirs, rtol=1e-5, atol=1e-6)).mean() <= 1e-3
        assert np.abs(ours - theirs).max() <= 2 * LR
    assert all(np.array_equal(results[0][1][n], other[1][n]) for other in results[1:] for n in results[0][1])


@pytest.mark.parametrize("config, params", [(CONFIG, PARAMS), (TIED, TIED_PARAMS)], ids=["untied", "tied"])
def test_two_ranks_train_steps_end_to_end_match_one_process(monkeypatch, config, params):
    """Two interpreted ranks' steps as one process's. The table's gradient comes from both ranks'
    lookup rows into each rank's slab of it (after the LM head's part arrived there through the
    slab's reduce-scatter, tied; alone, untied)."""
    train_ranks_against_numpy(monkeypatch, config, params)


def test_three_ranks_whose_vocabulary_does_not_split_train_the_table_reduce_scattered_whole(monkeypatch):
    """256 rows among 3 ranks: no row slabs; the tied table's gradient goes as the other buckets do."""
    train_ranks_against_numpy(monkeypatch, TIED, TIED_PARAMS, world=3)


def test_planted_a_rank_that_adds_only_its_own_lookup_rows_is_caught(monkeypatch):
    """The data-parallel embedding bug: each rank's slab summing only the rows of its own tokens
    (the others' positions left out of the grouping), so a token another rank saw loses that
    gradient. The weights then differ from one process's."""
    group = ZeroCudaRank._group_slab_tokens

    def own_rows_only(self, plan, ids, local):
        mine = np.full_like(ids, -1)  # -1 sorts before every slab: those positions are left out
        rows = slice(self.comm.rank * local[0], (self.comm.rank + 1) * local[0])
        mine[rows] = ids[rows]
        group(self, plan, mine, local)

    monkeypatch.setattr(ZeroCudaRank, "_group_slab_tokens", own_rows_only)
    with pytest.raises(AssertionError):
        train_ranks_against_numpy(monkeypatch, CONFIG, PARAMS)


def test_planted_a_weight_bucket_that_arrives_changed_on_one_rank_stops_both_at_the_digest(monkeypatch):
    """A transport fault: rank 1's copy of one gathered weight bucket is off by one unit in the last
    place. Nothing in the step notices (the weights are finite, the loss plausible); the digest
    exchanged after the step stops both ranks with one line naming rank 1."""
    from fake_memory import interpreted_device
    from model.parallel.replicas import ReplicaMismatch

    rng = np.random.default_rng(4)
    ids, targets = (rng.integers(0, CONFIG.vocab_size, (2, 8)) for _ in range(2))
    with interpreted_device(monkeypatch):
        def rank(comm):
            staged = StagedCommunicator(comm)
            if comm.rank == 1:
                gather = staged.all_gather

                def faulty(send, recv):
                    gather(send, recv)
                    if recv.dtype == "f32" and recv.size > 1:
                        host = recv.to_numpy()
                        host[0] = np.nextafter(host[0], np.float32(np.inf))
                        recv.upload(host)
                staged.all_gather = faulty
            r = ZeroCudaRank(staged, CONFIG, PARAMS, ADAMW, bucket_elems=BUCKET, cache=DryCache(), digest_every=1)
            try:
                return r.train_step(ids, targets, LR)
            finally:
                r.close()

        with pytest.raises(ReplicaMismatch, match=r"^step 1: the weights of rank 1 differ from rank 0's"):
            LocalGroup(2).run(rank)
