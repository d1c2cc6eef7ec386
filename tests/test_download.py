"""Tests for dataset.download and dataset.medmnist, against a local HTTP server and file:// URLs.

Nothing here touches the internet: every server binds 127.0.0.1 on a free port and is shut
down in its fixture's finalizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dataset import download as download_module
from dataset.download import download, file_md5
from dataset.errors import DataError
from dataset.locking import exclusive_lock
from dataset.locking import fcntl as _fcntl
from dataset.medmnist import (
    BASE_URL_ENV,
    MEDMNIST,
    OFFICIAL_BASE_URL,
    SIZES,
    fetch,
    parse_name,
    require_single_label,
)

PAYLOAD = bytes(range(256)) * 200 + b"tail"  # 51,204 bytes, not a multiple of the chunk
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
CHUNK = 4096


# --------------------------------------------------------------------------- local server


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from ``server.root``; honours ``Range: bytes=N-`` unless told not to."""

    def do_GET(self) -> None:
        srv = self.server
        header = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.path, header))
        path = srv.root / self.path.split("?", 1)[0].lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", header or "")
        if match and srv.honour_range:
            start, status = int(match.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if srv.cut_after is not None:  # promise the whole body, send a piece, hang up
            body = body[: srv.cut_after]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class LocalServer:
    def __init__(self, root: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
        self.httpd.daemon_threads = True
        self.httpd.root = root
        self.httpd.requests = []
        self.httpd.lock = threading.Lock()
        self.httpd.honour_range = True
        self.httpd.cut_after = None
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.root = root
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        with self.httpd.lock:
            return list(self.httpd.requests)

    def set(self, *, honour_range: bool | None = None, cut_after: int | None = -1) -> None:
        if honour_range is not None:
            self.httpd.honour_range = honour_range
        if cut_after != -1:
            self.httpd.cut_after = cut_after

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "data.bin").write_bytes(PAYLOAD)
    srv = LocalServer(root)
    yield srv
    srv.close()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port that accepts connections (kernel backlog) but never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    yield s.getsockname()[1]
    s.close()


def _get(url: str, dest: Path, md5: str | None = PAYLOAD_MD5, **kw) -> Path:
    kw.setdefault("progress", False)
    kw.setdefault("chunk", CHUNK)
    kw.setdefault("timeout", 5)
    return download(url, dest, md5, **kw)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------- download


def test_downloads_verifies_and_reuses_the_cached_file(server, tmp_path):
    dest = tmp_path / "out" / "data.bin"
    assert _get(f"{server.url}/data.bin", dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    assert server.requests == [("/data.bin", None)]

    assert _get(f"{server.url}/data.bin", dest) == dest
    assert len(server.requests) == 1  # no second request


def test_progress_bar_runs(server, tmp_path, capsys):
    dest = tmp_path / "data.bin"
    _get(f"{server.url}/data.bin", dest, progress=True)
    assert dest.read_bytes() == PAYLOAD
    assert "data.bin" in capsys.readouterr().err


def test_without_md5_downloads_and_trusts_an_existing_file(server, tmp_path):
    dest = tmp_path / "data.bin"
    _get(f"{server.url}/data.bin", dest, md5=None)
    assert dest.read_bytes() == PAYLOAD
    _get(f"{server.url}/data.bin", dest, md5=None)
    assert len(server.requests) == 1


def test_resume_asks_for_the_rest(server, tmp_path):
    dest = tmp_path / "data.bin"
    half = len(PAYLOAD) // 2
    _part(dest).write_bytes(PAYLOAD[:half])
    _get(f"{server.url}/data.bin", dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", f"bytes={half}-")]
    assert not _part(dest).exists()


def test_resume_against_a_server_without_range_support_restarts(server, tmp_path):
    server.set(honour_range=False)
    dest = tmp_path / "data.bin"
    _part(dest).write_bytes(PAYLOAD[:1000] + b"garbage")
    _get(f"{server.url}/data.bin", dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", "bytes=1007-")]


def test_complete_part_is_finished_on_416(server, tmp_path):
    dest = tmp_path / "data.bin"
    _part(dest).write_bytes(PAYLOAD)
    _get(f"{server.url}/data.bin", dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]


def test_oversized_part_restarts_cleanly(server, tmp_path):
    dest = tmp_path / "data.bin"
    _part(dest).write_bytes(PAYLOAD + b"extra bytes")
    _get(f"{server.url}/data.bin", dest)
    assert dest.read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == [f"bytes={len(PAYLOAD) + 11}-", None]


def test_md5_mismatch_names_url_and_both_md5s_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "data.bin"
    wrong = "0" * 32
    url = f"{server.url}/data.bin"
    with pytest.raises(DataError) as info:
        _get(url, dest, md5=wrong)
    message = str(info.value)
    assert url in message and wrong in message and PAYLOAD_MD5 in message
    assert "\n" not in message
    assert not dest.exists() and not _part(dest).exists()


def test_existing_file_with_wrong_md5_is_replaced(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"stale")
    _get(f"{server.url}/data.bin", dest)
    assert dest.read_bytes() == PAYLOAD


def test_existing_file_is_kept_when_the_new_download_fails(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"stale")
    with pytest.raises(DataError):
        _get(f"{server.url}/missing.bin", dest)
    assert dest.read_bytes() == b"stale"


def test_http_error_is_a_one_line_data_error(server, tmp_path):
    dest = tmp_path / "missing.bin"
    with pytest.raises(DataError) as info:
        _get(f"{server.url}/missing.bin", dest)
    message = str(info.value)
    assert "HTTP 404" in message and str(dest) in message and "\n" not in message


def test_unreachable_host_fails_fast_and_says_where_to_put_the_file(closed_port, tmp_path):
    dest = tmp_path / "data.bin"
    _part(dest).write_bytes(b"partial")
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        _get(f"http://127.0.0.1:{closed_port}/data.bin", dest, timeout=1)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "\n" not in message
    assert "could not download" in message
    assert f"save it as {dest}" in message and PAYLOAD_MD5 in message
    assert _part(dest).read_bytes() == b"partial"  # kept for a later resume
    assert not dest.exists()


def test_silent_server_times_out(silent_port, tmp_path):
    dest = tmp_path / "data.bin"
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        _get(f"http://127.0.0.1:{silent_port}/data.bin", dest, timeout=0.5)
    assert time.monotonic() - started < 5
    assert "no answer within 0.5 s" in str(info.value)
    assert str(dest) in str(info.value)


def test_connection_cut_mid_way_leaves_only_the_part_then_resumes(server, tmp_path):
    dest = tmp_path / "data.bin"
    server.set(cut_after=10_000)
    with pytest.raises(DataError) as info:
        _get(f"{server.url}/data.bin", dest)
    assert "\n" not in str(info.value) and str(dest) in str(info.value)
    assert not dest.exists()
    assert _part(dest).read_bytes() == PAYLOAD[:10_000]

    server.set(cut_after=None)
    _get(f"{server.url}/data.bin", dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/data.bin", "bytes=10000-")


def test_reader_raising_mid_way_leaves_no_dest(server, tmp_path, monkeypatch):
    real_open = download_module._open

    def flaky_open(*args, **kwargs):
        response = real_open(*args, **kwargs)
        real_read, calls = response.read, []

        def read(n=-1):
            calls.append(n)
            if len(calls) > 2:
                raise ConnectionResetError(104, "Connection reset by peer")
            return real_read(n)

        response.read = read
        return response

    monkeypatch.setattr(download_module, "_open", flaky_open)
    dest = tmp_path / "data.bin"
    with pytest.raises(DataError, match="Connection reset by peer"):
        _get(f"{server.url}/data.bin", dest)
    assert not dest.exists()
    assert _part(dest).read_bytes() == PAYLOAD[: 2 * CHUNK]


def test_file_url(tmp_path):
    src = tmp_path / "src" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "data.bin"
    _part(dest).parent.mkdir()
    _part(dest).write_bytes(b"old partial bytes")  # no resume over file://: restart
    assert _get(src.as_uri(), dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()


@pytest.mark.skipif(_fcntl is None, reason="no file lock without fcntl (Windows)")
def test_second_download_waits_for_the_lock_then_reuses_the_file(server, tmp_path, capfd):
    dest = tmp_path / "out" / "data.bin"
    dest.parent.mkdir()
    result = {}
    # The test holds the lock as another process downloading data.bin would.
    with exclusive_lock(dest.with_name("data.bin.lock"), "held by the test"):
        waiter = threading.Thread(
            target=lambda: result.update(path=_get(f"{server.url}/data.bin", dest))
        )
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not dest.exists() and not _part(dest).exists()
        dest.write_bytes(PAYLOAD)  # the other process finishes its download
    waiter.join(timeout=30)
    assert result["path"] == dest and dest.read_bytes() == PAYLOAD
    assert server.requests == []  # the file was reused, not fetched again
    assert "waiting for another process that is downloading data.bin" in capfd.readouterr().err


def test_missing_file_url_is_a_data_error(tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(DataError, match="could not download"):
        _get((tmp_path / "nope.bin").as_uri(), dest)


def test_bad_md5_argument(tmp_path):
    with pytest.raises(DataError, match="32 hex digits"):
        _get("file:///nowhere", tmp_path / "x", md5="abc")


def test_file_md5(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    assert file_md5(path, chunk=1000) == PAYLOAD_MD5


# --------------------------------------------------------------------------- medmnist


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bloodmnist", ("bloodmnist", 28)),
        ("BloodMNIST", ("bloodmnist", 28)),
        ("bloodmnist_64", ("bloodmnist", 64)),
        ("bloodmnist64", ("bloodmnist", 64)),
        ("OrganAMNIST_224", ("organamnist", 224)),
        ("pathmnist-128", ("pathmnist", 128)),
        ("chestmnist_28", ("chestmnist", 28)),
        ("mnist", None),
        ("fashionmnist", None),
        ("organmnist3d", None),
        ("cifar10", None),
        ("data/bloodmnist.npz", None),
    ],
)
def test_parse_name(name, expected):
    assert parse_name(name) == expected


@pytest.mark.parametrize("name", ["bloodmnist_32", "bloodmnist32", "dermamnist_256"])
def test_parse_name_rejects_other_sizes(name):
    with pytest.raises(DataError, match="28, 64, 128, 224"):
        parse_name(name)


def test_table_is_complete():
    expected_classes = {
        "pathmnist": 9,
        "chestmnist": 14,
        "dermamnist": 7,
        "octmnist": 4,
        "pneumoniamnist": 2,
        "retinamnist": 5,
        "breastmnist": 2,
        "bloodmnist": 8,
        "tissuemnist": 8,
        "organamnist": 11,
        "organcmnist": 11,
        "organsmnist": 11,
    }
    rgb = {"pathmnist", "dermamnist", "retinamnist", "bloodmnist"}
    assert set(MEDMNIST) == set(expected_classes)
    all_md5 = []
    for flag, info in MEDMNIST.items():
        assert info.flag == flag
        assert len(info.class_names) == expected_classes[flag]
        assert info.n_channels == (3 if flag in rgb else 1)
        assert set(info.urls) == set(info.md5) == set(SIZES)
        for size in SIZES:
            suffix = "" if size == 28 else f"_{size}"
            assert info.urls[size] == f"{OFFICIAL_BASE_URL}/{flag}{suffix}.npz?download=1"
            assert info.filename(size) == f"{flag}{suffix}.npz"
            assert re.fullmatch(r"[0-9a-f]{32}", info.md5[size])
            all_md5.append(info.md5[size])
        assert set(info.n_samples) == {"train", "val", "test"}
        assert info.multi_label == (flag == "chestmnist")
    assert len(set(all_md5)) == len(all_md5) == 48


def test_known_official_values():
    blood = MEDMNIST["bloodmnist"]
    assert blood.urls[28] == "https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1"
    assert blood.md5[28] == "7053d0359d879ad8a5505303e11de1dc"
    assert blood.md5[224] == "b718ff6835fcbdb22ba9eacccd7b2601"
    assert blood.task == "multi-class"
    assert MEDMNIST["chestmnist"].task == "multi-label, binary-class"
    assert MEDMNIST["retinamnist"].task == "ordinal-regression"


def test_require_single_label():
    assert require_single_label("BloodMNIST").flag == "bloodmnist"
    with pytest.raises(DataError, match="multi-label"):
        require_single_label("chestmnist")
    with pytest.raises(DataError, match="not a MedMNIST"):
        require_single_label("cifar10")


def _fake_npz(path: Path) -> str:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 255, (4, 28, 28, 3), dtype=np.uint8),
        train_labels=np.arange(4).reshape(4, 1),
    )
    return file_md5(path)


def _patch_md5(monkeypatch, flag: str, size: int, md5: str) -> None:
    info = MEDMNIST[flag]
    monkeypatch.setitem(MEDMNIST, flag, dataclasses.replace(info, md5={**info.md5, size: md5}))


def test_fetch_from_a_mirror(server, tmp_path, monkeypatch):
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    md5 = _fake_npz(server.root / "bloodmnist.npz")
    _patch_md5(monkeypatch, "bloodmnist", 28, md5)
    root = tmp_path / "data"
    path = fetch("BloodMNIST", 28, root, progress=False, base_url=server.url + "/")
    assert path == root / "_downloads" / "bloodmnist.npz"
    assert file_md5(path) == md5
    assert server.requests == [("/bloodmnist.npz", None)]
    fetch("bloodmnist", 28, root, progress=False, base_url=server.url)
    assert len(server.requests) == 1  # cached


def test_fetch_from_env_file_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    md5 = _fake_npz(mirror / "dermamnist_64.npz")
    _patch_md5(monkeypatch, "dermamnist", 64, md5)
    monkeypatch.setenv(BASE_URL_ENV, mirror.as_uri())
    path = fetch("dermamnist", 64, tmp_path / "data", progress=False)
    assert path == tmp_path / "data" / "_downloads" / "dermamnist_64.npz"


def test_fetch_keeps_the_official_md5_check(server, tmp_path, monkeypatch):
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    _fake_npz(server.root / "bloodmnist.npz")
    with pytest.raises(DataError, match=MEDMNIST["bloodmnist"].md5[28]):
        fetch("bloodmnist", 28, tmp_path, progress=False, base_url=server.url)
    assert not (tmp_path / "_downloads" / "bloodmnist.npz").exists()


def test_fetch_rejects_bad_flag_and_size(tmp_path):
    with pytest.raises(DataError, match="not a MedMNIST"):
        fetch("cifar10", 28, tmp_path, progress=False)
    with pytest.raises(DataError, match="28, 64, 128, 224"):
        fetch("bloodmnist", 32, tmp_path, progress=False)
