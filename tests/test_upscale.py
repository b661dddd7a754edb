"""Streaming upscaling: videos and frame folders in and out, chunk stitching, atomic outputs, bad input."""

from __future__ import annotations

import io
import os
import re
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from gsm.data.images import read_image, write_png
from gsm.models.config import GSMConfig
from gsm.models.gsmamba import GSMamba
from gsm.serve.frames import iter_frames, probe_source
from gsm.serve.upscale import ChunkStitcher, UpscaleSummary, progress_bar, upscale_from_checkpoint, upscale_video

# window=3: temporal radius 1, so chunks as short as 2-4 frames are legal and tests stay fast.
TINY = GSMConfig(embed_dim=16, num_heads=2, prop_layers=1, attn_depth=1, d_state=4, mid_channels=16, window=3)


@pytest.fixture(scope="module")
def model() -> GSMamba:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random SpyNet
        return GSMamba(TINY).eval()


def _frames(t: int, h: int, w: int) -> list[np.ndarray]:
    """A smooth pattern drifting sideways: real motion for the flows, not noise."""
    ys, xs = np.mgrid[0:h, 0:w]
    return [
        np.clip(np.stack([128 + 100 * np.sin((xs + 1.5 * i) / 4 + c) * np.cos(ys / 5) for c in range(3)], 2), 0, 255)
        .astype(np.uint8)
        for i in range(t)
    ]


def _write_video(path: Path, frames: list[np.ndarray], fps: float = 12.5) -> Path:
    h, w = frames[0].shape[:2] if frames else (20, 24)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _write_folder(path: Path, frames: list[np.ndarray]) -> Path:
    for i, f in enumerate(frames):
        write_png(path / f"frame{i}.png", f)
    return path


def _read_video(path: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr)
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return frames, fps


def _whole_clip(model: nn.Module, frames: list[np.ndarray]) -> np.ndarray:
    """The model over all frames at once, rounded to uint8 like the written output: the reference."""
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255)[None]
    with torch.inference_mode():
        out = model(x)[0]
    return out.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _read_pngs(folder: Path) -> np.ndarray:
    return np.stack([read_image(p) for p in sorted(folder.glob("*.png"))])


def test_video_to_video_keeps_frame_count_size_and_fps(tmp_path: Path, model: GSMamba) -> None:
    src = _write_video(tmp_path / "in.mp4", _frames(12, 20, 24), fps=12.5)
    summary = upscale_video(model, src, tmp_path / "out.mp4", progress=False)
    frames, fps = _read_video(tmp_path / "out.mp4")
    assert len(frames) == 12 and {f.shape for f in frames} == {(80, 96, 3)}
    assert fps == pytest.approx(12.5)
    assert summary == UpscaleSummary(tmp_path / "out.mp4", 12, (24, 20), (96, 80), 12.5, summary.seconds)
    assert summary.frames_per_s > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no temporaries left


def test_video_shorter_than_a_chunk_to_pngs_is_exactly_the_whole_clip_output(tmp_path: Path, model: GSMamba) -> None:
    src = _write_video(tmp_path / "in.mp4", _frames(12, 20, 24))
    summary = upscale_video(model, src, f"{tmp_path / 'up'}/", chunk=32, progress=False)
    names = sorted(p.name for p in (tmp_path / "up").iterdir())
    assert names == [f"{i:08d}.png" for i in range(12)] and summary.fps is None
    decoded = list(iter_frames(probe_source(src)))  # what the model saw (mp4v is lossy)
    np.testing.assert_array_equal(_read_pngs(tmp_path / "up"), _whole_clip(model, decoded))


