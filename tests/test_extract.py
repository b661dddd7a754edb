"""Safe extraction: official layouts unpack; hostile archives leave nothing behind."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from gsm.data.extract import MARKER, UnreadableArchive, _Budget, extract, extraction_record

FILES = {
    "train/train_sharp/000/00000000.png": b"frame-0",
    "train/train_sharp/000/00000001.png": b"frame-1",
    "train/train_sharp/001/00000000.png": b"frame-2",
}


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _assert_nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".")] == []


def test_zip_official_layout_with_strip(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "train_sharp.zip", FILES)
    dest = extract(archive, tmp_path / "out" / "train_sharp", max_bytes=1000, strip=2, progress=False)
    assert (dest / "000" / "00000001.png").read_bytes() == b"frame-1"
    assert (dest / "001" / "00000000.png").read_bytes() == b"frame-2"
    assert (dest / MARKER).is_file()
    archive.unlink()  # idempotent: a complete destination is not touched again
    assert extract(archive, dest, max_bytes=1000, strip=2) == dest


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_tar_with_internal_links(tmp_path: Path, mode: str) -> None:
    members = [_file(n, d) for n, d in FILES.items()]
    members += [
        _link("train/train_sharp/latest", "001"),
        _link("train/train_sharp/copy.png", "train/train_sharp/000/00000000.png", tarfile.LNKTYPE),
    ]
    archive = _tar(tmp_path / "a.tar", members, mode)
    dest = extract(archive, tmp_path / "out", max_bytes=1000, strip=2, progress=False)
    assert (dest / "000" / "00000000.png").read_bytes() == b"frame-0"
    assert (dest / "latest" / "00000000.png").read_bytes() == b"frame-2"
    assert (dest / "copy.png").read_bytes() == b"frame-0"


def test_existing_incomplete_dest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="without a .complete marker"):
        extract(_zip(tmp_path / "a.zip", FILES), tmp_path / "out", max_bytes=1000)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil", r"'\.\.' in path"),
        ("a/../../evil", r"'\.\.' in path"),
        ("/abs/evil", "absolute path"),
        ("..\\evil", r"'\.\.'"),
    ],
)
def test_zip_unsafe_names(tmp_path: Path, name: str, why: str) -> None:
    archive = _zip(tmp_path / "bad.zip", {"ok.txt": b"x", name: b"evil"})
    dest = tmp_path / "out" / "d"
    with pytest.raises(ValueError, match=rf"bad\.zip: member .*evil.*{why}") as err:
        extract(archive, dest, max_bytes=1000, progress=False)
    assert "\n" not in str(err.value)
    _assert_nothing_left(dest)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()


def test_zip_symlink_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="member 'link': links are not allowed"):
        extract(archive, tmp_path / "out", max_bytes=1000, progress=False)
    _assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize(
    "members",
    [
        [_file("ok", b"x"), _link("link", "../../outside")],
        [_file("ok", b"x"), _link("link", "/etc")],
        [_file("sub/ok", b"x"), _link("sub/link", "../..")],
        # Each link is harmless when made; together they point at the destination's parent.
        [_link("x", "z/.."), _link("z", ".")],
        [_link("d", "."), _file("d/../evil", b"x")],
        [_file("ok", b"x"), _link("hard", "../ok", tarfile.LNKTYPE)],
        [_link("dir", "."), _file("dir/file", b"x")],
    ],
    ids=["relative", "absolute", "nested", "chain", "dotdot-through-link", "hardlink", "write-through-link"],
)
def test_tar_escaping_links_rejected(tmp_path: Path, members: list) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(ValueError, match=r"bad\.tar\.gz: member "):
        extract(archive, tmp_path / "out", max_bytes=1000, progress=False)
    _assert_nothing_left(tmp_path / "out")


def test_tar_device_file_rejected(tmp_path: Path) -> None:
    info = tarfile.TarInfo("dev/null")
    info.type = tarfile.CHRTYPE
    archive = _tar(tmp_path / "dev.tar", [(info, None)], "w")
    with pytest.raises(ValueError, match="device or special file"):
        extract(archive, tmp_path / "out", max_bytes=1000, progress=False)
    _assert_nothing_left(tmp_path / "out")


def test_size_bombs_rejected(tmp_path: Path) -> None:
    zbomb = _zip(tmp_path / "bomb.zip", {"a": b"\0" * 600, "b": b"\0" * 600})
    with pytest.raises(ValueError, match=r"member 'b': declared sizes reach 1200 bytes, over max_bytes 1000"):
        extract(zbomb, tmp_path / "z", max_bytes=1000, progress=False)
    _assert_nothing_left(tmp_path / "z")
    tbomb = _tar(tmp_path / "bomb.tar.gz", [_file("a", b"\0" * 1001)])
    with pytest.raises(ValueError, match="over max_bytes 1000"):
        extract(tbomb, tmp_path / "t", max_bytes=1000, progress=False)
    _assert_nothing_left(tmp_path / "t")


def test_lying_zip_header_caught_while_writing(tmp_path: Path) -> None:
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("big", b"A" * 5000)
    raw = bytearray(archive.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")  # central directory entry: uncompressed size at offset 24
    struct.pack_into("<I", raw, cd + 24, 10)
    archive.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"liar\.zip: member 'big'"):
        extract(archive, tmp_path / "out", max_bytes=1000, progress=False)
    _assert_nothing_left(tmp_path / "out")


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match=r"junk\.zip: not a readable zip or tar archive"):
        extract(junk, tmp_path / "out", max_bytes=1000, progress=False)
    _assert_nothing_left(tmp_path / "out")


def test_written_bytes_are_counted_whatever_the_header_says(tmp_path: Path) -> None:
    """zipfile already truncates at the declared size; the writer's own count is the second line."""
    with pytest.raises(ValueError, match="more data than its declared 10 bytes"):
        _Budget(1000).copy(io.BytesIO(b"A" * 50), tmp_path / "f", 10, "f")
    budget = _Budget(100)
    budget.copy(io.BytesIO(b"A" * 60), tmp_path / "g", 60, "g")
    with pytest.raises(ValueError, match="exceeds max_bytes 100"):
        budget.copy(io.BytesIO(b"A" * 60), tmp_path / "h", 60, "h")


