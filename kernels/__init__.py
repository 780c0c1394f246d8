"""colt5.kernels: the numerical core (no nn.Module here). Imports nothing from colt5's modules."""

from .soft_topk import coor_descent, coor_descent_offset, triton_coor_descent
from .reference import coor_descent_offset_reference, coor_descent_reference
from .select import top_k_indices
from .topk import TopkReturn, topk

__all__ = [
    "coor_descent",
    "coor_descent_offset",
    "coor_descent_offset_reference",
    "coor_descent_reference",
    "triton_coor_descent",
    "topk",
    "top_k_indices",
    "TopkReturn",
]
