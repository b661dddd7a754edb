"""Numba CPU kernels for the selective scan (forward and hand-written backward).

Layout expected by the kernels (all C-contiguous, one float dtype):
  u, delta, z, dout: (batch, dim, L), delta raw (bias and softplus are applied in-kernel);
  A: (dim, N); Bt, Ct: (batch, L, N), i.e. B and C transposed so that the N-vector of one step is
  contiguous and the inner loop over N vectorises; bias, D: (dim,).

Each (batch, dim) row is independent, so rows are spread over threads with prange; the state of a
row is a length-N local array. float32 uses polynomial exp/softplus/sigmoid that LLVM vectorises
(there is no SVML here, and a libm call per state element costs more than the rest of the scan);
float64 keeps libm so gradcheck sees exact derivatives.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# reassoc lets LLVM vectorise the sums over N; contract allows FMAs. No nnan/ninf, so
# non-finite inputs still propagate.
_KERNEL_FASTMATH = {"contract", "reassoc", "nsz"}


# Time steps per chunk: the chunk's recomputed states and decays fit in L1.
CHUNK = 64

# ------------------------------------------------------------------------------------------------
# float32 exp / softplus / sigmoid emitted as straight-line LLVM IR.
#
# numba does not inline nested njit calls reliably (a softplus calling an njit exp measured 20x
# slower than inline code: scalar calls, no vectorisation), so these are intrinsics whose IR lands
# in the caller's loop body. Every instruction carries an explicit fast-math flag: numba's
# fastmath pass only flags instructions that have none, so the kernels' `reassoc` never reaches
# the rounding trick or the two-part ln2 subtraction below, which reassociation would destroy.

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_IR_FLAGS = ("contract",)

_EXP_LO = -87.33654  # below: result under FLT_MIN, returned as 0
_EXP_HI = 88.72283  # clamp only; inf already from 88.3763 (see _ir_exp_f32)
_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: adding it rounds to an integer held in the low bits
_EXP_BIAS = 127 - 0x4B400000  # exponent bias minus the bit pattern of _ROUND
_LN2_HI = 0.693359375  # exact in float32, so k * hi is exact for |k| < 2**14
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0)  # Taylor, Horner order
_ATANH_POLY = (1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0)
_SOFTPLUS_THRESHOLD = 20.0  # torch's: above it softplus(x) is x


def _c32(value: float) -> ir.Constant:
    return ir.Constant(_F32, float(np.float32(value)))


def _horner(builder: ir.IRBuilder, x: ir.Value, coeffs: tuple[float, ...]) -> ir.Value:
    acc = _c32(coeffs[0])
    for coeff in coeffs[1:]:
        acc = builder.fadd(builder.fmul(acc, x, flags=_IR_FLAGS), _c32(coeff), flags=_IR_FLAGS)
    return acc


def _select_gt(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, if_true: ir.Value,
               if_false: ir.Value) -> ir.Value:
    """a > b ? if_true : if_false (ordered: false when either is NaN)."""
    return builder.select(builder.fcmp_ordered(">", a, b, flags=_IR_FLAGS), if_true, if_false)


def _ir_exp_f32(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp in float32, ~2e-7 relative error, branch-free.

    x = k ln2 + r with |r| <= ln2/2 (two-part Cody-Waite ln2); exp(r) by a degree-6 Taylor
    polynomial; 2**k written into the exponent bits. k is rounded by adding 1.5 * 2**23, which
    leaves it in the low mantissa bits, so no round or float-to-int instruction is needed.
    At the float32 range limits: 0 below -87.3365 (true value under FLT_MIN) and inf from 88.3763
    (true overflow at 88.7228). NaN propagates.
    """
    lo = _c32(_EXP_LO)
    xc = _select_gt(builder, x, lo, x, lo)
    xc = _select_gt(builder, xc, _c32(_EXP_HI), _c32(_EXP_HI), xc)
    shifted = builder.fadd(builder.fmul(xc, _c32(_LOG2E), flags=_IR_FLAGS), _c32(_ROUND),
                           flags=_IR_FLAGS)
    k = builder.fsub(shifted, _c32(_ROUND), flags=_IR_FLAGS)
    r = builder.fsub(xc, builder.fmul(k, _c32(_LN2_HI), flags=_IR_FLAGS), flags=_IR_FLAGS)
    r = builder.fsub(r, builder.fmul(k, _c32(_LN2_LO), flags=_IR_FLAGS), flags=_IR_FLAGS)
    poly = _horner(builder, r, _EXP_POLY)
    bits = builder.add(builder.bitcast(shifted, _I32), ir.Constant(_I32, _EXP_BIAS))
    scale = builder.bitcast(builder.shl(bits, ir.Constant(_I32, 23)), _F32)
    res = builder.fmul(poly, scale, flags=_IR_FLAGS)
    res = _select_gt(builder, x, lo, res, _c32(0.0))
    is_nan = builder.fcmp_unordered("uno", x, x, flags=_IR_FLAGS)
    return builder.select(is_nan, x, res)


