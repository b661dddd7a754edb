"""Cache keys for the flows' stage tasks: what DVC compares before it skips a stage, for Prefect.

A stage's key hashes the params and gsm code dvc.yaml lists for it, fingerprints of the files it reads
(the data steps' `index.json`, the manifest, checkpoints, metrics: small files that change
whenever the data or model behind them do), the source of the gsm code it runs, and the absolute
paths it reads and writes (two checkouts sharing one PREFECT_HOME must not share results). Equal
keys mean the stage would do the same work again, so Prefect returns the recorded result instead.

Keys say nothing about whether the outputs are still on disk: `missing_outputs` does, and the
flows refresh a stage whose outputs were deleted since its result was recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

import gsm
from gsm.data.prepare import INDEX, read_manifest
from gsm.io import sha256_file
from gsm.stages import final_checkpoint, scoring_checkpoints
from gsm.train.config import resolve_init

log = logging.getLogger(__name__)

GSM_ROOT = Path(gsm.__file__).resolve().parent
Args = Mapping[str, Any]  # a task's arguments by name: p (Params), stage, runs, out, reports, ...


def _manifest(a: Args) -> Path:
    return a["p"].data.manifest_path


def _init(a: Args) -> list[Path]:
    """The checkpoint a training stage starts from: `init_from`, else the stage's param."""
    if a.get("init_from"):
        return [Path(a["init_from"])]
    start = resolve_init(a["p"].train.stage(a["stage"]).init_from, a["runs"])  # raises if missing
    return [start] if start else []


def _spynet(a: Args) -> list[Path]:
    """A local `model.spynet_weights` file (the flow_init stage's output): its content is an input."""
    weights = a["p"].model.spynet_weights
    return [Path(weights)] if weights is not None and "://" not in weights else []


def _checkpoint(a: Args) -> Path:
    return Path(a["checkpoint"]) if a.get("checkpoint") else final_checkpoint(a["runs"])


def _scorers(a: Args) -> list[Path]:
    """Every checkpoint that evaluate scores with (eval.models per_stage: one per training stage)."""
    ckpt = Path(a["checkpoint"]) if a.get("checkpoint") else None
    return sorted(set(scoring_checkpoints(a["p"], a["runs"], read_manifest(a["p"].data), ckpt).values()))


DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"


def dvc_stage(name: str, dvc_yaml: Path = DVC_YAML) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(params keys, gsm code parts) that dvc.yaml declares for stage `name`: the one description
    of what a stage depends on, read here so that Prefect skips a stage exactly when DVC would."""
    import yaml

    try:
        stage = yaml.safe_load(dvc_yaml.read_text())["stages"][name]
    except (OSError, KeyError, TypeError) as exc:
        raise FileNotFoundError(f"{dvc_yaml}: no stage {name!r} ({exc})") from None
    code = tuple(d[len("gsm/"):].removesuffix(".py") for d in stage.get("deps", []) if d.startswith("gsm/"))
    return tuple(stage.get("params", [])), code


@dataclass(frozen=True)
class StageSpec:
    """One stage: the files it reads and the files it writes last (params and code: dvc.yaml's)."""

    inputs: Callable[[Args], list[Path]]  # files read; FileNotFoundError when one is missing
    outputs: Callable[[Args], list[Path]]  # files that exist only once the stage has finished
    env: tuple[str, ...] = ()  # environment variables that change what it does


def _train(stage: str) -> StageSpec:
    """train_reds / finetune_vimeo: the same stage function, each with its own recipe section."""
    return StageSpec(
        inputs=lambda a: [_manifest(a), *_init(a), *_spynet(a)],
        outputs=lambda a: [Path(a["runs"]) / stage / "checkpoints" / "last.pt"],
    )  # fmt: skip


SPECS: dict[str, StageSpec] = {
    "download": StageSpec(lambda a: [], lambda a: [a["p"].data.source_dir / INDEX]),
    "degrade": StageSpec(lambda a: [a["p"].data.source_dir / INDEX], lambda a: [a["p"].data.lr_dir / INDEX]),
    "pack": StageSpec(lambda a: [a["p"].data.lr_dir / INDEX], lambda a: [_manifest(a)]),
    "flow_init": StageSpec(lambda a: [_manifest(a)], lambda a: [Path(a["runs"]) / "flow" / "spynet.pth"]),
    "train_reds": _train("reds"),
    "finetune_vimeo": _train("vimeo"),
    "evaluate": StageSpec(lambda a: [_manifest(a), _checkpoint(a), *_scorers(a)],
                          lambda a: [Path(a["out"]) / "metrics.json", Path(a["out"]) / "evaluated_model.json"]),
    "register": StageSpec(lambda a: [Path(a["reports"]) / "metrics.json", _checkpoint(a)],
                          lambda a: [Path(a["reports"]) / "registry.json"], env=("MLFLOW_TRACKING_URI",)),
}  # fmt: skip


def spec_name(task_stage: str, args: Args) -> str:
    """`train` is one task for both training stages; its spec is the DVC stage's of the same work."""
    if task_stage == "train":
        return {"reds": "train_reds", "vimeo": "finetune_vimeo"}[args["stage"]]
    return task_stage


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def section_values(p: Any, dotted: str) -> Any:
    """The value of a dotted params key (`train.reds`) as plain JSON-able data."""
    obj = p
    for part in dotted.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise ValueError(f"params: no key {dotted!r} (the stage's cache key needs it)")
    return _plain(obj)


def code_digest(parts: tuple[str, ...]) -> str:
    """sha256 over the Python sources of gsm sub-packages `parts` and gsm/stages.py.

    The source, not a version number: an edit changes the key as it changes dvc.yaml's deps. A
    part that does not exist (yet) hashes as empty.
    """
    h = hashlib.sha256(gsm.__version__.encode())
    for part in sorted({*parts, "stages"}):
        folder, module = GSM_ROOT / part, GSM_ROOT / f"{part}.py"
        files = sorted(folder.rglob("*.py")) if folder.is_dir() else [module] if module.is_file() else []
        for f in files:
            h.update(f"\0{f.relative_to(GSM_ROOT).as_posix()}\0{sha256_file(f)}".encode())
    return h.hexdigest()


def stage_key(task_stage: str, args: Args) -> str:
    """The cache key of a stage task called with `args` (FileNotFoundError: an input is missing)."""
    name = spec_name(task_stage, args)
    spec = SPECS[name]
    params, code = dvc_stage(name)
    p = args["p"]
    record = {
        "stage": name,
        "params": {k: section_values(p, k) for k in params},
        "code": code_digest(code),
        "inputs": {str(Path(f).resolve()): sha256_file(Path(f)) for f in spec.inputs(args)},
        "outputs": [str(Path(f).resolve()) for f in spec.outputs(args)],
        "env": {k: os.environ.get(k) for k in spec.env},
    }
    return f"gsm-{name}-" + hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def missing_outputs(task_stage: str, args: Args) -> list[Path]:
    """The stage's outputs that are not on disk (a recorded result for them must not be trusted)."""
    return [f for f in SPECS[spec_name(task_stage, args)].outputs(args) if not Path(f).exists()]


@dataclass
class StageCache(CachePolicy):
    """Prefect cache policy of one stage task: its `stage_key`, or no caching when an input is missing.

    A missing input is the stage's own error to report (a one-line FileNotFoundError): the task
    then runs uncached and fails with it, rather than Prefect logging a key-computation traceback.
    """

    stage: str = ""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        try:
            return stage_key(self.stage, inputs)
        except FileNotFoundError as exc:
            log.info("%s: not cached (%s)", self.stage, exc)
            return None
