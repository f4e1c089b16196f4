"""A rank that stops hearing from the others ends itself with one line, never hangs for ever.

NCCL's collectives are queued on the GPU; the host goes on until it next waits for the GPU (the
loss, a checkpoint). Should a peer die or hang, that wait never ends. The rank's communicator
``beat``s at every collective it issues (the first one arms the watchdog: building kernels before
it is not a silence); a thread checks, and past ``timeout`` seconds without a beat it prints one
line and exits the process (os._exit: the main thread is stuck inside the
driver and cannot be interrupted). Under ``ptxgen train --gpus N`` the parent stops the other ranks
as soon as one exits; torchrun does the same with its workers, and srun with --kill-on-bad-exit=1.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

EXIT_HUNG = 3  # the exit code of a rank that stopped waiting
DEFAULT_TIMEOUT_S = 600.0  # ptxgen train --comm-timeout: a checkpoint write by rank 0 must fit in it


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Watchdog:
    def __init__(self, timeout: float, who: str, *, say: Callable[[str], None] = _stderr,
                 exit: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic,
                 poll: float | None = None):
        if timeout <= 0:
            raise ValueError(f"a watchdog needs a positive timeout, got {timeout}")
        self.timeout, self.who = timeout, who
        self._say, self._exit, self._clock = say, exit, clock
        self._last: float | None = None  # armed by the first beat (a rank's first collective)
        self._stopped = threading.Event()
        self._poll = poll if poll is not None else min(1.0, timeout / 10)
        self._thread = threading.Thread(target=self._watch, name=f"watchdog {who}", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last = self._clock()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(self._poll):
            if self._last is None:
                continue
            quiet = self._clock() - self._last
            if quiet > self.timeout:
                self._say(f"ptxgen train: {self.who}: no collective in {quiet:.0f} s (another rank died or hung, "
                          f"or --comm-timeout {self.timeout:g} is too short); stopping")
                self._exit(EXIT_HUNG)
                return
