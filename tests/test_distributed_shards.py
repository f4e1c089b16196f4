"""ZeRO-1's shard plan over the flat parameter layout: buckets that cover it, one equal aligned
piece per rank in each, shards that round-trip to the one-GPU layout, weight decay by segment;
and, on the CUDA model's launch plan built without a GPU, the step after which each bucket's
gradients are final (where its reduce-scatter may start)."""
import dataclasses

import numpy as np
import pytest

from dry_device import DryCache, dry_device
from model.config import preset
from model.cuda_buffers import ParamLayout
from model.optim import AdamWSettings
from model.params import param_shapes
from model.parallel.comm import LocalGroup
from model.parallel.shards import ALIGN, ShardPlan, bucket_ready_steps, send_order

TINY = preset("tiny")


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("bucket_elems", [100, 50_000, 10 ** 9])
def test_buckets_cover_the_padded_layout_and_split_into_equal_aligned_pieces(world, bucket_elems):
    layout = ParamLayout(TINY)
    plan = ShardPlan.of(layout, world, bucket_elems)
    assert plan.padded_total >= layout.total and plan.padded_total % (world * ALIGN) == 0
    assert plan.padded_total - layout.total < world * ALIGN  # padding: less than one piece row
    assert [b.start for b in plan.buckets] == [0] + [b.end for b in plan.buckets[:-1]]
    assert plan.buckets[-1].end == plan.padded_total
    assert all(b.size % (world * ALIGN) == 0 for b in plan.buckets)
    owner = np.full(plan.padded_total, -1)
    for rank in range(world):
        pieces = plan.pieces(rank)
        assert sum(p.size for p in pieces) == plan.shard_size  # balanced: every shard the same size
        assert [p.shard for p in pieces] == np.cumsum([0] + [p.size for p in pieces[:-1]]).tolist()
        for p in pieces:
            assert p.flat % ALIGN == 0 and p.shard % ALIGN == 0
            assert (owner[p.flat:p.flat + p.size] == -1).all()
            owner[p.flat:p.flat + p.size] = rank
    assert (owner >= 0).all()  # every element belongs to exactly one rank


