"""Video output: H.264 yuv420p with +faststart, the input's exact frame rate and audio, and the
OpenCV 'mp4v' fallback when no H.264 encoder is there, announced by a notice."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import gsm.serve.video_out as video_out
from gsm.models.gsmamba import GSMamba
from gsm.serve.upscale import upscale_video
from test_upscale import _frames, model  # noqa: F401 - the tiny network fixture

NTSC = Fraction(30000, 1001)


def _video_with_audio(path: Path, n: int, rate: Fraction, audio: str | None = "aac") -> Path:
    """n frames of 24x20 MPEG-4 video at `rate` and, unless None, as long a 48 kHz mono tone in `audio`."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=rate)
        video.width, video.height, video.pix_fmt = 24, 20, "yuv420p"
        sound = out.add_stream(audio, rate=48000, layout="mono") if audio else None
        for frame in _frames(n, 20, 24):
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode(None))
        if sound is not None:
            samples = round(48000 * n / rate)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)[None]
            chunk = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
            chunk.sample_rate = 48000
            out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))
    return path


def _streams(path: Path) -> dict[str, object]:
    """What a player sees: codecs, pixel format, exact rate, decoded frame count, audio duration."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info: dict[str, object] = {"codec": v.codec_context.name, "pix_fmt": v.codec_context.pix_fmt,
                                   "rate": v.average_rate, "frames": sum(1 for _ in c.decode(v))}  # fmt: skip
        a = c.streams.audio[0] if c.streams.audio else None
        info["audio"] = (a.codec_context.name, float(a.duration * a.time_base)) if a and a.duration else None
        info["tag"] = v.codec_context.codec_tag
    return info


def _top_level_boxes(path: Path) -> list[str]:
    """The ISO-BMFF boxes at the top of an .mp4, in file order."""
    data, names, i = path.read_bytes(), [], 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        if size == 1:
            size = int.from_bytes(data[i + 8:i + 16], "big")
        names.append(data[i + 4:i + 8].decode("latin-1"))
        if size < 8:
            break
        i += size
    return names


def test_video_is_h264_yuv420p_faststart_with_the_inputs_exact_rate_and_audio(
    tmp_path: Path, model: GSMamba
) -> None:
    src = _video_with_audio(tmp_path / "in.mp4", 7, NTSC)
    summary = upscale_video(model, src, tmp_path / "out.mp4", chunk=4, chunk_overlap=2, progress=False)
    got, given = _streams(tmp_path / "out.mp4"), _streams(src)
    assert (got["codec"], got["pix_fmt"], got["rate"], got["frames"]) == ("h264", "yuv420p", NTSC, 7)
    assert summary.fps == pytest.approx(29.97002997)
    assert given["audio"] is not None and got["audio"] is not None
    assert got["audio"][0] == "aac" and got["audio"][1] == pytest.approx(given["audio"][1], abs=1e-3)
    boxes = _top_level_boxes(tmp_path / "out.mp4")
    assert boxes.index("moov") < boxes.index("mdat")  # +faststart: playable while downloading


@pytest.mark.parametrize("src_name, audio, dst_name, fps, message", [
    ("in.mkv", "libopus", "out.mov", None, ".mov files cannot hold in.mkv's opus audio"),
    ("in.mp4", "aac", "out.mp4", 10.0, "--fps 10 changes the speed of the video"),
])
def test_audio_that_cannot_be_kept_is_left_out_with_a_notice(
    tmp_path: Path, model: GSMamba, capsys: pytest.CaptureFixture[str], src_name: str, audio: str,
    dst_name: str, fps: float | None, message: str,
) -> None:
    src = _video_with_audio(tmp_path / src_name, 3, Fraction(25), audio)
    upscale_video(model, src, tmp_path / dst_name, fps=fps, progress=False)
    got = _streams(tmp_path / dst_name)
    assert (got["codec"], got["frames"], got["audio"]) == ("h264", 3, None)
    assert got["rate"] == Fraction(str(fps or 25))
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 1 and message in notices[0]


def test_without_an_h264_encoder_it_writes_mp4v_and_says_so(
    tmp_path: Path, model: GSMamba, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(video_out, "H264_ENCODER", "no-such-h264-encoder")
    src = _video_with_audio(tmp_path / "in.mp4", 3, Fraction(25))
    upscale_video(model, src, tmp_path / "out.mp4", progress=False)
    got = _streams(tmp_path / "out.mp4")
    assert (got["codec"], got["tag"], got["frames"], got["audio"]) == ("mpeg4", "mp4v", 3, None)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"notice: {tmp_path / 'out.mp4'}: PyAV {av.__version__}'s FFmpeg has no no-such-h264-encoder "
                   f"encoder; writing MPEG-4 Part 2 ('mp4v', which browsers do not play) with OpenCV, without "
                   f"in.mp4's audio"]  # fmt: skip
