"""SpyNet optical flow (Ranjan & Black, 2017), laid out like BasicSR's port.

The module tree mirrors BasicSR so its converted checkpoints (e.g.
``spynet_sintel_final-3d2a1287.pth``) load with ``strict=True``. Flows follow
the project convention: ``forward(ref, supp)`` returns f(ref -> supp), so
``flow_warp(supp, flow) ~= ref``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsm.data.download import RetriesExhausted, fetch
from gsm.data.sources import Source
from gsm.io import sha256_file
from gsm.ops.flow import flow_warp

__all__ = ["BasicModule", "SpyNet", "compute_flows"]

_LEVELS = 6
_MULTIPLE = 2 ** (_LEVELS - 1)
_HASH_SUFFIX = re.compile(r".*-([0-9a-fA-F]{8,64})\.[A-Za-z0-9.]+")


class BasicModule(nn.Module):
    """Per-level residual flow estimator; attribute name fixed by checkpoint keys."""

    def __init__(self) -> None:
        super().__init__()
        chans = (8, 32, 64, 32, 16, 2)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers.append(nn.Conv2d(cin, cout, kernel_size=7, stride=1, padding=3))
            if i < len(chans) - 2:
                layers.append(nn.ReLU(inplace=False))
        self.basic_module = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.basic_module(x)


class SpyNet(nn.Module):
    """Coarse-to-fine flow network over a 6-level average-pooling pyramid.

    ``weights`` is a local path, ``file://`` URL or ``http(s)://`` URL (cached
    under ``$GSM_CACHE`` or ``~/.cache/gsm``). It is verified against ``sha256``
    when given, else against a ``-<hex>`` suffix in its file name. Without
    weights the net is random and its flows are meaningless until trained.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, weights: str | os.PathLike[str] | None = None, sha256: str | None = None) -> None:
        super().__init__()
        self.basic_module = nn.ModuleList(BasicModule() for _ in range(_LEVELS))
        # Non-persistent: the state dict must stay key-for-key BasicSR's.
        self.register_buffer(
            "mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False
        )
        if weights is None:
            warnings.warn(
                "SpyNet created without weights: it is randomly initialised and its "
                "flows are meaningless until trained",
                stacklevel=2,
            )
        else:
            path = _resolve_weights(os.fspath(weights), sha256)
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors have no common base class
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"cannot read SpyNet checkpoint {path.name}: {msg}") from None
        state = ckpt
        if isinstance(ckpt, Mapping):
            for key in ("params", "state_dict"):
                if key in ckpt and isinstance(ckpt[key], Mapping):
                    state = ckpt[key]
                    break
        if not isinstance(state, Mapping):
            raise ValueError(f"SpyNet checkpoint {path.name} holds no state dict")
        expected = set(self.state_dict())
        found = set(state)
        if found != expected:
            missing = sorted(expected - found)
            extra = sorted(found - expected)
            raise ValueError(
                f"SpyNet checkpoint {path.name} does not match the network: "
                f"{len(missing)} missing key(s) {missing[:3]}, "
                f"{len(extra)} unexpected key(s) {extra[:3]}"
            )
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise ValueError(f"SpyNet checkpoint {path.name} does not load: {detail}") from None

    def forward(self, ref: Tensor, supp: Tensor) -> Tensor:
        """Flow f(ref -> supp), (N, 2, H, W), for [0, 1] RGB images of any size.

        The pyramid needs sides divisible by 32, so inputs are resized to the
        next multiples and the flow is resized back with its vectors rescaled.
        """
        if ref.dim() != 4 or ref.shape[1] != 3 or ref.shape != supp.shape:
            raise ValueError(
                f"SpyNet expects two (N, 3, H, W) images of equal shape, got "
                f"{tuple(ref.shape)} and {tuple(supp.shape)}"
            )
        h, w = ref.shape[-2:]
        h32 = math.ceil(h / _MULTIPLE) * _MULTIPLE
        w32 = math.ceil(w / _MULTIPLE) * _MULTIPLE
        resized = (h32, w32) != (h, w)
        if resized:
            ref = F.interpolate(ref, size=(h32, w32), mode="bilinear", align_corners=False)
            supp = F.interpolate(supp, size=(h32, w32), mode="bilinear", align_corners=False)
        flow = self._pyramid_flow(ref, supp)
        if resized:
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            scale = torch.tensor([w / w32, h / h32], device=flow.device, dtype=flow.dtype)
            flow = flow * scale.view(1, 2, 1, 1)
        return flow

    def pyramid_flows(self, ref: Tensor, supp: Tensor) -> list[Tensor]:
        """The flow at every pyramid level, coarsest first (sides divisible by 32): distillation
        supervises each level, so the coarse modules learn without waiting on the fine ones."""
        flows: list[Tensor] = []
        self._pyramid_flow(ref, supp, flows)
        return flows

    def _pyramid_flow(self, ref: Tensor, supp: Tensor, levels: list[Tensor] | None = None) -> Tensor:
        refs = [(ref - self.mean) / self.std]
        supps = [(supp - self.mean) / self.std]
        for _ in range(_LEVELS - 1):
            refs.append(F.avg_pool2d(refs[-1], kernel_size=2, stride=2, count_include_pad=False))
            supps.append(F.avg_pool2d(supps[-1], kernel_size=2, stride=2, count_include_pad=False))

        flow: Tensor | None = None
        for level, (r, s) in enumerate(zip(reversed(refs), reversed(supps))):
            if flow is None:
                # Upsampling a zero flow is still zero; starting at the coarsest
                # size directly also covers a 1-pixel coarsest level.
                up = r.new_zeros(r.shape[0], 2, r.shape[2], r.shape[3])
            else:
                up = F.interpolate(flow, scale_factor=2.0, mode="bilinear", align_corners=True) * 2.0
                pad_h = r.shape[2] - up.shape[2]
                pad_w = r.shape[3] - up.shape[3]
                if pad_h or pad_w:
                    up = F.pad(up, (0, pad_w, 0, pad_h), mode="replicate")
            warped = flow_warp(s, up, padding_mode="border")
            flow = up + self.basic_module[level](torch.cat([r, warped, up], dim=1))
            if levels is not None:
                levels.append(flow)
        assert flow is not None
        return flow


