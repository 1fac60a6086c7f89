"""Resumable, verified downloads of Revisited Oxford/Paris and the revisitop1m distractors.

The result is the layout of the official revisitop code (and of :mod:`fastap.datasets`)::

    <root>/roxford5k/gnd_roxford5k.pkl      <root>/roxford5k/jpg/<name>.jpg
    <root>/rparis6k/gnd_rparis6k.pkl        <root>/rparis6k/jpg/<name>.jpg
    <root>/revisitop1m/revisitop1m.txt      <root>/revisitop1m/jpg/<name from the list>

Downloads go to ``<file>.part`` and are resumed with HTTP Range requests after an interrupted
transfer (within a run, up to ``retries`` times, and on the next run). Ground-truth files are
checked against their known md5. Archives are checked by extracting them completely — every
member read to the end and the gzip CRC verified — into a temporary folder beside ``jpg/`` that
is renamed into place only once the whole archive has come out. A finished archive leaves a
marker in ``<root>/<dataset>/.download/`` so that a rerun skips it; a failure leaves what
earlier archives had extracted untouched.

Every URL is ``<base>/<path>`` with one of the bases in :data:`BASE_URLS`. A mirror given as
``mirror=`` or in the environment variable ``FASTAP_MIRROR`` replaces all of them with
``<mirror>/<base name>/<path>`` (e.g. ``<mirror>/oxbuildings/oxbuild_images-v1.tgz``), which is
also how the tests serve fabricated archives from 127.0.0.1; ``base_urls=`` replaces single bases.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from tqdm import tqdm

from ._io import atomic_write_text, write_error_message
from ._progress import progress_bar

__all__ = [
    "ArchiveError",
    "BASE_URLS",
    "ChecksumError",
    "DATASETS",
    "DatasetSpec",
    "DownloadError",
    "GND_MD5",
    "MIRROR_ENV",
    "Remote",
    "download",
    "download_dataset",
    "download_file",
    "extract_archive",
    "md5sum",
]

#: Environment variable whose value, a base URL, replaces every download location.
MIRROR_ENV = "FASTAP_MIRROR"

#: Where each group of files lives upstream (the revisitop project and the Oxford VGG pages).
BASE_URLS: dict[str, str] = {
    "revisitop": "http://cmp.felk.cvut.cz/revisitop/data/datasets",
    "oxbuildings": "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings",
    "parisbuildings": "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings",
    "revisitop1m": "http://ptak.felk.cvut.cz/revisitop/revisitop1m",
}

#: md5 of the official ground-truth pickles.
GND_MD5: dict[str, str] = {
    "roxford5k": "f2b67579f625a587b5b0828dbf2e8eb0",
    "rparis6k": "2feae0a8257a5c6ca1b31b8eb73c8571",
}

REVISITOP1M_NUM_ARCHIVES = 100

_CHUNK = 1 << 20
_USER_AGENT = "fastap-downloader (Python urllib)"


class DownloadError(RuntimeError):
    """A file could not be fetched: unreachable server, HTTP error, or interrupted transfer."""


class ChecksumError(DownloadError):
    """A downloaded (or already present) file does not have the expected md5."""


class ArchiveError(DownloadError):
    """An archive is truncated, corrupt, empty, or has members that would escape its folder."""


#: What a rerun after a failed local write keeps (the hint of a full disk's message).
_RESUMES = "the download resumes"


def _write_error(path: Path, err: OSError) -> DownloadError:
    """A local write failure (full disk, read-only folder...) as a DownloadError naming the file.
    What is on disk stays resumable: ``.part`` files hold a prefix of the download, archives are
    kept until extracted, and extraction happens in a temporary folder."""
    return DownloadError(write_error_message(path, err, _RESUMES))


@dataclass(frozen=True)
class Remote:
    """One file to fetch: ``paths`` relative to the base ``base``.

    Several paths are alternative names of the same file, tried in order when the server answers
    404 (the Oxford VGG pages renamed ``oxbuild_images.tgz`` to ``oxbuild_images-v1.tgz``). The
    local name is always that of the first path, so markers do not depend on which one answered.
    """

    base: str
    paths: tuple[str, ...]
    md5: Optional[str] = None

    @property
    def filename(self) -> str:
        return PurePosixPath(self.paths[0]).name

    def urls(self, mirror: Optional[str] = None,
             base_urls: Optional[Mapping[str, str]] = None) -> list[str]:
        """The candidate URLs, honouring ``mirror`` / ``FASTAP_MIRROR`` and ``base_urls``."""
        return [_join(_base_url(self.base, mirror, base_urls), p) for p in self.paths]


@dataclass(frozen=True)
class DatasetSpec:
    """What makes up a dataset: its index file (ground truth or image list) and image archives.

    ``flatten`` moves every extracted file directly into ``jpg/`` (the Paris archives nest one
    folder per landmark; the official downloader flattens them the same way).
    """

    name: str
    index: Remote
    archives: tuple[Remote, ...]
    flatten: bool


def _specs() -> dict[str, DatasetSpec]:
    def gnd(name: str) -> Remote:
        return Remote("revisitop", (f"{name}/gnd_{name}.pkl",), GND_MD5[name])

    return {
        "roxford5k": DatasetSpec(
            "roxford5k", gnd("roxford5k"),
            (Remote("oxbuildings", ("oxbuild_images-v1.tgz", "oxbuild_images.tgz")),),
            flatten=True),
        "rparis6k": DatasetSpec(
            "rparis6k", gnd("rparis6k"),
            (Remote("parisbuildings", ("paris_1-v1.tgz", "paris_1.tgz")),
             Remote("parisbuildings", ("paris_2-v1.tgz", "paris_2.tgz"))),
            flatten=True),
        "revisitop1m": DatasetSpec(
            "revisitop1m", Remote("revisitop1m", ("revisitop1m.txt",)),
            tuple(Remote("revisitop1m", (f"jpg/revisitop1m.{i}.tar.gz",))
                  for i in range(1, REVISITOP1M_NUM_ARCHIVES + 1)),
            flatten=False),
    }


#: The datasets ``download`` knows, by name.
DATASETS: dict[str, DatasetSpec] = _specs()


def _base_url(base: str, mirror: Optional[str], base_urls: Optional[Mapping[str, str]]) -> str:
    if base_urls and base in base_urls:
        return base_urls[base]
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if mirror:
        return _join(mirror, base)
    return BASE_URLS[base]


def _join(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def _log(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Single files
# ----------------------------------------------------------------------------------------------


def md5sum(path: Union[str, os.PathLike]) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _NotFound(Exception):
    pass


class _Transient(Exception):
    """A failure worth retrying from where the ``.part`` file ends."""


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def download_file(urls: Union[str, Sequence[str]], dest: Union[str, os.PathLike], *,
                  md5: Optional[str] = None, progress: bool = True, retries: int = 3,
                  retry_wait: float = 1.0, timeout: float = 60.0) -> Path:
    """Fetch ``urls`` (alternatives tried in order on 404) into ``dest``; return ``dest``.

    An existing ``dest`` is kept (after its md5 is checked when ``md5`` is given). Data arrives in
    ``dest.part``; an interrupted transfer is resumed with a Range request, up to ``retries`` more
    times (waiting ``retry_wait`` × attempt seconds) and again on a later call, since the ``.part``
    file stays on failure. A server that ignores Range restarts the file from scratch. ``dest``
    appears only complete and, when ``md5`` is given, verified; a wrong md5 deletes the ``.part``
    file and raises :class:`ChecksumError`. Other failures raise :class:`DownloadError` naming
    the URL.
    """
    _download(urls, Path(dest), md5, progress, retries, retry_wait, timeout)
    return Path(dest)


def _download(urls: Union[str, Sequence[str]], dest: Path, md5: Optional[str], progress: bool,
              retries: int, retry_wait: float, timeout: float) -> Optional[str]:
    """:func:`download_file`, returning the URL that answered (None if ``dest`` was present)."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("download_file needs at least one URL")
    if dest.exists():
        if md5 is not None:
            actual = md5sum(dest)
            if actual != md5:
                raise ChecksumError(
                    f"{dest} exists but its md5 is {actual}, expected {md5}; "
                    f"delete it to download it again from {urls[0]}")
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    not_found = []
    for url in urls:
        try:
            _fetch(url, part, progress, retries, retry_wait, timeout)
        except _NotFound:
            not_found.append(url)
            continue
        if md5 is not None:
            actual = md5sum(part)
            if actual != md5:
                size = part.stat().st_size
                part.unlink()
                raise ChecksumError(f"md5 mismatch for {url}: expected {md5}, got {actual} "
                                    f"({size} bytes); the download was discarded")
        os.replace(part, dest)
        return url
    raise DownloadError("HTTP 404 Not Found: " + " and ".join(not_found))


