"""ZeRO-1 on the numpy backend with the CPU communicator: N ranks, each on its slice of the global
batch, reduce-scatter, global-norm clipping, AdamW on its shard, all-gather. After a few steps
the weights equal one process's on the same global batches, every rank holds the same bits, the
moments consolidate to one process's optimizer state, and ranks whose weights differ are
stopped with one line.

Tolerance (weights, moments, loss, norm): rtol 1e-6, atol 1e-9. The arithmetic is the numpy
backend's (float64 over f32 parameters and moments); the only difference from one process is the
order of float64 sums (each rank's rows, then the ranks in order; the norm shard by shard), about
1e-16 relative, which can move a stored f32 weight or moment by one ulp (1.2e-7 relative) at a
rounding boundary, a few times over a few steps. In practice the tiny model comes out bit-equal.
"""
import numpy as np
import pytest

from model.config import preset
from model.numpy_backend import NumpyBackend
from model.optim import AdamWSettings
from model.parallel.comm import CommError, LocalGroup
from model.parallel.replicas import ReplicaMismatch, check_replicas
from model.parallel.zero_numpy import ZeroNumpyRank
from model.params import init_params
from model.reference import IGNORE_INDEX

RTOL, ATOL = 1e-6, 1e-9
TINY = preset("tiny")
ADAMW = AdamWSettings(max_grad_norm=0.5)  # low enough that clipping acts: the global norm matters


def global_batches(steps: int = 3, batch: int = 4, seq: int = 16):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, TINY.vocab_size, (batch, seq))
        targets = rng.integers(0, TINY.vocab_size, (batch, seq))
        targets[0, :5] = IGNORE_INDEX  # rows with fewer targets: the mean must be the global batch's
        out.append((ids, targets))
    return out


def one_process(batches, lr=1e-2):
    backend = NumpyBackend(TINY, init_params(TINY, seed=0), ADAMW)
    return [backend.train_step(x, y, lr) for x, y in batches], backend


def data_parallel(world, batches, lr=1e-2, **kw):
    def run(comm):
        rank = ZeroNumpyRank(comm, TINY, init_params(TINY, seed=0), ADAMW, bucket_elems=40_000, **kw)
        steps = [rank.train_step(x, y, lr) for x, y in batches]
        return steps, rank.params, rank.optimizer_state(), rank.weights.copy()

    return LocalGroup(world).run(run)


@pytest.fixture(scope="module")
def single():
    return one_process(global_batches())


