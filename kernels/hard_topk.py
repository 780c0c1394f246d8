"""Differentiable top-k: hard indices, gradients through the coordinate-descent soft scores."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from .checks import _is_real, check_mask, check_schedule, check_scores
from .soft_topk import coor_descent


class TopkReturn(NamedTuple):
    values: Tensor  # [..., k] the top values, times the straight-through gates
    indices: Tensor  # [..., k] equal to torch.topk's
    coor_descent_values: Tensor | None  # [..., k] soft scores at the indices
    gates: Tensor | None  # [..., k] 1 in the forward, the soft score's gradient in the backward


def topk(
    x: Tensor,
    k: int,
    *,
    coor_descent_k_ratio: float = 9 / 8,
    n_iters: int = 20,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    fused: bool | None = None,
    non_differentiable: bool = False,
) -> TopkReturn:
    """Top-k of `x` over its last dimension whose values carry a gradient through soft top-k.

    Soft top-k runs with k' = min(n, k * coor_descent_k_ratio) (a little slack gives a better
    training signal, CoLT5 section 3.3); the gates `g = y + (1 - y).detach()` are 1 in the forward,
    so values equal `x`'s top-k, and pass the gradient of `y` in the backward.

    Masked positions (mask False) are never picked while unmasked ones remain.
    Raises TypeError / ValueError naming the argument (k, mask, the schedule, the ratio) in
    every mode, non_differentiable included.
    `fused`: True forces the Triton kernel, False the reference, None picks by device.
    `non_differentiable`: plain `torch.topk`, with `coor_descent_values` and `gates` None.
    """
    check_scores(x, "x")
    check_mask(mask, x)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    n = x.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, x.shape[-1]={n}], got {k}")
    if not _is_real(coor_descent_k_ratio):
        raise TypeError(f"coor_descent_k_ratio must be a number, got {type(coor_descent_k_ratio).__name__}")
    if not 1 <= coor_descent_k_ratio < math.inf:
        raise ValueError(f"coor_descent_k_ratio must be a finite number >= 1, got {coor_descent_k_ratio}")
    ranked = x if mask is None else x.masked_fill(~mask, torch.finfo(x.dtype).min)
    if non_differentiable:
        check_schedule(n_iters, eps, eps_init, eps_decay)  # unused here but refused all the same
        values, indices = ranked.topk(k, dim=-1)
        return TopkReturn(values, indices, None, None)

    backend = None if fused is None else ("triton" if fused else "reference")
    soft = coor_descent(
        x,
        n_iters=n_iters,
        k=min(float(n), k * coor_descent_k_ratio),
        eps=eps,
        eps_init=eps_init,
        eps_decay=eps_decay,
        mask=mask,
        backend=backend,
    )
    gates = soft + (1.0 - soft).detach()
    _, indices = ranked.topk(k, dim=-1)
    values = x.gather(-1, indices) * gates.gather(-1, indices)
    return TopkReturn(values, indices, soft.gather(-1, indices), gates.gather(-1, indices))
