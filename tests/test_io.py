"""Atomic writes: whole files or nothing, with the permissions a plain open() would give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gsm.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def test_atomic_writes_content_mode_and_no_temp(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a" / "x.txt", "hello\n")
        atomic_write_json(tmp_path / "a" / "m.json", {"b": 1})
        atomic_write_bytes(tmp_path / "a" / "f.bin", b"\x00\x01", durable=False)
    finally:
        os.umask(mask)
    assert (tmp_path / "a" / "x.txt").read_text() == "hello\n"
    assert (tmp_path / "a" / "m.json").read_text() == '{\n  "b": 1\n}\n'
    assert (tmp_path / "a" / "f.bin").read_bytes() == b"\x00\x01"
    for p in (tmp_path / "a").iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p  # not mkstemp's 0600: reports stay readable
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["f.bin", "m.json", "x.txt"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")

    class Boom:
        def __repr__(self) -> str:
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": Boom()})
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
