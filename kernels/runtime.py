"""Where Triton kernels run: the interpreter switch and the device a launch needs.

Triton decides when a `@triton.jit` function is defined whether it runs compiled or under its
interpreter (`TRITON_INTERPRET=1`, which runs the kernels on CPU tensors: how CI checks them).
Triton launches on the current CUDA device, so an entry point given tensors on another device
switches to it first. Kernel outputs and workspaces are allocated with `empty`.
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


# What every launcher allocates its outputs and workspaces with (as `runtime.empty(shape, dtype=,
# device=)`): the kernels write each element before anything reads it, and tests replace this one
# name with a poisoned fill to catch an element they leave unwritten. torch.empty itself: no cost.
empty = torch.empty


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


class KernelOp:
    """An op backed by Triton kernels, one implementation for every mode.

    `kernel_op("colt5::name")(impl)` registers impl as a torch.library custom op: what
    torch.compile keeps whole (no graph break) and CUDA graphs capture. Eager calls run the same
    impl behind a plain autograd.Function with the op's autograd formula, or bare when nothing
    needs a gradient: torch's custom-op dispatch costs ~250 us of host time per call on the
    H200 hosts we measured (`benchmarks/host_overhead.py`), a Function ~35 us. The schema comes
    from impl's annotations.
    """

    def __init__(self, name: str, impl) -> None:
        self.impl = impl
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self.function = None

    def register_fake(self, fn):
        self.op.register_fake(fn)
        return fn

    def register_autograd(self, backward, *, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                output = impl(*inputs)
                setup_context(ctx, inputs, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        Function.__name__ = Function.__qualname__ = f"{impl.__name__}_function"
        self.function = Function

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        # Traced (dynamo, or AOTAutograd tracing a backward formula: fake and functional
        # tensors are Tensor subclasses): the library op.
        if torch.compiler.is_compiling() or any(type(t) not in _PLAIN_TENSORS for t in tensors):
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.function.apply(*args)
        return self.impl(*args)


def kernel_op(name: str):
    """Decorator: `KernelOp(name, fn)`."""
    return lambda fn: KernelOp(name, fn)


def register_fake(op: KernelOp):
    """`@register_fake(op)`: the op's fake implementation (shapes and dtypes only)."""
    return op.register_fake
