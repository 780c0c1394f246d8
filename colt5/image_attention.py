"""Routed attention over image feature maps.

Shapes: b batch, H x W feature map, d model dim, s window side, N = H * W tokens,
B = b * (H / s) * (W / s) windows of s * s tokens, h heads, dh head dim.

Light branch: full attention inside each non-overlapping s x s window of the map (every token).
Heavy branch: CoLT5's routed attention across the whole flattened map (`ConditionalRoutedAttention`
without its 1-d light branch): routed queries attend to routed key-values, scaled by the soft
scores, scattered back; unrouted tokens get the null output token.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from colt5 import validation
from colt5.attention import ConditionalRoutedAttention
from colt5.precision import Linear
from colt5.routers import CoordinateDescentRouter, RouterFactory

__all__ = ["ConditionalRoutedImageAttention", "WindowAttention"]


class WindowAttention(nn.Module):
    """Pre-norm multi-head attention within non-overlapping window_size x window_size windows.

    forward(x [b, H, W, d]) -> [b, H, W, d]; H and W must be multiples of window_size.
    """

    def __init__(self, dim: int, *, window_size: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        for name, value in (("dim", dim), ("window_size", window_size), ("dim_head", dim_head), ("heads", heads)):
            validation.positive_int(name, value)
        self.window_size, self.heads, self.dim_head = window_size, heads, dim_head
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = Linear(dim, 3 * inner, bias=False)
        self.to_out = Linear(inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _, H, W, _ = x.shape
        s = self.window_size
        if H % s or W % s:
            raise ValueError(f"feature map sides must be divisible by the window size {s}, got height {H} and width {W}")
        if H == 0 or W == 0:  # no window (einops cannot split an empty side): empty in, empty out
            return self.to_out(x.new_zeros(*x.shape[:3], self.to_out.in_features))
        windows = rearrange(x, "b (x s1) (y s2) d -> (b x y) (s1 s2) d", s1=s, s2=s)
        q, k, v = self.to_qkv(self.norm(windows)).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "B n (h dh) -> B h n dh", h=self.heads) for t in (q, k, v))
        # 4-d inputs: the flash / memory-efficient SDPA kernels take no extra batch dims.
        out = self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "B h n dh -> B n (h dh)"))
        return rearrange(out, "(b x y) (s1 s2) d -> b (x s1) (y s2) d", x=H // s, y=W // s, s1=s, s2=s)


class ConditionalRoutedImageAttention(nn.Module):
    """CoLT5 routed attention for feature maps: local window attention + routed global attention.

    forward(x, *, num_heavy_tokens_q=None, num_heavy_tokens_kv=None) with x [b, H, W, d]
    (or [b, d, H, W] when channel_first) returns the update, same layout, WITHOUT the residual.

    Args: as `ConditionalRoutedAttention` (num_heavy_tokens_q/kv, num_routed_kv, heavy_*,
    router_*, multiply_*_by_score, use_triton, use_null_q_tokens, use_flash_attn), except
    light_window_size, the side of the square windows of the light branch (H and W must be
    multiples of it; ValueError otherwise), and channel_first; router_class makes the routers
    (as `ConditionalRoutedAttention`'s). An empty map (H or W of 0) gives an empty update.
    Raises TypeError / ValueError naming the argument for a bad x, and for an x on another
    device or of another dtype than the layer (autocast's fp32/fp16/bf16 aside).
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
        light_window_size: int = 8,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        router_straight_through: bool = True,
        router_kwargs: dict[str, Any] | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool | None = None,
        channel_first: bool = False,
        router_class: RouterFactory = CoordinateDescentRouter,
    ):
        super().__init__()
        validation.positive_int("dim", dim)
        self.dim, self.channel_first = dim, channel_first
        self.light_attn = WindowAttention(dim, window_size=light_window_size, dim_head=light_dim_head, heads=light_heads)
        self.heavy_attn = ConditionalRoutedAttention(
            dim,
            num_heavy_tokens_q=num_heavy_tokens_q,
            num_heavy_tokens_kv=num_heavy_tokens_kv,
            num_routed_kv=num_routed_kv,
            has_light_attn=False,
            heavy_dim_head=heavy_dim_head,
            heavy_heads=heavy_heads,
            router_straight_through=router_straight_through,
            router_kwargs=router_kwargs,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            use_triton=use_triton,
            use_null_q_tokens=use_null_q_tokens,
            use_flash_attn=use_flash_attn,
            router_class=router_class,
        )

    @property
    def light_window_size(self) -> int:
        return self.light_attn.window_size

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
    ) -> Tensor:
        validation.feature_map(x, self.dim, self.channel_first)
        validation.matches_module(x, self)
        if self.channel_first:
            x = rearrange(x, "b d h w -> b h w d")
        _, H, W, _ = x.shape
        s = self.light_window_size
        if H % s or W % s:
            raise ValueError(f"x: height {H} and width {W} must be divisible by light_window_size {s}")

        light = self.light_attn(x)
        heavy = self.heavy_attn(
            rearrange(x, "b h w d -> b (h w) d"),
            num_heavy_tokens_q=num_heavy_tokens_q,
            num_heavy_tokens_kv=num_heavy_tokens_kv,
        )
        out = light + rearrange(heavy, "b (h w) d -> b h w d", h=H, w=W).to(light.dtype)
        return rearrange(out, "b h w d -> b d h w") if self.channel_first else out
