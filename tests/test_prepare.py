"""The data stage end to end: the paper profile from archives served on loopback, then the catalog."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from http_server import LoopbackServer, http_server, zip_bytes  # noqa: F401 - fixture

from gsm.data.catalog import eval_sets, train_stores
from gsm.data.datasets import REDS4_CLIPS, VID4_CLIPS
from gsm.data.prepare import DataConfig, prepare_data, read_manifest
from gsm.data.sources import sources_from_dict
from gsm.data.vid4 import VID4_SIZES
from gsm.params import parse_params


def _png(rng: np.random.Generator, h: int, w: int) -> bytes:
    ok, buf = cv2.imencode(".png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


# REDS4 (000, 011, 015, 020) and two val clips: the smallest REDS the paper profile accepts.
TOY = {"reds_train_clips": 21, "reds_val_clips": 2, "vid4_shrink": 4}  # Vid4 at 1/4 size


def _archives(n_train: int = 21, n_val: int = 2) -> dict[str, bytes]:
    """Official layouts at toy sizes: REDS clips of 2 frames, 3 Vimeo septuplets, Vid4 GT."""
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", n_train), ("val", n_val)):
        gt = {f"{split}/{split}_sharp/{c:03d}/{f:08d}.png": _png(rng, 16, 16) for c in range(n) for f in range(2)}
        lr = {f"{split}/{split}_sharp_bicubic/X4/{c:03d}/{f:08d}.png": _png(rng, 4, 4) for c in range(n) for f in range(2)}
        files[f"{split}_sharp.zip"] = zip_bytes(gt)
        files[f"{split}_sharp_bicubic.zip"] = zip_bytes(lr)
    seqs = ["00001/0001", "00001/0002", "00002/0001"]
    vimeo = {f"vimeo_septuplet/sequences/{s}/im{i}.png": _png(rng, 16, 24) for s in seqs for i in range(1, 8)}
    vimeo["vimeo_septuplet/sep_trainlist.txt"] = b"00001/0001\n00001/0002\n"
    vimeo["vimeo_septuplet/sep_testlist.txt"] = b"00002/0001\n"
    files["vimeo_septuplet.zip"] = zip_bytes(vimeo)
    files["Vid4.zip"] = zip_bytes({f"Vid4/GT/{c}/{f:04d}.png": _png(rng, h // 4, w // 4)
                              for c, (h, w) in VID4_SIZES.items() for f in range(3)})  # fmt: skip
    return files


SERVED = {
    "reds_train_sharp": "/train_sharp.zip", "reds_train_sharp_bicubic": "/train_sharp_bicubic.zip",
    "reds_val_sharp": "/val_sharp.zip", "reds_val_sharp_bicubic": "/val_sharp_bicubic.zip",
    "vimeo_septuplet": "/vimeo_septuplet.zip", "vid4_gt": "/Vid4.zip",
}  # fmt: skip


def test_paper_profile_from_archives(http_server: LoopbackServer, tmp_path: Path) -> None:  # noqa: F811
    http_server.files.update(_archives())
    sources = sources_from_dict({k: {"url": http_server.url(v)} for k, v in SERVED.items()})
    cfg = DataConfig.from_dict({"profile": "paper", "root": str(tmp_path / "data"), "workers": 1, "paper": TOY})
    path = prepare_data(cfg, sources, progress=False)
    m = read_manifest(cfg)
    assert path == tmp_path / "data" / "paper" / "manifest.json"

    # REDS, a subset of the official layout: val merged from 240, REDS4 held out of training.
    assert len(m["reds"]["train"]) == 21 - 4 + 2 and m["reds"]["test"] == list(REDS4_CLIPS)
    assert m["reds"]["train"][-2:] == ["240", "241"] and not set(REDS4_CLIPS) & set(m["reds"]["train"])
    assert m["reds"]["frames_per_clip"]["241"] == 2
    assert (Path(m["reds"]["gt_lmdb"]) / "meta_info.txt").read_text().count("\n") == 2 * 23
    assert m["made_from"]["archives"]["vid4_gt"] == hashlib.sha256(http_server.files["Vid4.zip"]).hexdigest()
    # Vimeo: BI LR degraded here from the sequences; lists from the archive.
    assert m["vimeo"]["train"] == ["00001/0001", "00001/0002"] and m["vimeo"]["test"] == ["00002/0001"]
    assert cv2.imread(str(Path(m["vimeo"]["lr_folder"]) / "00002/0001/im4.png")).shape == (4, 6, 3)
    # Vid4: GT found below the archive's nesting, BI and BD degraded here.
    for key in ("bi_folder", "bd_folder"):
        assert sorted(p.name for p in Path(m["vid4"][key]).iterdir() if p.is_dir()) == sorted(VID4_CLIPS)

    gt_store, lr_store, entry = train_stores(m, "reds")
    key = f"{entry['train'][-1]}/00000001"
    assert gt_store.get(key).shape == (16, 16, 3) and lr_store.get(key).shape == (4, 4, 3)
    gt_store, lr_store, entry = train_stores(m, "vimeo")
    assert lr_store.get("00001/0002/im7").shape == (4, 6, 3)
    tests = {t.name: t for kind in ("reds", "vimeo", "vid4") for t in eval_sets(m, kind)}
    assert set(tests) == {"REDS4", "Vimeo-90K-T", "Vid4-BI", "Vid4-BD"}
    assert tests["REDS4"].dataset.names == list(REDS4_CLIPS)
    assert tests["Vimeo-90K-T"].dataset.center_index == 3
    assert tests["Vid4-BD"].dataset[0]["lq"].shape[-2:] == (36, 45)  # calendar 144x180 -> 36x45

    # A rerun is idempotent: nothing is requested again and the manifest is the same.
    before = len(http_server.requests)
    prepare_data(cfg, sources, progress=False)
    assert len(http_server.requests) == before
    assert read_manifest(cfg) == m


def test_a_mirror_with_the_same_bytes_is_the_same_data(http_server: LoopbackServer, tmp_path: Path) -> None:  # noqa: F811
    """Switching every source to another URL serving the same bytes: the download step fetches and
    checks the new URL, but its index (degrade's DVC dependency), the manifest and the trainers'
    data fingerprints stay byte for byte, so nothing downstream reruns."""
    from gsm.stages import data_fingerprint

    archives = _archives()
    http_server.files.update({**archives, **{f"mirror/{k}": v for k, v in archives.items()}})
    cfg = DataConfig.from_dict({"profile": "paper", "root": str(tmp_path / "data"), "workers": 1, "paper": TOY})
    outputs = [cfg.source_dir / "index.json", cfg.lr_dir / "index.json", cfg.manifest_path]
    seen = []
    for prefix in ("", "/mirror"):
        sources = sources_from_dict({k: {"url": http_server.url(prefix + v)} for k, v in SERVED.items()})
        prepare_data(cfg, sources, progress=False)
        m = read_manifest(cfg)
        seen.append(([p.read_bytes() for p in outputs], {s: data_fingerprint(m, s) for s in ("reds", "vimeo")}))
    assert any(r.path.startswith("mirror/") for r in http_server.requests)  # the mirror's bytes were read
    assert seen[0] == seen[1]
    assert "://" not in seen[1][0][2].decode().split('"reds"')[0]  # made_from names no URL


def test_evaluation_and_training_read_only_what_dvc_pull_brings(http_server: LoopbackServer, tmp_path: Path) -> None:  # noqa: F811
    """After `dvc pull` only lmdb/ and manifest.json exist (the frame trees are not cached): every
    benchmark and training set must come from them, REDS4's and Vid4's frame lists included."""
    import shutil

    http_server.files.update(_archives())
    sources = sources_from_dict({k: {"url": http_server.url(v)} for k, v in SERVED.items()})
    cfg = DataConfig.from_dict({"profile": "paper", "root": str(tmp_path / "data"), "workers": 1, "paper": TOY})
    prepare_data(cfg, sources, progress=False)
    shutil.rmtree(cfg.source_dir)
    shutil.rmtree(cfg.lr_dir)
    m = read_manifest(cfg)
    tests = {t.name: t for kind in ("reds", "vimeo", "vid4") for t in eval_sets(m, kind)}
    assert set(tests) == {"REDS4", "Vimeo-90K-T", "Vid4-BI", "Vid4-BD"}
    assert tests["REDS4"].dataset.names == list(REDS4_CLIPS)
    assert set(tests["Vid4-BI"].dataset.names) == set(VID4_CLIPS)
    for t in tests.values():
        sample = t.dataset[0]
        assert sample["lq"].shape[-1] * 4 == sample["gt"].shape[-1]
    assert tests["Vid4-BD"].dataset[0]["lq"].shape[-2:] == (36, 45)
    for kind in ("reds", "vimeo"):
        gt, lr, entry = train_stores(m, kind)
        assert gt.get(gt.keys()[0]).shape[:2] == tuple(4 * n for n in lr.get(gt.keys()[0]).shape[:2])


def test_reds_subset_counts_are_checked(http_server: LoopbackServer, tmp_path: Path) -> None:  # noqa: F811
    """Official counts by default; a subset must keep REDS4, and archives must hold exactly it."""
    assert DataConfig().paper.reds_train_clips == 240 and DataConfig().paper.reds_val_clips == 30
    for bad, key in (({"reds_train_clips": 20}, "reds_train_clips must be 21..240"),
                     ({"reds_val_clips": 31}, "reds_val_clips must be 0..30")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^data\.paper\.{key}"):
            DataConfig.from_dict({"profile": "paper", "paper": bad})
    http_server.files.update(_archives(n_train=22))
    sources = sources_from_dict({k: {"url": http_server.url(v)} for k, v in SERVED.items()})
    cfg = DataConfig.from_dict({"profile": "paper", "root": str(tmp_path), "workers": 1, "paper": TOY})
    with pytest.raises(ValueError, match=r"unexpected clip folder .*021 \(expected 21 clips\)"):
        prepare_data(cfg, sources, steps=("download",), progress=False)


def test_new_archive_is_extracted_again_and_a_broken_one_named(
    http_server: LoopbackServer, tmp_path: Path  # noqa: F811
) -> None:
    """raw/<source> follows the archive's bytes; a broken archive's error names the file to delete."""
    from gsm.data.prepare import _fetch_extract
    from gsm.data.sources import Source

    cfg = DataConfig(profile="paper", root=str(tmp_path))
    good = zip_bytes({"a.txt": b"new"})
    http_server.files.update({"old/v.zip": zip_bytes({"a.txt": b"old"}), "new/v2.zip": good,
                              "fix/v2.zip": zip_bytes({"a.txt": b"fixed"}), "cut/v3.zip": good[:-40]})  # fmt: skip

    def run(path: str, **kw: str) -> Path:
        return _fetch_extract(Source("vid4_gt", http_server.url(path), **kw), cfg, 0, False)  # type: ignore[arg-type]

    raw = run("old/v.zip")
    assert (raw / "a.txt").read_bytes() == b"old"
    assert (run("new/v2.zip") / "a.txt").read_bytes() == b"new"  # the case: was the old extraction
    assert (run("fix/v2.zip") / "a.txt").read_bytes() == b"fixed"  # same file name, other URL: fetched again
    before = len(http_server.requests)
    run("fix/v2.zip")
    assert len(http_server.requests) == before

    archive = cfg.source_dir / "downloads" / "v3.zip"
    with pytest.raises(ValueError) as err:
        run("cut/v3.zip")
    msg = str(err.value)
    assert msg.startswith(f"vid4_gt: {archive}: not a readable zip or tar archive (") and "\n" not in msg
    assert msg.endswith(f"; delete {archive} to download it again") and not raw.exists()
    with pytest.raises(ValueError, match=r"it matches sources\.vid4_gt\.sha256, so the archive at .*v3\.zip is broken"):
        run("cut/v3.zip", sha256=hashlib.sha256(good[:-40]).hexdigest())
    archive.unlink()
    http_server.files["cut/v3.zip"] = good
    assert (run("cut/v3.zip") / "a.txt").read_bytes() == b"new"


def test_deleted_archive_keeps_its_recorded_extraction(
    http_server: LoopbackServer, tmp_path: Path  # noqa: F811
) -> None:
    """The extraction records its archive's digest: deleting the archive costs no download."""
    from dataclasses import replace

    from gsm.data.prepare import _fetch_extract
    from gsm.data.sources import Source

    cfg = DataConfig(profile="paper", root=str(tmp_path))
    body = zip_bytes({"a.txt": b"x"})
    http_server.files.update({"v.zip": body, "mirror/v.zip": body, "w.zip": zip_bytes({"a.txt": b"w"})})
    sha = hashlib.sha256(body).hexdigest()
    src = Source("vid4_gt", http_server.url("v.zip"))
    raw = _fetch_extract(src, cfg, 0, False)
    (cfg.downloads_dir / "v.zip").unlink()
    before = len(http_server.requests)
    mirror = replace(src, url=http_server.url("mirror/v.zip"), sha256=sha)  # the same bytes elsewhere
    same = (src, replace(src, sha256=sha, size=len(body)), mirror)
    assert [_fetch_extract(s, cfg, 0, False) for s in same] == [raw] * 3
    assert len(http_server.requests) == before
    # Other bytes asked for (another URL and no checksum): fetched and extracted.
    other = replace(src, url=http_server.url("w.zip"))
    assert (_fetch_extract(other, cfg, 0, False) / "a.txt").read_bytes() == b"w"
    assert len(http_server.requests) == before + 1


def test_gsm_download_saves_where_the_pipeline_looks(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from gsm.cli import app
    from gsm.data.prepare import _fetch_extract

    mirror = tmp_path / "mirror" / "Vid4.zip"
    mirror.parent.mkdir()
    mirror.write_bytes(zip_bytes({"a.txt": b"x"}))
    raw = {"data": {"profile": "paper", "root": str(tmp_path / "data")}, "sources": {"vid4_gt": {"url": str(mirror)}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["download", "vid4_gt", "--params", str(tmp_path / "params.yaml"), "--no-progress"])
    p = parse_params(raw)
    assert r.exit_code == 0 and r.output == f"vid4_gt: {p.data.downloads_dir / 'Vid4.zip'}\n", r.output
    assert p.data.downloads_dir == tmp_path / "data" / "paper" / "source" / "downloads"
    mirror.unlink()  # the pipeline takes the downloaded copy
    assert (_fetch_extract(p.sources["vid4_gt"], p.data, 0, False) / "a.txt").read_bytes() == b"x"


def test_every_source_is_checked_before_the_first_byte(
    http_server: LoopbackServer, tmp_path: Path  # noqa: F811
) -> None:
    from conftest import merged

    urls = {k: {"url": http_server.url(v)} for k, v in SERVED.items()}
    cfg = DataConfig.from_dict({"profile": "paper", "root": str(tmp_path), "paper": TOY})
    for bad, msg in (
        ({"vid4_gt": {"url": None}}, r"^source vid4_gt has no URL: set sources\.vid4_gt\.url in params"),
        ({"vid4_bdx4": {"url": str(tmp_path / "no.zip")}}, r"^vid4_bdx4: no file at .* \(sources\.vid4_bdx4\.url\)$"),
        ({"vimeo_septuplet": {"url": "ftp://x/v.zip"}}, r"unsupported URL scheme 'ftp' in sources\.vimeo_septuplet"),
    ):  # fmt: skip
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            prepare_data(cfg, sources_from_dict(merged(urls, bad)), steps=("download",), progress=False)
    assert http_server.requests == [] and not cfg.source_dir.exists()


def test_missing_vid4_mirror_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sources\.vid4_gt\.url"):
        from gsm.data.prepare import _download_vid4

        _download_vid4(sources_from_dict(None), DataConfig(profile="paper", root=str(tmp_path)), progress=False)
    assert not any(tmp_path.iterdir())


def test_params_sections_name_bad_keys() -> None:
    p = parse_params({"data": {"profile": "quickstart", "quickstart": {"reds_gap": 3}}})
    assert p.data.quickstart.reds_gap == 3 and p.sources["vimeo_septuplet"].url
    for raw, where in (
        ({"data": {"profile": "full"}}, "data.profile"),
        ({"data": {"quickstart": {"nope": 1}}}, "data.quickstart.nope"),
        ({"data": {"png_level": 12}}, "data.png_level"),
        ({"sources": {"vid4_gt": {"sha256": "xyz"}}}, "sources.vid4_gt.sha256"),
    ):
        with pytest.raises(ValueError, match=where.replace(".", r"\.")):
            parse_params(raw)


def test_manifest_missing_names_the_stage(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gsm prepare"):
        read_manifest(DataConfig(root=str(tmp_path)))
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart" / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt manifest"):
        read_manifest(DataConfig(root=str(tmp_path)))


def test_quickstart_steps_chain_and_start_over_on_new_input(tmp_path: Path) -> None:
    from conftest import merged, tiny_params_dict

    from gsm.data.images import read_image
    from gsm.data.prepare import degrade_data, download_data, pack_data

    raw = tiny_params_dict(tmp_path)
    p = parse_params(raw)
    with pytest.raises(FileNotFoundError, match="run the download step first"):
        degrade_data(p.data, p.sources, progress=False)
    src = download_data(p.data, p.sources, progress=False)
    lr = degrade_data(p.data, p.sources, progress=False)
    manifest = pack_data(p.data, p.sources, progress=False)
    m = read_manifest(p.data)
    assert (src, lr, manifest) == (p.data.source_dir, p.data.lr_dir, p.data.manifest_path)
    assert m["reds"]["lr_folder"] == str(lr / "reds_like" / "BIx4") and Path(m["reds"]["gt_lmdb"]).is_dir()
    assert m["made_from"]["reds_like"]["crop"] == [96, 160]
    from gsm.data.degrade import DEGRADATION_VERSION

    assert m["made_from"]["degradation"] == DEGRADATION_VERSION  # new degradation code: new data downstream
    frame = lr / "reds_like" / "BIx4" / "000" / "00000000.png"
    stamp = frame.stat().st_mtime_ns
    assert read_image(frame).shape == (24, 40, 3)

    # Rerunning a finished step redoes nothing.
    degrade_data(p.data, p.sources, progress=False)
    assert frame.stat().st_mtime_ns == stamp

    # Other source frames (a smaller crop): the LR made from the old ones is removed and remade,
    # and the manifest says what the data are made from now.
    p2 = parse_params(merged(raw, {"data": {"quickstart": {"reds_crop": [64, 128]}}}))
    download_data(p2.data, p2.sources, progress=False)
    (lr / "stale.txt").write_text("from the old frames")
    degrade_data(p2.data, p2.sources, progress=False)
    assert read_image(frame).shape == (16, 32, 3) and not (lr / "stale.txt").exists()
    pack_data(p2.data, p2.sources, progress=False)
    assert read_manifest(p2.data)["made_from"]["reds_like"]["crop"] == [64, 128]
