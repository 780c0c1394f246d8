"""CoLT5's routed attention for encoders: light local attention + heavy routed attention.

Shapes: b batch, n sequence, d model dim, r key-value routes.

CoLT5 (Ainslie et al. 2023, section 3.2): y_i = x_i + A_light(x_i, X) + s^q_i A_heavy(x_i, s^kv X).
The light branch is local windowed attention over every token; the heavy branch
(`colt5.heavy_attention.RoutedAttention`) is full attention among routed tokens only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from colt5 import validation
from colt5.heavy_attention import RoutedAttention
from colt5.local_attention import LocalMHA
from colt5.routers import (
    CoordinateDescentRouter,
    RouterFactory,
    RouterStats,
    layer_router_kwargs,
    make_router,
    norm_and_scores,
    route_together,
)

__all__ = ["ConditionalRoutedAttention"]


class ConditionalRoutedAttention(nn.Module):
    """CoLT5's routed attention: light local attention on every token + heavy attention among
    routed tokens. Returns the update WITHOUT the residual (the block adds x).

    forward(x [b, n, d], *, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, mask=None [b, n]
    bool, residual=None) -> [b, n, d]; with residual given, residual + the update in residual's
    dtype (the block passes x: one fused op adds both branches and the residual). One LayerNorm
    feeds both branches and both routers.

    Heavy branch (`RoutedAttention`, the core every routed attention layer shares): a query
    router (one route) picks num_heavy_tokens_q queries; a key-value router with num_routed_kv
    routing tokens picks num_heavy_tokens_kv key-values per route. The heavy heads are split
    evenly over the routes: heads of route g attend only to route g's key-values (plus a learned
    null key/value per head). Values (and keys if multiply_keys_by_score) are scaled by the
    key-value soft scores, queries by the query scores if multiply_queries_by_score; the output
    is scaled by the query scores and scattered back. Unrouted queries get a learned null output
    token (use_null_q_tokens) or zero. With rotary_emb, routed queries/keys are rotated at their
    ORIGINAL positions, and the light branch uses rotary too. When n <= the routed count, that
    router passes every token with weight 1.

    Args mirror the CoLT5 library: light_* configure the local attention (window
    light_window_size, one window back and one forward); heavy_* the routed attention;
    router_class makes both routers, `router_class(dim, straight_through=..., use_triton=...,
    **router_kwargs)` (the key-value one with num_routing_tokens=num_routed_kv): a
    `colt5.routers.Router` subclass or any callable returning one (default
    `CoordinateDescentRouter`); use_triton picks the soft top-k backend (None: by device).
    use_flash_attn is accepted for compatibility: the heavy attention always runs the fused
    kernel of `colt5.kernels.flash_attention` on CUDA. Raises ValueError if
    heavy_heads % num_routed_kv != 0; forward raises TypeError / ValueError naming the argument
    for a bad x or mask, and for an x on another device or of another dtype than the layer
    (autocast's fp32/fp16/bf16 aside).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int,
        num_heavy_tokens_kv: int,
        num_routed_kv: int = 1,
        has_light_attn: bool = True,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool | None = None,
        rotary_emb: bool = False,
        router_class: RouterFactory = CoordinateDescentRouter,
    ):
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("num_heavy_tokens_q", num_heavy_tokens_q),
            ("num_heavy_tokens_kv", num_heavy_tokens_kv),
            ("num_routed_kv", num_routed_kv),
            ("heavy_heads", heavy_heads),
            ("heavy_dim_head", heavy_dim_head),
        ):
            validation.positive_int(name, value)
        if heavy_heads % num_routed_kv:
            raise ValueError(f"heavy_heads ({heavy_heads}) must be divisible by num_routed_kv ({num_routed_kv})")
        if rotary_emb and heavy_dim_head % 2:
            raise ValueError(f"rotary_emb needs an even heavy_dim_head, got {heavy_dim_head}")
        self.dim = dim
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv
        self.num_routed_kv = num_routed_kv
        self.use_flash_attn = use_flash_attn

        self.norm = nn.LayerNorm(dim)
        self.light_attn = (
            LocalMHA(
                dim,
                window_size=light_window_size,
                dim_head=light_dim_head,
                heads=light_heads,
                causal=False,
                look_backward=1,
                look_forward=1,
                rotary_emb=rotary_emb,
            )
            if has_light_attn
            else None
        )

        kwargs = layer_router_kwargs(router_kwargs, reserved=("dim", "num_routing_tokens"), straight_through=router_straight_through, use_triton=use_triton)
        self.q_router = make_router(router_class, dim, name="q_router", **kwargs)
        self.kv_router = make_router(router_class, dim, name="kv_router", num_routing_tokens=num_routed_kv, **kwargs)

        self.heavy = RoutedAttention(
            dim, heads=heavy_heads, dim_head=heavy_dim_head, num_routes=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score, multiply_queries_by_score=multiply_queries_by_score,
            use_null_q_tokens=use_null_q_tokens, rotary_emb=rotary_emb,
        )

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        mask: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        validation.layer_input(x, self, mask=mask)
        num_q, num_kv = self._counts(num_heavy_tokens_q, num_heavy_tokens_kv)

        x, scores = norm_and_scores(self.norm, x, [self.q_router, self.kv_router])
        light = self.light_attn(x, mask=mask) if self.light_attn is not None else None
        # Both routers in one selection when they can share it.
        q, kv = route_together(x, [(self.q_router, num_q, False), (self.kv_router, num_kv, True)], mask=mask, scores=scores)
        if residual is not None:
            return self.heavy(residual, q, kv, light=light)
        return self.heavy(light if light is not None else torch.zeros_like(x), q, kv)

    def _counts(self, num_heavy_tokens_q: int | None, num_heavy_tokens_kv: int | None) -> tuple[int, int]:
        num_q = self.num_heavy_tokens_q if num_heavy_tokens_q is None else num_heavy_tokens_q
        num_kv = self.num_heavy_tokens_kv if num_heavy_tokens_kv is None else num_heavy_tokens_kv
        return validation.positive_int("num_heavy_tokens_q", num_q), validation.positive_int("num_heavy_tokens_kv", num_kv)

    def routing_stats(
        self, x: Tensor, *, num_heavy_tokens_q: int | None = None, num_heavy_tokens_kv: int | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, RouterStats]:
        """How far each router's soft top-k gets on x [b, n, d] (`Router.routing_stats`, on the
        normalised x the routers see): {"q": query router's, "kv": key-value router's}."""
        validation.layer_input(x, self, mask=mask)
        num_q, num_kv = self._counts(num_heavy_tokens_q, num_heavy_tokens_kv)
        xn = self.norm(x)
        return {"q": self.q_router.routing_stats(xn, num_tokens=num_q, mask=mask),
                "kv": self.kv_router.routing_stats(xn, num_tokens=num_kv, mask=mask)}