def test_segments_split_pieces_where_the_decayed_tensors_end():
    layout = ParamLayout(TINY)
    plan = ShardPlan(layout.total, 3, layout.decay_end, bucket_elems=layout.decay_end // 2 + 5)
    assert any(p.flat < layout.decay_end < p.flat + p.size for r in range(3) for p in plan.pieces(r))  # a straddler
    for rank in range(3):
        covered = np.zeros(plan.shard_size, int)
        for s in plan.segments(rank):
            covered[s.shard:s.shard + s.size] += 1
            assert s.decays == (s.flat < layout.decay_end) and (s.flat + s.size <= layout.decay_end or not s.decays)
        assert (covered == 1).all()


def test_the_shards_consolidate_to_the_one_gpu_layout_and_back():
    layout = ParamLayout(TINY)
    plan = ShardPlan.of(layout, 4, 30_000)
    flat = np.random.default_rng(0).standard_normal(layout.total).astype(np.float32)
    shards = [plan.shard_of(plan.pad(flat), r) for r in range(4)]
    np.testing.assert_array_equal(plan.consolidate(shards), flat)
    with pytest.raises(ValueError, match="4 shards of"):
        plan.consolidate(shards[:3])


def test_bucketed_reduce_scatter_then_all_gather_is_an_all_reduce():
    plan = ShardPlan(1000, 4, 600, bucket_elems=96)

    def run(comm):
        grads = plan.pad(np.arange(1000, dtype=np.float64) * (comm.rank + 1))
        shard = np.zeros(plan.shard_size)
        plan.reduce_scatter(comm, grads, shard, order=list(reversed(range(len(plan.buckets)))))
        out = np.zeros(plan.padded_total)
        plan.all_gather(comm, shard, out)
        return shard, out

    results = LocalGroup(4).run(run)
    total = plan.pad(np.arange(1000, dtype=np.float64) * 10)
    for rank, (shard, out) in enumerate(results):
        np.testing.assert_array_equal(shard, plan.shard_of(total, rank))
        np.testing.assert_array_equal(out, total)


@pytest.mark.parametrize("tied", [False, True])
def test_each_bucket_is_ready_after_the_last_backward_step_writing_any_of_its_gradients(monkeypatch, tied):
    """On the tiny model's plan (built without a GPU): a bucket's step is the latest of its
    tensors' last writers; buckets of the last layer are ready before the first layer's, the
    embedding's (its backward is the plan's last step) last of all."""
    from model.cuda_model import CudaBackend

    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    with dry_device(monkeypatch):
        params = {n: np.zeros(s, np.float32) for n, s in param_shapes(config).items()}
        model = CudaBackend(config, params, AdamWSettings(), cache=DryCache())
        plan = model.plan(2, 16)
        shards = ShardPlan.of(model.layout, 2, 40_000)
        ready = bucket_ready_steps(plan, model.grads.ptr, shards)

        def last(name: str) -> int:
            g = model.params_view[name].grad
            return plan.last_writer(g.ptr, g.nbytes, "backward")

        lay = model.layout
        for b, step in zip(shards.buckets, ready):
            inside = [n for n, at in lay.offsets.items()
                      if at < b.end and b.start < at + int(np.prod(lay.shapes[n]))]
            assert step == max(last(n) for n in inside)
        order = send_order(ready)
        layer_of = {b.index: {n.split(".")[2] for n in lay.offsets
                              if n.startswith("model.layers.") and lay.offsets[n] < b.end
                              and b.start < lay.offsets[n] + int(np.prod(lay.shapes[n]))} for b in shards.buckets}
        only = {layer: [i for i, ls in layer_of.items() if ls == {layer}] for layer in ("0", "1")}
        assert only["0"] and only["1"]
        assert max(ready[i] for i in only["1"]) < min(ready[i] for i in only["0"])  # the backward runs the last layer first
        embed = next(b for b in shards.buckets if b.start <= lay.offsets["model.embed_tokens.weight"] < b.end)
        assert ready[embed.index] == len(plan.of("backward")) - 1 == max(ready)
        assert order == sorted(range(len(ready)), key=lambda i: (ready[i], i))
        model.close()


def test_planted_a_bucket_sent_after_its_first_writer_is_caught_by_the_readiness_check(monkeypatch):
    """Sending a bucket once any step has written into it (the first writer, not the last) would
    send gradients still being summed; the check's expected steps tell the two apart."""
    from model.cuda_model import CudaBackend

    with dry_device(monkeypatch):
        params = {n: np.zeros(s, np.float32) for n, s in param_shapes(TINY).items()}
        model = CudaBackend(TINY, params, AdamWSettings(), cache=DryCache())
        plan = model.plan(2, 16)
        shards = ShardPlan.of(model.layout, 2, 40_000)
        backward = plan.of("backward")

        def first_writer(start: int, size: int) -> int:
            return next(i for i, s in enumerate(backward)
                        if any(at < start + size and start < at + n for at, n in s.extents(plan._values)))

        early = [first_writer(model.grads.ptr + 4 * b.start, 4 * b.size) for b in shards.buckets]
        assert early != bucket_ready_steps(plan, model.grads.ptr, shards)
        model.close()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_ranks_plan_sends_each_bucket_inside_the_backward_right_after_its_last_writer(monkeypatch, tied):
    """ZeroCudaRank's plan (tiny model, built without a GPU): every bucket's reduce-scatter is a host
    step in the backward, after the last step that writes into the bucket and before any step that
    comes later; with a communicator that overlaps them (a side stream), the optimizer waits for
    them first, before anything reads the gradient shard. The embedding table is one bucket of row
    slabs: tied, sent right after the LM head's weight gradient (nothing else writes it); untied,
    not sent at all. Its lookup's gradient is the backward's end: every rank's rows all-gathered,
    then the lookup backward into this rank's slab of the gradient shard."""
    from model.parallel.comm import LocalGroup
    from model.parallel.zero_cuda import ZeroCudaRank
    from runtime.plan import Host

    class Overlapping:  # the NCCL communicator's shape, as far as the plan sees it
        rank, world = 0, 2

        def reduce_scatter_overlapped(self, send, recv): ...

        def join_overlapped(self, at=None, joined=None): ...

        def all_gather_overlapped(self, send, recv, done): ...

        def wait_for(self, done, at=None): ...

    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    for comm in (LocalGroup(2).communicator(0), Overlapping()):
        with dry_device(monkeypatch):
            params = {n: np.zeros(s, np.float32) for n, s in param_shapes(config).items()}
            rank = ZeroCudaRank(comm, config, params, AdamWSettings(), bucket_elems=40_000, cache=DryCache())
            plan = rank.plan(2, 16)
            backward = plan.of("backward")
            sends = [i for i, s in enumerate(backward) if s.label.startswith("reduce-scatter")]
            table = next(b for b in rank.shards.buckets if b.start == rank.layout.offsets["model.embed_tokens.weight"])
            assert table.size == config.vocab_size * config.hidden_size and rank.slab_rows == config.vocab_size // 2
            sent = [int(backward[i].label.rsplit(" ", 1)[1]) for i in sends]
            assert sorted(sent) == [b.index for b in rank.shards.buckets if tied or b is not table]
            if tied:  # right after the LM head's weight gradient, the backward's first GEMM
                assert backward[sends[0] - 1].label.startswith("gemm") and sent[0] == table.index
            labels = [s.label for s in backward]
            at = labels.index("all-gather the lookup-gradient rows")
            assert all(s.kind in ("host", "fill") for s in backward[at:-1]) and backward[-1].kind == "embedding_bwd"
            if isinstance(comm, Overlapping):  # the rows arrive on the side stream: waited for before the kernel
                assert at < labels.index("wait for them") < len(backward) - 1
            slab = rank.shards.pieces(0)[table.index]
            assert backward[-1].args["dtable"].ptr == rank.grad_shard.ptr + 4 * slab.shard
            for i in sends:
                bucket = int(backward[i].label.rsplit(" ", 1)[1])
                b = rank.shards.buckets[bucket]
                start, size = rank.grads.ptr + 4 * b.start, 4 * b.size
                writers = [j for j, s in enumerate(backward) if not isinstance(s, Host)
                           and any(at < start + size and start < at + n for at, n in s.extents(plan._values))]
                assert max(writers) < i and all(isinstance(s, Host) for s in backward[max(writers) + 1:i + 1])
            optimizer = plan.of("optimizer")
            gathers = [i for i, s in enumerate(optimizer) if s.label.startswith("all-gather weights bucket")]
            assert len(gathers) == len(rank.shards.buckets)
            for i in gathers:  # each bucket sent right after the AdamW of this rank's piece of it
                b = rank.shards.buckets[int(optimizer[i].label.rsplit(" ", 1)[1])]
                at = optimizer[i - 1].args["param"].ptr - rank.weights.ptr
                assert optimizer[i - 1].kind == "adamw" and 4 * b.start <= at < 4 * b.end
            if isinstance(comm, Overlapping):
                assert optimizer[0].label == "wait for the gradients' reduce-scatters"
                assert optimizer[-1].label == "wait for the weights' all-gathers"
            else:
                assert not any(s.label.startswith("wait") for s in optimizer if isinstance(s, Host))
            rank.close()


class Overlapping:
    """The NCCL communicator's shape, as far as a plan sees it: rank 1 of 3."""
    rank, world = 1, 3

    def reduce_scatter_overlapped(self, send, recv): ...

    def join_overlapped(self, at=None, joined=None): ...

    def all_gather_overlapped(self, send, recv, done): ...

    def wait_for(self, done, at=None): ...


def bf16_rank(monkeypatch):
    from model.parallel.zero_cuda import ZeroCudaRank
    from model.precision import Precision
    params = {n: np.zeros(s, np.float32) for n, s in param_shapes(TINY).items()}
    return ZeroCudaRank(Overlapping(), TINY, params, AdamWSettings(), precision=Precision.BF16,
                        bucket_elems=40_000, cache=DryCache())


def test_a_bf16_rank_gathers_the_matrices_read_only_as_bf16_copies_in_bf16(monkeypatch):
    """bf16: a bucket of matrices that the GEMMs alone read (as bf16 copies) travels as those
    copies, half the bytes; the embedding table (the lookup reads it in f32) and the norms and
    biases travel in f32, their buckets cut where they begin and end."""
    from model.parallel.zero_cuda import f32_read

    with dry_device(monkeypatch):
        rank = bf16_rank(monkeypatch)
        f32 = f32_read(rank.layout)
        table = rank.layout.offsets["model.embed_tokens.weight"]
        assert f32 == [(table, table + TINY.vocab_size * TINY.hidden_size), (rank.layout.decay_end, rank.layout.total)]
        optimizer = rank.plan(2, 16).of("optimizer")
        for b, bf16 in zip(rank.shards.buckets, rank.gathered_bf16):
            in_f32 = any(b.start < hi and lo < b.end for lo, hi in f32)
            assert bf16 is not in_f32
            gather = next(s for s in optimizer if s.label.endswith(f"bucket {b.index}") and "all-gather" in s.label)
            assert gather.reads()["in0"].startswith("bf16 weights" if bf16 else "weights"), gather.label
        assert sum(rank.gathered_bf16) >= 2
        # the buckets crossing a cut are one unit long: nothing else is sent in both types
        unit = rank.shards.world * 8
        for lo, hi in f32:
            for edge in (lo, hi):
                across = [b for b in rank.shards.buckets if b.start < edge < b.end]
                assert all(b.size == unit for b in across)
        rank.close()


def test_planted_a_forward_that_reads_f32_weights_gathered_as_bf16_is_refused(monkeypatch):
    """Were the embedding table left out of f32_read, its buckets would travel as bf16 copies and
    the other ranks' pieces of its f32 rows, which the lookup reads, would be stale: the plan is
    refused when built, naming the step."""
    import model.parallel.zero_cuda as zero_cuda

    monkeypatch.setattr(zero_cuda, "f32_read", lambda layout: [(layout.decay_end, layout.total)])
    with dry_device(monkeypatch):
        rank = bf16_rank(monkeypatch)
        with pytest.raises(AssertionError, match="embed.*reads the f32 weights"):
            rank.plan(2, 16)
        rank.close()


def test_a_bf16_ranks_casts_of_the_others_pieces_each_wait_for_their_bucket(monkeypatch):
    """ZeroCudaRank's bf16 optimizer with a communicator that overlaps the all-gathers: the other
    ranks' pieces of the f32-gathered matrices are cast once each, right after the wait for their
    bucket (a cast before its wait would read weights still arriving), and the casts cover exactly
    those pieces below the matrices' end."""
    with dry_device(monkeypatch):
        rank = bf16_rank(monkeypatch)
        optimizer = rank.plan(2, 16).of("optimizer")
        casts = [i for i, s in enumerate(optimizer) if s.kind == "cast"]
        covered = []
        for i in casts:
            start = (optimizer[i].args["src"].ptr - rank.weights.ptr) // 4
            size = optimizer[i].args["n"]
            bucket = next(b for b in rank.shards.buckets if b.start <= start < b.end)
            assert start + size <= bucket.end and not rank.gathered_bf16[bucket.index]
            assert optimizer[i - 1].label == f"wait for weight bucket {bucket.index}"
            covered.extend(range(start, start + size))
        theirs = np.zeros(rank.shards.padded_total, bool)  # f32-gathered, not rank 1's, below the matrices' end
        for b in rank.shards.buckets:
            theirs[b.start:b.end] = not rank.gathered_bf16[b.index]
        for p in rank.shards.pieces(1):
            theirs[p.flat:p.flat + p.size] = False
        theirs[rank.layout.decay_end:] = False
        assert covered == np.flatnonzero(theirs).tolist() and len(casts) > 1
        rank.close()


def test_a_whole_range_is_one_bucket_and_every_other_cut_ends_one():
    """Cuts end buckets (a cut off the unit leaves one unit across it); a whole range from one cut
    to the next is one bucket however large; any other whole range is refused."""
    plan = ShardPlan(10_000, 2, 9_000, bucket_elems=1_000, cuts=[0, 4_000, 9_003], whole=(0, 4_000))
    assert plan.buckets[0].start == 0 and plan.buckets[0].size == 4_000
    assert all(b.size <= 1_008 for b in plan.buckets[1:])  # bucket_elems rounded up to the unit
    starts = [b.start for b in plan.buckets]
    assert 4_000 in starts and 8_992 in starts and 9_008 in starts  # 9_003 off the unit of 16: 8_992..9_008
    assert sum(b.size for b in plan.buckets) == plan.padded_total
    with pytest.raises(ValueError, match="whole bucket"):
        ShardPlan(10_000, 2, 9_000, bucket_elems=1_000, cuts=[0, 2_000, 4_000], whole=(0, 4_000))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("world, tied", [(2, True), (3, True), (8, False)])
def test_the_memory_estimate_counts_what_a_zero_rank_allocates(monkeypatch, world, tied, bf16):
    """footprint.train_bytes of a run on ``world`` GPUs, asked before any allocation, counts one
    rank: its shard of the moments and reduced gradients (not the whole optimizer state) and, where
    the table's gradient is in row slabs (vocab 256 splits 2 and 8 ways, not 3), every rank's
    lookup-gradient rows; the rank's backend, steps and checkpoints allocate within it (its two
    shapes: a training batch and a partial validation batch)."""
    from model.footprint import train_bytes
    from model.parallel.zero_cuda import ZeroCudaRank
    from model.precision import Precision
    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    shapes = [(2, 64), (1, 64)]
    precision = Precision.BF16 if bf16 else Precision.FP32
    with dry_device(monkeypatch) as allocations:
        params = {n: np.zeros(s, np.float32) for n, s in param_shapes(config).items()}
        rank = ZeroCudaRank(LocalGroup(world).communicator(0), config, params, AdamWSettings(), precision=precision,
                            cache=DryCache())
        for batch, seq in shapes:
            rank.plan(batch, seq)
        # and at a checkpoint, a moment gathered whole (optimizer_state: a collective, not run here)
        used = sum(n for _, n in allocations) + 4 * rank.shards.padded_total
        assert (rank.slab_rows is not None) == (world != 3)
        rank.close()
    estimate = train_bytes(config, shapes, on_gpu=True, bf16=bf16, world=world)
    assert used <= estimate <= 1.35 * used


def test_a_rank_of_a_large_model_is_estimated_below_one_gpu_holding_everything():
    """qwen2-0.5b's moments are 4 GB: a rank of 8 holds an eighth of them (and the lookup rows and a
    checkpoint's gathered moment besides), so the check no longer refuses what fits on 8 GPUs."""
    from model.footprint import train_bytes
    qwen = preset("qwen2-0.5b")
    one, rank = (train_bytes(qwen, [(1, 1024)], on_gpu=True, bf16=True, world=n) for n in (1, 8))
    assert rank < one - (1 << 30)
