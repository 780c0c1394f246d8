"""Timing helpers shared by the benchmark scripts (GPU only)."""

from __future__ import annotations

from typing import Callable

import torch
from triton.testing import do_bench


def us(fn: Callable, **kw) -> float:
    """Median microseconds of fn by CUDA events (triton's do_bench, L2 flushed between calls)."""
    return 1e3 * do_bench(fn, warmup=25, rep=200, return_mode="median", **kw)


def graph_us(step: Callable, leaves: tuple = ()) -> float:
    """Median microseconds of replaying `step` captured in a CUDA graph: the GPU's time with
    the host's launch cost gone. `leaves` get .grad = None before each warm-up and the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up outside capture (compiles, allocator pools)
            for leaf in leaves:
                leaf.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for leaf in leaves:
        leaf.grad = None
    with torch.cuda.graph(graph):
        step()
    return us(graph.replay)


class ExpFunction(torch.autograd.Function):
    """exp with a Python backward: the host cost any Python-backward op (ours included) pays."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        return gy * y
