"""SpyNet layout, checkpoint loading (path / file:// / loopback HTTP) and shapes.

Flow quality needs the real trained weights and is deliberately not tested here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from http_server import LoopbackServer, closed_port, hang_up_server, http_server  # noqa: F401 - fixture import

import gsm.ops.spynet as spynet_mod
from gsm.ops.spynet import SpyNet, compute_flows


def _random_spynet() -> SpyNet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SpyNet()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_params(a: SpyNet, b: SpyNet) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def source() -> SpyNet:
    torch.manual_seed(0)
    return _random_spynet()


@pytest.fixture()
def ckpt(tmp_path: Path, source: SpyNet) -> Path:
    """BasicSR-format checkpoint whose name carries its own hash prefix."""
    raw = tmp_path / "raw.pth"
    torch.save({"params": source.state_dict()}, raw)
    named = tmp_path / f"spynet_test-{_sha256(raw)[:8]}.pth"
    raw.rename(named)
    return named


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_parameter_count_and_keys(source: SpyNet) -> None:
    assert sum(p.numel() for p in source.parameters()) == 6 * 240_050 == 1_440_300
    keys = set(source.state_dict())
    expected = {
        f"basic_module.{lvl}.basic_module.{i}.{kind}"
        for lvl in range(6)
        for i in (0, 2, 4, 6, 8)
        for kind in ("weight", "bias")
    }
    assert keys == expected


def test_warns_without_weights() -> None:
    with pytest.warns(UserWarning, match="randomly initialised"):
        SpyNet()


def test_load_by_path_and_file_url(ckpt: Path, source: SpyNet) -> None:
    _assert_same_params(SpyNet(str(ckpt)), source)
    _assert_same_params(SpyNet(ckpt.as_uri()), source)
    _assert_same_params(SpyNet(ckpt, sha256=_sha256(ckpt)), source)


def test_load_plain_and_state_dict_formats(tmp_path: Path, source: SpyNet) -> None:
    plain = tmp_path / "plain.pth"
    torch.save(source.state_dict(), plain)
    _assert_same_params(SpyNet(plain), source)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": source.state_dict()}, wrapped)
    _assert_same_params(SpyNet(wrapped), source)


def test_load_over_http_and_cache(
    ckpt: Path, source: SpyNet, http_root: tuple[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GSM_CACHE", str(cache))
    base, root = http_root
    (root / ckpt.name).write_bytes(ckpt.read_bytes())
    url = f"{base}/{ckpt.name}"
    _assert_same_params(SpyNet(url), source)
    assert (cache / ckpt.name).is_file()
    assert [p.name for p in cache.iterdir()] == [ckpt.name]  # no temp files left behind
    # A verified cache entry is reused without touching the server.
    (root / ckpt.name).unlink()
    _assert_same_params(SpyNet(url), source)


def test_http_bad_digest_is_not_cached(
    ckpt: Path, http_root: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GSM_CACHE", str(cache))
    base, root = http_root
    (root / ckpt.name).write_bytes(ckpt.read_bytes())
    with pytest.raises(ValueError, match=ckpt.name):
        SpyNet(f"{base}/{ckpt.name}", sha256="0" * 64)
    assert not any(cache.iterdir())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        SpyNet(f"{base}/missing.pth")


@pytest.fixture()
def fast_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Retries with tiny back-off and timeout, into an empty cache; returns the cache folder."""
    monkeypatch.setattr(spynet_mod, "FETCH_BACKOFF", 0.01)
    monkeypatch.setattr(spynet_mod, "FETCH_TIMEOUT", 0.3)
    cache = tmp_path / "cache"
    monkeypatch.setenv("GSM_CACHE", str(cache))
    return cache


@contextlib.contextmanager
def _unreachable(fault: str) -> Iterator[int]:
    """A loopback port that refuses, hangs up before a byte, or accepts and never answers."""
    if fault == "refused":
        yield closed_port()
    elif fault == "closed at 0 bytes":
        srv, port = hang_up_server()
        with srv:
            yield port
    else:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)  # connections queue but are never answered
            yield listener.getsockname()[1]


