"""Files that survive a crash: written whole or not at all, and on disk once written.

`write_atomically` replaces a file so that after `kill -9` or a power cut at any moment it
holds the old text or the new, never a mix; `fsync_tree` makes a directory written in place
(a checkpoint) durable before anything that names it is recorded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Makes the names in `directory` (a rename, a new entry) durable, as fsync does a file's
    bytes."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Replaces `path` with `text`: a temporary file in the same directory (with `mode` before
    any byte is written), fsync'd, renamed over `path`, and the directory fsync'd."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root`, and `root` itself, on disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(folder))
