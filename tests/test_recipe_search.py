"""benchmarks/recipe_search.py: a trial's overrides, its params (validation off, one checkpoint), the table."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO
from gsm.params import Params

sys.path.insert(0, str(REPO / "benchmarks"))
import recipe_search  # noqa: E402


def test_overrides_read_scalars_and_refuse_a_pair_without_value() -> None:
    got = recipe_search.overrides(["embed_dim=16", "lr=1e-3", "scatter=false", "spynet_weights=null", "align=bilinear"], "-m")
    assert got == {"embed_dim": 16, "lr": 1e-3, "scatter": False, "spynet_weights": None, "align": "bilinear"}
    assert isinstance(got["embed_dim"], int) and isinstance(got["lr"], float)
    with pytest.raises(ValueError, match="-t 'iters': expected KEY=VALUE"):
        recipe_search.overrides(["iters"], "-t")


def test_trial_params_override_one_stage_and_switch_validation_off() -> None:
    p = Params()
    q = recipe_search.trial_params(p, "reds", {"embed_dim": 16, "num_heads": 2}, {"iters": 40, "lr": 5e-4})
    r = q.train.stage("reds")
    assert (q.model.embed_dim, q.model.num_heads, r.iters, r.lr) == (16, 2, 40, 5e-4)
    assert r.ckpt_every == 40 and r.val_every > r.iters and r.init_from is None
    assert q.train.stage("vimeo") == p.train.stage("vimeo")  # the other stage untouched
    with pytest.raises(TypeError):
        recipe_search.trial_params(p, "reds", {"no_such_key": 1}, {})


def test_table_has_a_row_per_trial_with_signed_gains_and_notes() -> None:
    rows = [
        {"name": "a", "net": "cnn", "stage": "reds", "model": {}, "train": {"iters": 10}, "iters": 10,
         "s_per_it": 0.07, "train_s": 0.7, "X val gain": 1.234, "Y val gain": -0.5, "note": "why"},
        {"name": "b", "net": "gsm", "stage": "reds", "model": {"embed_dim": 16}, "train": {}, "iters": 5,
         "s_per_it": 0.4, "train_s": 2.0, "X val gain": 0.1},
    ]
    lines = recipe_search.table(rows).splitlines()
    assert lines[4] == "| trial | net | stage | overrides | iters | s/it | train s | X val gain | Y val gain | note |"
    assert lines[6] == "| a | cnn | reds | `iters=10` | 10 | 0.070 | 1 | +1.23 | -0.50 | why |"
    assert lines[7] == "| b | gsm | reds | `embed_dim=16` | 5 | 0.400 | 2 | +0.10 | - |  |"
