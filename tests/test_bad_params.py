"""Bad params files through the `gsm` command: the table below is what is covered, each case one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO
from gsm.cli import app

VALID = yaml.safe_load((REPO / "params.yaml").read_text())

# (case, the params file's bytes, what the one-line error must say)
CASES: list[tuple[str, bytes, str]] = [
    ("empty file", b"", "empty params file; the defaults are the paper's 600k-iteration recipe"),
    ("only a comment", b"# nothing yet\n", "empty params file"),
    ("not UTF-8", "model:\n  embed_dim: 32 # Gr\u00f6\u00dfe\n".encode("latin-1"), "not UTF-8 text (byte 27)"),
    ("not YAML", b"model: [1,\n", "not valid YAML"),
    ("a list at the top", b"- model\n", "top level must be a mapping"),
    ("unknown section", b"modle:\n  embed_dim: 32\n", "unknown key 'modle'"),
    ("section not a mapping", b"train: 5\n", "train must be a mapping"),
    ("spynet_weights a number", yaml.safe_dump({"model": {"spynet_weights": 5}}).encode(),
     "model.spynet_weights: must be a string, got 5"),
    ("model key misspelt", yaml.safe_dump({"model": {"embed_dims": 32}}).encode(), "unknown key model.embed_dims"),
    ("model value of the wrong type", yaml.safe_dump({"model": {"window": "five"}}).encode(), "model.window"),
    ("flow_init patch zero", yaml.safe_dump({**VALID, "flow_init": {"patch": 0}}).encode(),
     "flow_init.patch must be a positive integer"),
    ("train lr negative", yaml.safe_dump({"train": {"reds": {"lr": -1.0}}}).encode(), "train.reds: lr must be a positive"),
]


@pytest.mark.parametrize(("case", "content", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_params_file_is_one_line_naming_it(tmp_path: Path, case: str, content: bytes, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["train", "--stage", "reds", "--params", str(path), "--runs", str(tmp_path)])
    assert result.exit_code == 2, (case, result.output)
    err = result.stderr.strip() if hasattr(result, "stderr") else result.output.strip()
    assert err.startswith(f"error: {path}: "), (case, err)
    assert message in err and "\n" not in err, (case, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing made
