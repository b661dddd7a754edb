"""Streaming x4 video upscaling with a trained GSMamba, in overlapping temporal chunks.

Why chunks: GSMamba propagates features over the whole clip it is given (alternating forward and
backward layers, SWSA across frames), so memory grows with the clip's length. A video is therefore
cut into chunks of `chunk` frames; consecutive chunks share `chunk_overlap` frames. Chunking is an
approximation of running the whole video at once: frames near a chunk's edge lose the context
beyond it. The overlap hides that:

* the overlap must be at least the model's temporal window radius r (the farthest neighbour a
  gather-scatter window reaches from its anchor), so every frame taken from one chunk alone has
  its whole window inside that chunk. The default, 4, is 2r for the paper's window of 5: then each
  shared frame also has its whole window inside at least one of its two chunks;
* the shared frames are cross-faded with linear weights (earlier chunk fading out, later chunk
  fading in), which favours the chunk where a frame sits farther from the edge and moves gradually
  from one chunk's estimate to the next, instead of jumping at one frame (a flicker at every chunk
  boundary). Propagation carries context beyond one window, so this stays an approximation; the
  tests bound its distance from the whole-clip output;
* the last chunk is shifted back to end at the last frame, so it always has `chunk` frames of
  context instead of a short remainder; its frames already written are dropped.

A video of at most `chunk` frames is one chunk: exactly the whole-clip output.

Memory: only the current chunk of input frames (plus one frame read ahead, to know the end) and the
`chunk_overlap` output frames waiting for their cross-fade are held; every other output frame is
written as soon as it is final. Spatial tiles (`tile`) bound the per-chunk memory in H x W too.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from gsm.models.config import GSMConfig
from gsm.models.gsmamba import upscale_tiled, window_slots
from gsm.ops.backend import resolve_device
from gsm.serve.frames import (
    DEFAULT_FPS,
    FrameSink,
    SourceInfo,
    check_output,
    iter_frames,
    output_is_video,
    probe_source,
)
from gsm.serve.video_out import AudioTrack, notice


@dataclass(frozen=True)
class UpscaleSummary:
    output: Path
    frames: int
    input_size: tuple[int, int]  # (width, height)
    output_size: tuple[int, int]  # (width, height)
    fps: float | None  # frame rate of the written video; None for a PNG folder
    seconds: float  # reading, upscaling and writing, model loading excluded

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_frame(self) -> float:
        return self.seconds / self.frames if self.frames else 0.0


def temporal_radius(model: nn.Module) -> int:
    """How far (in frames) a GSMamba gather-scatter window reaches from its anchor; 0 if unknown."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, GSMConfig):
        return 0
    ids, _ = window_slots(0, cfg)
    return max(abs(i) for i in ids)


def check_chunking(chunk: int, chunk_overlap: int, radius: int) -> None:
    """Each frame falls in at most two chunks; a frame taken from one chunk alone sees its whole window."""
    if chunk < 1 or chunk_overlap < 0:
        raise ValueError(f"chunk must be >= 1 and chunk overlap >= 0, got chunk={chunk}, overlap={chunk_overlap}")
    if chunk_overlap < radius:
        raise ValueError(
            f"chunk overlap {chunk_overlap} is below the model's temporal window radius {radius}: "
            f"frames next to the overlaps would miss part of their window"
        )
    if 2 * chunk_overlap > chunk:
        raise ValueError(f"chunk overlap {chunk_overlap} must be at most half the chunk ({chunk})")


