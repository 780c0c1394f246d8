"""Strictly causal CoLT5 layers for language models: routed attention, routed feedforward, block, stack.

Shapes: b batch, n sequence, d model dim, h heavy heads, dh heavy head dim, r key-value routes,
W heavy (routing) window, w = ceil(n / W) windows, Q = w * Cq routed queries, K = w * Ckv routed
key-values per route.

Every output at position i depends on x[:, :i + 1] only, routing decisions included: the light
branch is causal local attention, and the routers are `CausalCoordinateDescentRouter`s (see
colt5/causal_routing.py for the scheme), which decide token i's routing from its own score and
earlier tokens' scores only. Token counts (num_heavy_tokens_q, num_heavy_tokens_kv,
num_heavy_tokens) are capacities PER HEAVY WINDOW of W tokens, so the heavy work grows linearly
with n and a model trained at one length runs at any other.

Heavy attention: each routed query attends to every routed key-value at an original position
<= its own (across all windows; a causal mask on original positions) plus a learned null
key/value, so no row is empty. Values are scaled by the key-value router's weights, the output by
the query router's; outputs are scattered back to their positions and unrouted queries get a
learned null output (use_null_q_tokens) or nothing.
"""

from __future__ import annotations

from torch import Tensor, nn

from colt5.causal_routing import CausalCoordinateDescentRouter
from colt5.feedforward import FeedForward
from colt5.heavy_attention import RoutedAttention
from colt5.local_attention import LocalMHA
from colt5.routers import check_num_tokens, check_tokens, layer_router_kwargs, norm_and_scores, scatter_back

__all__ = [
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedAutoregressiveFeedForward",
    "ConditionalRoutedAutoregressiveTransformerBlock",
    "ConditionalRoutedAutoregressiveTransformer",
]



def _check_capacity(value: int, window: int, name: str) -> int:
    check_num_tokens(value, name)
    if value > window:
        raise ValueError(f"{name} is a capacity per heavy window and must be <= heavy_window_size={window}, got {value}")
    return value


