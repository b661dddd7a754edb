"""Extraction that a hostile or broken archive cannot turn against the machine.

Archives come from third-party mirrors, so every member is checked before it touches disk:
no absolute paths, no ``..``, no device files, no links in zips, and in tars no link that resolves
outside the extraction root (checked again on the finished tree, so chains of links cannot escape)
and no member written through a link. Sizes are bounded twice: by the declared sizes before any
byte is written (all zip members up front; each tar member before it is read, tars being streams)
and by counting the bytes actually written, since headers can lie.

Everything lands in a temporary folder beside ``dest`` that is renamed into place only after a
``.complete`` marker is written last, so ``dest`` either is complete or does not exist. The
temporary folder carries the process id, so a later extraction removes one whose process was
killed; the finished folder gets the umask's permissions, not mkdtemp's 0700. The marker records
which archive (by sha256) the folder came from, so a finished folder is never reused for another.
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from gsm.io import default_mode, remove_orphans, temp_prefix

log = logging.getLogger(__name__)

MARKER = ".complete"  # JSON: the archive's name, strip and origin (its sha256 ...), written last
CHUNK = 1 << 20
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, gzip.BadGzipFile)


class _Unsafe(ValueError):
    """A member we refuse; the message names the member, ``extract`` prefixes the archive."""


class _Broken(Exception):
    """A member whose data does not decode; ``extract`` raises it as UnreadableArchive."""


class UnreadableArchive(ValueError):
    """The archive's bytes are broken (truncated, corrupt): the message names the file to replace."""