def test_chunked_output_is_close_to_the_whole_clip_and_closer_than_independent_chunks(
    tmp_path: Path, model: GSMamba
) -> None:
    frames = _frames(19, 20, 24)
    src = _write_folder(tmp_path / "in", frames)
    lengths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    try:
        upscale_video(model, src, tmp_path / "up", chunk=8, chunk_overlap=2, progress=False)
    finally:
        hook.remove()
    # Chunks [0, 8), [6, 14), then the last one shifted back to [11, 19): the model never sees more
    # than `chunk` frames (memory bound) and the tail never runs with less context than a chunk.
    assert lengths == [8, 8, 8]
    names = sorted(p.name for p in (tmp_path / "up").iterdir())
    assert names == sorted(f"frame{i}.png" for i in range(19))  # folder input keeps its frame names
    got = np.stack([read_image(tmp_path / "up" / f"frame{i}.png") for i in range(19)]).astype(int)
    whole = _whole_clip(model, frames).astype(int)
    independent = np.concatenate([_whole_clip(model, frames[s:s + 8]) for s in range(0, 19, 8)]).astype(int)
    err, naive = np.abs(got - whole), np.abs(independent - whole)
    # Measured with this seed: max 2 levels and mean 0.04 levels for the overlapped chunks, against
    # max 3 and mean 0.11 for chunks cut without overlap. The bounds leave room for float
    # differences across CPUs while still catching a misplaced or unblended chunk (those reach the
    # no-overlap error or worse). The network is random, so its context sensitivity is mild.
    assert err.max() <= 4
    assert err.mean() < 0.5 * naive.mean()


def test_stitcher_cross_fades_shared_frames_and_emits_every_frame_once() -> None:
    stitch = ChunkStitcher(overlap=2)
    first = stitch.add(0, torch.zeros(6, 1, 1, 1), last=False)
    second = stitch.add(4, torch.ones(6, 1, 1, 1), last=False)
    third = stitch.add(5, torch.full((6, 1, 1, 1), 2.0), last=True)  # shifted back: frames 5-7 done
    values = torch.stack(first + second + third).flatten().tolist()
    assert values == pytest.approx([0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1, 4 / 3, 5 / 3, 2])


@pytest.mark.parametrize("t", [1, 2])
def test_one_and_two_frame_videos_work(tmp_path: Path, model: GSMamba, t: int) -> None:
    src = _write_video(tmp_path / "in.avi", _frames(t, 20, 24))
    summary = upscale_video(model, src, tmp_path / "out.mp4", progress=False)
    frames, _ = _read_video(tmp_path / "out.mp4")
    assert summary.frames == len(frames) == t and frames[0].shape == (80, 96, 3)


def test_odd_sizes_work_whole_and_tiled(tmp_path: Path, model: GSMamba) -> None:
    src = _write_folder(tmp_path / "in", _frames(3, 29, 37))
    whole = upscale_video(model, src, tmp_path / "whole", progress=False)
    tiled = upscale_video(model, src, tmp_path / "tiled", tile=16, tile_overlap=4, progress=False)
    assert whole.output_size == tiled.output_size == (148, 116)
    assert _read_pngs(tmp_path / "whole").shape == _read_pngs(tmp_path / "tiled").shape == (3, 116, 148, 3)
    single = upscale_video(model, src / "frame0.png", tmp_path / "one.mp4", progress=False)  # an image alone
    assert single.frames == 1 and single.fps == 25.0


def test_grey_16_bit_and_alpha_frames_are_read_as_their_rgb8_equivalent(tmp_path: Path, model: GSMamba) -> None:
    rgb = _frames(3, 20, 24)
    grey = [f[:, :, 0] for f in rgb]
    (tmp_path / "grey").mkdir()
    (tmp_path / "deep").mkdir()
    for i, g in enumerate(grey):
        cv2.imwrite(str(tmp_path / "grey" / f"{i}.png"), g)
        bgra16 = np.concatenate([cv2.cvtColor(rgb[i], cv2.COLOR_RGB2BGR), np.full((20, 24, 1), 7, np.uint8)], 2)
        cv2.imwrite(str(tmp_path / "deep" / f"{i}.png"), bgra16.astype(np.uint16) * 257)
    upscale_video(model, tmp_path / "grey", tmp_path / "grey_up", progress=False)
    upscale_video(model, tmp_path / "deep", tmp_path / "deep_up", progress=False)
    grey_as_rgb = [np.dstack([g] * 3) for g in grey]
    np.testing.assert_array_equal(_read_pngs(tmp_path / "grey_up"), _whole_clip(model, grey_as_rgb))
    np.testing.assert_array_equal(_read_pngs(tmp_path / "deep_up"), _whole_clip(model, rgb))


def test_frames_sort_naturally(tmp_path: Path, model: GSMamba) -> None:
    frames = _frames(11, 8, 8)
    for i, f in enumerate(frames):
        write_png(tmp_path / "in" / f"f{i}.png", f)  # f10 sorts after f9, not after f1
    info = probe_source(tmp_path / "in")
    assert [p.name for p in info.frames] == [f"f{i}.png" for i in range(11)]
    np.testing.assert_array_equal(np.stack(list(iter_frames(info))), np.stack(frames))


