"""Dtypes under autocast: what the layers keep in half precision and what they keep in fp32.

Under bf16/fp16 autocast a LayerNorm returns fp32, and every consumer of its output in a routed
layer (the light branch's projections, the heavy branch's gathered tokens) casts it to half
precision anyway. `to_autocast_dtype` does that cast once, right after the norm, so the
activations saved for the backward and the gradients flowing back into the norm are half the
bytes (H100, 32k block, compiled: step peak 726 -> 647 MB, under the dense block's 652).

Routing scores stay fp32 (`fp32_scores`): top-k picks are decided by small differences between
scores, which bf16 (8 bits of mantissa) would round into ties.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_autocast_dtype(x: Tensor) -> Tensor:
    """x in the autocast dtype of its device when autocast is on there, else x unchanged."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def fp32_scores(x: Tensor, routing_tokens: Tensor) -> Tensor:
    """x [b, n, d] . routing_tokens [r, d] or [b, r, d] -> [b, r, n], computed and returned in
    fp32 (fp64 when an input is fp64) whatever x's dtype and the autocast state."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, routing_tokens.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            # A product and a sum over d: inductor fuses them into the norm that made x (as
            # GEMVs they took 0.19 ms of the 32k block's 3.1 ms of GPU time, H100) and keeps x
            # in its own dtype for the backward.
            return (x.to(dtype).unsqueeze(1) * routing_tokens.to(dtype).unsqueeze(-2)).sum(-1)
        return _Fp32Scores.apply(x, routing_tokens, dtype)


def _score_einsum(x: Tensor, routing_tokens: Tensor) -> Tensor:
    spec = "b n d, r d -> b r n" if routing_tokens.dim() == 2 else "b n d, b r d -> b r n"
    return torch.einsum(spec, x, routing_tokens)


class _Fp32Scores(torch.autograd.Function):
    """Eager scores that save x as it is: an fp32 copy of a bf16 x, kept for the backward of a
    plain fp32 einsum, would be the largest tensor a router holds (64 MB at n = 32k, d = 512)."""

    @staticmethod
    def forward(ctx, x: Tensor, routing_tokens: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x, routing_tokens)
        ctx.dtype = dtype
        return _score_einsum(x.to(dtype), routing_tokens.to(dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, routing_tokens = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        grad_x = grad_tokens = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                spec = "b r n, r d -> b n d" if routing_tokens.dim() == 2 else "b r n, b r d -> b n d"
                grad_x = torch.einsum(spec, grad, routing_tokens.to(ctx.dtype)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                spec = "b r n, b n d -> r d" if routing_tokens.dim() == 2 else "b r n, b n d -> b r d"
                grad_tokens = torch.einsum(spec, grad, x.to(ctx.dtype)).to(routing_tokens.dtype)
        return grad_x, grad_tokens, None
