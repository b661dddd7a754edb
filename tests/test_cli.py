"""The `gsm` command line itself: --version, commands listed in pipeline order, readable metavars."""

from __future__ import annotations

import importlib.metadata
import re

import typer
from typer.testing import CliRunner

from gsm.cli import app

PIPELINE = ["prepare", "download", "degrade", "pack", "flow-init", "train", "evaluate", "register",
            "model-report", "pipeline-run", "upscale", "info"]  # fmt: skip


def _help(*args: str) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "160", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    return r.output


def test_version_comes_from_the_package_metadata() -> None:
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"gsm-vsr {importlib.metadata.version('gsm-vsr')}\n"


def test_help_lists_every_command_in_pipeline_order() -> None:
    panel = _help().split("Commands")[1]
    listed = re.findall(r"^│ (\S+)\s{2,}", panel, flags=re.MULTILINE)
    assert listed == PIPELINE
    assert set(listed) == set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_options_show_what_they_take_and_flags_no_type() -> None:
    text = _help("upscale").split("Options")[1]
    for option, metavar in [("--model", "CHECKPOINT|URI"), ("--chunk", "FRAMES"), ("--tile", "PIXELS"),
                            ("--tracking-uri", "URI"), ("--params", "FILE"), ("--retries", "N")]:  # fmt: skip
        assert re.search(rf"{re.escape(option)}\s.*\s{re.escape(metavar)}\s", text), option
    assert "<bool>" not in text and "<str>" not in text and "<int range>" not in text
    assert "<bool>" not in _help()
