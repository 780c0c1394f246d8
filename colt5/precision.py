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


# --------------------------------------------------------------------------------------------
# Eager autocast matmuls with one autograd node each.
#
# Under eager autocast an nn.Linear is a weight cast, a bias cast and a matmul, each with its
# own autograd node and autocast dispatch: about 0.6 ms of host time per forward+backward on
# the H200 host (benchmarks/host_overhead.py), for a few microseconds of GPU work at the
# routed layers' sizes. The same casts and matmuls inside one autograd.Function cost a
# fraction of that. Numerics are autocast's: operands in the autocast dtype, fp32 parameters'
# gradients cast back to fp32. Traced code (torch.compile) and code without autocast take the
# plain ops, which inductor fuses anyway.


def eager_autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype when eager autocast is on for x's device, else None."""
    device = x.device.type
    if not x.is_floating_point() or torch.compiler.is_compiling() or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _AutocastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xc, wc = x.to(dtype), weight.to(dtype)
        out = torch.mm(_rows(xc), wc.t()) if bias is None else torch.addmm(bias.to(dtype), _rows(xc), wc.t())
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.view(*x.shape[:-1], wc.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = _rows(grad).to(wc.dtype)
        dx = (g @ wc).view(xc.shape).to(x_dtype) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ _rows(xc)).to(w_dtype) if ctx.needs_input_grad[1] else None
        db = g.sum(0).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class _AutocastGeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype):
        xc, w1c, w2c = x.to(dtype), w1.to(dtype), w2.to(dtype)
        h = torch.addmm(b1.to(dtype), _rows(xc), w1c.t())
        a = torch.nn.functional.gelu(h)
        y = torch.addmm(b2.to(dtype), a, w2c.t())
        ctx.save_for_backward(xc, h, a, w1c, w2c)
        ctx.dtypes = (x.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return y.view(*x.shape[:-1], w2c.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xc, h, a, w1c, w2c = ctx.saved_tensors
        x_dtype, w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.dtypes
        g = _rows(grad).to(w2c.dtype)
        dh = torch.ops.aten.gelu_backward(g @ w2c, h)
        dx = (dh @ w1c).view(xc.shape).to(x_dtype)
        return (dx, (dh.t() @ _rows(xc)).to(w1_dtype), dh.sum(0).to(b1_dtype),
                (g.t() @ a).to(w2_dtype), g.sum(0).to(b2_dtype), None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear; under eager autocast as one autograd node (see above)."""
    dtype = eager_autocast_dtype(x)
    if dtype is None:
        return torch.nn.functional.linear(x, weight, bias)
    return _AutocastLinear.apply(x, weight, bias, dtype)


def gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """linear(gelu(linear(x, w1, b1)), w2, b2); under eager autocast as one autograd node."""
    dtype = eager_autocast_dtype(x)
    if dtype is None:
        return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    return _AutocastGeluMLP.apply(x, w1, b1, w2, b2, dtype)


class Linear(torch.nn.Linear):
    """nn.Linear whose eager autocast forward is one autograd node (`linear`)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
