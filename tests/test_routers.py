"""Routers: shapes, picks against independent references, masks, blocks, straight-through,
route_back against a naive loop, errors, and a Router subclass with its own score."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from colt5.feedforward import ConditionalRoutedFeedForward
from colt5.kernels import coor_descent
from colt5.routers import CoordinateDescentRouter, Router, gather_tokens, route_together, scatter_back
from conftest import assert_close


def naive_gather(x, idx):
    """x [b, n, d], idx [b, *] -> [b, *, d] by a Python loop over the batch."""
    return torch.stack([x[i][idx[i]] for i in range(x.shape[0])])


def random_mask(b, n, min_real, gen=None):
    mask = torch.rand(b, n, generator=gen) > 0.4
    for i in range(b):
        real = mask[i].sum().item()
        if real < min_real:
            mask[i, torch.randperm(n, generator=gen)[: min_real]] = True
    return mask


@pytest.mark.parametrize("routes,keep", [(1, False), (1, True), (3, False)], ids=["r1", "r1-keepdim", "r3"])
def test_shapes_and_picks_are_top_scores(seeded, routes, keep):
    b, n, d, k = 2, 23, 16, 5
    router = CoordinateDescentRouter(d, num_routing_tokens=routes)
    x = torch.randn(b, n, d)
    indices, scores, tokens, routed_mask = router(x, num_tokens=k, keep_one_route_dim=keep)
    lead = (b, k) if routes == 1 and not keep else (b, routes, k)
    assert indices.shape == lead and indices.dtype == torch.long
    assert scores.shape == lead and scores.dtype == x.dtype
    assert tokens.shape == (*lead, d)
    assert routed_mask is None
    torch.testing.assert_close(tokens, naive_gather(x, indices), rtol=0, atol=0)
    # Independent reference: the k largest raw scores x . u of each route.
    raw = torch.einsum("bnd,rd->brn", x, router.routing_token.detach())
    expected = raw.topk(k, dim=-1).indices.sort(-1).values
    got = indices.reshape(b, routes, k).sort(-1).values
    assert torch.equal(got, expected)
    assert all(len(set(row.tolist())) == k for row in indices.reshape(-1, k)), "indices repeat within a route"


@pytest.mark.parametrize("routes", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_no_route_path(seeded, routes, masked):
    b, n, d = 2, 6, 8
    router = CoordinateDescentRouter(d, num_routing_tokens=routes)
    x = torch.randn(b, n, d)
    mask = random_mask(b, n, 1) if masked else None
    out = router(x, num_tokens=n, mask=mask)  # n <= num_tokens: everything passes
    assert out.indices is None and out.scores is None
    if routes == 1:
        assert out.routed_tokens is x
        assert out.routed_mask is mask
    else:
        assert out.routed_tokens.shape == (b, routes, n, d)
        assert torch.equal(out.routed_tokens[:, 1], x)
        assert (out.routed_mask is None) == (not masked)
        if masked:
            assert torch.equal(out.routed_mask[:, 1], mask)
    assert router(x, num_tokens=n + 5, mask=mask).indices is None
    # route_back of the no-route path adds routed outputs in place (padding contributes nothing).
    base, heavy = torch.randn(b, n, d), torch.randn(b, n, d)
    y = router.route_back(base, heavy, None, mask)
    expected = base + (heavy if mask is None else heavy * mask.unsqueeze(-1))
    assert_close(y, expected, 1e-6, "no-route route_back")


@pytest.mark.parametrize("routes", [1, 3])
def test_masked_positions_never_picked_while_real_remain(routes):
    gen = torch.Generator().manual_seed(1)
    b, n, d, k = 4, 31, 8, 6
    router = CoordinateDescentRouter(d, num_routing_tokens=routes)
    x = torch.randn(b, n, d, generator=gen) * 3
    mask = random_mask(b, n, k, gen)
    mask[0] = False
    mask[0, torch.randperm(n, generator=gen)[:k]] = True  # exactly k real tokens in row 0
    out = router(x, num_tokens=k, mask=mask, keep_one_route_dim=True)
    picked_real = torch.stack([mask[i][out.indices[i]] for i in range(b)])
    assert picked_real.all()
    assert out.routed_mask.all()
    # Fewer real tokens than k: every real one is picked, the rest are flagged padding.
    mask2 = mask.clone()
    mask2[1] = False
    mask2[1, :3] = True
    out2 = router(x, num_tokens=k, mask=mask2, keep_one_route_dim=True)
    for r in range(routes):
        assert set(out2.indices[1, r][out2.routed_mask[1, r]].tolist()) == {0, 1, 2}
        assert torch.equal(out2.routed_mask[1, r], mask2[1][out2.indices[1, r]])
    # A fully padded row: no real picks, nothing non-finite.
    mask2[2] = False
    out3 = router(x, num_tokens=k, mask=mask2, keep_one_route_dim=True)
    assert not out3.routed_mask[2].any()
    assert torch.isfinite(out3.scores).all()


def test_masked_scores_do_not_depend_on_padding_values():
    gen = torch.Generator().manual_seed(2)
    b, n, d, k = 2, 20, 8, 4
    router = CoordinateDescentRouter(d, straight_through=False, eps=0.5)
    x = torch.randn(b, n, d, generator=gen)
    mask = random_mask(b, n, k + 2, gen)
    x2 = torch.where(mask.unsqueeze(-1), x, torch.randn(b, n, d, generator=gen) * 10)
    a, c = router(x, num_tokens=k, mask=mask), router(x2, num_tokens=k, mask=mask)
    assert torch.equal(a.indices, c.indices)
    assert_close(c.scores, a.scores, 1e-6, "scores")


def test_route_block_size():
    gen = torch.Generator().manual_seed(3)
    b, n, d, block, k = 2, 20, 8, 8, 6  # 3 blocks (8, 8, 4 tokens), 2 picks each
    router = CoordinateDescentRouter(d, route_block_size=block)
    x = torch.randn(b, n, d, generator=gen)
    out = router(x, num_tokens=k)
    assert out.indices.shape == (b, 6)
    raw = torch.einsum("bnd,d->bn", x, router.routing_token.detach()[0])
    for blk in range(3):
        idx = out.indices[:, 2 * blk : 2 * blk + 2]
        lo, hi = blk * block, min(n, (blk + 1) * block)
        assert ((idx >= lo) & (idx < hi)).all()
        expected = raw[:, lo:hi].topk(2, dim=-1).indices.add(lo).sort(-1).values
        assert torch.equal(idx.sort(-1).values, expected)
    assert out.routed_mask.all()
    # A tail block with fewer tokens than its share: the extra picks are flagged padding.
    out17 = router(x[:, :17], num_tokens=k)
    assert out17.routed_mask.sum(-1).tolist() == [5, 5]
    assert (out17.indices < 17).all()
    # Total rounds up to a multiple of the block count.
    assert router(x, num_tokens=4).indices.shape == (b, 6)


def test_random_route_is_a_negative_control():
    gen = torch.Generator().manual_seed(4)
    b, n, d, k = 3, 40, 8, 5
    router = CoordinateDescentRouter(d)
    x = torch.randn(b, n, d, generator=gen)
    mask = random_mask(b, n, k, gen)
    torch.manual_seed(0)
    out = router(x, num_tokens=k, mask=mask, random_route=True)
    assert torch.equal(out.scores, torch.ones_like(out.scores))
    assert torch.stack([mask[i][out.indices[i]] for i in range(b)]).all()
    top = router(x, num_tokens=k, mask=mask).indices.sort(-1).values
    draws = [router(x, num_tokens=k, mask=mask, random_route=True).indices.sort(-1).values for _ in range(3)]
    assert any(not torch.equal(dr, top) for dr in draws)


def test_cosine_sim_routing_scores():
    gen = torch.Generator().manual_seed(5)
    d = 8
    router = CoordinateDescentRouter(d, num_routing_tokens=2, cosine_sim_routing=True, cosine_sim_scale=5.0)
    x = torch.randn(2, 9, d, generator=gen) * 100  # large norms: cosine keeps scores bounded
    s = router.score(x)
    u = router.routing_token.detach()
    expected = 5.0 * torch.nn.functional.cosine_similarity(x.unsqueeze(1), u.view(1, 2, 1, d), dim=-1)
    assert_close(s.detach(), expected, 1e-5, "cosine scores")
    assert s.abs().max() <= 5.0 + 1e-4


def test_straight_through_value_one_and_soft_gradient():
    gen = torch.Generator().manual_seed(6)
    b, n, d, k = 2, 16, 8, 4
    kw = dict(eps=0.5, num_routing_tokens=2)
    st, soft = CoordinateDescentRouter(d, straight_through=True, **kw), CoordinateDescentRouter(d, straight_through=False, **kw)
    with torch.no_grad():
        soft.routing_token.copy_(st.routing_token.mul_(0.3))
    x = torch.randn(b, n, d, generator=gen)
    weights = torch.randn(b, 2, k, generator=gen)
    a, c = st(x, num_tokens=k), soft(x, num_tokens=k)
    assert torch.equal(a.indices, c.indices)
    assert torch.equal(a.scores, torch.ones_like(a.scores))
    assert ((c.scores > 0) & (c.scores <= 1)).all() and (c.scores < 1 - 1e-3).any()
    # Independent: the soft weights are coor_descent of the raw scores at the picks.
    raw = torch.einsum("bnd,rd->brn", x, soft.routing_token.detach())
    ref = coor_descent(raw, n_iters=20, k=k * 9 / 8, eps=0.5, eps_init=4.0, eps_decay=0.7).gather(-1, c.indices)
    assert_close(c.scores.detach(), ref, 1e-5, "soft scores")
    (a.scores * weights).sum().backward()
    (c.scores * weights).sum().backward()
    assert st.routing_token.grad.abs().sum() > 0
    assert_close(st.routing_token.grad, soft.routing_token.grad, 1e-6, "straight-through gradient")


def test_gather_and_scatter_helpers_vs_loops():
    gen = torch.Generator().manual_seed(7)
    b, n, r, k, d = 3, 12, 2, 5, 4
    x = torch.randn(b, n, d, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(r)]) for _ in range(b)])
    assert torch.equal(gather_tokens(x, idx), torch.stack([x[i][idx[i]] for i in range(b)]))
    routed = torch.randn(b, r, k, d, generator=gen)
    expected = x.clone()
    for i in range(b):
        for j in range(r):
            for t in range(k):
                expected[i, idx[i, j, t]] += routed[i, j, t]
    assert_close(scatter_back(x, routed, idx), expected, 1e-6, "scatter_back")


def test_scatter_back_with_weights_null_and_padding_vs_loop():
    """One route: weighted rows at their positions, null everywhere else; picks that are not
    real add nothing, even when their rows hold NaN."""
    gen = torch.Generator().manual_seed(8)
    b, n, k, d = 2, 10, 4, 3
    base = torch.randn(b, n, d, generator=gen)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)])
    routed = torch.randn(b, k, d, generator=gen)
    weights = torch.rand(b, k, generator=gen)
    real = torch.tensor([[True, False, True, True], [False, True, True, False]])
    routed[~real] = float("nan")
    null = torch.randn(d, generator=gen)
    expected = base + null
    for i in range(b):
        for t in range(k):
            if real[i, t]:
                expected[i, idx[i, t]] = base[i, idx[i, t]] + weights[i, t] * routed[i, t]
    got = scatter_back(base, routed, idx, weights=weights, real=real, null=null)
    assert_close(got, expected, 1e-6, "scatter_back")
    every = torch.randn(b, n, d, generator=gen)
    pad = torch.rand(b, n, generator=gen) > 0.3
    all_pass = scatter_back(base, every, None, real=pad, null=null)
    assert_close(all_pass, base + torch.where(pad.unsqueeze(-1), every, null), 1e-6, "nothing routed")


@pytest.mark.parametrize("routes", [1, 3])
def test_route_back_matches_naive_loop_and_is_deterministic(routes):
    gen = torch.Generator().manual_seed(8)
    b, n, d, k = 2, 19, 6, 7
    router = CoordinateDescentRouter(d, num_routing_tokens=routes)
    x = torch.randn(b, n, d, generator=gen)
    mask = random_mask(b, n, 4, gen)
    mask[1] = False
    mask[1, :4] = True  # fewer real tokens than k: some picks are padding
    out = router(x, num_tokens=k, mask=mask)
    base = torch.randn(b, n, d, generator=gen)
    heavy = torch.randn(*out.routed_tokens.shape, generator=gen)
    y = router.route_back(base, heavy, out.indices, out.routed_mask)
    idx = out.indices.view(b, routes, k)
    rm = out.routed_mask.view(b, routes, k)
    hv = heavy.view(b, routes, k, d)
    expected = base.clone()
    for i in range(b):
        for j in range(routes):
            for t in range(k):
                if rm[i, j, t]:
                    expected[i, idx[i, j, t]] += hv[i, j, t]
    assert_close(y, expected, 1e-6, "route_back")
    assert torch.equal(y, router.route_back(base, heavy, out.indices, out.routed_mask))


def test_learned_routing_tokens_from_caller():
    gen = torch.Generator().manual_seed(9)
    b, n, d = 2, 10, 8
    router = CoordinateDescentRouter(d, num_routing_tokens=2, learned_routing_tokens=True)
    assert router.routing_token is None
    x = torch.randn(b, n, d, generator=gen)
    u = torch.randn(2, d, generator=gen, requires_grad=True)
    out = router(x, num_tokens=3, routing_tokens=u)
    out_b = router(x, num_tokens=3, routing_tokens=u.unsqueeze(0).expand(b, 2, d))
    assert torch.equal(out.indices, out_b.indices)
    expected = torch.einsum("bnd,rd->brn", x, u.detach()).topk(3, -1).indices.sort(-1).values
    assert torch.equal(out.indices.sort(-1).values, expected)
    with pytest.raises(ValueError, match="routing_tokens"):
        router(x, num_tokens=3)
    with pytest.raises(ValueError, match="routing_tokens"):
        router(x, num_tokens=3, routing_tokens=torch.randn(3, d))


def test_router_errors():
    d = 8
    router = CoordinateDescentRouter(d)
    x = torch.randn(2, 10, d)
    with pytest.raises(ValueError, match="x must have shape"):
        router(torch.randn(10, d), num_tokens=2)
    with pytest.raises(ValueError, match="last dimension 8"):
        router(torch.randn(2, 10, d + 1), num_tokens=2)
    with pytest.raises(TypeError, match="floating"):
        router(torch.ones(2, 10, d, dtype=torch.long), num_tokens=2)
    with pytest.raises(ValueError, match="mask must have shape"):
        router(x, num_tokens=2, mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        router(x, num_tokens=2, mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="num_tokens"):
        router(x, num_tokens=0)
    with pytest.raises(TypeError, match="num_tokens"):
        router(x, num_tokens=2.0)
    with pytest.raises(ValueError, match="routing_tokens must be None"):
        router(x, num_tokens=2, routing_tokens=torch.randn(1, d))
    with pytest.raises(ValueError, match="num_routing_tokens"):
        CoordinateDescentRouter(d, num_routing_tokens=0)
    with pytest.raises(ValueError, match="fetch_k_ratio"):
        CoordinateDescentRouter(d, fetch_k_ratio=0.5)
    with pytest.raises(ValueError, match="route_block_size"):
        CoordinateDescentRouter(d, route_block_size=0)


class MLPRouter(Router):
    """A user's router: a small MLP scores each token (one route)."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, 1))

    def score(self, x, routing_tokens=None):
        return self.net(x).squeeze(-1).unsqueeze(1)  # [b, 1, n]


