"""The causal router's selection as one fused op: window duals, weights, first-come slots.

Shapes: b batch, r routes, n sequence, W window (window_size), C slots per window (capacity),
nw = ceil(n / W) windows, T = n_iters. Inside, rows = b * r: scores [rows, n], mask [b, n]
(shared by a batch element's r routes), indices / weights / slot_mask [rows, nw * C], stats
[rows, nw, 5, T + 1] fp32 (entry w: the dual that sets window w's weights, i.e. window w - 1's;
entry 0 is a dummy) and slot_of [rows, nw * W] int32 (each position's slot, or -1).

The scheme is described in colt5/causal_routing.py: window w's weights are
y_i = exp(min(s_i + a_{w-1}, 0) / e_T) with a_{w-1} the coordinate-descent soft top-k dual of
window w - 1 (a window with nothing real takes the dual of its whole window); y_i > 1/2 (decided
on the logit) makes a real token a candidate; the first C candidates of a window take its slots
in position order, the unused slots point at the window's earliest other positions; window 0
has no past and its first C real tokens take its slots with weight 1 and no gradient. As in the
reference, the padded tail of the last window reads s = 0: an unused slot there has weight
exp(min(a, 0) / e_T), whose gradient goes to the dual alone.

Forward, one launch, one program per (row, window w): the coordinate descent of window w - 1 in
registers (the iteration and fp32 operations of `_coor_descent_fwd_kernel`, whose helpers it
imports), then window w's y, candidates, one cumsum for the slots, and the slot outputs, the
dual's per-iteration stats and each position's slot number.

Backward, one launch, one program per (row, window v), no atomics: ds of window v's positions =
the direct term of v's own slots (dy/ds = y / e_T where s + a_{v-1} <= 0) + the chain through
a_v, whose gradient is the sum of window v + 1's direct terms (recomputed here from its scores,
stats and slot gradients), pushed back through v's coordinate descent (`_chain`, as the
offset's backward does). Each program reads two windows' scores and slot numbers, so every
window is read twice, instead of a second launch or a float atomic.

Windows longer than `MAX_WINDOW` (they would not stay in registers) fall back to the
reference, whose window duals then still come from the Triton soft top-k on CUDA.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .checks import _is_real, check_backend, check_int, check_schedule, check_scores
from .soft_topk_kernels import (
    _N_STATS,
    _STAT_A,
    _STAT_E,
    _STAT_LOG2S,
    _STAT_M,
    _STAT_Q,
    LOG2E,
    _chain,
    _count_max,
    _direct,
    _load_scores,
    _mass,
)
from . import runtime
from .runtime import kernel_op, off_current_device, register_fake, require_triton
from .soft_topk import coor_descent_offset

__all__ = [
    "route_causal",
    "route_causal_reference",
    "soft_top_k_offset",
    "window_weights",
    "assign_slots",
    "pad_windows",
    "MAX_WINDOW",
]

LN2 = tl.constexpr(0.6931471805599453)

# Largest window a program keeps in registers: two windows of fp32 scores plus a few masks and
# one int32 scan at 8 warps (32 elements per thread per tensor). Longer windows go to the
# reference (see the module docstring). Not measured against larger blocks yet.
MAX_WINDOW = 8192


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dual_scores(s_row, mask_row, win, offs, W, n, HAS_MASK: tl.constexpr):
    """fp32 scores of window `win` as its dual sees them: its real positions, or all of them
    when none is real; -inf for the rest (past the window or n, NaN, -inf; win < 0: nothing)."""
    lo = tl.maximum(win, 0) * W
    hi = tl.where(win >= 0, tl.minimum(W, n - lo), 0)
    s = _load_scores(s_row + lo, s_row + lo, offs, hi, False)
    if HAS_MASK:
        inb = offs < hi
        real = inb & (tl.load(mask_row + lo + offs, mask=inb, other=0) != 0)
        none_real = tl.max(real.to(tl.int32), axis=0) == 0
        s = tl.where(real | none_real, s, float("-inf"))
    return s


@triton.jit
def _window_dual(s, st, n_stat, n_iters, log_k, eps, eps_first, eps_decay):
    """Coordinate descent on one window in registers (what `_coor_descent_fwd_kernel` computes
    for an unsplit row, in the same fp32 operations); writes the stats, returns (a_T, e_T),
    a_T = 0 for a window with no valid position."""
    n_valid, s_max = _count_max(s)
    s_max = tl.where(n_valid > 0, s_max, 0.0)  # a window with nothing valid: dummy finite values
    e = eps_first
    # iteration 0: s + b = 0 at every valid position, so logsumexp = log(n_valid)
    log2_s = tl.log2(tl.maximum(n_valid, 1.0))
    a = e * (log_k - log2_s / LOG2E)
    tl.store(st + _STAT_A * n_stat, e * 0.0)
    tl.store(st + _STAT_M * n_stat, e * 0.0)
    tl.store(st + _STAT_E * n_stat, e)
    tl.store(st + _STAT_LOG2S * n_stat, log2_s)
    tl.store(st + _STAT_Q * n_stat, e * 0.0)
    for t in range(1, n_iters):
        tl.store(st + _STAT_A * n_stat + t, a)
        e = tl.maximum(e * eps_decay, eps)
        m_t = tl.minimum(s_max, -a)
        c = LOG2E / e
        u, clamped = _mass(s, -a, m_t, c)
        p_clamped = tl.exp2((-a - m_t) * c)
        mass = u + clamped * p_clamped
        mass = tl.where(mass > 0, mass, 1.0)
        log2_s = tl.log2(mass)
        tl.store(st + _STAT_M * n_stat + t, m_t)
        tl.store(st + _STAT_E * n_stat + t, e)
        tl.store(st + _STAT_LOG2S * n_stat + t, log2_s)
        tl.store(st + _STAT_Q * n_stat + t, clamped * p_clamped / mass)
        a = e * (log_k - log2_s / LOG2E) - m_t
    e_T = tl.maximum(e * eps_decay, eps)
    a_T = tl.where(n_valid > 0, a, 0.0)
    # A[T] holds the offset the weights use (0 for a window with nothing valid); _chain never reads it
    tl.store(st + _STAT_A * n_stat + n_iters, a_T)
    tl.store(st + _STAT_M * n_stat + n_iters, e * 0.0)
    tl.store(st + _STAT_E * n_stat + n_iters, e_T)
    tl.store(st + _STAT_LOG2S * n_stat + n_iters, e * 0.0)
    tl.store(st + _STAT_Q * n_stat + n_iters, e * 0.0)
    return a_T, e_T


@triton.jit
def _route_causal_fwd_kernel(
    s_ptr, mask_ptr, idx_ptr, w_ptr, smask_ptr, stats_ptr, slot_ptr,
    n, n_win, n_routes, W, C, n_iters, log_k, eps, eps_first, eps_decay,
    HAS_MASK: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # a flat grid (windows of a row adjacent): no 65535 limit on either count
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_win
    win = (pid % n_win).to(tl.int32)
    s_row = s_ptr + row * n
    mask_row = mask_ptr + (row // n_routes) * n
    n_stat = n_iters + 1
    offs = tl.arange(0, BLOCK_W)
    in_win = offs < W

    # the dual of the previous window (window 0: an empty window's dummy, unused)
    prev = _dual_scores(s_row, mask_row, win - 1, offs, W, n, HAS_MASK)
    a, e_T = _window_dual(prev, stats_ptr + pid * (5 * n_stat), n_stat, n_iters, log_k, eps, eps_first, eps_decay)

    # this window's weights and candidates; the padded tail of the last window reads s = 0
    pos = win * W + offs
    inb = in_win & (pos < n)
    s = tl.load(s_row + pos, mask=inb, other=0.0).to(tl.float32)
    real = inb
    if HAS_MASK:
        real = real & (tl.load(mask_row + pos, mask=inb, other=0) != 0)
    logit = s + a
    # y > 1/2, decided on the logit so that it cannot flip with rounding of exp
    cand = tl.where(win > 0, real & (logit > -e_T * LN2), real)
    y = tl.where(win > 0, tl.exp2(tl.minimum(logit, 0.0) * (LOG2E / e_T)), 1.0)

    # First come, first served: the j-th candidate takes slot j - 1 if j <= C. Routed positions
    # up to here = min(candidates up to here, C), so one scan gives both groups' ranks: routed
    # ones first, then the others (padding included) in position order.
    n_cand = tl.cumsum(cand.to(tl.int32), axis=0)
    routed = cand & (n_cand <= C)
    n_routed_here = tl.minimum(n_cand, C)
    n_routed = tl.minimum(tl.sum(cand.to(tl.int32), axis=0), C)
    slot = tl.where(routed, n_routed_here - 1, n_routed + offs - n_routed_here)
    has_slot = in_win & (slot < C)
    tl.store(slot_ptr + row * n_win * W + pos, tl.where(has_slot, slot, -1), mask=in_win)
    out = row * n_win * C + win * C + slot
    tl.store(idx_ptr + out, tl.minimum(pos, n - 1).to(tl.int64), mask=has_slot)
    if STRAIGHT_THROUGH:
        y = tl.full([BLOCK_W], 1.0, tl.float32)
    tl.store(w_ptr + out, y.to(w_ptr.dtype.element_ty), mask=has_slot)
    tl.store(smask_ptr + out, routed.to(tl.uint8), mask=has_slot)


@triton.jit
def _slot_direct(s_row, slot_row, gw_row, st_row, win, offs, W, C, n, n_stat, n_iters):
    """Window `win`'s scores (s = 0 in the padded tail) and the direct term of its slots' weight
    gradients at fixed a_{win-1}: gw y / e_T where s + a <= 0, 0 at positions without a slot."""
    pos = win * W + offs
    in_win = offs < W
    s = tl.load(s_row + pos, mask=in_win & (pos < n), other=0.0).to(tl.float32)
    slot = tl.load(slot_row + pos, mask=in_win, other=-1)
    gy = tl.load(gw_row + win * C + slot, mask=slot >= 0, other=0.0).to(tl.float32)
    st = st_row + win * (5 * n_stat)
    a = tl.load(st + _STAT_A * n_stat + n_iters)
    e_T = tl.load(st + _STAT_E * n_stat + n_iters)
    return s, _direct(s, gy, a, LOG2E / e_T, 1.0 / e_T)


@triton.jit
def _route_causal_bwd_kernel(
    gw_ptr, s_ptr, mask_ptr, stats_ptr, slot_ptr, ds_ptr,
    n, n_win, n_routes, W, C, n_iters,
    HAS_MASK: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_win
    win = (pid % n_win).to(tl.int32)
    s_row = s_ptr + row * n
    mask_row = mask_ptr + (row // n_routes) * n
    slot_row = slot_ptr + row * n_win * W
    gw_row = gw_ptr + row * n_win * C
    n_stat = n_iters + 1
    st_row = stats_ptr + row * n_win * (5 * n_stat)
    offs = tl.arange(0, BLOCK_W)

    # this window's own slots, through a_{win-1} (window 0's weights are constants)
    _, direct = _slot_direct(s_row, slot_row, gw_row, st_row, win, offs, W, C, n, n_stat, n_iters)
    direct = tl.where(win > 0, direct, 0.0)

    # dL/da_win: the next window's direct terms (the last window's dual is unused)
    has_next = win + 1 < n_win
    nxt = tl.minimum(win + 1, n_win - 1)
    _, direct_next = _slot_direct(s_row, slot_row, gw_row, st_row, nxt, offs, W, C, n, n_stat, n_iters)
    dual = _dual_scores(s_row, mask_row, win, offs, W, n, HAS_MASK)
    n_valid, _ = _count_max(dual)
    # a window with nothing valid has the constant offset 0: no gradient through it
    abar = tl.where(has_next & (n_valid > 0), tl.sum(direct_next, axis=0), 0.0)
    ds = _chain(dual, direct, abar, st_row + nxt * (5 * n_stat), n_stat, n_iters)

    pos = win * W + offs
    tl.store(ds_ptr + row * n + pos, ds.to(ds_ptr.dtype.element_ty), mask=(offs < W) & (pos < n))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block_and_warps(window_size: int) -> tuple[int, int]:
    # At least a warp's width of lanes. NOT MEASURED for this kernel yet: one warp up to 256
    # elements, so that the ~n_iters reductions of a program stay shuffles within one warp (no
    # shared-memory round trip and barrier each), then coor_descent's plan (measured there on
    # whole rows: 2 warps up to 1024 elements, 8 from 4096).
    block = max(32, triton.next_power_of_2(window_size))
    return block, 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 2048 else 8


def _weights_dtype(scores: Tensor) -> torch.dtype:
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def route_causal_fwd(
    scores: Tensor, mask: Tensor | None, window_size: int, capacity: int, k: float, n_iters: int,
    eps: float, eps_first: float, eps_decay: float, straight_through: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """scores [b, r, n] -> (indices, weights, slot_mask [b, r, nw * C], stats, slot_of); no checks."""
    scores = scores.contiguous()
    b, r, n = scores.shape
    W, C = window_size, capacity
    nw = triton.cdiv(n, W)
    device = scores.device
    indices = runtime.empty((b, r, nw * C), dtype=torch.int64, device=device)
    weights = runtime.empty((b, r, nw * C), dtype=_weights_dtype(scores), device=device)
    slot_mask = runtime.empty((b, r, nw * C), dtype=torch.bool, device=device)
    stats = runtime.empty((b * r, nw, _N_STATS, n_iters + 1), dtype=torch.float32, device=device)
    slot_of = runtime.empty((b * r, nw * W), dtype=torch.int32, device=device)
    if b * r == 0:
        return indices, weights, slot_mask, stats, slot_of
    block, num_warps = _block_and_warps(W)
    mask_arg = scores if mask is None else mask.contiguous().view(torch.uint8)
    # floats even when given ints: Triton would make an int 1 a constant of the kernel
    _route_causal_fwd_kernel[(b * r * nw,)](
        scores, mask_arg, indices, weights, slot_mask.view(torch.uint8), stats, slot_of,
        n, nw, r, W, C, n_iters, math.log(k), float(eps), float(eps_first), float(eps_decay),
        HAS_MASK=mask is not None, STRAIGHT_THROUGH=bool(straight_through), BLOCK_W=block, num_warps=num_warps,
    )
    return indices, weights, slot_mask, stats, slot_of


def route_causal_bwd(
    grad_weights: Tensor, scores: Tensor, mask: Tensor | None, stats: Tensor, slot_of: Tensor,
    window_size: int, capacity: int, n_iters: int,
) -> Tensor:
    """dL/dweights [b, r, nw * C] -> dL/dscores [b, r, n] in scores.dtype; no checks."""
    scores = scores.contiguous()
    b, r, n = scores.shape
    W, C = window_size, capacity
    nw = triton.cdiv(n, W)
    ds = runtime.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    if ds.numel() == 0:
        return ds
    block, num_warps = _block_and_warps(W)
    mask_arg = scores if mask is None else mask.contiguous().view(torch.uint8)
    _route_causal_bwd_kernel[(b * r * nw,)](
        grad_weights.contiguous(), scores, mask_arg, stats, slot_of, ds,
        n, nw, r, W, C, n_iters,
        HAS_MASK=mask is not None, BLOCK_W=block, num_warps=num_warps,
    )
    return ds


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile: no graph break) and their autograd
# --------------------------------------------------------------------------------------------

@kernel_op("colt5::route_causal_fwd")
def _fwd_op(scores: Tensor, mask: Tensor | None, window_size: int, capacity: int, k: float, n_iters: int, eps: float,
            eps_first: float, eps_decay: float, straight_through: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (indices, weights, slot_mask, stats, slot_of): the last two for the backward."""
    return route_causal_fwd(scores, mask, window_size, capacity, k, n_iters, eps, eps_first, eps_decay,
                            straight_through)


