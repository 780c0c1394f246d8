"""Coordinate-descent soft top-k: launch plans, launchers, the torch.library ops, public entry points.

Shapes: s, mask, y, ds are [rows, n] inside (the public functions flatten [..., n]); a per-row
k, the offset a_T and its gradient ga are [rows]; stats is [rows, 5, T + 1] fp32 with
T = n_iters. The kernels and the math are in `kernels/soft_topk_kernels.py`.

One path in every mode: the public functions call the library ops (`colt5::coor_descent_fwd`,
`colt5::coor_descent_offset_fwd`, their backward `colt5::coor_descent_bwd`), which eager mode
dispatches like any op and torch.compile keeps whole; no step reads a tensor on the host, so
CUDA graphs capture them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import triton
from torch import Tensor

from .checks import check_backend, check_coor_descent_args, checked_k, eps_schedule
from .soft_topk_kernels import _N_STATS, _STAT_A, _coor_descent_bwd_kernel, _coor_descent_fwd_kernel
from .reference import coor_descent_offset_reference, coor_descent_reference
from . import runtime
from .runtime import INTERPRET, kernel_op, off_current_device, register_fake, require_triton

# Largest chunk a program keeps in registers (fp32 scores): 32768 = 128 per thread at 8 warps.
MAX_REG_BLOCK = 32768
# A row is split over programs when rows alone leave most SMs idle and a row is this long.
MIN_SPLIT_N = 16384
MIN_SPLIT_LEN = 4096


@dataclass(frozen=True)
class Plan:
    """How a [rows, n] call is spread over programs."""

    rows: int
    n: int
    block_n: int
    split_len: int
    n_splits: int
    cooperative: bool
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.rows, self.n_splits)

    def constexprs(self) -> dict:
        return dict(BLOCK_N=self.block_n, SPLIT_LEN=self.split_len, SPLITS_P2=triton.next_power_of_2(self.n_splits))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


@functools.lru_cache(maxsize=1024)
def plan_for(rows: int, n: int, device: torch.device) -> Plan:
    """The plan every launch of a [rows, n] call uses (tests replace this function to force one
    of `make_plan`'s plans on small rows)."""
    return make_plan(rows, n, device)


def make_plan(
    rows: int, n: int, device: torch.device, *, block_n: int | None = None, split_len: int | None = None,
    cooperative: bool = True, num_warps: int | None = None,
) -> Plan:
    """The heuristic plan; a keyword given caps the chunk (block_n), fixes the split length,
    turns the cooperative kernel off or fixes the warps."""
    sms = _num_sms(device)
    if split_len is None:
        if n >= MIN_SPLIT_N and rows * 2 <= sms:
            n_splits = max(1, min(sms // rows, triton.cdiv(n, MIN_SPLIT_LEN)))
            split_len = triton.cdiv(n, n_splits)
        else:
            split_len = n
    block_n = min(block_n or MAX_REG_BLOCK, triton.next_power_of_2(split_len))
    split_len = triton.cdiv(split_len, block_n) * block_n
    n_splits = triton.cdiv(n, split_len)
    cooperative = cooperative and n_splits > 1 and device.type == "cuda" and not INTERPRET and rows * n_splits <= sms
    if num_warps is None:
        # H100, CUDA-graph f+b (`coor_descent.py --tune`): 2 warps at <= 1024 elements per
        # program (1024 x 1024: 36.6 vs 45.6 us at 4), 8 at 4096-8192 (16 x 4096: 29.3 vs 37.2
        # at 4); 8 beats 16 at 32768 per program (1024 x 32768 fwd 367 vs 494 us) and in the
        # cooperative split kernel (4 x 1M fwd 85.7 vs 102.2 us).
        num_warps = 2 if block_n <= 1024 else 4 if block_n <= 2048 else 8
    return Plan(rows, n, block_n, split_len, n_splits, cooperative, num_warps)


def _split_buffers(device: torch.device, plan: Plan, n_partials: int) -> tuple[Tensor, Tensor]:
    """Partial sums of split rows (fp32) and the cooperative barrier's counters (int64, zeroed:
    a barrier counts rounds of a row's programs from any multiple of n_splits, so the forward's
    counters serve its backward too)."""
    part = runtime.empty(n_partials, device=device, dtype=torch.float32)
    return part, torch.zeros(plan.rows if plan.cooperative else 1, device=device, dtype=torch.int64)


def coor_descent_fwd(
    s: Tensor, mask: Tensor | None, k_rows: Tensor | None, k: float, n_iters: int,
    eps: float, eps_first: float, eps_decay: float, *, write_y: bool = True, mask_div: int = 1,
) -> tuple[Tensor, Tensor]:
    """s [rows, n] -> (y [rows, n] in s.dtype, stats [rows, 5, n_iters + 1] fp32).

    write_y=False skips y (returned empty [0]); the offset a_T is stats[:, _STAT_A, n_iters].
    mask [rows / mask_div, n]: mask row r // mask_div serves score row r (routes sharing a mask).
    """
    if off_current_device(s):  # Triton launches on the current device
        with torch.cuda.device(s.device):
            return coor_descent_fwd(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay,
                                    write_y=write_y, mask_div=mask_div)
    s = s.contiguous()
    rows, n = s.shape
    y = runtime.empty(s.shape, dtype=s.dtype, device=s.device) if write_y else s.new_empty(0)
    stats = runtime.empty((rows, _N_STATS, n_iters + 1), dtype=torch.float32, device=s.device)
    if rows == 0 or n == 0:
        return y, stats.zero_()
    plan = plan_for(rows, n, s.device)
    mask_arg = s if mask is None else mask.contiguous().view(torch.uint8)
    k_arg = stats if k_rows is None else k_rows.contiguous()
    part = sync = stats  # placeholders for pointers the kernel never reads
    if plan.n_splits > 1:  # partials [rows, n_iters + 1, n_splits, 2]
        part, sync = _split_buffers(s.device, plan, rows * (n_iters + 1) * plan.n_splits * 2)
    args = (s, mask_arg, k_arg, y if write_y else s, stats, part, sync, n, mask_div, plan.n_splits, n_iters)
    # floats even when given ints: Triton would make an int 1 a constant of the kernel
    scalars = (math.log(k), float(eps), float(eps_first), float(eps_decay))
    flags = dict(HAS_MASK=mask is not None, K_PER_ROW=k_rows is not None, SPLIT=plan.n_splits > 1,
                 COOPERATIVE=plan.cooperative, WRITE_Y=write_y, **plan.constexprs())
    steps = [(0, n_iters + 1)] if plan.n_splits == 1 or plan.cooperative else [(t, t + 1) for t in range(n_iters + 1)]
    for begin, end in steps:
        _coor_descent_fwd_kernel[plan.grid](*args, begin, end, *scalars, **flags, num_warps=plan.num_warps)
    return y, stats


def coor_descent_bwd(
    gy: Tensor | None, s: Tensor, mask: Tensor | None, k_rows: Tensor | None, stats: Tensor, n_iters: int,
    ga: Tensor | None = None, *, mask_div: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """Gradients from gy = dL/dy [rows, n] and/or ga = dL/da_T [rows] (None: no such gradient)
    -> (ds [rows, n] in s.dtype, dk [rows] fp32, or None when k is a number)."""
    if off_current_device(s):
        with torch.cuda.device(s.device):
            return coor_descent_bwd(gy, s, mask, k_rows, stats, n_iters, ga, mask_div=mask_div)
    s = s.contiguous()
    rows, n = s.shape
    ds = runtime.empty(s.shape, dtype=s.dtype, device=s.device)
    dk = None if k_rows is None else runtime.empty(rows, dtype=torch.float32, device=s.device)
    if rows == 0 or n == 0:
        return ds, (dk.zero_() if dk is not None else None)
    plan = plan_for(rows, n, s.device)
    gy_arg = s if gy is None else gy.contiguous()
    # a_T of a row with nothing valid is the constant 0: no gradient flows through it.
    ga_arg = stats if ga is None else (ga * _has_valid(s, mask, mask_div)).contiguous()
    mask_arg = s if mask is None else mask.contiguous().view(torch.uint8)
    k_arg = stats if k_rows is None else k_rows.contiguous()
    part = sync = stats
    # Without gy, abar_T = ga needs no reduction over the row: every split runs phase 0.
    if plan.n_splits == 1 or gy is None:
        phases = (0,)
    else:  # per-split partial sums of abar_T, exchanged between phases 1 and 2 (or inside 3)
        phases = (3,) if plan.cooperative else (1, 2)
        part, sync = _split_buffers(s.device, plan, rows * plan.n_splits)
    args = (gy_arg, s, mask_arg, k_arg, stats, part, sync, ga_arg, ds, stats if dk is None else dk,
            n, mask_div, plan.n_splits, n_iters)
    flags = dict(HAS_MASK=mask is not None, K_PER_ROW=k_rows is not None, HAS_GY=gy is not None,
                 HAS_GA=ga is not None, **plan.constexprs())
    for phase in phases:
        _coor_descent_bwd_kernel[plan.grid](*args, **flags, PHASE=phase, num_warps=plan.num_warps)
    return ds, dk


def _has_valid(s: Tensor, mask: Tensor | None, mask_div: int = 1) -> Tensor:
    """[rows] bool: the row has a position that takes part (unmasked, not NaN, not -inf)."""
    valid = (s == s) & (s != float("-inf"))
    if mask is not None:
        valid = valid & (mask if mask_div == 1 else mask.repeat_interleave(mask_div, dim=0))
    return valid.any(dim=-1)


def offset_of(stats: Tensor, n_iters: int, s: Tensor, mask: Tensor | None, mask_div: int = 1) -> Tensor:
    """a_T [rows] fp32, 0 for a row with nothing valid (a new tensor: a custom op's outputs
    may not alias one another). Done here, not in the kernel: a select on the last iteration
    inside the forward kernel's loop miscompiled on an H100 (triton 3.6), giving wrong y."""
    a = stats[:, _STAT_A.value, n_iters]
    return torch.where(_has_valid(s, mask, mask_div), a, torch.zeros_like(a))


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile: no graph break) and their autograd
# --------------------------------------------------------------------------------------------

def fake_stats(s: Tensor, n_iters: int) -> Tensor:
    return s.new_empty((s.shape[0], _N_STATS, n_iters + 1), dtype=torch.float32)


@kernel_op("colt5::coor_descent_fwd")
def _fwd_op(s: Tensor, mask: Tensor | None, k_rows: Tensor | None, k: float, n_iters: int, eps: float,
            eps_first: float, eps_decay: float) -> tuple[Tensor, Tensor]:
    return coor_descent_fwd(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay)


@register_fake(_fwd_op)
def _(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay):
    return torch.empty_like(s, memory_format=torch.contiguous_format), fake_stats(s, n_iters)


@kernel_op("colt5::coor_descent_offset_fwd")
def _offset_fwd_op(s: Tensor, mask: Tensor | None, k_rows: Tensor | None, k: float, n_iters: int, eps: float,
                   eps_first: float, eps_decay: float) -> tuple[Tensor, Tensor]:
    """-> (a_T [rows] fp32, stats): the forward without y."""
    _, stats = coor_descent_fwd(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay, write_y=False)
    return offset_of(stats, n_iters, s, mask), stats


@register_fake(_offset_fwd_op)
def _(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay):
    return s.new_empty((s.shape[0],), dtype=torch.float32), fake_stats(s, n_iters)


@kernel_op("colt5::coor_descent_bwd")
def _bwd_op(gy: Tensor | None, s: Tensor, mask: Tensor | None, k_rows: Tensor | None, stats: Tensor,
            ga: Tensor | None, n_iters: int) -> tuple[Tensor, Tensor]:
    ds, dk = coor_descent_bwd(gy, s, mask, k_rows, stats, n_iters, ga)
    return ds, (dk if dk is not None else s.new_empty((0,), dtype=torch.float32))


@register_fake(_bwd_op)
def _(gy, s, mask, k_rows, stats, ga, n_iters):
    dk = s.new_empty((s.shape[0] if k_rows is not None else 0,), dtype=torch.float32)
    return torch.empty_like(s, memory_format=torch.contiguous_format), dk


def _setup_context(ctx, inputs, output):
    s, mask, k_rows, _k, n_iters, *_ = inputs
    ctx.save_for_backward(s, mask, k_rows, output[1])
    ctx.n_iters = n_iters


def _grads(k_rows, ds, dk) -> tuple:
    return ds, None, (dk if k_rows is not None else None), None, None, None, None, None


def _backward(ctx, gy, _gstats):
    s, mask, k_rows, stats = ctx.saved_tensors
    return _grads(k_rows, *_bwd_op(gy, s, mask, k_rows, stats, None, ctx.n_iters))


def _offset_backward(ctx, ga, _gstats):
    s, mask, k_rows, stats = ctx.saved_tensors
    return _grads(k_rows, *_bwd_op(None, s, mask, k_rows, stats, ga, ctx.n_iters))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_offset_fwd_op.register_autograd(_offset_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def eps_first_of(eps: float, eps_init: float | None) -> float:
    """The first iteration's epsilon (the schedule never goes below eps)."""
    return max(eps_init if eps_init is not None else eps, eps)


def _op_args(s, n_iters, k, eps, eps_init, eps_decay, mask) -> tuple:
    """The fwd op's arguments for [..., n] inputs: rows flattened, per-row k in fp32."""
    n = s.shape[-1]
    s2 = s.reshape(-1, n)
    mask2 = None if mask is None else mask.reshape(-1, n)
    if isinstance(k, Tensor):
        k_rows, k_val = k.reshape(-1).to(device=s.device, dtype=torch.float32), 1.0
    else:
        k_rows, k_val = None, float(k)
    return (s2, mask2, k_rows, k_val, int(n_iters), float(eps), float(eps_first_of(eps, eps_init)), float(eps_decay))


def triton_coor_descent(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """`coor_descent` on the Triton kernels, whatever the device (see `coor_descent`).

    Computes in fp32 for every input dtype (fp64 too) and returns `s.dtype`. On CPU tensors it
    needs Triton's interpreter, i.e. TRITON_INTERPRET=1 set before colt5 was imported.

    Raises:
        TypeError / ValueError naming the argument for invalid arguments; RuntimeError for a
        CPU tensor without the interpreter.
    """
    check_coor_descent_args(s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    return _triton_coor_descent(s, n_iters, checked_k(k), eps, eps_init, eps_decay, mask)


def _triton_coor_descent(s, n_iters, k, eps, eps_init, eps_decay, mask) -> Tensor:
    require_triton(s, "triton_coor_descent")
    if s.numel() == 0:
        return coor_descent_reference(s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    y, _ = _fwd_op(*_op_args(s, n_iters, k, eps, eps_init, eps_decay, mask))
    return y.view(s.shape)


def _triton_coor_descent_offset(s, n_iters, k, eps, eps_init, eps_decay, mask) -> tuple[Tensor, float]:
    require_triton(s, "coor_descent_offset(backend='triton')")
    e_T = eps_schedule(n_iters, eps, eps_init, eps_decay)[-1]
    if s.numel() == 0:
        a, _ = coor_descent_offset_reference(s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
        return a.float(), e_T
    a, _ = _offset_fwd_op(*_op_args(s, n_iters, k, eps, eps_init, eps_decay, mask))
    return a.view(*s.shape[:-1], 1), e_T


def _dispatch(triton_impl, reference_impl, s, n_iters, k, eps, eps_init, eps_decay, mask, backend):
    """Validate once, then the Triton kernels (CUDA by default, or backend="triton") or the
    PyTorch reference (backend="reference", or a non-CUDA tensor by default)."""
    check_coor_descent_args(s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    check_backend(backend)
    k = checked_k(k)  # under torch.compile: a per-row k's values are checked when the graph runs
    if backend == "triton" or (backend is None and s.device.type == "cuda"):
        return triton_impl(s, n_iters, k, eps, eps_init, eps_decay, mask)
    return reference_impl(s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)


def coor_descent(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    backend: Literal["triton", "reference"] | None = None,
) -> Tensor:
    """Soft top-k over the last dimension of `s` by coordinate descent with epsilon scaling.

    Returns weights `y` of the shape and dtype of `s`, each in [0, 1], the solution of
    max_y s.y + eps H(y) s.t. sum(y) = k, 0 <= y <= 1 as far as `n_iters` iterations of the
    schedule get: a fast epsilon schedule stops short of the optimum, so the weights may sum to
    noticeably less than k. With the routers' default (20 iterations, eps 4 -> 0.03 by x0.7)
    they sum to about 0.77 k on N(0, 1) scores (0.76-0.79 for n = 256..16384), 0.68-0.75 k on
    wider or clustered scores, 0.90 k on narrow ones (N(0, 0.09)), 0.73-0.93 k on a trained
    LM's router scores; 200 iterations reach 0.95-1.0 k. `colt5.routers.Router.routing_stats` reports it for a router's inputs.

    Args:
        s: scores [..., n], fp32/fp16/bf16 (computed in fp32; fp64 is computed in fp64 by the
            reference, in fp32 by the Triton kernels).
        n_iters: iterations, >= 1.
        k: target sum, a finite number > 0 or a tensor of shape s.shape[:-1] (per-row k; it
            gets a gradient when it requires one). A tensor's values must be finite and > 0 too:
            checked on the host eagerly (a sync on CUDA; pass a number to avoid it) and by an op
            of the compiled graph under torch.compile (no graph break).
        eps: final epsilon (finite, > 0); eps_init: first epsilon (default eps); eps_decay in
            (0, 1]: per-iteration factor, epsilon never going below eps.
        mask: bool [..., n], True = take part. Masked positions get 0 and no gradient; a fully
            masked row gives zeros.
        backend: "triton" or "reference"; default Triton for CUDA tensors, else the reference.

    Non-finite scores: +inf takes weight 1; -inf and NaN are treated as masked (weight 0, zero
    gradient). Nothing is NaN unless an input is.

    Raises:
        TypeError / ValueError naming the argument for invalid arguments; RuntimeError for
        backend="triton" on a CPU tensor without TRITON_INTERPRET=1.
    """
    return _dispatch(_triton_coor_descent, coor_descent_reference, s, n_iters, k, eps, eps_init, eps_decay, mask, backend)


def coor_descent_offset(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    backend: Literal["triton", "reference"] | None = None,
) -> tuple[Tensor, float]:
    """The dual offset of `coor_descent`: (a_T, e_T) with, at every valid position,

        coor_descent(s, ...) == exp(min(s + a_T, 0) / e_T)

    so a caller can apply a row's threshold to other scores (the causal router does). Arguments,
    validation and the non-finite-score rules are those of `coor_descent`; y is not computed.

    Returns:
        a_T: [..., 1], fp32 (fp64 for fp64 scores on the reference), differentiable with respect
            to s (and to a per-row k tensor). A row with no valid position gets a_T = 0 and no
            gradient through it.
        e_T: the final epsilon, a Python float (`checks.eps_schedule(...)[-1]`).

    Raises:
        TypeError / ValueError naming the argument for invalid arguments; RuntimeError for
        backend="triton" on a CPU tensor without TRITON_INTERPRET=1.
    """
    return _dispatch(_triton_coor_descent_offset, coor_descent_offset_reference, s, n_iters, k, eps, eps_init, eps_decay, mask, backend)
