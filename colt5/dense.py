"""A plain dense pre-norm transformer: the baseline the routed layers are measured against.

Shapes: b batch, n sequence, d model dim (`dim`), h heads, e head dim (`dim_head`).

Kept deliberately lean: one fused qkv projection, `F.scaled_dot_product_attention` (flash/
memory-efficient eligible under bf16 autocast; `is_causal=True` for the causal case so no n x n
mask is ever built), a GELU feedforward, residuals. No dropout, no biases in the attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from colt5 import validation

__all__ = ["DenseAttention", "DenseFeedForward", "DenseTransformerBlock", "DenseTransformer"]


class DenseAttention(nn.Module):
    """Pre-norm multi-head self-attention; returns the residual update (not x + update)."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, causal: bool = False) -> None:
        super().__init__()
        validation.positive_int("dim", dim)
        self.heads = validation.positive_int("heads", heads)
        validation.positive_int("dim_head", dim_head)
        self.causal = bool(causal)
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b n (t h e) -> t b h n e", t=3, h=self.heads)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            n = x.shape[1]
            # Boolean attn_mask: True = may attend. Every query may always see itself, so a row is
            # never fully masked (that would give NaN); outputs at padded positions are then
            # finite garbage the caller ignores.
            allowed = mask[:, None, None, :] | torch.eye(n, dtype=torch.bool, device=x.device)
            if self.causal:
                allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))


class DenseFeedForward(nn.Module):
    """Pre-norm GELU feedforward with hidden width ff_mult * dim; returns the residual update."""

    def __init__(self, dim: int, *, ff_mult: float = 4) -> None:
        super().__init__()
        hidden = max(1, int(dim * validation.positive_number("ff_mult", ff_mult)))
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DenseTransformerBlock(nn.Module):
    """x + attn(norm x), then + ff(norm x). [b, n, d] -> [b, n, d]; mask [b, n] bool, True = real."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, ff_mult: float = 4, causal: bool = False) -> None:
        super().__init__()
        self.dim = validation.positive_int("dim", dim)
        self.attn = DenseAttention(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.ff = DenseFeedForward(dim, ff_mult=ff_mult)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        validation.layer_input(x, self, mask=mask)
        x = x + self.attn(x, mask)
        return x + self.ff(x)


class DenseTransformer(nn.Module):
    """A stack of `depth` DenseTransformerBlocks. [b, n, d] -> [b, n, d] (no final norm)."""

    def __init__(
        self, dim: int, *, depth: int, heads: int = 8, dim_head: int = 64, ff_mult: float = 4, causal: bool = False
    ) -> None:
        super().__init__()
        self.dim = validation.positive_int("dim", dim)
        validation.positive_int("depth", depth)
        self.causal = bool(causal)
        self.layers = nn.ModuleList(
            DenseTransformerBlock(dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, causal=causal) for _ in range(depth)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        validation.layer_input(x, self, mask=mask)
        for layer in self.layers:
            # Call the sublayers directly: the input was validated once above.
            x = x + layer.attn(x, mask)
            x = x + layer.ff(x)
        return x
