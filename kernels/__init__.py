"""colt5.kernels: the numerical core (no nn.Module here). Imports nothing from colt5's modules.

One file per op, each with its Triton kernels, launchers, torch.library registration and public
function, beside its PyTorch reference:
  soft_topk.py (+ _kernels.py)            soft top-k by coordinate descent, and its dual offset
  hard_topk.py                             top-k whose values carry the soft top-k gradient
  select.py                                radix select of the top-k positions
  routing.py                               a router's selection: soft top-k + pick + weights
  route_causal.py                          the causal routers' windowed selection
  flash_attention.py (+ _reference.py)     flash attention for the light and heavy branches
  norm.py                                  LayerNorm + routing scores
  scatter.py                               heavy rows back at their positions, with residual
  rotary.py                                rotary embeddings: every head of a row turned in one pass
"""

from .flash_attention import attention, local_attention_packed
from .flash_attention_reference import attention_reference, local_attention_reference
from .norm import norm_score
from .reference import coor_descent_offset_reference, coor_descent_reference
from .route_causal import route_causal, route_causal_reference
from .routing import RoutePicks, route_top_k
from .scatter import scatter_back_reference
from .select import top_k_indices
from .soft_topk import coor_descent, coor_descent_offset, triton_coor_descent
from .hard_topk import TopkReturn, topk

__all__ = [
    "RoutePicks",
    "TopkReturn",
    "attention",
    "attention_reference",
    "coor_descent",
    "coor_descent_offset",
    "coor_descent_offset_reference",
    "coor_descent_reference",
    "local_attention_packed",
    "local_attention_reference",
    "norm_score",
    "route_causal",
    "route_causal_reference",
    "route_top_k",
    "scatter_back_reference",
    "top_k_indices",
    "topk",
    "triton_coor_descent",
]
