"""A vision transformer built from CoLT5's routed layers.

Shapes: b batch, c channels, (H, W) image, (p1, p2) patch, (h, w) = (H / p1, W / p2) patch grid,
d model dim, n = h * w tokens.

Image -> patches -> LayerNorm, Linear, LayerNorm -> + learned positional embedding -> depth x
(x + routed image attention(x), x + routed feedforward(x)) -> LayerNorm -> mean over patches ->
Linear to class logits.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from colt5 import validation
from colt5.block_options import split_block_options
from colt5.feedforward import ConditionalRoutedFeedForward
from colt5.image_attention import ConditionalRoutedImageAttention
from colt5.routers import CoordinateDescentRouter, RouterFactory

__all__ = ["ConditionalRoutedViT"]

# The ViT's argument -> the block option (`colt5.block_options`) it sets.
_BLOCK_OPTION_OF = {
    "attn_num_heavy_tokens_q": "num_heavy_attn_tokens_q",
    "attn_num_heavy_tokens_kv": "num_heavy_attn_tokens_kv",
    "attn_num_routed_kv": "num_routed_kv",
    "attn_heavy_dim_head": "heavy_dim_head",
    "attn_heavy_heads": "heavy_heads",
    "attn_light_dim_head": "light_dim_head",
    "attn_light_heads": "light_heads",
    "attn_light_window_size": "light_window_size",
    "ff_num_heavy_tokens": "num_heavy_ff_tokens",
    "ff_heavy_mult": "heavy_ff_mult",
    "ff_light_mult": "light_ff_mult",
    "router_kwargs": "router_kwargs",
    "use_triton": "use_triton",
    "router_class": "router_class",
}


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    for side in pair:
        validation.positive_int(name, side)
    return pair  # type: ignore[return-value]


class ConditionalRoutedViT(nn.Module):
    """ViT whose blocks are `ConditionalRoutedImageAttention` + `ConditionalRoutedFeedForward`.

    Args:
        image_size, patch_size: int or (height, width); the image must divide into patches.
        num_classes, dim, depth, channels: the usual.
        attn_*: the routed image attention (heavy queries/key-values per image, head sizes and
            counts, light_window_size = side of the light branch's square windows, in patches;
            the patch grid must divide into windows).
        ff_num_heavy_tokens, ff_heavy_mult, ff_light_mult: the routed feedforward.
        attn_num_routed_kv, router_kwargs, use_triton: passed to the routed layers.
        router_class: makes every router (see `ConditionalRoutedFeedForward`).

    forward(img [b, channels, H, W]) -> logits [b, num_classes].
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        attn_num_heavy_tokens_q: int,
        attn_num_heavy_tokens_kv: int,
        attn_heavy_dim_head: int,
        attn_heavy_heads: int,
        attn_light_dim_head: int,
        attn_light_heads: int,
        attn_light_window_size: int,
        ff_num_heavy_tokens: int,
        ff_heavy_mult: float,
        ff_light_mult: float,
        channels: int = 3,
        attn_num_routed_kv: int = 1,
        router_kwargs: dict[str, Any] | None = None,
        use_triton: bool | None = None,
        router_class: RouterFactory = CoordinateDescentRouter,
    ):
        arguments = locals()
        attn_kwargs, ff_kwargs = split_block_options(
            {_BLOCK_OPTION_OF[name]: value for name, value in arguments.items() if name in _BLOCK_OPTION_OF}
        )
        super().__init__()
        (H, W), (p1, p2) = _pair(image_size, "image_size"), _pair(patch_size, "patch_size")
        if H % p1 or W % p2:
            raise ValueError(f"image_size {(H, W)} must be divisible by patch_size {(p1, p2)}")
        for name, value in (("num_classes", num_classes), ("dim", dim), ("depth", depth), ("channels", channels)):
            validation.positive_int(name, value)
        validation.positive_int("attn_light_window_size", attn_light_window_size)
        h, w = H // p1, W // p2
        if h % attn_light_window_size or w % attn_light_window_size:
            raise ValueError(
                f"the patch grid {h} x {w} (image_size / patch_size) must be divisible by "
                f"attn_light_window_size {attn_light_window_size}"
            )
        self.image_size, self.patch_size, self.channels = (H, W), (p1, p2), channels
        patch_dim = channels * p1 * p2

        self.patch_norm = nn.LayerNorm(patch_dim)
        self.to_embedding = nn.Linear(patch_dim, dim)
        self.embedding_norm = nn.LayerNorm(dim)
        self.pos_embedding = nn.Parameter(torch.randn(h, w, dim) * 0.02)

        self.layers = nn.ModuleList()
        for _ in range(depth):
            attn = ConditionalRoutedImageAttention(dim, **attn_kwargs)
            ff = ConditionalRoutedFeedForward(dim, **ff_kwargs)
            self.layers.append(nn.ModuleList([attn, ff]))

        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, img: Tensor) -> Tensor:
        expected = (self.channels, *self.image_size)
        if not isinstance(img, Tensor):
            raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}")
        if img.dim() != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"img must have shape [batch, {', '.join(map(str, expected))}], got {tuple(img.shape)}")
        if not img.is_floating_point():
            raise TypeError(f"img must be floating point, got {img.dtype}")
        validation.matches_module(img, self, "img")

        p1, p2 = self.patch_size
        patches = rearrange(img, "b c (h p1) (w p2) -> b h w (p1 p2 c)", p1=p1, p2=p2)
        x = self.embedding_norm(self.to_embedding(self.patch_norm(patches)))
        x = x + self.pos_embedding.to(x.dtype)
        _, h, w, _ = x.shape
        for attn, ff in self.layers:
            x = x + attn(x)
            tokens = rearrange(x, "b h w d -> b (h w) d")
            x = rearrange(tokens + ff(tokens), "b (h w) d -> b h w d", h=h, w=w)
        pooled = self.norm(x).mean(dim=(1, 2))
        return self.head(pooled)