class ConditionalRoutedAutoregressiveAttention(nn.Module):
    """CoLT5 attention, strictly causal: causal local (light) attention on every token plus heavy
    attention among causally routed queries and key-values. Returns the branch output WITHOUT the
    residual: forward(x [b, n, d]) -> [b, n, d].

    Args:
        dim: model width d.
        num_heavy_tokens_q, num_heavy_tokens_kv: routed queries / key-values per heavy window
            (capacities, <= heavy_window_size; CoLT5's n/16 and n/8 are W/16 and W/8). forward's
            arguments of the same names override them per call.
        num_routed_kv: key-value routes; heavy heads are split evenly between them (each route
            has its own router and key/value projection).
        light_dim_head, light_heads, light_window_size: the causal local attention (each token
            sees its window and the previous one).
        heavy_window_size: the routing window W (default light_window_size).
        heavy_dim_head, heavy_heads: the routed attention.
        router_straight_through, router_kwargs: routers' settings (`CausalCoordinateDescentRouter`
            keyword arguments: n_iters, eps, eps_init, eps_decay, fetch_k_ratio, cosine_sim_routing).
        multiply_keys_by_score, multiply_queries_by_score: also scale keys / queries by their
            router weights (values and outputs always are).
        use_null_q_tokens: unrouted positions get a learned output vector instead of nothing.
        use_triton: the causal routers' backend (None: the fused op on CUDA, the reference
            elsewhere). use_flash_attn: accepted for compatibility (the heavy attention always
            runs the fused kernel of `colt5.kernels.flash_attention` on CUDA).
        rotary_emb: rotary embeddings in both branches, at original positions in the heavy one.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int,
        num_heavy_tokens_kv: int,
        num_routed_kv: int = 1,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_window_size: int | None = None,
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
    ) -> None:
        super().__init__()
        check_num_tokens(dim, "dim")
        check_num_tokens(light_window_size, "light_window_size")
        heavy_window_size = light_window_size if heavy_window_size is None else heavy_window_size
        check_num_tokens(heavy_window_size, "heavy_window_size")
        for name, value in (("num_routed_kv", num_routed_kv), ("heavy_heads", heavy_heads), ("heavy_dim_head", heavy_dim_head)):
            check_num_tokens(value, name)
        if heavy_heads % num_routed_kv:
            raise ValueError(f"heavy_heads ({heavy_heads}) must be divisible by num_routed_kv ({num_routed_kv})")
        if rotary_emb and heavy_dim_head % 2:
            raise ValueError(f"rotary_emb needs an even heavy_dim_head, got {heavy_dim_head}")
        self.dim = dim
        self.heavy_window_size = heavy_window_size
        self.num_heavy_tokens_q = _check_capacity(num_heavy_tokens_q, heavy_window_size, "num_heavy_tokens_q")
        self.num_heavy_tokens_kv = _check_capacity(num_heavy_tokens_kv, heavy_window_size, "num_heavy_tokens_kv")
        self.num_routed_kv = num_routed_kv
        self.use_flash_attn = use_flash_attn

        self.norm = nn.LayerNorm(dim)
        self.light_attn = LocalMHA(
            dim, window_size=light_window_size, dim_head=light_dim_head, heads=light_heads, causal=True, rotary_emb=rotary_emb
        )
        kwargs = layer_router_kwargs(router_kwargs, reserved=("dim", "num_routing_tokens", "window_size", "route_block_size"), straight_through=router_straight_through, use_triton=use_triton)
        self.q_router = CausalCoordinateDescentRouter(dim, window_size=heavy_window_size, **kwargs)
        self.kv_router = CausalCoordinateDescentRouter(dim, window_size=heavy_window_size, num_routing_tokens=num_routed_kv, **kwargs)

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
        random_route: bool = False,
        residual: Tensor | None = None,
    ) -> Tensor:
        check_tokens(x, self.dim, None)
        W = self.heavy_window_size
        cq = self.num_heavy_tokens_q if num_heavy_tokens_q is None else _check_capacity(num_heavy_tokens_q, W, "num_heavy_tokens_q")
        ckv = self.num_heavy_tokens_kv if num_heavy_tokens_kv is None else _check_capacity(num_heavy_tokens_kv, W, "num_heavy_tokens_kv")

        x, scores = norm_and_scores(self.norm, x, [self.q_router, self.kv_router])
        q_scores, kv_scores = scores or (None, None)
        light = self.light_attn(x)
        q = self.q_router(x, num_tokens=cq, random_route=random_route, scores=q_scores)  # [b, w * cq] slots
        kv = self.kv_router(x, num_tokens=ckv, random_route=random_route, keep_one_route_dim=True, scores=kv_scores)
        # causal on original positions; slots come in window order, cq and ckv per window
        if residual is not None:
            return self.heavy(residual, q, kv, causal=True, window_slots=(cq, ckv), light=light)
        return self.heavy(light, q, kv, causal=True, window_slots=(cq, ckv))


class ConditionalRoutedAutoregressiveFeedForward(nn.Module):
    """CoLT5 feedforward, strictly causal: FF_light(norm x) + y * FF_heavy(norm x) at causally
    routed tokens. Returns the branch output WITHOUT the residual.

    Args:
        dim: model width d.
        num_heavy_tokens: routed tokens per heavy window (<= heavy_window_size); forward's
            num_heavy_tokens overrides it per call.
        heavy_window_size: the routing window W (default 16 * num_heavy_tokens: CoLT5's n/16).
        light_ff_mult, heavy_ff_mult: hidden widths as multiples of dim (CoLT5: 1/2 and 4).
        router_straight_through, router_kwargs, use_triton: as ConditionalRoutedAutoregressiveAttention.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens: int,
        heavy_window_size: int | None = None,
        light_ff_mult: float = 0.5,
        heavy_ff_mult: float = 4,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        use_triton: bool | None = None,
    ) -> None:
        super().__init__()
        check_num_tokens(dim, "dim")
        check_num_tokens(num_heavy_tokens, "num_heavy_tokens")
        heavy_window_size = 16 * num_heavy_tokens if heavy_window_size is None else heavy_window_size
        check_num_tokens(heavy_window_size, "heavy_window_size")
        self.dim = dim
        self.heavy_window_size = heavy_window_size
        self.num_heavy_tokens = _check_capacity(num_heavy_tokens, heavy_window_size, "num_heavy_tokens")
        self.norm = nn.LayerNorm(dim)
        self.light_ff = FeedForward(dim, light_ff_mult)
        self.heavy_ff = FeedForward(dim, heavy_ff_mult)
        kwargs = layer_router_kwargs(router_kwargs, reserved=("dim", "num_routing_tokens", "window_size", "route_block_size"), straight_through=router_straight_through, use_triton=use_triton)
        self.router = CausalCoordinateDescentRouter(dim, window_size=heavy_window_size, **kwargs)

    def forward(
        self, x: Tensor, *, num_heavy_tokens: int | None = None, random_route: bool = False, residual: Tensor | None = None
    ) -> Tensor:
        check_tokens(x, self.dim, None)
        W = self.heavy_window_size
        c = self.num_heavy_tokens if num_heavy_tokens is None else _check_capacity(num_heavy_tokens, W, "num_heavy_tokens")
        x, scores = norm_and_scores(self.norm, x, [self.router])
        light = self.light_ff(x)
        indices, scores, routed, routed_mask = self.router(x, num_tokens=c, random_route=random_route,
                                                           scores=scores and scores[0])
        heavy = self.heavy_ff(routed)
        if residual is not None:
            return scatter_back(residual, heavy, indices, light=light, weights=scores, real=routed_mask)
        return scatter_back(light, heavy, indices, weights=scores, real=routed_mask)


