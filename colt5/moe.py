"""Expert-choice mixture of heavy feedforwards on top of CoLT5's light feedforward.

Shapes: b batch, n sequence, d model dim, e experts, k tokens per expert (capacity), f hidden.

Each expert owns a routing token and picks its own k tokens by soft top-k over the sequence
(expert choice, Zhou et al. 2022: perfectly balanced, no auxiliary loss). A token may be picked
by several experts or by none:
    y_i = FF_light(x_i) + sum_{experts e that picked i} s_{e,i} FF_e(x_i).
All experts run as one batched einsum over the expert dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from colt5 import validation
from colt5.feedforward import FeedForward, _hidden_dim
from colt5.precision import to_autocast_dtype
from colt5.routers import CoordinateDescentRouter, RouterFactory, RouterStats, layer_router_kwargs, make_router, scatter_back

__all__ = ["ConditionalRoutedMoEFeedForward", "ExpertLoad", "expert_load"]


class ExpertLoad(NamedTuple):
    """How the routed tokens spread over the experts (real tokens only; tensors, no host sync)."""

    tokens_per_expert: Tensor  # [b, e] long: real tokens each expert took
    experts_per_token: Tensor  # [b, n] long: experts that took each token (0 at padding)
    tokens_with_0: Tensor  # [b] long: real tokens no expert took
    tokens_with_1: Tensor  # [b] long: real tokens exactly one expert took
    tokens_with_2plus: Tensor  # [b] long: real tokens two or more experts took


def expert_load(indices: Tensor | None, routed_mask: Tensor | None, mask: Tensor | None, *, b: int, n: int, e: int, device=None) -> ExpertLoad:
    """ExpertLoad from a router's indices [b, e, k] and routed_mask [b, e, k] (or None: every
    expert took every token) and the input mask [b, n] (None: all real)."""
    real = torch.ones(b, n, dtype=torch.bool, device=device) if mask is None else mask
    if indices is None:
        per_token = real.long() * e
        per_expert = real.long().sum(-1, keepdim=True).expand(b, e)
    else:
        took = torch.ones_like(indices, dtype=torch.long) if routed_mask is None else routed_mask.long()
        per_expert = took.sum(-1)
        per_token = torch.zeros(b, n, dtype=torch.long, device=indices.device).scatter_add_(1, indices.flatten(1), took.flatten(1))
    return ExpertLoad(
        per_expert,
        per_token,
        ((per_token == 0) & real).sum(-1),
        ((per_token == 1) & real).sum(-1),
        ((per_token >= 2) & real).sum(-1),
    )


class ConditionalRoutedMoEFeedForward(nn.Module):
    """Light FF for every token plus `num_experts` heavy FFs, each taking its top
    `num_heavy_tokens` tokens (its capacity) by soft top-k; returns the update WITHOUT the
    residual. One LayerNorm feeds the light branch, the router and the experts.

    forward(x [b, n, d], mask=None [b, n] bool, num_heavy_tokens=None, return_load=False) -> y
    [b, n, d], or (y, ExpertLoad) with return_load=True. One router with
    num_routing_tokens=num_experts scores all experts in one matmul: `router_class(dim,
    num_routing_tokens=num_experts, straight_through=..., use_triton=..., **router_kwargs)`, a
    `colt5.routers.Router` subclass or any callable returning one (default
    `CoordinateDescentRouter`). When n <= capacity, every expert takes every token with weight 1.
    `routing_stats(x)` reports how far each expert's soft top-k got (`RouterStats`).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_experts: int,
        num_heavy_tokens: int,
        light_ff_mult: float = 0.5,
        heavy_ff_mult: float = 4,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        use_triton: bool | None = None,
        router_class: RouterFactory = CoordinateDescentRouter,
    ):
        super().__init__()
        validation.positive_int("dim", dim)
        validation.positive_int("num_experts", num_experts)
        validation.positive_int("num_heavy_tokens", num_heavy_tokens)
        self.dim, self.num_experts, self.num_heavy_tokens = dim, num_experts, num_heavy_tokens
        self.norm = nn.LayerNorm(dim)
        self.light_ff = FeedForward(dim, light_ff_mult)
        kwargs = layer_router_kwargs(router_kwargs, reserved=("dim", "num_routing_tokens"), straight_through=router_straight_through, use_triton=use_triton)
        self.router = make_router(router_class, dim, num_routing_tokens=num_experts, **kwargs)

        hidden = _hidden_dim(dim, heavy_ff_mult, "heavy_ff_mult")
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        # nn.Linear's default init, per expert.
        for w, b, fan_in in ((self.w1, self.b1, dim), (self.w2, self.b2, hidden)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.act = nn.GELU()

    def experts(self, tokens: Tensor) -> Tensor:
        """[b, e, k, d] -> [b, e, k, d]: expert e's FF on its own tokens, one einsum per layer."""
        h = torch.einsum("b e k d, e d f -> b e k f", tokens, self.w1) + self.b1.unsqueeze(1).to(tokens.dtype)
        h = self.act(h)
        return torch.einsum("b e k f, e f d -> b e k d", h, self.w2) + self.b2.unsqueeze(1).to(h.dtype)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, num_heavy_tokens: int | None = None, return_load: bool = False
    ) -> Tensor | tuple[Tensor, ExpertLoad]:
        validation.layer_input(x, self, mask=mask)
        num_heavy_tokens = self.num_heavy_tokens if num_heavy_tokens is None else num_heavy_tokens
        validation.positive_int("num_heavy_tokens", num_heavy_tokens)
        b, n, _ = x.shape

        x = to_autocast_dtype(self.norm(x))  # see colt5.precision
        light = self.light_ff(x)
        indices, scores, routed, routed_mask = self.router(x, num_tokens=num_heavy_tokens, mask=mask, keep_one_route_dim=True)
        heavy = self.experts(routed)
        if scores is not None:
            heavy = heavy * scores.unsqueeze(-1).to(heavy.dtype)
        out = scatter_back(light, heavy, indices, real=routed_mask)  # the router's own picks: no checks
        if not return_load:
            return out
        return out, expert_load(indices, routed_mask, mask, b=b, n=n, e=self.num_experts, device=x.device)

    def routing_stats(self, x: Tensor, mask: Tensor | None = None, num_heavy_tokens: int | None = None) -> RouterStats:
        """How far each expert's soft top-k gets on x [b, n, d] (`Router.routing_stats` on the
        normalised x the router sees; the route dim is the expert)."""
        validation.layer_input(x, self, mask=mask)
        num = self.num_heavy_tokens if num_heavy_tokens is None else num_heavy_tokens
        return self.router.routing_stats(self.norm(x), num_tokens=num, mask=mask)
