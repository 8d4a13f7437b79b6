"""Writing files so that a crash at any moment leaves the old content or the new,
never a part: a temporary file in the same directory, fsync, rename, and fsync
of the directory (the rename is durable only once its entry is on disk)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data``, readable as ``mode`` says (0600 for secrets)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp creates the file 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def discard_partial_writes(directory: Path) -> None:
    """Remove the temporary files a `write_atomic` killed before its rename left in
    ``directory`` (``.NAME.*.tmp``); only for a directory no one else writes to now."""
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