class ConditionalRoutedAutoregressiveTransformerBlock(nn.Module):
    """x + attn(x), then + ff(.): the strictly causal CoLT5 block. [b, n, d] -> [b, n, d].

    Token counts are capacities per heavy window (default heavy_window_size = light_window_size);
    when left None they follow CoLT5's fractions: W/16 queries, W/8 key-values, W/16 ff tokens.
    Other arguments as ConditionalRoutedAutoregressiveAttention / ...FeedForward.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_routed_kv: int = 1,
        num_heavy_ff_tokens: int | None = None,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_window_size: int | None = None,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        light_ff_mult: float = 0.5,
        heavy_ff_mult: float = 4,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool | None = None,
        rotary_emb: bool = False,
    ) -> None:
        super().__init__()
        check_num_tokens(light_window_size, "light_window_size")
        W = light_window_size if heavy_window_size is None else heavy_window_size
        check_num_tokens(W, "heavy_window_size")
        self.attn = ConditionalRoutedAutoregressiveAttention(
            dim,
            num_heavy_tokens_q=max(1, W // 16) if num_heavy_attn_tokens_q is None else num_heavy_attn_tokens_q,
            num_heavy_tokens_kv=max(1, W // 8) if num_heavy_attn_tokens_kv is None else num_heavy_attn_tokens_kv,
            num_routed_kv=num_routed_kv,
            light_dim_head=light_dim_head,
            light_heads=light_heads,
            light_window_size=light_window_size,
            heavy_window_size=W,
            heavy_dim_head=heavy_dim_head,
            heavy_heads=heavy_heads,
            router_straight_through=router_straight_through,
            router_kwargs=router_kwargs,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            use_triton=use_triton,
            use_null_q_tokens=use_null_q_tokens,
            use_flash_attn=use_flash_attn,
            rotary_emb=rotary_emb,
        )
        self.ff = ConditionalRoutedAutoregressiveFeedForward(
            dim,
            num_heavy_tokens=max(1, W // 16) if num_heavy_ff_tokens is None else num_heavy_ff_tokens,
            heavy_window_size=W,
            light_ff_mult=light_ff_mult,
            heavy_ff_mult=heavy_ff_mult,
            router_straight_through=router_straight_through,
            router_kwargs=router_kwargs,
            use_triton=use_triton,
        )

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_heavy_ff_tokens: int | None = None,
        random_route: bool = False,
    ) -> Tensor:
        x = self.attn(x, num_heavy_tokens_q=num_heavy_attn_tokens_q, num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
                      random_route=random_route, residual=x)
        return self.ff(x, num_heavy_tokens=num_heavy_ff_tokens, random_route=random_route, residual=x)


class ConditionalRoutedAutoregressiveTransformer(nn.Module):
    """A stack of `depth` strictly causal CoLT5 blocks and a final LayerNorm: [b, n, d] -> [b, n, d].

    block_kwargs go to every ConditionalRoutedAutoregressiveTransformerBlock; forward's keyword
    arguments (token-count overrides, random_route) go to every block.
    """

    def __init__(self, dim: int, *, depth: int, **block_kwargs) -> None:
        super().__init__()
        check_num_tokens(depth, "depth")
        self.layers = nn.ModuleList(ConditionalRoutedAutoregressiveTransformerBlock(dim, **block_kwargs) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, **block_forward_kwargs) -> Tensor:
        for layer in self.layers:
            x = layer(x, **block_forward_kwargs)
        return self.norm(x)
