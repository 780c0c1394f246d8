"""Where Triton kernels run: the interpreter switch and the device a launch needs.

Triton decides when a `@triton.jit` function is defined whether it runs compiled or under its
interpreter (`TRITON_INTERPRET=1`, which runs the kernels on CPU tensors: how CI checks them).
Triton launches on the current CUDA device, so an entry point given tensors on another device
switches to it first.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def can_run_triton(t: Tensor) -> bool:
    """The Triton kernels can run on t: a CUDA tensor, or any tensor under the interpreter."""
    return t.is_cuda or INTERPRET


def require_triton(t: Tensor, name: str) -> None:
    """RuntimeError naming the entry point when the Triton kernels cannot run on t."""
    if not can_run_triton(t):
        raise RuntimeError(
            f"{name} needs a CUDA tensor, or TRITON_INTERPRET=1 set in the environment before colt5 is "
            f"imported to run the Triton kernels on {t.device.type}; got a tensor on {t.device}"
        )


def off_current_device(t: Tensor) -> bool:
    """t is a CUDA tensor on a device other than the current one (callers then switch with
    `torch.cuda.device(t.device)`). False while torch.compile traces: compiled code runs under
    inductor's device guard."""
    return t.is_cuda and not torch.compiler.is_compiling() and t.get_device() != torch.cuda.current_device()


def kernel_op(name: str):
    """Decorator: a torch.library op whose body launches Triton kernels through `launch`.

    Compiled Triton (a GPU): `torch.library.triton_op`, which torch.compile traces into, so the
    compiled graph launches the kernels itself (no Python per call) and fuses the torch ops
    around them. Under the interpreter: `torch.library.custom_op` (the interpreter's kernels
    cannot be traced); its fake implementation comes from `register_fake`. Either way eager mode
    dispatches the same op. The schema comes from the function's annotations.
    """

    def decorate(fn):
        if INTERPRET:
            return torch.library.custom_op(name, mutates_args=())(fn)
        return torch.library.triton_op(name, mutates_args=())(fn)

    return decorate


def register_fake(op):
    """`@register_fake(op)`: the op's fake implementation under the interpreter (a triton_op
    derives its own by tracing its body)."""

    def decorate(fn):
        if INTERPRET:
            op.register_fake(fn)
        return fn

    return decorate


def launch(kernel):
    """A Triton kernel to launch inside a `kernel_op`: wrapped so that torch.compile sees it."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)
