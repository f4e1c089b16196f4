"""Reading a file without hanging on what is not one; writing one whole or not at all."""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then os.replace: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), default_mode())  # (mkstemp's are private)
            f.write(data)
            f.flush()
            fsync_fd(f.fileno(), path)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself, which a crash could otherwise lose
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def default_mode(directory: bool = False) -> int:
    """The mode open() gives a new file (mkdir() a directory) under this process's umask: what a file
    written through a temporary (mkstemp, mkdtemp and safetensors make them private) is given."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_fd(fd: int, path: str | os.PathLike) -> None:
    """fsync, where the file system has it: one that cannot sync (EINVAL, ENOTSUP) is left as it is;
    a failed write-back (EIO, ENOSPC) is an error naming the path."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(e.errno, f"cannot sync to disk: {e.strerror}", str(path)) from None


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync_fd(fd, path)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every regular file directly in directory ``path``, then the directory: what is written
    there is on disk before the directory is renamed into place."""
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                fsync_fd(fd, entry.path)
            finally:
                os.close(fd)
    fsync_dir(path)


def read_file(path: str | os.PathLike) -> bytes:
    """A file's bytes: a regular file's, or a pipe's (``--config <(...)``), which is opened without
    waiting for a writer (with none, it reads as empty rather than hanging the command). A directory
    raises IsADirectoryError, a device OSError (/dev/zero never ends)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise OSError(errno.EINVAL, "a device, not a file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def why(e: BaseException) -> str:
    """What a failed read says, in one line: its message's first, else the exception's name."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__