class BadRouter(Router):
    def score(self, x, routing_tokens=None):
        return x.sum(-1)  # [b, n]: missing the route dim


def test_router_subclass_with_custom_score_works_in_a_layer():
    gen = torch.Generator().manual_seed(10)
    b, n, d, k = 2, 14, 8, 4
    router = MLPRouter(d, eps=0.5)
    x = torch.randn(b, n, d, generator=gen)
    out = router(x, num_tokens=k)
    expected = router.net(x).squeeze(-1).topk(k, -1).indices.sort(-1).values
    assert torch.equal(out.indices.sort(-1).values, expected)

    ff = ConditionalRoutedFeedForward(d, num_heavy_tokens=k)
    ff.router = MLPRouter(d, eps=0.5)
    y = ff(x, mask=torch.ones(b, n, dtype=torch.bool))
    assert y.shape == (b, n, d) and torch.isfinite(y).all()
    y.square().sum().backward()
    net = ff.router.net
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (net[0].weight, net[0].bias, net[2].weight))
    # soft top-k does not change when every score moves by the same amount: the last bias,
    # which moves them all, gets (up to rounding) no gradient
    assert net[2].bias.grad.abs().item() < 1e-4 * net[2].weight.grad.abs().sum().item()

    with pytest.raises(ValueError, match="score must return"):
        BadRouter()(x, num_tokens=k)
    with pytest.raises(NotImplementedError):
        Router()(x, num_tokens=k)


