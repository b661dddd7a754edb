"""Downloads against a loopback server: resume, restarts, verification, errors and retries."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
from http_server import LoopbackServer, closed_port, hang_up_server, http_server  # noqa: F401 - fixture import

from gsm.data.download import fetch
from gsm.data.sources import DEFAULT_SOURCES, Source, require_url, sources_from_dict

BODY = os.urandom(300_000) + b"tail"  # big enough that a drop at 100 kB leaves real work to resume
SHA = hashlib.sha256(BODY).hexdigest()
MD5 = hashlib.md5(BODY).hexdigest()

FAST = {"retries": 2, "backoff": 0.01, "timeout": 5, "progress": False}


def _source(server: LoopbackServer, **kw: object) -> Source:
    server.files["data/archive.zip"] = BODY
    return Source("demo", server.url("data/archive.zip"), **kw)  # type: ignore[arg-type]


def test_full_download_with_checksums(http_server: LoopbackServer, tmp_path: Path) -> None:
    out = fetch(_source(http_server, size=len(BODY), sha256=SHA, md5=MD5), tmp_path, **FAST)
    assert out == tmp_path / "archive.zip"
    assert out.read_bytes() == BODY
    assert not (tmp_path / "archive.zip.part").exists()
    assert [r.range for r in http_server.requests] == [None]


def test_resume_after_dropped_connection(http_server: LoopbackServer, tmp_path: Path) -> None:
    http_server.drop_after = 100_000
    out = fetch(_source(http_server, sha256=SHA), tmp_path, **FAST)
    assert out.read_bytes() == BODY
    first, second = http_server.requests
    assert first.range is None and first.status == 200
    assert second.range == "bytes=100000-" and second.status == 206


def test_resume_from_existing_part(http_server: LoopbackServer, tmp_path: Path) -> None:
    (tmp_path / "archive.zip.part").write_bytes(BODY[:1234])
    out = fetch(_source(http_server, size=len(BODY), sha256=SHA), tmp_path, **FAST)
    assert out.read_bytes() == BODY
    assert [r.range for r in http_server.requests] == ["bytes=1234-"]


def test_complete_part_without_size_gets_416_and_verifies(http_server: LoopbackServer, tmp_path: Path) -> None:
    (tmp_path / "archive.zip.part").write_bytes(BODY)
    out = fetch(_source(http_server, sha256=SHA), tmp_path, **FAST)
    assert out.read_bytes() == BODY
    assert [r.status for r in http_server.requests] == [416]


def test_oversized_part_restarts(http_server: LoopbackServer, tmp_path: Path) -> None:
    (tmp_path / "archive.zip.part").write_bytes(BODY + b"junk")
    out = fetch(_source(http_server, size=len(BODY)), tmp_path, **FAST)
    assert out.read_bytes() == BODY
    assert [r.range for r in http_server.requests] == [None]


def test_server_ignoring_range_restarts_from_zero(http_server: LoopbackServer, tmp_path: Path) -> None:
    http_server.ignore_range = True
    http_server.drop_after = 50_000
    out = fetch(_source(http_server, sha256=SHA), tmp_path, **FAST)
    assert out.read_bytes() == BODY
    assert [(r.range, r.status) for r in http_server.requests] == [(None, 200), ("bytes=50000-", 200)]


def test_checksum_mismatch(http_server: LoopbackServer, tmp_path: Path) -> None:
    http_server.wrong_bytes = True
    source = _source(http_server, sha256=SHA)
    pattern = r"^demo: checksum mismatch \(sha256 expected [0-9a-f]{64}, got [0-9a-f]{64}\) for "
    with pytest.raises(ValueError, match=pattern) as err:
        fetch(source, tmp_path, **FAST)
    assert source.url in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch_announced_by_server(http_server: LoopbackServer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size mismatch"):
        fetch(_source(http_server, size=len(BODY) + 1), tmp_path, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_404_is_one_line_and_not_retried(http_server: LoopbackServer, tmp_path: Path) -> None:
    source = Source("demo", http_server.url("missing.zip"))
    with pytest.raises(FileNotFoundError) as err:
        fetch(source, tmp_path, **FAST)
    assert str(err.value) == f"demo: not found (HTTP 404) at {source.url}"
    assert len(http_server.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_5xx_is_retried(http_server: LoopbackServer, tmp_path: Path) -> None:
    http_server.fail_once = 503
    out = fetch(_source(http_server, sha256=SHA), tmp_path, **FAST)
    assert out.read_bytes() == BODY
    assert [r.status for r in http_server.requests] == [503, 200]


def test_refused_connection_retries_then_fails(tmp_path: Path) -> None:
    port = closed_port()
    source = Source("demo", f"http://127.0.0.1:{port}/a.zip")
    with pytest.raises(ConnectionError) as err:
        fetch(source, tmp_path, **FAST)
    assert str(err.value).startswith(f"demo: cannot connect to 127.0.0.1:{port} (")
    assert str(err.value).endswith("after 3 attempts")
    assert not (tmp_path / "a.zip").exists()


def test_idempotent_second_fetch_makes_no_request(http_server: LoopbackServer, tmp_path: Path) -> None:
    source = _source(http_server, sha256=SHA)
    fetch(source, tmp_path, **FAST)
    fetch(source, tmp_path, **FAST)
    assert len(http_server.requests) == 1
    # Without any checksum the existing file is trusted as is.
    bare = Source("demo", source.url)
    fetch(bare, tmp_path, **FAST)
    assert len(http_server.requests) == 1


def test_wrong_checksum_keeps_the_file_on_disk(
    http_server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A finished archive that no longer matches params is kept and named with what it has."""
    out = fetch(_source(http_server, sha256=SHA), tmp_path, **FAST)
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        fetch(_source(http_server, sha256=wrong), tmp_path, **FAST)
    assert str(err.value) == (f"demo: {out} (kept) has sha256 {SHA}, not sources.demo.sha256 {wrong}: correct the "
                              "sha256 in params.yaml, or delete the file to download it again")  # fmt: skip
    with pytest.raises(ValueError, match=rf"has size {len(BODY)}, not sources\.demo\.size 5:"):
        fetch(_source(http_server, size=5), tmp_path, **FAST)
    assert out.read_bytes() == BODY and len(http_server.requests) == 1
    import gsm.data.download as download

    monkeypatch.setattr(download, "_hash", lambda *a: pytest.fail("hashed again"))
    assert fetch(_source(http_server, md5=MD5), tmp_path, **FAST) == out  # its record holds the digests


