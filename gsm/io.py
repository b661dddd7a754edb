"""Small file helpers shared by every stage."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask, read from /proc where it can be (os.umask would change it, racing threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """What open() / mkdir() would give (0666 / 0777 minus the umask); mkstemp / mkdtemp give 0600 / 0700."""
    return (0o777 if folder else 0o666) & ~umask()


def free_space(folder: str | Path) -> str:
    """`123 MiB free` on the disk holding `folder`, for one-line disk-full errors."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        return "free space unknown"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a temporary named after a dead one is an orphan)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temp_prefix(final: Path) -> str:
    """Name prefix of a hidden temporary for `final`, carrying this process's id: `.<name>.gsm-<pid>-`."""
    return f".{final.name}.gsm-{os.getpid()}-"


def remove_orphans(final: Path) -> list[Path]:
    """Delete the temporaries of `final` (see temp_prefix) whose process is gone (killed with -9)."""
    head = f".{final.name}.gsm-"
    removed = []
    for path in final.parent.glob(glob.escape(head) + "*"):
        pid, _, rest = path.name[len(head):].partition("-")
        if not pid.isdigit() or not rest.endswith((".tmp", ".old")) and ".part" not in rest:
            continue
        if pid_alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file.

    `durable` fsyncs before the rename (markers, metadata); bulk frames skip it, since the marker
    written after them is what vouches for a finished clip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())  # the rename must not land before the data
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (FileNotFoundError when it is missing)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cpu_name() -> str:
    """The CPU's model name, recorded beside every timing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a local server the project starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_healthy(url: str, proc: Any, timeout: float, what: str, hint: str = "") -> None:
    """Poll `url` until it answers 200 or `proc` (a Popen of the server) exits, for local servers
    started by the project (Prefect, the MLflow UI); `what` and `hint` name it in the error."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited (code {proc.returncode}){hint}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer in {timeout:.0f} s{hint}")
        time.sleep(0.5)
