"""A router's selection as one op: soft top-k, pick, and the weights at the picks.

Shapes: s [rows, n] fp32 scores (a [b, r, n] tensor flattened), mask [rows / mask_div, n] bool
(routes of one sequence share its mask row), k picks per row -> indices [rows, k] int64,
weights [rows, k] fp32, real [rows, k] bool.

Forward: the soft top-k's iteration without writing y (one launch), then the radix select
ranks the raw scores (NaN and masked positions last, ties to the lower position) and writes
the picks, the soft weight exp(min(s + a_T, 0) / e_T) at each (exactly 1 with straight-through,
which passes the soft weight's gradient in the backward) and whether each is a real token (one
launch). Backward: the pick weights' gradient scattered into a [rows, n] row, then the soft
top-k's one-pass backward. One autograd node, registered with torch.library, so eager mode
and torch.compile run the same op and CUDA graphs capture it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .reference import coor_descent_reference
from .runtime import kernel_op, off_current_device, register_fake, require_triton
from .select import route_picks_triton, top_k_indices_reference
from .soft_topk import coor_descent_bwd, coor_descent_fwd, eps_first_of, fake_stats, offset_of

# Longest row the radix select takes: past it torch.topk is faster (H100, k = n/16: ours
# 22.8 / 37.1 / 103.1 us at n = 8192 / 16384 / 32768, topk unsorted 46.5 / 87.5 / 53.1).
SELECT_MAX_N = 16384


class RoutePicks(NamedTuple):
    indices: Tensor  # [..., k] int64 positions picked, in no particular order
    weights: Tensor  # [..., k] fp32 soft top-k weight at each pick (1 forward with straight-through)
    real: Tensor | None  # [..., k] bool: the pick is a real (unmasked) token; None without a mask


def _picks(s: Tensor, mask: Tensor | None, mask_div: int, k: int, stats: Tensor, n_iters: int,
           straight_through: bool) -> tuple[Tensor, Tensor, Tensor]:
    n = s.shape[-1]
    if n <= SELECT_MAX_N:
        return route_picks_triton(s, mask, k, stats, mask_div=mask_div, straight_through=straight_through)
    full_mask = None if mask is None else mask.repeat_interleave(mask_div, dim=0)
    rank = s.masked_fill(s.isnan(), float("-inf"))
    if full_mask is not None:
        rank = rank.masked_fill(~full_mask, float("-inf"))
    indices = rank.topk(k, dim=-1, sorted=False).indices
    real = torch.ones_like(indices, dtype=torch.bool) if full_mask is None else full_mask.gather(-1, indices)
    if straight_through:
        return indices, torch.ones_like(indices, dtype=torch.float32), real
    a = offset_of(stats, n_iters, s, mask, mask_div).unsqueeze(-1)
    picked = s.gather(-1, indices).float()
    weights = torch.exp((picked + a).clamp_max(0.0) / stats[:, 2, n_iters:])
    return indices, torch.where(real & ~picked.isnan(), weights, 0.0), real


@kernel_op("colt5::route_top_k")
def _route_op(s: Tensor, mask: Tensor | None, mask_div: int, k: int, k_soft: float, n_iters: int, eps: float,
              eps_first: float, eps_decay: float, straight_through: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (indices, weights, real, stats); stats only for the backward."""
    if off_current_device(s):
        with torch.cuda.device(s.device):
            return _route_op(s, mask, mask_div, k, k_soft, n_iters, eps, eps_first, eps_decay, straight_through)
    s = s.contiguous()
    _, stats = coor_descent_fwd(s, mask, None, k_soft, n_iters, eps, eps_first, eps_decay, write_y=False, mask_div=mask_div)
    return (*_picks(s, mask, mask_div, k, stats, n_iters, straight_through), stats)


@register_fake(_route_op)
def _(s, mask, mask_div, k, k_soft, n_iters, eps, eps_first, eps_decay, straight_through):
    rows = s.shape[0]
    return (s.new_empty((rows, k), dtype=torch.int64), s.new_empty((rows, k), dtype=torch.float32),
            s.new_empty((rows, k), dtype=torch.bool), fake_stats(s, n_iters))


@kernel_op("colt5::route_top_k_bwd")
def _route_bwd_op(gw: Tensor, s: Tensor, mask: Tensor | None, mask_div: int, indices: Tensor, stats: Tensor,
                  n_iters: int) -> Tensor:
    if off_current_device(s):
        with torch.cuda.device(s.device):
            return _route_bwd_op(gw, s, mask, mask_div, indices, stats, n_iters)
    # picks are unique within a row: a scatter, not an add
    gy = torch.zeros_like(s, dtype=torch.float32).scatter_(1, indices, gw.float())
    ds, _ = coor_descent_bwd(gy, s, mask, None, stats, n_iters, mask_div=mask_div)
    return ds


