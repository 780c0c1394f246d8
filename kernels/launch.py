"""Launch a @triton.jit kernel at a fraction of the JIT's host cost.

`kernel[grid](...)` binds and specializes every argument on every call: 41-60 us of CPU on the
H100 hosts we measured, against 8-16 us to launch the compiled kernel itself
(`benchmarks/coor_descent_overhead.py`). For small rows that is most of an eager step.

`Launcher` sends the first call of each specialization through the JIT (which compiles it and
returns the CompiledKernel) and keeps that kernel under a key that is at least as fine as
Triton's own specialization: tensor dtype and 16-byte alignment, integer width class, integers
equal to 1 and divisible by 16, the constexprs, num_warps and the device. Later calls with the
same key launch the kept kernel directly. Finer than Triton's key is safe (two keys may share a
kernel); coarser would not be, which the GPU tests check against `JITFunction.warmup`.
Under the interpreter (CPU) every call goes through the JIT.
"""

from __future__ import annotations

import os

import torch
from triton.runtime import driver

# Triton decides at decoration time whether @triton.jit functions are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
# COLT5_JIT_LAUNCH=1 sends every launch through the JIT (to compare, or if a Triton release
# changes the CompiledKernel calling convention).
ENABLED = not INTERPRET and os.environ.get("COLT5_JIT_LAUNCH", "0") != "1"


def arg_key(arg) -> tuple:
    """What Triton specializes a runtime argument on, or finer."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool):
        return ("b", arg)
    if isinstance(arg, int):
        width = "i32" if -(2**31) <= arg < 2**31 else ("i64" if -(2**63) <= arg < 2**63 else "u64")
        return (width, arg == 1, arg % 16 == 0)
    if isinstance(arg, float):
        return ("f",)
    raise TypeError(f"Launcher: no specialization key for an argument of type {type(arg).__name__}")


class Launcher:
    """`Launcher(jit_fn)(grid, args, constexprs, num_warps)`: args are the runtime arguments in
    signature order, constexprs a dict of the constexpr arguments in signature order."""

    def __init__(self, fn):
        self.fn = fn
        self.kernels: dict = {}
        if not ENABLED:  # the interpreter's functions carry no constexpr table
            return
        names, positions = fn.arg_names, sorted(fn.constexprs)
        # Runtime arguments first, then constexprs: the direct launch passes them positionally.
        if positions != list(range(len(names) - len(positions), len(names))):
            raise ValueError(f"Launcher needs the constexpr arguments of {fn.__name__} last")
        self._constexpr_names = [names[i] for i in positions]

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int):
        if not ENABLED:
            self.fn[grid](*args, **constexprs, num_warps=num_warps)
            return
        device = driver.active.get_current_device()
        key = (device, num_warps, *constexprs.values(), *map(arg_key, args))
        kernel = self.kernels.get(key)
        if kernel is None:
            if list(constexprs) != self._constexpr_names:
                raise ValueError(f"constexprs must be {self._constexpr_names} in this order, got {list(constexprs)}")
            self.kernels[key] = self.fn[grid](*args, **constexprs, num_warps=num_warps)
            return
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        kernel[grid3](*args, *constexprs.values(), stream=driver.active.get_current_stream(device))
