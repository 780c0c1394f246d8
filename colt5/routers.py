"""Routers: pick the tokens that take the heavy branch.

Shapes: b batch, n sequence, d model dim, r routes (routing tokens), k routed tokens per route.

A router scores every token once per route ([b, r, n]), turns each row of scores into soft top-k
weights with coordinate descent (`colt5.coor_descent`), picks the k best tokens of each route,
gathers them, and after the heavy branch scatters the outputs back (`route_back`).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colt5 import validation
from colt5.kernels.checks import check_schedule
from colt5.kernels.routing import RoutePicks, route_top_k
from colt5.kernels.scatter import scatter_back_reference, scatter_back_triton
from colt5.kernels.norm import norm_score
from colt5.kernels.soft_topk import coor_descent
from colt5.precision import fp32_scores, to_autocast_dtype


class RouterReturn(NamedTuple):
    """What a router returns. With one route (and keep_one_route_dim=False) the r dim is dropped.

    When nothing needs routing (n <= num_tokens) every token passes: indices and scores are None,
    routed_tokens is x itself ([b, n, d], or [b, r, n, d] with several routes) and routed_mask the
    input mask (or None).
    """

    indices: Tensor | None  # [b, (r,) k] long: positions picked (in no particular order)
    scores: Tensor | None  # [b, (r,) k]: soft top-k weights at the picks (1 forward if straight-through)
    routed_tokens: Tensor  # [b, (r,) k, d]
    routed_mask: Tensor | None  # [b, (r,) k] bool: the pick is a real token (not padding)


class RouterStats(NamedTuple):
    """How far a router's soft top-k got (`Router.routing_stats`; tensors, no host sync).

    A row is one coordinate descent: one per route, and per route block (route_block_size) or,
    for the causal router, per routing window (each by its own scores: the dual that sets the
    next window's threshold). With the routers' default schedule (20 iterations, eps 4 -> 0.03
    by x0.7) the weights stop short of the optimum: they sum to about 0.77 of their target on
    N(0, 1) scores (0.76-0.79 from n = 256 to 16384), 0.68-0.75 on wider or clustered ones
    (N(0, 9); N(0, 4) with k tokens 6 higher), 0.90 on narrow ones (N(0, 0.09)), and 0.73-0.93
    on the routers of a small byte LM trained 300 steps (rows of 512, k = 32: attention
    routers 0.73-0.79, feedforward 0.87-0.93); 200 iterations reach 0.95-1.0. Straight-through
    routing uses only the weights' gradient.
    """

    weights: Tensor  # [b, r, n] soft top-k weights in [0, 1] (not straight-through; 0 where masked)
    target: Tensor  # [b, r, rows] what a row's weights sum to at the optimum: min(k', valid positions)
    weight_sum: Tensor  # [b, r, rows] what they sum to
    sum_ratio: Tensor  # [b, r, rows] weight_sum / target (1 for a row with nothing to route)
    picked_weight: Tensor  # [b, r, rows] mean of the row's largest weights, one per token it routes


RouterFactory = Callable[..., "Router"]


def make_router(router_class: RouterFactory, dim: int, *, name: str = "router", required: type | None = None,
                **kwargs) -> Router:
    """A layer's router: router_class(dim, **kwargs) (a Router subclass, or any callable taking
    the same arguments and returning a Router), checked to be a `required` (default Router) with
    the routes asked for (kwargs' num_routing_tokens, default 1). name: the router's attribute,
    for the error messages."""
    required = Router if required is None else required
    if not callable(router_class):
        raise TypeError(f"router_class must be a Router subclass or a callable returning one, got {router_class!r}")
    router = router_class(dim, **kwargs)
    if not isinstance(router, required):
        raise TypeError(
            f"router_class must return a {required.__module__}.{required.__qualname__} (for {name}), "
            f"got {type(router).__name__}"
        )
    routes = kwargs.get("num_routing_tokens", 1)
    if router.num_routing_tokens != routes:
        raise ValueError(f"{name} must have num_routing_tokens={routes}, router_class made one with {router.num_routing_tokens}")
    return router


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """x [b, n, ...], indices [b, *idx] -> [b, *idx, ...] by one index_select on flat rows."""
    b, n = x.shape[:2]
    offsets = torch.arange(b, device=x.device).mul_(n).view(b, *([1] * (indices.dim() - 1)))
    flat = x.reshape(b * n, *x.shape[2:]).index_select(0, (indices + offsets).reshape(-1))
    return flat.view(*indices.shape, *x.shape[2:])


def scatter_back(
    base: Tensor,
    routed: Tensor,
    indices: Tensor | None,
    *,
    light: Tensor | None = None,
    weights: Tensor | None = None,
    real: Tensor | None = None,
    null: Tensor | None = None,
) -> Tensor:
    """A heavy branch's outputs back at their tokens' positions: returns a new [b, n, d] tensor
    in base's dtype.

    base [b, n, d] (the residual stream) + light [b, n, d] (the light branch, if any) +
    routed [b, (r,) k, d], each row times its router weight (weights [b, (r,) k]), added at
    indices [b, (r,) k]; picks that are not real tokens (real False) add nothing. With a null
    output [d] (one route only), every position no real pick covers gets null instead.
    indices None: nothing was routed and routed has base's positions (routes add up).

    Picks are unique within a route, so the result does not depend on the order of additions.
    Rows that are not real are selected away, never multiplied by 0, so a NaN in a padding row
    reaches no output. On CUDA one route goes through the fused op of `colt5.kernels.scatter`.
    """
    if base.is_cuda and indices is not None and indices.dim() == 2:
        return scatter_back_triton(base, routed, indices, light=light, weights=weights, real=real, null=null)
    return scatter_back_reference(base, routed, indices, light=light, weights=weights, real=real, null=null)


def scatter_back_one(base: Tensor, heavy: Tensor, routed: Tensor, weight: Tensor, *, light: Tensor | None = None,
                     null: Tensor | None = None) -> Tensor:
    """`scatter_back` at one position (a decode step): base [b, 1, d] + light + heavy [b, 1, d]
    times weight [b, 1] where routed [b, 1] (bool), else null when given; in base's dtype."""
    out = base if light is None else base + light.to(base.dtype)
    routed = routed[..., None]
    heavy = (torch.where(routed, heavy, 0.0) * weight[..., None].to(heavy.dtype)).to(base.dtype)
    if null is None:
        return out + heavy
    null = null.to(base.dtype)
    return out + null + torch.where(routed, heavy - null, 0.0)


def layer_router_kwargs(router_kwargs: dict | None, *, reserved: tuple[str, ...], **fixed) -> dict:
    """A layer's router arguments: its own settings (`fixed`), then the user's `router_kwargs`,
    which may not set the `reserved` keys (the structure the layer controls)."""
    if router_kwargs is None:
        return fixed
    if not isinstance(router_kwargs, dict):
        raise TypeError(f"router_kwargs must be a dict, got {type(router_kwargs).__name__}")
    for key in reserved:
        if key in router_kwargs:
            raise ValueError(f"router_kwargs may not set {key!r}: the layer sets it")
    return {**fixed, **router_kwargs}


class Router(nn.Module):
    """Base class of the routers: score tokens, soft top-k, pick, gather; `route_back` scatters.

    Subclasses implement `score(x, routing_tokens)` -> [b, r, n] float scores, one row per route
    (higher = more worth the heavy branch) and may override nothing else. Everything after scoring
    (masking, coordinate descent, straight-through, blocks, gathers) is shared.

    Args:
        num_routing_tokens: routes r; each picks its own num_tokens tokens.
        n_iters, eps, eps_init, eps_decay: the coordinate-descent schedule (CODA's scaling:
            start at 4, x0.7 per iteration, 20 iterations, final eps 0.03 by default).
        fetch_k_ratio: soft top-k runs with k' = num_tokens * ratio (9/8 in CoLT5) so a few
            tokens past the cut still get a training signal.
        straight_through: scores are 1 in the forward and carry the soft weight's gradient.
        use_triton: True / False force the Triton / reference soft top-k; None picks by device.
        route_block_size: route within blocks of this many tokens, each block taking
            ceil(num_tokens / blocks) tokens, so very long sequences route in pieces (the total
            is rounded up to a multiple of the number of blocks).

    The default schedule is fast, not converged: the soft weights sum to about 0.77 of k' on
    N(0, 1) scores (see `RouterStats`); `routing_stats(x, num_tokens=...)` measures it. The
    picks are the top-k scores whatever the convergence; it sets the weights that scale the
    heavy outputs (without straight_through) or whose gradient trains the router (with it).

    A layer makes its routers with `router_class(dim, **settings)` (its `router_class`
    argument, see `make_router`): pass a subclass, or any callable returning a Router.
    """

    def __init__(
        self,
        *,
        num_routing_tokens: int = 1,
        n_iters: int = 20,
        fetch_k_ratio: float = 9 / 8,
        eps: float = 0.03,
        eps_decay: float = 0.7,
        eps_init: float | None = 4.0,
        straight_through: bool = True,
        use_triton: bool | None = None,
        route_block_size: int | None = None,
    ):
        super().__init__()
        validation.positive_int("num_routing_tokens", num_routing_tokens)
        if isinstance(fetch_k_ratio, bool) or not isinstance(fetch_k_ratio, numbers.Real):
            raise TypeError(f"fetch_k_ratio must be a number, got {type(fetch_k_ratio).__name__}")
        if not 1 <= fetch_k_ratio < math.inf:
            raise ValueError(f"fetch_k_ratio must be a finite number >= 1, got {fetch_k_ratio}")
        if route_block_size is not None:
            validation.positive_int("route_block_size", route_block_size)
        check_schedule(n_iters, eps, eps_init, eps_decay)  # now, not at the first forward
        self.num_routing_tokens = num_routing_tokens
        self.n_iters, self.eps, self.eps_init, self.eps_decay = n_iters, eps, eps_init, eps_decay
        self.fetch_k_ratio = fetch_k_ratio
        self.straight_through = straight_through
        self.use_triton = use_triton
        self.route_block_size = route_block_size

    def score(self, x: Tensor, routing_tokens: Tensor | None = None) -> Tensor:
        """[b, n, d] -> [b, r, n] scores. The extension point: subclasses override this."""
        raise NotImplementedError

    def dot_product_tokens(self) -> Tensor | None:
        """[r, d] when `score` is x . u with routing tokens u this router owns (the layer may
        then compute the scores inside its norm, `norm_and_scores`); None otherwise."""
        return None

    @property
    def backend(self) -> str | None:
        """The selection backend `use_triton` asks for (None: by device)."""
        return None if self.use_triton is None else ("triton" if self.use_triton else "reference")

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
        validation.tokens(x, getattr(self, "dim", None), mask=mask)
        validation.positive_int("num_tokens", num_tokens)
        n = x.shape[1]
        if n <= num_tokens:
            return self._pass_all(x, mask, keep_one_route_dim)

        scores = self._checked_score(x, routing_tokens) if scores is None else scores
        picks = self.select(scores, mask, num_tokens, random_route)
        return self._finish(x, picks, keep_one_route_dim)

    def select(self, scores: Tensor, mask: Tensor | None, num_tokens: int, random_route: bool = False) -> RoutePicks:
        """Scores [b, r, n] (mask [b, n]) -> picks [b, r, k]: within route blocks if set."""
        block = self.route_block_size
        if block is not None and block < scores.shape[-1]:
            return self._select_in_blocks(scores, mask, num_tokens, block, random_route)
        return self._select_rows(scores, mask, num_tokens, random_route)

    def _pass_all(self, x: Tensor, mask: Tensor | None, keep_one_route_dim: bool) -> RouterReturn:
        """n <= num_tokens: every token passes, with weight 1."""
        b, n, d = x.shape
        r = self.num_routing_tokens
        if r == 1 and not keep_one_route_dim:
            return RouterReturn(None, None, x, mask)
        routed_mask = None if mask is None else mask.unsqueeze(1).expand(b, r, n)
        return RouterReturn(None, None, x.unsqueeze(1).expand(b, r, n, d), routed_mask)

    def _checked_score(self, x: Tensor, routing_tokens: Tensor | None) -> Tensor:
        b, n, _ = x.shape
        scores = self.score(x, routing_tokens)
        want = (b, self.num_routing_tokens, n)
        if scores.shape != want:
            raise ValueError(f"{type(self).__name__}.score must return [b, r, n] = {want}, got {tuple(scores.shape)}")
        return scores

    def _finish(self, x: Tensor, picks: RoutePicks, keep_one_route_dim: bool, routed_tokens: Tensor | None = None) -> RouterReturn:
        """Picks [b, r, k] -> gathered tokens (unless given), the r dim dropped if asked."""
        indices, weights, real = picks
        if routed_tokens is None:
            routed_tokens = gather_tokens(x, indices)  # [b, r, k, d]
        if self.num_routing_tokens == 1 and not keep_one_route_dim:
            indices, weights, routed_tokens = indices[:, 0], weights[:, 0], routed_tokens[:, 0]
            real = None if real is None else real[:, 0]
        return RouterReturn(indices, weights, routed_tokens, real)

    def _select_rows(self, scores: Tensor, mask: Tensor | None, num_tokens: int, random_route: bool) -> RoutePicks:
        """Each row of [..., n] picks num_tokens positions (mask of the scores' shape or [b, n])."""
        n = scores.shape[-1]
        if random_route:  # an ablation: uniform picks with weight 1
            rank = torch.rand_like(scores, dtype=torch.float32)
            if mask is not None:
                mask = mask if mask.shape == scores.shape else mask.unsqueeze(1).expand(scores.shape)
                rank = rank.masked_fill(~mask, -1.0)
            indices = rank.topk(num_tokens, dim=-1, sorted=False).indices
            real = None if mask is None else mask.gather(-1, indices)
            return RoutePicks(indices, torch.ones_like(indices, dtype=scores.dtype), real)
        return route_top_k(
            scores, num_tokens=num_tokens, k_soft=min(float(n), num_tokens * self.fetch_k_ratio), n_iters=self.n_iters,
            eps=self.eps, eps_init=self.eps_init, eps_decay=self.eps_decay, mask=mask,
            straight_through=self.straight_through, backend=self.backend,
        )

    def _select_in_blocks(self, scores: Tensor, mask: Tensor | None, num_tokens: int, block: int, random_route: bool) -> RoutePicks:
        n = scores.shape[-1]
        scores, valid, per_block = _in_blocks(scores, mask, num_tokens, block)
        num_blocks = scores.shape[2]
        local, weights, real = self._select_rows(scores, valid, per_block, random_route)
        starts = torch.arange(num_blocks, device=scores.device).mul_(block).view(1, 1, num_blocks, 1)
        # Picks in the padded tail point at n - 1 with real=False: route_back adds zeros there.
        indices = (local + starts).clamp_max_(n - 1)
        return RoutePicks(indices.flatten(2), weights.flatten(2), real.flatten(2))

    def route_back(self, out: Tensor, routed_out: Tensor, indices: Tensor | None, routed_mask: Tensor | None = None) -> Tensor:
        """Add heavy outputs back at their positions: out [b, n, d] + routed_out [b, (r,) k, d]
        (see `scatter_back`), returned as a new tensor. Picks that are padding (routed_mask
        False) contribute nothing. indices None: routed_out has out's positions ([b, (r,) n, d]).

        Raises TypeError / ValueError naming the argument for wrong types and shapes, and for an
        index outside [0, n) (it would add into the next sample): checked on the host for CPU
        tensors, by a device-side assertion on CUDA and under torch.compile (no host sync; a
        RuntimeError with the same message). The routed layers call `scatter_back` directly.
        """
        check_route_back(out, routed_out, indices, routed_mask)
        return scatter_back(out, routed_out, indices, real=routed_mask)

    def _stat_rows(self, scores: Tensor, mask: Tensor | None, num_tokens: int) -> tuple[Tensor, Tensor, float, int]:
        """Scores [b, r, n] -> the rows of this router's soft top-k [b, r, R, L], which of their
        positions are real [b, r, R, L], the soft top-k's k' and the tokens each row routes."""
        n = scores.shape[-1]
        blocked = self.route_block_size is not None and self.route_block_size < n  # as `select`
        block = self.route_block_size if blocked else max(n, 1)  # n = 0: one row of padding
        rows, valid, per_row = _in_blocks(scores, mask, num_tokens, block)
        return rows, valid, min(float(block), per_row * self.fetch_k_ratio), per_row

    @torch.no_grad()
    def routing_stats(
        self, x: Tensor, *, num_tokens: int, mask: Tensor | None = None, routing_tokens: Tensor | None = None
    ) -> RouterStats:
        """How far the soft top-k gets on x [b, n, d] (what `forward` would route, as
        `RouterStats`): its weights without straight-through, and per row their sum against
        what it should be, k' = num_tokens * fetch_k_ratio (at most the row's real positions).
        A diagnostic: it reruns the scoring and the soft top-k, without gradients."""
        validation.tokens(x, getattr(self, "dim", None), mask=mask)
        validation.positive_int("num_tokens", num_tokens)
        n = x.shape[1]
        scores = self._checked_score(x, routing_tokens)
        rows, valid, k_soft, per_row = self._stat_rows(scores, mask, num_tokens)
        y = coor_descent(rows, n_iters=self.n_iters, k=k_soft, eps=self.eps, eps_init=self.eps_init,
                         eps_decay=self.eps_decay, mask=valid, backend=self.backend)
        y = y.to(torch.promote_types(y.dtype, torch.float32))
        real = valid.sum(-1)
        target = real.to(y.dtype).clamp_max(k_soft)
        weight_sum = y.sum(-1)
        sum_ratio = torch.where(target > 0, weight_sum / target.clamp_min(1e-30), torch.ones_like(weight_sum))
        top = y.topk(min(per_row, y.shape[-1]), dim=-1).values.sum(-1) if y.shape[-1] else weight_sum
        counted = real.clamp_max(per_row)
        picked = torch.where(counted > 0, top / counted.clamp_min(1), torch.ones_like(top))
        return RouterStats(y.flatten(2)[..., :n], target, weight_sum, sum_ratio, picked)


def _in_blocks(scores: Tensor, mask: Tensor | None, num_tokens: int, block: int) -> tuple[Tensor, Tensor, int]:
    """Scores [b, r, n] padded to whole blocks: (rows [b, r, blocks, block], which of their
    positions are real tokens (same shape), the tokens each block routes). n = 0: one block."""
    b, r, n = scores.shape
    num_blocks = max(1, math.ceil(n / block))
    pad = num_blocks * block - n
    valid = torch.ones(b, n, dtype=torch.bool, device=scores.device) if mask is None else mask
    rows = F.pad(scores, (0, pad)).view(b, r, num_blocks, block)
    valid = F.pad(valid, (0, pad), value=False).view(b, 1, num_blocks, block).expand(b, r, num_blocks, block)
    return rows, valid, min(block, math.ceil(num_tokens / num_blocks))


def check_route_back(out: Tensor, routed_out: Tensor, indices: Tensor | None, routed_mask: Tensor | None) -> None:
    """`Router.route_back`'s arguments: shapes, dtypes, devices and the indices' range."""
    validation.tokens(out, None, "out")
    if not isinstance(routed_out, Tensor) or not routed_out.is_floating_point():
        raise TypeError(f"routed_out must be a floating-point tensor, got {getattr(routed_out, 'dtype', type(routed_out).__name__)}")
    b, n, d = out.shape
    if routed_out.dim() not in (3, 4) or routed_out.shape[0] != b or routed_out.shape[-1] != d:
        raise ValueError(f"routed_out must have shape [{b}, (routes,) k, {d}] (batch and width of out), got {tuple(routed_out.shape)}")
    if routed_out.device != out.device:
        raise ValueError(f"routed_out must be on the device of out ({out.device}), got {routed_out.device}")
    picks = tuple(routed_out.shape[:-1])
    if indices is None:
        if picks[-1] != n:
            raise ValueError(f"with indices None, routed_out must have out's positions [{b}, (routes,) {n}, {d}], got {tuple(routed_out.shape)}")
    else:
        _check_picks(indices, "indices", (torch.int64, torch.int32), "an int64", picks, "routed_out's without its width", out)
        validation.indices_in_range(indices, n, "indices")
    if routed_mask is not None:
        _check_picks(routed_mask, "routed_mask", (torch.bool,), "a bool", picks, "that of indices", out)


def _check_picks(t: object, name: str, dtypes: tuple, kind: str, picks: tuple, shape_why: str, out: Tensor) -> None:
    """One tensor per pick (route_back's indices or routed_mask): its dtype, shape and device."""
    if not isinstance(t, Tensor) or t.dtype not in dtypes:
        raise TypeError(f"{name} must be {kind} tensor or None, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != picks:
        raise ValueError(f"{name} must have shape {picks} ({shape_why}), got {tuple(t.shape)}")
    if t.device != out.device:
        raise ValueError(f"{name} must be on the device of out ({out.device}), got {t.device}")


def norm_and_scores(norm: nn.LayerNorm, x: Tensor, routers: list[Router]) -> tuple[Tensor, list[Tensor] | None]:
    """A routed layer's first step: its normalised input (in the autocast dtype, see
    colt5.precision) and, when every router scores by a dot product with routing tokens of its
    own, their scores [b, r, n] from the same fused op on CUDA (`colt5.kernels.norm`); None
    instead of the scores otherwise (the routers then score the normalised input)."""
    tokens = [router.dot_product_tokens() for router in routers]
    if x.is_cuda and norm.weight is not None and norm.bias is not None and all(t is not None for t in tokens):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        xn, scores = norm_score(x, norm.weight, norm.bias, torch.cat(tokens), eps=norm.eps, out_dtype=dtype)
        return xn, list(scores.split([t.shape[0] for t in tokens], dim=1))
    return to_autocast_dtype(norm(x)), None


def route_together(
    x: Tensor, requests: list[tuple[Router, int, bool]], *, mask: Tensor | None = None,
    scores: list[Tensor] | None = None,
) -> list[RouterReturn]:
    """Route x through several routers at once: `[router(x, num_tokens=k, mask=mask,
    keep_one_route_dim=keep) for router, k, keep in requests]`, same results; scores: each
    router's precomputed scores (or None).

    Each soft top-k and each pick is a chain of small dependent steps on one row that leaves most
    of a GPU idle, so routers that can share them (same pipeline, schedule, backend and token
    count; no route blocks) stack their score rows and run one soft top-k and one pick for all:
    the attention layer's query and key-value routers, for example. Others route one by one.
    """
    if not requests:
        raise ValueError("requests must name at least one (router, num_tokens, keep_one_route_dim)")
    for router, k, _ in requests:
        validation.tokens(x, getattr(router, "dim", None), mask=mask)
        validation.positive_int("num_tokens", k)
    routers = [router for router, _, _ in requests]
    first, num_tokens = routers[0], requests[0][1]
    scores = [None] * len(requests) if scores is None else scores
    if not (len(requests) > 1 and x.shape[1] > num_tokens and all(_shares_routing(first, r) for r in routers)
            and all(k == num_tokens for _, k, _ in requests)):
        return [router(x, num_tokens=k, mask=mask, keep_one_route_dim=keep, scores=s)
                for (router, k, keep), s in zip(requests, scores)]
    rows = [router._checked_score(x, None) if s is None else s for router, s in zip(routers, scores)]
    picks = first._select_rows(torch.cat(rows, dim=1), mask, num_tokens, False)  # [b, sum r, n]
    # One gather for all (its backward is one zero-filled [b, n, d] gradient, not one per router).
    tokens = gather_tokens(x, picks.indices)
    sizes = [router.num_routing_tokens for router in routers]
    parts = [p.split(sizes, dim=1) if p is not None else [None] * len(sizes) for p in (*picks, tokens)]
    results = []
    for (router, _, keep), indices, weights, real, routed in zip(requests, *parts):
        results.append(router._finish(x, RoutePicks(indices, weights, real), keep, routed))
    return results


def _shares_routing(a: Router, b: Router) -> bool:
    """b routes like a, but for its scores: rows of both can go through one soft top-k and pick."""
    shared = ("forward", "select", "_select_rows")
    return (
        all(getattr(type(b), name) is getattr(Router, name) for name in shared)
        and a.route_block_size is None and b.route_block_size is None
        and (a.n_iters, a.eps, a.eps_init, a.eps_decay, a.fetch_k_ratio, a.backend)
        == (b.n_iters, b.eps, b.eps_init, b.eps_decay, b.fetch_k_ratio, b.backend)
        and not getattr(b, "learned_routing_tokens", False)
    )


class CoordinateDescentRouter(Router):
    """CoLT5's router: score_i = x_i . u for a routing token u per route, soft top-k by
    coordinate descent (Ainslie et al. 2023, section 3.3; epsilon scaling after Lei et al. 2023).

    `learned_routing_tokens=True` means the routing tokens come from the caller (forward's
    `routing_tokens`, [r, d] or [b, r, d], e.g. produced by another network); otherwise the
    router owns them as a parameter. `cosine_sim_routing` scores by cosine similarity times
    `cosine_sim_scale`, which keeps scores in a fixed range whatever the token norms.
    """

    def __init__(
        self,
        dim: int,
        *,
        straight_through: bool = True,
        n_iters: int = 20,
        fetch_k_ratio: float = 9 / 8,
        eps: float = 0.03,
        eps_decay: float = 0.7,
        eps_init: float | None = 4.0,
        num_routing_tokens: int = 1,
        learned_routing_tokens: bool = False,
        use_triton: bool | None = None,
        cosine_sim_routing: bool = False,
        cosine_sim_scale: float = 8.0,
        route_block_size: int | None = None,
    ):
        super().__init__(
            num_routing_tokens=num_routing_tokens,
            n_iters=n_iters,
            fetch_k_ratio=fetch_k_ratio,
            eps=eps,
            eps_decay=eps_decay,
            eps_init=eps_init,
            straight_through=straight_through,
            use_triton=use_triton,
            route_block_size=route_block_size,
        )
        validation.positive_int("dim", dim)
        self.dim = dim
        self.learned_routing_tokens = learned_routing_tokens
        self.routing_token = None if learned_routing_tokens else nn.Parameter(torch.randn(num_routing_tokens, dim) * dim**-0.5)
        self.cosine_sim_routing = cosine_sim_routing
        self.cosine_sim_scale = cosine_sim_scale

    def score(self, x: Tensor, routing_tokens: Tensor | None = None) -> Tensor:
        if self.learned_routing_tokens:
            if routing_tokens is None:
                raise ValueError("routing_tokens must be given: this router has learned_routing_tokens=True")
        elif routing_tokens is not None:
            raise ValueError("routing_tokens must be None: this router owns its routing tokens")
        else:
            routing_tokens = self.routing_token
        r = self.num_routing_tokens
        if routing_tokens.shape[-2:] != (r, self.dim) or routing_tokens.dim() not in (2, 3):
            raise ValueError(f"routing_tokens must have shape [{r}, {self.dim}] or [batch, {r}, {self.dim}], got {tuple(routing_tokens.shape)}")
        if self.cosine_sim_routing:
            x = F.normalize(x, dim=-1)
            routing_tokens = F.normalize(routing_tokens, dim=-1)
        scores = fp32_scores(x, routing_tokens)
        return scores * self.cosine_sim_scale if self.cosine_sim_routing else scores

    def dot_product_tokens(self) -> Tensor | None:
        plain = type(self).score is CoordinateDescentRouter.score and not self.cosine_sim_routing
        return self.routing_token if plain and self.routing_token is not None else None