class ChunkStitcher:
    """Turns overlapping chunk outputs into final frames, in order, cross-fading shared frames.

    `add(start, out, last)` takes the output of frames [start, start + len(out)); chunks arrive in
    order and each starts at or before the first frame not yet final. It returns the frames that
    became final; the chunk's last `overlap` frames wait for the next chunk unless `last`.
    """

    def __init__(self, overlap: int) -> None:
        self.overlap = overlap
        self.done = 0  # frames [0, done) are final
        self.pending: Tensor | None = None  # earlier chunk's output for [done, done + len(pending))

    def add(self, start: int, out: Tensor, last: bool) -> list[Tensor]:
        """Final frames, one (C, H, W) tensor each: views or small blends, never a copy of the chunk."""
        skip = self.done - start
        if skip < 0 or skip > out.shape[0]:
            raise ValueError(f"chunk [{start}, {start + out.shape[0]}) does not continue frame {self.done}")
        out = out[skip:]
        blended: list[Tensor] = []
        if self.pending is not None:
            p = self.pending.shape[0]
            if p > out.shape[0]:
                raise ValueError(f"chunk [{start}, {start + skip + out.shape[0]}) ends inside the overlap")
            fade_in = torch.linspace(0, 1, p + 2, device=out.device, dtype=out.dtype)[1:-1].view(-1, 1, 1, 1)
            blended = list((self.pending * (1 - fade_in) + out[:p] * fade_in).unbind(0))
        keep = out.shape[0] if last else max(out.shape[0] - self.overlap, 0)
        # A copy, so the chunk's whole output can be freed before the next chunk runs.
        self.pending = None if last else out[keep:].clone()
        self.done += keep
        return (blended + list(out[len(blended):keep].unbind(0)))[:keep]


