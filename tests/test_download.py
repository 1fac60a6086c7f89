"""fastap.download against a real HTTP server on 127.0.0.1 serving fabricated archives.

The server supports Range requests and can be told to drop a connection part-way through a file,
to ignore Range, or to answer 404, so that resuming, restarting and error reporting are all
exercised over real sockets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import fastap.download as dl
from fastap.datasets import Revisitop1M, RevisitedDataset

REAL_GND = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop"


# ----------------------------------------------------------------------------------------------
# Local HTTP server
# ----------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        byte_range = self.headers.get("Range")
        srv.log.append((path, byte_range))
        data = srv.files.get(path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if byte_range and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        drops = srv.drops.get(path)
        if drops:
            # Send only part of the promised body, then hang up.
            self.wfile.write(body[:drops.pop(0)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.drops, srv.log, srv.ignore_range = {}, {}, [], False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _no_ambient_mirror(monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)


# ----------------------------------------------------------------------------------------------
# Fabricated data
# ----------------------------------------------------------------------------------------------


def jpeg(color=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def tar_bytes(members: dict, mode: str = "w:gz") -> bytes:
    """An archive of ``{name: bytes}``; a value ``("symlink", target)`` makes a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gnd_bytes(imlist, qimlist) -> bytes:
    gnd = [{"bbx": [1.0, 1.0, 6.0, 5.0], "easy": [0], "hard": [], "junk": []} for _ in qimlist]
    return pickle.dumps({"imlist": list(imlist), "qimlist": list(qimlist), "gnd": gnd},
                        protocol=3)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def use_gnd_md5(monkeypatch, name: str, data: bytes) -> None:
    """Make the downloader expect the md5 of a fabricated ground-truth file."""
    spec = dl.DATASETS[name]
    monkeypatch.setitem(dl.DATASETS, name, dataclasses.replace(
        spec, index=dataclasses.replace(spec.index, md5=md5(data))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAST = dict(progress=False, retry_wait=0.0, timeout=10.0)
BLOB = os.urandom(300_000)


# ----------------------------------------------------------------------------------------------
# download_file
# ----------------------------------------------------------------------------------------------


def test_download_file_verifies_md5_and_leaves_no_part(server, tmp_path):
    server.files["/a/blob.bin"] = BLOB
    dest = tmp_path / "sub" / "blob.bin"
    out = dl.download_file(f"{server.url}/a/blob.bin", dest, md5=md5(BLOB), **FAST)
    assert out == dest and dest.read_bytes() == BLOB
    assert not (tmp_path / "sub" / "blob.bin.part").exists()
    # A second call finds the verified file and does not touch the network.
    n = len(server.log)
    dl.download_file(f"{server.url}/a/blob.bin", dest, md5=md5(BLOB), **FAST)
    assert len(server.log) == n


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    server.files["/blob.bin"] = BLOB
    server.drops["/blob.bin"] = [100_000, 50_000]
    dest = tmp_path / "blob.bin"
    dl.download_file(f"{server.url}/blob.bin", dest, md5=md5(BLOB), retries=2, **FAST)
    assert dest.read_bytes() == BLOB
    assert server.log == [("/blob.bin", None), ("/blob.bin", "bytes=100000-"),
                          ("/blob.bin", "bytes=150000-")]


def test_part_file_kept_on_failure_and_resumed_next_run(server, tmp_path):
    server.files["/blob.bin"] = BLOB
    server.drops["/blob.bin"] = [120_000]
    dest = tmp_path / "blob.bin"
    url = f"{server.url}/blob.bin"
    with pytest.raises(dl.DownloadError, match=re.escape(url)) as err:
        dl.download_file(url, dest, md5=md5(BLOB), retries=0, **FAST)
    assert "120000" in str(err.value) and "resume" in str(err.value)
    part = tmp_path / "blob.bin.part"
    assert not dest.exists() and part.read_bytes() == BLOB[:120_000]

    dl.download_file(url, dest, md5=md5(BLOB), retries=0, **FAST)
    assert dest.read_bytes() == BLOB and not part.exists()
    assert server.log[-1] == ("/blob.bin", "bytes=120000-")


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    server.files["/blob.bin"] = BLOB
    server.ignore_range = True
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes that must not survive")
    dl.download_file(f"{server.url}/blob.bin", dest, md5=md5(BLOB), **FAST)
    assert dest.read_bytes() == BLOB
    assert server.log == [("/blob.bin", "bytes=33-")]


def test_complete_part_file_is_accepted_on_416(server, tmp_path):
    server.files["/blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB)
    dl.download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", md5=md5(BLOB), **FAST)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert server.log == [("/blob.bin", f"bytes={len(BLOB)}-")]


def test_404_names_the_url(server, tmp_path):
    url = f"{server.url}/missing/file.tgz"
    with pytest.raises(dl.DownloadError, match=r"404.*" + re.escape(url)):
        dl.download_file(url, tmp_path / "file.tgz", **FAST)
    assert not any(tmp_path.iterdir())


def test_alternative_urls_are_tried_after_404(server, tmp_path):
    server.files["/new-v1.bin"] = BLOB
    dest = tmp_path / "x.bin"
    dl.download_file([f"{server.url}/old.bin", f"{server.url}/new-v1.bin"], dest, **FAST)
    assert dest.read_bytes() == BLOB
    assert [p for p, _ in server.log] == ["/old.bin", "/new-v1.bin"]


def test_connection_refused_names_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/gnd.pkl"
    with pytest.raises(dl.DownloadError, match=re.escape(url)):
        dl.download_file(url, tmp_path / "gnd.pkl", retries=1, **FAST)
    assert not any(tmp_path.iterdir())


def test_server_error_is_retried(server, tmp_path):
    class Flaky(_Handler):
        calls = 0

        def do_GET(self):
            Flaky.calls += 1
            if Flaky.calls == 1:
                self.send_error(503)
                return
            super().do_GET()

    server.RequestHandlerClass = Flaky
    server.files["/blob.bin"] = BLOB
    dl.download_file(f"{server.url}/blob.bin", tmp_path / "b", retries=1, **FAST)
    assert (tmp_path / "b").read_bytes() == BLOB and Flaky.calls == 2


def test_wrong_md5_is_reported_and_discarded(server, tmp_path):
    server.files["/gnd.pkl"] = b"not the real ground truth"
    dest = tmp_path / "gnd.pkl"
    expected = "0" * 32
    with pytest.raises(dl.ChecksumError) as err:
        dl.download_file(f"{server.url}/gnd.pkl", dest, md5=expected, **FAST)
    msg = str(err.value)
    assert expected in msg and md5(b"not the real ground truth") in msg and "/gnd.pkl" in msg
    assert not dest.exists() and not (tmp_path / "gnd.pkl.part").exists()


def test_existing_file_with_wrong_md5_is_not_trusted(server, tmp_path):
    dest = tmp_path / "gnd.pkl"
    dest.write_bytes(b"tampered")
    with pytest.raises(dl.ChecksumError, match=re.escape(str(dest))):
        dl.download_file(f"{server.url}/gnd.pkl", dest, md5=md5(b"original"), **FAST)
    assert dest.read_bytes() == b"tampered" and server.log == []


# ----------------------------------------------------------------------------------------------
# extract_archive
# ----------------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_extract_keeps_layout_or_flattens(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_bytes({"./x/1.jpg": b"1", "x/y/2.jpg": b"22", "3.jpg": b"333"}))
    assert dl.extract_archive(archive, tmp_path / "keep") == 3
    assert _tree(tmp_path / "keep") == {"x/1.jpg": b"1", "x/y/2.jpg": b"22", "3.jpg": b"333"}
    assert dl.extract_archive(archive, tmp_path / "flat", flatten=True) == 3
    assert _tree(tmp_path / "flat") == {"1.jpg": b"1", "2.jpg": b"22", "3.jpg": b"333"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "flat", "keep"]


@pytest.mark.parametrize("evil", ["../escape.jpg", "a/../../escape.jpg", "/tmp/abs.jpg"])
def test_path_traversal_is_refused(tmp_path, evil):
    dest = tmp_path / "out" / "jpg"
    dest.mkdir(parents=True)
    (dest / "old.jpg").write_bytes(b"old")
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(tar_bytes({"ok.jpg": b"fine", evil: b"pwned"}))
    with pytest.raises(dl.ArchiveError, match="outside"):
        dl.extract_archive(archive, dest)
    assert _tree(tmp_path / "out") == {"jpg/old.jpg": b"old"}
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "out" / "escape.jpg").exists()


def test_symlinks_are_not_created(tmp_path):
    archive = tmp_path / "links.tgz"
    archive.write_bytes(tar_bytes({"link": ("symlink", "/etc"), "a.jpg": b"a"}))
    assert dl.extract_archive(archive, tmp_path / "out") == 1
    assert _tree(tmp_path / "out") == {"a.jpg": b"a"}
    assert not (tmp_path / "out" / "link").is_symlink()


def _damaged_archives():
    members = {f"img/{i:03d}.jpg": os.urandom(4000) for i in range(30)}
    good = tar_bytes(members)
    corrupt = bytearray(good)
    for k in range(len(good) // 2, len(good) // 2 + 64):
        corrupt[k] ^= 0xFF
    plain = bytearray(tar_bytes(members, mode="w"))
    header = plain.index(b"img/015.jpg")  # the 16th member's header block
    plain[header + 148: header + 156] = b"garbage!"  # its checksum field
    return {"truncated": good[: len(good) * 2 // 3], "corrupt": bytes(corrupt),
            "bad-header": bytes(plain), "empty": tar_bytes({}), "not-an-archive": b"<html>"}


@pytest.mark.parametrize("kind", list(_damaged_archives()))
def test_damaged_archive_leaves_destination_untouched(tmp_path, kind):
    dest = tmp_path / "jpg"
    dest.mkdir()
    (dest / "earlier.jpg").write_bytes(b"from an earlier archive")
    archive = tmp_path / "broken.tgz"
    archive.write_bytes(_damaged_archives()[kind])
    with pytest.raises(dl.ArchiveError, match=re.escape(str(archive))):
        dl.extract_archive(archive, dest)
    assert _tree(dest) == {"earlier.jpg": b"from an earlier archive"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.tgz", "jpg"]


# ----------------------------------------------------------------------------------------------
# Whole datasets
# ----------------------------------------------------------------------------------------------

OX_DB = [f"oxford_{i:06d}" for i in range(6)]
OX_Q = ["all_souls_000013", "ashmolean_000000"]


def serve_oxford(server, monkeypatch):
    gnd = gnd_bytes(OX_DB, OX_Q)
    use_gnd_md5(monkeypatch, "roxford5k", gnd)
    server.files["/revisitop/roxford5k/gnd_roxford5k.pkl"] = gnd
    # The upstream archive nests its images in a folder; flattening puts them in jpg/.
    server.files["/oxbuildings/oxbuild_images-v1.tgz"] = tar_bytes(
        {f"oxbuild_images/{n}.jpg": jpeg() for n in OX_DB + OX_Q})


def test_roxford5k_via_environment_mirror(server, tmp_path, monkeypatch):
    serve_oxford(server, monkeypatch)
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)
    archive = "/oxbuildings/oxbuild_images-v1.tgz"
    server.drops[archive] = [500]  # the archive transfer breaks once and resumes
    root = tmp_path / "data"
    assert dl.download_dataset("roxford5k", root, retries=1, **FAST) == root / "roxford5k"

    assert server.log[-1] == (archive, "bytes=500-")
    ds = RevisitedDataset(root, "roxford5k")
    assert ds.imlist == OX_DB and ds.qimlist == OX_Q and ds.missing_images() == []
    assert sorted(p.name for p in (root / "roxford5k" / "jpg").iterdir()) == sorted(
        f"{n}.jpg" for n in OX_DB + OX_Q)
    marker = json.loads((root / "roxford5k" / ".download" / "oxbuild_images-v1.tgz.done")
                        .read_text())
    assert marker["files"] == 8 and marker["url"] == server.url + archive
    assert sorted(p.name for p in (root / "roxford5k" / ".download").iterdir()) == [
        "oxbuild_images-v1.tgz.done"]  # the archive itself is deleted
    assert sorted(p.name for p in (root / "roxford5k").iterdir()) == [
        ".download", "gnd_roxford5k.pkl", "jpg"]

    # A rerun has nothing to do and does not touch the network.
    n = len(server.log)
    dl.download_dataset("roxford5k", root, **FAST)
    assert len(server.log) == n


def test_existing_images_skip_the_archive(server, tmp_path, monkeypatch):
    serve_oxford(server, monkeypatch)
    jpg = tmp_path / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    for n in OX_DB + OX_Q:
        (jpg / f"{n}.jpg").write_bytes(jpeg())
    dl.download_dataset("roxford5k", tmp_path, mirror=server.url, **FAST)
    assert [p for p, _ in server.log] == ["/revisitop/roxford5k/gnd_roxford5k.pkl"]


def test_missing_images_after_extraction_warn(server, tmp_path, monkeypatch):
    serve_oxford(server, monkeypatch)
    server.files["/oxbuildings/oxbuild_images-v1.tgz"] = tar_bytes(
        {f"{n}.jpg": jpeg() for n in OX_DB})  # the queries are missing
    with pytest.warns(UserWarning, match=r"2 image\(s\).*all_souls_000013"):
        dl.download_dataset("roxford5k", tmp_path, mirror=server.url, **FAST)


def test_wrong_gnd_md5_leaves_nothing(server, tmp_path):
    # The real md5 is expected; the server has a fabricated file.
    server.files["/revisitop/roxford5k/gnd_roxford5k.pkl"] = gnd_bytes(OX_DB, OX_Q)
    with pytest.raises(dl.ChecksumError, match=dl.GND_MD5["roxford5k"]):
        dl.download_dataset("roxford5k", tmp_path, mirror=server.url, **FAST)
    assert not any((tmp_path / "roxford5k").iterdir())


def test_truncated_archive_names_url_and_is_deleted(server, tmp_path, monkeypatch):
    serve_oxford(server, monkeypatch)
    path = "/oxbuildings/oxbuild_images-v1.tgz"
    server.files[path] = server.files[path][:-300]  # truncated on the server itself
    with pytest.raises(dl.ArchiveError, match=re.escape(server.url + path)):
        dl.download_dataset("roxford5k", tmp_path, mirror=server.url, **FAST)
    ds_dir = tmp_path / "roxford5k"
    assert sorted(p.name for p in ds_dir.iterdir()) == [".download", "gnd_roxford5k.pkl"]
    assert list((ds_dir / ".download").iterdir()) == []


# A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes writes past ``limit`` bytes of any one
# file fail with EFBIG, as a full disk fails them with ENOSPC; the CLI runs under it in a child.
_LIMITED_CLI = """
import dataclasses, resource, signal, sys
import fastap.download as dl
from fastap.cli import main
limit, gnd_md5, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
spec = dl.DATASETS["roxford5k"]
dl.DATASETS["roxford5k"] = dataclasses.replace(
    spec, index=dataclasses.replace(spec.index, md5=gnd_md5))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(argv))
"""


def test_disk_full_is_one_line_and_the_download_resumes(server, tmp_path, monkeypatch):
    from fastap.cli import main

    gnd = gnd_bytes(OX_DB, OX_Q)
    use_gnd_md5(monkeypatch, "roxford5k", gnd)
    server.files["/revisitop/roxford5k/gnd_roxford5k.pkl"] = gnd
    path = "/oxbuildings/oxbuild_images-v1.tgz"
    argv = ["download", "roxford5k", "--root", str(tmp_path), "--mirror", server.url, "--quiet"]
    work = tmp_path / "roxford5k" / ".download"

    def limited(limit: int) -> list[str]:
        # cwd away from the source tree: `python -c` would import fastap from there, not the
        # installed package (with its compiled kernels).
        proc = subprocess.run([sys.executable, "-c", _LIMITED_CLI, str(limit), md5(gnd), *argv],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        return proc.stderr.strip().splitlines()

    # 1. The disk fills while the (incompressible) archive arrives: the .part file keeps what
    # was written, and the next run asks only for the rest.
    noise = os.urandom(200_000)
    server.files[path] = tar_bytes({f"x/{n}.jpg": jpeg() + noise[:1000] for n in OX_DB + OX_Q}
                                   | {"x/noise.bin": noise})
    part = work / "oxbuild_images-v1.tgz.part"
    assert limited(100_000) == [f"fastap: error: writing {part}: File too large; free space "
                                "and rerun (the download resumes)"]
    assert part.stat().st_size == 100_000
    assert server.files[path].startswith(part.read_bytes())
    assert main(argv) == 0
    assert server.log[-1] == (path, "bytes=100000-")
    assert RevisitedDataset(tmp_path, "roxford5k").missing_images() == []

    # 2. The disk fills while extracting: the archive is kept, nothing half-extracted stays,
    # and the rerun extracts again without downloading.
    (tmp_path / "roxford5k").rename(tmp_path / "first")
    server.files[path] = tar_bytes({f"x/{n}.jpg": jpeg() for n in OX_DB + OX_Q}
                                   | {"x/zeros.jpg": bytes(300_000)})  # compresses well
    (err,) = limited(100_000)
    assert err.startswith("fastap: error: writing ") and "zeros.jpg: File too large; free " \
        "space and rerun (the download resumes)" in err
    assert sorted(p.name for p in work.iterdir()) == ["oxbuild_images-v1.tgz"]
    assert sorted(p.name for p in (tmp_path / "roxford5k").iterdir()) == [
        ".download", "gnd_roxford5k.pkl"]
    server.log.clear()
    assert main(argv) == 0
    assert server.log == []
    assert (tmp_path / "roxford5k" / "jpg" / "zeros.jpg").stat().st_size == 300_000


def test_root_that_is_a_file_is_one_line(tmp_path, capsys):
    from fastap.cli import main

    root = tmp_path / "afile"
    root.write_text("not a folder")
    assert main(["download", "roxford5k", "--root", str(root), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == f"fastap: error: the download root {root} is a file, not a folder\n"
    assert root.read_text() == "not a folder"


PARIS = {"defense": [f"paris_defense_{i:06d}" for i in range(4)],
         "eiffel": [f"paris_eiffel_{i:06d}" for i in range(3)],
         "louvre": [f"paris_louvre_{i:06d}" for i in range(3)]}


def test_rparis6k_two_archives_second_corrupt_then_fixed(server, tmp_path, monkeypatch):
    names = [n for group in PARIS.values() for n in group]
    gnd = gnd_bytes(names[1:], names[:1])
    use_gnd_md5(monkeypatch, "rparis6k", gnd)
    server.files["/revisitop/rparis6k/gnd_rparis6k.pkl"] = gnd
    # paris_1 only under its old name (the -v1 name 404s); nested paris/<landmark>/ folders.
    server.files["/parisbuildings/paris_1.tgz"] = tar_bytes(
        {f"paris/{lm}/{n}.jpg": jpeg() for lm in ("defense", "eiffel") for n in PARIS[lm]})
    good2 = tar_bytes({f"paris/louvre/{n}.jpg": jpeg() for n in PARIS["louvre"]})
    bad2 = bytearray(good2)
    bad2[len(bad2) // 2: len(bad2) // 2 + 40] = bytes(40)
    server.files["/parisbuildings/paris_2-v1.tgz"] = bytes(bad2)

    with pytest.raises(dl.ArchiveError, match="paris_2-v1.tgz"):
        dl.download_dataset("rparis6k", tmp_path, mirror=server.url, **FAST)
    ds_dir = tmp_path / "rparis6k"
    # The first archive's images stay, flattened, with its marker; nothing of the second.
    assert sorted(p.name for p in (ds_dir / "jpg").iterdir()) == sorted(
        f"{n}.jpg" for n in PARIS["defense"] + PARIS["eiffel"])
    assert sorted(p.name for p in (ds_dir / ".download").iterdir()) == ["paris_1-v1.tgz.done"]
    assert sorted(p.name for p in ds_dir.iterdir()) == [".download", "gnd_rparis6k.pkl", "jpg"]

    server.files["/parisbuildings/paris_2-v1.tgz"] = good2
    server.log.clear()
    dl.download_dataset("rparis6k", tmp_path, mirror=server.url, **FAST)
    assert server.log == [("/parisbuildings/paris_2-v1.tgz", None)]
    assert RevisitedDataset(tmp_path, "rparis6k").missing_images() == []


def test_revisitop1m_hundred_archives_keep_subfolders(server, tmp_path):
    names = []
    for i in range(1, 101):
        members = {f"{i % 7}/{i:03d}a.jpg": jpeg(size=(2, 2)), f"{i % 7}/{i:03d}b.jpg": b"x"}
        server.files[f"/revisitop1m/jpg/revisitop1m.{i}.tar.gz"] = tar_bytes(members)
        names += list(members)
    server.files["/revisitop1m/revisitop1m.txt"] = ("\n".join(names) + "\n").encode()
    dl.download_dataset("revisitop1m", tmp_path, mirror=server.url, keep_archives=True, **FAST)

    d = Revisitop1M(tmp_path)
    assert len(d) == 200 and d.missing_images() == []
    assert d.image_path(names[0]) == tmp_path / "revisitop1m" / "jpg" / "1" / "001a.jpg"
    work = tmp_path / "revisitop1m" / ".download"
    assert len(list(work.glob("*.done"))) == 100 and len(list(work.glob("*.tar.gz"))) == 100
    n = len(server.log)
    dl.download_dataset("revisitop1m", tmp_path, mirror=server.url, **FAST)
    assert len(server.log) == n


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="roxford5k"):
        dl.download(["oxford105k"], tmp_path)


def test_default_urls_and_mirror_layout(monkeypatch):
    ox = dl.DATASETS["roxford5k"]
    assert ox.index.urls() == [
        "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"]
    assert ox.archives[0].urls() == [
        "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images.tgz"]
    r1m = dl.DATASETS["revisitop1m"]
    assert len(r1m.archives) == 100 and r1m.archives[41].urls() == [
        "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.42.tar.gz"]
    monkeypatch.setenv(dl.MIRROR_ENV, "http://127.0.0.1:9/m/")
    assert r1m.index.urls() == ["http://127.0.0.1:9/m/revisitop1m/revisitop1m.txt"]
    assert r1m.index.urls(mirror="http://h") == ["http://h/revisitop1m/revisitop1m.txt"]
    assert r1m.index.urls(base_urls={"revisitop1m": "http://x/y"}) == ["http://x/y/revisitop1m.txt"]


@pytest.mark.skipif(not (REAL_GND / "gnd_roxford5k.pkl").exists(),
                    reason="real ground truth not available")
def test_real_roxford5k_ground_truth_end_to_end(server, tmp_path):
    gnd = (REAL_GND / "gnd_roxford5k.pkl").read_bytes()
    assert md5(gnd) == dl.GND_MD5["roxford5k"]
    cfg = pickle.loads(gnd)
    image = jpeg(size=(4, 4))
    server.files["/revisitop/roxford5k/gnd_roxford5k.pkl"] = gnd
    server.files["/oxbuildings/oxbuild_images-v1.tgz"] = tar_bytes(
        {f"{n}.jpg": image for n in cfg["imlist"] + cfg["qimlist"]})
    dl.download_dataset("roxford5k", tmp_path, mirror=server.url, **FAST)
    ds = RevisitedDataset(tmp_path, "roxford5k")
    assert (ds.num_database, ds.num_queries) == (4993, 70) and ds.missing_images() == []


def test_marker_write_error_names_the_file_once(tmp_path, monkeypatch):
    # The .done marker goes through atomic_write (which names the file) and then through the
    # download's own wrapper: the message must name the file and give the hint once.
    import errno

    from fastap import _io, download

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io, "_replace_atomically", full)
    marker = tmp_path / "oxbuild_images-v1.tgz.done"
    with pytest.raises(OSError) as info:
        download._write_marker(marker, {"files": 1})
    expected = (f"writing {marker}: No space left on device; free space and rerun "
                "(the download resumes)")
    assert info.value.errno == errno.ENOSPC and info.value.strerror == expected
    assert str(download._write_error(marker, info.value)) == expected
