"""Selective scan (Mamba's S6 recurrence) with the contract of mamba-ssm's `selective_scan_fn`.

    dt_t = softplus(delta_t + delta_bias)        (bias / softplus optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = 0, h: (dim, N) per batch
    y_t  = C_t . h_t + D * u_t,   then y_t *= silu(z_t) when z is given

Implementations: "cuda" (mamba_ssm's fused kernel), "numba" (CPU kernels with a hand-written
backward, the CPU default), "torch" (chunked pure PyTorch, any device, autograd by PyTorch) and
"reference" (the per-step loop, the ground truth for tests and benchmarks).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gsm.ops.backend import resolve_impl

logger = logging.getLogger("gsm.ops")

# Upper bound on batch * dim_block * L_padded * N elements per channel block of the torch scan;
# each of a block's three (.., L, N) temporaries is this size: 16 MiB in float32, under glibc's
# largest mmap threshold, so freed blocks are reused rather than page-faulted in afresh (64 MiB
# blocks measured slower on CPU despite fewer Python-level steps).
_TORCH_BLOCK_ELEMS = 1 << 22
# On a GPU, every Python-level step is a kernel launch, so blocks are as large as memory allows:
# 64M elements (256 MiB in float32) per temporary, one or two blocks for a paper training window.
_TORCH_BLOCK_ELEMS_CUDA = 1 << 26
# Floor for exponents in the torch scan. exp(-80) ~ 2e-35 is as good as 0 next to O(1) states,
# while exp of very negative inputs (a chunk's summed log-decay reaches -1000s) and the denormals
# it yields hit CPU slow paths, measured 30x slower than in-range inputs.
_TORCH_LOG_FLOOR = -80.0
# torch.nn.functional.softplus's default threshold; the numba path matches it.
_SOFTPLUS_THRESHOLD = 20.0

_logged_choices: set[tuple[str, str, str]] = set()


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (so gradcheck works), else float32 (bf16/fp16 upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  z: Tensor | None, delta_bias: Tensor | None) -> None:
    """Fail early with the offending shape rather than deep inside a kernel."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, L = u.shape
    if A.is_complex():
        raise NotImplementedError("selective_scan: complex A is not supported")
    if A.dim() != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N>=1), got {tuple(A.shape)}")
    N = A.shape[1]
    expected = {"delta": (delta, (batch, dim, L)), "B": (B, (batch, N, L)), "C": (C, (batch, N, L)),
                "D": (D, (dim,)), "z": (z, (batch, dim, L)), "delta_bias": (delta_bias, (dim,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} must have shape {shape}, got {tuple(t.shape)}")


def _effective_dt(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta, threshold=_SOFTPLUS_THRESHOLD)
    return delta


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None,
                             delta_softplus: bool = False) -> Tensor:
    """The recurrence written as its definition, one Python step per time index (slow, exact)."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    dt = _effective_dt(delta, None if delta_bias is None else delta_bias.to(ct), delta_softplus)
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    # unbind rather than indexing: its backward is one stack, indexing's is a zero-filled
    # full-size tensor per step (quadratic in L).
    dt_steps, u_steps, B_steps, C_steps = (t.unbind(-1) for t in (dt, u, B, C))
    ys = []
    for t in range(L):
        dt_t = dt_steps[t][:, :, None]
        h = torch.exp(dt_t * A) * h + dt_t * B_steps[t][:, None, :] * u_steps[t][:, :, None]
        ys.append((h * C_steps[t][:, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(ct)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(out_dtype)


# --------------------------------------------------------------------------------------- torch


def _torch_chunk_len(L: int) -> int:
    """~sqrt(L) keeps both Python loops (over steps in a chunk, over chunks) short."""
    return max(1, math.ceil(math.sqrt(L)))


def _scan_block_torch(dt: Tensor, u: Tensor, A: Tensor, Bc: Tensor, Cc: Tensor) -> Tensor:
    """Scan of one channel block in step-major layout (every per-step slice is contiguous).

    dt, u: (Lc, b, db, nC); A: (db, N); Bc, Cc: (Lc, b, 1, nC, N). Returns y as (Lc, b, db, nC).
    Pass 1 runs all nC chunks at once from a zero state, keeping only each chunk's end state
    (loop over Lc). A short loop over nC then carries states across chunks, using the chunk's
    total decay exp(sum dt * A) (a sum of non-positive terms for A <= 0: no overflow). Pass 2
    reruns the chunks from their true start states and emits y (loop over Lc). Only the decay
    and input terms are (.., L, N)-sized; the per-step tensors stay in cache.
    """
    dtA = (dt[..., None] * A[:, None, :]).clamp_min_(_TORCH_LOG_FLOOR)
    decay = torch.exp(dtA).unbind(0)
    drive = ((dt * u)[..., None] * Bc).unbind(0)
    h = drive[0]
    for decay_j, drive_j in zip(decay[1:], drive[1:]):
        h = torch.addcmul(drive_j, decay_j, h)
    chunk_decay = torch.exp(dtA.sum(0).clamp_min_(_TORCH_LOG_FLOOR))
    carry = torch.zeros_like(h.select(2, 0))
    starts = []
    for h_end_c, decay_c in zip(h.unbind(2), chunk_decay.unbind(2)):
        starts.append(carry)
        carry = torch.addcmul(h_end_c, decay_c, carry)
    h = torch.stack(starts, dim=2)
    ys = []
    for decay_j, drive_j, C_j in zip(decay, drive, Cc.unbind(0)):
        h = torch.addcmul(drive_j, decay_j, h)
        ys.append((h * C_j).sum(-1))
    return torch.stack(ys, dim=0)


def _selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
                          delta_softplus: bool) -> Tensor:
    """Chunked scan with no per-step Python loop; channel blocks bound the (.., L, N) memory.

    With autograd on and several blocks, each block is checkpointed so the backward recomputes
    its temporaries block by block instead of keeping (batch, dim, L, N) tensors alive.
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    dt = _effective_dt(delta, delta_bias, delta_softplus)
    chunk = _torch_chunk_len(L)
    n_chunks = max(1, math.ceil(L / chunk))
    pad = n_chunks * chunk - L
    # Padding with dt = 0 makes the extra steps identity steps (decay 1, no input).
    dt_p, u_p, B_p, C_p = (F.pad(t, (0, pad)) if pad else t for t in (dt, u, B, C))
    steps = n_chunks * chunk
    # (batch, ch, steps) -> (Lc, batch, ch, nC): step-in-chunk first.
    dt_s = dt_p.reshape(batch, dim, n_chunks, chunk).permute(3, 0, 1, 2)
    u_s = u_p.reshape(batch, dim, n_chunks, chunk).permute(3, 0, 1, 2)
    Bc = B_p.reshape(batch, N, n_chunks, chunk).permute(3, 0, 2, 1).unsqueeze(2).contiguous()
    Cc = C_p.reshape(batch, N, n_chunks, chunk).permute(3, 0, 2, 1).unsqueeze(2).contiguous()
    elems = _TORCH_BLOCK_ELEMS_CUDA if u.is_cuda else _TORCH_BLOCK_ELEMS
    block = max(1, elems // max(1, batch * steps * N))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (dt_s, u_s, A, Bc, Cc))
    use_checkpoint = needs_grad and block < dim
    ys = []
    # split, not slicing: split's backward is one concatenation.
    for dt_b, u_b, A_b in zip(dt_s.split(block, dim=2), u_s.split(block, dim=2), A.split(block)):
        args = (dt_b.contiguous(), u_b.contiguous(), A_b, Bc, Cc)
        if use_checkpoint:
            y_blk = checkpoint(_scan_block_torch, *args, use_reentrant=False)
        else:
            y_blk = _scan_block_torch(*args)
        ys.append(y_blk.permute(1, 2, 3, 0).reshape(batch, -1, steps))
    y = torch.cat(ys, dim=1)[..., :L]
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


# --------------------------------------------------------------------------------------- numba


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _optional_vector(t: Tensor | None, dim: int, dtype: np.dtype) -> np.ndarray:
    """D / delta_bias as a kernel argument; zeros stand in for a missing one (adding 0 is exact)."""
    return _to_numpy(t) if t is not None else np.zeros(dim, dtype=dtype)


def _optional_seq(t: Tensor | None, dtype: np.dtype) -> np.ndarray:
    """z as a kernel argument; a 1-element dummy when absent (the kernel then never reads it)."""
    return _to_numpy(t) if t is not None else np.zeros((1, 1, 1), dtype=dtype)


def _scan_groups(batch: int, dim: int) -> int:
    """Dim slices per batch entry in the backward (each owns a dB/dC partial buffer): enough
    prange tasks to keep every numba thread busy, no more, since each costs an (L, N) buffer."""
    import numba

    threads = numba.get_num_threads()
    return max(1, min(dim, math.ceil(2 * threads / batch)))


class _NumbaSelectiveScan(torch.autograd.Function):
    """Autograd wrapper over the numba kernels (bias, softplus and gating happen in-kernel).

    The forward keeps only h at each time-chunk start (L / CHUNK states per row, a quarter of u's
    size for N = 16); the backward recomputes the states inside each chunk. The kernels' inputs
    are laid out once, in the forward, and the backward reuses those arrays (its own copies would
    double the layout work); parameter gradients are reduced in numpy.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
        z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
    ) -> Tensor:
        from gsm.ops._scan_numba import chunk_count, scan_fwd, state_size_key

        batch, dim, L = u.shape
        N = A.shape[1]
        u_np = _to_numpy(u)
        dtype = u_np.dtype
        arrays = (u_np, _to_numpy(delta), _optional_vector(delta_bias, dim, dtype), _to_numpy(A),
                  _to_numpy(B.transpose(1, 2)), _to_numpy(C.transpose(1, 2)),
                  _optional_vector(D, dim, dtype), _optional_seq(z, dtype))
        save = any(ctx.needs_input_grad)
        states = np.empty((batch, dim, chunk_count(L), N) if save else (1, 1, 1, 1), dtype=dtype)
        out = np.empty_like(u_np)
        u_a, delta_a, bias_a, A_a, Bt_a, Ct_a, D_a, z_a = arrays
        scan_fwd(u_a, delta_a, bias_a, delta_softplus, A_a, Bt_a, Ct_a, D_a, z_a, z is not None,
                 save, states, out, state_size_key(N))
        if save:
            ctx.arrays, ctx.states = arrays, states
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.delta_softplus, ctx.dtype = delta_softplus, u.dtype
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        from gsm.ops._scan_numba import scan_bwd, state_size_key

        u_a, delta_a, bias_a, A_a, Bt_a, Ct_a, D_a, z_a = ctx.arrays
        has_D, has_z, has_bias = ctx.has
        batch, dim, L = u_a.shape
        N = A_a.shape[1]
        dtype = u_a.dtype
        groups = _scan_groups(batch, dim)
        du = np.empty_like(u_a)
        ddelta = np.empty_like(u_a)
        dz = np.empty_like(u_a) if has_z else np.empty((1, 1, 1), dtype=dtype)
        dA_rows = np.empty((batch, dim, N), dtype=dtype)
        dD_rows = np.empty((batch, dim), dtype=dtype)
        dbias_rows = np.empty((batch, dim), dtype=dtype)
        dB_part = np.zeros((groups, batch, L, N), dtype=dtype)
        dC_part = np.zeros((groups, batch, L, N), dtype=dtype)
        scan_bwd(u_a, delta_a, bias_a, ctx.delta_softplus, A_a, Bt_a, Ct_a, D_a, z_a, has_z,
                 _to_numpy(dout.to(ctx.dtype)), ctx.states, groups, du, ddelta, dz,
                 dA_rows, dD_rows, dbias_rows, dB_part, dC_part, state_size_key(N))

        need = ctx.needs_input_grad
        grad = lambda a, wanted: torch.from_numpy(a) if wanted else None  # noqa: E731
        return (
            grad(du, need[0]), grad(ddelta, need[1]), grad(dA_rows.sum(0), need[2]),
            grad(dB_part.sum(0), need[3]).transpose(1, 2) if need[3] else None,
            grad(dC_part.sum(0), need[4]).transpose(1, 2) if need[4] else None,
            grad(dD_rows.sum(0), has_D and need[5]), grad(dz, has_z and need[6]),
            grad(dbias_rows.sum(0), has_bias and need[7]), None,
        )


# ------------------------------------------------------------------------------------- public


def _log_choice(requested: str, device: torch.device, chosen: str) -> None:
    key = (requested, device.type, chosen)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("selective_scan: impl=%r on %s -> using %r", requested, device.type, chosen)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False, *,
                   impl: str = "auto") -> Tensor:
    """Selective scan with mamba-ssm's `selective_scan_fn` contract; returns (batch, dim, L).

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L); D, delta_bias: (dim,).
    Computes in float32 (float64 if any input is float64) and casts the result to u's dtype.
    impl: "auto" (mamba_ssm on CUDA when installed, numba on CPU, else torch), or force one of
    "cuda", "numba", "torch", "reference"; see gsm.ops.backend.resolve_impl.
    """
    chosen = resolve_impl(impl, u.device)
    _log_choice(impl, u.device, chosen)
    if chosen == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chosen == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    args = [t if t is None else t.to(ct) for t in (u, delta, A, B, C, D, z, delta_bias)]
    if chosen == "numba":
        y = _NumbaSelectiveScan.apply(*args, delta_softplus)
    else:
        y = _selective_scan_torch(*args, delta_softplus)
    return y.to(out_dtype)
