"""Video encoding for `FrameSink`: H.264 through PyAV, OpenCV's MPEG-4 Part 2 only as a fallback.

Why H.264 yuv420p with the moov atom first (+faststart): it is what browsers and phones play, and
starts playing before the whole file has arrived. OpenCV's wheels cannot write it ('avc1' is not
built in), and their 'mp4v' plays in desktop players only. PyAV's wheel bundles FFmpeg with libx264.

Colours: frames are converted with the BT.709 matrix in limited range and tagged so; untagged HD
video is shown as BT.709 by browsers, so a BT.601 conversion would shift every hue.

The input's first audio track is copied packet by packet (no re-encode, no quality loss), shifted
by the input video's start time so it stays in sync with the first frame, and interleaved with the
video as it is encoded. When the output container cannot hold that codec, the video is written
without audio and a notice says so. Every fallback prints a one-line notice on stderr.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from gsm.io import free_space

H264_ENCODER = "libx264"
# x264's default (23) visibly smooths the detail the network restores; 18 is near-transparent.
H264_CRF = "18"
BT709, LIMITED_RANGE = 1, 1  # AVColorSpace/AVColorPrimaries/AVColorTransferCharacteristic, AVColorRange
FASTSTART_EXTS = (".mp4", ".mov", ".m4v")  # ISO-BMFF containers, where +faststart applies
MP4V = "mp4v"


def notice(message: str) -> None:
    """One line on stderr that does not break a running progress bar."""
    tqdm.write(f"notice: {message}", file=sys.stderr)


@dataclass(frozen=True)
class AudioTrack:
    """The input's audio track to copy, and where its video starts (the audio is shifted by it)."""

    path: Path
    codec: str
    video_start: Fraction  # seconds
    tracks: int = 1  # audio tracks in the input; only the first is copied


def h264_missing() -> str | None:
    """Why H.264 cannot be written here (PyAV absent, or its FFmpeg lacks the encoder), else None."""
    try:
        import av
    except ImportError:
        return "PyAV (the av package) is not installed"
    try:
        av.Codec(H264_ENCODER, "w")
    except ValueError:
        return f"PyAV {av.__version__}'s FFmpeg has no {H264_ENCODER} encoder"
    return None


def probe_streams(path: Path) -> tuple[Fraction | None, AudioTrack | str | None]:
    """The video's exact frame rate and its first audio track, read from the container by PyAV;
    instead of the track, why PyAV could not read the streams (the caller says it)."""
    try:
        import av
    except ImportError:
        return None, "PyAV (the av package) is not installed"
    try:
        with av.open(str(path)) as container:
            return _rate_and_audio(path, container)
    except av.FFmpegError as err:
        return None, f"PyAV cannot read its streams ({err})"


def _rate_and_audio(path: Path, container: Any) -> tuple[Fraction | None, AudioTrack | None]:
    video = container.streams.video[0] if container.streams.video else None
    rate = (video.average_rate or video.guessed_rate) if video else None
    audio = container.streams.audio
    if not audio:
        return rate, None
    start = video.start_time * video.time_base if video and video.start_time else Fraction(0)
    return rate, AudioTrack(path, audio[0].codec_context.name, Fraction(start), len(audio))


def _remux_problem(format_name: str, stream: Any) -> str | None:
    """Why `stream` cannot be copied into a `format_name` container, found by writing an empty one in memory."""
    import av

    try:
        with av.open(io.BytesIO(), "w", format=format_name) as probe:
            probe.add_stream_from_template(stream)
            probe.start_encoding()
    except (ValueError, av.FFmpegError) as err:
        return str(err)
    return None


class _AudioCopy:
    """The input's audio packets, muxed into the output up to a time, so the file stays interleaved."""

    def __init__(self, inp: Any, stream_in: Any, stream_out: Any, video_start: Fraction) -> None:
        self.inp, self.stream = inp, stream_out
        self.shift = round(video_start / stream_in.time_base)
        self.packets = (p for p in inp.demux(stream_in) if p.dts is not None)  # dts None: demuxer flush
        self.pending = next(self.packets, None)

    def until(self, out: Any, seconds: Fraction | None) -> None:
        """Mux every packet that starts before `seconds` (all that are left when None)."""
        while self.pending is not None:
            p = self.pending
            start = ((p.dts if p.pts is None else p.pts) - self.shift) * p.time_base  # in the output's time
            if seconds is not None and start >= seconds:
                return
            p.dts -= self.shift
            if p.pts is not None:
                p.pts -= self.shift
            p.stream = self.stream
            out.mux(p)
            self.pending = next(self.packets, None)

    def close(self) -> None:
        self.inp.close()