def test_checkpoint_path_uses_the_stored_weights(tmp_path: Path, model: GSMamba) -> None:
    from gsm.train.checkpoint import save_checkpoint

    state = {"format": "gsm-vsr/1", "config": TINY.to_dict(), "model": model.state_dict(), "ema": None}
    save_checkpoint(tmp_path / "model.pt", state)
    src = _write_folder(tmp_path / "in", _frames(3, 20, 24))
    summary = upscale_from_checkpoint(tmp_path / "model.pt", src, tmp_path / "up", progress=False)
    assert summary.frames == 3
    np.testing.assert_array_equal(_read_pngs(tmp_path / "up"), _whole_clip(model, _frames(3, 20, 24)))
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        upscale_from_checkpoint(tmp_path / "nothere.pt", src, tmp_path / "up2", progress=False)
    assert not (tmp_path / "up2").exists()


def test_overwrite_replaces_a_video_or_png_folder_only_when_asked(tmp_path: Path, model: GSMamba) -> None:
    src = _write_folder(tmp_path / "in", _frames(2, 8, 8))
    (tmp_path / "out.mp4").write_bytes(b"old")
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "stale.png").write_bytes(b"old")
    for dst in (tmp_path / "out.mp4", tmp_path / "pngs"):
        with pytest.raises(ValueError, match=rf"{dst}: already exists"):
            upscale_video(model, src, dst, progress=False)
    assert (tmp_path / "out.mp4").read_bytes() == b"old" and (tmp_path / "pngs" / "stale.png").exists()
    upscale_video(model, src, tmp_path / "out.mp4", overwrite=True, progress=False)
    upscale_video(model, src, tmp_path / "pngs", overwrite=True, progress=False)
    assert len(_read_video(tmp_path / "out.mp4")[0]) == 2
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["frame0.png", "frame1.png"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a folder of PNG frames"):
        upscale_video(model, src, tmp_path / "notes", overwrite=True, progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="the output is the input"):
        upscale_video(model, tmp_path / "pngs", tmp_path / "pngs", overwrite=True, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: use /sys)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no unwritable folder available to root here")


def _bad_cases(tmp_path: Path) -> list[tuple[str, Path, Path, type[Exception], str]]:
    """(id, src, dst, error type, path the message must name)."""
    good = _write_folder(tmp_path / "good", _frames(2, 8, 8))
    (tmp_path / "text.mp4").write_text("not a video")
    zero = _write_video(tmp_path / "zero.mp4", [])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no frames")
    mixed = _write_folder(tmp_path / "mixed", _frames(3, 8, 8))
    write_png(mixed / "frame2.png", _frames(1, 10, 8)[0])
    broken = _write_folder(tmp_path / "broken", _frames(3, 8, 8))
    (broken / "frame1.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "afile").write_text("")
    twins = _write_folder(tmp_path / "twins", _frames(1, 8, 8))
    cv2.imwrite(str(twins / "frame0.jpg"), _frames(1, 8, 8)[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "exists.mp4").write_bytes(b"x")
    return [
        ("missing input", tmp_path / "nope.mp4", out / "a.mp4", FileNotFoundError, str(tmp_path / "nope.mp4")),
        ("text named .mp4", tmp_path / "text.mp4", out / "a.mp4", ValueError, str(tmp_path / "text.mp4")),
        ("zero-frame video", zero, out / "a.mp4", ValueError, str(zero)),
        ("folder without frames", tmp_path / "empty", out / "a", ValueError, str(tmp_path / "empty")),
        ("mixed frame sizes", mixed, out / "a.mp4", ValueError, str(mixed / "frame2.png")),
        ("undecodable frame", broken, out / "a", ValueError, str(broken / "frame1.png")),
        ("output folder missing", good, out / "sub" / "a.mp4", FileNotFoundError, str(out / "sub")),
        ("output parent is a file", good, tmp_path / "afile" / "a.mp4", ValueError, str(tmp_path / "afile")),
        ("output exists", good, out / "exists.mp4", ValueError, str(out / "exists.mp4")),
        ("image name as output", good, out / "a.png", ValueError, str(out / "a.png")),
        ("frame names collide as PNGs", twins, out / "a", ValueError, str(twins / "frame0.png")),
    ]


def test_bad_inputs_and_outputs_fail_in_one_line_and_leave_nothing(tmp_path: Path, model: GSMamba) -> None:
    for name, src, dst, error, where in _bad_cases(tmp_path):
        before = sorted(dst.parent.iterdir()) if dst.parent.is_dir() else None
        with pytest.raises(error) as info:
            upscale_video(model, src, dst, chunk=2, chunk_overlap=1, progress=False)
        message = str(info.value)
        assert where in message and "\n" not in message, name
        after = sorted(dst.parent.iterdir()) if dst.parent.is_dir() else None
        assert after == before, name  # no output and no temporary beside it


def test_unwritable_output_folder_is_refused(tmp_path: Path, model: GSMamba) -> None:
    locked = _unwritable_dir(tmp_path)
    src = _write_folder(tmp_path / "in", _frames(1, 8, 8))
    with pytest.raises(ValueError, match=rf"{locked / 'a.mp4'}: cannot write"):
        upscale_video(model, src, locked / "a.mp4", progress=False)


def test_a_failure_mid_video_leaves_nothing(tmp_path: Path, model: GSMamba) -> None:
    src = _write_folder(tmp_path / "in", _frames(6, 8, 8))
    calls: list[int] = []

    def fail_second_chunk(_m: nn.Module, _args: tuple[torch.Tensor]) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated out-of-memory")

    hook = model.register_forward_pre_hook(fail_second_chunk)
    try:
        for dst in (tmp_path / "out.mp4", tmp_path / "pngs"):
            calls.clear()
            with pytest.raises(RuntimeError, match="simulated"):
                upscale_video(model, src, dst, chunk=2, chunk_overlap=1, progress=False)
    finally:
        hook.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk": 8, "chunk_overlap": 0}, "below the model's temporal window radius 1"),
        ({"chunk": 4, "chunk_overlap": 3}, "at most half the chunk"),
        ({"chunk": 0}, "chunk must be >= 1"),
        ({"tile": 8, "tile_overlap": 8}, "tile overlap"),
        ({"fps": 0.0}, "fps must be a positive number"),
        ({"device": "cpu", "bf16": True}, "bf16 autocast needs a CUDA device"),
        ({"device": "tpu"}, "--device: not a device, got 'tpu'"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, model: GSMamba, kwargs: dict, message: str) -> None:
    src = _write_folder(tmp_path / "in", _frames(1, 8, 8))
    with pytest.raises(ValueError, match=message):
        upscale_video(model, src, tmp_path / "out.mp4", progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def _eta_seconds(line: str) -> int:
    h, m, s = re.search(r"<(?:(\d+):)?(\d+):(\d+),", line).groups()  # type: ignore[union-attr]
    return int(h or 0) * 3600 + int(m) * 60 + int(s)


def test_progress_eta_holds_still_while_frames_come_out_a_chunk_at_a_time() -> None:
    """250 frames at 4 s each, chunks of 32 sharing 4: 28 frames every 128 s, milliseconds apart.
    After each burst the bar shows the burst's last frame and an ETA within 5% of the truth."""
    clock = [0.0]
    bar = progress_bar(250, "clip.mp4", file=io.StringIO())
    bar._time = lambda: clock[0]  # tqdm's own clock, here a simulated one
    bar.start_t = bar.last_print_t = 0.0
    for burst in range(1, 9):
        clock[0] = burst * 128.0
        for _ in range(28):
            clock[0] += 0.004
            bar.update(1)
        assert bar.last_print_n == bar.n == 28 * burst  # drawn up to the burst's last frame
        truth = (250 - bar.n) * 128 / 28
        assert _eta_seconds(str(bar)) == pytest.approx(truth, rel=0.05)
    bar.close()


def test_cli_prints_the_seconds_per_frame(tmp_path: Path, model: GSMamba) -> None:
    from typer.testing import CliRunner

    from gsm.cli import app
    from gsm.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "model.pt", {"format": "gsm-vsr/1", "config": TINY.to_dict(),
                                            "model": model.state_dict(), "ema": None})  # fmt: skip
    src = _write_folder(tmp_path / "in", _frames(2, 8, 8))
    r = CliRunner().invoke(app, ["upscale", str(src), str(tmp_path / "up"), "--model", str(tmp_path / "model.pt"),
                                 "--no-progress", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert re.fullmatch(rf"wrote {tmp_path / 'up'}: 2 frames 32x32 from 8x8 in \d+\.\d s: \d+\.\d\d s per frame\n",
                        r.output)
