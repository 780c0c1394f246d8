"""Feedforward layers: a plain GELU MLP and CoLT5's routed feedforward.

Shapes: b batch, n sequence, d model dim, k routed tokens.

CoLT5 (Ainslie et al. 2023, section 3.1): y_i = x_i + FF_light(x_i) + s_i * FF_heavy(x_i), where
FF_light (hidden d/2) runs on every token and FF_heavy (hidden 4d) only on the k tokens the router
picks, s_i being the router's soft top-k weight (0 for unrouted tokens).
"""

from __future__ import annotations

from torch import Tensor, nn

from colt5 import validation
from colt5.precision import gelu_mlp
from colt5.routers import (
    CoordinateDescentRouter,
    RouterFactory,
    RouterStats,
    layer_router_kwargs,
    make_router,
    norm_and_scores,
    scatter_back,
)

__all__ = ["FeedForward", "ConditionalRoutedFeedForward"]


def _hidden_dim(dim: int, mult: float, name: str = "mult") -> int:
    return max(1, int(dim * validation.positive_number(name, mult)))


class FeedForward(nn.Module):
    """Linear(d, d*mult) -> GELU -> Linear(d*mult, d). No norm inside: callers pre-normalise.

    Works on any [..., d] input.
    """

    def __init__(self, dim: int, mult: float = 4):
        super().__init__()
        validation.positive_int("dim", dim)
        hidden = _hidden_dim(dim, mult)
        self.dim, self.mult = dim, mult
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        first, _, second = self.net
        return gelu_mlp(x, first.weight, first.bias, second.weight, second.bias)  # see colt5.precision



def routed_feedforward(layer: nn.Module, x: Tensor, residual: Tensor | None, *,
                       normed: tuple[Tensor, list[Tensor] | None] | None = None, **route) -> Tensor:
    """The routed feedforward's computation, shared by the encoder and the causal layer: norm and
    scores (`normed`, norm_and_scores' output, when the caller has them), light FF on every
    token, the router's picks (`route`: its forward's arguments), heavy FF on them, and the
    scatter back (onto `residual` when given). `layer` has norm, light_ff, heavy_ff and router."""
    x, scores = norm_and_scores(layer.norm, x, [layer.router]) if normed is None else normed
    light = layer.light_ff(x)
    indices, weights, routed, routed_mask = layer.router(x, scores=scores and scores[0], **route)
    heavy = layer.heavy_ff(routed)
    if residual is not None:
        return scatter_back(residual, heavy, indices, light=light, weights=weights, real=routed_mask)
    return scatter_back(light, heavy, indices, weights=weights, real=routed_mask)


class ConditionalRoutedFeedForward(nn.Module):
    """CoLT5's routed feedforward: light FF on every token, heavy FF on the routed tokens.

    forward(x [b, n, d], mask=None [b, n] bool, num_heavy_tokens=None, *, residual=None) returns
    FF_light(norm(x)) + route_back(s * FF_heavy(norm(x)[routed])), WITHOUT the residual unless
    one is given (the block passes x: one fused op adds both branches and the residual). One
    LayerNorm feeds both branches and the router.

    Args:
        dim: model width d.
        num_heavy_tokens: tokens per sequence taking the heavy FF (CoLT5: n / 16); forward's
            num_heavy_tokens overrides it per call. When n <= num_heavy_tokens every token takes
            the heavy FF with weight 1 (no routing).
        light_ff_mult, heavy_ff_mult: hidden widths as multiples of dim (defaults 1/2 and 4; the paper's
            are 2 and 16, half and four times T5's 4 dim).
        router_straight_through: the soft weights are 1 in the forward, soft in the backward.
        router_kwargs: extra router arguments (for `CoordinateDescentRouter`: n_iters, eps,
            fetch_k_ratio, cosine_sim_routing, route_block_size, ...).
        use_triton: True / False force the Triton / reference soft top-k; None picks by device.
        router_class: makes the router, `router_class(dim, straight_through=..., use_triton=...,
            **router_kwargs)`: a `colt5.routers.Router` subclass (e.g. with its own `score`) or
            any callable returning one, with one route.

    forward raises TypeError / ValueError naming the argument for a bad x or mask, and for an
    x on another device or of another dtype than the layer (autocast's fp32/fp16/bf16 aside).
    """

    def __init__(
        self,
        dim: int,
        *,
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
        validation.positive_int("num_heavy_tokens", num_heavy_tokens)
        self.dim = dim
        self.num_heavy_tokens = num_heavy_tokens
        self.norm = nn.LayerNorm(dim)
        self.light_ff = FeedForward(dim, light_ff_mult)
        self.heavy_ff = FeedForward(dim, heavy_ff_mult)
        kwargs = layer_router_kwargs(router_kwargs, reserved=("dim", "num_routing_tokens"), straight_through=router_straight_through, use_triton=use_triton)
        self.router = make_router(router_class, dim, **kwargs)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, num_heavy_tokens: int | None = None, *, residual: Tensor | None = None
    ) -> Tensor:
        validation.layer_input(x, self, mask=mask)
        num_heavy_tokens = self.num_heavy_tokens if num_heavy_tokens is None else num_heavy_tokens
        validation.positive_int("num_heavy_tokens", num_heavy_tokens)

        return routed_feedforward(self, x, residual, num_tokens=num_heavy_tokens, mask=mask)

    def routing_stats(self, x: Tensor, mask: Tensor | None = None, num_heavy_tokens: int | None = None) -> RouterStats:
        """How far the router's soft top-k gets on x [b, n, d] (`Router.routing_stats`, on the
        normalised x the router sees): weights, and their sum per row against k'."""
        validation.layer_input(x, self, mask=mask)
        num = self.num_heavy_tokens if num_heavy_tokens is None else num_heavy_tokens
        return self.router.routing_stats(self.norm(x), num_tokens=num, mask=mask)
