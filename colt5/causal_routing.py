"""Strictly causal routing: which tokens take the heavy branch, decided from the past only.

Shapes: b batch, n sequence, d model dim, r routes, W routing window, w = ceil(n / W) windows,
C capacity (routed tokens) per window, k = w * C routed slots per route.

The scheme ("causal windowed routing")
--------------------------------------
A top-k over a window that contains later tokens leaks the future: whether token i is picked
depends on the tokens after it. So the sequence is cut into routing windows of W tokens, each
with C slots, and the decision for token i in window w uses only token i's own score and the
scores of strictly earlier tokens:

1. Threshold from the previous window. Coordinate-descent soft top-k (the CoLT5 router, with
   k' = C * fetch_k_ratio) runs on the scores of window w - 1 alone; its dual variable a_{w-1} is
   the offset that makes y_j = exp(min(s_j + a_{w-1}, 0) / eps) sum to k' over that window.
2. Weights from that threshold. Each token i of window w gets y_i = exp(min(s_i + a_{w-1}, 0) / eps):
   a function of s_i and of the past only. It is differentiable, so gradients reach the router
   through s_i and, through a_{w-1}, through the previous window's scores.
3. Capacity in position order. Token i is a candidate when y_i > 1/2; the candidates of a window
   take its C slots first come, first served, so whether i gets a slot depends on the candidates
   at positions <= i only. Unused slots are masked.
4. The first window has no past: its first C tokens take its C slots (weight 1, no router
   gradient). A sequence of n <= C tokens is therefore routed entirely.

Why this one: it keeps CoLT5's router (score x.u, soft top-k by coordinate descent) and its
gradient; every shape is static (w * C slots per route, whatever the scores), there is no host
sync and no data-dependent indexing, and the work is one coordinate descent over [b, r, w-1, W]
plus a cumsum and a top-k of C over each window (`colt5.kernels.route_causal` fuses all of it
into one Triton kernel per direction). The threshold of the previous window is the
natural estimate of this window's C-th best score when the score distribution drifts slowly.
Even for i.i.d. scores the number of candidates in a window varies, so asking for exactly C
leaves slots empty; the router asks for k' = 1.5 C candidates by default (fetch_k_ratio), which
keeps most slots full at the price that late candidates of an over-subscribed window lose their
slot to earlier, possibly lower-scored, ones. Mixture-of-Depths (Raposo et al. 2024)
instead trains an auxiliary predictor of top-k membership for sampling, which is causal only
at inference; this scheme is causal in training and inference alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from colt5 import validation
from colt5.decoding import DecodePosition, reuse
from colt5.kernels.route_causal import assign_slots, pad_windows, route_causal, soft_top_k_offset, window_weights
from colt5.routers import CoordinateDescentRouter, RouterReturn, gather_tokens

__all__ = ["CausalCoordinateDescentRouter", "RouterCache", "soft_top_k_offset"]


class RouterCache:
    """A causal router's state between decode steps, after the token at position length - 1
    (`CausalCoordinateDescentRouter.fill_cache` / `.decode`), per row and route:

        scores [b, r, W]  the scores of that token's window so far (the whole window once it is
                          complete: the next step computes its dual from them)
        offset [b, r, 1]  the dual a_{w-1} that sets the window's threshold (0 in window 0)
        count  [b, r]     the window's candidates so far (the next one takes slot `count`)
    """

    def __init__(self, position: DecodePosition) -> None:
        self.position = position
        self.capacity: int | None = None  # C, per window
        self.eps: float | None = None  # e_T of the duals
        self.scores: Tensor | None = None
        self.offset: Tensor | None = None
        self.count: Tensor | None = None


class CausalCoordinateDescentRouter(CoordinateDescentRouter):
    """CoLT5's router made strictly causal by routing in windows (see the module docstring).

    Scores are CoordinateDescentRouter's (x . u per route, or cosine); only the selection differs.
    forward(x [b, n, d], *, num_tokens=C, ...) returns a RouterReturn with k = ceil(n / W) * C
    slots per route, in window order and position order within a window:

        indices [b, (r,) k] long  original positions (unused slots point at some position)
        scores  [b, (r,) k]       y at the slot (1 in the forward with straight_through)
        routed_tokens [b, (r,) k, d]
        routed_mask   [b, (r,) k] bool, False = unused slot (never None)

    The output for position i depends on x[:, :i + 1] only, whatever the rest of the sequence.

    Args:
        dim: model width d.
        window_size: routing window W (>= 1); num_tokens (the capacity C per window) must be <= W.
        fetch_k_ratio: candidates asked of each window's threshold, as a multiple of C (default 1.5;
            see the measurements in __init__).
        Everything else as CoordinateDescentRouter (route_block_size is not supported: windows
        play its part; use_triton picks the backend of the selection, `colt5.kernels.route_causal`:
        one fused Triton kernel forward and one backward, or the PyTorch reference).
    """

    def __init__(self, dim: int, *, window_size: int, fetch_k_ratio: float = 1.5, **kwargs) -> None:
        if kwargs.get("route_block_size") is not None:
            raise ValueError("route_block_size is not supported by the causal router: window_size plays its part")
        # fetch_k_ratio trades slot use against pick quality. Measured on i.i.d. scores, W=128,
        # C=8: slots used 78% / 91% / 99% at ratio 9/8 / 1.5 / 2; mean within-window percentile
        # of the picks 0.963 / 0.955 / 0.942 (an oracle top-C: 0.972).
        super().__init__(dim, fetch_k_ratio=fetch_k_ratio, **kwargs)
        validation.positive_int("window_size", window_size)
        self.window_size = window_size

    def forward(
        self,
        x: Tensor,
        *,
        num_tokens: int,
        mask: Tensor | None = None,
        random_route: bool = False,
        routing_tokens: Tensor | None = None,
        keep_one_route_dim: bool = False,
        scores: Tensor | None = None,
    ) -> RouterReturn:
        """scores: this router's scores of x [b, r, n] if already computed (`norm_and_scores`)."""
        validation.tokens(x, self.dim, mask=mask)
        validation.positive_int("num_tokens", num_tokens)
        W = self.window_size
        if num_tokens > W:
            raise ValueError(f"num_tokens (capacity per routing window) must be <= window_size={W}, got {num_tokens}")
        b, n, d = x.shape
        r, C = self.num_routing_tokens, num_tokens
        if n == 0:  # no window, no slot: empty in, empty out
            indices = torch.zeros(b, r, 0, dtype=torch.long, device=x.device)
            weights = x.new_zeros(b, r, 0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            return self._slots(x, indices, weights, indices.bool(), keep_one_route_dim)

        scores = self._checked_score(x, routing_tokens) if scores is None else scores  # [b, r, n]
        if random_route or type(self)._window_weights is not CausalCoordinateDescentRouter._window_weights:
            indices, weights, slot_mask = self._select_in_torch(scores, mask, C, random_route)
        else:
            # One fused op (one kernel forward, one backward on CUDA) instead of ~40 small ones.
            indices, weights, slot_mask = route_causal(
                scores, window_size=W, capacity=C, k=self._window_k(C), n_iters=self.n_iters, eps=self.eps,
                eps_init=self.eps_init, eps_decay=self.eps_decay, mask=mask,
                straight_through=self.straight_through, backend=self.backend,
            )

        return self._slots(x, indices, weights, slot_mask, keep_one_route_dim)

    def _slots(self, x: Tensor, indices: Tensor, weights: Tensor, slot_mask: Tensor, keep_one_route_dim: bool) -> RouterReturn:
        routed_tokens = gather_tokens(x, indices)  # [b, r, k, d]
        if self.num_routing_tokens == 1 and not keep_one_route_dim:
            return RouterReturn(indices[:, 0], weights[:, 0], routed_tokens[:, 0], slot_mask[:, 0])
        return RouterReturn(indices, weights, routed_tokens, slot_mask)

    def _stat_rows(self, scores: Tensor, mask: Tensor | None, num_tokens: int) -> tuple[Tensor, Tensor, float, int]:
        """`routing_stats`' rows: the routing windows, each with its own soft top-k (k' per window)."""
        s, real = pad_windows(scores, mask, self.window_size)
        return s, real, self._window_k(num_tokens), num_tokens

    def _window_k(self, C: int) -> float:
        """The soft top-k target of each window: k' = C * fetch_k_ratio candidates, at most W."""
        return min(C * self.fetch_k_ratio, float(self.window_size))

    def _select_in_torch(
        self, scores: Tensor, mask: Tensor | None, C: int, random_route: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The selection in torch ops: random routes, and subclasses that override _window_weights."""
        b, r, n = scores.shape
        W = self.window_size
        s, real = pad_windows(scores, mask, W)
        if random_route:
            # Causal too: each token's coin is its own.
            nw = s.shape[2]
            candidate = torch.rand(b, r, nw, W, device=s.device) < min(1.0, C * self.fetch_k_ratio / W)
            y = torch.ones(b, r, nw, W, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32,
                           device=s.device)
        else:
            y, candidate = self._window_weights(s, real, C)
        return assign_slots(y, candidate, real, C, n, self.straight_through)

    # ---- cached decoding -------------------------------------------------------------------
    def _window_dual(self, s: Tensor, C: int) -> tuple[Tensor, float]:
        """The dual of complete windows s [b, r, W] as the forward computes it (all real)."""
        return soft_top_k_offset(
            s, k=self._window_k(C), n_iters=self.n_iters, eps=self.eps, eps_init=self.eps_init,
            eps_decay=self.eps_decay, mask=torch.ones_like(s, dtype=torch.bool), backend=self.backend,
        )

    def _check_decodable(self) -> None:
        if type(self)._window_weights is not CausalCoordinateDescentRouter._window_weights:
            raise TypeError(f"{type(self).__name__} overrides _window_weights: cached decoding follows the "
                            "router's own selection only (decode by re-running the model instead)")

    def fill_cache(self, cache: RouterCache, scores: Tensor, num_tokens: int) -> None:
        """The state after a prefill whose scores [b, r, n] this router routed with capacity
        num_tokens: the last token's window, its dual and candidates (what `forward` decided)."""
        self._check_decodable()
        b, r, n = scores.shape
        W, C = self.window_size, num_tokens
        last = (n - 1) // W * W  # first position of the last token's window
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        cache.scores = reuse(cache.scores, (b, r, W), scores.dtype, scores.device, 0.0)
        cache.scores[..., : n - last].copy_(scores[..., last:])
        cache.offset = reuse(cache.offset, (b, r, 1), dtype, scores.device, 0.0)
        cache.count = reuse(cache.count, (b, r), torch.long, scores.device, n - last)  # window 0: all candidates
        if last:
            a, cache.eps = self._window_dual(scores[..., last - W : last], C)
            cache.offset.copy_(a)
            logits = scores[..., last:].to(dtype) + a
            cache.count.copy_((logits > -cache.eps * math.log(2.0)).sum(-1))
        cache.capacity = C

    def decode(self, scores: Tensor, cache: RouterCache, num_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """One token's routing at position cache.position.length: scores [b, r, 1] ->
        (routed [b, r] bool, slot [b, r] int64 within its window, weight [b, r]) as `forward`
        decides it over the whole sequence (window 0: the first C tokens with weight 1; later
        windows: y = exp(min(s + a, 0) / e), a candidate when y > 1/2, the first C candidates
        take the slots). Updates the cache in place; no host sync."""
        if num_tokens != cache.capacity:
            raise ValueError(f"num_tokens must stay {cache.capacity} (the prefill's) while decoding, got {num_tokens}")
        p, W, C = cache.position.length, self.window_size, num_tokens
        if p % W == 0:  # the previous window is complete: its dual sets this one's threshold
            a, cache.eps = self._window_dual(cache.scores, C)
            cache.offset.copy_(a)
            cache.count.zero_()
        cache.scores.index_copy_(2, (cache.position.tensor % W).view(1), scores.to(cache.scores.dtype))
        if p < W:  # window 0 has no past: first come, first served, weight 1
            candidate = torch.ones_like(cache.count, dtype=torch.bool)
            y = torch.ones_like(cache.offset[..., 0])
        else:
            logits = scores[..., 0].to(cache.offset.dtype) + cache.offset[..., 0]
            y = torch.exp(logits.clamp_max(0.0) / cache.eps)
            candidate = logits > -cache.eps * math.log(2.0)
        routed = candidate & (cache.count < C)
        slot = cache.count.clone()
        cache.count.add_(candidate.long())
        return routed, slot, torch.ones_like(y) if self.straight_through else y

    def _window_weights(self, s: Tensor, real: Tensor, C: int) -> tuple[Tensor, Tensor]:
        """Soft weights y and candidacy (y > 1/2) of every token from the previous window's dual,
        s, real [b, r, nw, W] (`colt5.kernels.route_causal.window_weights`). Overriding it sends
        the router's selection through the torch ops."""
        return window_weights(
            s, real, k=self._window_k(C), n_iters=self.n_iters, eps=self.eps, eps_init=self.eps_init,
            eps_decay=self.eps_decay, backend=self.backend,
        )
