"""Rank 0 hands every rank the same opaque bytes (NCCL's unique id) over one TCP port.

Rank 0 listens on MASTER_ADDR:MASTER_PORT; every other rank connects (retrying while rank 0 is
not up yet) and says who it is (magic, world size, rank). Once all ``world - 1`` have arrived,
each gets the id; a rank with another world size, a rank out of range or a rank twice gets an
error line instead, and so does rank 0. A connection that does not introduce itself as a rank
(a port scan, another program) is closed and ignored. Nothing waits for ever: past ``timeout`` seconds rank 0
says which ranks never came, and the others that rank 0 never answered.
"""
from __future__ import annotations

import socket
import struct
import time
from typing import Callable

from .launch import LaunchEnv

MAGIC = b"PTXR1"  # protocol and version: a stray client (or another program on the port) is refused
_HELLO = struct.Struct("!5sII")  # magic, world, rank
_OK, _REFUSED = 0, 1
ANSWER_GRACE = 1.0  # seconds a rank waits for rank 0's answer past its own deadline


class RendezvousError(RuntimeError):
    """The ranks could not meet; one line."""


def share_id(env: LaunchEnv, make_id: Callable[[], bytes], timeout: float = 120.0) -> bytes:
    """The same bytes on every rank: ``make_id()`` on rank 0, received by the others."""
    if env.world == 1:
        return make_id()
    deadline = time.monotonic() + timeout
    return _serve(env, make_id, deadline, timeout) if env.rank == 0 else _join(env, deadline, timeout)


def _where(env: LaunchEnv) -> str:
    return f"{env.master_addr}:{env.master_port}"


def _serve(env: LaunchEnv, make_id: Callable[[], bytes], deadline: float, timeout: float) -> bytes:
    # a launcher's MASTER_ADDR names rank 0's host as the other hosts reach it; on that host the
    # name may resolve to a loopback address (Debian's /etc/hosts: 127.0.1.1), so rank 0 listens on
    # every interface; --gpus's ranks are all on this host
    host = env.master_addr if env.source == "--gpus" else ""
    try:
        server = socket.create_server((host, env.master_port), reuse_port=False)
    except OSError as e:
        raise RendezvousError(f"rank 0 cannot listen on {_where(env)}: {e.strerror or e}") from None
    peers: dict[int, socket.socket] = {}
    try:
        _gather(server, env, peers, deadline, timeout)
        uid = make_id()
        for conn in peers.values():
            _send(conn, _OK, uid)
        return uid
    except RendezvousError as e:  # the ranks already here hear it at once instead of at their timeout
        for conn in peers.values():
            _send(conn, _REFUSED, str(e).encode())
        raise
    finally:
        for conn in peers.values():
            conn.close()
        server.close()


def _gather(server: socket.socket, env: LaunchEnv, peers: dict[int, socket.socket], deadline: float,
            timeout: float) -> None:
    """Accept ranks 1..world-1 into ``peers``."""
    while len(peers) < env.world - 1:
        server.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            conn, _ = server.accept()
        except (socket.timeout, TimeoutError):
            missing = sorted(set(range(1, env.world)) - set(peers))
            raise RendezvousError(f"rendezvous on {_where(env)}: rank(s) {', '.join(map(str, missing))} did "
                                  f"not arrive within {timeout:g} s") from None
        problem, rank = _hello(conn, env, set(peers), deadline)
        if rank is None:  # not one of ours (a port scan, a stale client): it cannot stop the run
            conn.close()
            continue
        if problem:
            _send(conn, _REFUSED, problem.encode())
            conn.close()
            raise RendezvousError(f"rendezvous on {_where(env)}: {problem}")
        peers[rank] = conn


def _hello(conn: socket.socket, env: LaunchEnv, seen: set[int], deadline: float) -> tuple[str | None, int | None]:
    """(what is wrong with this rank, or None; its rank, or None for a peer that is not a rank)."""
    conn.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))  # a silent peer holds the door 5 s at most
    try:
        magic, world, rank = _HELLO.unpack(_recv(conn, _HELLO.size))
    except (OSError, ConnectionError, struct.error):
        return None, None
    if magic != MAGIC:
        return None, None
    if world != env.world:
        return f"rank {rank} has world size {world}, rank 0 has {env.world}", rank
    if not 1 <= rank < env.world or rank in seen:
        return f"rank {rank} arrived {'twice' if rank in seen else 'outside 1..' + str(env.world - 1)}", rank
    return None, rank


def _join(env: LaunchEnv, deadline: float, timeout: float) -> bytes:
    while True:  # rank 0 may not be listening yet
        try:
            conn = socket.create_connection((env.master_addr, env.master_port),
                                            timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise RendezvousError(f"rank {env.rank}: rank 0 did not answer on {_where(env)} within "
                                      f"{timeout:g} s") from None
            time.sleep(0.05)
    with conn:
        try:
            conn.sendall(_HELLO.pack(MAGIC, env.world, env.rank))
            # rank 0 answers by its own deadline: a little longer here, to hear its verdict rather than our own
            conn.settimeout(max(0.1, deadline + ANSWER_GRACE - time.monotonic()))
            status, payload = _receive(conn)
        except (OSError, ConnectionError, struct.error):
            raise RendezvousError(f"rank {env.rank}: rank 0 on {_where(env)} did not hand out the id within "
                                  f"{timeout:g} s (a rank missing, or rank 0 gone)") from None
    if status != _OK:
        raise RendezvousError(f"rank {env.rank}: refused by rank 0 on {_where(env)}: {payload.decode(errors='replace')}")
    return payload


def _send(conn: socket.socket, status: int, payload: bytes) -> None:
    try:
        conn.sendall(struct.pack("!BI", status, len(payload)) + payload)
    except OSError:
        pass  # that rank is gone: it reports its own failure


def _receive(conn: socket.socket) -> tuple[int, bytes]:
    status, size = struct.unpack("!BI", _recv(conn, 5))
    if size > 1 << 16:
        raise ConnectionError("oversized message")
    return status, _recv(conn, size)


def _recv(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data
