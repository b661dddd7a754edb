"""BasicSR-compatible LMDB frame databases: resumable packing, verification, and a fork-safe reader.

Layout of an LMDB folder `dst` (BasicSR reads the first three; the rest are ours):
  data.mdb, lock.mdb   the database; key `000/00000000`, value PNG bytes at `level`
  meta_info.txt        `000/00000000.png (720,1280,3) 1` per frame, sorted by key
  pack_state.json      present while a pack is unfinished: source sizes per key, level
  .complete            written last: an LMDB without it (but with pack_state.json) is partial
  .pack.lock           flock so two packers never interleave writes into one LMDB

Resume model: frames are committed in batches, so the keys present in the database *are* the
progress record. A rerun keeps every committed frame whose source file still has the recorded size
and modification time (a frame rewritten with other pixels of the same byte size is re-encoded),
re-encodes the rest, and only then writes meta_info.txt and .complete (each atomically).
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import lmdb
import numpy as np
from tqdm import tqdm

from gsm.data.images import decode_png, encode_png
from gsm.io import atomic_write_text, free_space

log = logging.getLogger(__name__)

META_INFO = "meta_info.txt"
STATE = "pack_state.json"
COMPLETE = ".complete"
LOCK = ".pack.lock"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_META_LINE = re.compile(r"^(?P<name>\S+) \((?P<h>\d+),(?P<w>\d+),(?P<c>\d+)\) (?P<level>\d+)$")
_MAX_BATCH_BYTES = 512 << 20  # a batch of 500 720p frames is ~1 GB; cap what one transaction holds
_MAX_MAP_SIZE = 1 << 44
_CHUNK = 4  # frames per worker task: amortises inter-process overhead on small frames


Shape = tuple[int, int, int]


@dataclass(frozen=True)
class PackSummary:
    dst: Path
    status: str  # "packed" (fresh), "resumed" (kept earlier commits), "up-to-date" (no-op)
    frames: int
    encoded: int  # encoded by this run
    skipped: int  # committed by an earlier, interrupted run and kept
    value_bytes: int  # PNG bytes of all frames in the LMDB
    level: int
    map_size: int
    map_grows: int
    seconds: float


@dataclass(frozen=True)
class VerifySummary:
    path: Path
    frames: int
    value_bytes: int
    seconds: float


@dataclass(frozen=True)
class MetaEntry:
    key: str
    name: str  # key plus extension, as written in meta_info.txt
    shape: Shape
    level: int


class MissingFrameError(ValueError, KeyError):
    """A key absent from an LMDB: a KeyError for lookups, a ValueError so the CLI prints one line."""

    __str__ = BaseException.__str__  # KeyError would quote the message


class VerifyError(ValueError):
    """One line naming the first bad key; `problems` keeps all `(key, reason)` pairs."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)  # one positional arg keeps the exception picklable
        self.problems = problems or []


@dataclass
class _Source:
    """What the pre-pass learns from each PNG's header, without decoding it."""

    key: str
    path: Path
    size: int
    hw: tuple[int, int]
    mtime_ns: int = 0

    @property
    def stamp(self) -> list[int]:
        return [self.size, self.mtime_ns]


@dataclass
class _Plan:
    sources: list[_Source]  # sorted by key
    sizes: dict[str, list[int]]  # [bytes, mtime_ns] of each source file: the cheap "has it changed" test


# --------------------------------------------------------------------------------------------- scan


def _png_hw(head: bytes, name: str) -> tuple[int, int]:
    """Height and width from the IHDR chunk: lets sizes be validated before any decoding."""
    if len(head) < 24 or head[:8] != _PNG_SIG or head[12:16] != b"IHDR":
        raise ValueError(f"{name}: not a PNG file")
    w, h = struct.unpack(">II", head[16:24])
    return h, w


