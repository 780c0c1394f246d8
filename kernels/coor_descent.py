"""Coordinate-descent soft top-k: public op and dispatch.

(The Triton kernels, their launchers and the autograd Function land here next; until then
every device uses the PyTorch reference.)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .checks import check_coor_descent_args
from .reference import coor_descent_reference


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

    Returns weights `y` of the shape and dtype of `s`, each in [0, 1], summing to about `k` per
    row: the solution of max_y s.y + eps H(y) s.t. sum(y) = k, 0 <= y <= 1.

    Args:
        s: scores [..., n], fp32/fp16/bf16 (computed in fp32; fp64 is computed in fp64).
        n_iters: iterations, >= 1.
        k: target sum, a number > 0 or a tensor of shape s.shape[:-1] (per-row k; it gets a
            gradient when it requires one).
        eps: final epsilon (> 0); eps_init: first epsilon (default eps); eps_decay in (0, 1]:
            per-iteration factor, epsilon never going below eps.
        mask: bool [..., n], True = take part. Masked positions get 0 and no gradient; a fully
            masked row gives zeros.
        backend: "triton" or "reference"; default Triton for CUDA tensors, else the reference.

    Non-finite scores: +inf takes weight 1; -inf and NaN are treated as masked (weight 0, zero
    gradient). Nothing is NaN unless an input is.

    Raises:
        TypeError / ValueError naming the argument for invalid arguments.
    """
    check_coor_descent_args(
        s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
    )
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be 'triton', 'reference' or None, got {backend!r}")
    return coor_descent_reference(
        s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
    )