@pytest.fixture(scope="module")
def parallel():
    """world -> every rank's (steps, params, optimizer state, weights) after the 3 global batches."""
    return {world: data_parallel(world, global_batches(), digest_every=1) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_n_ranks_train_the_weights_one_process_trains_on_the_same_global_batches(single, parallel, world):
    (losses, backend), ranks = single, parallel[world]
    steps, params, state, _ = ranks[0]
    for (loss, norm), (loss1, norm1) in zip(steps, losses):
        assert loss == pytest.approx(loss1, rel=RTOL) and norm == pytest.approx(norm1, rel=RTOL)
    assert steps[0][1] > ADAMW.max_grad_norm  # clipped: the global norm, not a rank's, decided the scale
    for name, value in backend.params.items():
        np.testing.assert_allclose(params[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    for name, value in backend.optimizer_state().items():  # consolidated: one process's checkpoint format
        np.testing.assert_allclose(state[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_holds_bit_identical_weights_and_reports_the_same_loss(parallel, world):
    ranks = parallel[world]
    for steps, _, _, weights in ranks[1:]:
        assert weights.tobytes() == ranks[0][3].tobytes()
        assert steps == ranks[0][0]


def test_a_rank_resumes_from_its_shard_of_a_consolidated_checkpoint(single):
    batches = global_batches()
    _, backend = one_process(batches[:2])

    def run(comm):
        rank = ZeroNumpyRank(comm, TINY, backend.params, ADAMW, bucket_elems=40_000)
        rank.load_optimizer_state(backend.optimizer_state(), 2)
        rank.train_step(*batches[2], 1e-2)
        return rank.params

    params = LocalGroup(2).run(run)[0]
    for name, value in single[1].params.items():
        np.testing.assert_allclose(params[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def test_a_run_saved_on_four_ranks_resumes_on_three_as_one_process_would_go_on():
    """The consolidated state knows nothing of the ranks that wrote it: 4 ranks' two steps, then
    the third on 3 ranks (their own shards of it), against one process's three steps."""
    batches = global_batches(batch=12)

    def first_two(comm):
        rank = ZeroNumpyRank(comm, TINY, init_params(TINY, seed=0), ADAMW, bucket_elems=40_000)
        for x, y in batches[:2]:
            rank.train_step(x, y, 1e-2)
        return rank.params, rank.optimizer_state()

    params, state = LocalGroup(4).run(first_two)[0]

    def the_third(comm):
        rank = ZeroNumpyRank(comm, TINY, params, ADAMW, bucket_elems=40_000)
        rank.load_optimizer_state(state, 2)
        rank.train_step(*batches[2], 1e-2)
        return rank.params

    resumed = LocalGroup(3).run(the_third)
    _, backend = one_process(batches)
    for name, value in backend.params.items():
        for ours in resumed:
            np.testing.assert_allclose(ours[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def test_ranks_whose_weights_differ_are_stopped_with_one_line():
    def run(comm):
        weights = np.ones(100, np.float32)
        if comm.rank == 2:
            weights[37] = np.nextafter(np.float32(1), np.float32(2))  # one ulp of one weight
        check_replicas(comm, weights, step=40)

    with pytest.raises(ReplicaMismatch) as e:
        LocalGroup(3).run(run)
    message = str(e.value)
    assert message.startswith("step 40: the weights of rank 2 differ from rank 0's (sha256 ")
    assert message.endswith("data-parallel ranks must hold bit-identical weights, so the run stops")
    assert "\n" not in message


def test_a_rank_whose_gathered_weights_differ_is_caught_at_the_next_digest_exchange():
    """A planted defect: the all-gather hands rank 1 one weight a ulp off (a transport or memory
    fault; a rank's own arithmetic cannot make replicas differ, since every weight is
    all-gathered every step). The exchange every 2 steps stops the run at step 2, on every rank."""
    batches = global_batches(steps=3)

    def run(comm):
        if comm.rank == 1:
            gather = comm.all_gather

            def faulty(send, recv):
                gather(send, recv)
                if recv.dtype == np.float32 and recv.size > 1:
                    recv[-1] = np.nextafter(recv[-1], np.float32(np.inf))
            comm.all_gather = faulty
        rank = ZeroNumpyRank(comm, TINY, init_params(TINY, seed=0), ADAMW, bucket_elems=40_000, digest_every=2)
        for x, y in batches:
            rank.train_step(x, y, 1e-2)

    with pytest.raises(ReplicaMismatch, match="^step 2: the weights of rank 1 differ"):
        LocalGroup(2).run(run)


def test_a_rank_that_dies_mid_step_stops_the_others_with_one_line():
    batches = global_batches(steps=1)

    def run(comm):
        rank = ZeroNumpyRank(comm, TINY, init_params(TINY, seed=0), ADAMW, bucket_elems=40_000)
        if comm.rank == 1:
            raise MemoryError("out of memory")
        rank.train_step(*batches[0], 1e-2)

    group = LocalGroup(2, timeout=30.0)
    with pytest.raises(MemoryError):
        group.run(run)
    assert group._aborted == "rank 1 aborted (MemoryError: out of memory)"
    with pytest.raises(CommError, match="rank 0: barrier stopped: rank 1 aborted"):
        group.communicator(0).barrier()


def test_planted_a_loss_averaged_per_rank_is_caught_by_the_one_process_check(single, monkeypatch):
    """The classic data-parallel bug: each rank averages over its own targets and the ranks'
    means are averaged, which weighs a rank with fewer targets (row 0 has 5 ignored) too much.
    The weights then differ from one process's far beyond the tolerance."""
    from model.reference import ReferenceModel

    world, honest = 2, ReferenceModel.loss_and_grads

    def per_rank_mean(self, ids, targets, normalizer=None):
        return honest(self, ids, targets, normalizer=world * int((targets != IGNORE_INDEX).sum()))

    monkeypatch.setattr(ReferenceModel, "loss_and_grads", per_rank_mean)
    params = data_parallel(world, global_batches())[0][1]
    worst = max(float(np.max(np.abs(params[n] - v) / (ATOL + RTOL * np.abs(v)))) for n, v in single[1].params.items())
    assert worst > 10  # at least ten times outside the tolerance


def test_rank_0_alone_writes_the_checkpoint_one_process_would_write(tmp_path):
    """Same files (config, weights, both moments, trainer state) as one process's checkpoint after
    the same steps, written once (by rank 0) and loadable as any other."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.parallel.checkpoints import save_consolidated

    batches, trainer = global_batches(steps=2), {"step": 2, "data_position": 0}
    _, backend = one_process(batches)
    save_checkpoint(tmp_path / "one", 2, TINY, backend.params, backend.optimizer_state(), trainer)

    def run(comm):
        rank = ZeroNumpyRank(comm, TINY, init_params(TINY, seed=0), ADAMW, bucket_elems=40_000)
        for x, y in batches:
            rank.train_step(x, y, 1e-2)
        return save_consolidated(comm, rank, rank.params, tmp_path / "dp", 2, TINY, trainer)

    paths = LocalGroup(2).run(run)
    assert paths == [tmp_path / "dp" / "step-0000002", None]
    assert sorted(p.name for p in (tmp_path / "dp").iterdir()) == ["latest", "step-0000002"]  # one write, no temporaries
    one, dp = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "dp")
    assert dp.trainer == one.trainer and dp.config == one.config
    for ours, theirs in ((dp.params, one.params), (dp.optimizer, one.optimizer)):
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_allclose(ours[name], theirs[name], rtol=RTOL, atol=ATOL, err_msg=name)


def test_when_rank_0_cannot_write_the_checkpoint_every_rank_stops(tmp_path):
    from model.parallel.checkpoints import save_consolidated

    (tmp_path / "run").write_text("a file where the run directory should be")

    def run(comm):
        rank = ZeroNumpyRank(comm, TINY, init_params(TINY, seed=0), ADAMW, bucket_elems=40_000)
        return save_consolidated(comm, rank, rank.params, tmp_path / "run", 1, TINY, {"step": 1, "data_position": 0})

    group = LocalGroup(2, timeout=30.0)
    with pytest.raises(OSError):
        group.run(run)
    assert group._aborted.startswith("rank 0 aborted (writing the step 1 checkpoint failed: ")


def test_the_training_loop_on_two_ranks_writes_one_processs_run(tmp_path):
    """train() with a communicator: both ranks run the loop on the same global batches, rank 0 alone
    logs and writes (checkpoints gathered from the shards, metrics), rank 1 writes nothing; the
    final checkpoint is the one-process run's (weights and moments within the tolerance above)."""
    from model.checkpoint import load_checkpoint
    from model.data import ByteTokenizer, Corpus, stdlib_files
    from model.train import TrainSettings, train

    corpus = Corpus.from_files(stdlib_files()[:40], ByteTokenizer())
    settings = TrainSettings(steps=6, batch_size=4, seq_len=16, lr=1e-2, warmup=2, eval_every=3, eval_batches=2,
                             checkpoint_every=3)
    one = train(TINY, settings, ADAMW, corpus, NumpyBackend, tmp_path / "one", log=lambda m: None, progress=False)
    logs: list[list[str]] = [[], []]

    def rank(comm):
        out = tmp_path / ("dp" if comm.rank == 0 else "rank1")
        return train(TINY, settings, ADAMW, corpus,
                     lambda c, p, a: ZeroNumpyRank(comm, c, p, a, bucket_elems=40_000), out,
                     log=logs[comm.rank].append, progress=False, comm=comm)

    results = LocalGroup(2).run(rank)
    assert not (tmp_path / "rank1").exists() and logs[1] == [] and logs[0]
    assert results[0].val_losses == pytest.approx(one.val_losses, rel=RTOL)
    ours, theirs = load_checkpoint(tmp_path / "dp"), load_checkpoint(tmp_path / "one")
    assert ours.trainer["step"] == theirs.trainer["step"] == 6
    for name, w in theirs.params.items():
        np.testing.assert_allclose(ours.params[name], w, rtol=RTOL, atol=ATOL, err_msg=name)
    for name, m in theirs.optimizer.items():
        np.testing.assert_allclose(ours.optimizer[name], m, rtol=RTOL, atol=ATOL, err_msg=name)
    assert (tmp_path / "dp" / "metrics.jsonl").exists()
