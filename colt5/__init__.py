"""colt5: CoLT5-style conditional computation (routed feedforward and attention) for PyTorch."""

from colt5.kernels import TopkReturn, coor_descent, topk

__all__ = ["coor_descent", "topk", "TopkReturn"]
