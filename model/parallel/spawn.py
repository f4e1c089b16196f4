"""``ptxgen train --gpus N``: N processes on this host, one a GPU, watched as one run.

Each child runs the same command line with torchrun's variables (``LaunchEnv.local``: rank,
world, its GPU as local rank, a free port on 127.0.0.1 for the rendezvous) and
``NCCL_NVLS_ENABLE=0`` unless the user set it. The parent trains nothing: it waits. When a child
fails, the others are stopped (SIGTERM, then SIGKILL after ``grace`` seconds): a rank blocked in a
collective whose peer is gone would otherwise wait for ever. The parent then says which rank
failed, with what code, in one line, and exits with that code (a rank's own error line came
before it). Ctrl-C, SIGTERM or SIGHUP to the parent stops every rank, and a parent killed outright
takes them with it (each child asks the kernel for SIGTERM on its parent's death).
"""
from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

from .launch import LOCALHOST, LaunchEnv

GRACE_S = 10.0  # how long a stopped rank may take to exit before it is killed
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def free_port(host: str = LOCALHOST) -> int:
    """A port nothing listens on now (the OS's pick), for rank 0's rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_environ(environ: Mapping[str, str], rank: int, world: int, port: int, run_id: str) -> dict[str, str]:
    env = {**environ, **LaunchEnv.local(rank, world, port, run_id).environ()}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink SHARP: order not fixed, unsafe on shared hosts
    return env


def spawn_ranks(world: int, command: Sequence[str], environ: Mapping[str, str], *,
                say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
                grace: float = GRACE_S, poll: float = 0.1) -> int:
    """Run ``command`` as ranks 0..world-1 and wait for them; 0 when every rank exits 0, else the
    first failing rank's exit code (128 + the signal for a rank killed by one)."""
    port, run_id = free_port(), f"{os.getpid()}-{secrets.token_hex(8)}"  # this run's, unlike any other's
    ranks = [subprocess.Popen(list(command), env=child_environ(environ, r, world, port, run_id),
                              preexec_fn=_die_with_parent) for r in range(world)]
    caught = _stop_on_signals()
    try:
        while True:
            codes = [p.poll() for p in ranks]
            failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                rank, code = failed
                running = [r for r, c in enumerate(codes) if c is None]
                _stop(ranks, grace)
                code = 128 - code if code < 0 else code
                say(f"ptxgen train: rank {rank} of {world} exited with code {code}"
                    + (f"; stopped rank{'s' if len(running) > 1 else ''} {', '.join(map(str, running))}"
                       if running else ""))
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll)
    except KeyboardInterrupt:
        _stop(ranks, grace, signal.SIGINT)
        say(f"ptxgen train: interrupted; stopped {world} ranks")
        return 130
    except _Signalled as e:  # the parent was told to stop (a scheduler's SIGTERM, a closed terminal)
        _stop(ranks, grace)
        say(f"ptxgen train: {signal.Signals(e.signum).name} received; stopped {world} ranks")
        return 128 + e.signum
    finally:
        for signum, handler in caught.items():
            signal.signal(signum, handler)


class _Signalled(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> dict[int, object]:
    """SIGTERM and SIGHUP raise ``_Signalled`` in the parent while it waits (main thread only);
    the handlers it replaced, to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: object) -> None:
        raise _Signalled(signum)
    return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGHUP)}


def _die_with_parent() -> None:
    """In each child before it starts: SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's own handlers remain
        pass


def _stop(ranks: list[subprocess.Popen], grace: float, sig: int = signal.SIGTERM) -> None:
    for p in ranks:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + grace
    for p in ranks:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def rank_command(argv: Sequence[str]) -> list[str]:
    """This interpreter running ``ptxgen train`` with the same arguments (``--gpus N`` included:
    a child reads PTXGEN_LAUNCHER and knows it is one of the N)."""
    return [sys.executable, "-m", "model.cli", "train", *argv]