class H264Writer:
    """H.264 yuv420p (BT.709) with +faststart, and the input's audio copied when there is one."""

    def __init__(self, tmp: Path, dst: Path, width: int, height: int, rate: Fraction,
                 audio: AudioTrack | None) -> None:  # fmt: skip
        import av

        if width % 2 or height % 2:
            raise ValueError(f"{dst}: H.264 yuv420p needs an even width and height, got {width}x{height}")
        self.dst, self.rate, self.frames = dst, rate, 0
        self.audio: _AudioCopy | None = None
        options = {"movflags": "+faststart"} if dst.suffix.lower() in FASTSTART_EXTS else {}
        self.out = av.open(str(tmp), "w", container_options=options)
        try:
            self.video = self._add_video(width, height)
            self.audio = self._copy_audio(audio) if audio is not None else None
        except BaseException:
            self.abort()
            raise

    def _add_video(self, width: int, height: int) -> Any:
        video = self.out.add_stream(H264_ENCODER, rate=self.rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": H264_CRF}
        cc = video.codec_context
        cc.colorspace = cc.color_primaries = cc.color_trc = BT709
        cc.color_range = LIMITED_RANGE
        return video

    def _copy_audio(self, audio: AudioTrack) -> _AudioCopy | None:
        import av

        inp = av.open(str(audio.path))
        stream_in = inp.streams.audio[0]
        problem = _remux_problem(self.out.format.name, stream_in)
        if problem:
            inp.close()
            notice(f"{self.dst}: {self.dst.suffix} files cannot hold {audio.path.name}'s {audio.codec} audio "
                   f"({problem}); writing the video without audio (an .mkv output keeps it)")  # fmt: skip
            return None
        if audio.tracks > 1:
            notice(f"{audio.path}: {audio.tracks} audio tracks; only the first is copied to {self.dst.name}")
        return _AudioCopy(inp, stream_in, self.out.add_stream_from_template(stream_in), audio.video_start)

    def write(self, rgb: np.ndarray) -> None:
        import av
        from av.video.reformatter import ColorRange, Colorspace

        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
        frame.pts = self.frames
        self._mux(lambda: self.out.mux(self.video.encode(frame)))
        self.frames += 1
        if self.audio is not None:
            self._mux(lambda: self.audio.until(self.out, self.frames / self.rate))  # type: ignore[union-attr]

    def _mux(self, step: Any) -> None:
        """Run one encoding step; FFmpeg's errors (a full disk) become one line naming the output."""
        import av

        try:
            step()
        except (av.FFmpegError, OSError) as err:
            why = getattr(err, "strerror", None) or err
            raise ValueError(f"{self.dst}: cannot write frame {self.frames} ({why}; {free_space(self.dst.parent)}); "
                             f"nothing written") from None  # fmt: skip

    def close(self) -> None:
        """Flush the encoder, the rest of the audio and the index (moved before the data: faststart)."""
        try:
            self._mux(lambda: self.out.mux(self.video.encode(None)))
            if self.audio is not None:
                self._mux(lambda: self.audio.until(self.out, None))  # type: ignore[union-attr]
            self._mux(self.out.close)
        finally:
            self.abort()

    def abort(self) -> None:
        """Release the files (idempotent); the caller removes the temporary output."""
        if self.audio is not None:
            self.audio.close()
            self.audio = None
        self.out.close()


class Mp4vWriter:
    """OpenCV's MPEG-4 Part 2 writer: the fallback without H.264. No audio; browsers do not play it."""

    def __init__(self, tmp: Path, dst: Path, width: int, height: int, rate: Fraction) -> None:
        self.writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*MP4V), float(rate), (width, height))
        if not self.writer.isOpened():
            self.writer.release()
            raise ValueError(f"{dst}: OpenCV cannot write a '{MP4V}' video with this extension")

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self.writer.release()

    def abort(self) -> None:
        self.writer.release()


def open_writer(tmp: Path, dst: Path, width: int, height: int, rate: Fraction,
                audio: AudioTrack | None) -> H264Writer | Mp4vWriter:  # fmt: skip
    """H.264 when PyAV can encode it; otherwise OpenCV's 'mp4v', announced by a notice."""
    missing = h264_missing()
    if missing is None:
        return H264Writer(tmp, dst, width, height, rate, audio)
    dropped = f", without {audio.path.name}'s audio" if audio is not None else ""
    notice(f"{dst}: {missing}; writing MPEG-4 Part 2 ('{MP4V}', which browsers do not play) with OpenCV{dropped}")
    return Mp4vWriter(tmp, dst, width, height, rate)