@register_fake(_route_bwd_op)
def _(gw, s, mask, mask_div, indices, stats, n_iters):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    s, mask, mask_div, _k, _k_soft, n_iters, *_ = inputs
    indices, _, _, stats = output
    ctx.save_for_backward(s, mask, indices, stats)
    ctx.mask_div, ctx.n_iters = mask_div, n_iters


def _backward(ctx, _gi, gw, _greal, _gstats):
    s, mask, indices, stats = ctx.saved_tensors
    if gw is None:
        return (None,) * 10
    ds = _route_bwd_op(gw, s, mask, ctx.mask_div, indices, stats, ctx.n_iters)
    return (ds, *(None,) * 9)


_route_op.register_autograd(_backward, setup_context=_setup_context)


def route_top_k_reference(
    s: Tensor, *, num_tokens: int, k_soft: float, n_iters: int, eps: float, eps_init: float | None,
    eps_decay: float, mask: Tensor | None = None, straight_through: bool = True,
) -> RoutePicks:
    """The specification in plain PyTorch, for s [..., n] and mask of s's shape (or None)."""
    y = coor_descent_reference(s, n_iters=n_iters, k=k_soft, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    indices = top_k_indices_reference(s, mask, num_tokens)
    weights = y.gather(-1, indices).to(torch.promote_types(s.dtype, torch.float32))
    if straight_through:
        weights = weights + (1.0 - weights).detach()
    return RoutePicks(indices, weights, None if mask is None else mask.gather(-1, indices))


def route_top_k(
    s: Tensor,
    *,
    num_tokens: int,
    k_soft: float,
    n_iters: int,
    eps: float,
    eps_init: float | None,
    eps_decay: float,
    mask: Tensor | None = None,
    straight_through: bool = True,
    backend: str | None = None,
) -> RoutePicks:
    """Pick `num_tokens` positions of each row of s [b, r, n] (or [rows, n]) for the heavy branch.

    The picks are the rows' largest scores (NaN and masked positions last, ties to the lower
    position; rows longer than `SELECT_MAX_N` break ties as torch.topk does); their weights are
    the soft top-k of the row (`colt5.coor_descent` with target `k_soft` and the schedule
    n_iters / eps / eps_init / eps_decay) at the picks, and carry its gradient to s.
    straight_through: the weights are 1 in the forward. mask: bool of s's shape, or [b, n]
    shared by the r rows of a sequence; True = may be picked.

    backend None: the fused op (Triton) for CUDA tensors, the reference otherwise; "triton"
    (CPU under TRITON_INTERPRET=1) or "reference" forces one. Arguments are the router's,
    checked when it was built; shapes are checked here.
    """
    n = s.shape[-1]
    if not 1 <= num_tokens <= n:
        raise ValueError(f"num_tokens must be in [1, n={n}], got {num_tokens}")
    if mask is not None and mask.shape != s.shape:
        if s.dim() != 3 or mask.shape != (s.shape[0], n):
            raise ValueError(f"mask must have the shape of the scores {tuple(s.shape)} or [batch, n], got {tuple(mask.shape)}")
    use_triton = backend == "triton" or (backend is None and s.is_cuda)
    if not use_triton:
        if mask is not None and mask.shape != s.shape:
            mask = mask.unsqueeze(1).expand(s.shape)
        return route_top_k_reference(s, num_tokens=num_tokens, k_soft=k_soft, n_iters=n_iters, eps=eps,
                                     eps_init=eps_init, eps_decay=eps_decay, mask=mask, straight_through=straight_through)
    require_triton(s, "route_top_k(backend='triton')")
    lead = s.shape[:-1]
    mask_div = 1 if mask is None or mask.shape == s.shape else s.shape[1]
    rows = s.reshape(-1, n)
    mask_rows = None if mask is None else mask.reshape(-1, n)
    if rows.shape[0] == 0:
        empty = s.new_empty((*lead, num_tokens))
        return RoutePicks(empty.long(), empty.float(), None if mask is None else empty.bool())
    indices, weights, real, _ = _route_op(rows.float(), mask_rows, mask_div, int(num_tokens), float(k_soft), int(n_iters),
                                          float(eps), float(eps_first_of(eps, eps_init)), float(eps_decay), bool(straight_through))
    shape = (*lead, num_tokens)
    return RoutePicks(indices.view(shape), weights.view(shape), None if mask is None else real.view(shape))


__all__ = ["RoutePicks", "route_top_k", "route_top_k_reference", "SELECT_MAX_N"]
