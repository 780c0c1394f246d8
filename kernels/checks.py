"""Argument checks at the kernels' public functions: the generic ones (ints, tensors, the
backend switch) that every op shares, then coordinate descent's.

They run once, at the public boundary, and raise `TypeError`/`ValueError` naming the argument,
the value received and what was expected. They read Python values and tensor metadata only,
except for a per-row `k` tensor, the one argument with values to check (finite and > 0 in every
row): eagerly that reads it back to the host (one sync on CUDA, skipped while a CUDA graph is
being captured: a replay runs no Python anyway); under `torch.compile` the check is a custom op
in the graph (`colt5::checked_k`, `checked_k`) that runs when the compiled code does, so it
costs neither a graph break nor, for a numeric k, anything at all.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _is_int(x) -> bool:
    # plain ints first: the ABC check costs ~0.5 us, on the host path of every eager call
    return type(x) is int or (not isinstance(x, bool) and isinstance(x, numbers.Integral))


def _is_real(x) -> bool:
    return type(x) in (float, int) or (not isinstance(x, bool) and isinstance(x, numbers.Real))


BACKENDS = (None, "triton", "reference")


def check_int(name: str, value: object, lo: int, hi: int | None = None, hi_name: str = "") -> int:
    """value as an int >= lo (and <= hi, named hi_name in the message when given)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi_name or hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_tensor(name: str, t: object, shape: tuple | None = None, what: str = "",
                 device: torch.device | None = None) -> None:
    """t is a Tensor, of `shape` (described as `what`) and on `device` (q's)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {what} = {tuple(shape)}, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def check_floating(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")


def check_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'triton', 'reference' or None, got {backend!r}")


def check_scores(s: Tensor, name: str = "s") -> None:
    if not isinstance(s, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32/fp16/bf16), got dtype {s.dtype}")
    if s.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension [..., n], got a 0-d tensor")


def check_mask(mask: Tensor | None, s: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = take part), got {mask.dtype}")
    if mask.shape != s.shape:
        raise ValueError(f"mask must have the shape of s {tuple(s.shape)}, got {tuple(mask.shape)}")
    if mask.device != s.device:
        raise ValueError(f"mask must be on the device of s ({s.device}), got {mask.device}")


def check_k(k: float | Tensor, s: Tensor) -> None:
    """k: a finite number > 0, or a real tensor of shape s.shape[:-1] (its values are checked
    here in eager mode, by `checked_k` under torch.compile)."""
    if isinstance(k, Tensor):
        if k.shape != s.shape[:-1]:
            raise ValueError(
                f"k as a tensor must have shape s.shape[:-1] = {tuple(s.shape[:-1])}, got {tuple(k.shape)}"
            )
        if k.dtype == torch.bool or k.is_complex():
            raise TypeError(f"k must be a real number or a real tensor, got dtype {k.dtype}")
        if not _is_compiling():
            check_k_values(k)
        return
    if not _is_real(k):
        raise TypeError(f"k must be a positive number or a tensor of shape s.shape[:-1], got {type(k).__name__}")
    if not 0 < k < math.inf:  # comparisons, not math.isfinite: they trace (as guards) under torch.compile
        raise ValueError(f"k must be a finite number > 0, got {k}")


def check_k_values(k: Tensor) -> None:
    """Every row's k is finite and > 0 (NaN, inf and k <= 0 would give a NaN row from the
    reference and a row of ones from the kernels). Reads k on the host: a sync on CUDA, skipped
    while a CUDA graph is being captured."""
    if k.numel() == 0 or (k.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    bad = ~(torch.isfinite(k) & (k > 0))
    if bool(bad.any()):
        flat = bad.reshape(-1)
        row = int(flat.nonzero()[0])
        raise ValueError(
            f"k must be finite and > 0 in every row, got {k.reshape(-1)[row].item()} at row {row} "
            f"({int(flat.sum())} of {flat.numel()} rows NaN, inf or <= 0)"
        )


@torch.library.custom_op("colt5::checked_k", mutates_args=())
def _checked_k_op(k: Tensor) -> Tensor:
    check_k_values(k)
    return k.clone()


@_checked_k_op.register_fake
def _(k):
    return torch.empty_like(k)


_checked_k_op.register_autograd(lambda ctx, grad: grad, setup_context=lambda ctx, inputs, output: None)


def checked_k(k: float | Tensor) -> float | Tensor:
    """k for the computation: itself in eager mode (`check_k` read it); under torch.compile a
    tensor k goes through `colt5::checked_k`, an op of the compiled graph that checks its values
    when the graph runs and returns a copy (an op whose output is used is never dropped)."""
    if isinstance(k, Tensor) and _is_compiling():
        return _checked_k_op(k)
    return k


def check_schedule(n_iters: int, eps: float, eps_init: float | None, eps_decay: float) -> None:
    check_int("n_iters", n_iters, 1)
    for name, value in (("eps", eps), ("eps_init", eps_init), ("eps_decay", eps_decay)):
        if value is None and name == "eps_init":
            continue
        if not _is_real(value):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    # an infinite epsilon makes every iteration inf / inf: all-NaN weights
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if eps_init is not None and not 0 < eps_init < math.inf:
        raise ValueError(f"eps_init must be a finite number > 0 or None, got {eps_init}")
    if not 0 < eps_decay <= 1:
        raise ValueError(f"eps_decay must be in (0, 1], got {eps_decay}")


def check_coor_descent_args(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float,
    eps_init: float | None,
    eps_decay: float,
    mask: Tensor | None,
) -> None:
    """Validate the arguments of `coor_descent` and its backends (see its docstring)."""
    check_scores(s)
    check_schedule(n_iters, eps, eps_init, eps_decay)
    check_k(k, s)
    check_mask(mask, s)


def eps_schedule(n_iters: int, eps: float, eps_init: float | None, eps_decay: float) -> list[float]:
    """The epsilon of each iteration, then the one the output uses: n_iters + 1 values."""
    e = max(eps_init if eps_init is not None else eps, eps)
    schedule = []
    for _ in range(n_iters):
        schedule.append(e)
        e = max(e * eps_decay, eps)
    schedule.append(e)
    return schedule