@register_fake(_fwd_op)
def _(scores, mask, window_size, capacity, k, n_iters, eps, eps_first, eps_decay, straight_through):
    b, r, n = scores.shape
    nw = -(-n // window_size)
    slots = (b, r, nw * capacity)
    return (scores.new_empty(slots, dtype=torch.int64), scores.new_empty(slots, dtype=_weights_dtype(scores)),
            scores.new_empty(slots, dtype=torch.bool),
            scores.new_empty((b * r, nw, _N_STATS, n_iters + 1), dtype=torch.float32),
            scores.new_empty((b * r, nw * window_size), dtype=torch.int32))


@kernel_op("colt5::route_causal_bwd")
def _bwd_op(grad_weights: Tensor, scores: Tensor, mask: Tensor | None, stats: Tensor, slot_of: Tensor, window_size: int,
            capacity: int, n_iters: int) -> Tensor:
    return route_causal_bwd(grad_weights, scores, mask, stats, slot_of, window_size, capacity, n_iters)


@register_fake(_bwd_op)
def _(grad_weights, scores, mask, stats, slot_of, window_size, capacity, n_iters):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    scores, mask, window_size, capacity, _k, n_iters, *_ = inputs
    _, _, _, stats, slot_of = output
    ctx.save_for_backward(scores, mask, stats, slot_of)
    ctx.config = (window_size, capacity, n_iters)


def _backward(ctx, _g_indices, g_weights, _g_slot_mask, _g_stats, _g_slot_of):
    scores, mask, stats, slot_of = ctx.saved_tensors
    if g_weights is None:
        ds = torch.zeros_like(scores)
    else:
        ds = _bwd_op(g_weights, scores, mask, stats, slot_of, *ctx.config)
    return ds, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The reference (the specification, the CPU path, and the path for windows past MAX_WINDOW)
# --------------------------------------------------------------------------------------------


def soft_top_k_offset(
    s: Tensor,
    *,
    k: float,
    n_iters: int,
    eps: float,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    backend: Literal["triton", "reference"] | None = None,
) -> tuple[Tensor, float]:
    """The dual offset of coordinate-descent soft top-k: returns (a [..., 1], e) such that
    `colt5.coor_descent(s, ...)` equals exp(min(s + a, 0) / e) at the unmasked positions.

    `colt5.kernels.coor_descent_offset` (fused Triton kernels on CUDA, the reference elsewhere;
    `backend` as there), differentiable. Computed in float32 (float64 for float64 scores on the
    reference). A row with nothing unmasked gets the offset of its whole row, masked positions
    included, so that its next window still gets a data-dependent threshold.
    """
    if mask is not None:
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return coor_descent_offset(
        s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask, backend=backend
    )


def pad_windows(scores: Tensor, mask: Tensor | None, window_size: int) -> tuple[Tensor, Tensor]:
    """scores [b, r, n], mask [b, n] or None -> (s, real) [b, r, nw, W]: scores padded with 0,
    real = unmasked and not padding."""
    b, r, n = scores.shape
    W = window_size
    nw = -(-n // W)
    pad = nw * W - n
    s = F.pad(scores, (0, pad)).view(b, r, nw, W)
    if mask is None:
        real = torch.ones(b, r, n, dtype=torch.bool, device=scores.device)
    else:
        real = mask.unsqueeze(1).expand(b, r, n)
    real = F.pad(real, (0, pad), value=False).view(b, r, nw, W)
    return s, real


def window_weights(
    s: Tensor,
    real: Tensor,
    *,
    k: float,
    n_iters: int,
    eps: float,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    backend: Literal["triton", "reference"] | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft weights y and candidacy (y > 1/2) of every token from the previous window's dual:
    s, real [b, r, nw, W] -> y (fp32, fp64 for fp64 s), candidate (bool; not yet & real).
    Window 0 gets y = 1 (a constant) and every position a candidate. `backend` is the duals'."""
    b, r, nw, W = s.shape
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    first_y = torch.ones(b, r, 1, W, dtype=dtype, device=s.device)
    first_candidate = torch.ones(b, r, 1, W, dtype=torch.bool, device=s.device)
    if nw == 1:
        return first_y, first_candidate
    a, e = soft_top_k_offset(
        s[:, :, :-1], k=k, n_iters=n_iters, eps=eps, eps_init=eps_init, eps_decay=eps_decay,
        mask=real[:, :, :-1], backend=backend,
    )
    logits = s[:, :, 1:].to(dtype) + a
    y = torch.exp(logits.clamp_max(0.0) / e)
    # y > 1/2, decided on the logit so that it cannot flip with rounding of exp.
    candidate = logits.detach() > -e * math.log(2.0)
    return torch.cat((first_y, y), dim=2), torch.cat((first_candidate, candidate), dim=2)


def assign_slots(
    y: Tensor, candidate: Tensor, real: Tensor, capacity: int, n: int, straight_through: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Weights y, candidacy and real [b, r, nw, W] -> (indices, weights, slot_mask) [b, r, nw * C]:
    the first C real candidates of each window take its slots in position order, the unused slots
    point at the window's earliest other positions (clamped to n - 1) and are masked; weights
    are y at the slots, exactly 1 in the forward with straight_through (the gradient goes to y)."""
    b, r, nw, W = y.shape
    C = capacity
    candidate = candidate & real
    # First come, first served: the j-th candidate of a window takes slot j if j < C.
    routed = candidate & (candidate.cumsum(-1) <= C)
    pos = torch.arange(W, device=y.device)
    key = torch.where(routed, pos, pos + W)  # routed tokens first, each group in position order
    slot = key.topk(C, dim=-1, largest=False, sorted=True).indices  # [b, r, nw, C]
    slot_mask = routed.gather(-1, slot)
    weights = y.gather(-1, slot)
    if straight_through:
        weights = (weights - weights.detach()) + 1.0  # exactly 1, unlike w + (1 - w).detach()
    starts = torch.arange(nw, device=y.device).mul_(W).view(1, 1, nw, 1)
    # Slots in the padded tail of the last window point at n - 1 and are masked.
    indices = (slot + starts).clamp_max_(n - 1)
    return indices.flatten(2), weights.flatten(2), slot_mask.flatten(2)


def route_causal_reference(
    scores: Tensor,
    *,
    window_size: int,
    capacity: int,
    k: float,
    n_iters: int,
    eps: float,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    straight_through: bool = True,
    backend: Literal["triton", "reference"] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`route_causal` in plain PyTorch ops (autograd does the backward); arguments as there,
    assumed valid, except `backend`, which picks the window duals' soft top-k
    (`coor_descent_offset`): "reference" makes this all PyTorch. Computes in fp64 for fp64
    scores (weights then fp64 too)."""
    s, real = pad_windows(scores, mask, window_size)
    y, candidate = window_weights(
        s, real, k=k, n_iters=n_iters, eps=eps, eps_init=eps_init, eps_decay=eps_decay, backend=backend
    )
    return assign_slots(y, candidate, real, capacity, scores.shape[-1], straight_through)


# --------------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------------


def _check_args(scores, window_size, capacity, k, n_iters, eps, eps_init, eps_decay, mask, straight_through,
                backend) -> None:
    check_scores(scores, "scores")
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape [batch, routes, seq], got {tuple(scores.shape)}")
    if scores.shape[-1] < 1:
        raise ValueError(f"scores must have at least one position (seq >= 1), got shape {tuple(scores.shape)}")
    check_int("window_size", window_size, 1)
    check_int("capacity", capacity, 1, window_size, f"window_size={window_size}")
    if not _is_real(k):
        raise TypeError(f"k must be a number, got {type(k).__name__}")
    if not 0 < k < float("inf"):
        raise ValueError(f"k must be finite and > 0, got {k}")
    check_schedule(n_iters, eps, eps_init, eps_decay)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor [batch, seq] or None, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        b, _, n = scores.shape
        if mask.shape != (b, n):
            raise ValueError(f"mask must have shape [batch, seq] = {(b, n)}, got {tuple(mask.shape)}")
        if mask.device != scores.device:
            raise ValueError(f"mask must be on the device of scores ({scores.device}), got {mask.device}")
    if not isinstance(straight_through, bool):
        raise TypeError(f"straight_through must be a bool, got {type(straight_through).__name__}")
    check_backend(backend)


def route_causal(
    scores: Tensor,
    *,
    window_size: int,
    capacity: int,
    k: float,
    n_iters: int,
    eps: float,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    straight_through: bool = True,
    backend: Literal["triton", "reference"] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The causal router's selection (colt5/causal_routing.py describes the scheme).

    Args:
        scores: [b, r, n] floating (computed in fp32; fp64 in fp64 on the reference).
        window_size: W >= 1; capacity: C slots per window, 1 <= C <= W.
        k: the soft top-k target of each window (> 0; the router passes min(C * fetch_k_ratio, W)).
        n_iters, eps, eps_init, eps_decay: the coordinate-descent schedule (as `coor_descent`).
        mask: bool [b, n] or None, True = real token; shared by the r routes.
        straight_through: weights are exactly 1 in the forward and pass their gradient to y.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "reference" (PyTorch ops), or
            None: Triton for CUDA tensors, the reference otherwise. Windows longer than
            MAX_WINDOW take the reference whatever the backend.

    Returns, with nw = ceil(n / W), in window order:
        indices [b, r, nw * C] int64: a window's routed positions first, in position order, then
            its unused slots pointing at its earliest non-routed positions; clamped to n - 1.
        weights [b, r, nw * C] fp32 (fp64 for fp64 scores): y at the slot (1 in window 0, with no
            gradient); differentiable with respect to scores.
        slot_mask [b, r, nw * C] bool: False = unused slot.

    Static shapes, no host synchronisation; one kernel forward, one backward on Triton.

    Raises:
        TypeError / ValueError naming the argument; RuntimeError for backend="triton" on a CPU
        tensor without TRITON_INTERPRET=1.
    """
    _check_args(scores, window_size, capacity, k, n_iters, eps, eps_init, eps_decay, mask, straight_through, backend)
    kwargs = dict(window_size=window_size, capacity=capacity, k=k, n_iters=n_iters, eps=eps, eps_init=eps_init,
                  eps_decay=eps_decay, mask=mask, straight_through=straight_through)
    if not (backend == "triton" or (backend is None and scores.is_cuda)):
        return route_causal_reference(scores, **kwargs, backend=backend)
    require_triton(scores, "route_causal(backend='triton')")
    if window_size > MAX_WINDOW:
        return route_causal_reference(scores, **kwargs, backend=backend)
    if off_current_device(scores):  # Triton launches on the current device; autograd's backward runs on s's
        with torch.cuda.device(scores.device):
            return route_causal(scores, **kwargs, backend=backend)
    eps_first = max(eps_init if eps_init is not None else eps, eps)
    indices, weights, slot_mask, _, _ = _fwd_op(
        scores, mask, int(window_size), int(capacity), float(k), int(n_iters), float(eps), float(eps_first),
        float(eps_decay), straight_through,
    )
    return indices, weights, slot_mask
