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
from colt5.decoding import DecodePosition, LayersCache, reuse, without_grad_when_decoding
from colt5.rotary import RotaryEmbedding, apply_rotary

__all__ = ["DenseAttention", "DenseFeedForward", "DenseTransformerBlock", "DenseTransformer", "DenseCache"]


class DenseAttentionCache:
    """A causal DenseAttention's keys and values while decoding: k, v [b, h, L, e] (position p
    at index p; L the capacity)."""

    def __init__(self, position: DecodePosition) -> None:
        self.position = position
        self.k: Tensor | None = None
        self.v: Tensor | None = None


class DenseCache(LayersCache):
    """A causal DenseTransformer's decode state (`DenseTransformer.new_cache`): a key/value
    cache per layer and the position they share; no routing windows, so every step runs the
    same ops."""


class DenseAttention(nn.Module):
    """Pre-norm multi-head self-attention; returns the residual update (not x + update).
    rotary_emb: queries and keys rotated by their positions (Su et al. 2021)."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, causal: bool = False,
                 rotary_emb: bool = False) -> None:
        super().__init__()
        validation.positive_int("dim", dim)
        self.heads = validation.positive_int("heads", heads)
        validation.positive_int("dim_head", dim_head)
        self.causal = bool(causal)
        self.rotary = RotaryEmbedding(dim_head) if rotary_emb else None
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    @without_grad_when_decoding
    def forward(self, x: Tensor, mask: Tensor | None = None, *, cache: DenseAttentionCache | None = None) -> Tensor:
        """cache (causal only, no mask): at length 0 the usual forward over a prompt that also
        keeps its keys/values; after that x [b, 1, d] attends to the cached positions and itself."""
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b n (t h e) -> t b h n e", t=3, h=self.heads)
        if self.rotary is not None:  # the PyTorch form: with the rotary kernel this model trained slower at 4,096
            stepping = cache is not None and cache.position.length > 0
            positions = cache.position.tensor.view(1) if stepping else torch.arange(x.shape[1], device=x.device)
            freqs = self.rotary(positions)
            q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        if cache is not None:
            return self.to_out(rearrange(self._cached(q, k, v, cache, mask), "b h n e -> b n (h e)"))
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

    def _cached(self, q: Tensor, k: Tensor, v: Tensor, cache: DenseAttentionCache, mask: Tensor | None) -> Tensor:
        if not self.causal or mask is not None:
            raise ValueError("decoding with a cache needs a causal DenseAttention and mask=None")
        position = cache.position
        if position.length == 0:  # the prefill
            b, h, n, e = k.shape
            shape = (b, h, position.capacity, e)
            cache.k = reuse(cache.k, shape, k.dtype, k.device, 0.0)
            cache.v = reuse(cache.v, shape, v.dtype, v.device, 0.0)
            cache.k[:, :, :n].copy_(k)
            cache.v[:, :, :n].copy_(v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        pos = position.tensor.view(1)
        cache.k.index_copy_(2, pos, k.to(cache.k.dtype))
        cache.v.index_copy_(2, pos, v.to(cache.v.dtype))
        visible = (torch.arange(position.capacity, device=q.device) <= pos).view(1, -1)  # [1, L]: static, graph-capturable
        return F.scaled_dot_product_attention(q, cache.k.to(q.dtype), cache.v.to(q.dtype), attn_mask=visible)


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

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, ff_mult: float = 4, causal: bool = False,
                 rotary_emb: bool = False) -> None:
        super().__init__()
        self.dim = validation.positive_int("dim", dim)
        self.attn = DenseAttention(dim, heads=heads, dim_head=dim_head, causal=causal, rotary_emb=rotary_emb)
        self.ff = DenseFeedForward(dim, ff_mult=ff_mult)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        validation.layer_input(x, self, mask=mask)
        x = x + self.attn(x, mask)
        return x + self.ff(x)


class DenseTransformer(nn.Module):
    """A stack of `depth` DenseTransformerBlocks. [b, n, d] -> [b, n, d] (no final norm)."""

    def __init__(
        self, dim: int, *, depth: int, heads: int = 8, dim_head: int = 64, ff_mult: float = 4, causal: bool = False,
        rotary_emb: bool = False,
    ) -> None:
        super().__init__()
        self.dim = validation.positive_int("dim", dim)
        validation.positive_int("depth", depth)
        self.causal = bool(causal)
        self.layers = nn.ModuleList(
            DenseTransformerBlock(dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, causal=causal, rotary_emb=rotary_emb)
            for _ in range(depth)
        )

    def new_cache(self, capacity: int) -> DenseCache:
        """An empty decode cache for contexts of up to `capacity` tokens (causal stacks only)."""
        validation.positive_int("capacity", capacity)
        if not self.causal:
            raise ValueError("only a causal DenseTransformer decodes incrementally")
        position = DecodePosition(capacity, self.layers[0].attn.to_qkv.weight.device)
        return DenseCache(position, [DenseAttentionCache(position) for _ in self.layers])

    @without_grad_when_decoding
    def forward(self, x: Tensor, mask: Tensor | None = None, *, cache: DenseCache | None = None) -> Tensor:
        """cache (from `new_cache`): empty, x is a prompt (the prefill: the usual output); after
        that x [b, 1, d] is the next token, computed from the cache. Advances it."""
        validation.layer_input(x, self, mask=mask)
        if cache is None:
            for layer in self.layers:
                # Call the sublayers directly: the input was validated once above.
                x = x + layer.attn(x, mask)
                x = x + layer.ff(x)
            return x
        if not isinstance(cache, DenseCache) or len(cache.layers) != len(self.layers):
            raise TypeError(f"cache must be a DenseCache from this stack's new_cache, got {type(cache).__name__}")
        cache.position.check(x)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = x + layer.attn(x, mask, cache=layer_cache)
            x = x + layer.ff(x)
        cache.position.advance(x)
        return x