def _png_files(src: Path) -> list[Path]:
    """Follows symlinked clip folders (REDS val clips are often linked into train as 240-269)."""
    out: list[Path] = []
    top = Path(src)
    for root, dirs, files in os.walk(src, followlinks=True):
        here = Path(root)
        real = os.path.realpath(here)
        if here != top and any(os.path.realpath(a) == real for a in here.parents if a == top or top in a.parents):
            dirs.clear()  # a link back to an ancestor: walking on would never end
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out.extend(Path(root, f) for f in files if f.lower().endswith(".png") and not f.startswith("."))
    return sorted(out)


def _scan(src: Path) -> _Plan:
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source frame folder not found")
    paths = _png_files(src)
    if not paths:
        raise ValueError(f"{src}: no PNG frames found")
    sources: list[_Source] = []
    clip_ref: dict[str, _Source] = {}
    for p in paths:
        rel = p.relative_to(src).as_posix()
        if any(ch.isspace() for ch in rel):
            raise ValueError(f"{p}: whitespace in a frame path cannot be written to meta_info.txt")
        with p.open("rb") as fh:
            head = fh.read(24)
        st = p.stat()
        s = _Source(str(PurePosixPath(rel).with_suffix("")), p, st.st_size, _png_hw(head, str(p)), st.st_mtime_ns)
        clip = str(PurePosixPath(rel).parent)
        ref = clip_ref.setdefault(clip, s)
        if s.hw != ref.hw:
            clip_name = src if clip == "." else src / clip
            raise ValueError(f"clip {clip_name}: frame {p.name} is {s.hw[1]}x{s.hw[0]} but "
                             f"{ref.path.name} is {ref.hw[1]}x{ref.hw[0]} (frames of one clip must match)")
        sources.append(s)
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys):  # `a.png` and `a.PNG` would share a key
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"{src}: two frames map to the key {dup}")
    sources.sort(key=lambda s: s.key)
    return _Plan(sources, {s.key: s.stamp for s in sources})


# ------------------------------------------------------------------------------------------ encode


def _init_worker(parent: int) -> None:
    """Workers die with the packer (a SIGKILLed pack leaves no orphans) and leave Ctrl-C to it.

    Forked where possible. Forkserver children hold the server's liveness pipe, so neither the server
    nor they notice the packer's death; spawn (like forkserver) re-runs the caller's `__main__`, which
    breaks unguarded scripts and stdin. Forked workers only run single-threaded OpenCV, so threads
    in the parent (tqdm's monitor, torch) hold nothing they need.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the packer died before prctl took effect
        os._exit(1)
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # decode errors are raised, not logged


def _encode_chunk(items: Sequence[tuple[str, str]], level: int) -> list[tuple[str, bytes, Shape]]:
    out = []
    for key, path in items:
        try:
            img = decode_png(Path(path).read_bytes(), path)
            out.append((key, encode_png(img, level), (img.shape[0], img.shape[1], img.shape[2])))
        except ValueError:
            raise
        except Exception as exc:  # anything else (OSError, cv2.error) still surfaces as one line
            msg = str(exc).strip().splitlines()
            raise ValueError(f"{path}: {type(exc).__name__}: {msg[-1] if msg else ''}") from None
    return out


def _encoded(todo: list[_Source], level: int, workers: int) -> Iterator[tuple[str, bytes, Shape]]:
    """Frames in key order; with workers > 1 a bounded window of chunks is in flight."""
    chunks = [[(s.key, str(s.path)) for s in todo[i:i + _CHUNK]] for i in range(0, len(todo), _CHUNK)]
    if workers <= 1:
        for chunk in chunks:
            yield from _encode_chunk(chunk, level)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker,
                               initargs=(os.getpid(),))
    window: deque[Future[list[tuple[str, bytes, Shape]]]] = deque()
    try:
        it = iter(chunks)
        for chunk in it:
            window.append(pool.submit(_encode_chunk, chunk, level))
            if len(window) >= 4 * workers:
                break
        while window:
            try:
                done = window.popleft().result()
            except BrokenProcessPool:
                raise RuntimeError("an encoding worker died (out of memory?); rerun to resume") from None
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.submit(_encode_chunk, nxt, level))
            yield from done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------- files


def _meta_line(key: str, shape: Shape, level: int) -> str:
    return f"{key}.png ({shape[0]},{shape[1]},{shape[2]}) {level}"


def read_meta_info(path: str | Path) -> list[MetaEntry]:
    """Parse an LMDB's meta_info.txt (BasicSR format), so readers never need to list the database."""
    meta = Path(path) / META_INFO
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta}: not found (is {path} an LMDB frame database?)") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        m = _META_LINE.match(line.strip())
        if m is None:
            raise ValueError(f"{meta}:{n}: malformed line {line.strip()!r}")
        name = m["name"]
        key = str(PurePosixPath(name).with_suffix("")) if PurePosixPath(name).suffix else name
        out.append(MetaEntry(key, name, (int(m["h"]), int(m["w"]), int(m["c"])), int(m["level"])))
    return out


