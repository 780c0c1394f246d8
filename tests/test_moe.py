"""ConditionalRoutedMoEFeedForward: output vs a loop over experts, expert load, masks, gradients."""

from __future__ import annotations

import pytest
import torch

from colt5.moe import ConditionalRoutedMoEFeedForward, expert_load
from conftest import assert_close

D, E = 12, 3


def make(**kw):
    kw.setdefault("num_heavy_tokens", 4)
    return ConditionalRoutedMoEFeedForward(D, num_experts=E, **kw)


def padded_mask(b, n, lengths):
    return torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def expert_ff(moe, e, x):
    h = torch.nn.functional.gelu(x @ moe.w1[e] + moe.b1[e])
    return h @ moe.w2[e] + moe.b2[e]


@pytest.mark.parametrize("masked", [False, True])
def test_output_matches_loop_over_experts(seeded, masked):
    b, n, k = 2, 14, 4
    moe = make(router_straight_through=False, router_kwargs=dict(eps=0.5))
    with torch.no_grad():
        moe.router.routing_token.mul_(0.1)  # unsaturated soft weights
    x = torch.randn(b, n, D)
    mask = padded_mask(b, n, [14, 3]) if masked else None
    y = moe(x, mask=mask)
    xn = moe.norm(x)
    idx, scores, _, rmask = moe.router(xn, num_tokens=k, mask=mask, keep_one_route_dim=True)
    assert idx.shape == (b, E, k)
    expected = moe.light_ff(xn).clone()
    for i in range(b):
        for e in range(E):
            for t in range(k):
                if rmask is None or rmask[i, e, t]:
                    p = idx[i, e, t]
                    expected[i, p] += scores[i, e, t] * expert_ff(moe, e, xn[i, p])
    assert_close(y, expected, 1e-5, "moe")
    assert (scores < 1).any()


def test_expert_load_vs_counting(seeded):
    b, n, k = 3, 20, 5
    moe = make(num_heavy_tokens=k)
    x = torch.randn(b, n, D)
    mask = padded_mask(b, n, [20, 12, 3])
    y, load = moe(x, mask=mask, return_load=True)
    assert torch.equal(y, moe(x, mask=mask))
    idx, _, _, rmask = moe.router(moe.norm(x), num_tokens=k, mask=mask, keep_one_route_dim=True)
    for i in range(b):
        counts = [0] * n
        for e in range(E):
            real = [p for p, m in zip(idx[i, e].tolist(), rmask[i, e].tolist()) if m]
            assert load.tokens_per_expert[i, e] == len(real)
            for p in real:
                counts[p] += 1
        assert load.experts_per_token[i].tolist() == counts
        reals = [c for c, m in zip(counts, mask[i].tolist()) if m]
        assert load.tokens_with_0[i] == sum(c == 0 for c in reals)
        assert load.tokens_with_1[i] == sum(c == 1 for c in reals)
        assert load.tokens_with_2plus[i] == sum(c >= 2 for c in reals)
    # Expert choice: every expert fills its capacity while enough real tokens exist.
    assert load.tokens_per_expert[0].tolist() == [k] * E
    assert load.tokens_per_expert[2].tolist() == [3] * E
    assert (load.tokens_with_0 + load.tokens_with_1 + load.tokens_with_2plus).tolist() == [20, 12, 3]


def test_no_route_path_every_expert_takes_every_token(seeded):
    moe = make(num_heavy_tokens=8)
    x = torch.randn(2, 5, D)
    y, load = moe(x, return_load=True)
    xn = moe.norm(x)
    expected = moe.light_ff(xn) + sum(expert_ff(moe, e, xn) for e in range(E))
    assert_close(y, expected, 1e-5, "no-route moe")
    assert (load.experts_per_token == E).all() and (load.tokens_with_2plus == 5).all()
    load_none = expert_load(None, None, None, b=1, n=4, e=2)
    assert load_none.tokens_per_expert.tolist() == [[4, 4]]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_dtypes_masks_gradients(seeded, autocast):
    b, n = 2, 16
    moe = make(router_kwargs=dict(eps=1.0))
    with torch.no_grad():  # off saturation: saturated picks get exactly zero gradient
        for name, p in moe.named_parameters():
            if "routing_token" in name:
                p.mul_(0.1)
    x = torch.randn(b, n, D, requires_grad=True)
    mask = padded_mask(b, n, [16, 0])  # one fully padded row
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = moe(x, mask=mask)
    assert y.shape == x.shape and y.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.isfinite(y).all()
    y.float().square().sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    x2 = torch.where(mask.unsqueeze(-1), x, torch.randn(b, n, D))
    assert torch.equal(moe(x, mask=mask)[mask], moe(x2, mask=mask)[mask])


def test_errors():
    with pytest.raises(ValueError, match="num_experts"):
        ConditionalRoutedMoEFeedForward(D, num_experts=0, num_heavy_tokens=2)
    with pytest.raises(ValueError, match="num_heavy_tokens"):
        make(num_heavy_tokens=0)
    with pytest.raises(ValueError, match="num_routing_tokens"):
        make(router_kwargs=dict(num_routing_tokens=2))
    with pytest.raises(ValueError, match="last dimension"):
        make()(torch.randn(1, 4, D + 1))
