"""Rank 0 hands every rank the same opaque bytes (NCCL's unique id) over one TCP port.

Rank 0 listens on MASTER_ADDR:MASTER_PORT; every other rank connects (retrying while rank 0 is
not up yet) and says who it is (magic, world size, rank) and what it was given to run (``inputs``:
a digest by name, say of its data and settings: each rank reads its own, and ranks on other hosts
could read other files under one path). Once all ``world - 1`` have arrived, each gets the id; a
rank with another world size or other inputs, a rank out of range or a rank twice gets an error
line instead, and so does rank 0. A connection that does not introduce itself as a rank of this
run (a port scan, another program, a rank of another job on the same port: another ``run_id``) is
closed and ignored (another run's rank is told why). Nothing waits for ever: past ``timeout``
seconds rank 0 says which ranks never came (and which other runs' ranks knocked), and the others
that rank 0 never answered. Jobs tell apart only by their launchers' run ids: two plain torchrun
jobs (TORCHELASTIC_RUN_ID "none" unless --rdzv-id or --standalone) or a rank of an older ptxgen
(which sends none) still meet as one run and are refused as such.
"""
from __future__ import annotations

import json
import socket
import struct
import time
from typing import Callable, Mapping, NamedTuple

from .launch import LaunchEnv

MAGIC = b"PTXR3"  # protocol and version: a stray client (or another program on the port) is refused
RUN = "run id"  # the hello's map: the inputs, and under this name the run's id (LaunchEnv.run_id)
_HELLO = struct.Struct("!5sIII")  # magic, world, rank, the inputs' size (JSON after it)
MAX_INPUTS = 1 << 12
_OK, _REFUSED = 0, 1
ANSWER_GRACE = 1.0  # seconds a rank waits for rank 0's answer past its own deadline


class RendezvousError(RuntimeError):
    """The ranks could not meet; one line."""


def share_id(env: LaunchEnv, make_id: Callable[[], bytes], timeout: float = 120.0,
             inputs: Mapping[str, str] | None = None) -> bytes:
    """The same bytes on every rank: ``make_id()`` on rank 0, received by the others, once every
    rank's ``inputs`` (name -> digest) are rank 0's."""
    if env.world == 1:
        return make_id()
    deadline = time.monotonic() + timeout
    inputs = dict(inputs or {})
    if RUN in inputs:
        raise ValueError(f"share_id: {RUN!r} names the run, not an input")
    given = json.dumps({**inputs, RUN: env.run_id}, sort_keys=True).encode()
    if len(given) > MAX_INPUTS:
        raise ValueError(f"share_id: {len(given)} bytes of inputs, at most {MAX_INPUTS}")
    if env.rank == 0:
        return _serve(env, make_id, deadline, timeout, inputs)
    return _join(env, deadline, timeout, given)


def _where(env: LaunchEnv) -> str:
    return f"{env.master_addr}:{env.master_port}"


def _serve(env: LaunchEnv, make_id: Callable[[], bytes], deadline: float, timeout: float,
           inputs: dict[str, str]) -> bytes:
    try:
        server = _listen(env)
    except OSError as e:
        raise RendezvousError(f"rank 0 cannot listen on {_where(env)}: {e.strerror or e}") from None
    peers: dict[int, socket.socket] = {}
    try:
        _gather(server, env, peers, deadline, timeout, inputs)
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


def _listen(env: LaunchEnv) -> socket.socket:
    """Rank 0's server socket. --gpus's ranks are all on this host: 127.0.0.1. A launcher's
    MASTER_ADDR names rank 0's host as the other hosts reach it, and on that host the name may
    resolve to a loopback address (Debian's /etc/hosts: 127.0.1.1): so rank 0 first checks that the
    address is this host's (binding it, any port: a MASTER_ADDR of another host fails here at once
    instead of at the others' timeout), then listens on every interface, IPv6 too where it can."""
    if env.source == "--gpus":
        return socket.create_server((env.master_addr, env.master_port), reuse_port=False)
    error = OSError(f"{env.master_addr} is not an address of this host")
    for family, kind, proto, _, address in socket.getaddrinfo(env.master_addr, 0, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
                break
            except OSError as e:
                error = OSError(f"{env.master_addr} is not an address of this host ({e.strerror or e})")
    else:
        raise error
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", env.master_port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", env.master_port), reuse_port=False)


