"""Cached incremental decoding: where a decode stands, the buffers it keeps, its CUDA graphs.

Shapes: b batch, L capacity (the longest context a cache holds), V vocabulary.

A decode has two phases. The prefill is the training forward over the whole prompt (the same
ops, the same numbers) that also leaves in a cache what each layer needs later: the light
attention's last windows of keys/values, the routed key-value slots so far, each causal router's
per-window state (colt5/causal_routing.py), the dense model's keys/values. A step then takes one
token and costs O(cache): nothing of the prefix is recomputed. Routing decisions for token i
depend on tokens <= i only, so a step reproduces the full forward's output at its position
exactly (tests/test_generate.py checks logits to 1e-9 in float64).

Every buffer has a static shape fixed at the prefill (L tokens of room), a step updates them in
place and indexes them with the position as a device tensor (`DecodePosition.tensor`), so the
step is capturable by CUDA graphs. The host keeps the length too, for what it knows without
looking at data: whether a routing window has just completed (its dual is computed then) and
whether the step is in the first routing window. `step_key` names that choice; one graph per key
(`CUDAGraphStep`).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["DecodePosition", "CUDAGraphStep", "reuse", "step_key", "without_grad_when_decoding"]


def without_grad_when_decoding(forward: Callable) -> Callable:
    """For a forward that takes `cache=`: with a cache it runs under torch.no_grad(). Decoding
    writes the cache in place, so tracking gradients would chain each step's graph onto the
    previous one's and keep them all alive."""

    @functools.wraps(forward)
    def wrapped(self, *args, cache=None, **kwargs):
        if cache is None:
            return forward(self, *args, **kwargs)
        with torch.no_grad():
            return forward(self, *args, cache=cache, **kwargs)

    return wrapped


class DecodePosition:
    """How many tokens a cache holds: `length` on the host, the same in `tensor` (0-d int64 on
    the device) for the steps' indexing; `capacity` the most it may hold, `batch` the batch size
    fixed by the prefill (None before). Shared by every layer cache of one model; the module that
    made it (`owner`) advances it after a forward."""

    def __init__(self, capacity: int, device: torch.device | str) -> None:
        self.capacity = int(capacity)
        self.length = 0
        self.batch: int | None = None
        self.tensor = torch.zeros((), dtype=torch.long, device=device)

    def check(self, x: Tensor, name: str = "x") -> None:
        """x [b, n, ...] may go into a forward with this cache: a prefill (length 0) of n >= 1
        tokens, or a step of one token, of the prefill's batch, within the capacity."""
        b, n = x.shape[0], x.shape[1]
        if self.length == 0:
            if n < 1:
                raise ValueError(f"{name}: a prefill needs at least one position, got shape {tuple(x.shape)}")
        else:
            if n != 1:
                raise ValueError(f"{name}: after the prefill a cache takes one position per forward, got shape {tuple(x.shape)}")
            if b != self.batch:
                raise ValueError(f"{name}: the cache holds a batch of {self.batch}, got shape {tuple(x.shape)}")
        if self.length + n > self.capacity:
            raise ValueError(
                f"{name}: the cache holds {self.length} of at most {self.capacity} positions, "
                f"{n} more {'does' if n == 1 else 'do'} not fit (start a new cache, see CoLT5LanguageModel.generate)"
            )

    def advance(self, x: Tensor) -> None:
        n = x.shape[1]
        if self.length == 0:
            self.batch = x.shape[0]
            self.tensor.fill_(n)
        else:
            self.tensor.add_(n)
        self.length += n

    def reset(self) -> None:
        """Empty again (the buffers stay, for the next prefill to overwrite: graphs captured on
        them stay valid)."""
        self.length = 0
        self.batch = None
        self.tensor.zero_()


def reuse(old: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fill) -> Tensor:
    """A buffer of `shape` filled with `fill`: `old` itself (filled in place) when it has that
    shape, dtype and device, so that a prefill into a used cache keeps its buffers' addresses."""
    if old is not None and tuple(old.shape) == tuple(shape) and old.dtype == dtype and old.device == torch.device(device):
        return old.fill_(fill)
    return torch.full(shape, fill, dtype=dtype, device=device)


def step_key(length: int, windows: Iterable[int]) -> tuple[tuple[bool, bool], ...]:
    """What a step at position `length` decides on the host, per routing window size W: (in the
    first window, a window has just completed). Steps with equal keys run the same ops."""
    return tuple((length < w, length % w == 0) for w in sorted(set(windows)))


class LayersCache:
    """A stack's decode state: one cache per layer, the position they share, and the routing
    window sizes whose boundaries change a step's ops (none for a dense stack)."""

    def __init__(self, position: DecodePosition, layers: list, windows: tuple[int, ...] = ()) -> None:
        self.position = position
        self.layers = layers
        self.windows = windows

    @property
    def length(self) -> int:
        return self.position.length

    def step_key(self) -> tuple:
        """What the next step decides on the host (`step_key`)."""
        return step_key(self.position.length, self.windows)

    def reset(self) -> None:
        self.position.reset()


class CUDAGraphStep:
    """A decode step replayed from CUDA graphs, one per `step_key`, captured the first time a
    key comes up.

    step(tokens [b, 1] long) -> logits [b, V] must read and write only the cache's buffers and
    advance `position`. `__call__(tokens, key)` copies tokens into a static input, replays the
    key's graph and returns the static output (valid until the next call). The first call of a
    key runs the step eagerly (on a side stream, which also warms up its kernels) and then
    captures it at the same host position.
    """

    def __init__(self, step: Callable[[Tensor], Tensor], position: DecodePosition, tokens_like: Tensor) -> None:
        self.step = step
        self.position = position
        self.tokens = torch.zeros_like(tokens_like)
        self.graphs: dict = {}
        self.outputs: dict = {}

    def __call__(self, tokens: Tensor, key) -> Tensor:
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"tokens must be {tuple(self.tokens.shape)} like the first step's, got {tuple(tokens.shape)}")
        self.tokens.copy_(tokens)
        # Streams, capture and replay on the model's GPU, whichever device is current.
        with torch.cuda.device(self.tokens.device):
            if key in self.graphs:
                self.graphs[key].replay()
                self.position.length += 1  # the graph advanced the device position
                return self.outputs[key]
            return self._run_and_capture(key)

    def _run_and_capture(self, key) -> Tensor:
        length = self.position.length
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.step(self.tokens)  # the real step, and the warm-up
        torch.cuda.current_stream().wait_stream(side)
        logits = logits.clone()  # on this stream, which reads it from here on
        # The capture runs the step's Python at the same host position (the same key) and records
        # its kernels without running them: the cache stays as the real step left it. Each graph
        # has its own memory pool, so no replay can write into another graph's output.
        self.position.length = length
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            out = self.step(self.tokens)
        self.graphs[key], self.outputs[key] = graph, out
        return logits
