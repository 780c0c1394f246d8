"""Argument checks at colt5's public boundary: one function per kind of argument.

Each raises TypeError (wrong kind of value) or ValueError (right kind, wrong value) naming the
argument, the value received and what was expected. They read Python values and tensor
metadata (shape, dtype, device) only, so they cost no host synchronisation and torch.compile
turns them into guards; the one value check, `indices_in_range`, says how it avoids a sync.
The kernels validate their own arguments (`colt5.kernels.checks`): nothing in kernels/ imports
from here.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from colt5.kernels.checks import check_int

__all__ = [
    "bool_mask",
    "feature_map",
    "indices_in_range",
    "int_at_least",
    "layer_input",
    "matches_module",
    "positive_int",
    "positive_number",
    "tokens",
]

# dtypes torch.autocast runs a layer in whatever its parameters' dtype among them
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# numbers


def int_at_least(name: str, value: object, lo: int) -> int:
    """value is an int (not a bool) >= lo; returns it."""
    return check_int(name, value, lo)


def positive_int(name: str, value: object) -> int:
    """value is an int >= 1 (a size, a count, a width); returns it."""
    return int_at_least(name, value, 1)


def positive_number(name: str, value: object) -> float:
    """value is a finite real number > 0 (a width multiplier, a scale); returns it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# tensors


def _tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def tokens(x: object, dim: int | None, name: str = "x", *, mask: object = None) -> None:
    """x is a floating tensor [batch, seq, dim] (any width when dim is None); mask None or a
    bool [batch, seq] on x's device (see `bool_mask`)."""
    _tensor(x, name)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [batch, seq, {dim or 'dim'}], got rank {x.dim()} {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension {dim}, got {x.shape[-1]}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    bool_mask(mask, tuple(x.shape[:2]), "mask", of=name, device=x.device)


def feature_map(x: object, dim: int, channel_first: bool, name: str = "x") -> None:
    """x is a floating feature map [batch, height, width, dim] ([batch, dim, height, width] when
    channel_first)."""
    layout = "[batch, dim, height, width]" if channel_first else "[batch, height, width, dim]"
    _tensor(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {layout}, got rank {x.dim()} {tuple(x.shape)}")
    channels = x.shape[1] if channel_first else x.shape[-1]
    if channels != dim:
        raise ValueError(f"{name} must have {dim} channels ({layout}, channel_first={channel_first}), got {channels}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def bool_mask(
    mask: object, shape: tuple[int, ...], name: str = "mask", of: str = "x", device: torch.device | None = None
) -> None:
    """mask is None or a bool tensor of `shape` (the batch and sequence of `of`), on `device`
    when given."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor [batch, seq], got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (batch, seq of {of}), got {tuple(mask.shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"{name} must be on the device of {of} ({device}), got {mask.device}")


def _first_parameter(module: nn.Module) -> Tensor | None:
    """module.parameters()'s first, without its generators (6.1 -> 1.4 us a call, on the host
    path of every layer's forward)."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        if child is not None and (p := _first_parameter(child)) is not None:
            return p
    return None


def matches_module(x: Tensor, module: nn.Module, name: str = "x", *, dtype: bool = True) -> None:
    """x can go into `module` as it is: on the device of its parameters and, for a floating x
    (dtype=True), of their dtype, or of any of fp32/fp16/bf16 under torch.autocast on x's device
    (autocast then runs every matmul in its dtype, as users of mixed precision expect).

    Without this a float64 or bf16 input to an fp32 layer, or a CPU input to a CUDA layer, fails
    deep inside torch ("mixed dtype", "mat1 and mat2 must have the same dtype").
    """
    p = _first_parameter(module)
    if p is None:
        return
    layer = type(module).__name__
    if x.device != p.device:
        raise ValueError(
            f"{name} is on {x.device} but the parameters of {layer} are on {p.device}: "
            f"move one to the other ({name}.to({str(p.device)!r}) or module.to({str(x.device)!r}))"
        )
    if not dtype or not x.is_floating_point() or x.dtype == p.dtype:
        return
    if x.dtype in _AUTOCAST_DTYPES and p.dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(
        f"{name} has dtype {x.dtype} but the parameters of {layer} are {p.dtype}: cast {name} "
        f"({name}.to({p.dtype})), convert the layer (module.to({x.dtype})), or run it under "
        f"torch.autocast (fp32/fp16/bf16 inputs)"
    )


def layer_input(x: object, module: nn.Module, *, mask: object = None, name: str = "x") -> None:
    """A sequence layer's input: x [batch, seq, module.dim] floating, on the module's device and
    of its dtype (see `matches_module`); mask None or bool [batch, seq] on x's device."""
    tokens(x, module.dim, name, mask=mask)
    matches_module(x, module, name)


def indices_in_range(indices: Tensor, size: int, name: str = "indices") -> None:
    """Every element of an integer tensor lies in [0, size).

    Free to check on CPU tensors in eager mode: ValueError there. On CUDA tensors, and under
    torch.compile, a device-side assertion instead (`torch._assert_async`: no host sync, CUDA
    graphs capture it), which fails with a RuntimeError carrying the same message (on CUDA as a
    device-side assert, which ends the process's CUDA context: it is a bug in the caller).
    """
    if indices.numel() == 0:
        return
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"{name} must lie in [0, {size}) (positions of a sample), got min {lo}, max {hi}")
        return
    ok = ((indices >= 0) & (indices < size)).all()
    # no size in the message under dynamic shapes: formatting a symbolic size would specialise it
    bound = size if isinstance(size, int) else "n"
    torch._assert_async(ok, f"{name} must lie in [0, {bound}) (positions of a sample)")
