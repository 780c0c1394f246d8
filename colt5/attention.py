"""Attention layers: the heavy-attention core and CoLT5's routed attention.

Shapes: b batch, h heads, i queries, j keys/values, dh head dim, n sequence, d model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["heavy_attend"]


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