def _member_parts(name: str, strip: int) -> list[str]:
    """Path components of a member under the root after ``strip``; [] = nothing left to write."""
    if "\x00" in name:
        raise _Unsafe(f"member {name!r}: NUL byte in name")
    norm = name.replace("\\", "/")  # archives made on Windows may use backslashes as separators
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm):
        raise _Unsafe(f"member {name!r}: absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Unsafe(f"member {name!r}: '..' in path")
    return parts[strip:]


def _check_no_links(root: Path, parts: list[str], name: str) -> None:
    """Refuse to write through (or over) a link an earlier tar member created."""
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise _Unsafe(f"member {name!r}: path goes through the link {'/'.join(path.relative_to(root).parts)}")


class _Budget:
    """Bytes left under ``max_bytes``, in declared and in actually written bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.declared = 0
        self.written = 0

    def declare(self, size: int, name: str) -> None:
        self.declared += size
        if self.declared > self.max_bytes:
            raise _Unsafe(
                f"member {name!r}: declared sizes reach {self.declared} bytes, over max_bytes {self.max_bytes}"
            )

    def copy(self, src: BinaryIO, path: Path, declared: int, name: str) -> None:
        written = 0
        with open(path, "wb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                self.written += len(chunk)
                if written > declared:
                    raise _Unsafe(f"member {name!r}: more data than its declared {declared} bytes")
                if self.written > self.max_bytes:
                    raise _Unsafe(f"member {name!r}: extracted data exceeds max_bytes {self.max_bytes}")
                out.write(chunk)


def _extract_zip(archive: Path, root: Path, budget: _Budget, strip: int, progress: bool) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        plans = []
        for info in infos:  # everything is checked before the first byte is written
            parts = _member_parts(info.filename, strip)
            mode = info.external_attr >> 16
            if info.create_system == 3 and stat.S_ISLNK(mode):
                raise _Unsafe(f"member {info.filename!r}: links are not allowed in zip archives")
            if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _Unsafe(f"member {info.filename!r}: device or special file")
            if not info.is_dir():
                budget.declare(info.file_size, info.filename)
            plans.append((info, parts))
        for info, parts in tqdm(plans, desc=f"extract {archive.name}", unit="file", disable=not progress):
            if not parts:
                continue
            path = root.joinpath(*parts)
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src:
                    budget.copy(src, path, info.file_size, info.filename)
            except _CORRUPT as exc:
                raise _Broken(f"member {info.filename!r}: corrupt data ({exc})") from None


def _extract_tar(archive: Path, root: Path, budget: _Budget, strip: int, progress: bool) -> None:
    # Stream mode: one pass over a possibly compressed tar, members checked as they come.
    with tarfile.open(archive, mode="r|*") as tf, tqdm(
        desc=f"extract {archive.name}", unit="file", disable=not progress
    ) as bar:
        for member in tf:
            bar.update(1)
            name = member.name
            parts = _member_parts(name, strip)
            if member.isreg():
                budget.declare(member.size, name)
            elif not (member.isdir() or member.issym() or member.islnk()):
                raise _Unsafe(f"member {name!r}: device or special file")
            if not parts:
                continue
            _check_no_links(root, parts, name)
            path = root.joinpath(*parts)
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                if path.is_dir():
                    raise _Unsafe(f"member {name!r}: a file where a folder was already extracted")
                path.unlink()
            if member.isreg():
                src = tf.extractfile(member)
                assert src is not None  # regular members always have data
                with src:
                    budget.copy(src, path, member.size, name)
            elif member.issym():
                target = member.linkname
                if target.startswith("/") or re.match(r"[A-Za-z]:", target):
                    raise _Unsafe(f"member {name!r}: link to absolute path {target!r}")
                inside = os.path.normpath(os.path.join(*parts[:-1], target) if parts[:-1] else target)
                if inside == ".." or inside.startswith("../"):
                    raise _Unsafe(f"member {name!r}: link target {target!r} escapes the destination")
                os.symlink(target, path)
            else:  # hard link: its target is another member's name
                try:
                    target_parts = _member_parts(member.linkname, strip)
                except _Unsafe:
                    target_parts = []
                if not target_parts:
                    raise _Unsafe(f"member {name!r}: hard link to {member.linkname!r} outside the destination")
                _check_no_links(root, target_parts, name)
                target_path = root.joinpath(*target_parts)
                if not target_path.is_file():
                    raise _Unsafe(f"member {name!r}: hard link to {member.linkname!r}, not an extracted file")
                os.link(target_path, path, follow_symlinks=False)


def _check_link_targets(root: Path) -> None:
    """Resolve every link in the finished tree: later members can redirect earlier ones."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            path = os.path.join(dirpath, entry)
            if os.path.islink(path):
                real = os.path.realpath(path)
                if real != real_root and not real.startswith(real_root + os.sep):
                    rel = os.path.relpath(path, root)
                    raise _Unsafe(f"member {rel!r}: link resolves outside the destination")


def extraction_record(dest: Path) -> dict[str, Any] | None:
    """What a complete ``dest`` was extracted from (see ``extract``'s ``origin``); None when
    ``dest`` is not complete, {} for a marker older than these records."""
    try:
        rec = json.loads((Path(dest) / MARKER).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return {}
    return rec if isinstance(rec, dict) else {}


def _reusable(dest: Path, strip: int, origin: dict[str, Any] | None) -> bool:
    """Whether a complete ``dest`` came from this archive (or the caller ties it to none)."""
    rec = extraction_record(dest)
    if rec is None:
        return False
    if origin is None or (rec.get("sha256") == origin.get("sha256") and rec.get("strip") == strip):
        return True
    log.info("%s was extracted from another archive than %s: extracting again", dest, origin.get("sha256"))
    shutil.rmtree(dest)
    return False


def extract(
    archive: Path, dest: Path, *, max_bytes: int, strip: int = 0, progress: bool = True,
    origin: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Safely unpack a .zip or .tar(.gz/.bz2/.xz) into ``dest`` (skipped if already complete).

    ``strip`` drops that many leading path components from every member (like tar's
    --strip-components), e.g. 2 turns REDS's ``train/train_sharp/000/...`` into ``000/...``.
    ``origin`` identifies the archive (its ``sha256`` and whatever else the caller records in the
    marker): a complete ``dest`` from another archive or another ``strip`` is extracted again.
    Without it any complete ``dest`` is reused. Broken bytes raise ``UnreadableArchive``.
    """
    archive, dest = Path(archive), Path(dest)
    if _reusable(dest, strip, origin):
        return dest
    if dest.exists():
        raise FileExistsError(f"{dest}: exists without a {MARKER} marker; remove it to extract {archive.name} there")
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such archive")
    if max_bytes < 0 or strip < 0:
        raise ValueError(f"{archive}: max_bytes and strip must be >= 0")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(dest)  # what an extraction killed with -9 left (hundreds of GB for REDS)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        _unpack(archive, tmp, max_bytes, strip, progress)
        (tmp / MARKER).write_text(json.dumps({"archive": archive.name, "strip": strip, **(origin or {})}) + "\n")
        os.chmod(tmp, default_mode(folder=True))  # mkdtemp's 0700 would hide the dataset from others
        try:
            os.rename(tmp, dest)
        except OSError:
            if (dest / MARKER).is_file():  # another process finished the same extraction first
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _unpack(archive: Path, tmp: Path, max_bytes: int, strip: int, progress: bool) -> None:
    budget = _Budget(max_bytes)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, budget, strip, progress)
        else:
            _extract_tar(archive, tmp, budget, strip, progress)
            _check_link_targets(tmp)
    except _Unsafe as exc:
        raise ValueError(f"{archive}: {exc}") from None
    except _Broken as exc:
        raise UnreadableArchive(f"{archive}: {exc}") from None
    except _CORRUPT as exc:
        raise UnreadableArchive(f"{archive}: not a readable zip or tar archive ({exc})") from None
