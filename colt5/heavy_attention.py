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

from colt5.kernels.flash_attention import attention
from colt5.precision import Linear
from colt5.rotary import RotaryEmbedding, apply_rotary
from colt5.routers import RouterReturn, scatter_back

__all__ = ["RoutedAttention"]


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
    ) -> Tensor:
        b, n, _ = base.shape
        h, dh, r = self.heads, self.dim_head, self.num_routes
        q_tokens, kv_tokens = q.routed_tokens, kv.routed_tokens
        i, j = q_tokens.shape[1], kv_tokens.shape[2]
        if kv_tokens.shape[1] != r:
            raise ValueError(f"kv must keep its route dim: tokens [b, {r}, j, c], got {tuple(kv_tokens.shape)}")

        qh = self.to_q(q_tokens).view(b, i, h, dh)
        kvh = self.project_kv(kv_tokens)
        if self.multiply_queries_by_score and q.scores is not None:
            qh = qh * q.scores.view(b, i, 1, 1).to(qh.dtype)
        if self.multiply_keys_by_score and kv.scores is not None:
            scale_k = torch.stack((kv.scores, torch.ones_like(kv.scores)), dim=-1)  # k only
            kvh = kvh * scale_k.view(b, r, j, 2, 1, 1).to(kvh.dtype)
        q_pos = kv_pos = None
        if causal or self.rotary is not None:
            q_pos = torch.arange(n, device=base.device).expand(b, n) if q.indices is None else q.indices
            kv_pos = torch.arange(n, device=base.device).expand(b, r, n) if kv.indices is None else kv.indices
        if self.rotary is not None:
            qh, kvh = self._rotate(qh, kvh, q_pos, kv_pos)
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

    def _rotate(self, qh: Tensor, kvh: Tensor, q_pos: Tensor, kv_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys rotated at their original positions (values untouched)."""
        qh = apply_rotary(qh.transpose(1, 2), self.rotary(q_pos)).transpose(1, 2)  # via [b, h, i, dh]
        k, v = kvh.unbind(3)  # [b, r, j, g, dh]
        k = apply_rotary(k.transpose(2, 3), self.rotary(kv_pos).unsqueeze(2)).transpose(2, 3)
        return qh, torch.stack((k, v), dim=3)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, num_routes={self.num_routes}"
