"""LMDB packing, resumption after SIGKILL, verification, and the fork-safe reader."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from typer.testing import CliRunner

from gsm.cli import app
from gsm.data import lmdb_io
from gsm.data.images import encode_png, read_image, write_png
from gsm.data.lmdb_io import (
    COMPLETE,
    META_INFO,
    STATE,
    LmdbStore,
    MissingFrameError,
    VerifyError,
    pack_lmdb,
    verify_lmdb,
)

ROOT = Path(__file__).resolve().parents[1]


def _frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradient plus noise: compresses like a photo, not like pure noise or a flat field."""
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.stack([xs * 200 / w, ys * 200 / h, (xs + ys) * 100 / (h + w)], axis=2)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _make_clips(root: Path, clips: int = 3, frames: int = 10, h: int = 24, w: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    keys = []
    for c in range(clips):
        for f in range(frames):
            key = f"{c:03d}/{f:08d}"
            write_png(root / f"{key}.png", _frame(rng, h, w), level=3)
            keys.append(key)
    return keys


def _contents(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    _make_clips(tmp_path / "src")
    return tmp_path / "src"


def test_round_trip_and_basicsr_meta_info(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "db.lmdb"
    s = pack_lmdb(src, dst, workers=1, batch=7, progress=False)
    assert (s.status, s.frames, s.encoded, s.skipped) == ("packed", 30, 30, 0)
    lines = (dst / META_INFO).read_text().splitlines()
    assert lines[0] == "000/00000000.png (24,40,3) 1"
    assert len(lines) == 30 and lines == sorted(lines)
    assert sorted(k.decode() for k in _contents(dst)) == [ln.split(".png")[0] for ln in lines]
    assert (dst / COMPLETE).exists() and not (dst / STATE).exists()
    store = LmdbStore(dst)
    assert store.keys()[:2] == ["000/00000000", "000/00000001"] and len(store.keys()) == 30
    for key in store.keys():
        got = store.get(key)
        assert got.dtype == np.uint8 and got.shape == (24, 40, 3)
        np.testing.assert_array_equal(got, read_image(src / f"{key}.png"))
    v = verify_lmdb(dst, progress=False)
    assert v.frames == 30 and v.value_bytes == s.value_bytes


def test_nested_keys_and_level_recorded(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = _frame(rng, 16, 28)
    for seq in ("0001", "0002"):
        for i in (1, 2, 3):
            write_png(tmp_path / "vimeo" / "00001" / seq / f"im{i}.png", img, level=9)
    s = pack_lmdb(tmp_path / "vimeo", tmp_path / "v.lmdb", level=0, workers=1, progress=False)
    lines = (tmp_path / "v.lmdb" / META_INFO).read_text().splitlines()
    assert lines[0] == "00001/0001/im1.png (16,28,3) 0" and len(lines) == 6
    assert s.level == 0
    value = _contents(tmp_path / "v.lmdb")[b"00001/0002/im3"]
    assert value == encode_png(img, 0)  # stored re-encoded at the requested level
    np.testing.assert_array_equal(LmdbStore(tmp_path / "v.lmdb").get("00001/0002/im3"), img)


def test_symlinked_clips_are_followed_without_looping(src: Path, tmp_path: Path) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "000").symlink_to(src / "000")
    (tmp_path / "merged" / "240").symlink_to(src / "001")  # how REDS val clips join train
    (src / "000" / "loop").symlink_to(tmp_path / "merged")
    s = pack_lmdb(tmp_path / "merged", tmp_path / "db", workers=1, progress=False)
    assert s.frames == 20 and LmdbStore(tmp_path / "db").keys()[10] == "240/00000000"


def test_map_grows_when_full(src: Path, tmp_path: Path) -> None:
    s = pack_lmdb(src, tmp_path / "db", workers=1, batch=10, progress=False, map_size=1 << 15)
    assert s.map_grows >= 1 and s.map_size > 1 << 15
    assert verify_lmdb(tmp_path / "db", progress=False).frames == 30


def test_workers_give_identical_lmdb(src: Path, tmp_path: Path) -> None:
    pack_lmdb(src, tmp_path / "w1", workers=1, batch=8, progress=False)
    pack_lmdb(src, tmp_path / "w2", workers=2, batch=8, progress=False)
    assert _contents(tmp_path / "w1") == _contents(tmp_path / "w2")
    assert (tmp_path / "w1" / META_INFO).read_bytes() == (tmp_path / "w2" / META_INFO).read_bytes()


_KILLER = """
import os, signal, sys
from pathlib import Path
from gsm.data.lmdb_io import pack_lmdb
pack_lmdb(Path(sys.argv[1]), Path(sys.argv[2]), workers=2, batch=5, progress=False,
          on_commit=lambda n: os.kill(os.getpid(), signal.SIGKILL))
"""


def _pack_and_sigkill_after_first_commit(src: Path, dst: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # capture_output also proves the workers died with the packer: they hold the pipes open otherwise.
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(src), str(dst)], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_resume_after_sigkill(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "db"
    _pack_and_sigkill_after_first_commit(src, dst)
    before = _contents(dst)
    assert sorted(before) == [f"000/{i:08d}".encode() for i in range(5)]  # exactly the first commit
    assert (dst / STATE).exists() and not (dst / COMPLETE).exists() and not (dst / META_INFO).exists()
    with pytest.raises(ValueError, match="unfinished pack"):
        LmdbStore(dst)
    with pytest.raises(ValueError, match="unfinished pack"):
        verify_lmdb(dst, progress=False)

    # A committed frame edited between runs must be re-encoded; the other four are kept as they are.
    flat = np.full((24, 40, 3), 7, np.uint8)
    write_png(src / "000" / "00000002.png", flat, level=3)
    _pack_and_sigkill_after_first_commit(src, dst)  # second interruption: 4 kept + 5 new committed
    assert len(_contents(dst)) == 9
    s = pack_lmdb(src, dst, workers=2, batch=5, progress=False)
    assert (s.status, s.frames, s.skipped, s.encoded) == ("resumed", 30, 9, 21)
    after = _contents(dst)
    for k, v in before.items():
        if k != b"000/00000002":
            assert after[k] == v
    np.testing.assert_array_equal(LmdbStore(dst).get("000/00000002"), flat)
    assert verify_lmdb(dst, progress=False).frames == 30
    assert (dst / COMPLETE).exists() and not (dst / STATE).exists()


def test_rerun_is_noop_unless_source_changed(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "db"
    pack_lmdb(src, dst, workers=1, progress=False)
    mtime = (dst / "data.mdb").stat().st_mtime_ns
    s = pack_lmdb(src, dst, workers=1, progress=False)
    assert (s.status, s.encoded, s.frames) == ("up-to-date", 0, 30)
    assert (dst / "data.mdb").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="level 1, not 5"):
        pack_lmdb(src, dst, level=5, workers=1, progress=False)
    write_png(src / "002" / "00000010.png", _frame(np.random.default_rng(9), 24, 40))
    with pytest.raises(ValueError, match=r"1 added \(e.g. 002/00000010\)"):
        pack_lmdb(src, dst, workers=1, progress=False)
    # Regenerated derived frames: the stale pack is replaced, and the new frame reads back.
    s = pack_lmdb(src, dst, workers=1, progress=False, replace_stale=True)
    assert s.frames == 31 and s.encoded == 31
    assert LmdbStore(dst).get("002/00000010").shape == (24, 40, 3)


def test_same_size_rewrite_is_stale_and_verify_checks_the_sources(src: Path, tmp_path: Path) -> None:
    """A frame rewritten with other pixels of the same byte size is not taken for the packed one."""
    frame = src / "001" / "00000003.png"
    old = read_image(frame)
    frame.write_bytes(encode_png(old, 0))  # level 0 (stored): the file size depends on the shape only
    dst = tmp_path / "db"
    pack_lmdb(src, dst, workers=1, progress=False)
    new = old.copy()
    new[0, 0] = 255 - new[0, 0]
    size = frame.stat().st_size
    frame.write_bytes(encode_png(new, 0))
    assert frame.stat().st_size == size  # same byte size, other pixels
    verify_lmdb(dst, progress=False)  # the pack alone still decodes
    with pytest.raises(VerifyError, match=r"001/00000003: differs from its source"):
        verify_lmdb(dst, src=src, progress=False)
    with pytest.raises(ValueError, match=r"1 changed \(e.g. 001/00000003\)"):
        pack_lmdb(src, dst, workers=1, progress=False)
    s = pack_lmdb(src, dst, workers=1, progress=False, replace_stale=True)
    assert s.encoded == 30 and np.array_equal(LmdbStore(dst).get("001/00000003"), new)
    verify_lmdb(dst, src=src, progress=False)


def test_a_truncated_data_file_is_named_not_a_sigbus(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "db"
    pack_lmdb(src, dst, workers=1, progress=False)
    data = dst / "data.mdb"
    with data.open("r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    gsm = [sys.executable, "-c", "from gsm.cli import app; app()"]
    for args in (["pack", "--verify", str(dst)], ["pack", str(src), str(dst)]):
        r = subprocess.run([*gsm, *args, "--no-progress"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.returncode, r.stderr)  # SIGBUS would be -7
        err = r.stderr.strip()
        assert err.startswith(f"error: {data} is truncated (") and "\n" not in err and f"delete {dst}" in err
    with pytest.raises(ValueError, match="is truncated"):
        LmdbStore(dst).get("000/00000000")
    # The pipeline's packing (replace_stale: derived data) rebuilds it.
    s = pack_lmdb(src, dst, workers=1, progress=False, replace_stale=True)
    assert s.encoded == 30
    verify_lmdb(dst, src=src, progress=False)


def test_a_full_disk_while_packing_is_one_line_and_resumable(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "db"
    real_open = lmdb.open
    commits: list[int] = []

    class Txn:  # a write transaction whose second commit finds the disk full
        def __init__(self, txn: lmdb.Transaction) -> None:
            self.txn = txn

        def __enter__(self) -> lmdb.Transaction:
            return self.txn.__enter__()

        def __exit__(self, *exc: object) -> None:
            if exc[0] is None:
                commits.append(1)
                if len(commits) == 2:
                    self.txn.abort()
                    raise lmdb.DiskError("mdb_txn_commit: No space left on device")
            self.txn.__exit__(*exc)

    class Env:
        def __init__(self, env: lmdb.Environment) -> None:
            self.env = env

        def begin(self, write: bool = False, **k: object) -> object:
            txn = self.env.begin(write=write, **k)
            return Txn(txn) if write else txn

        def __getattr__(self, name: str) -> object:
            return getattr(self.env, name)

    monkeypatch.setattr(lmdb, "open", lambda *a, **k: Env(real_open(*a, **k)))
    r = CliRunner().invoke(app, ["pack", str(src), str(dst), "--batch", "10", "--workers", "1", "--no-progress"])
    assert r.exit_code == 2, r.output
    err = r.output.strip()
    assert err.startswith(f"error: {dst}") and "No space left on device" in err and "MiB free" in err, err
    assert "\n" not in err and "rerun to resume" in err
    monkeypatch.undo()
    s = pack_lmdb(src, dst, batch=10, workers=1, progress=False)
    assert (s.status, s.skipped, s.encoded) == ("resumed", 10, 20)


def test_verify_detects_corrupt_missing_and_extra(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "db"
    pack_lmdb(src, dst, workers=1, progress=False)
    env = lmdb.open(str(dst))
    with env.begin(write=True) as txn:
        txn.put(b"001/00000003", b"\x89PNG\r\n\x1a\n garbage")
        txn.delete(b"002/00000000")
        txn.put(b"zzz/extra", b"x")
    env.close()
    with pytest.raises(VerifyError) as info:
        verify_lmdb(dst, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "3 bad frame(s); first: 001/00000003: value does not decode" in msg
    assert [k for k, _ in info.value.problems] == ["001/00000003", "002/00000000", "zzz/extra"]
    store = LmdbStore(dst)
    with pytest.raises(ValueError, match="001/00000003.*cannot decode"):
        store.get("001/00000003")
    with pytest.raises(MissingFrameError) as missing:
        store.get("002/00000000")
    assert isinstance(missing.value, KeyError)
    assert str(missing.value) == f"002/00000000: no such frame in LMDB {dst}"


def _child_sums(store: LmdbStore, keys: list[str], q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    sums = [int(store.get(k).sum()) for k in keys]
    q.put((os.getpid(), lmdb_io._READERS[store._id][0], sums))


def test_store_pickles_and_reopens_after_fork(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "db"
    pack_lmdb(src, dst, workers=1, progress=False)
    store = LmdbStore(dst)
    keys = store.keys()
    expected = [int(store.get(k).sum()) for k in keys]  # parent's env is open now
    state = pickle.dumps(store)
    assert b"Environment" not in state
    clone = pickle.loads(state)
    assert [int(clone.get(k).sum()) for k in keys] == expected
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child_sums, args=(store, keys, q)) for _ in range(2)]  # inherited, not pickled
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for pid, reader_pid, sums in results:
        assert reader_pid == pid != os.getpid() and sums == expected  # the child opened its own handle
    assert [int(store.get(k).sum()) for k in keys[:3]] == expected[:3]  # parent handle unaffected


def _assert_not_packed(dst: Path) -> None:
    assert not (dst / COMPLETE).exists() and not (dst / META_INFO).exists()


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG frames") as e:
        pack_lmdb(tmp_path / "empty", tmp_path / "d0", progress=False)
    assert str(tmp_path / "empty") in str(e.value)
    assert not (tmp_path / "d0").exists()

    _make_clips(tmp_path / "junk", clips=1, frames=3)
    (tmp_path / "junk" / "000" / "00000001.png").write_bytes(b"not an image at all, just text")
    with pytest.raises(ValueError, match=r"000/00000001\.png: not a PNG file"):
        pack_lmdb(tmp_path / "junk", tmp_path / "d1", workers=1, progress=False)
    assert not (tmp_path / "d1").exists()

    # A valid header over truncated data is only found while decoding, here inside a worker process.
    _make_clips(tmp_path / "trunc", clips=2, frames=6)
    bad = tmp_path / "trunc" / "001" / "00000004.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ValueError) as e:
        pack_lmdb(tmp_path / "trunc", tmp_path / "d2", workers=2, batch=4, progress=False)
    assert str(e.value) == f"{bad}: cannot decode image"
    _assert_not_packed(tmp_path / "d2")
    with pytest.raises(ValueError, match="unfinished"):
        LmdbStore(tmp_path / "d2")

    _make_clips(tmp_path / "mixed", clips=2, frames=3)
    write_png(tmp_path / "mixed" / "001" / "00000002.png", np.zeros((24, 44, 3), np.uint8))
    with pytest.raises(ValueError) as e:
        pack_lmdb(tmp_path / "mixed", tmp_path / "d3", workers=1, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "mixed" / "001") in msg and "00000002.png is 44x24" in msg
    assert not (tmp_path / "d3").exists()


def test_cli_pack_verify_and_errors(src: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    dst = tmp_path / "cli.lmdb"
    r = runner.invoke(app, ["pack", str(src), str(dst), "--workers", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"packed {dst}: 30 frames (30 encoded, 0 kept")
    r = runner.invoke(app, ["pack", "--verify", str(dst), "--no-progress"])
    assert r.exit_code == 0 and r.stdout.startswith(f"verified {dst}: 30 frames")
    r = runner.invoke(app, ["pack", str(src), str(dst), "--verify", "--no-progress"])
    assert r.exit_code == 0 and "up to date" in r.stdout and "verified" in r.stdout

    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["pack", str(tmp_path / "empty"), str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code == 2
    assert r.stderr == f"error: {tmp_path / 'empty'}: no PNG frames found\n"
    r = runner.invoke(app, ["pack", str(dst)])
    assert r.exit_code == 2 and r.stderr.startswith("error: usage: gsm pack SRC DST")
    r = runner.invoke(app, ["pack", "--verify", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "nowhere" in r.stderr
