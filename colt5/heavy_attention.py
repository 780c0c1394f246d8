"""The heavy branch of every routed attention layer: attention among routed tokens.

Shapes: b batch, n sequence, d model dim, c key/value source dim, h heads, dh head dim,
r key-value routes, g = h / r heads per route, i routed queries, j routed key-values per route.

CoLT5 (Ainslie et al. 2023, section 3.2): routed queries attend to routed key-values plus a
learned null key/value; the key-value router's weights scale the values, the query router's
weights scale the output, which goes back to the queries' positions; positions no query took
get a learned null output. `RoutedAttention` owns all of that. The layers only choose their
routers, where keys/values come from (the same sequence, or a context) and the mask: padding,
causal on original positions, route blocks.

Parameters, one layout for every layer:
  to_q   [h * dh, d]        query projection
  to_kv  [2 * h * dh, c]    rows ordered (route, k|v, head of the route, dh): route g's tokens
                            are projected by its own heads' rows only
  to_out [d, h * dh]
  null_kv [2, h, dh]        the null key and value of each head, N(0, 0.02^2): a null logit near
                            0 and a near-zero value, so at initialisation a query with weak
                            matches attends to almost nothing rather than to noise
  null_q_token [d]          output of positions no query took; zeros, so the heavy branch starts
                            out adding nothing there
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from colt5.decoding import DecodePosition, reuse
from colt5.kernels.flash_attention import attention
from colt5.precision import Linear
from colt5.rotary import RotaryEmbedding
from colt5.routers import RouterReturn, scatter_back, scatter_back_one

__all__ = ["RoutedAttention", "RoutedKVCache", "decode_attention"]


class RoutedKVCache:
    """The routed key-values of a causal RoutedAttention while decoding, J slots per route in
    window order (Ckv per routing window) plus one slot J that unrouted tokens write to:
    kv [b, r, J + 1, 2, g, dh] (keys rotated and scaled as the forward's), weight [b, r, J + 1]
    (the router's, which scales the values), mask [b, r, J + 1] (True = a routed token)."""

    def __init__(self, position: DecodePosition) -> None:
        self.position = position
        self.kv: Tensor | None = None
        self.weight: Tensor | None = None
        self.mask: Tensor | None = None


def decode_attention(q: Tensor, kv: Tensor, null_kv: Tensor, kv_scale: Tensor, visible: Tensor) -> Tensor:
    """One query per row against cached key-values: q [b, 1, h, dh], kv [b, r, J, 2, g, dh],
    null_kv [2, h, dh], kv_scale [b, r, J] (multiplies v), visible [b, r, J] bool -> [b, 1, h, dh]
    in q's dtype. `colt5.kernels.attention_reference` for i = 1 with the visibility given,
    computed in fp32 (fp64 for fp64), for finite inputs; the null key is always visible."""
    with torch.autocast(q.device.type, enabled=False):
        return _decode_attention(q, kv, null_kv, kv_scale, visible)


def _decode_attention(q: Tensor, kv: Tensor, null_kv: Tensor, kv_scale: Tensor, visible: Tensor) -> Tensor:
    b, _, h, dh = q.shape
    r, g = kv.shape[1], kv.shape[4]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = dh**-0.5
    qh = q.to(acc).reshape(b, r, g, 1, dh)
    k = kv[:, :, :, 0].to(acc).transpose(2, 3)  # [b, r, g, J, dh]
    v = kv[:, :, :, 1].to(acc).transpose(2, 3) * kv_scale.to(acc)[:, :, None, :, None]
    sim = torch.matmul(qh, k.transpose(-1, -2)).squeeze(-2) * scale  # [b, r, g, J]
    sim = sim.masked_fill(~visible[:, :, None, :], float("-inf"))
    null_k, null_v = null_kv.to(acc).view(2, r, g, dh).unbind(0)
    null_sim = (qh.squeeze(-2) * null_k).sum(-1) * scale  # [b, r, g]
    shift = torch.maximum(sim.amax(-1), null_sim)
    p, p0 = torch.exp(sim - shift[..., None]), torch.exp(null_sim - shift)
    num = torch.matmul(p.unsqueeze(-2), v).squeeze(-2) + p0[..., None] * null_v  # [b, r, g, dh]
    out = num / (p.sum(-1) + p0)[..., None]
    return out.reshape(b, 1, h, dh).to(q.dtype)


class RoutedAttention(nn.Module):
    """Heavy attention between routed queries and routed key-values, with the scatter back.

    forward(base [b, n, d], q: RouterReturn over x, kv: RouterReturn with the route dim kept
    (tokens [b, r, j, c]), *, causal=False, window_slots=None, kv_span=None, light=None) -> base
    (+ light, the light branch's output) with the heavy output added at the routed queries'
    positions and the null output (if any) everywhere else.

    causal: key j is visible to query i only if its original position is <= the query's (the
    routers' indices are the positions). window_slots=(Cq, Ckv): the causal routers' slots come
    in window order, Cq query and Ckv key slots per window (lets the kernel skip key blocks).
    kv_span=K (with window_slots): each query window sees only the K most recent key slots up
    to its own window's last (`colt5.kernels.flash_attention.attention`'s kv_span).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        num_routes: int = 1,
        dim_context: int | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_null_q_tokens: bool = True,
        rotary_emb: bool = False,
    ) -> None:
        super().__init__()
        if heads % num_routes:
            raise ValueError(f"heads ({heads}) must be divisible by the number of key-value routes ({num_routes})")
        if rotary_emb and dim_head % 2:
            raise ValueError(f"rotary_emb needs an even heavy_dim_head, got {dim_head}")
        dim_context = dim if dim_context is None else dim_context
        self.heads, self.dim_head, self.num_routes = heads, dim_head, num_routes
        self.multiply_keys_by_score = multiply_keys_by_score
        self.multiply_queries_by_score = multiply_queries_by_score
        inner = heads * dim_head
        self.to_q = Linear(dim, inner, bias=False)
        self.to_kv = Linear(dim_context, 2 * inner, bias=False)
        self.to_out = Linear(inner, dim, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, dim_head) * 0.02)
        self.null_q_token = nn.Parameter(torch.zeros(dim)) if use_null_q_tokens else None
        self.rotary = RotaryEmbedding(dim_head) if rotary_emb else None

    def project_kv(self, tokens: Tensor) -> Tensor:
        """[b, r, j, c] -> kv [b, r, j, 2, g, dh], each route by its own heads' rows."""
        b, r, j, c = tokens.shape
        g, dh = self.heads // r, self.dim_head
        if r == 1:  # a plain matmul: its weight gradient has the weight's layout (DDP buckets)
            return self.to_kv(tokens).view(b, 1, j, 2, g, dh)
        weight = self.to_kv.weight.view(r, 2 * g * dh, c)
        if torch.is_autocast_enabled(tokens.device.type):
            weight = weight.to(torch.get_autocast_dtype(tokens.device.type))
        kv = torch.matmul(tokens.to(weight.dtype), weight.transpose(1, 2))  # [b, r, j, 2 g dh]
        return kv.view(b, r, j, 2, g, dh)

    def forward(
        self,
        base: Tensor,
        q: RouterReturn,
        kv: RouterReturn,
        *,
        causal: bool = False,
        window_slots: tuple[int, int] | None = None,
        kv_span: int | None = None,
        light: Tensor | None = None,
        fill: tuple[RoutedKVCache, int] | None = None,
    ) -> Tensor:
        """The heavy branch scattered onto base (+ light). fill = (cache, slots): a causal prefill
        also keeps its routed key-values in the cache, `slots` per route."""
        b, n, _ = base.shape
        h, dh, r = self.heads, self.dim_head, self.num_routes
        q_tokens, kv_tokens = q.routed_tokens, kv.routed_tokens
        i = q_tokens.shape[1]
        if kv_tokens.shape[1] != r:
            raise ValueError(f"kv must keep its route dim: tokens [b, {r}, j, c], got {tuple(kv_tokens.shape)}")

        q_pos = kv_pos = None
        if causal or self.rotary is not None:
            q_pos = torch.arange(n, device=base.device).expand(b, n) if q.indices is None else q.indices
            kv_pos = torch.arange(n, device=base.device).expand(b, r, n) if kv.indices is None else kv.indices
        qh = self._queries(q_tokens, q.scores, q_pos)
        kvh = self._keys_values(kv_tokens, kv.scores, kv_pos)
        if fill is not None:
            self._fill_cache(*fill, kv, kvh)
        out = attention(
            qh, kvh,
            null_kv=self.null_kv,
            kv_scale=kv.scores,
            kv_mask=kv.routed_mask,
            q_pos=q_pos if causal else None,
            kv_pos=kv_pos if causal else None,
            q_window_slots=window_slots[0] if window_slots else None,
            kv_window_slots=window_slots[1] if window_slots else None,
            kv_span=kv_span,
        )
        heavy = self.to_out(out.reshape(b, i, h * dh))  # [b, i, d]
        return scatter_back(base, heavy, q.indices, light=light, weights=q.scores, real=q.routed_mask, null=self.null_q_token)

    def _queries(self, tokens: Tensor, scores: Tensor | None, positions: Tensor | None) -> Tensor:
        """Routed tokens [b, i, d] -> queries [b, i, h, dh]: scaled by the router's weights if
        multiply_queries_by_score, rotated at their positions [b, i] with rotary_emb."""
        b, i, _ = tokens.shape
        qh = self.to_q(tokens).view(b, i, self.heads, self.dim_head)
        if self.multiply_queries_by_score and scores is not None:
            qh = qh * scores.view(b, i, 1, 1).to(qh.dtype)
        if self.rotary is not None:
            qh = self.rotary.rotate(qh, positions)
        return qh

    def _keys_values(self, tokens: Tensor, scores: Tensor | None, positions: Tensor | None) -> Tensor:
        """Routed tokens [b, r, j, c] -> kv [b, r, j, 2, g, dh]: keys scaled by the router's
        weights if multiply_keys_by_score, rotated at their positions [b, r, j] with rotary_emb
        (values untouched)."""
        b, r, j, _ = tokens.shape
        kvh = self.project_kv(tokens)
        if self.multiply_keys_by_score and scores is not None:
            scale_k = torch.stack((scores, torch.ones_like(scores)), dim=-1)  # k only
            kvh = kvh * scale_k.view(b, r, j, 2, 1, 1).to(kvh.dtype)
        if self.rotary is not None:
            g = self.heads // r  # the g key heads of each slot turned, its g value heads copied
            kvh = self.rotary.rotate(kvh.view(b, r, j, 2 * g, self.dim_head), positions, rotated=g).view(kvh.shape)
        return kvh

    # ---- cached decoding -------------------------------------------------------------------
    def _fill_cache(self, cache: RoutedKVCache, slots: int, kv: RouterReturn, kvh: Tensor) -> None:
        """Keep a prefill's routed key-values kvh (`forward`'s, from kv: the causal key-value
        router's return, route dim kept, indices in window order) in a cache of `slots` slots
        per route."""
        b, r, j = kvh.shape[:3]
        if j > slots:
            raise ValueError(f"the prefill routed {j} key-value slots per route, more than the cache's {slots}")
        g = self.heads // r
        cache.kv = reuse(cache.kv, (b, r, slots + 1, 2, g, self.dim_head), kvh.dtype, kvh.device, 0.0)
        cache.weight = reuse(cache.weight, (b, r, slots + 1), kv.scores.dtype, kvh.device, 0.0)
        cache.mask = reuse(cache.mask, (b, r, slots + 1), torch.bool, kvh.device, False)
        cache.kv[:, :, :j].copy_(kvh)
        cache.weight[:, :, :j].copy_(kv.scores)
        cache.mask[:, :, :j].copy_(kv.routed_mask)

    def decode(
        self,
        base: Tensor,
        x: Tensor,
        q: tuple[Tensor, Tensor],
        kv: tuple[Tensor, Tensor, Tensor],
        cache: RoutedKVCache,
        *,
        window: Tensor,
        window_slots: tuple[int, int],
        kv_span: int | None = None,
        light: Tensor | None = None,
    ) -> Tensor:
        """One token of the causal heavy branch: x [b, 1, d] (normalised) at position
        cache.position.length in routing window `window` (0-d int64 tensor); q = (routed [b, 1],
        weight [b, 1]) and kv = (routed [b, r], slot within the window [b, r], weight [b, r])
        from the routers' `decode`. Stores the token's key-values at its slots, attends to the
        visible ones (`forward`'s causal rule with window slots and kv_span) and returns
        base + light + the heavy output (or the null output), as `forward` at that position."""
        b = x.shape[0]
        h, dh, r = self.heads, self.dim_head, self.num_routes
        cq, ckv = window_slots
        pos = cache.position.tensor.view(1, 1)
        q_routed, q_weight = q
        kv_routed, kv_slot, kv_weight = kv
        trash = cache.mask.shape[2] - 1  # the slot unrouted tokens write to, never visible
        slot = torch.where(kv_routed, window * ckv + kv_slot, trash)  # [b, r]
        kvh = self._keys_values(x.unsqueeze(1).expand(b, r, 1, x.shape[-1]), kv_weight[..., None], pos.expand(b, r, 1))
        rows, routes = torch.arange(b, device=x.device)[:, None], torch.arange(r, device=x.device)[None, :]
        cache.kv.index_put_((rows, routes, slot), kvh[:, :, 0].to(cache.kv.dtype))
        cache.weight.index_put_((rows, routes, slot), kv_weight.to(cache.weight.dtype))
        cache.mask.index_put_((rows, routes, slot), kv_routed)
        visible = cache.mask
        if kv_span is not None:  # the kv_span most recent slots up to the end of this window
            first = (window + 1) * ckv - kv_span
            visible = visible & (torch.arange(trash + 1, device=x.device) >= first)
        qh = self._queries(x, q_weight, pos.expand(b, 1))
        out = decode_attention(qh, cache.kv, self.null_kv, cache.weight, visible)
        heavy = self.to_out(out.reshape(b, 1, h * dh))
        return scatter_back_one(base, heavy, q_routed, q_weight, light=light, null=self.null_q_token)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, num_routes={self.num_routes}"
