"""Where the raw datasets come from, and what their archives must look like to be trusted.

Sizes and checksums are recorded only where they are known facts; a ``None`` means "not checked",
never a guess. Mirrors and checksums are set per machine in the ``sources:`` section of
params.yaml (see ``sources_from_dict``). A URL may be ``http(s)://``, ``file://`` or a plain path.

Vid4 has no single official download: its three sources carry no URL until a mirror is set, and
using them before that is a one-line error telling which params.yaml key to fill in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

_HEX = {"sha256": 64, "md5": 32}
_OVERRIDABLE = ("url", "size", "sha256", "md5", "dest")


def _check_field(where: str, key: str, value: Any) -> Any:
    """Validate one field; ``where`` prefixes the message so params.yaml errors name their key."""
    if key == "url":
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{where}.url must be a non-empty string or null, got {value!r}")
        return value
    if key == "size":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}.size must be a byte count (int >= 0) or null, got {value!r}")
        return value
    if key in _HEX:
        if value is None:
            return None
        if not isinstance(value, str) or not re.fullmatch(rf"[0-9a-fA-F]{{{_HEX[key]}}}", value):
            raise ValueError(
                f"{where}.{key} must be a {_HEX[key]}-digit hex string (quote it in YAML) or null, got {value!r}"
            )
        return value.lower()
    if key == "dest":
        if not isinstance(value, str) or (value and (value != PurePosixPath(value).name or value in (".", ".."))):
            raise ValueError(f"{where}.dest must be a plain file name (no folders), got {value!r}")
        return value
    raise ValueError(f"unknown key {where}.{key} (known: {', '.join(_OVERRIDABLE)})")


@dataclass(frozen=True)
class Source:
    """One downloadable archive. ``dest`` is the file name under the download folder ("" = URL's)."""

    name: str
    url: str | None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    dest: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"source name must be a plain identifier, got {self.name!r}")
        for key in _OVERRIDABLE:
            # Frozen: normalised values (lower-case hex) are written back through object.__setattr__.
            object.__setattr__(self, key, _check_field(f"sources.{self.name}", key, getattr(self, key)))

    @property
    def filename(self) -> str:
        """File name to store the archive under; stable across mirrors when ``dest`` is set."""
        if self.dest:
            return self.dest
        if self.url:
            base = unquote(PurePosixPath(urlsplit(self.url).path if "://" in self.url else self.url).name)
            if base and base not in (".", ".."):
                return base
        return self.name


def require_url(source: Source) -> str:
    """The source's URL, or the one-line error that says which params.yaml key to set."""
    if not source.url:
        raise ValueError(f"source {source.name} has no URL: set sources.{source.name}.url in params.yaml")
    return source.url


_REDS = "http://data.cv.snu.ac.kr:8008/webdav/dataset/REDS/{}.zip"

DEFAULT_SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        # REDS (NTIRE 2019), SNU CV lab server. No published checksums or byte sizes.
        Source("reds_train_sharp", _REDS.format("train_sharp")),
        Source("reds_train_sharp_bicubic", _REDS.format("train_sharp_bicubic")),
        Source("reds_val_sharp", _REDS.format("val_sharp")),
        Source("reds_val_sharp_bicubic", _REDS.format("val_sharp_bicubic")),
        # Vimeo-90K septuplet, about 82 GB (exact byte count not published, so not checked).
        Source("vimeo_septuplet", "http://data.csail.mit.edu/tofu/dataset/vimeo_septuplet.zip"),
        # Vid4: no official single archive; set a mirror (URL or local path) in params.yaml.
        Source("vid4_gt", None),
        Source("vid4_bix4", None),
        Source("vid4_bdx4", None),
    )
}


def sources_from_dict(d: dict[str, Any] | None, where: str = "sources") -> dict[str, Source]:
    """Defaults merged with a params.yaml ``sources:`` section (per-source url/size/sha256/md5/dest).

    An override keeps the default's other fields: a mirror serves the same bytes, so known
    checksums still apply. Unknown names or keys are a one-line ValueError naming the key.
    """
    if d is None:
        return dict(DEFAULT_SOURCES)
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping of source name -> settings")
    out = dict(DEFAULT_SOURCES)
    for name, entry in d.items():
        if name not in DEFAULT_SOURCES:
            raise ValueError(f"unknown source {where}.{name} (known: {', '.join(DEFAULT_SOURCES)})")
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{where}.{name} must be a mapping with keys {', '.join(_OVERRIDABLE)}")
        changes = {str(k): _check_field(f"{where}.{name}", str(k), v) for k, v in entry.items()}
        out[name] = replace(DEFAULT_SOURCES[name], **changes)
    return out
