"""CUDA checks: mamba-ssm / causal-conv1d kernels against our reference. Skipped without a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from gsm.models.config import GSMConfig
from gsm.ops.backend import causal_conv1d_available, mamba_ssm_available
from gsm.ops.conv1d import causal_conv1d
from gsm.ops.scan import selective_scan, selective_scan_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
kernels = pytest.mark.skipif(not mamba_ssm_available(), reason="needs mamba-ssm's CUDA kernels")


def _inputs(dim: int = 24, n: int = 16, length: int = 700, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    return {
        "u": r(2, dim, length), "delta": r(2, dim, length) * 0.5, "A": -torch.exp(r(dim, n)),
        "B": r(2, n, length), "C": r(2, n, length), "D": r(dim), "z": r(2, dim, length),
        "delta_bias": r(dim) * 0.5,
    }


@cuda
@kernels
@pytest.mark.parametrize("options", [{}, {"D"}, {"z"}, {"D", "z", "delta_bias", "softplus"}], ids=str)
def test_mamba_kernel_matches_reference_values_and_gradients(options: set[str]) -> None:
    x = {k: v.requires_grad_() for k, v in _inputs().items()}
    kw = {k: x[k] for k in ("D", "z", "delta_bias") if k in options}
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    out = selective_scan(*args, **kw, delta_softplus="softplus" in options, impl="cuda")
    ref = selective_scan_reference(*args, **kw, delta_softplus="softplus" in options)
    scale = ref.abs().max()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)
    grad = torch.randn_like(out)
    used = [x[k] for k in ("u", "delta", "A", "B", "C")] + list(kw.values())
    g_out = torch.autograd.grad(out, used, grad)
    g_ref = torch.autograd.grad(ref, used, grad)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max())


@cuda
def test_torch_scan_on_cuda_matches_reference() -> None:
    x = _inputs(length=300)
    out = selective_scan(**x, delta_softplus=True, impl="torch")
    ref = selective_scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


@cuda
@pytest.mark.skipif(not causal_conv1d_available(), reason="needs causal-conv1d's CUDA kernels")
def test_causal_conv1d_kernel_matches_pytorch() -> None:
    x = torch.randn(2, 64, 333, device="cuda")
    w = torch.randn(64, 4, device="cuda")
    b = torch.randn(64, device="cuda")
    torch.testing.assert_close(causal_conv1d(x, w, b, impl="cuda"), causal_conv1d(x, w, b, impl="torch"),
                               rtol=1e-4, atol=1e-4)


@cuda
def test_network_forward_backward_on_cuda_matches_cpu() -> None:
    from gsm.models.gsmamba import GSMamba

    cfg = GSMConfig(embed_dim=32, num_heads=4, prop_layers=2, attn_depth=2, d_state=8)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GSMamba(cfg).eval()
    x = torch.rand(1, 3, 3, 24, 20)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x.cuda())
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
