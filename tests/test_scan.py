"""Selective scan: every implementation against the per-step reference, values and gradients."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gsm.ops import scan as scan_mod
from gsm.ops.backend import resolve_impl
from gsm.ops.scan import selective_scan, selective_scan_reference

IMPLS = ("numba", "torch")
# The numba kernels compile once per (dtype, state size N); keeping to N = 8 for float32 and N = 4
# for float64 keeps a cold run (no numba cache) to two compilations.
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# (D, z, delta_bias, delta_softplus)
OPTIONS = [
    (False, False, False, False),
    (True, False, False, False),
    (False, True, False, False),
    (False, False, False, True),
    (False, False, True, True),
    (True, True, True, True),
]


def make_inputs(batch: int, dim: int, N: int, L: int, *, use_D: bool, use_z: bool, use_bias: bool,
                softplus: bool, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> dict[str, Tensor | None]:
    """Mamba-like ranges. Without softplus, delta (and bias) are made positive as softplus would."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    delta = randn(batch, dim, L) * 0.5
    bias = randn(dim) * 0.5
    if not softplus:
        delta, bias = F.softplus(delta), torch.rand(dim, generator=g, dtype=torch.float64) * 0.2
    inputs: dict[str, Tensor | None] = {
        "u": randn(batch, dim, L),
        "delta": delta,
        "A": -torch.exp(randn(dim, N)),
        "B": randn(batch, N, L),
        "C": randn(batch, N, L),
        "D": randn(dim) if use_D else None,
        "z": randn(batch, dim, L) if use_z else None,
        "delta_bias": bias if use_bias else None,
    }
    return {k: None if v is None else v.to(dtype) for k, v in inputs.items()}


def leaves(inputs: dict[str, Tensor | None],
           dtype: torch.dtype | None = None) -> dict[str, Tensor | None]:
    return {k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_()
            for k, v in inputs.items()}


def assert_close_scaled(actual: Tensor, expected: Tensor, rel: float = 1e-5,
                        what: str = "") -> None:
    """Elementwise |a - e| <= rel * |e| + rel * max|e| (relative to the tensor's own scale)."""
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale,
                               msg=lambda m: f"{what}: {m}")


def run_with_grads(fn, inputs: dict[str, Tensor | None], grad_out: Tensor, softplus: bool,
                   **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    out = fn(*inputs.values(), delta_softplus=softplus, **kwargs)
    present = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(out, list(present.values()), grad_out.to(out.dtype))
    return out.detach(), dict(zip(present, grads))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("L", [1, 7, 130])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "D{:d}z{:d}bias{:d}sp{:d}".format(*o))
def test_matches_reference(impl: str, L: int, options: tuple[bool, bool, bool, bool]) -> None:
    use_D, use_z, use_bias, softplus = options
    base = make_inputs(2, 5, 8, L, use_D=use_D, use_z=use_z, use_bias=use_bias, softplus=softplus)
    grad_out = torch.randn(2, 5, L, generator=torch.Generator().manual_seed(1))
    # Ground truth: the reference loop in float64 on the same float32 values.
    ref_out, ref_grads = run_with_grads(selective_scan_reference, leaves(base, torch.float64),
                                        grad_out, softplus)
    out, grads = run_with_grads(selective_scan, leaves(base), grad_out, softplus, impl=impl)
    assert out.dtype == torch.float32 and out.shape == (2, 5, L)
    assert_close_scaled(out, ref_out, what="output")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.shape == base[name].shape
        assert_close_scaled(grad, ref_grads[name], what=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl: str) -> None:
    inputs = leaves(make_inputs(2, 3, 4, 10, use_D=True, use_z=True, use_bias=True, softplus=True,
                                dtype=torch.float64))

    def fn(*args: Tensor) -> Tensor:
        return selective_scan(*args, delta_softplus=True, impl=impl)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_torch_impl_length_not_multiple_of_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    L = 130
    assert L % scan_mod._torch_chunk_len(L) != 0
    # Small channel blocks: several blocks, so the checkpointed path runs too.
    monkeypatch.setattr(scan_mod, "_TORCH_BLOCK_ELEMS", 2 * 2 * 8 * 144)
    base = make_inputs(2, 5, 8, L, use_D=True, use_z=True, use_bias=True, softplus=True)
    grad_out = torch.randn(2, 5, L)
    ref_out, ref_grads = run_with_grads(selective_scan_reference, leaves(base, torch.float64),
                                        grad_out, True)
    out, grads = run_with_grads(selective_scan, leaves(base), grad_out, True, impl="torch")
    assert_close_scaled(out, ref_out, what="output")
    for name, grad in grads.items():
        assert_close_scaled(grad, ref_grads[name], what=f"grad {name}")


