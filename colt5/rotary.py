"""Rotary position embeddings (Su et al. 2021) at explicit positions.

Shapes: b batch, h heads, n tokens, d head dim (the last dim of x), r rotated dims (dim_head of
the embedding, r <= d, even).

Routed attention gathers a subset of tokens and must rotate them by their ORIGINAL positions, so
the embedding takes a positions tensor rather than a length:

    rotary = RotaryEmbedding(64)
    freqs = rotary(idx)              # idx [b, k] long -> freqs [b, k, 32], float32
    q = apply_rotary(q, freqs)       # q [b, h, k, 64]; the heads dim is broadcast
    q = rotary.rotate(q_, idx)       # or in one kernel pass: q_ [b, k, h, 64], heads after positions

Rotation pairs feature i with feature i + r/2 ("rotate half", GPT-NeoX layout). Features past r
pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from colt5.kernels.rotary import rotate, rotate_half_reference

__all__ = ["RotaryEmbedding", "apply_rotary"]


class RotaryEmbedding(nn.Module):
    """Angles `positions * theta^(-2i/dim_head)` for i < dim_head / 2.

    forward(positions) takes positions of any shape [..., n] (integer or floating) and returns
    freqs [..., n, dim_head // 2] in float32 (angles in radians) for `apply_rotary`.
    """

    inv_freq: Tensor

    def __init__(self, dim_head: int, *, theta: float = 10000.0) -> None:
        super().__init__()
        if isinstance(dim_head, bool) or not isinstance(dim_head, int) or dim_head < 2 or dim_head % 2:
            raise ValueError(f"dim_head must be an even int >= 2, got {dim_head!r}")
        if not theta > 0:
            raise ValueError(f"theta must be > 0, got {theta!r}")
        self.dim_head = dim_head
        self.theta = float(theta)
        inv_freq = theta ** (-torch.arange(0, dim_head, 2, dtype=torch.float64) / dim_head)
        # Not persistent: derived from the config, so checkpoints stay free of it.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        if not isinstance(positions, Tensor):
            raise TypeError(f"positions must be a Tensor, got {type(positions).__name__}")
        if positions.dtype == torch.bool or positions.is_complex():
            raise TypeError(f"positions must be an integer or floating tensor, got {positions.dtype}")
        if positions.dim() < 1:
            raise ValueError("positions must have at least 1 dim [..., n], got a scalar")
        # float32 angles: positions up to 2^24 are exact, enough for 128k contexts.
        return positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)

    def rotate(self, x: Tensor, positions: Tensor | None = None, *, rotated: int | None = None) -> Tensor:
        """x [..., n, s, d] with the first `rotated` (default all) of each row's s heads turned at
        positions [..., n] (default 0 .. n-1), the rest copied: a projection's packed q, k, v heads
        [b, n, 3 * h, d] with rotated = 2 * h, say. One pass on CUDA (`colt5.kernels.rotary`)."""
        return rotate(x, self.inv_freq, positions, rotated=rotated)

    def extra_repr(self) -> str:
        return f"dim_head={self.dim_head}, theta={self.theta:g}"


def apply_rotary(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate the first 2 * freqs.shape[-1] features of x by the angles in freqs.

    x: [..., n, d] (e.g. [b, h, n, d] or [b, n, d]); freqs: [n, r/2] (shared by the batch) or
    [b, n, r/2] (per-batch positions, e.g. gathered tokens). With x of rank 4 and freqs of rank 3
    the heads dim is inserted into freqs; otherwise freqs must broadcast against x[..., :r/2].
    Computed in float32 (float64 for float64 x), returned in x's dtype. Raises ValueError on
    mismatched shapes. `RotaryEmbedding.rotate` does the same in one kernel pass on CUDA.
    """
    if not isinstance(x, Tensor) or not isinstance(freqs, Tensor):
        raise TypeError("x and freqs must be Tensors")
    if x.dim() < 2 or freqs.dim() < 2:
        raise ValueError(f"x must be [..., n, d] and freqs [..., n, r/2]; got ranks {x.dim()} and {freqs.dim()}")
    if 2 * freqs.shape[-1] > x.shape[-1]:
        raise ValueError(f"freqs rotate {2 * freqs.shape[-1]} features but x has only d={x.shape[-1]}")
    if freqs.shape[-2] != x.shape[-2]:
        raise ValueError(f"freqs has n={freqs.shape[-2]} positions but x has n={x.shape[-2]}")
    if x.dim() == 4 and freqs.dim() == 3:
        freqs = freqs.unsqueeze(1)  # [b, n, r/2] -> [b, 1, n, r/2]: broadcast over heads
    return rotate_half_reference(x, freqs)