@pytest.mark.parametrize("routes", [1, 2])
def test_use_triton_matches_reference(routes):
    gen = torch.Generator().manual_seed(11)
    b, n, d, k = 2, 33, 8, 5
    ref = CoordinateDescentRouter(d, num_routing_tokens=routes, use_triton=False, straight_through=False, eps=0.3)
    tri = CoordinateDescentRouter(d, num_routing_tokens=routes, use_triton=True, straight_through=False, eps=0.3)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(b, n, d, generator=gen)
    mask = random_mask(b, n, k, gen)
    a, c = ref(x, num_tokens=k, mask=mask), tri(x, num_tokens=k, mask=mask)
    # the backends pick the same positions, not necessarily in the same order
    a_idx, a_order = a.indices.sort(-1)
    c_idx, c_order = c.indices.sort(-1)
    assert torch.equal(a_idx, c_idx)
    assert_close(c.scores.detach().gather(-1, c_order), a.scores.detach().gather(-1, a_order), 1e-5, "triton vs reference scores")
    a.scores.sum().backward()
    c.scores.sum().backward()
    assert_close(tri.routing_token.grad, ref.routing_token.grad, 1e-4, "triton vs reference grad")


def _by_position(ret):
    """A RouterReturn's picks reordered by position (routers promise no order)."""
    idx, order = ret.indices.sort(-1)
    tokens = ret.routed_tokens.gather(-2, order.unsqueeze(-1).expand(ret.routed_tokens.shape))
    return idx, ret.scores.gather(-1, order), tokens, ret.routed_mask.gather(-1, order)


