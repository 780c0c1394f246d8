"""Attention layers: the heavy-attention core and CoLT5's routed attention.

Shapes: b batch, h heads, i queries, j keys/values, dh head dim, n sequence, d model dim,
r key-value routes, kq / kkv routed queries / key-values per route.

CoLT5 (Ainslie et al. 2023, section 3.2): y_i = x_i + A_light(x_i, X) + s^q_i A_heavy(x_i, s^kv X).
The light branch is local windowed attention over every token; the heavy branch is full attention
among routed tokens only: routed queries attend to routed key-values (plus a learned null
key/value), the key-value soft scores scale the values, the query scores scale the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colt5.local_attention import LocalMHA
from colt5.rotary import RotaryEmbedding, apply_rotary
from colt5.precision import to_autocast_dtype
from colt5.routers import CoordinateDescentRouter, check_num_tokens, check_tokens, layer_router_kwargs, route_together

__all__ = ["heavy_attend", "ConditionalRoutedAttention"]


def heavy_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    null_k: Tensor,
    null_v: Tensor,
    kv_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention with a learned null key/value prepended, via F.scaled_dot_product_attention.

    The null key/value is always attendable, so no query row is ever empty (fully padded or fully
    causally-masked rows attend to the null slot only and stay finite).

    Args:
        q: [b, h, i, dh]; k, v: [b, h, j, dh] (already projected, rotated, score-scaled).
        null_k, null_v: [h, dh] or [dh] learned null key / value (cast to q's dtype).
        kv_mask: bool [b, j] or [b, h, j], True = real key (may be attended).
        attn_mask: bool [b or 1, h or 1, i, j], True = may attend (e.g. causal among routed
            tokens, by original position). Combined with kv_mask by AND.
        scale: softmax scale, default dh ** -0.5.

    Returns [b, h, i, dh] in q's dtype. Without any mask the SDPA call gets no mask, so the flash
    kernel is eligible on CUDA.
    """
    b, h, i, dh = q.shape
    j = k.shape[-2]
    if k.shape != (b, h, j, dh) or v.shape != (b, h, j, dh):
        raise ValueError(f"k and v must be [b, h, j, dh] matching q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    nk = null_k.to(q.dtype).expand(h, dh) if null_k.dim() == 1 else null_k.to(q.dtype)
    nv = null_v.to(q.dtype).expand(h, dh) if null_v.dim() == 1 else null_v.to(q.dtype)
    k = torch.cat((nk.view(1, h, 1, dh).expand(b, h, 1, dh), k.to(q.dtype)), dim=2)
    v = torch.cat((nv.view(1, h, 1, dh).expand(b, h, 1, dh), v.to(q.dtype)), dim=2)

    mask = None
    if kv_mask is not None:
        if kv_mask.dim() == 2:
            kv_mask = kv_mask.view(b, 1, 1, j)
        elif kv_mask.dim() == 3:
            kv_mask = kv_mask.view(b, kv_mask.shape[1], 1, j)
        else:
            raise ValueError(f"kv_mask must be [b, j] or [b, h, j], got {tuple(kv_mask.shape)}")
        mask = kv_mask
    if attn_mask is not None:
        if attn_mask.dim() != 4 or attn_mask.shape[-2:] != (i, j):
            raise ValueError(f"attn_mask must be [b|1, h|1, {i}, {j}], got {tuple(attn_mask.shape)}")
        mask = attn_mask if mask is None else (mask & attn_mask)
    if mask is not None:
        # The null slot (column 0) is always attendable.
        mask = F.pad(mask, (1, 0), value=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class ConditionalRoutedAttention(nn.Module):
    """CoLT5's routed attention: light local attention on every token + heavy attention among
    routed tokens. Returns the update WITHOUT the residual (the block adds x).

    forward(x [b, n, d], *, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, mask=None [b, n]
    bool) -> [b, n, d]. One LayerNorm feeds both branches and both routers.

    Heavy branch: a query router (one route) picks num_heavy_tokens_q queries; a key-value router
    with num_routed_kv routing tokens (one matmul scores all routes) picks num_heavy_tokens_kv
    key-values per route. The heavy heads are split evenly over the routes: heads of route g
    attend only to route g's key-values (plus a learned null key/value per head). Values (and
    keys if multiply_keys_by_score) are scaled by the key-value soft scores, queries by the query
    scores if multiply_queries_by_score; the output is scaled by the query scores and scattered
    back. Unrouted queries get a learned null output token (use_null_q_tokens) or zero. With
    rotary_emb, routed queries/keys are rotated at their ORIGINAL positions, and the light branch
    uses rotary too. When n <= the routed count, that router passes every token with weight 1.

    Args mirror the CoLT5 library: light_* configure the local attention (window
    light_window_size, one window back and one forward); heavy_* the routed attention;
    router_kwargs go to both `CoordinateDescentRouter`s; use_triton picks the soft top-k backend
    (None: by device). use_flash_attn is accepted for compatibility: SDPA picks its kernel itself
    (flash when no mask is needed). Raises ValueError if heavy_heads % num_routed_kv != 0.
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
    ):
        super().__init__()
        check_num_tokens(dim, "dim")
        check_num_tokens(num_heavy_tokens_q, "num_heavy_tokens_q")
        check_num_tokens(num_heavy_tokens_kv, "num_heavy_tokens_kv")
        check_num_tokens(num_routed_kv, "num_routed_kv")
        check_num_tokens(heavy_heads, "heavy_heads")
        check_num_tokens(heavy_dim_head, "heavy_dim_head")
        if heavy_heads % num_routed_kv:
            raise ValueError(f"heavy_heads ({heavy_heads}) must be divisible by num_routed_kv ({num_routed_kv})")
        if rotary_emb and heavy_dim_head % 2:
            raise ValueError(f"rotary_emb needs an even heavy_dim_head, got {heavy_dim_head}")
        self.dim = dim
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv
        self.num_routed_kv = num_routed_kv
        self.heavy_heads, self.heavy_dim_head = heavy_heads, heavy_dim_head
        self.multiply_keys_by_score = multiply_keys_by_score
        self.multiply_queries_by_score = multiply_queries_by_score
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
        self.q_router = CoordinateDescentRouter(dim, **kwargs)
        self.kv_router = CoordinateDescentRouter(dim, num_routing_tokens=num_routed_kv, **kwargs)

        inner = heavy_heads * heavy_dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        # Output features ordered (route, k|v, head-in-route, dh): route g's tokens are projected
        # only by its own heads' weights, so several routes cost one einsum and no wasted work.
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.null_k = nn.Parameter(torch.randn(heavy_heads, heavy_dim_head))
        self.null_v = nn.Parameter(torch.randn(heavy_heads, heavy_dim_head))
        self.null_q_token = nn.Parameter(torch.randn(dim) * 0.02) if use_null_q_tokens else None
        self.rotary = RotaryEmbedding(heavy_dim_head) if rotary_emb else None

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        check_tokens(x, self.dim, mask)
        num_q = self.num_heavy_tokens_q if num_heavy_tokens_q is None else num_heavy_tokens_q
        num_kv = self.num_heavy_tokens_kv if num_heavy_tokens_kv is None else num_heavy_tokens_kv
        check_num_tokens(num_q, "num_heavy_tokens_q")
        check_num_tokens(num_kv, "num_heavy_tokens_kv")
        b, n, d = x.shape
        r, h, dh = self.num_routed_kv, self.heavy_heads, self.heavy_dim_head
        hr = h // r

        x = to_autocast_dtype(self.norm(x))  # see colt5.precision
        out = self.light_attn(x, mask=mask) if self.light_attn is not None else torch.zeros_like(x)

        # Both routers in one soft top-k and one pick when they can share them.
        (q_idx, q_scores, q_tokens, q_mask), (kv_idx, kv_scores, kv_tokens, kv_mask) = route_together(
            x, [(self.q_router, num_q, False), (self.kv_router, num_kv, True)], mask=mask
        )
        # Queries: [b, kq, d] -> [b, h, kq, dh].
        kq = q_tokens.shape[1]
        q = self.to_q(q_tokens).view(b, kq, h, dh).transpose(1, 2)

        # Key-values: [b, r, kkv, d] -> k, v [b, r, hr, kkv, dh], each route by its own heads.
        kkv = kv_tokens.shape[2]
        w_kv = self.to_kv.weight.view(r, 2 * hr * dh, d)
        kv = torch.einsum("b r k d, r e d -> b r k e", kv_tokens, w_kv)
        k, v = kv.view(b, r, kkv, 2, hr, dh).permute(3, 0, 1, 4, 2, 5)

        if self.rotary is not None:
            q_pos = torch.arange(n, device=x.device) if q_idx is None else q_idx
            kv_pos = torch.arange(n, device=x.device) if kv_idx is None else kv_idx.unsqueeze(2)  # [b, r, 1, kkv]
            q = apply_rotary(q, self.rotary(q_pos))
            k = apply_rotary(k, self.rotary(kv_pos))
        if kv_scores is not None:
            s = kv_scores.view(b, r, 1, kkv, 1).to(v.dtype)
            v = v * s
            if self.multiply_keys_by_score:
                k = k * s
        if q_scores is not None and self.multiply_queries_by_score:
            q = q * q_scores.view(b, 1, kq, 1).to(q.dtype)

        k, v = k.reshape(b, h, kkv, dh), v.reshape(b, h, kkv, dh)
        attn_kv_mask = None if kv_mask is None else kv_mask.view(b, r, 1, kkv).expand(b, r, hr, kkv).reshape(b, h, kkv)
        heavy = heavy_attend(q, k, v, null_k=self.null_k, null_v=self.null_v, kv_mask=attn_kv_mask)
        heavy = self.to_out(heavy.transpose(1, 2).reshape(b, kq, h * dh))  # [b, kq, d]
        if q_scores is not None:
            heavy = heavy * q_scores.unsqueeze(-1).to(heavy.dtype)

        if self.null_q_token is not None:
            # Every position starts at the null token; routed ones swap it for their heavy output.
            null = self.null_q_token.to(out.dtype)
            out = out + null
            heavy = heavy - null.to(heavy.dtype)
        return self.q_router.route_back(out, heavy, q_idx, q_mask)
