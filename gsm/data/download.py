"""Resumable, verified downloads: the dataset archives are tens of GB on slow academic servers.

Bytes arrive in ``<final>.part``; only a file that passes the size and checksum checks is renamed
(atomically) to its final name, so a final name on disk always means "complete". When a source
has neither size nor checksum, nothing can be checked and an existing final file is trusted (if
it came from the same URL).

Transient failures (cannot connect, timeouts, HTTP 5xx/408/429, a connection dropped mid-body)
are retried with exponential back-off and resume from the bytes already received; an attempt that
extends the partial file past its previous high-water mark does not count against ``retries``.
Other HTTP errors fail at once. ``file://`` URLs and plain paths are copied through the same
verify-then-rename path.

Every finished file gets a record beside it (``<file>.digest``: size, mtime, sha256, md5, URL),
written from the bytes just verified. Extractions are tied to that sha256, so a new archive under
an old name is extracted again, and an extraction stays valid after its archive is deleted.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from gsm.data.sources import Source, require_url
from gsm.io import atomic_write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
DIGEST_SUFFIX = ".digest"  # <archive>.digest: JSON of its size, mtime, sha256, md5 and URL
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_RETRY_STATUS = {408, 429}  # 4xx codes that mean "try again later", not "wrong request"


class _Transient(Exception):
    """An attempt failed in a way that another attempt may fix; ``connect`` = never reached the server."""

    def __init__(self, reason: str, connect: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connect = connect


class RetriesExhausted(ConnectionError):
    """Every attempt failed transiently; ``reason`` and ``attempts`` let other callers (SpyNet
    weights) word their own one-line message around the same retry loop."""

    def __init__(self, message: str, url: str, reason: str, attempts: int) -> None:
        super().__init__(message)
        self.url = url
        self.reason = reason
        self.attempts = attempts


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _hash(path: Path, progress: bool) -> dict[str, Any]:
    """Size, mtime and both digests of a file, in one read."""
    st = path.stat()
    hashers = {a: hashlib.new(a) for a in ("sha256", "md5")}
    with open(path, "rb") as f, tqdm(
        total=st.st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"digest {path.name}",
        disable=not progress, leave=False,
    ) as bar:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
            bar.update(len(chunk))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **{a: h.hexdigest() for a, h in hashers.items()}}


def record_path(path: Path) -> Path:
    """Where a downloaded file's digest record lives: beside it."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def digest_record(path: Path, *, url: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``path``'s size, sha256, md5 and source URL, from its record while size and mtime still
    match it (an 82 GB archive is hashed once, not on every run), else computed and recorded."""
    path = Path(path)
    st = path.stat()
    try:
        rec = json.loads(record_path(path).read_text())
        if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return rec
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        pass
    return _write_record(path, _hash(path, progress), url)


def _write_record(path: Path, rec: dict[str, Any], url: str | None) -> dict[str, Any]:
    rec = {**rec, "url": url}
    atomic_write_json(record_path(path), rec)
    return rec


def _mismatch(rec: dict[str, Any], source: Source) -> str | None:
    """Why the file ``rec`` describes is not ``source``'s archive, or None when every known check passes."""
    if source.size is not None and rec["size"] != source.size:
        return f"size mismatch (expected {source.size} bytes, got {rec['size']})"
    for algo in ("sha256", "md5"):
        expected = getattr(source, algo)
        if expected and rec[algo] != expected:
            return f"checksum mismatch ({algo} expected {expected}, got {rec[algo]})"
    return None


def _verify_on_disk(final: Path, source: Source, url: str, progress: bool) -> None:
    """A finished file verified once, so a mismatch now is as likely a wrong checksum in params as
    a damaged file: it is kept (an 82 GB archive), and the error says what it has."""
    rec = digest_record(final, url=url, progress=progress)
    for key in ("size", "sha256", "md5"):
        expected = getattr(source, key)
        if expected is not None and rec[key] != expected:
            raise ValueError(
                f"{source.name}: {final} (kept) has {key} {rec[key]}, not sources.{source.name}.{key} {expected}: "
                f"correct the {key} in params.yaml, or delete the file to download it again"
            )


def check_source(source: Source) -> None:
    """A one-line error naming the key when ``source`` cannot be fetched as set (no URL, unknown
    scheme, a local mirror file missing): run before the first byte, not after 100 GB."""
    url = require_url(source)
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("file", ""):
        path = _local_path(url)
        if not path.is_file():
            raise FileNotFoundError(f"{source.name}: no file at {path} (sources.{source.name}.url)")
    elif scheme not in ("http", "https"):
        raise ValueError(f"{source.name}: unsupported URL scheme {scheme!r} in sources.{source.name}.url")


def _finish(part: Path, final: Path, source: Source, url: str, progress: bool) -> None:
    rec = _hash(part, progress)
    problem = _mismatch(rec, source)
    if problem is not None:
        part.unlink(missing_ok=True)  # wrong bytes: resuming from them could never verify
        raise ValueError(f"{source.name}: {problem} for {url}")
    os.replace(part, final)  # keeps the mtime: the record stays valid
    _write_record(final, rec, url)


