"""ConditionalRoutedFeedForward: output vs a per-token reference, shapes/dtypes, masks, gradients,
edge cases, errors, Triton vs reference soft top-k."""

from __future__ import annotations

import pytest
import torch

from colt5.feedforward import ConditionalRoutedFeedForward, FeedForward
from conftest import assert_close

D = 16


def make(**kw):
    kw.setdefault("num_heavy_tokens", 4)
    return ConditionalRoutedFeedForward(D, **kw)


def padded_mask(b, n, lengths):
    return torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def test_plain_feedforward():
    ff = FeedForward(8, mult=2)
    x = torch.randn(3, 5, 8)
    h = torch.nn.functional.gelu(x @ ff.net[0].weight.T + ff.net[0].bias)
    assert_close(ff(x), h @ ff.net[2].weight.T + ff.net[2].bias, 1e-6, "FeedForward")
    assert ff.net[0].out_features == 16
    with pytest.raises(ValueError, match="mult"):
        FeedForward(8, mult=0)


@pytest.mark.parametrize("masked", [False, True])
def test_output_matches_per_token_reference(seeded, masked):
    b, n = 2, 13
    ff = make(router_straight_through=False, router_kwargs=dict(eps=0.5))
    with torch.no_grad():
        ff.router.routing_token.mul_(0.1)  # unsaturated soft weights
    x = torch.randn(b, n, D)
    mask = padded_mask(b, n, [13, 6]) if masked else None
    y = ff(x, mask=mask)
    # Reference: route separately, then add s_i * heavy(x_i) token by token.
    xn = ff.norm(x)
    idx, scores, _, routed_mask = ff.router(xn, num_tokens=4, mask=mask)
    expected = ff.light_ff(xn).clone()
    for i in range(b):
        for t in range(idx.shape[1]):
            if routed_mask is None or routed_mask[i, t]:
                expected[i, idx[i, t]] += scores[i, t] * ff.heavy_ff(xn[i, idx[i, t]])
    assert_close(y, expected, 1e-5, "routed ff")
    assert (scores < 1).any()  # soft weights really scale the heavy output here


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_shapes_and_dtypes(seeded, autocast):
    ff = make()
    x = torch.randn(2, 11, D)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = ff(x, mask=padded_mask(2, 11, [11, 4]))
        y2 = ff(x, num_heavy_tokens=7)
    assert y.shape == y2.shape == x.shape
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()


def test_changing_padding_changes_no_real_output(seeded):
    b, n = 3, 17
    ff = make()
    x = torch.randn(b, n, D)
    mask = padded_mask(b, n, [17, 9, 3])  # row 2 has fewer real tokens than num_heavy_tokens
    x2 = torch.where(mask.unsqueeze(-1), x, torch.randn(b, n, D) * 5)
    y, y2 = ff(x, mask=mask), ff(x2, mask=mask)
    assert torch.equal(y[mask], y2[mask])


def test_gradients_reach_router_and_both_branches(seeded):
    ff = make(router_kwargs=dict(eps=1.0))
    with torch.no_grad():  # off saturation: saturated picks get exactly zero gradient
        for name, p in ff.named_parameters():
            if "routing_token" in name:
                p.mul_(0.1)
    x = torch.randn(2, 12, D, requires_grad=True)
    ff(x, mask=padded_mask(2, 12, [12, 8])).square().sum().backward()
    for name, p in ff.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [1, 3, 4])
def test_short_sequences_take_the_no_route_path(seeded, n):
    ff = make()
    x = torch.randn(2, n, D)
    xn = ff.norm(x)
    assert_close(ff(x), ff.light_ff(xn) + ff.heavy_ff(xn), 1e-5, "no-route ff")


def test_fully_padded_row_is_finite(seeded):
    ff = make()
    x = torch.randn(2, 9, D, requires_grad=True)
    mask = padded_mask(2, 9, [9, 0])
    y = ff(x, mask=mask)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_errors():
    ff = make()
    with pytest.raises(ValueError, match="num_heavy_tokens"):
        make(num_heavy_tokens=0)
    with pytest.raises(ValueError, match="num_heavy_tokens"):
        ff(torch.randn(1, 8, D), num_heavy_tokens=0)
    with pytest.raises(ValueError, match="rank"):
        ff(torch.randn(8, D))
    with pytest.raises(ValueError, match="last dimension"):
        ff(torch.randn(1, 8, D + 1))
    with pytest.raises(ValueError, match="mask must have shape"):
        ff(torch.randn(1, 8, D), mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="router_kwargs"):
        make(router_kwargs=[("eps", 1.0)])
    with pytest.raises(ValueError, match="num_routing_tokens"):
        make(router_kwargs=dict(num_routing_tokens=2))


def test_use_triton_matches_reference(seeded):
    ref = make(use_triton=False, router_kwargs=dict(eps=0.5))
    tri = make(use_triton=True, router_kwargs=dict(eps=0.5))
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 15, D, requires_grad=True)
    mask = padded_mask(2, 15, [15, 10])
    y_ref, y_tri = ref(x, mask=mask), tri(x, mask=mask)
    assert_close(y_tri, y_ref, 1e-5, "output")
    g_ref = torch.autograd.grad(y_ref.square().sum(), ref.router.routing_token)[0]
    g_tri = torch.autograd.grad(y_tri.square().sum(), tri.router.routing_token)[0]
    assert_close(g_tri, g_ref, 1e-4, "router grad")