def test_killed_extractions_are_cleaned_up_and_the_result_gets_the_umask(tmp_path: Path) -> None:
    import os

    archive = _zip(tmp_path / "train_sharp.zip", FILES)
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f".train_sharp.gsm-{2**22 + 7}-abcd.tmp"  # pid above Linux's pid_max: a dead writer
    (dead / "000").mkdir(parents=True)
    (dead / "000" / "00000000.png").write_bytes(b"half")
    live = out / f".train_sharp.gsm-{os.getpid()}-efgh.tmp"  # a writer that still runs
    live.mkdir()
    old = os.umask(0o022)
    try:
        dest = extract(archive, out / "train_sharp", max_bytes=1000, strip=2, progress=False)
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == sorted(["train_sharp", live.name])
    assert dest.stat().st_mode & 0o777 == 0o755


def test_extraction_is_tied_to_its_archive(tmp_path: Path) -> None:
    """A finished folder is reused only for the archive (sha256) and strip it was made from."""
    archive = _zip(tmp_path / "a.zip", FILES)
    dest = tmp_path / "out"
    old = {"sha256": "1" * 64, "url": "http://old/a.zip"}
    extract(archive, dest, max_bytes=1000, strip=2, progress=False, origin=old)
    assert extraction_record(dest) == {"archive": "a.zip", "strip": 2, **old}
    stamp = (dest / MARKER).stat().st_mtime_ns
    extract(archive, dest, max_bytes=1000, strip=2, progress=False, origin={**old, "url": "http://mirror/a.zip"})
    assert (dest / MARKER).stat().st_mtime_ns == stamp  # same bytes from a mirror: not redone

    _zip(archive, {"train/train_sharp/000/00000000.png": b"new"})  # another archive, same name
    new = {"sha256": "2" * 64}
    extract(archive, dest, max_bytes=1000, strip=2, progress=False, origin=new)
    assert (dest / "000" / "00000000.png").read_bytes() == b"new" and not (dest / "001").exists()
    extract(archive, dest, max_bytes=1000, strip=1, progress=False, origin=new)
    assert (dest / "train_sharp" / "000" / "00000000.png").is_file() and not (dest / "000").exists()
    (dest / MARKER).write_text("a.zip\n")  # a marker from before the records: not trusted
    assert extraction_record(dest) == {}
    extract(archive, dest, max_bytes=1000, strip=1, progress=False, origin=new)
    assert extraction_record(dest)["sha256"] == "2" * 64


def test_truncated_archive_is_unreadable(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", FILES)
    archive.write_bytes(archive.read_bytes()[:-40])  # the end of the central directory is gone
    with pytest.raises(UnreadableArchive, match=rf"^{tmp_path}/a\.zip: not a readable zip or tar archive"):
        extract(archive, tmp_path / "out", max_bytes=1000, progress=False, origin={"sha256": "3" * 64})
    _assert_nothing_left(tmp_path / "out")