@pytest.mark.parametrize("as_url", [True, False])
def test_local_sources(tmp_path: Path, as_url: bool) -> None:
    src = tmp_path / "mirror" / "vid4.zip"
    src.parent.mkdir()
    src.write_bytes(BODY)
    url = src.as_uri() if as_url else str(src)
    out = fetch(Source("vid4_gt", url, sha256=SHA), tmp_path / "dl", **FAST)
    assert out == tmp_path / "dl" / "vid4.zip" and out.read_bytes() == BODY
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch(Source("vid4_gt", url, md5="0" * 32, dest="other.zip"), tmp_path / "dl", **FAST)
    assert not (tmp_path / "dl" / "other.zip").exists() and not (tmp_path / "dl" / "other.zip.part").exists()
    with pytest.raises(FileNotFoundError, match="vid4_gt: not found at"):
        fetch(Source("vid4_gt", str(tmp_path / "nope.zip")), tmp_path / "dl", **FAST)


def test_sources_defaults_and_overrides() -> None:
    assert require_url(DEFAULT_SOURCES["reds_train_sharp"]).endswith("/REDS/train_sharp.zip")
    assert DEFAULT_SOURCES["reds_val_sharp_bicubic"].filename == "val_sharp_bicubic.zip"
    with pytest.raises(ValueError, match=r"^source vid4_gt has no URL: set sources.vid4_gt.url in params.yaml$"):
        fetch(DEFAULT_SOURCES["vid4_gt"], Path("/nonexistent"))
    merged = sources_from_dict({"vid4_gt": {"url": "/data/vid4/GT.zip", "md5": "A" * 32}, "vid4_bix4": None})
    assert merged["vid4_gt"].url == "/data/vid4/GT.zip" and merged["vid4_gt"].md5 == "a" * 32
    assert merged["reds_val_sharp"] == DEFAULT_SOURCES["reds_val_sharp"]
    with pytest.raises(ValueError, match=r"sources\.vid4_gt\.sha1"):
        sources_from_dict({"vid4_gt": {"sha1": "x"}})
    with pytest.raises(ValueError, match=r"sources\.reds_test"):
        sources_from_dict({"reds_test": {"url": "x"}})
    with pytest.raises(ValueError, match=r"sources\.vid4_gt\.md5"):
        sources_from_dict({"vid4_gt": {"md5": 12345}})
    with pytest.raises(ValueError, match=r"sources\.vid4_gt\.dest"):
        sources_from_dict({"vid4_gt": {"dest": "../x.zip"}})


def test_silent_server_times_out_and_is_retried(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections are queued but never answered
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/a.zip"
        with pytest.raises(ConnectionError, match=r"^demo: download from .* failed \(timed out\) after 2 attempts$"):
            fetch(Source("demo", url), tmp_path, retries=1, backoff=0.01, timeout=0.2, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", ["refused", "closed at 0 bytes"])
def test_gsm_download_network_faults_are_one_line(tmp_path: Path, fault: str) -> None:
    import yaml
    from typer.testing import CliRunner

    from gsm.cli import app

    srv = None
    if fault == "refused":
        port = closed_port()
    else:
        srv, port = hang_up_server()
    url = f"http://127.0.0.1:{port}/a.zip"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "data"), "download_retries": 1},
                                      "sources": {"reds_val_sharp": {"url": url}}}))  # fmt: skip
    try:
        r = CliRunner().invoke(app, ["download", "reds_val_sharp", "--params", str(params), "--no-progress"])
    finally:
        if srv is not None:
            srv.close()
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: reds_val_sharp: "), r.output
    assert f"127.0.0.1:{port}" in lines[0] and lines[0].endswith("after 2 attempts")
    assert not list((tmp_path / "data").rglob("a.zip"))
