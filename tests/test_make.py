"""`make paper-params` (the switch `make repro-paper` starts with) never overwrites a user's edits, and
`make ablations` changes each ablated param away from its profile's value."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.skipif(not (shutil.which("make") and shutil.which("git")), reason="needs make and git")

ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip


def _run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=root, env=ENV, capture_output=True, text=True, timeout=60)


def test_paper_switch_refuses_uncommitted_params_edits(tmp_path: Path) -> None:
    for name in ("Makefile", "params.yaml", "configs/paper.yaml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        assert _run(tmp_path, *cmd).returncode == 0
    params, paper = tmp_path / "params.yaml", (tmp_path / "configs" / "paper.yaml").read_text()
    edited = params.read_text() + "# my edit\n"
    params.write_text(edited)
    r = _run(tmp_path, "make", "paper-params")
    assert r.returncode != 0 and "error: params.yaml has uncommitted changes" in r.stderr
    assert params.read_text() == edited  # the edit survives

    assert _run(tmp_path, "git", "checkout", "params.yaml").returncode == 0
    for _ in range(2):  # committed params: switched; already the paper profile: switching again is fine
        assert _run(tmp_path, "make", "paper-params").returncode == 0
        assert params.read_text() == paper
    params.write_text(paper + "# a Vid4 mirror set here\n")  # an edit to the paper profile itself
    assert _run(tmp_path, "make", "paper-params").returncode != 0
    assert params.read_text().endswith("# a Vid4 mirror set here\n")


def _ablations(*make_vars: str) -> dict[str, str]:
    """`make ablations`'s experiments as {dotted param: value}, read from its dry run."""
    r = _run(REPO, "make", "-n", "ablations", *make_vars)
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("for a in ", 1)[1].split(";", 1)[0].split()
    return dict(item.split("=", 1)[1].split("=", 1) for item in listed)


@pytest.mark.parametrize(("profile", "make_vars"), [("params.yaml", ()),
                                                    ("configs/paper.yaml", ("ALIGN_ALT=bilinear", "WINDOW_ALT=3"))])
def test_every_ablation_changes_its_profiles_value(profile: str, make_vars: tuple[str, ...]) -> None:
    """An ablation that sets a param to the value the profile already has would retrain nothing new."""
    params = yaml.safe_load((REPO / profile).read_text())
    ablations = _ablations(*make_vars)
    assert {"model.anchor", "model.scatter", "model.align", "model.scan_order", "model.window"} == set(ablations)
    for dotted, value in ablations.items():
        section, key = dotted.split(".")
        assert str(params[section][key]).lower() != value.lower(), f"{dotted}={value} is already {profile}'s"