def _gather(server: socket.socket, env: LaunchEnv, peers: dict[int, socket.socket], deadline: float,
            timeout: float, inputs: dict[str, str]) -> None:
    """Accept ranks 1..world-1 into ``peers``."""
    others: set[str] = set()  # the runs whose ranks knocked here instead
    while len(peers) < env.world - 1:
        server.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            conn, _ = server.accept()
        except (socket.timeout, TimeoutError):
            missing = sorted(set(range(1, env.world)) - set(peers))
            came = f" (ranks of another run came: {', '.join(sorted(others))[:200]})" if others else ""
            raise RendezvousError(f"rendezvous on {_where(env)}: rank(s) {', '.join(map(str, missing))} did "
                                  f"not arrive within {timeout:g} s{came}") from None
        hello = _hello(conn, env, set(peers), deadline, inputs)
        if hello.rank is None:  # not one of ours (a port scan, another run's rank): it cannot stop the run
            if hello.other_run is not None:  # another run's rank: told so, and named if ours never come
                others.add(repr(hello.other_run))
                _send(conn, _REFUSED, (f"rank 0 on {_where(env)} is run {env.run_id!r}'s, this rank is run "
                                       f"{hello.other_run!r}'s (another job on this port: give each its own "
                                       f"MASTER_PORT)").encode())
            conn.close()
            continue
        if hello.problem:
            _send(conn, _REFUSED, hello.problem.encode())
            conn.close()
            raise RendezvousError(f"rendezvous on {_where(env)}: {hello.problem}")
        peers[hello.rank] = conn


class _Hello(NamedTuple):
    """What a peer said: its rank (None: not a rank of this run; -1: a rank of another protocol
    version, whose index it does not say in a form we read), what is wrong with it (None: nothing),
    and the run it is a rank of where that is another run."""

    rank: int | None
    problem: str | None = None
    other_run: str | None = None


def _hello(conn: socket.socket, env: LaunchEnv, seen: set[int], deadline: float, inputs: dict[str, str]) -> _Hello:
    conn.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))  # a silent peer holds the door 5 s at most
    try:
        magic = _recv(conn, len(MAGIC))
        if magic != MAGIC:  # another version of ours (a stale install on one host) is an error; a stranger is not
            return _Hello(-1, f"a rank speaks rendezvous {magic.decode(errors='replace')}, rank 0 {MAGIC.decode()} "
                              f"(another version of ptxgen on its host)") if magic.startswith(MAGIC[:4]) else _Hello(None)
        world, rank, size = _HELLO.unpack(magic + _recv(conn, _HELLO.size - len(MAGIC)))[1:]
        theirs = json.loads(_recv(conn, size)) if size <= MAX_INPUTS else None
    except (OSError, ConnectionError, struct.error, ValueError, RecursionError):
        return _Hello(None)
    if not (isinstance(theirs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in theirs.items())):
        return _Hello(None)
    run = theirs.pop(RUN, None)
    if run != env.run_id:  # a rank, but of another job on this port: not ours to refuse
        return _Hello(None, other_run=run)
    if world != env.world:
        return _Hello(rank, f"rank {rank} has world size {world}, rank 0 has {env.world}")
    if not 1 <= rank < env.world or rank in seen:
        return _Hello(rank, f"rank {rank} arrived {'twice' if rank in seen else 'outside 1..' + str(env.world - 1)}")
    differ = sorted(name for name in set(inputs) | set(theirs) if inputs.get(name) != theirs.get(name))
    if differ:
        return _Hello(rank, f"rank {rank} was given another {' and '.join(differ)} than rank 0 (each rank reads its "
                            f"own: give every rank the same)")
    return _Hello(rank)


def _join(env: LaunchEnv, deadline: float, timeout: float, given: bytes) -> bytes:
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
            conn.sendall(_HELLO.pack(MAGIC, env.world, env.rank, len(given)) + given)
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
