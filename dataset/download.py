"""Resumable, MD5-checked file download with nothing beyond the standard library (and rich).

The file is streamed into ``DEST.part`` next to the destination, checked against its MD5 and
only then moved onto ``DEST`` with :func:`os.replace`, so ``DEST`` is either absent, the old
file, or the complete verified new one. An interrupted download leaves the ``.part`` behind;
the next call asks the server for the missing bytes (``Range: bytes=N-``) and starts over when
the server cannot resume. A download holds a lock (``DEST.lock``, see :mod:`dataset.locking`), so
two runs that need the same file at once do not write one ``.part`` together: the second waits
and reuses the file.

Every failure is a :class:`~dataset.errors.DataError` with a one-line message; network failures
say where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from dataset.errors import DataError
from dataset.locking import exclusive_lock

__all__ = ["download", "file_md5"]

_USER_AGENT = "unfreeze-med-downloader/0.1"
_MD5_RE = re.compile(r"[0-9a-f]{32}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# Errors that mean "the network (or the server) let us down", as opposed to a bug.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError)


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex MD5 of a file, read in ``chunk``-byte pieces."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    progress: bool = True,
    timeout: float = 30,
    chunk: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest`` and check its MD5; return ``dest``.

    Args:
        url: an ``http(s)://`` or ``file://`` URL.
        dest: where the file ends up. Its folder is created when missing.
        md5: the expected hex MD5 of the whole file, or ``None`` to skip the check (an existing
            ``dest`` is then taken as it is).
        progress: show a progress bar on stderr.
        timeout: seconds to wait for the connection and for each read before giving up.
        chunk: bytes per read.

    Returns:
        ``dest``. When ``dest`` already exists with the right MD5 nothing is fetched.

    Raises:
        DataError: the download failed (unreachable host, HTTP error, timeout, connection cut;
            the ``.part`` is kept for a later resume) or the downloaded file has the wrong MD5
            (the ``.part`` is deleted). An existing ``dest`` is only replaced by a verified file.
    """
    dest = Path(dest)
    expected = _check_md5(md5, url)
    if _already_there(dest, expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dest.with_name(dest.name + ".lock"), f"downloading {dest.name}"):
        # Another run may have finished the download while this one waited for the lock.
        if _already_there(dest, expected):
            return dest
        return _download(url, dest, expected, progress, timeout, chunk)


def _already_there(dest: Path, expected: str | None) -> bool:
    return dest.is_file() and (expected is None or file_md5(dest) == expected)


def _download(
    url: str, dest: Path, expected: str | None, progress: bool, timeout: float, chunk: int
) -> Path:
    part = dest.with_name(dest.name + ".part")
    resumable = urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")

    # Two attempts at most: a resume the server cannot serve falls back to a fresh download.
    for _ in range(2):
        offset = part.stat().st_size if resumable and part.is_file() else 0
        response = _open(url, offset, timeout, dest, expected)
        if response is None:  # 416: the .part is at least as long as the file
            if expected is not None and file_md5(part) == expected:
                os.replace(part, dest)
                return dest
            part.unlink(missing_ok=True)
            continue
        with response:
            start, total = _plan(response, offset)
            if start is None:  # a 206 for some other range than the one asked for
                part.unlink(missing_ok=True)
                continue
            _stream(response, part, start, total, url, dest, expected, progress, timeout, chunk)
        break
    else:
        raise _network_error(url, dest, expected, "the server could not resume the download")

    if expected is not None:
        actual = file_md5(part)
        if actual != expected:
            part.unlink(missing_ok=True)
            raise DataError(
                url,
                f"MD5 mismatch: expected {expected}, got {actual}; the download was deleted "
                "(a changed file on the server or a broken mirror)",
            )
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------- helpers


def _check_md5(md5: str | None, url: str) -> str | None:
    if md5 is None:
        return None
    value = md5.strip().lower()
    if not _MD5_RE.fullmatch(value):
        raise DataError(url, f"expected MD5 {md5!r} is not 32 hex digits")
    return value


def _network_error(url: str, dest: Path, md5: str | None, reason: str) -> DataError:
    check = f" (md5 {md5})" if md5 else ""
    return DataError(
        url,
        f"could not download ({reason}). Download it by hand and save it as {dest}{check}, "
        "then run the command again.",
    )


def _reason(exc: BaseException, timeout: float) -> str:
    """A short, one-line reason for a failed download."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):
            return str(exc.reason)
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _open(url: str, offset: int, timeout: float, dest: Path, md5: str | None) -> Any:
    """Open ``url``, asking for the bytes from ``offset`` on; ``None`` means HTTP 416."""
    request = urllib.request.Request(
        url, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    )
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return None
        raise _network_error(url, dest, md5, _reason(exc, timeout)) from exc
    except (*_NETWORK_ERRORS, ValueError) as exc:
        raise _network_error(url, dest, md5, _reason(exc, timeout)) from exc


def _plan(response: Any, offset: int) -> tuple[int | None, int | None]:
    """Where to write the body (``None``: unusable) and the full file size (``None``: unknown)."""
    status = getattr(response, "status", None)
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.strip().isdigit() else None
    if status == 206:
        match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != offset:
            return None, None
        size = match.group(3)
        total = int(size) if size != "*" else (offset + length if length is not None else None)
        return offset, total
    # 200 (or a file:// URL, which has no status): the whole file, from the first byte.
    return 0, length


def _progress_bar(name: str, total: int | None, done: int) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    bar.add_task(name, total=total, completed=done)
    return bar


def _stream(
    response: Any,
    part: Path,
    start: int,
    total: int | None,
    url: str,
    dest: Path,
    md5: str | None,
    progress: bool,
    timeout: float,
    chunk: int,
) -> None:
    """Write the body into ``part`` (appending at ``start`` or truncating when 0)."""
    written = start
    bar = _progress_bar(dest.name, total, start) if progress else nullcontext()
    try:
        with bar, open(part, "ab" if start else "wb") as f:
            if start:
                f.truncate(start)
            while block := response.read(chunk):
                f.write(block)
                written += len(block)
                if progress:
                    bar.update(bar.task_ids[0], completed=written)
    except _NETWORK_ERRORS as exc:
        raise _network_error(url, dest, md5, _reason(exc, timeout)) from exc
    if total is not None and written < total:
        raise _network_error(url, dest, md5, f"connection closed after {written} of {total} bytes")
