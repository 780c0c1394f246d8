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
key/value, so no row is empty (num_heavy_tokens_kv above W takes colt5-attention's meaning:
each query window attends to that many of the most recent routed key-values; see the
attention). Values are scaled by the key-value router's weights, the output by the query
router's; outputs are scattered back to their positions and unrouted queries get a learned null
output (use_null_q_tokens) or nothing.

Decoding (colt5/decoding.py): every layer's forward takes a cache (`new_cache`); with an empty
one it is the prefill (the same output, and the state later positions need: light keys/values,
routed key-value slots, each router's window state), after that one token per forward computed
from the cache, equal to the full forward's output at its position. The stack owns the position
and advances it.
"""

from __future__ import annotations

from torch import Tensor, nn

from colt5 import validation
from colt5.block_options import block_options, split_block_options
from colt5.causal_routing import CausalCoordinateDescentRouter, RouterCache
from colt5.decoding import DecodePosition, LayersCache, without_grad_when_decoding
from colt5.feedforward import FeedForward, routed_feedforward
from colt5.heavy_attention import RoutedAttention, RoutedKVCache
from colt5.local_attention import LocalAttentionCache, LocalMHA
from colt5.routers import RouterFactory, layer_router_kwargs, make_router, norm_and_scores, scatter_back_one

__all__ = [
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedAutoregressiveFeedForward",
    "ConditionalRoutedAutoregressiveTransformerBlock",
    "ConditionalRoutedAutoregressiveTransformer",
    "AttentionCache",
    "FeedForwardCache",
    "BlockCache",
    "StackCache",
]


# --------------------------------------------------------------------------------------------
# Decode caches (colt5/decoding.py describes prefill and steps)


class AttentionCache:
    """ConditionalRoutedAutoregressiveAttention's decode state: the light attention's last
    windows (`light`), both routers' window state (`q`, `kv`), the routed key-value slots
    (`slots`), and the capacities (Cq, Ckv, span) the prefill routed with (`counts`)."""

    def __init__(self, position: DecodePosition) -> None:
        self.position = position
        self.light = LocalAttentionCache(position)
        self.q = RouterCache(position)
        self.kv = RouterCache(position)
        self.slots = RoutedKVCache(position)
        self.counts: tuple[int, int, int | None] | None = None


class FeedForwardCache:
    """ConditionalRoutedAutoregressiveFeedForward's decode state: its router's window state."""

    def __init__(self, position: DecodePosition) -> None:
        self.position = position
        self.router = RouterCache(position)


class BlockCache:
    """A block's decode state: its attention's and its feedforward's."""

    def __init__(self, attn: AttentionCache, ff: FeedForwardCache) -> None:
        self.position = attn.position
        self.attn, self.ff = attn, ff


class StackCache(LayersCache):
    """A ConditionalRoutedAutoregressiveTransformer's decode state (its `new_cache`): one
    BlockCache per block, the position they share and the blocks' routing windows."""


def _decoding(x: Tensor, cache, random_route: bool) -> None:
    cache.position.check(x)
    if random_route:
        raise ValueError("random_route must be False when decoding with a cache (routing by coin flips is not reproducible)")



def _check_capacity(value: int, window: int, name: str) -> int:
    validation.positive_int(name, value)
    if value > window:
        raise ValueError(f"{name} is a capacity per heavy window and must be <= heavy_window_size={window}, got {value}")
    return value


def _kv_slots(num_heavy_tokens_kv: int, window: int, name: str = "num_heavy_tokens_kv") -> tuple[int, int | None]:
    """num_heavy_tokens_kv -> (Ckv key-value slots routed per heavy window, span K or None).

    Up to W (ours): Ckv = num_heavy_tokens_kv and no span, every earlier slot is visible.
    Above W (colt5-attention's meaning, how many past key-values each query window attends
    to): Ckv = max(1, W // 8), CoLT5's fraction, and each query window sees only the K most
    recent routed slots up to its own last one.
    """
    validation.positive_int(name, num_heavy_tokens_kv)
    if num_heavy_tokens_kv <= window:
        return num_heavy_tokens_kv, None
    return max(1, window // 8), num_heavy_tokens_kv


class ConditionalRoutedAutoregressiveAttention(nn.Module):
    """CoLT5 attention, strictly causal: causal local (light) attention on every token plus heavy
    attention among causally routed queries and key-values. Returns the branch output WITHOUT the
    residual: forward(x [b, n, d]) -> [b, n, d].

    Args:
        dim: model width d.
        num_heavy_tokens_q, num_heavy_tokens_kv: routed queries / key-values per heavy window
            (capacities, <= heavy_window_size; CoLT5's n/16 and n/8 are W/16 and W/8). forward's
            arguments of the same names override them per call, by the same rule.
            num_heavy_tokens_kv = K > W takes colt5-attention's meaning instead: K is how many
            past key-values each query window attends to. The mapping (`_kv_slots`): ours,
            K <= W, routes Ckv = K slots in every window of W tokens and a routed query sees
            every routed slot at a position <= its own (about n / W * Ckv of them at the end
            of a sequence); K > W routes Ckv = max(1, W // 8) slots per window and a query of
            window w sees only the K most recent slots up to window w's last one (slot j with
            j >= (w + 1) * Ckv - K: the slots of the last K / Ckv windows), at positions <= its
            own. colt5-attention picks its K among all earlier tokens at once; here they are
            the routed slots of the most recent windows, so routing stays per window and
            causal.
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
        router_class: makes both routers, `router_class(dim, window_size=heavy_window_size,
            straight_through=..., use_triton=..., **router_kwargs)` (the key-value one with
            num_routing_tokens=num_routed_kv): a `CausalCoordinateDescentRouter` subclass or any
            callable returning one (the heavy attention relies on its window-ordered slots).

    forward raises TypeError / ValueError naming the argument for a bad x, and for an x on
    another device or of another dtype than the layer (autocast's fp32/fp16/bf16 aside). An
    empty x (batch or sequence 0) gives an empty output.
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
        router_class: RouterFactory = CausalCoordinateDescentRouter,
    ) -> None:
        super().__init__()
        validation.positive_int("dim", dim)
        validation.positive_int("light_window_size", light_window_size)
        heavy_window_size = light_window_size if heavy_window_size is None else heavy_window_size
        validation.positive_int("heavy_window_size", heavy_window_size)
        for name, value in (("num_routed_kv", num_routed_kv), ("heavy_heads", heavy_heads), ("heavy_dim_head", heavy_dim_head)):
            validation.positive_int(name, value)
        if heavy_heads % num_routed_kv:
            raise ValueError(f"heavy_heads ({heavy_heads}) must be divisible by num_routed_kv ({num_routed_kv})")
        if rotary_emb and heavy_dim_head % 2:
            raise ValueError(f"rotary_emb needs an even heavy_dim_head, got {heavy_dim_head}")
        self.dim = dim
        self.heavy_window_size = heavy_window_size
        self.num_heavy_tokens_q = _check_capacity(num_heavy_tokens_q, heavy_window_size, "num_heavy_tokens_q")
        _kv_slots(num_heavy_tokens_kv, heavy_window_size)  # checked now; K > W: colt5-attention's meaning
        self.num_heavy_tokens_kv = num_heavy_tokens_kv
        self.num_routed_kv = num_routed_kv
        self.use_flash_attn = use_flash_attn

        self.norm = nn.LayerNorm(dim)
        self.light_attn = LocalMHA(
            dim, window_size=light_window_size, dim_head=light_dim_head, heads=light_heads, causal=True, rotary_emb=rotary_emb
        )
        kwargs = layer_router_kwargs(router_kwargs, reserved=("dim", "num_routing_tokens", "window_size", "route_block_size"), straight_through=router_straight_through, use_triton=use_triton)
        causal = dict(required=CausalCoordinateDescentRouter, window_size=heavy_window_size)
        self.q_router = make_router(router_class, dim, name="q_router", **causal, **kwargs)
        self.kv_router = make_router(router_class, dim, name="kv_router", num_routing_tokens=num_routed_kv, **causal, **kwargs)

        self.heavy = RoutedAttention(
            dim, heads=heavy_heads, dim_head=heavy_dim_head, num_routes=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score, multiply_queries_by_score=multiply_queries_by_score,
            use_null_q_tokens=use_null_q_tokens, rotary_emb=rotary_emb,
        )

    def new_cache(self, position: DecodePosition) -> AttentionCache:
        """An empty decode cache sharing `position` (see `forward`'s cache)."""
        self.light_attn.new_cache(position)  # checks that the light attention is causal
        self.q_router._check_decodable()
        self.kv_router._check_decodable()
        return AttentionCache(position)

    @without_grad_when_decoding
    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        random_route: bool = False,
        residual: Tensor | None = None,
        cache: AttentionCache | None = None,
    ) -> Tensor:
        """cache (from `new_cache`): at length 0 this forward is the prefill (the same output)
        and fills the cache; after that x is one token at position cache.position.length and
        the output is the full forward's there, from the cache (the position's owner advances
        it)."""
        validation.layer_input(x, self)
        W = self.heavy_window_size
        cq = self.num_heavy_tokens_q if num_heavy_tokens_q is None else _check_capacity(num_heavy_tokens_q, W, "num_heavy_tokens_q")
        ckv, span = _kv_slots(self.num_heavy_tokens_kv if num_heavy_tokens_kv is None else num_heavy_tokens_kv, W)
        if cache is not None:
            _decoding(x, cache, random_route)
            if cache.position.length:
                return self._decode(x, cache, (cq, ckv, span), residual)

        x, scores = norm_and_scores(self.norm, x, [self.q_router, self.kv_router])
        q_scores, kv_scores = scores or (None, None)
        if cache is not None and scores is None:  # the prefill keeps the routers' scores
            q_scores, kv_scores = self.q_router._checked_score(x, None), self.kv_router._checked_score(x, None)
        light = self.light_attn(x, cache=None if cache is None else cache.light)
        q = self.q_router(x, num_tokens=cq, random_route=random_route, scores=q_scores)  # [b, w * cq] slots
        kv = self.kv_router(x, num_tokens=ckv, random_route=random_route, keep_one_route_dim=True, scores=kv_scores)
        fill = None
        if cache is not None:
            self.q_router.fill_cache(cache.q, q_scores, cq)
            self.kv_router.fill_cache(cache.kv, kv_scores, ckv)
            fill = (cache.slots, -(-cache.position.capacity // W) * ckv)  # the heavy branch keeps its key-values
            cache.counts = (cq, ckv, span)
        # causal on original positions; slots come in window order, cq and ckv per window
        if residual is not None:
            return self.heavy(residual, q, kv, causal=True, window_slots=(cq, ckv), kv_span=span, light=light, fill=fill)
        return self.heavy(light, q, kv, causal=True, window_slots=(cq, ckv), kv_span=span, fill=fill)

    def _decode(self, x: Tensor, cache: AttentionCache, counts: tuple, residual: Tensor | None) -> Tensor:
        """One token from the cache: both branches at position cache.position.length."""
        if counts != cache.counts:
            raise ValueError(f"token counts must stay those of the prefill while decoding: (q, kv slots, span) "
                             f"{cache.counts}, got {counts}")
        cq, ckv, span = counts
        x, scores = norm_and_scores(self.norm, x, [self.q_router, self.kv_router])
        q_scores, kv_scores = scores or (self.q_router._checked_score(x, None), self.kv_router._checked_score(x, None))
        light = self.light_attn(x, cache=cache.light)
        q_routed, _, q_weight = self.q_router.decode(q_scores, cache.q, cq)
        kv = self.kv_router.decode(kv_scores, cache.kv, ckv)
        window = cache.position.tensor // self.heavy_window_size
        base, light = (light, None) if residual is None else (residual, light)
        return self.heavy.decode(base, x, (q_routed, q_weight), kv, cache.slots, window=window,
                                 window_slots=(cq, ckv), kv_span=span, light=light)


class ConditionalRoutedAutoregressiveFeedForward(nn.Module):
    """CoLT5 feedforward, strictly causal: FF_light(norm x) + y * FF_heavy(norm x) at causally
    routed tokens. Returns the branch output WITHOUT the residual.

    Args:
        dim: model width d.
        num_heavy_tokens: routed tokens per heavy window (<= heavy_window_size); forward's
            num_heavy_tokens overrides it per call.
        heavy_window_size: the routing window W (default 16 * num_heavy_tokens: CoLT5's n/16).
        light_ff_mult, heavy_ff_mult: hidden widths as multiples of dim (defaults 1/2 and 4; the paper's
            are 2 and 16, half and four times T5's 4 dim).
        router_straight_through, router_kwargs, use_triton, router_class: as
            ConditionalRoutedAutoregressiveAttention.
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
        router_class: RouterFactory = CausalCoordinateDescentRouter,
    ) -> None:
        super().__init__()
        validation.positive_int("dim", dim)
        validation.positive_int("num_heavy_tokens", num_heavy_tokens)
        heavy_window_size = 16 * num_heavy_tokens if heavy_window_size is None else heavy_window_size
        validation.positive_int("heavy_window_size", heavy_window_size)
        self.dim = dim
        self.heavy_window_size = heavy_window_size
        self.num_heavy_tokens = _check_capacity(num_heavy_tokens, heavy_window_size, "num_heavy_tokens")
        self.norm = nn.LayerNorm(dim)
        self.light_ff = FeedForward(dim, light_ff_mult)
        self.heavy_ff = FeedForward(dim, heavy_ff_mult)
        kwargs = layer_router_kwargs(router_kwargs, reserved=("dim", "num_routing_tokens", "window_size", "route_block_size"), straight_through=router_straight_through, use_triton=use_triton)
        self.router = make_router(router_class, dim, required=CausalCoordinateDescentRouter, window_size=heavy_window_size, **kwargs)

    def new_cache(self, position: DecodePosition) -> FeedForwardCache:
        """An empty decode cache sharing `position` (see `forward`'s cache)."""
        self.router._check_decodable()
        return FeedForwardCache(position)

    @without_grad_when_decoding
    def forward(
        self, x: Tensor, *, num_heavy_tokens: int | None = None, random_route: bool = False, residual: Tensor | None = None,
        cache: FeedForwardCache | None = None,
    ) -> Tensor:
        """cache: as ConditionalRoutedAutoregressiveAttention.forward's."""
        validation.layer_input(x, self)
        W = self.heavy_window_size
        c = self.num_heavy_tokens if num_heavy_tokens is None else _check_capacity(num_heavy_tokens, W, "num_heavy_tokens")
        if cache is None:
            return routed_feedforward(self, x, residual, num_tokens=c, random_route=random_route)
        _decoding(x, cache, random_route)
        if cache.position.length:
            return self._decode(x, cache, c, residual)
        # The prefill: the forward, and the router's state from the same scores.
        xn, scores = self._scores(x)
        self.router.fill_cache(cache.router, scores, c)
        return routed_feedforward(self, x, residual, normed=(xn, [scores]), num_tokens=c)

    def _scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(norm x, the router's scores of it [b, 1, n]), as routed_feedforward has them."""
        x, scores = norm_and_scores(self.norm, x, [self.router])
        return x, scores[0] if scores else self.router._checked_score(x, None)

    def _decode(self, x: Tensor, cache: FeedForwardCache, c: int, residual: Tensor | None) -> Tensor:
        """One token from the cache: scatter_back's sum at position cache.position.length."""
        x, scores = self._scores(x)
        light = self.light_ff(x)
        routed, _, weight = self.router.decode(scores, cache.router, c)  # [b, 1]
        heavy = self.heavy_ff(x)  # one token: cheaper than a gather
        base, light = (light, None) if residual is None else (residual, light)
        return scatter_back_one(base, heavy, routed, weight, light=light)


class ConditionalRoutedAutoregressiveTransformerBlock(nn.Module):
    """x + attn(x), then + ff(.): the strictly causal CoLT5 block. [b, n, d] -> [b, n, d].

    Token counts are capacities per heavy window (default heavy_window_size = light_window_size);
    when left None they follow CoLT5's fractions: W/16 queries, W/8 key-values, W/16 ff tokens.
    Other arguments as ConditionalRoutedAutoregressiveAttention / ...FeedForward
    (`colt5.block_options` defines which goes where; router_class makes every router).
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
        router_class: RouterFactory = CausalCoordinateDescentRouter,
    ) -> None:
        options = block_options(locals())
        super().__init__()
        validation.positive_int("dim", dim)
        validation.positive_int("light_window_size", light_window_size)
        W = light_window_size if heavy_window_size is None else heavy_window_size
        validation.positive_int("heavy_window_size", W)
        options.update(
            heavy_window_size=W,
            num_heavy_attn_tokens_q=max(1, W // 16) if num_heavy_attn_tokens_q is None else num_heavy_attn_tokens_q,
            num_heavy_attn_tokens_kv=max(1, W // 8) if num_heavy_attn_tokens_kv is None else num_heavy_attn_tokens_kv,
            num_heavy_ff_tokens=max(1, W // 16) if num_heavy_ff_tokens is None else num_heavy_ff_tokens,
        )
        attn_kwargs, ff_kwargs = split_block_options(options)
        self.dim = dim
        self.attn = ConditionalRoutedAutoregressiveAttention(dim, **attn_kwargs)
        self.ff = ConditionalRoutedAutoregressiveFeedForward(dim, **ff_kwargs)

    def new_cache(self, position: DecodePosition) -> BlockCache:
        """An empty decode cache sharing `position` (see the sublayers' forward)."""
        return BlockCache(self.attn.new_cache(position), self.ff.new_cache(position))

    @without_grad_when_decoding
    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_heavy_ff_tokens: int | None = None,
        random_route: bool = False,
        cache: BlockCache | None = None,
    ) -> Tensor:
        """cache: a prefill or a decode step, as the sublayers' forward (the owner of
        cache.position advances it)."""
        validation.layer_input(x, self)
        x = self.attn(x, num_heavy_tokens_q=num_heavy_attn_tokens_q, num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
                      random_route=random_route, residual=x, cache=None if cache is None else cache.attn)
        return self.ff(x, num_heavy_tokens=num_heavy_ff_tokens, random_route=random_route, residual=x,
                       cache=None if cache is None else cache.ff)


class ConditionalRoutedAutoregressiveTransformer(nn.Module):
    """A stack of `depth` strictly causal CoLT5 blocks and a final LayerNorm: [b, n, d] -> [b, n, d].

    block_kwargs go to every ConditionalRoutedAutoregressiveTransformerBlock; forward's keyword
    arguments (token-count overrides, random_route) go to every block.
    """

    def __init__(self, dim: int, *, depth: int, **block_kwargs) -> None:
        super().__init__()
        validation.positive_int("depth", depth)
        validation.positive_int("dim", dim)
        self.dim = dim
        self.layers = nn.ModuleList(ConditionalRoutedAutoregressiveTransformerBlock(dim, **block_kwargs) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def new_cache(self, capacity: int) -> StackCache:
        """An empty decode cache for contexts of up to `capacity` tokens, on the stack's device."""
        validation.positive_int("capacity", capacity)
        position = DecodePosition(capacity, self.norm.weight.device)
        windows = tuple(w for layer in self.layers for w in (layer.attn.heavy_window_size, layer.ff.heavy_window_size))
        return StackCache(position, [layer.new_cache(position) for layer in self.layers], windows)

    @without_grad_when_decoding
    def forward(self, x: Tensor, *, cache: StackCache | None = None, **block_forward_kwargs) -> Tensor:
        """cache (from `new_cache`): empty, x [b, n, d] is a prompt (the prefill: the same output
        as without a cache); after that x [b, 1, d] is the next token and the output is the
        full forward's at its position (cache.length), computed from the cache. Advances it."""
        validation.layer_input(x, self)
        if cache is None:
            for layer in self.layers:
                x = layer(x, **block_forward_kwargs)
            return self.norm(x)
        if not isinstance(cache, StackCache) or len(cache.layers) != len(self.layers):
            raise TypeError(f"cache must be a StackCache from this stack's new_cache, got {type(cache).__name__}")
        cache.position.check(x)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer(x, cache=layer_cache, **block_forward_kwargs)
        cache.position.advance(x)
        return self.norm(x)
