"""Atomic file writes (a reader, or a run killed mid-write, sees the old file or the new one),
and reads that refuse a file whose bytes changed after it was written."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]

#: errno values of a full disk or quota (EFBIG: the file-size limit of RLIMIT_FSIZE).
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def named_os_error(err: OSError, message: str) -> OSError:
    """``err`` re-made with ``message`` (its class and errno kept), marked as already naming
    its file so that outer handlers pass it on unchanged."""
    named = type(err)(err.errno, message)
    named.fastap_named = True
    return named


def write_error_message(path: PathLike, err: OSError, hint: str) -> str:
    """``writing <path>: <reason>``, plus ``; free space and rerun (<hint>)`` on a full disk; an
    error that already names its file keeps its message."""
    if getattr(err, "fastap_named", False):
        return str(err.strerror)
    more = f"; free space and rerun ({hint})" if err.errno in _DISK_FULL else ""
    return f"writing {path}: {err.strerror or err}{more}"


@contextlib.contextmanager
def naming_write_errors(path: PathLike, hint: str):
    """Re-raise an ``OSError`` of the block as one whose message names ``path`` (see
    :func:`write_error_message`); ``errno`` is kept."""
    try:
        yield
    except OSError as err:
        if err.errno is None or getattr(err, "fastap_named", False):
            raise  # not the OS's (a dataset's own error), or already named by an inner block
        raise named_os_error(err, write_error_message(path, err, hint)) from err


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


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], *,
                 hint: str = "the file is left as it was") -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, flushes it to disk and renames
    it over ``path``; on any failure the temporary file is removed and ``path`` is untouched.
    The file gets the permissions ``open()`` would give it (0666 minus the umask). An
    ``OSError`` names ``path`` (and, for a full disk, says what a rerun keeps: ``hint``)."""
    path = Path(path)
    with naming_write_errors(path, hint):
        _replace_atomically(path, write)
    return path


def _replace_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file 0600 and os.replace keeps that: checkpoints and reports
            # would be unreadable by the rest of the group. Best effort: some file systems
            # (vfat, FUSE mounts) refuse chmod, and the write must not fail for that.
            try:
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            except OSError:
                pass
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _WriteErrorKeeper:
    """A binary file whose ``write()`` keeps the ``OSError`` it raises: torch.save's zip writer
    reports a failed write (a full disk) as a RuntimeError about the file position instead."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def atomic_torch_save(path: PathLike, obj, **options) -> Path:
    """:func:`atomic_write` of ``torch.save(obj)``; a failed write raises its ``OSError``
    (naming ``path``), not the serializer's RuntimeError."""
    import torch

    def write(file: BinaryIO) -> None:
        keeper = _WriteErrorKeeper(file)
        try:
            torch.save(obj, keeper)
        except RuntimeError:
            if keeper.error is None:
                raise
            raise keeper.error from None
        if keeper.error is not None:  # a failed write the serializer did not report
            raise keeper.error

    return atomic_write(path, write, **options)


def atomic_write_text(path: PathLike, text: str, **options) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), **options)


def error_message(err: BaseException) -> str:
    """An OSError as ``<file>: <reason>`` (or the reason alone), not ``[Errno 28] ...``."""
    if isinstance(err, OSError) and err.strerror:
        names = [str(n) for n in (err.filename, err.filename2) if n is not None]
        return f"{' -> '.join(names)}: {err.strerror}" if names else err.strerror
    return str(err)


class DamagedFileError(ValueError):
    """A file whose bytes disagree with the checksum stored for them."""


def check_zip_crcs(path: PathLike) -> None:
    """Raise :class:`DamagedFileError` naming ``path`` when an entry of the zip archive at
    ``path`` (the format of ``torch.save``) fails the CRC-32 stored with it, which ``torch.load``
    does not check. Reads the whole file once (36 ms for a 98 MiB ResNet-50 checkpoint in the
    page cache). A file that is no zip archive (a legacy pickle, a cut-off file) is left to the
    reader, which refuses what it cannot parse."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return
    if bad is not None:
        raise DamagedFileError(f"{path} is damaged: its entry {bad!r} fails the CRC-32 check "
                               "stored with it (its bytes changed after the file was written)")


def load_torch_file(path: PathLike, **options):
    """``torch.load(path, **options)`` after :func:`check_zip_crcs`."""
    import torch

    check_zip_crcs(path)
    return torch.load(path, **options)


class Crc32Writer:
    """A binary file whose ``write()`` also keeps the running CRC-32 (``crc``) of what it wrote."""

    def __init__(self, file: BinaryIO):
        self.file, self.crc = file, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.file.write(data)


def file_crc32(path: PathLike, block: int = 2**24) -> int:
    """The CRC-32 of the bytes of ``path``."""
    crc = 0
    with open(path, "rb") as f:
        while data := f.read(block):
            crc = zlib.crc32(data, crc)
    return crc