def _check_finished(path: Path) -> None:
    if (path / STATE).exists() and not (path / COMPLETE).exists():
        raise ValueError(f"{path}: unfinished pack (pack_state.json, no .complete); rerun `gsm pack` to finish it")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); delete {path.parent} to repack") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: unexpected content; delete {path.parent} to repack")
    return data


def _same(old: Any, new: list[int]) -> bool:
    """A recorded stamp against the source's [bytes, mtime_ns]; packs made before mtimes were
    recorded hold the byte size alone (an int) and are compared on it."""
    return old == new[0] if isinstance(old, int) else old == new


def _diff_message(dst: Path, old: dict[str, Any], new: dict[str, list[int]]) -> str | None:
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(k for k in new.keys() & old.keys() if not _same(old[k], new[k]))
    if not (added or removed or changed):
        return None
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
             (("added", added), ("removed", removed), ("changed", changed)) if v]
    return f"{dst}: already packed from a different source: frames {', '.join(parts)}; delete {dst} to repack"


# -------------------------------------------------------------------------------------------- pack


def _committed_shapes(env: lmdb.Environment) -> dict[str, tuple[Shape, int]]:
    """Shape (from the stored PNG's header) and byte size of every committed value."""
    out: dict[str, tuple[Shape, int]] = {}
    with env.begin(buffers=True) as txn:
        for k, v in txn.cursor():
            key = bytes(k).decode()
            try:
                h, w = _png_hw(bytes(v[:24]), key)
            except ValueError:
                continue  # not ours: treated as stale and rewritten
            out[key] = ((h, w, 3), len(v))
    return out


def _write_batch(env: lmdb.Environment, items: list[tuple[bytes, bytes]], deletes: Sequence[bytes] = ()) -> int:
    """Commit one batch; on MapFullError double the map and retry. Returns how many times it grew."""
    grows = 0
    while True:
        try:
            with env.begin(write=True) as txn:
                for k in deletes:
                    txn.delete(k)
                with txn.cursor() as cur:
                    cur.putmulti(items)
            return grows
        except lmdb.MapFullError:
            size = env.info()["map_size"] * 2
            if size > _MAX_MAP_SIZE:
                raise RuntimeError(f"{env.path()}: LMDB map would exceed {_MAX_MAP_SIZE} bytes") from None
            env.set_mapsize(size)
            grows += 1
            log.info("%s: map full, grew to %.1f MiB", env.path(), size / 2**20)
        except lmdb.Error as exc:  # a full disk (DiskError, ENOSPC) or another write failure
            batch = sum(len(k) + len(v) for k, v in items)
            raise RuntimeError(f"{env.path()}: cannot commit {len(items)} frames ({batch / 2**20:.1f} MiB): {exc} "
                               f"({free_space(env.path())}); committed frames are kept, free space and rerun "
                               f"to resume") from None


