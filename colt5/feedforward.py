"""Feedforward layers: a plain GELU MLP and CoLT5's routed feedforward.

Shapes: b batch, n sequence, d model dim, k routed tokens.

CoLT5 (Ainslie et al. 2023, section 3.1): y_i = x_i + FF_light(x_i) + s_i * FF_heavy(x_i), where
FF_light (hidden d/2) runs on every token and FF_heavy (hidden 4d) only on the k tokens the router
picks, s_i being the router's soft top-k weight (0 for unrouted tokens).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FeedForward"]


def _hidden_dim(dim: int, mult: float, name: str = "mult") -> int:
    if not mult > 0:
        raise ValueError(f"{name} must be > 0, got {mult}")
    return max(1, int(dim * mult))


class FeedForward(nn.Module):
    """Linear(d, d*mult) -> GELU -> Linear(d*mult, d). No norm inside: callers pre-normalise.

    Works on any [..., d] input.
    """

    def __init__(self, dim: int, mult: float = 4):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        hidden = _hidden_dim(dim, mult)
        self.dim, self.mult = dim, mult
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