def _ir_sigmoid_f32(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    neg = builder.fmul(x, _c32(-1.0), flags=_IR_FLAGS)
    denom = builder.fadd(_c32(1.0), _ir_exp_f32(builder, neg), flags=_IR_FLAGS)
    return builder.fdiv(_c32(1.0), denom, flags=_IR_FLAGS)


def _ir_softplus_f32(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """softplus with torch's threshold, ~1e-7 relative error.

    softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]; log1p(e) = 2 atanh(s) with
    s = e / (2 + e) <= 1/3, whose odd series up to s**13 is accurate to ~1e-8.
    """
    neg = builder.fmul(x, _c32(-1.0), flags=_IR_FLAGS)
    neg_abs = _select_gt(builder, x, neg, neg, x)
    e = _ir_exp_f32(builder, neg_abs)
    s = builder.fdiv(e, builder.fadd(_c32(2.0), e, flags=_IR_FLAGS), flags=_IR_FLAGS)
    poly = _horner(builder, builder.fmul(s, s, flags=_IR_FLAGS), _ATANH_POLY)
    log1p_e = builder.fmul(builder.fmul(_c32(2.0), s, flags=_IR_FLAGS), poly, flags=_IR_FLAGS)
    pos = _select_gt(builder, x, _c32(0.0), x, _c32(0.0))
    res = builder.fadd(pos, log1p_e, flags=_IR_FLAGS)
    return _select_gt(builder, x, _c32(_SOFTPLUS_THRESHOLD), x, res)


def _f32_intrinsic(emit):  # type: ignore[no-untyped-def]
    """Wrap an IR emitter as a float32 -> float32 numba intrinsic."""

    def typer(typingctx, x):  # type: ignore[no-untyped-def]
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return emit(builder, args[0])

        return types.float32(types.float32), codegen

    typer.__name__ = emit.__name__.replace("_ir_", "_intrinsic_")
    return intrinsic(typer)


_exp_f32 = _f32_intrinsic(_ir_exp_f32)
_sigmoid_f32 = _f32_intrinsic(_ir_sigmoid_f32)
_softplus_f32 = _f32_intrinsic(_ir_softplus_f32)


# Dtype-dispatched helpers for the kernels: float32 gets the vectorisable IR above, float64 the
# exact libm functions (so gradcheck sees true derivatives). The Python bodies are fallbacks.


def _exp(x: float) -> float:
    return math.exp(x)


def _softplus(x: float) -> float:
    return x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@overload(_exp, inline="always")
def _exp_overload(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


@overload(_softplus, inline="always")
def _softplus_overload(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return lambda x: _softplus_f32(x)
    return lambda x: x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


@overload(_sigmoid, inline="always")
def _sigmoid_overload(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return lambda x: _sigmoid_f32(x)
    return lambda x: 1.0 / (1.0 + math.exp(-x))


def state_size_key(N: int) -> tuple[int, ...]:
    """The kernels' n_tuple argument: N passed as the length of a tuple.

    A tuple's length is part of its numba type, so each state size compiles (and caches) its own
    specialisation in which the loops over N have a constant trip count; LLVM then keeps them in
    fully unrolled vector code (forward measured ~30% faster than with a runtime N).
    """
    return (0,) * N


def chunk_count(L: int) -> int:
    """Number of CHUNK-step time chunks (the last one may be short)."""
    return (L + CHUNK - 1) // CHUNK


@njit(parallel=True, cache=True, fastmath=_KERNEL_FASTMATH)
def scan_fwd(u: np.ndarray, delta: np.ndarray, bias: np.ndarray, softplus: bool, A: np.ndarray,
             Bt: np.ndarray, Ct: np.ndarray, Dv: np.ndarray, z: np.ndarray, has_z: bool,
             save_states: bool, states: np.ndarray, out: np.ndarray,
             n_tuple: tuple[int, ...]) -> None:
    """Writes y into out; with save_states also h at each chunk start into states (b, dim, nC, N).

    delta is the raw step: bias and softplus are applied here, a chunk at a time into a local
    buffer (vectorised over t). z is read only when has_z. One prange task per (batch, dim) row,
    walking time in order: rows are 4 KiB-aliased in memory, so interleaving rows per time chunk
    (to share B and C in L1) measured slower. n_tuple: see state_size_key.
    """
    nb, nd, L = u.shape
    for row in prange(nb * nd):
        N = len(n_tuple)  # compile-time constant inside the parallel body
        b = row // nd
        d = row - b * nd
        h = np.zeros(N, dtype=u.dtype)
        a = np.empty(N, dtype=u.dtype)
        for n in range(N):
            a[n] = A[d, n]
        dtc = np.empty(CHUNK, dtype=u.dtype)
        zero = h[0]
        bias_d = bias[d]
        dd = Dv[d]
        for c in range((L + CHUNK - 1) // CHUNK):
            t_lo = c * CHUNK
            m = min(CHUNK, L - t_lo)
            for j in range(m):
                v = delta[b, d, t_lo + j] + bias_d
                dtc[j] = _softplus(v) if softplus else v
            if save_states:
                for n in range(N):
                    states[b, d, c, n] = h[n]
            for j in range(m):
                t = t_lo + j
                dtt = dtc[j]
                ut = u[b, d, t]
                x = dtt * ut
                y = zero
                for n in range(N):
                    hn = _exp(dtt * a[n]) * h[n] + x * Bt[b, t, n]
                    h[n] = hn
                    y += Ct[b, t, n] * hn
                out[b, d, t] = y + dd * ut
        if has_z:
            # Separate pass so the gating exp vectorises over t.
            for t in range(L):
                zt = z[b, d, t]
                out[b, d, t] *= zt * _sigmoid(zt)


@njit(parallel=True, cache=True, fastmath=_KERNEL_FASTMATH)
def scan_bwd(u: np.ndarray, delta: np.ndarray, bias: np.ndarray, softplus: bool, A: np.ndarray,
             Bt: np.ndarray, Ct: np.ndarray, Dv: np.ndarray, z: np.ndarray, has_z: bool,
             dout: np.ndarray, states: np.ndarray, groups: int, du: np.ndarray,
             ddelta: np.ndarray, dz: np.ndarray, dA_rows: np.ndarray, dD_rows: np.ndarray,
             dbias_rows: np.ndarray, dB_part: np.ndarray, dC_part: np.ndarray,
             n_tuple: tuple[int, ...]) -> None:
    """Gradients: u, raw delta, z in full; A, D, delta_bias per (batch, dim) row; B, C per group.

    Per row, chunks are visited last to first: the chunk's states are recomputed from the saved
    chunk-start state into a (CHUNK + 1, N) buffer (L1-resident; a per-row (L, N) buffer made
    this kernel memory-bound), then the reverse recurrence runs over the chunk, carrying
    dLoss/dh across chunks. dim is cut into `groups` contiguous slices; task (b, g) owns
    dB_part[g, b] and dC_part[g, b], so the gradients shared over dim are accumulated without
    races and summed over g by the caller. n_tuple: see state_size_key.
    """
    nb, nd, L = u.shape
    for task in prange(nb * groups):
        N = len(n_tuple)  # compile-time constant inside the parallel body
        b = task // groups
        g = task - b * groups
        hs = np.empty((CHUNK + 1, N), dtype=u.dtype)  # hs[j + 1] = h at step t_lo + j
        decay = np.empty((CHUNK, N), dtype=u.dtype)
        dtc = np.empty(CHUNK, dtype=u.dtype)  # effective step
        sgc = np.empty(CHUNK, dtype=u.dtype)  # d(effective step) / d(raw delta)
        gy = np.empty(CHUNK, dtype=u.dtype)  # dLoss/dy before gating
        gh = np.empty(N, dtype=u.dtype)  # dLoss/dh_t, carried backwards across chunks
        dA_acc = np.empty(N, dtype=u.dtype)
        dA_chunk = np.empty(N, dtype=u.dtype)
        a_row = np.empty(N, dtype=u.dtype)
        consts = np.empty(3, dtype=u.dtype)
        consts[0] = 0
        consts[1] = 1
        consts[2] = 20  # torch's softplus threshold: above it softplus is the identity
        zero = consts[0]
        one = consts[1]
        threshold = consts[2]
        dBg = dB_part[g, b]
        dCg = dC_part[g, b]
        for d in range((g * nd) // groups, ((g + 1) * nd) // groups):
            bias_d = bias[d]
            dd = Dv[d]
            for n in range(N):
                a_row[n] = A[d, n]
                gh[n] = zero
                dA_acc[n] = zero
            dD_acc = zero
            dbias_acc = zero
            for c in range((L + CHUNK - 1) // CHUNK - 1, -1, -1):
                t_lo = c * CHUNK
                m = min(CHUNK, L - t_lo)
                for j in range(m):
                    v = delta[b, d, t_lo + j] + bias_d
                    if softplus:
                        dtc[j] = _softplus(v)
                        sgc[j] = _sigmoid(v) if v <= threshold else one
                    else:
                        dtc[j] = v
                        sgc[j] = one
                for n in range(N):
                    hs[0, n] = states[b, d, c, n]
                # Recompute the chunk's states; gy temporarily holds the ungated y.
                for j in range(m):
                    t = t_lo + j
                    dtt = dtc[j]
                    x = dtt * u[b, d, t]
                    y = zero
                    for n in range(N):
                        a = _exp(dtt * a_row[n])
                        decay[j, n] = a
                        hn = a * hs[j, n] + x * Bt[b, t, n]
                        hs[j + 1, n] = hn
                        y += Ct[b, t, n] * hn
                    gy[j] = y + dd * u[b, d, t]
                if has_z:
                    for j in range(m):
                        t = t_lo + j
                        zt = z[b, d, t]
                        s = _sigmoid(zt)
                        go = dout[b, d, t]
                        dz[b, d, t] = go * gy[j] * s * (one + zt * (one - s))
                        gy[j] = go * zt * s
                else:
                    for j in range(m):
                        gy[j] = dout[b, d, t_lo + j]
                acc = zero
                for j in range(m):
                    acc += gy[j] * u[b, d, t_lo + j]
                dD_acc += acc
                # y_t = C_t . h_t  =>  dC_t += gy_t h_t.
                for j in range(m):
                    go = gy[j]
                    for n in range(N):
                        dCg[t_lo + j, n] += go * hs[j + 1, n]
                for n in range(N):
                    dA_chunk[n] = zero
                acc = zero
                for j in range(m - 1, -1, -1):
                    t = t_lo + j
                    dtt = dtc[j]
                    ut = u[b, d, t]
                    x = dtt * ut
                    go = gy[j]
                    g_dt = zero
                    g_x = zero
                    for n in range(N):
                        an = a_row[n]
                        a = decay[j, n]
                        ghn = gh[n] + go * Ct[b, t, n]
                        w = ghn * hs[j, n] * a
                        g_dt += w * an
                        dA_chunk[n] += w * dtt
                        dBg[t, n] += ghn * x
                        g_x += ghn * Bt[b, t, n]
                        gh[n] = ghn * a
                    g_raw = (g_dt + g_x * ut) * sgc[j]
                    ddelta[b, d, t] = g_raw
                    acc += g_raw
                    du[b, d, t] = g_x * dtt + go * dd
                dbias_acc += acc
                for n in range(N):
                    dA_acc[n] += dA_chunk[n]
            dD_rows[b, d] = dD_acc
            dbias_rows[b, d] = dbias_acc
            for n in range(N):
                dA_rows[b, d, n] = dA_acc[n]
