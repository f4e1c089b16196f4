"""The run directory (``train --out``): checked before the first step and held by one writer.

A bad ``--out`` (a file, a path under a file, a folder that cannot be written) is found here, before
any training, not when the first checkpoint is written. A second run into the same directory is
refused while the first holds it, so two writers never interleave checkpoints, rotation and
``latest``; the lock is the kernel's (``flock``), so a killed run releases it by dying.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

LOCK = ".lock"


class RunDirError(ValueError):
    """An output directory that cannot hold the run; one line for the user."""


def prepare(out: Path) -> None:
    """Create ``out`` and prove a file can be written in it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=out)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"--out {out} cannot be written: {e.strerror or e}") from None


@contextlib.contextmanager
def hold(out: Path) -> Iterator[None]:
    """Hold ``out`` for this process for the duration; refuse if another live run holds it."""
    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"--out {out} cannot be locked: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirError(f"another run (pid {holder}) is writing to {out}") from None
        except OSError as e:  # a file system without locks
            raise RunDirError(f"--out {out} cannot be locked: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