def fetch(
    source: Source,
    dest_dir: Path,
    *,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Download (or copy) ``source`` into ``dest_dir`` and return the verified file's path.

    Idempotent: a final file that verifies is returned without any request; one that does not is
    kept and named in the error (the params may be what is wrong). Without size or checksum a final
    file is trusted, unless its record says it came from another URL. ``retries`` counts attempts
    after the first.
    """
    url = require_url(source)
    if retries < 0 or backoff < 0 or timeout <= 0:
        raise ValueError(f"{source.name}: retries and backoff must be >= 0 and timeout > 0")
    dest_dir = Path(dest_dir)
    final = dest_dir / source.filename
    part = final.with_name(final.name + ".part")
    if final.is_file():
        if not _checked(source):
            if _same_url(final, source, url):
                return final  # nothing to check: the file on disk is trusted
        else:
            _verify_on_disk(final, source, url, progress)
            return final
    dest_dir.mkdir(parents=True, exist_ok=True)
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("http", "https"):
        _download(source, url, part, retries=retries, backoff=backoff, timeout=timeout, progress=progress)
    elif scheme in ("file", ""):
        _copy_local(source, url, part, progress)
    else:
        raise ValueError(f"{source.name}: unsupported URL scheme {scheme!r} in {url}")
    _finish(part, final, source, url, progress)
    return final


def _same_url(final: Path, source: Source, url: str) -> bool:
    """Whether an unchecked file on disk came from ``url`` (or nobody recorded where it came from).
    Another URL under the same file name means other bytes were asked for: fetch them, and let
    the new file replace the old one only once it is complete."""
    try:
        recorded = json.loads(record_path(final).read_text()).get("url")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return True
    if recorded in (None, url):
        return True
    log.info("%s: %s came from %s, sources.%s.url is now %s: downloading again", source.name, final, recorded,
             source.name, url)  # fmt: skip
    return False


def _checked(source: Source) -> bool:
    """Whether anything about ``source``'s bytes is known; without it a file on disk is trusted."""
    return source.size is not None or bool(source.sha256) or bool(source.md5)


def _local_path(url: str) -> Path:
    if "://" not in url:
        return Path(url).expanduser()
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URL {url} names a remote host {parts.netloc!r}")
    return Path(urllib.request.url2pathname(parts.path))


def _copy_local(source: Source, url: str, part: Path, progress: bool) -> None:
    src = _local_path(url)
    if not src.is_file():
        raise FileNotFoundError(f"{source.name}: not found at {src}")
    total = src.stat().st_size
    with open(src, "rb") as fin, open(part, "wb") as fout, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=source.name, disable=not progress,
    ) as bar:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            bar.update(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())


def _download(
    source: Source, url: str, part: Path, *, retries: int, backoff: float, timeout: float, progress: bool
) -> None:
    split = urlsplit(url)
    host = split.hostname or ""
    port = split.port or (443 if split.scheme.lower() == "https" else 80)
    # Loopback never goes through a proxy: an environment proxy must not see local test traffic.
    handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
    opener = urllib.request.build_opener(*handlers)
    failures = 0
    high_water = _size(part)
    with tqdm(
        total=source.size, unit="B", unit_scale=True, unit_divisor=1024, desc=source.name, disable=not progress,
    ) as bar:
        while True:
            try:
                if _attempt(opener, source, url, part, timeout, bar):
                    return
                continue  # the partial file was unusable and is gone: start over at once
            except _Transient as exc:
                if _size(part) > high_water:  # progress made: the connection is flaky, not dead
                    high_water = _size(part)
                    failures = 0
                failures += 1
                if failures > retries:
                    what = f"cannot connect to {host}:{port}" if exc.connect else f"download from {url} failed"
                    message = f"{source.name}: {what} ({exc.reason}) after {failures} attempts"
                    raise RetriesExhausted(message, url, exc.reason, failures) from None
                time.sleep(backoff * 2 ** (failures - 1))


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) from a Content-Range header; None where absent or '*'."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return first, total


def _attempt(
    opener: urllib.request.OpenerDirector, source: Source, url: str, part: Path, timeout: float, bar: tqdm
) -> bool:
    """One request. True: ``part`` holds the whole body; False: ``part`` was discarded, go again."""
    offset = _size(part)
    if source.size is not None and offset > source.size:
        part.unlink()
        offset = 0
    if source.size is not None and offset == source.size and offset > 0:
        return True
    headers = {"User-Agent": "gsm-vsr", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        code, msg, reply_headers = exc.code, exc.reason, exc.headers
        exc.close()
        if code == 416 and offset:
            _, total = _content_range(reply_headers.get("Content-Range"))
            if total == offset:
                return True
            part.unlink(missing_ok=True)
            return False
        if code in (404, 410):
            raise FileNotFoundError(f"{source.name}: not found (HTTP {code}) at {url}") from None
        if code in (401, 403):
            raise PermissionError(f"{source.name}: access denied (HTTP {code}) at {url}") from None
        if code >= 500 or code in _RETRY_STATUS:
            raise _Transient(f"HTTP {code} {msg}") from None
        raise RuntimeError(f"{source.name}: HTTP {code} {msg} at {url}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise _Transient(_reason(reason) if isinstance(reason, BaseException) else str(reason), connect=True) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(_reason(exc)) from None

    with response:
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:  # not the range asked for: the partial file cannot be continued
                part.unlink(missing_ok=True)
                raise _Transient(f"server answered Range bytes={offset}- with {first}")
            mode = "ab"
        else:  # 200: the server ignored Range (or none was sent); start over from byte 0
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if source.size is not None and total is not None and total != source.size:
            part.unlink(missing_ok=True)
            raise ValueError(
                f"{source.name}: size mismatch (expected {source.size} bytes, server has {total}) for {url}"
            )
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if bar.total is None and total is not None:
            bar.total = total
        bar.reset(total=bar.total)
        bar.update(offset)
        received = 0
        with open(part, mode) as out:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"connection dropped after {offset + received} bytes: {_reason(exc)}") from None
            finally:
                out.flush()
                os.fsync(out.fileno())
        if expected is not None and received < expected:
            raise _Transient(f"connection closed after {received} of {expected} bytes")
    return True