def _fetch(url: str, part: Path, progress: bool, retries: int, retry_wait: float,
           timeout: float) -> None:
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, progress, timeout)
            return
        except _Transient as err:
            if attempt >= retries:
                kept = (f"; the partial file {part} ({part.stat().st_size} bytes) is kept and "
                        "the next run resumes it" if part.exists() else "")
                raise DownloadError(
                    f"downloading {url} failed after {attempt + 1} attempt(s): {err}{kept}"
                ) from None
            attempt += 1
            _log(progress, f"{err}; retrying ({attempt}/{retries})")
            time.sleep(retry_wait * attempt)


def _content_range(header: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """(first byte, total size) from ``bytes a-b/n`` or ``bytes */n``; None where unknown."""
    if not header or not header.startswith("bytes "):
        return None, None
    spec, _, total = header[6:].partition("/")
    start = None
    if spec != "*":
        try:
            start = int(spec.split("-")[0])
        except ValueError:
            pass
    try:
        size = int(total)
    except ValueError:
        size = None
    return start, size


def _fetch_once(url: str, part: Path, progress: bool, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            # Nothing left to send: either the .part is already whole or it is not this file.
            _, total = _content_range(err.headers.get("Content-Range"))
            if total == offset:
                return
            part.unlink()
            return _fetch_once(url, part, progress, timeout)
        if err.code == 404:
            raise _NotFound(url) from None
        if err.code in (408, 429) or err.code >= 500:
            raise _Transient(f"HTTP {err.code} {err.reason} from {url}") from None
        raise DownloadError(f"HTTP {err.code} {err.reason} for {url}") from None
    except urllib.error.URLError as err:
        raise _Transient(f"cannot reach {url}: {err.reason}") from None
    except (OSError, http.client.HTTPException) as err:
        raise _Transient(f"cannot reach {url}: {err!r}") from None

    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                response.close()
                part.unlink()
                return _fetch_once(url, part, progress, timeout)
            mode = "ab"
            _log(progress, f"resuming {url} at byte {offset}")
        else:
            # 200: the whole file (no Range sent, or the server ignored it).
            if offset:
                _log(progress, f"{url}: the server does not resume; downloading from the start")
            offset, mode = 0, "wb"
            total = length
        try:
            with open(part, mode) as out, progress_bar(
                    total, PurePosixPath(url).name, enabled=progress, initial=offset, unit="B",
                    unit_scale=True, unit_divisor=1024) as bar:
                received = _copy_chunks(
                    response, out, (OSError, http.client.HTTPException),
                    lambda err, n: _Transient(f"connection to {url} lost after {offset + n} "
                                              f"bytes ({err!r})"), bar.update)
        except OSError as err:  # reads raise _Transient above, so this is the local file
            raise _write_error(part, err) from None
        if length is not None and received < length:
            raise _Transient(f"connection to {url} closed after {offset + received} of "
                             f"{offset + length} bytes")


def _copy_chunks(source, out, read_errors: tuple,
                 read_failed: Callable[[Exception, int], Exception],
                 on_chunk: Callable[[int], object] = lambda n: None) -> int:
    """Copies ``source`` into ``out`` in ``_CHUNK`` reads; returns the bytes copied. A read error
    becomes ``read_failed(err, bytes copied so far)``, so that an ``OSError`` leaving here is the
    write's."""
    copied = 0
    while True:
        try:
            chunk = source.read(_CHUNK)
        except read_errors as err:
            raise read_failed(err, copied) from None
        if not chunk:
            return copied
        out.write(chunk)
        copied += len(chunk)
        on_chunk(len(chunk))


# ----------------------------------------------------------------------------------------------
# Archives
# ----------------------------------------------------------------------------------------------

# What reading a damaged .tar/.tgz raises: tarfile's own errors, EOFError for a gzip stream cut
# short, zlib.error / gzip.BadGzipFile (an OSError) for bad compressed bytes or CRC.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def _safe_member_path(name: str, archive: Path) -> Optional[PurePosixPath]:
    """The member's path relative to the extraction folder; raise if it would leave it."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"{archive}: member {name!r} would be written outside the "
                           "extraction folder; refusing to extract this archive")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def _members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    iterator = iter(tar)
    while True:
        try:
            member = next(iterator)
        except StopIteration:
            return
        except _READ_ERRORS as err:
            raise ArchiveError(f"{archive} is truncated or corrupt ({err})") from None
        yield member


def _extract_members(archive: Path, into: Path, flatten: bool) -> list[PurePosixPath]:
    files: dict[PurePosixPath, None] = {}
    try:
        tar = tarfile.open(archive, "r:*")
    except _READ_ERRORS as err:
        raise ArchiveError(f"{archive} is truncated or corrupt ({err})") from None
    with tar:
        for member in _members(tar, archive):
            rel = _safe_member_path(member.name, archive)
            # Links, devices and fifos are never created, so no member can redirect a later
            # write outside the folder; directories are made as files need them.
            if rel is None or not member.isfile():
                continue
            if flatten:
                rel = PurePosixPath(rel.name)
            target = into.joinpath(*rel.parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                with source, open(target, "wb") as out:
                    written = _copy_chunks(source, out, _READ_ERRORS, lambda err, n: ArchiveError(
                        f"{archive} is truncated or corrupt: reading {member.name!r} failed "
                        f"({err})"))
            except (tarfile.TarError, EOFError, zlib.error) as err:
                raise ArchiveError(f"{archive} is truncated or corrupt ({err})") from None
            except OSError as err:  # reads raise ArchiveError above, so this is the write
                # Not an ArchiveError: the archive is fine and must not be deleted.
                raise _write_error(target, err) from None
            if written != member.size:
                raise ArchiveError(f"{archive} is truncated: member {member.name!r} has "
                                   f"{written} of {member.size} bytes")
            files[rel] = None
        # Read to the very end: the gzip CRC is only checked there, and anything but zero
        # padding after the end-of-archive block means tarfile stopped at a damaged header.
        try:
            for chunk in iter(lambda: tar.fileobj.read(_CHUNK), b""):
                if chunk.strip(b"\0"):
                    raise ArchiveError(f"{archive} is corrupt: data follows the end of the "
                                       "archive (a damaged member header?)")
        except _READ_ERRORS as err:
            raise ArchiveError(f"{archive} is truncated or corrupt ({err})") from None
    return list(files)


def extract_archive(archive: Union[str, os.PathLike], dest: Union[str, os.PathLike], *,
                    flatten: bool = False) -> int:
    """Extract all regular files of a (compressed) tar into ``dest``; return how many.

    The archive is extracted completely into a temporary folder beside ``dest`` (same
    filesystem) and only then moved into ``dest`` by renames, so a truncated or corrupt archive
    raises :class:`ArchiveError` with ``dest`` exactly as it was. Members with absolute paths or
    ``..`` components are refused; links and special files are skipped. With ``flatten`` every
    file goes directly into ``dest`` under its base name.
    """
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{archive.name}.extracting"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = _extract_members(archive, tmp, flatten)
        if not files:
            raise ArchiveError(f"{archive} contains no files")
        if not dest.exists():
            os.rename(tmp, dest)
        else:
            for rel in files:
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp.joinpath(*rel.parts), target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return len(files)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def _write_marker(path: Path, info: dict) -> None:
    atomic_write_text(path, json.dumps(info, indent=1) + "\n", hint=_RESUMES)


def _expected_images(name: str, dataset_dir: Path) -> list[Path]:
    from .datasets import Revisitop1M, RevisitedDataset  # datasets never imports this module

    if name == "revisitop1m":
        return Revisitop1M(dataset_dir.parent).database_paths()
    ds = RevisitedDataset(dataset_dir.parent, name)
    return ds.database_paths() + ds.query_paths()


def download_dataset(name: str, root: Union[str, os.PathLike], *, mirror: Optional[str] = None,
                     base_urls: Optional[Mapping[str, str]] = None, keep_archives: bool = False,
                     progress: bool = True, retries: int = 3, retry_wait: float = 1.0,
                     timeout: float = 60.0) -> Path:
    """Download one dataset (``roxford5k``, ``rparis6k`` or ``revisitop1m``) into ``root``.

    Fetches the index file (ground truth, md5-checked, or the distractor list), then every
    archive not yet marked done, extracting each into ``<root>/<name>/jpg``. Archives are deleted
    after extraction unless ``keep_archives``. When every image the index names is already on
    disk (e.g. from the official downloader) no archive is fetched. Returns ``<root>/<name>``.
    A truncated or corrupt archive raises :class:`ArchiveError` and is deleted, so the next run
    downloads it afresh. Images named by the index but still missing at the end produce a
    warning (upstream archives are what they are).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root_dir = Path(root).expanduser()
    if root_dir.exists() and not root_dir.is_dir():
        raise NotADirectoryError(f"the download root {root} is a file, not a folder")
    dataset_dir = root_dir / name
    image_dir = dataset_dir / "jpg"
    work = dataset_dir / ".download"
    opts = dict(progress=progress, retries=retries, retry_wait=retry_wait, timeout=timeout)

    index = dataset_dir / spec.index.filename
    if not index.exists():
        _log(progress, f"{name}: downloading {spec.index.filename}")
    _download(spec.index.urls(mirror, base_urls), index, spec.index.md5, **opts)

    pending = [a for a in spec.archives if not (work / (a.filename + ".done")).exists()]
    if pending and image_dir.is_dir() and all(p.exists() for p in
                                              _expected_images(name, dataset_dir)):
        _log(progress, f"{name}: all images are already in {image_dir}; no archive needed")
        pending = []
    work.mkdir(parents=True, exist_ok=True)
    done = len(spec.archives) - len(pending)
    for remote in pending:
        done += 1
        archive = work / remote.filename
        _log(progress, f"{name}: [{done}/{len(spec.archives)}] {remote.filename}")
        url = _download(remote.urls(mirror, base_urls), archive, remote.md5, **opts)
        try:
            count = extract_archive(archive, image_dir, flatten=spec.flatten)
        except ArchiveError as err:
            archive.unlink(missing_ok=True)
            source = f" (from {url})" if url else ""
            raise ArchiveError(f"{err}{source}; the archive was deleted, run the download "
                               "again to fetch it afresh") from None
        marker = work / (remote.filename + ".done")
        try:
            _write_marker(marker, {"archive": remote.filename, "url": url, "files": count,
                                   "bytes": archive.stat().st_size})
        except OSError as err:
            raise _write_error(marker, err) from None
        if not keep_archives:
            archive.unlink()

    missing = [p for p in _expected_images(name, dataset_dir) if not p.exists()]
    if missing:
        shown = ", ".join(p.name for p in missing[:5])
        warnings.warn(f"{name}: {len(missing)} image(s) named in {index.name} are not in "
                      f"{image_dir} after extracting every archive (e.g. {shown})",
                      stacklevel=2)
    _log(progress, f"{name}: ready in {dataset_dir}")
    return dataset_dir


def download(names: Union[str, Iterable[str]], root: Union[str, os.PathLike],
             **kwargs) -> dict[str, Path]:
    """:func:`download_dataset` for each name in turn; returns ``{name: dataset folder}``."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(DATASETS)}")
    return {n: download_dataset(n, root, **kwargs) for n in names}
