"""CoLT5 encoder block and stack: routed attention then routed feedforward, each with a residual.

Shapes: b batch, n sequence, d model dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from colt5.attention import ConditionalRoutedAttention
from colt5.feedforward import ConditionalRoutedFeedForward
from colt5.routers import check_num_tokens, check_tokens

__all__ = ["ConditionalRoutedTransformerBlock", "ConditionalRoutedTransformer"]


class ConditionalRoutedTransformerBlock(nn.Module):
    """x + attn(x), then x + ff(x); both sublayers pre-norm inside, routed (CoLT5, encoder).

    forward(x [b, n, d], mask=None [b, n] bool, num_heavy_attn_tokens_q=None,
    num_heavy_attn_tokens_kv=None, num_heavy_ff_tokens=None) -> [b, n, d]; the per-call counts
    override the constructor's. Arguments are passed on to `ConditionalRoutedAttention` (light_*,
    heavy_*, num_routed_kv, multiply_*_by_score, use_null_q_tokens, use_flash_attn, rotary_emb)
    and `ConditionalRoutedFeedForward` (light_ff_mult, heavy_ff_mult); router_straight_through,
    router_kwargs and use_triton go to both. Non-causal: the causal variant lives in
    `colt5.autoregressive`. The residual stream keeps x's dtype (fp32 under autocast).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_attn_tokens_q: int,
        num_heavy_attn_tokens_kv: int,
        num_routed_kv: int = 1,
        num_heavy_ff_tokens: int,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
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
        has_light_attn: bool = True,
    ):
        super().__init__()
        check_num_tokens(dim, "dim")
        check_num_tokens(num_heavy_attn_tokens_q, "num_heavy_attn_tokens_q")
        check_num_tokens(num_heavy_attn_tokens_kv, "num_heavy_attn_tokens_kv")
        check_num_tokens(num_heavy_ff_tokens, "num_heavy_ff_tokens")
        self.dim = dim
        self.attn = ConditionalRoutedAttention(
            dim,
            num_heavy_tokens_q=num_heavy_attn_tokens_q,
            num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
            num_routed_kv=num_routed_kv,
            has_light_attn=has_light_attn,
            light_dim_head=light_dim_head,
            light_heads=light_heads,
            light_window_size=light_window_size,
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
        self.ff = ConditionalRoutedFeedForward(
            dim,
            num_heavy_tokens=num_heavy_ff_tokens,
            light_ff_mult=light_ff_mult,
            heavy_ff_mult=heavy_ff_mult,
            router_straight_through=router_straight_through,
            router_kwargs=router_kwargs,
            use_triton=use_triton,
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_heavy_ff_tokens: int | None = None,
    ) -> Tensor:
        check_tokens(x, self.dim, mask)
        for name, value in (
            ("num_heavy_attn_tokens_q", num_heavy_attn_tokens_q),
            ("num_heavy_attn_tokens_kv", num_heavy_attn_tokens_kv),
            ("num_heavy_ff_tokens", num_heavy_ff_tokens),
        ):
            if value is not None:
                check_num_tokens(value, name)
        x = self.attn(x, mask=mask, num_heavy_tokens_q=num_heavy_attn_tokens_q, num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
                      residual=x)
        return self.ff(x, mask=mask, num_heavy_tokens=num_heavy_ff_tokens, residual=x)


class ConditionalRoutedTransformer(nn.Module):
    """`depth` ConditionalRoutedTransformerBlocks and a final LayerNorm.

    ConditionalRoutedTransformer(dim, *, depth, **block_kwargs); forward takes the block's
    arguments (x, mask=None, num_heavy_attn_tokens_q=None, num_heavy_attn_tokens_kv=None,
    num_heavy_ff_tokens=None) and returns norm(x) after the last block.
    """

    def __init__(self, dim: int, *, depth: int, **block_kwargs):
        super().__init__()
        check_num_tokens(depth, "depth")
        check_num_tokens(dim, "dim")
        self.dim = dim
        self.layers = nn.ModuleList([ConditionalRoutedTransformerBlock(dim, **block_kwargs) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_heavy_ff_tokens: int | None = None,
    ) -> Tensor:
        check_tokens(x, self.dim, mask)
        for block in self.layers:
            x = block(
                x,
                mask=mask,
                num_heavy_attn_tokens_q=num_heavy_attn_tokens_q,
                num_heavy_attn_tokens_kv=num_heavy_attn_tokens_kv,
                num_heavy_ff_tokens=num_heavy_ff_tokens,
            )
        return self.norm(x)
