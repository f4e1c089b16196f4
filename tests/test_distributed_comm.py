"""The CPU communicator (``LocalGroup``): each collective's result, the same bits on every rank
and on every run (sums in rank order 0..N-1), and a dead, hung or failing rank turned into one
line on the others within a bounded time."""
import time

import numpy as np
import pytest

from model.parallel.comm import CommError, LocalGroup


def contributions(rank: int, n: int = 12) -> np.ndarray:
    """Values whose float32 sum depends on the order it is taken in."""
    return (np.random.default_rng(rank).standard_normal(n) * 10.0 ** np.arange(-6, 6)).astype(np.float32)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits(world):
    def run(comm):
        buf = contributions(comm.rank)
        comm.all_reduce(buf)
        return buf

    results = LocalGroup(world).run(run)
    expected = contributions(0)
    for r in range(1, world):
        expected = expected + contributions(r)
    for got in results:
        assert got.tobytes() == expected.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(results, LocalGroup(world).run(run)))


def test_reduce_scatter_gives_rank_r_the_sum_of_the_r_th_slices():
    world, n = 3, 4

    def run(comm):
        send = np.arange(world * n, dtype=np.float64) * (comm.rank + 1)
        recv = np.zeros(n)
        comm.reduce_scatter(send, recv)
        return recv

    total = np.arange(world * n, dtype=np.float64) * (1 + 2 + 3)
    for rank, got in enumerate(LocalGroup(world).run(run)):
        np.testing.assert_array_equal(got, total[rank * n:(rank + 1) * n])


def test_all_gather_lays_the_ranks_end_to_end_and_broadcast_copies_the_root():
    def run(comm):
        recv = np.zeros(2 * comm.world, np.int32)
        comm.all_gather(np.array([comm.rank, 10 * comm.rank], np.int32), recv)
        buf = np.full(3, comm.rank, np.float32)
        comm.broadcast(buf, root=2)
        comm.barrier()
        return recv, buf

    for recv, buf in LocalGroup(4).run(run):
        assert recv.tolist() == [0, 0, 1, 10, 2, 20, 3, 30]
        assert buf.tolist() == [2, 2, 2]


def test_sizes_that_do_not_split_among_the_ranks_are_refused():
    def run(comm):
        comm.reduce_scatter(np.zeros(5), np.zeros(2))

    with pytest.raises(ValueError, match="send has 5 elements, 2 x 2 expected"):
        LocalGroup(2).run(run)


def test_a_hung_rank_makes_the_others_fail_with_one_line_within_the_timeout():
    timeout = 0.3

    def run(comm):
        if comm.rank == 1:
            time.sleep(3 * timeout)  # never joins the collective in time
            return None
        comm.all_reduce(np.zeros(1))

    started = time.monotonic()
    with pytest.raises(CommError) as e:
        LocalGroup(3, timeout=timeout).run(run)
    assert time.monotonic() - started < 3 * timeout + 1.0
    message = str(e.value)
    assert "\n" not in message and "within 0.3 s (a rank died or hung)" in message


def test_a_rank_that_fails_aborts_the_others_at_once_naming_it():
    def run(comm):
        if comm.rank == 2:
            raise FloatingPointError("the loss is nan at step 3")
        comm.barrier()

    group = LocalGroup(3, timeout=30.0)
    started = time.monotonic()
    with pytest.raises(FloatingPointError, match="nan"):  # the cause, not the others' consequences
        group.run(run)
    assert time.monotonic() - started < 5.0  # not the 30 s timeout
    assert group._aborted == "rank 2 aborted (FloatingPointError: the loss is nan at step 3)"


def test_ranks_calling_different_collectives_are_told_so():
    def run(comm):
        if comm.rank == 0:
            comm.all_reduce(np.zeros(1))
        else:
            comm.barrier()

    with pytest.raises(CommError, match="rank 0 all_reduce, rank 1 barrier"):
        LocalGroup(2).run(run)


def test_planted_without_a_timeout_a_hung_rank_holds_the_others_past_the_bound():
    """The bound the hung-rank check asserts is what a timeout buys: with one that is in effect
    absent, the other ranks are still waiting well after it."""
    import threading

    group = LocalGroup(2, timeout=3600.0)
    waiting = threading.Thread(target=lambda: pytest.raises(CommError, group.communicator(0).barrier))
    waiting.start()
    waiting.join(1.0)
    still_waiting = waiting.is_alive()
    group.communicator(1).abort("test over")  # release it
    waiting.join(5.0)
    assert still_waiting