class SelectOverride(CoordinateDescentRouter):
    def _select_rows(self, scores, mask, num_tokens, random_route):
        return super()._select_rows(scores, mask, num_tokens, random_route)


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("case", ["shared", "other-k", "other-schedule", "select-override"])
def test_route_together_matches_routing_one_by_one(monkeypatch, use_triton, case):
    gen = torch.Generator().manual_seed(12)
    b, n, d, k = 2, 40, 8, 6
    q = CoordinateDescentRouter(d, use_triton=use_triton, eps=0.2)
    kv_cls = SelectOverride if case == "select-override" else CoordinateDescentRouter
    kv = kv_cls(d, num_routing_tokens=3, use_triton=use_triton, eps=0.3 if case == "other-schedule" else 0.2)
    k_kv = k + 1 if case == "other-k" else k
    x = torch.randn(b, n, d, generator=gen, requires_grad=True)
    mask = random_mask(b, n, k + 1, gen)

    calls = []
    original = Router._select_rows
    monkeypatch.setattr(Router, "_select_rows", lambda self, *a: calls.append(a[0].shape) or original(self, *a))
    together = route_together(x, [(q, k, False), (kv, k_kv, True)], mask=mask)
    # one selection over all four rows when the routers can share it, else one per router
    if case != "select-override":
        assert calls == ([(b, 4, n)] if case == "shared" else [(b, 1, n), (b, 3, n)])
    apart = [q(x, num_tokens=k, mask=mask), kv(x, num_tokens=k_kv, mask=mask, keep_one_route_dim=True)]

    for got, want in zip(together, apart):
        assert got.indices.shape == want.indices.shape
        (gi, gs, gt, gm), (wi, ws, wt, wm) = _by_position(got), _by_position(want)
        assert torch.equal(gi, wi) and torch.equal(gm, wm)
        assert_close(gs.detach(), ws.detach(), 1e-5, "scores together vs apart")
        assert_close(gt.detach(), wt.detach(), 1e-6, "tokens together vs apart")
    loss = lambda rets: sum((r.scores * r.routed_tokens.sum(-1)).sum() for r in rets)  # noqa: E731
    params = [x, q.routing_token, kv.routing_token]
    for a, c in zip(torch.autograd.grad(loss(together), params), torch.autograd.grad(loss(apart), params)):
        assert_close(a, c, 1e-4, "gradients together vs apart")


def test_route_together_bad_input():
    q, kv = CoordinateDescentRouter(8), CoordinateDescentRouter(8, num_routing_tokens=2)
    x = torch.randn(1, 10, 8)
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        route_together(x, [(q, 0, False), (kv, 0, True)])
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        route_together(x, [(q, "3", False), (kv, 3, True)])
    with pytest.raises(ValueError, match="last dimension 8"):
        route_together(torch.randn(1, 10, 4), [(q, 3, False), (kv, 3, True)])
    with pytest.raises(ValueError, match="at least one"):
        route_together(x, [])
