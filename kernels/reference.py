"""Plain PyTorch versions of the ops: the specification, and the path for CPU tensors.

Shapes: s, mask, y are [..., n]; a per-row k is [...]; the dual offset a is [..., 1].

`coor_descent_reference` is the iteration of the design note
(`a = e (log k - logsumexp((s + b) / e)); b = -relu(s + a)`), written with the identities
`s + b = min(s, -a)` and `s + a + b = min(s + a, 0)`. That is the same function and the same
gradient (ties `s + a == 0` count as "not clamped", as relu'(0) = 0 does), but it also stays
finite for infinite scores, where `s + b = s - relu(s + a)` would give inf - inf.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import eps_schedule


def valid_positions(s: Tensor, mask: Tensor | None) -> Tensor:
    """Positions that take part: unmasked and neither NaN nor -inf (those get weight 0)."""
    valid = ~torch.isnan(s) & (s != float("-inf"))
    return valid if mask is None else valid & mask


def compute_dtype(s: Tensor) -> torch.dtype:
    """fp16/bf16/fp32 inputs are computed in fp32; fp64 stays fp64 (for reference checks)."""
    return torch.float64 if s.dtype == torch.float64 else torch.float32


def _coor_descent_dual(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float,
    eps_init: float | None,
    eps_decay: float,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, float, Tensor]:
    """The iteration without its output: (x, a_T [..., 1], e_T, valid).

    x is s in the compute dtype with a dummy 0 at positions that do not take part; a_T is 0,
    with zero gradient, in rows with nothing valid.
    """
    dtype = compute_dtype(s)
    valid = valid_positions(s, mask)
    # A row with nothing valid is computed on dummy values, so that nothing is NaN, and its
    # offset is set to 0 at the end (its weights are zeroed by the caller).
    empty_row = ~valid.any(dim=-1, keepdim=True)
    take_part = valid | empty_row
    x = torch.where(valid, s.to(dtype), 0.0)  # dummy 0 in empty rows, never NaN

    if isinstance(k, Tensor):
        log_k = k.to(dtype).log().unsqueeze(-1)
    else:
        log_k = math.log(k)

    schedule = eps_schedule(n_iters, eps, eps_init, eps_decay)
    n_valid = take_part.sum(dim=-1, keepdim=True).to(dtype)
    # Iteration 0: s + b = 0 at every valid position, so logsumexp = log(n_valid).
    a = schedule[0] * (log_k - n_valid.log())
    for e in schedule[1:-1]:
        z = torch.where(x + a > 0, -a, x) / e
        z = z.masked_fill(~take_part, float("-inf"))
        a = e * (log_k - z.logsumexp(dim=-1, keepdim=True))
    a = a.masked_fill(empty_row, 0.0)
    return x, a, schedule[-1], valid


def coor_descent_reference(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft top-k of `s` over its last dimension by coordinate descent; autograd does the backward.

    Arguments are those of `colt5.coor_descent` and are assumed valid (it checks them).
    """
    x, a, e_out, valid = _coor_descent_dual(
        s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
    )
    y = torch.exp(torch.where(x + a > 0, 0.0, x + a) / e_out)
    y = y.masked_fill(~valid, 0.0)
    return y.to(s.dtype)


def coor_descent_offset_reference(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, float]:
    """The dual offset of `coor_descent_reference`: (a_T [..., 1] in the compute dtype, e_T).

    exp(min(s + a_T, 0) / e_T) is `coor_descent_reference(s, ...)` at the valid positions; a_T is
    0 (zero gradient) in rows with no valid position. Arguments as `colt5.coor_descent`, assumed
    valid.
    """
    _, a, e_out, _ = _coor_descent_dual(
        s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
    )
    return a, e_out
