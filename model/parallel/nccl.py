"""The ``Communicator`` interface over NCCL, through nccl4py (the optional extra ``distributed``).

The ranks meet through nccl4py 0.6's ``nccl.core`` (``get_unique_id``, ``UniqueId.from_bytes``,
``Communicator.init``, ``abort``, ``destroy``); the collectives go through its bindings
(``nccl.bindings.nccl``: ``all_reduce``, ``reduce_scatter``, ``all_gather``, ``broadcast``) on the runtime's device views (``View`` / ``DeviceArray``) as
pointer, count and NCCL type, on the caller's stream as an integer handle. Run on an H200 as one
rank (tests/test_distributed_nccl.py: the collectives, and a training run through them); two ranks
need two GPUs (tests/test_distributed_multi_gpu.py). Nothing here is imported until a multi-GPU
run asks for it.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

from runtime.driver import call
from runtime.memory import DeviceArray, Event, Stream, View

from .comm import CommError
from .launch import LaunchEnv
from .rendezvous import share_id
from .watchdog import DEFAULT_TIMEOUT_S, Watchdog

INSTALL = "pip install -e '.[distributed]'"  # nccl4py and the NCCL runtime wheel (pyproject.toml)
_DTYPES = ("f32", "f16", "bf16", "i32", "i64", "u8")  # the runtime's names; NCCL's by the same names below


def nccl_missing() -> str | None:
    """Why NCCL cannot be used here (one line naming what to install), or None when it can."""
    try:
        importlib.import_module("nccl.core")
    except Exception as e:  # ImportError, or the library's own failure to load libnccl
        why = (str(e).splitlines() or [""])[0]
        return f"multi-GPU training needs NCCL ({type(e).__name__}: {why}); install it with {INSTALL}"
    return None


class NcclCommunicator:
    """One rank's NCCL communicator, on the runtime's device 0: ``LaunchEnv.pin_gpu`` made that the
    rank's own GPU before CUDA started."""

    def __init__(self, env: LaunchEnv, stream: Stream | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 inputs: Mapping[str, str] | None = None):
        """``stream``: where the collectives are enqueued; by default the legacy default stream,
        where a training plan's launches and graphs run (so a collective follows the kernels
        before it and precedes those after: ZeroCudaRank's host steps rely on that).
        ``timeout``: seconds to wait for the other ranks, at the rendezvous and then between
        collectives (``watchdog``). ``inputs``: what this rank was given to run, by digest, which
        the rendezvous holds against rank 0's."""
        stream = stream if stream is not None else Stream.null()
        nccl = importlib.import_module("nccl.core")
        # NVLink SHARP (NVLS) reduces in switch hardware in an order that is not fixed, and is
        # unsafe on shared hosts (DESIGN, several GPUs): off unless the user set it explicitly.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        self._nccl, self.rank, self.world = nccl, env.rank, env.world
        self._stream_obj, self._stream = stream, int(stream.handle)
        uid = share_id(env, lambda: bytes(nccl.get_unique_id()), timeout, inputs)
        self._comm = nccl.Communicator.init(nranks=env.world, rank=env.rank,
                                            unique_id=nccl.UniqueId.from_bytes(uid))
        # the collectives go through nccl4py's bindings on raw device pointers: its Communicator
        # methods resolve each buffer anew (about 20 us a call on the H200's host, measured), and a
        # step makes over a hundred of them
        self._b = importlib.import_module("nccl.bindings.nccl")
        self._raw = self._b.Comm(self._comm.ptr)
        self._types = {name: int(getattr(nccl.NcclDataType, t)) for name, t in zip(
            _DTYPES, ("FLOAT32", "FLOAT16", "BFLOAT16", "INT32", "INT64", "UINT8"))}
        self._sum = int(nccl.SUM)
        self._watchdog = Watchdog(timeout, f"rank {env.rank}") if env.world > 1 else None
        self._aborted = False
        self.closed = False  # after close(): no collective may be issued
        # the side stream: reduce-scatters that overlap the backward (non-blocking: the legacy
        # stream does not wait for it implicitly, only at join_overlapped). Urgent: a collective's
        # blocks start as soon as an SM frees up rather than behind every queued block of the
        # backward's kernels (which would hold a bucket back, and the peer waiting on it)
        self._side = Stream(urgent=True)
        self._forked, self._joined = Event(), Event()

    def _call(self, what: str, fn: Any, *args: Any) -> None:
        if self._watchdog is not None:
            self._watchdog.beat()
        try:
            fn(*args)
        except Exception as e:  # nccl4py's NCCLError: one line naming the collective
            raise CommError(f"rank {self.rank}: NCCL {what} failed: {(str(e).splitlines() or [''])[0]}") from None

    def _type(self, *bufs: View | DeviceArray) -> int:
        if len({b.dtype for b in bufs}) != 1 or bufs[0].dtype not in self._types:
            raise TypeError(f"NCCL collectives here take one of {', '.join(_DTYPES)} on both sides, got "
                            f"{', '.join(b.dtype for b in bufs)}")
        return self._types[bufs[0].dtype]

    def _sizes(self, what: str, small: View | DeviceArray, large: View | DeviceArray) -> None:
        if large.size != small.size * self.world:
            raise ValueError(f"{what}: {large.size} elements against {self.world} x {small.size}")

    def all_reduce(self, buf: View | DeviceArray) -> None:
        self._call("all_reduce", self._b.all_reduce, buf.ptr, buf.ptr, buf.size, self._type(buf), self._sum,
                   self._raw, self._stream)

    def reduce_scatter(self, send: View | DeviceArray, recv: View | DeviceArray, stream: int | None = None) -> None:
        self._sizes("reduce_scatter", recv, send)
        self._call("reduce_scatter", self._b.reduce_scatter, send.ptr, recv.ptr, recv.size, self._type(send, recv),
                   self._sum, self._raw, self._stream if stream is None else stream)

    def _fork(self) -> int:
        """The side stream, made to wait for everything enqueued so far on the main one (its handle)."""
        self._forked.record(self._stream_obj)
        call("cuStreamWaitEvent", self._side.handle, self._forked.handle, 0)
        return int(self._side.handle)

    def reduce_scatter_overlapped(self, send: View | DeviceArray, recv: View | DeviceArray) -> None:
        """``reduce_scatter`` on the side stream, after everything enqueued so far on the main one,
        which goes on meanwhile (the rest of the backward) until ``join_overlapped``."""
        self.reduce_scatter(send, recv, self._fork())

    def all_gather_overlapped(self, send: View | DeviceArray, recv: View | DeviceArray, done: Event) -> None:
        """``all_gather`` on the side stream, after everything enqueued so far on the main one;
        ``done`` is recorded after it there (``wait_for`` makes the main stream wait for it)."""
        self.all_gather(send, recv, self._fork())
        done.record(self._side)

    def wait_for(self, done: Event, at: Event | None = None) -> None:
        """The main stream waits here for the side stream's work up to ``done``. ``at``: recorded on
        the main stream first (``at.elapsed_ms(done)``: how long it waited, when positive)."""
        if at is not None:
            at.record(self._stream_obj)
        call("cuStreamWaitEvent", self._stream_obj.handle, done.handle, 0)

    def join_overlapped(self, at: Event | None = None, joined: Event | None = None) -> None:
        """The main stream waits here for the side stream's collectives so far (``joined``, when
        given, recorded there; ``at`` as in ``wait_for``)."""
        self.wait_for((joined or self._joined).record(self._side), at)

    def all_gather(self, send: View | DeviceArray, recv: View | DeviceArray, stream: int | None = None) -> None:
        self._sizes("all_gather", send, recv)
        self._call("all_gather", self._b.all_gather, send.ptr, recv.ptr, send.size, self._type(send, recv),
                   self._raw, self._stream if stream is None else stream)

    def broadcast(self, buf: View | DeviceArray, root: int = 0) -> None:
        self._call("broadcast", self._b.broadcast, buf.ptr, buf.ptr, buf.size, self._type(buf), root, self._raw,
                   self._stream)

    def barrier(self) -> None:
        """An all-reduce of one word, then the stream drained: every rank has reached this point."""
        word = DeviceArray(1, "i32")
        try:
            word.fill_u32(0)
            self.all_reduce(word)
            self._stream_obj.synchronize()
        finally:
            word.free()

    def abort(self, reason: str) -> None:
        """Tear the communicator down without waiting for the others (ncclCommAbort): this rank's
        way out when it fails on its own. The others' next collectives never complete: the
        parent of ``--gpus N`` (or torchrun) stops them when this rank exits, else their watchdogs."""
        if not self._aborted:
            self._aborted = True
            self._comm.abort()

    def __enter__(self) -> "NcclCommunicator":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: Any) -> None:
        """A rank that fails aborts (destroying would wait for the others); one that ends, closes."""
        if error is not None:
            self.abort(f"{kind.__name__}: {error}")
        self.close()

    def close(self) -> None:
        """Destroy the communicator (a collective over this node's ranks), then the side stream
        (which waits for it) and events, the watchdog armed throughout. An aborted rank is on its
        way out: it waits for nothing more."""
        self.closed = True
        if not self._aborted:
            if self._watchdog is not None:
                self._watchdog.beat()
            self._comm.destroy()
            self._side.destroy()
            for event in (self._forked, self._joined):
                event.destroy()
        if self._watchdog is not None:
            self._watchdog.stop()
