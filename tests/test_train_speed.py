"""benchmarks/train_speed.py: aten op classification, the worker on a tiny network, bad input."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_speed.py"


@pytest.fixture(scope="module")
def ts():
    spec = importlib.util.spec_from_file_location("train_speed_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_views_and_kernels_are_told_apart(ts) -> None:
    x = torch.rand(4, 4)
    with ts.OpCounter() as c:
        x.view(16)
        x.t()
        y = x + 1
        y.sum()
    assert c.totals() == {"kernel": 2, "view": 2, "meta": 0}
    assert c.counts == {"aten.view.default": 1, "aten.t.default": 1, "aten.add.Tensor": 1,
                        "aten.sum.default": 1}
    assert c.kinds["aten.add.Tensor"] == "kernel" and c.kinds["aten.view.default"] == "view"


def test_metadata_inplace_and_multi_alias_ops(ts) -> None:
    x = torch.rand(6, 4)
    with ts.OpCounter() as c:
        torch.empty(3)  # allocation only
        x.unbind(0)  # list of aliases
        x.detach()
        x.add_(1)  # in place: writes, so a kernel, though its output aliases x
    assert c.kinds == {"aten.empty.memory_format": "meta", "aten.unbind.int": "view",
                       "aten.detach.default": "view", "aten.add_.Tensor": "kernel"}
    assert c.totals() == {"kernel": 1, "view": 2, "meta": 1}


def test_backward_ops_are_counted_and_numerics_unchanged(ts) -> None:
    w = torch.rand(5, 3, requires_grad=True)
    x = torch.rand(2, 5)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        w.grad = None
        loss = ts.charbonnier(torch.tanh(x @ w), torch.zeros(2, 3))
        loss.backward()
        return loss.detach(), w.grad.clone()

    plain = run()
    with ts.OpCounter() as fwd_only:
        torch.tanh(x @ w)
    with ts.OpCounter() as c:
        counted = run()
    assert torch.equal(plain[0], counted[0]) and torch.equal(plain[1], counted[1])
    assert "aten.tanh_backward.default" in c.counts  # the backward pass ran under the mode
    assert c.totals()["kernel"] > fwd_only.totals()["kernel"] + 4


def test_worker_on_tiny_network(ts) -> None:
    # One torch thread and the torch scan: seconds even on a busy 2-core machine (no numba load).
    a = argparse.Namespace(tree=str(ROOT), model_json=json.dumps({**ts.TINY, "scan_impl": "torch"}), steps=1,
                           batch=1, frames=2, size=16, count=True, threads=1)
    threads = torch.get_num_threads()
    try:
        res = ts.run_worker(a)
    finally:
        torch.set_num_threads(threads)
    assert res["torch_threads"] == 1 and res["scan_impl"] == "torch"
    assert Path(res["gsm_file"]).resolve() == ROOT / "gsm" / "__init__.py"
    assert res["ignored_keys"] == [] and res["config"]["embed_dim"] == ts.TINY["embed_dim"]
    fb = res["ops"]["forward_backward"]
    assert fb["kernel"] > 100 and fb["view"] > 0
    assert fb["kernel"] + fb["view"] + fb["meta"] == fb["total"]
    assert fb["total"] == sum(v["count"] for v in fb["per_op"].values())
    assert sum(v["count"] for v in fb["per_op"].values() if v["kind"] == "kernel") == fb["kernel"]
    assert res["ops"]["optimizer"]["kernel"] > 0
    assert len(res["step_s"]) == 1 and res["step_s"][0] > 0
    # The counted step is the second step on the same data: Adam has moved the weights a little.
    assert abs(res["losses"]["counted"] - res["losses"]["warmup"]) < 0.1


@pytest.mark.parametrize("args, message", [
    (["--baseline", "no-such-ref-xyz"], "error: unknown git ref 'no-such-ref-xyz'"),
    (["--baseline", "none", "--out", "README.md"], "error: --out README.md exists and is not a folder"),
])
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    before = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(message) and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    after = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before