def compute_flows(
    spynet: Callable[[Tensor, Tensor], Tensor], lqs: Tensor
) -> tuple[Tensor, Tensor]:
    """Adjacent-frame flows of clips (B, T, 3, H, W) in one batched call.

    Returns fwd[:, t] = f(t -> t+1) and bwd[:, t] = f(t+1 -> t), both
    (B, T-1, 2, H, W); empty along T for single-frame clips.
    """
    if lqs.dim() != 5:
        raise ValueError(f"compute_flows expects (B, T, C, H, W), got {tuple(lqs.shape)}")
    b, t, c, h, w = lqs.shape
    if t < 2:
        return lqs.new_zeros(b, 0, 2, h, w), lqs.new_zeros(b, 0, 2, h, w)
    early = lqs[:, :-1].reshape(b * (t - 1), c, h, w)
    late = lqs[:, 1:].reshape(b * (t - 1), c, h, w)
    flows = spynet(torch.cat([early, late]), torch.cat([late, early]))
    flows = flows.view(2, b, t - 1, 2, h, w)
    return flows[0], flows[1]


# --------------------------------------------------------------------------- weights


# Attempts after the first, seconds before the first retry (doubling), seconds without a byte.
FETCH_RETRIES = 2
FETCH_BACKOFF = 1.0
FETCH_TIMEOUT = 60.0


def _cache_dir() -> Path:
    return Path(os.environ.get("GSM_CACHE") or Path.home() / ".cache" / "gsm")


def _check_digest(name: str, actual: str, sha256: str | None) -> None:
    """Raise if ``actual`` contradicts the explicit digest or the name's hash suffix."""
    if sha256 is not None:
        if actual != sha256.lower():
            raise ValueError(
                f"checksum mismatch for {name}: expected sha256 {sha256.lower()}, got {actual}"
            )
        return
    match = _HASH_SUFFIX.fullmatch(name)
    if match and not actual.startswith(match.group(1).lower()):
        raise ValueError(
            f"checksum mismatch for {name}: file name says sha256 starts with "
            f"{match.group(1).lower()}, got {actual}"
        )


def _download(url: str, dest: Path, sha256: str | None) -> None:
    """Fetch with the dataset downloader's retries into a temp folder beside ``dest``, verify, then
    rename: ``dest`` only ever holds verified weights and a failure leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        try:
            got = fetch(Source("SpyNet", url, dest=dest.name), tmp, retries=FETCH_RETRIES,
                        backoff=FETCH_BACKOFF, timeout=FETCH_TIMEOUT, progress=sys.stderr.isatty())
        except RetriesExhausted as exc:
            raise ConnectionError(
                f"SpyNet weights: cannot fetch {url}: {exc.reason} ({exc.attempts} tries); "
                "set model.spynet_weights to a local file or null"
            ) from None
        _check_digest(dest.name, sha256_file(got), sha256)
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_weights(weights: str, sha256: str | None) -> Path:
    """Turn a path or URL into a verified local file."""
    parsed = urllib.parse.urlparse(weights)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        name = Path(urllib.parse.unquote(parsed.path)).name
        if not name:
            raise ValueError(f"cannot derive a file name from URL {weights}")
        dest = _cache_dir() / name
        if dest.is_file():
            try:
                _check_digest(name, sha256_file(dest), sha256)
                return dest
            except ValueError:
                pass  # stale or corrupt cache entry: fetch again
        _download(weights, dest, sha256)
        return dest
    if scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
    else:
        path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SpyNet weights not found: {path}")
    _check_digest(path.name, sha256_file(path), sha256)
    return path