def pack_lmdb(
    src: Path,
    dst: Path,
    *,
    level: int = 1,
    workers: int = 2,
    batch: int = 500,
    progress: bool = True,
    map_size: int | None = None,
    on_commit: Callable[[int], None] | None = None,
    replace_stale: bool = False,
) -> PackSummary:
    """Pack `src/**/*.png` into the LMDB folder `dst`; rerunning finishes an interrupted pack.

    Headers of all frames are checked (PNG, one size per clip) before `dst` is touched; a frame that
    fails to decode stops the pack with committed batches kept and `.complete` not written.
    `map_size` is the initial map (default: twice the source bytes), grown by doubling when full.
    `on_commit(frames_committed)` runs after each commit (progress reporting; tests use it to kill).
    A finished pack of other frames or another level is refused, unless `replace_stale` (the
    source is derived data that was regenerated): then it is deleted and packed afresh.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compression level must be 0-9, got {level}")
    if workers < 1 or batch < 1:
        raise ValueError(f"workers and batch must be >= 1, got {workers} and {batch}")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the LMDB folder must differ from the source folder")
    plan = _scan(src)
    n = len(plan.sources)

    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: exists and is not a folder")
    if replace_stale and (dst / COMPLETE).exists():
        done = _read_json(dst / COMPLETE)
        packed = done.get("sizes") or {e.key: -1 for e in read_meta_info(dst)}
        try:
            check_data_file(dst)
            damaged = False
        except ValueError:
            damaged = True
        if damaged or _diff_message(dst, packed, plan.sizes) or done.get("level") != level:
            log.info("%s: packed from other frames, or damaged; repacking", dst)
            shutil.rmtree(dst)
    ours = (dst / STATE).exists() or (dst / COMPLETE).exists()
    if dst.is_dir() and not ours and any(p.name != LOCK for p in dst.iterdir()):
        raise ValueError(f"{dst}: not empty and not a gsm pack; choose an empty or new folder")
    dst.mkdir(parents=True, exist_ok=True)
    lock_fh = (dst / LOCK).open("a")
    try:
        try:
            fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{dst}: another pack is writing this LMDB") from None

        if (dst / COMPLETE).exists():
            done = _read_json(dst / COMPLETE)
            packed: dict[str, Any] = done.get("sizes") or {e.key: -1 for e in read_meta_info(dst)}
            msg = _diff_message(dst, packed, plan.sizes)
            if msg:
                raise ValueError(msg)
            if done.get("level") != level:
                raise ValueError(f"{dst}: already packed at level {done.get('level')}, not {level}; "
                                 f"delete {dst} to repack")
            check_data_file(dst)  # "up to date" must not vouch for a truncated file
            entries = read_meta_info(dst)
            (dst / STATE).unlink(missing_ok=True)  # left if the last run died right after .complete
            return PackSummary(dst, "up-to-date", len(entries), 0, n, int(done.get("value_bytes", 0)), level,
                               int(done.get("map_size", 0)), 0, time.perf_counter() - t0)

        old_state: dict[str, Any] | None = _read_json(dst / STATE) if (dst / STATE).exists() else None
        if old_state is not None and old_state.get("level") != level:
            raise ValueError(f"{dst}: unfinished pack at level {old_state.get('level')}, not {level}; "
                             f"rerun with --level {old_state.get('level')} or delete {dst}")
        old_sizes: dict[str, Any] = (old_state or {}).get("sizes", {})
        new_state = json.dumps({"src": str(src.resolve()), "level": level, "frames": n, "sizes": plan.sizes})
        if old_state is None:  # before the database exists, so a half-made dst is always recognisable
            atomic_write_text(dst / STATE, new_state)
        (dst / META_INFO).unlink(missing_ok=True)  # only a finished pack has one

        src_bytes = sum(s.size for s in plan.sources)
        _drop_reader(str(dst.resolve()))  # a reader of ours on dst would block the writer's open
        check_data_file(dst)
        env = lmdb.open(str(dst), map_size=map_size or max(2 * src_bytes, 1 << 26), meminit=False)
        try:
            committed = _committed_shapes(env)
            shapes: dict[str, Shape] = {}
            nbytes: dict[str, int] = {}
            for s in plan.sources:  # keep a commit only if its source is unchanged since it was made
                got = committed.get(s.key)
                if got and s.key in old_sizes and _same(old_sizes[s.key], s.stamp) and got[0][:2] == s.hw:
                    shapes[s.key], nbytes[s.key] = got
            stale = sorted(k.encode() for k in committed.keys() - shapes.keys())
            todo = [s for s in plan.sources if s.key not in shapes]
            skipped = len(shapes)
            log.info("%s: %d frames, %d kept from an earlier run, %d stale", dst, n, skipped, len(stale))
            grows = _write_batch(env, [], stale) if stale else 0
            if old_state is not None:  # only now: every committed value matches the sizes it records
                atomic_write_text(dst / STATE, new_state)

            pending: list[tuple[bytes, bytes]] = []
            pending_bytes = 0
            by_key = {s.key: s for s in plan.sources}
            with tqdm(total=n, initial=skipped, unit="frame", desc=f"pack {dst.name}", disable=not progress,
                      dynamic_ncols=True) as bar:

                def commit() -> None:
                    nonlocal grows, pending, pending_bytes
                    grows += _write_batch(env, pending)
                    pending, pending_bytes = [], 0
                    if on_commit is not None:
                        on_commit(len(shapes))

                frames = _encoded(todo, level, workers)
                try:
                    for key, value, shape in frames:
                        if shape[:2] != by_key[key].hw:  # header and pixels disagree: a malformed PNG
                            h, w = by_key[key].hw
                            raise ValueError(f"{by_key[key].path}: decodes to {shape[1]}x{shape[0]}, "
                                             f"its header says {w}x{h}")
                        pending.append((key.encode(), value))
                        pending_bytes += len(value)
                        shapes[key], nbytes[key] = shape, len(value)
                        bar.update(1)
                        if len(pending) >= batch or pending_bytes >= _MAX_BATCH_BYTES:
                            commit()
                finally:
                    frames.close()  # stops the worker pool now, also on error
                if pending:
                    commit()
            env.sync(True)
            final_map = env.info()["map_size"]
        finally:
            env.close()

        value_bytes = sum(nbytes.values())
        keys = [s.key for s in plan.sources]
        atomic_write_text(dst / META_INFO, "".join(_meta_line(k, shapes[k], level) + "\n" for k in keys))
        atomic_write_text(dst / COMPLETE, json.dumps({"level": level, "frames": n, "value_bytes": value_bytes,
                                                  "map_size": final_map, "sizes": plan.sizes}))
        (dst / STATE).unlink(missing_ok=True)
        status = "resumed" if skipped or old_state is not None else "packed"
        return PackSummary(dst, status, n, len(todo), skipped, value_bytes, level, final_map, grows,
                           time.perf_counter() - t0)
    finally:
        lock_fh.close()


# ------------------------------------------------------------------------------------------ verify


def verify_lmdb(path: Path, *, src: Path | None = None, progress: bool = True) -> VerifySummary:
    """Decode every frame: a pack is trusted only after its values, not just its keys, check out.

    With `src` (the folder it was packed from) each value must also hold exactly the source PNG's
    pixels, and every source frame must be in the pack.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise FileNotFoundError(f"{path}: no LMDB here (data.mdb missing)")
    _check_finished(path)
    entries = read_meta_info(path)
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    value_bytes = 0
    sources = {s.key: s.path for s in _scan(Path(src)).sources} if src is not None else None
    env = _reader(str(path.resolve()))
    with env.begin(buffers=True) as txn:
        for e in tqdm(entries, unit="frame", desc=f"verify {path.name}", disable=not progress,
                      dynamic_ncols=True):
            if e.key in seen:
                problems.append((e.key, "listed twice in meta_info.txt"))
                continue
            seen.add(e.key)
            buf = txn.get(e.key.encode())
            if buf is None:
                problems.append((e.key, "in meta_info.txt but not in the LMDB"))
                continue
            value_bytes += len(buf)
            try:
                img = decode_png(bytes(buf), e.key)
            except ValueError:
                problems.append((e.key, "value does not decode"))
                continue
            if img.shape != e.shape:
                problems.append((e.key, f"decodes to {img.shape}, meta_info.txt says {e.shape}"))
            elif sources is not None:
                source = sources.pop(e.key, None)
                if source is None:
                    problems.append((e.key, f"not a frame of {src}"))
                elif not np.array_equal(img, decode_png(source.read_bytes(), str(source))):
                    problems.append((e.key, f"differs from its source {source} (repack)"))
        for k in txn.cursor().iternext(values=False):
            key = bytes(k).decode(errors="replace")
            if key not in seen:
                problems.append((key, "in the LMDB but not in meta_info.txt"))
    problems += [(key, f"in {src} but not in the pack") for key in sorted(sources or {})]
    if problems:
        key, reason = problems[0]
        raise VerifyError(f"{path}: {len(problems)} bad frame(s); first: {key}: {reason}", problems)
    return VerifySummary(path, len(entries), value_bytes, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- store


# One read-only handle per LMDB per process. py-lmdb refuses to open an environment twice in a
# process, and a forked child inherits the parent's handle (and that refusal); so handles are shared
# by path and, in a child, the inherited one is closed (harmless with lock=False) and reopened.
_READERS: dict[str, tuple[int, lmdb.Environment]] = {}


_META = 16  # bytes of LMDB's page header before each meta page's MDB_meta
_MAGIC = 0xBEEFC0DE


def check_data_file(folder: Path) -> None:
    """Refuse a truncated data.mdb before LMDB maps it: reading past the end of a mapped file kills
    the process with SIGBUS, no message. LMDB's two meta pages record the page size and the last page
    used; the newer one (higher transaction id) says how long the file must be."""
    data = Path(folder) / "data.mdb"
    if not data.is_file():
        return
    size = data.stat().st_size
    with data.open("rb") as fh:
        head = fh.read(_META + 136)
        need = 0
        if len(head) >= _META + 136 and struct.unpack_from("<I", head, _META)[0] == _MAGIC:
            psize = struct.unpack_from("<I", head, _META + 24)[0]  # FREE_DBI's md_pad holds the page size
            metas = [struct.unpack_from("<QQ", head, _META + 120)]
            fh.seek(psize)
            second = fh.read(_META + 136)
            if len(second) == _META + 136 and struct.unpack_from("<I", second, _META)[0] == _MAGIC:
                metas.append(struct.unpack_from("<QQ", second, _META + 120))
            last_pg = max(metas, key=lambda m: m[1])[0]
            need = (last_pg + 1) * psize
        elif size:
            need = -1
    if need < 0 or size < need:
        what = "is not an LMDB data file" if need < 0 else f"is truncated ({size} bytes, the database needs {need})"
        raise ValueError(f"{data} {what}: a crash mid-write or a partial copy; delete {Path(folder)} and pack it "
                         f"again (`gsm prepare --step pack`, or `dvc pull` / `dvc checkout` where it is cached)")


def _reader(path: str) -> lmdb.Environment:
    pid = os.getpid()
    entry = _READERS.get(path)
    if entry is not None:
        if entry[0] == pid:
            return entry[1]
        entry[1].close()  # inherited across fork: unmaps only this process's view
    check_data_file(Path(path))
    env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    _READERS[path] = (pid, env)
    return env


def _drop_reader(path: str) -> None:
    entry = _READERS.pop(path, None)
    if entry is not None:
        entry[1].close()


class LmdbStore:
    """FrameStore over an LMDB, opened lazily so it can be pickled or forked into DataLoader workers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"{self.path}: no LMDB here (data.mdb missing)")
        _check_finished(self.path)
        self._id = str(self.path.resolve())
        self._keys: list[str] | None = None

    def get(self, key: str) -> np.ndarray:
        with _reader(self._id).begin() as txn:
            data = txn.get(key.encode())
        if data is None:
            raise MissingFrameError(f"{key}: no such frame in LMDB {self.path}")
        return decode_png(data, f"{key} (LMDB {self.path})")

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = [e.key for e in read_meta_info(self.path)]
        return list(self._keys)

    def close(self) -> None:
        """Release this process's handle (shared with other stores on the same LMDB)."""
        _drop_reader(self._id)

    def __repr__(self) -> str:
        return f"LmdbStore({str(self.path)!r})"