@pytest.mark.parametrize("L", [64, 128, 200])
def test_numba_chunk_boundaries(L: int) -> None:
    from gsm.ops._scan_numba import CHUNK

    base = make_inputs(2, 3, 8, L, use_D=True, use_z=True, use_bias=True, softplus=True, seed=L)
    grad_out = torch.randn(2, 3, L)
    ref_out, ref_grads = run_with_grads(selective_scan_reference, leaves(base, torch.float64),
                                        grad_out, True)
    out, grads = run_with_grads(selective_scan, leaves(base), grad_out, True, impl="numba")
    assert L % CHUNK == 0 or L > CHUNK
    assert_close_scaled(out, ref_out, what="output")
    for name, grad in grads.items():
        assert_close_scaled(grad, ref_grads[name], what=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl: str) -> None:
    base = make_inputs(2, 4, 8, 33, use_D=True, use_z=True, use_bias=True, softplus=True)
    # Same values, laid out transposed / strided.
    strided = {k: None if v is None else (v.mT.contiguous().mT if v.dim() >= 2
                                          else torch.stack([v, torch.zeros_like(v)], -1)[..., 0])
               for k, v in base.items()}
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    ref = selective_scan_reference(*base.values(), delta_softplus=True)
    out = selective_scan(*strided.values(), delta_softplus=True, impl=impl)
    assert_close_scaled(out, ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_inputs_upcast(impl: str) -> None:
    base = make_inputs(2, 4, 8, 40, use_D=True, use_z=True, use_bias=True, softplus=True,
                       dtype=torch.bfloat16)
    out = selective_scan(*base.values(), delta_softplus=True, impl=impl)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_reference(*base.values(), delta_softplus=True)
    assert ref.dtype == torch.bfloat16
    # Both compute in float32 from the same bf16 values; only the final rounding can differ.
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_stays_float64(impl: str) -> None:
    base = make_inputs(1, 3, 4, 20, use_D=True, use_z=True, use_bias=True, softplus=True,
                       dtype=torch.float64)
    out = selective_scan(*base.values(), delta_softplus=True, impl=impl)
    assert out.dtype == torch.float64
    ref = selective_scan_reference(*base.values(), delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_requires_grad_and_no_grad(impl: str) -> None:
    base = make_inputs(1, 3, 8, 20, use_D=True, use_z=True, use_bias=True, softplus=True)
    ref = selective_scan_reference(*base.values(), delta_softplus=True)
    with torch.no_grad():
        assert_close_scaled(selective_scan(*base.values(), delta_softplus=True, impl=impl), ref)
    u = base["u"].clone().requires_grad_()
    out = selective_scan(*{**base, "u": u}.values(), delta_softplus=True, impl=impl)
    (g_u,) = torch.autograd.grad(out.sum(), [u])
    u_ref = base["u"].clone().requires_grad_()
    ref_out = selective_scan_reference(*{**base, "u": u_ref}.values(), delta_softplus=True)
    (g_ref,) = torch.autograd.grad(ref_out.sum(), [u_ref])
    assert_close_scaled(g_u, g_ref)


def test_reference_impl_dispatch() -> None:
    base = make_inputs(1, 2, 3, 5, use_D=True, use_z=False, use_bias=False, softplus=False)
    out = selective_scan(*base.values(), impl="reference")
    torch.testing.assert_close(out, selective_scan_reference(*base.values()), rtol=0, atol=0)


def test_bad_shapes_raise() -> None:
    base = make_inputs(1, 2, 3, 5, use_D=False, use_z=False, use_bias=False, softplus=False)
    base["B"] = base["B"][:, :, :4]
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(*base.values(), impl="torch")


def test_resolve_impl_rules() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_impl("cuda", cpu)
    with pytest.raises(ValueError, match="bogus"):
        resolve_impl("bogus", cpu)
    assert resolve_impl("auto", cpu) == "numba"
    assert resolve_impl("torch", cpu) == "torch"
    assert resolve_impl("reference", cpu) == "reference"


def test_choice_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    scan_mod._logged_choices.clear()
    base = make_inputs(1, 2, 8, 5, use_D=False, use_z=False, use_bias=False, softplus=False)
    with caplog.at_level(logging.INFO, logger="gsm.ops"):
        for _ in range(3):
            selective_scan(*base.values(), impl="auto")
    records = [r for r in caplog.records
               if r.name == "gsm.ops" and "selective_scan" in r.getMessage()]
    assert len(records) == 1 and "numba" in records[0].getMessage()


def test_float32_kernel_math_helpers() -> None:
    """The polynomial exp / softplus / sigmoid the float32 kernels use, against float64 numpy."""
    from numba import njit

    from gsm.ops._scan_numba import _exp, _sigmoid, _softplus

    @njit
    def apply(x: np.ndarray, which: int) -> np.ndarray:
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            if which == 0:
                out[i] = _exp(x[i])
            elif which == 1:
                out[i] = _softplus(x[i])
            else:
                out[i] = _sigmoid(x[i])
        return out

    x = np.linspace(-87.0, 88.0, 200_001, dtype=np.float32)
    x64 = x.astype(np.float64)
    expected = [np.exp(x64), np.where(x64 > 20, x64, np.log1p(np.exp(np.minimum(x64, 20)))),
                1.0 / (1.0 + np.exp(-x64))]
    for which, ref in enumerate(expected):
        got = apply(x, which).astype(np.float64)
        mask = ref > 1e-37
        assert np.max(np.abs(got[mask] - ref[mask]) / ref[mask]) < 1e-6, which
    special = np.array([np.nan, -np.inf, np.inf, -200.0], dtype=np.float32)
    got = apply(special, 0)
    assert np.isnan(got[0]) and got[1] == 0 and got[2] == np.inf and got[3] == 0
