"""Launch a @triton.jit kernel at a fraction of the JIT's host cost.

`kernel[grid](...)` binds and specializes every argument on every call: 41-60 us of CPU on the
H100 hosts we measured, against 8-16 us to launch the compiled kernel itself
(`benchmarks/coor_descent_overhead.py`). For small rows that is most of an eager step.

`Launcher` sends the first call of each specialization through the JIT (which compiles it and
returns the CompiledKernel) and keeps that kernel under a key that is at least as fine as
Triton's own specialization. Later calls with the same key launch the kept kernel directly.
Finer than Triton's key is safe (two keys may share a kernel); coarser would not be, which the
GPU tests check against `JITFunction.warmup`. Two ways to key:
  * `launcher(grid, args, constexprs, num_warps)` builds the key from every argument (tensor
    dtype and 16-byte alignment, integer width class, integers equal to 1 and divisible by 16,
    the constexprs, num_warps);
  * `launcher.keyed(key, grid, args, spec)` takes the caller's key, which must fix all of that
    (shapes, dtypes, flags, alignment), and calls `spec(key)` for the constexprs and num_warps
    only on a miss: the hot path then costs a dict lookup and the launch.
Under the interpreter (CPU) every call goes through the JIT.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

try:  # triton >= 3.4
    from triton import knobs
except ImportError:  # pragma: no cover - older triton: no launch hooks to honour
    knobs = None

# Triton decides at decoration time whether @triton.jit functions are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
# COLT5_JIT_LAUNCH=1 sends every launch through the JIT (to compare, or if a Triton release
# changes the CompiledKernel calling convention).
ENABLED = not INTERPRET and os.environ.get("COLT5_JIT_LAUNCH", "0") != "1"


_data_ptr = torch.Tensor.data_ptr


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


def aligned(*tensors) -> bool:
    """Every tensor's data starts on a 16-byte boundary (what Triton specializes pointers on)."""
    ptr = 0
    for t in tensors:
        ptr |= t.data_ptr()
    return ptr % 16 == 0


def _launch_hooks_set() -> bool:
    """A profiler (e.g. proton) registered launch hooks: take the CompiledKernel's own runner,
    which builds the metadata the hooks read."""
    if knobs is None:
        return False
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(exit_, "calls", exit_))  # a HookChain holds .calls


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
        key = (num_warps, *constexprs.values(), *map(arg_key, args))
        self.keyed(key, grid + (1,) * (3 - len(grid)), args, lambda _key: (constexprs, num_warps))

    def keyed(self, key, grid: tuple[int, int, int], args: tuple, spec: Callable[[object], tuple[dict, int]]):
        """Launch with the caller's specialization key (see the module docstring) on a 3-D grid;
        spec(key) -> (constexprs, num_warps) is called on a miss only."""
        if not ENABLED:
            constexprs, num_warps = spec(key)
            self.fn[grid](*args, **constexprs, num_warps=num_warps)
            return
        device = _current_device()
        kept = self.kernels.get((device, key))
        if kept is None or _launch_hooks_set():
            self._through_jit(device, key, grid, args, *spec(key))
            return
        launch, function, head, metadata, consts, n_ptrs, _kernel = kept
        # What CompiledKernel[grid](...) does, minus its per-call closures and hook metadata; the
        # leading tensors go as raw addresses (the launcher then skips a driver query per pointer).
        launch(grid[0], grid[1], grid[2], _current_stream(device), function, *head, metadata, None, None, None,
               *map(_data_ptr, args[:n_ptrs]), *args[n_ptrs:], *consts)

    def _through_jit(self, device: int, key, grid: tuple, args: tuple, constexprs: dict, num_warps: int):
        if list(constexprs) != self._constexpr_names:
            raise ValueError(f"constexprs must be {self._constexpr_names} in this order, got {list(constexprs)}")
        kernel = self.fn[grid](*args, **constexprs, num_warps=num_warps)  # compiles; loads the binary
        n_ptrs = next((i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)), len(args))
        launch, head = _entry_point(kernel)
        # the CompiledKernel itself stays referenced: it owns the loaded module
        self.kernels[device, key] = (launch, kernel.function, head, kernel.packed_metadata,
                                     tuple(constexprs.values()), n_ptrs, kernel)


def _entry_point(kernel) -> tuple:
    """(launch, head) with launch(gx, gy, gz, stream, function, *head, metadata, ...) doing what
    kernel.run does. Triton's CUDA launcher (3.x) allocates any scratch buffers, then calls its C
    launch with them: kernels without scratch go to the C launch directly (a Python frame and
    two closures less per call). Anything else keeps kernel.run."""
    run = kernel.run
    fields = ("launch", "launch_cooperative_grid", "launch_pdl", "global_scratch_size", "profile_scratch_size")
    if all(hasattr(run, f) for f in fields) and not run.global_scratch_size and not run.profile_scratch_size:
        return run.launch, (run.launch_cooperative_grid, run.launch_pdl, None, None)
    return run, ()


def off_current_device(t: torch.Tensor) -> bool:
    """t is a CUDA tensor on a device other than the current one. Triton, and so Launcher,
    launch on the current device: callers switch first (`with torch.cuda.device(t.device)`).
    False while torch.compile traces: compiled code runs under inductor's device guard."""
    return t.is_cuda and not torch.compiler.is_compiling() and t.get_device() != _current_device()


def _current_device() -> int:
    return torch._C._cuda_getDevice()  # torch.cuda.current_device() minus its Python checks


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)
