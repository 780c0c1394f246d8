"""CoLT5 encoder block and stack: routed attention then routed feedforward, each with a residual.

Shapes: b batch, n sequence, d model dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from colt5 import validation
from colt5.attention import ConditionalRoutedAttention
from colt5.block_options import block_options, split_block_options
from colt5.feedforward import ConditionalRoutedFeedForward
from colt5.routers import CoordinateDescentRouter, RouterFactory

__all__ = ["ConditionalRoutedTransformerBlock", "ConditionalRoutedTransformer"]


class ConditionalRoutedTransformerBlock(nn.Module):
    """x + attn(x), then x + ff(x); both sublayers pre-norm inside, routed (CoLT5, encoder).

    forward(x [b, n, d], mask=None [b, n] bool, num_heavy_attn_tokens_q=None,
    num_heavy_attn_tokens_kv=None, num_heavy_ff_tokens=None) -> [b, n, d]; the per-call counts
    override the constructor's. Arguments are passed on to `ConditionalRoutedAttention` (light_*,
    heavy_*, num_routed_kv, multiply_*_by_score, use_null_q_tokens, use_flash_attn, rotary_emb)
    and `ConditionalRoutedFeedForward` (light_ff_mult, heavy_ff_mult); router_straight_through,
    router_kwargs, use_triton and router_class (what makes every router of the block) go to
    both: `colt5.block_options` defines where each option goes. Non-causal: the causal variant
    lives in `colt5.autoregressive`. The residual stream keeps x's dtype (fp32 under autocast).
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
        router_class: RouterFactory = CoordinateDescentRouter,
    ):
        attn_kwargs, ff_kwargs = split_block_options(block_options(locals()))
        super().__init__()
        validation.positive_int("dim", dim)
        validation.positive_int("num_heavy_attn_tokens_q", num_heavy_attn_tokens_q)
        validation.positive_int("num_heavy_attn_tokens_kv", num_heavy_attn_tokens_kv)
        validation.positive_int("num_heavy_ff_tokens", num_heavy_ff_tokens)
        self.dim = dim
        self.attn = ConditionalRoutedAttention(dim, **attn_kwargs)
        self.ff = ConditionalRoutedFeedForward(dim, **ff_kwargs)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_heavy_ff_tokens: int | None = None,
    ) -> Tensor:
        validation.layer_input(x, self, mask=mask)
        for name, value in (
            ("num_heavy_attn_tokens_q", num_heavy_attn_tokens_q),
            ("num_heavy_attn_tokens_kv", num_heavy_attn_tokens_kv),
            ("num_heavy_ff_tokens", num_heavy_ff_tokens),
        ):
            if value is not None:
                validation.positive_int(name, value)
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
        validation.positive_int("depth", depth)
        validation.positive_int("dim", dim)
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
        validation.layer_input(x, self, mask=mask)
        for block in self.layers:
            x = block(
                x,
                mask=mask,
                num_heavy_attn_tokens_q=num_heavy_attn_tokens_q,
                num_heavy_attn_tokens_kv=num_heavy_attn_tokens_kv,
                num_heavy_ff_tokens=num_heavy_ff_tokens,
            )
        return self.norm(x)
