"""The ``Communicator`` interface over NCCL, through nccl4py (the optional extra ``distributed``).

nccl4py 0.6's ``nccl.core`` API (``get_unique_id``, ``UniqueId.from_bytes``, ``Communicator.init``,
``allreduce`` / ``reduce_scatter`` / ``allgather`` / ``broadcast`` with ``stream=``, ``abort``,
``destroy``). Run on an H200 as one rank (tests/test_distributed_nccl.py: the collectives, and a
training run through it); two ranks need two GPUs and have not run yet. The buffers are the runtime's device views (``View`` / ``DeviceArray``), handed
to nccl4py through the CUDA array interface (pointer, shape, dtype: no copy); the stream is the
caller's, as an integer handle. Nothing here is imported until a multi-GPU run asks for it.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from runtime.driver import call
from runtime.memory import DeviceArray, Event, Stream, View

from .comm import CommError
from .launch import LaunchEnv
from .rendezvous import share_id

INSTALL = "pip install -e '.[distributed]'"  # nccl4py and the NCCL runtime wheel (pyproject.toml)
_TYPESTR = {"f32": "<f4", "f16": "<f2", "i32": "<i4", "i64": "<i8", "u8": "|u1"}  # bf16 has no CAI type string


def nccl_missing() -> str | None:
    """Why NCCL cannot be used here (one line naming what to install), or None when it can."""
    try:
        importlib.import_module("nccl.core")
    except Exception as e:  # ImportError, or the library's own failure to load libnccl
        why = (str(e).splitlines() or [""])[0]
        return f"multi-GPU training needs NCCL ({type(e).__name__}: {why}); install it with {INSTALL}"
    return None


class _Cai:
    """A device view as the CUDA array interface describes it (what nccl4py's buffers accept)."""

    def __init__(self, buf: View | DeviceArray):
        if buf.dtype not in _TYPESTR:
            raise TypeError(f"NCCL collectives here take {', '.join(_TYPESTR)} buffers, got {buf.dtype}")
        self.__cuda_array_interface__ = {"shape": (buf.size,), "typestr": _TYPESTR[buf.dtype],
                                         "data": (buf.ptr, False), "version": 3, "strides": None}


class NcclCommunicator:
    """One rank's NCCL communicator, on the runtime's device 0: ``LaunchEnv.pin_gpu`` made that the
    rank's own GPU before CUDA started."""

    def __init__(self, env: LaunchEnv, stream: Stream | None = None, timeout: float = 120.0):
        """``stream``: where the collectives are enqueued; by default the legacy default stream,
        where a training plan's launches and graphs run (so a collective follows the kernels
        before it and precedes those after: ZeroCudaRank's host steps rely on that)."""
        stream = stream if stream is not None else Stream.null()
        nccl = importlib.import_module("nccl.core")
        # NVLink SHARP (NVLS) reduces in switch hardware in an order that is not fixed, and is
        # unsafe on shared hosts (DESIGN, several GPUs): off unless the user set it explicitly.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        self._nccl, self.rank, self.world = nccl, env.rank, env.world
        self._stream_obj, self._stream = stream, int(stream.handle)
        uid = share_id(env, lambda: bytes(nccl.get_unique_id()), timeout)
        self._comm = nccl.Communicator.init(nranks=env.world, rank=env.rank,
                                            unique_id=nccl.UniqueId.from_bytes(uid))
        # the side stream: reduce-scatters that overlap the backward (non-blocking: the legacy
        # stream does not wait for it implicitly, only at join_overlapped)
        self._side = Stream()
        self._forked, self._joined, self._at_join = Event(), Event(), Event()

    def _call(self, what: str, fn: Any, *args: Any, stream: int | None = None, **kwargs: Any) -> None:
        try:
            fn(*args, stream=self._stream if stream is None else stream, **kwargs)
        except Exception as e:  # nccl4py's NCCLError / NcclInvalid: one line naming the collective
            raise CommError(f"rank {self.rank}: NCCL {what} failed: {(str(e).splitlines() or [''])[0]}") from None

    def all_reduce(self, buf: View | DeviceArray) -> None:
        self._call("all_reduce", self._comm.allreduce, _Cai(buf), _Cai(buf), self._nccl.SUM)

    def reduce_scatter(self, send: View | DeviceArray, recv: View | DeviceArray) -> None:
        self._call("reduce_scatter", self._comm.reduce_scatter, _Cai(send), _Cai(recv), self._nccl.SUM)

    def reduce_scatter_overlapped(self, send: View | DeviceArray, recv: View | DeviceArray) -> None:
        """``reduce_scatter`` on the side stream, after everything enqueued so far on the main one,
        which goes on meanwhile (the rest of the backward) until ``join_overlapped``."""
        self._forked.record(self._stream_obj)
        call("cuStreamWaitEvent", self._side.handle, self._forked.handle, 0)
        self._call("reduce_scatter", self._comm.reduce_scatter, _Cai(send), _Cai(recv), self._nccl.SUM,
                   stream=int(self._side.handle))

    def join_overlapped(self) -> None:
        """The main stream waits here for the side stream's collectives so far."""
        self._at_join.record(self._stream_obj)
        self._joined.record(self._side)
        call("cuStreamWaitEvent", self._stream_obj.handle, self._joined.handle, 0)

    def overlap_wait_ms(self) -> float:
        """How long the main stream waited at the last ``join_overlapped`` (0 if the side stream was
        done first); waits for that point."""
        return max(0.0, self._at_join.elapsed_ms(self._joined))

    def all_gather(self, send: View | DeviceArray, recv: View | DeviceArray) -> None:
        self._call("all_gather", self._comm.allgather, _Cai(send), _Cai(recv))

    def broadcast(self, buf: View | DeviceArray, root: int = 0) -> None:
        self._call("broadcast", self._comm.broadcast, _Cai(buf), _Cai(buf), root)

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
        """Tear the communicator down without waiting: the other ranks' collectives then fail
        (NCCL reports the lost peer; a watchdog that turns that into one line is still to come)."""
        self._comm.abort()

    def close(self) -> None:
        self._comm.destroy()
        self._side.destroy()
        for event in (self._forked, self._joined, self._at_join):
            event.destroy()
