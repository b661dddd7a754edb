"""CUDA checks: mamba-ssm / causal-conv1d kernels against our reference, and the network's kernel
path against its pure-PyTorch path. Skipped without a GPU (the kernel checks also without mamba-ssm).

The comparisons live in helpers that take the device and implementations as arguments, so they can
be exercised on CPU (e.g. impl="numba" standing in for the kernel) when editing this file.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from gsm.models.config import GSMConfig
from gsm.ops.backend import causal_conv1d_available, mamba_ssm_available
from gsm.ops.conv1d import causal_conv1d
from gsm.ops.scan import selective_scan, selective_scan_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
kernels = pytest.mark.skipif(not mamba_ssm_available(), reason="needs mamba-ssm's CUDA kernels")

# Which optional scan inputs a case uses; "softplus" is delta_softplus=True.
OPTIONS = [set(), {"D"}, {"z"}, {"D", "z", "delta_bias", "softplus"}]
FULL = {"D", "z", "delta_bias", "softplus"}  # what the network passes
NET_CFG = GSMConfig(embed_dim=32, num_heads=4, prop_layers=2, attn_depth=2, d_state=8)


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 comparisons in true fp32: TF32 matmuls / convs would dominate the differences."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def scale_of(t: torch.Tensor) -> float:
    """Largest magnitude as a plain float (assert_close takes no tensors, least of all with grad)."""
    return max(t.detach().abs().max().item(), 1e-12)


def scan_inputs(options: set[str], *, device: str = "cuda", dim: int = 24, n: int = 16,
                length: int = 700, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mamba-like ranges. Without softplus, delta and its bias are made positive, as softplus would:
    a negative step size grows the state exponentially over the 700 steps."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    delta, bias = r(2, dim, length) * 0.5, r(dim) * 0.5
    if "softplus" not in options:
        delta, bias = F.softplus(delta), F.softplus(bias) * 0.2
    return {"u": r(2, dim, length), "delta": delta, "A": -torch.exp(r(dim, n)), "B": r(2, n, length),
            "C": r(2, n, length), "D": r(dim), "z": r(2, dim, length), "delta_bias": bias}


def check_scan_against_reference(options: set[str], *, impl: str, device: str, dtype: torch.dtype,
                                 tol_out: tuple[float, float], tol_grad: tuple[float, float]) -> None:
    """`impl` on inputs u/delta/B/C/z in `dtype` against the fp32 reference on the same values.

    A, D and delta_bias stay fp32, as mamba-ssm requires and the network passes them. Tolerances
    are (rtol, atol relative to the reference's largest magnitude), for outputs and gradients.
    """
    base = scan_inputs(options, device=device)
    low = {k: v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in base.items()}
    x = {k: v.clone().requires_grad_() for k, v in low.items()}  # what the kernel sees
    x_ref = {k: v.float().requires_grad_() for k, v in low.items()}  # the same values, in fp32
    names = ["u", "delta", "A", "B", "C"] + [k for k in ("D", "z", "delta_bias") if k in options]

    def run(fn, t: dict[str, torch.Tensor], **kw) -> torch.Tensor:
        args = {k: t[k] for k in names}
        return fn(**args, delta_softplus="softplus" in options, **kw)

    out = run(selective_scan, x, impl=impl)
    ref = run(selective_scan_reference, x_ref)
    assert out.dtype == dtype and ref.dtype == torch.float32
    rtol, atol = tol_out
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol * scale_of(ref))

    grad = torch.randn(out.shape, device=device, generator=torch.Generator(device=device).manual_seed(1))
    g_out = torch.autograd.grad(out, [x[k] for k in names], grad.to(dtype))
    g_ref = torch.autograd.grad(ref, [x_ref[k] for k in names], grad.to(dtype).float())
    rtol, atol = tol_grad
    for name, a, b in zip(names, g_out, g_ref):
        assert a.dtype == x[name].dtype, f"gradient of {name} has dtype {a.dtype}"
        torch.testing.assert_close(a.float(), b, rtol=rtol, atol=atol * scale_of(b),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@cuda
@kernels
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(sorted(o)) or "plain")
def test_mamba_kernel_matches_reference_values_and_gradients(options: set[str]) -> None:
    check_scan_against_reference(options, impl="cuda", device="cuda", dtype=torch.float32,
                                 tol_out=(1e-4, 1e-4), tol_grad=(1e-3, 1e-3))


@cuda
@kernels
@pytest.mark.parametrize("options", [set(), FULL], ids=lambda o: "+".join(sorted(o)) or "plain")
def test_mamba_kernel_bf16_matches_fp32_reference(options: set[str]) -> None:
    # The kernel computes in fp32 and rounds its bf16 outputs / input gradients once (2^-9
    # relative); the rest is fp32 summation order.
    check_scan_against_reference(options, impl="cuda", device="cuda", dtype=torch.bfloat16,
                                 tol_out=(1e-2, 1e-3), tol_grad=(2e-2, 1e-2))


@cuda
def test_torch_scan_on_cuda_matches_reference() -> None:
    x = scan_inputs(FULL, length=300)
    out = selective_scan(**x, delta_softplus=True, impl="torch")
    ref = selective_scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale_of(ref))


@cuda
@pytest.mark.skipif(not causal_conv1d_available(), reason="needs causal-conv1d's CUDA kernels")
def test_causal_conv1d_kernel_matches_pytorch() -> None:
    x = torch.randn(2, 64, 333, device="cuda")
    w = torch.randn(64, 4, device="cuda")
    b = torch.randn(64, device="cuda")
    torch.testing.assert_close(causal_conv1d(x, w, b, impl="cuda"), causal_conv1d(x, w, b, impl="torch"),
                               rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.skipif(mamba_ssm_available(), reason="mamba-ssm is installed: 'auto' does not fall back")
def test_auto_scan_on_cuda_without_kernels_warns_and_falls_back() -> None:
    x = scan_inputs(FULL, length=50)
    with pytest.warns(Warning, match="falling back"):
        out = selective_scan(**x, delta_softplus=True, impl="auto")
    ref = selective_scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale_of(ref))


# ------------------------------------------------------------------------------------ network


def make_net(cfg: GSMConfig, device: str, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    from gsm.models.gsmamba import GSMamba

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SpyNet created without weights")
        model = GSMamba(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device)


def check_scan_paths_agree(impl_a: str, impl_b: str, *, device: str, grad_checkpoint: bool,
                           tol: float = 1e-3) -> None:
    """One set of weights, two scan implementations: forward values and every parameter gradient
    agree to `tol` (relative, and absolute relative to each tensor's largest magnitude)."""
    torch.manual_seed(0)
    net_a = make_net(dataclasses.replace(NET_CFG, scan_impl=impl_a, grad_checkpoint=grad_checkpoint), device)
    net_b = make_net(dataclasses.replace(NET_CFG, scan_impl=impl_b), device, state=net_a.state_dict())
    x = torch.rand(1, 5, 3, 24, 20, device=device)
    weight = torch.randn(1, 5, 3, 96, 80, device=device)  # a loss that reaches every output pixel
    outs = []
    for net in (net_a, net_b):
        net.train()
        out = net(x)
        (out * weight).mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol * scale_of(outs[1]))
    grads_a = {name: p.grad for name, p in net_a.named_parameters()}
    grads_b = {name: p.grad for name, p in net_b.named_parameters()}
    assert all(g is not None for g in [*grads_a.values(), *grads_b.values()]), "a parameter got no gradient"
    # Some gradients are zero up to round-off (e.g. the alignment's key bias: softmax ignores a
    # per-query constant), so no tensor's scale counts below 1e-3 of the largest gradient's.
    # Gradients sum the two scans' round-off differences over every window and pixel: on an H200,
    # 4 of recon.conv_hr.weight's 36,864 entries differed by 1.4e-3 of its scale, so 5 x tol.
    floor = 1e-3 * max(scale_of(g) for g in grads_b.values())
    gtol = 5 * tol
    for name, g_b in grads_b.items():
        torch.testing.assert_close(grads_a[name], g_b, rtol=gtol, atol=gtol * max(scale_of(g_b), floor),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@cuda
@kernels
@pytest.mark.parametrize("grad_checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_network_kernel_path_matches_torch_path(no_tf32: None, grad_checkpoint: bool) -> None:
    check_scan_paths_agree("cuda", "torch", device="cuda", grad_checkpoint=grad_checkpoint)


@cuda
def test_network_forward_backward_on_cuda_matches_cpu(no_tf32: None) -> None:
    torch.manual_seed(0)
    model = make_net(NET_CFG, "cpu").eval()
    x = torch.rand(1, 3, 3, 24, 20)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x.cuda())
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