def _run_chunk(
    model: nn.Module, frames: list[np.ndarray], device: torch.device, tile: int | None, tile_overlap: int,
    bf16: bool,
) -> Tensor:
    """uint8 RGB frames -> the model's (T, 3, sH, sW) float32 output for them as one clip."""
    lqs = torch.from_numpy(np.stack(frames)).to(device).permute(0, 3, 1, 2).float().div_(255).unsqueeze(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = upscale_tiled(model, lqs, tile, tile_overlap)
    return out[0].float()


def _to_uint8(frame: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded."""
    return frame.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _with_lookahead(frames: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
    """Pairs (frame, is_last): reads one frame ahead so the last chunk is known when it is full."""
    current = next(frames, None)
    while current is not None:
        following = next(frames, None)
        yield current, following is None
        current = following


def _check_args(
    tile: int | None, tile_overlap: int, fps: float | None, bf16: bool, device: torch.device
) -> None:
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if tile is not None and not 0 <= tile_overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got overlap={tile_overlap}, tile={tile}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if bf16 and device.type != "cuda":
        raise ValueError(f"bf16 autocast needs a CUDA device, got {device}")


def upscale_frames(
    model: nn.Module,
    frames: Iterable[np.ndarray],
    *,
    chunk: int = 32,
    chunk_overlap: int = 4,
    tile: int | None = None,
    tile_overlap: int = 16,
    device: torch.device,
    bf16: bool = False,
) -> Iterator[np.ndarray]:
    """Upscaled frames, in order, of a stream of (H, W, 3) uint8 RGB frames: the chunked core of
    `upscale_video`, also what the registered MLflow model runs on in-memory clips.

    The caller puts `model` on `device` in eval mode under inference mode; arguments are checked
    by the callers (`check_chunking`). Each output frame is yielded as soon as it is final.
    """
    scale = int(getattr(model, "scale", 4))
    stitcher = ChunkStitcher(chunk_overlap)
    window: deque[np.ndarray] = deque(maxlen=chunk)  # the current chunk's input frames
    read, next_end = 0, chunk
    for frame, last in _with_lookahead(iter(frames)):
        window.append(frame)
        read += 1
        if read != next_end and not last:
            continue
        out = _run_chunk(model, list(window), device, tile, tile_overlap, bf16)
        expected = (frame.shape[0] * scale, frame.shape[1] * scale)
        if tuple(out.shape[-2:]) != expected:
            raise ValueError(f"model output is {tuple(out.shape[-2:])}, expected {expected} (x{scale})")
        final = stitcher.add(read - len(window), out, last)
        del out  # only the pending overlap outlives the chunk
        while final:
            yield _to_uint8(final.pop(0))
        next_end = read + chunk - chunk_overlap


def progress_bar(total: int | None, name: str, enabled: bool = True, file: Any = None) -> tqdm:
    """A frame counter whose ETA holds still although frames come out in bursts, one chunk at a
    time (on a CPU, minutes apart, then milliseconds apart): the rate is the average since the start
    (smoothing=0; tqdm's moving average would take a burst's milliseconds for the speed), and every
    frame is drawn (mininterval=0), so the bar does not sit short of a burst's end until the next."""
    return tqdm(total=total, unit="frame", desc=f"upscale {name}", disable=not enabled, dynamic_ncols=True,
                smoothing=0, mininterval=0, miniters=1, file=file)


def _check_names(info: SourceInfo) -> None:
    """Output PNGs reuse input stems; `a.png` and `a.jpg` would collide."""
    seen: dict[str, Path] = {}
    for path in info.frames:
        if path.stem in seen:
            raise ValueError(f"{path}: same name as {seen[path.stem].name}; their upscaled PNGs would collide")
        seen[path.stem] = path


def output_rate(fps: float | None, info: SourceInfo) -> Fraction:
    """`fps` as typed (12.5 -> 25/2), else the input's exact rate, else OpenCV's float made rational, else 25."""
    if fps is not None:
        return Fraction(str(fps))
    if info.rate:
        return info.rate
    return Fraction(info.fps or DEFAULT_FPS).limit_denominator(1001)  # 29.97002997 -> 30000/1001


def audio_to_copy(info: SourceInfo, fps: float | None) -> AudioTrack | None:
    """The input's audio track, unless `fps` changes the video's speed: the audio would drift."""
    if isinstance(info.audio, str):
        notice(f"{info.path}: {info.audio}; its audio, if any, is not copied")
        return None
    if info.audio is None or fps is None or output_rate(fps, info) == output_rate(None, info):
        return info.audio
    notice(f"{info.path}: --fps {fps:g} changes the speed of the video (its own rate is "
           f"{float(output_rate(None, info)):g}); its audio would drift, so it is not copied")  # fmt: skip
    return None


def upscale_video(
    model: nn.Module,
    src: str | Path,
    dst: str | Path,
    *,
    chunk: int = 32,
    chunk_overlap: int = 4,
    tile: int | None = None,
    tile_overlap: int = 16,
    fps: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    bf16: bool = False,
    allow_truncated: bool = False,
) -> UpscaleSummary:
    """Upscale a video file, frame folder or image into a video file or a folder of PNGs.

    `dst` with a video extension (.mp4, .avi, .mkv, .mov, .m4v) is written as H.264 at `fps`
    (default: the input's exact frame rate, or 25 for frames) with the input's audio copied
    (`gsm.serve.video_out`, which says when it falls back); any other name, or one ending in a
    slash, becomes a folder of PNGs (named like the input frames, or 00000000.png ... for videos).
    The output appears only once complete (a video: once it decodes to every frame). A video that
    decodes to fewer frames than its container declares is an error unless `allow_truncated`. The model is moved to `device` (default: CUDA when
    available), run in eval mode without autograd, and left in its former train/eval mode.
    """
    dev = resolve_device(device, "--device")
    _check_args(tile, tile_overlap, fps, bf16, dev)
    check_chunking(chunk, chunk_overlap, temporal_radius(model))
    video_out = output_is_video(dst)
    info = probe_source(src)
    dst = check_output(dst, overwrite, src=info.path)
    if not video_out:
        _check_names(info)
    scale = int(getattr(model, "scale", 4))
    out_w, out_h = info.width * scale, info.height * scale
    rate = output_rate(fps, info)
    audio = audio_to_copy(info, fps) if video_out else None

    was_training = model.training
    model.to(dev).eval()
    start_time = time.perf_counter()
    try:
        with (
            torch.inference_mode(),
            FrameSink(dst, out_w, out_h, rate, names=info.names, overwrite=overwrite, audio=audio) as sink,
            progress_bar(info.count, info.path.name, progress) as bar,
        ):
            for frame in upscale_frames(model, iter_frames(info, allow_truncated), chunk=chunk, chunk_overlap=chunk_overlap,
                                        tile=tile, tile_overlap=tile_overlap, device=dev, bf16=bf16):
                sink.write(frame)
                bar.update(1)
            frames = sink.count
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start_time
    return UpscaleSummary(dst, frames, (info.width, info.height), (out_w, out_h),
                          float(rate) if video_out else None, seconds)


def upscale_from_checkpoint(
    checkpoint: str | Path, src: str | Path, dst: str | Path, *, use_ema: bool = True, **kwargs: Any
) -> UpscaleSummary:
    """`upscale_video` with the network of a training checkpoint (its EMA weights by default).

    The input and output are checked before the model is loaded, so a typo fails at once.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint file")
    info = probe_source(src)
    check_output(dst, bool(kwargs.get("overwrite", False)), src=info.path)
    from gsm.train.checkpoint import load_model

    model = load_model(checkpoint, use_ema=use_ema, map_location="cpu")
    return upscale_video(model, src, dst, **kwargs)