@pytest.mark.parametrize("fault", ["refused", "closed at 0 bytes", "stalled"])
def test_unreachable_url_is_one_line_and_leaves_nothing(fault: str, fast_fetch: Path) -> None:
    with _unreachable(fault) as port:
        url = f"http://127.0.0.1:{port}/spynet_test-12345678.pth"
        with pytest.raises(ConnectionError) as info:
            SpyNet(url)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"SpyNet weights: cannot fetch {url}: "), msg
    assert msg.endswith("(3 tries); set model.spynet_weights to a local file or null"), msg
    # A hang-up reads as "closed" or, when the request was still unread, as a reset.
    reasons = {"refused": ("refused",), "closed at 0 bytes": ("closed", "reset"), "stalled": ("timed out",)}
    assert any(reason in msg for reason in reasons[fault]), msg
    assert list(fast_fetch.iterdir()) == []  # no partial file, no temp folder


@pytest.mark.parametrize("fault", ["HTTP 503", "dropped mid-body"])
def test_transient_failure_is_retried(
    fault: str, ckpt: Path, source: SpyNet, http_server: LoopbackServer, fast_fetch: Path  # noqa: F811
) -> None:
    http_server.files[ckpt.name] = ckpt.read_bytes()
    if fault == "HTTP 503":
        http_server.fail_once = 503
    else:
        http_server.drop_after = 1000
    _assert_same_params(SpyNet(http_server.url(ckpt.name)), source)
    assert len(http_server.requests) == 2
    assert [p.name for p in fast_fetch.iterdir()] == [ckpt.name]


def test_wrong_sha256_raises(ckpt: Path) -> None:
    with pytest.raises(ValueError, match=ckpt.name) as info:
        SpyNet(ckpt, sha256="f" * 64)
    assert "\n" not in str(info.value) and _sha256(ckpt) in str(info.value)


def test_corrupted_hash_suffix_raises(ckpt: Path) -> None:
    real = _sha256(ckpt)[:8]
    fake = "0" * 8 if real != "0" * 8 else "1" * 8
    renamed = ckpt.with_name(f"spynet_test-{fake}.pth")
    ckpt.rename(renamed)
    with pytest.raises(ValueError, match=renamed.name):
        SpyNet(renamed)


def test_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope-12345678.pth"
    with pytest.raises(FileNotFoundError, match="nope-12345678.pth"):
        SpyNet(missing)
    with pytest.raises(FileNotFoundError, match="nope-12345678.pth"):
        SpyNet(missing.as_uri())


def test_wrong_key_raises(tmp_path: Path, source: SpyNet) -> None:
    sd = dict(source.state_dict())
    sd["basic_module.0.basic_module.99.weight"] = sd.pop("basic_module.0.basic_module.0.weight")
    bad = tmp_path / "badkeys.pth"
    torch.save({"params": sd}, bad)
    with pytest.raises(ValueError, match="badkeys.pth") as info:
        SpyNet(bad)
    assert "\n" not in str(info.value)


def test_wrong_shape_raises(tmp_path: Path, source: SpyNet) -> None:
    sd = dict(source.state_dict())
    sd["basic_module.5.basic_module.8.bias"] = torch.zeros(3)
    bad = tmp_path / "badshape.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="badshape.pth") as info:
        SpyNet(bad)
    assert "\n" not in str(info.value)


def test_forward_any_size(source: SpyNet) -> None:
    ref, supp = torch.rand(2, 3, 37, 50), torch.rand(2, 3, 37, 50)
    with torch.no_grad():
        flow = source(ref, supp)
    assert flow.shape == (2, 2, 37, 50) and torch.isfinite(flow).all()


def test_forward_under_autocast(source: SpyNet) -> None:
    ref, supp = torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        flow = source(ref, supp)
    assert flow.shape == (1, 2, 32, 64) and torch.isfinite(flow.float()).all()


def test_compute_flows_shapes_and_directions(source: SpyNet) -> None:
    one = torch.rand(2, 1, 3, 32, 40)
    fwd, bwd = compute_flows(source, one)
    assert fwd.shape == bwd.shape == (2, 0, 2, 32, 40)

    lqs = torch.rand(2, 3, 3, 32, 40)
    with torch.no_grad():
        fwd, bwd = compute_flows(source, lqs)
        assert fwd.shape == bwd.shape == (2, 2, 2, 32, 40)
        # fwd[:, t] = f(t -> t+1) = spynet(ref=x_t, supp=x_{t+1}); bwd is the reverse pair.
        direct_fwd = source(lqs[:, 1], lqs[:, 2])
        direct_bwd = source(lqs[:, 1], lqs[:, 0])
    torch.testing.assert_close(fwd[:, 1], direct_fwd, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bwd[:, 0], direct_bwd, atol=1e-4, rtol=1e-4)
