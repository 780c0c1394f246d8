"""Routed cross attention: a few routed queries attend to a few routed memories of a long context.

Shapes: b batch, n query sequence, m context length (up to ~1M memories), d model dim, c context
dim, h heads, dh head dim, r key-value routes, g = h / r heads per route, i routed queries,
j routed memories per route.

CoLT5's heavy attention (Ainslie et al. 2023, section 3.2) applied across two sequences: one
router picks the queries of x, another picks key/value tokens of the context (in blocks of
`route_block_size` for very long contexts). With several key-value routes each route picks its own
memories and serves its own group of g heads. Values are scaled by the kv soft scores, the
output by the query soft scores; unrouted queries get a learned null output.

Memory stays O(m * c) in the context: the routers score all memories with one matmul ([b, r, m]
scores), gather picks with index_select, and norms and projections run on the picks only. Nothing
of shape [b, r, m, c] is ever built.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from colt5 import validation
from colt5.heavy_attention import RoutedAttention
from colt5.precision import to_autocast_dtype
from colt5.routers import CoordinateDescentRouter, RouterFactory, layer_router_kwargs, make_router

__all__ = ["ConditionalRoutedCrossAttention"]


class ConditionalRoutedCrossAttention(nn.Module):
    """Routed queries of x attend to routed memories of a (very long) context, plus a null key/value.

    Args:
        dim: width d of x (and of the output).
        num_tokens_q: queries routed to the heavy attention (default for forward).
        num_tokens_kv: memories routed per key-value route (default for forward). With
            route_block_size the context is routed per block and the total is rounded up to a
            multiple of the number of blocks.
        dim_head, heads: the attention's head size and head count.
        router_straight_through, router_kwargs, use_triton: passed to both routers;
            router_kwargs wins over the named ones.
        kv_routing_tokens: key-value routes r; each picks its own memories for heads // r heads.
        multiply_keys_by_score: also scale keys (not only values) by the kv scores.
        use_null_q_tokens: unrouted queries output a learned null token (else zeros).
        use_flash_attn: accepted for compatibility; SDPA picks its kernel (flash where eligible).
        route_block_size: route the context in blocks of this many memories.
        dim_context: width c of the context (default dim).
        router_class: makes both routers, `router_class(dim, **settings)` for the queries and
            `router_class(dim_context, num_routing_tokens=kv_routing_tokens,
            route_block_size=route_block_size, **settings)` for the context: a
            `colt5.routers.Router` subclass or any callable returning one (default
            `CoordinateDescentRouter`).

    forward(x [b, n, d], context [b, m, c], *, num_tokens_q=None, num_tokens_kv=None,
    mask=None [b, n] bool, context_mask=None [b, m] bool; True = real) -> [b, n, d]. Raises
    TypeError / ValueError naming the argument for bad shapes or masks, and for an x or context
    on another device or of another dtype than the layer (autocast's fp32/fp16/bf16 aside).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_tokens_q: int,
        num_tokens_kv: int,
        dim_head: int = 64,
        heads: int = 8,
        router_straight_through: bool = True,
        router_kwargs: dict[str, Any] = {},  # noqa: B006 (read only; the name is the contract)
        kv_routing_tokens: int = 1,
        multiply_keys_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool | None = None,
        route_block_size: int | None = None,
        dim_context: int | None = None,
        router_class: RouterFactory = CoordinateDescentRouter,
    ):
        super().__init__()
        dim_context = dim if dim_context is None else dim_context
        for name, value in (
            ("dim", dim),
            ("dim_context", dim_context),
            ("num_tokens_q", num_tokens_q),
            ("num_tokens_kv", num_tokens_kv),
            ("dim_head", dim_head),
            ("heads", heads),
            ("kv_routing_tokens", kv_routing_tokens),
        ):
            validation.positive_int(name, value)
        if heads % kv_routing_tokens != 0:
            raise ValueError(f"heads ({heads}) must be divisible by kv_routing_tokens ({kv_routing_tokens})")
        if route_block_size is not None:
            validation.positive_int("route_block_size", route_block_size)

        self.dim, self.dim_context = dim, dim_context
        self.num_tokens_q, self.num_tokens_kv = num_tokens_q, num_tokens_kv
        self.heads, self.dim_head, self.kv_routing_tokens = heads, dim_head, kv_routing_tokens
        self.multiply_keys_by_score = multiply_keys_by_score
        self.use_flash_attn = use_flash_attn

        shared = layer_router_kwargs(router_kwargs, reserved=("dim", "num_routing_tokens", "route_block_size"), straight_through=router_straight_through, use_triton=use_triton)
        self.q_router = make_router(router_class, dim, name="q_router", **shared)
        self.kv_router = make_router(
            router_class, dim_context, name="kv_router",
            **{**shared, "num_routing_tokens": kv_routing_tokens, "route_block_size": route_block_size},
        )

        # Pre-norms run on the routed tokens only (a norm over 1M memories would cost another [b, m, c]).
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim_context)
        self.heavy = RoutedAttention(
            dim, heads=heads, dim_head=dim_head, num_routes=kv_routing_tokens, dim_context=dim_context,
            multiply_keys_by_score=multiply_keys_by_score, use_null_q_tokens=use_null_q_tokens,
        )

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        num_tokens_q: int | None = None,
        num_tokens_kv: int | None = None,
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        validation.tokens(x, self.dim, "x")
        validation.tokens(context, self.dim_context, "context")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context must have batch {x.shape[0]} (that of x), got {context.shape[0]}")
        validation.bool_mask(mask, tuple(x.shape[:2]), "mask", of="x", device=x.device)
        validation.bool_mask(context_mask, tuple(context.shape[:2]), "context_mask", of="context", device=context.device)
        validation.matches_module(x, self, "x")
        validation.matches_module(context, self, "context")
        num_tokens_q = self.num_tokens_q if num_tokens_q is None else num_tokens_q
        num_tokens_kv = self.num_tokens_kv if num_tokens_kv is None else num_tokens_kv
        validation.positive_int("num_tokens_q", num_tokens_q)
        validation.positive_int("num_tokens_kv", num_tokens_kv)

        q = self.q_router(x, num_tokens=num_tokens_q, mask=mask)
        kv = self.kv_router(context, num_tokens=num_tokens_kv, mask=context_mask, keep_one_route_dim=True)
        # kv tokens [b, r, j, c]: an expanded view of the context when it is short
        q = q._replace(routed_tokens=to_autocast_dtype(self.norm(q.routed_tokens)))
        kv = kv._replace(routed_tokens=to_autocast_dtype(self.context_norm(kv.routed_tokens)))
        base = x.new_zeros(x.shape, dtype=q.routed_tokens.dtype)
        return self.heavy(base, q, kv)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, dim_context={self.dim_context}, num_tokens_q={self.num_tokens_q}, "
            f"num_tokens_kv={self.num_tokens_kv}, heads={self.heads}, dim_head={self.dim_head}, "
            f"kv_routing_tokens={self.kv_routing_tokens}, route_block_size={self.kv_router.route_block_size}"
        )
