"""The collective operations data parallelism needs, and an in-process implementation of them.

``Communicator`` is the interface: this rank, the world, and sum-reductions and copies over
buffers of the same shape on every rank. ``StagedCommunicator`` runs it over device buffers through
the host (several ranks on one GPU, or the CPU tests' made-up device memory). ``LocalGroup`` runs ``world`` ranks as threads of one
process over numpy arrays: every rank deposits its contribution, waits for the others, and
computes the result itself from the contributions in rank order 0..N-1, so every rank gets the
same bits and a rerun gets them again. A rank that stops calling (dead or hung) makes the others
fail with one line after ``timeout`` seconds; a rank that fails calls ``abort``, and the others
fail at once, naming it.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Sequence, TypeVar

import numpy as np

R = TypeVar("R")


class CommError(RuntimeError):
    """A collective that cannot complete (a rank died, hung, aborted or called another one); one line."""


class Communicator(Protocol):
    """Collectives over buffers of the same shape on every rank (numpy arrays in ``LocalGroup``,
    device buffers in ``nccl``). Every reduction is a sum: the loss is scaled by the global count
    of targets before the backward, so summed gradients are the global batch's mean."""

    rank: int
    world: int

    def all_reduce(self, buf: Any) -> None:
        """``buf`` <- the sum of every rank's ``buf``."""

    def reduce_scatter(self, send: Any, recv: Any) -> None:
        """``recv`` (n elements) <- the sum over ranks of their ``send[rank * n:(rank + 1) * n]``."""

    def all_gather(self, send: Any, recv: Any) -> None:
        """``recv[r * n:(r + 1) * n]`` <- rank r's ``send`` (n elements), for every r."""

    def broadcast(self, buf: Any, root: int = 0) -> None:
        """``buf`` <- ``root``'s ``buf``."""

    def barrier(self) -> None: ...

    def abort(self, reason: str) -> None:
        """Make every rank's pending and later collectives fail, naming this rank and ``reason``."""


class LocalGroup:
    """``world`` ranks in this process (one thread each), for tests and the numpy backend."""

    def __init__(self, world: int, timeout: float = 30.0):
        if world < 1:
            raise ValueError(f"a group needs at least one rank, got {world}")
        self.world, self.timeout = world, timeout
        self._slots: list[Any] = [None] * world
        self._barrier = threading.Barrier(world)
        self._aborted: str | None = None

    def communicator(self, rank: int) -> "LocalCommunicator":
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside 0..{self.world - 1}")
        return LocalCommunicator(self, rank)

    def run(self, fn: Callable[["LocalCommunicator"], R]) -> list[R]:
        """``fn(communicator)`` on every rank at once; the results in rank order. A rank that
        raises aborts the group, and its error is raised here (else the first CommError)."""
        results: list[Any] = [None] * self.world
        errors: list[BaseException | None] = [None] * self.world

        def work(rank: int) -> None:
            comm = self.communicator(rank)
            try:
                results[rank] = fn(comm)
            except BaseException as e:  # noqa: BLE001 (raised below, once every rank has stopped)
                errors[rank] = e
                if not isinstance(e, CommError):
                    comm.abort(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=work, args=(r,), name=f"rank {r}") for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cause = next((e for e in errors if e is not None and not isinstance(e, CommError)), None)
        first = cause or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results


class LocalCommunicator:
    """One rank of a ``LocalGroup``: the ``Communicator`` interface over numpy arrays."""

    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.world

    def _exchange(self, what: str, value: Any) -> list[Any]:
        """Every rank's ``value`` for the collective ``what``, in rank order (the same list on every rank)."""
        g = self.group
        g._slots[self.rank] = (what, value)
        self._wait(what)
        contributions = list(g._slots)
        self._wait(what)  # nobody deposits the next collective's value before everyone has read this one's
        if len({name for name, _ in contributions}) > 1:
            raise CommError(f"rank {self.rank}: the ranks called different collectives at once: "
                            + ", ".join(f"rank {r} {name}" for r, (name, _) in enumerate(contributions)))
        return [v for _, v in contributions]

    def _wait(self, what: str) -> None:
        g = self.group
        try:
            g._barrier.wait(g.timeout)
        except threading.BrokenBarrierError:
            if g._aborted is None:
                g._aborted = f"no answer from every rank within {g.timeout:g} s (a rank died or hung)"
            raise CommError(f"rank {self.rank}: {what} stopped: {g._aborted}") from None

    def all_reduce(self, buf: np.ndarray) -> None:
        buf[...] = _sum_in_rank_order(self._exchange("all_reduce", buf.copy()))

    def reduce_scatter(self, send: np.ndarray, recv: np.ndarray) -> None:
        n = recv.size
        if send.size != n * self.world:
            raise ValueError(f"reduce_scatter: send has {send.size} elements, {self.world} x {n} expected")
        parts = self._exchange("reduce_scatter", send.reshape(-1).copy())
        recv.reshape(-1)[...] = _sum_in_rank_order([p[self.rank * n:(self.rank + 1) * n] for p in parts])

    def all_gather(self, send: np.ndarray, recv: np.ndarray) -> None:
        n = send.size
        if recv.size != n * self.world:
            raise ValueError(f"all_gather: recv has {recv.size} elements, {self.world} x {n} expected")
        recv.reshape(-1)[...] = np.concatenate(self._exchange("all_gather", send.reshape(-1).copy()))

    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        buf[...] = self._exchange("broadcast", buf.copy() if self.rank == root else None)[root]

    def barrier(self) -> None:
        self._exchange("barrier", None)

    def abort(self, reason: str) -> None:
        g = self.group
        if g._aborted is None:
            g._aborted = f"rank {self.rank} aborted ({reason})"
        g._barrier.abort()


def _sum_in_rank_order(parts: Sequence[np.ndarray]) -> np.ndarray:
    """parts[0] + parts[1] + ... left to right: one order on every rank, so the same bits."""
    total = np.array(parts[0], copy=True)
    for p in parts[1:]:
        total += p
    return total


class StagedCommunicator:
    """The ``Communicator`` interface over device buffers, staged through the host: each buffer
    copied out (``get``), a ``LocalGroup`` rank's collective on the copies, the result copied back
    (``put``). Several ranks on one GPU (tests of the GPU step without NCCL), or a made-up device
    memory (the CPU tests run the step's kernels in the PTX interpreter)."""

    def __init__(self, local: LocalCommunicator, get: Callable[[Any], np.ndarray] | None = None,
                 put: Callable[[Any, np.ndarray], None] | None = None):
        self.local, self.rank, self.world = local, local.rank, local.world
        self._get = get or (lambda buf: buf.to_numpy())
        self._put = put or (lambda buf, host: buf.upload(host))

    def all_reduce(self, buf: Any) -> None:
        host = self._get(buf)
        self.local.all_reduce(host)
        self._put(buf, host)

    def reduce_scatter(self, send: Any, recv: Any) -> None:
        host = self._get(recv)
        self.local.reduce_scatter(self._get(send), host)
        self._put(recv, host)

    def all_gather(self, send: Any, recv: Any) -> None:
        sent, host = self._get(send), self._get(recv)
        self.local.all_gather(sent, host)
        self._put(recv, host)

    def broadcast(self, buf: Any, root: int = 0) -> None:
        host = self._get(buf)
        self.local.broadcast(host, root)
        self._put(buf, host)

    def barrier(self) -> None:
        self.local.barrier()

    def abort(self, reason: str) -> None:
        self.local.abort(reason)
