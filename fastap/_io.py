"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere the only way to read it is to set
    it, so it is set and restored at once (a thread creating a file in between would use 022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, flushes it to disk and renames
    it over ``path``; on any failure the temporary file is removed and ``path`` is untouched.
    The file gets the permissions ``open()`` would give it (0666 minus the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file 0600 and os.replace keeps that: checkpoints and reports
            # would be unreadable by the rest of the group.
            os.chmod(tmp, 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))
