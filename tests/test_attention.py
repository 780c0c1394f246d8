"""ConditionalRoutedAttention: the heavy branch against a per-query, per-head loop (null
key/value, kv routes splitting heads, score scaling, rotary at original positions, null query
tokens), shapes/dtypes, masks, gradients, edge cases, errors, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from colt5.attention import ConditionalRoutedAttention
from colt5.rotary import apply_rotary
from conftest import assert_close

D, H, DH = 16, 4, 8


def make(**kw):
    cfg = dict(
        num_heavy_tokens_q=4,
        num_heavy_tokens_kv=5,
        light_dim_head=8,
        light_heads=2,
        light_window_size=4,
        heavy_dim_head=DH,
        heavy_heads=H,
    )
    cfg.update(kw)
    return ConditionalRoutedAttention(D, **cfg)


def padded_mask(b, n, lengths):
    return torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


# ---------------------------------------------------------------------- ConditionalRoutedAttention


def naive_routed_attention(attn, x, mask, nq, nkv):
    """The heavy branch (has_light_attn=False), one routed query and one head at a time."""
    b, n, d = x.shape
    r = attn.num_routed_kv
    hr = H // r
    xn = attn.norm(x)
    qi, qs, _, qm = attn.q_router(xn, num_tokens=nq, mask=mask)
    kvi, kvs, _, kvm = attn.kv_router(xn, num_tokens=nkv, mask=mask, keep_one_route_dim=True)
    heavy = attn.heavy
    wq = heavy.to_q.weight.view(H, DH, d)
    wkv = heavy.to_kv.weight.view(r, 2, hr, DH, d)  # documented layout: (route, k|v, head, dh)
    wo = heavy.to_out.weight
    null_k, null_v = heavy.null_kv

    def rot(t, pos):
        if heavy.rotary is None:
            return t
        return apply_rotary(t.view(1, DH), heavy.rotary(torch.tensor([pos]))).view(DH)

    out = torch.zeros(b, n, d) if heavy.null_q_token is None else heavy.null_q_token.expand(b, n, d).clone()
    for bi in range(b):
        for t in range(qi.shape[1]):
            if qm is not None and not qm[bi, t]:
                continue
            p = int(qi[bi, t])
            heads = []
            for hh in range(H):
                g, jj = divmod(hh, hr)
                q = rot(wq[hh] @ xn[bi, p], p)
                if heavy.multiply_queries_by_score:
                    q = q * qs[bi, t]
                keys, vals = [null_k[hh]], [null_v[hh]]
                for u in range(kvi.shape[2]):
                    if kvm is not None and not kvm[bi, g, u]:
                        continue
                    pos = int(kvi[bi, g, u])
                    s = kvs[bi, g, u]
                    kk = rot(wkv[g, 0, jj] @ xn[bi, pos], pos)
                    keys.append(kk * s if heavy.multiply_keys_by_score else kk)
                    vals.append((wkv[g, 1, jj] @ xn[bi, pos]) * s)
                a = (torch.stack(keys) @ q * DH**-0.5).softmax(0)
                heads.append(a @ torch.stack(vals))
            out[bi, p] = (wo @ torch.cat(heads)) * qs[bi, t]
    return out


@pytest.mark.parametrize(
    "routes,rotary,mult,masked",
    [(1, False, False, False), (2, True, True, True), (4, True, False, True), (2, False, True, False)],
    ids=["r1", "r2-rotary-mult-masked", "r4-rotary-masked", "r2-mult"],
)
def test_heavy_branch_vs_loop(seeded, routes, rotary, mult, masked):
    b, n = 2, 13
    attn = make(
        num_routed_kv=routes,
        rotary_emb=rotary,
        multiply_keys_by_score=mult,
        multiply_queries_by_score=mult,
        has_light_attn=False,
        router_straight_through=False,
        router_kwargs=dict(eps=0.5),
    )
    with torch.no_grad():  # unsaturated soft weights, so the score scaling is visible
        attn.q_router.routing_token.mul_(0.1)
        attn.kv_router.routing_token.mul_(0.1)
    x = torch.randn(b, n, D)
    mask = padded_mask(b, n, [13, 3]) if masked else None  # row 1: fewer real than routed
    y = attn(x, mask=mask)
    assert_close(y, naive_routed_attention(attn, x, mask, 4, 5), 1e-5, "routed attention")


def test_light_branch_is_local_mha_of_the_normed_input(seeded):
    attn = make()
    x = torch.randn(2, 11, D)
    mask = padded_mask(2, 11, [11, 7])
    full = attn(x, mask=mask)
    light = attn.light_attn(attn.norm(x), mask=mask)
    attn.light_attn = None
    assert_close(full, light + attn(x, mask=mask), 1e-5, "light + heavy")


def test_unrouted_queries_get_the_null_token(seeded):
    attn = make(has_light_attn=False)
    x = torch.randn(2, 12, D)
    y = attn(x)
    qi = attn.q_router(attn.norm(x), num_tokens=4).indices
    unrouted = torch.ones(2, 12, dtype=torch.bool).scatter(1, qi, False)
    with torch.no_grad():
        attn.heavy.null_q_token.normal_()  # zeros at initialisation
    y = attn(x)
    assert torch.equal(y[unrouted], attn.heavy.null_q_token.detach().expand(int(unrouted.sum()), D))
    attn0 = make(has_light_attn=False, use_null_q_tokens=False)
    assert attn0.heavy.null_q_token is None
    qi0 = attn0.q_router(attn0.norm(x), num_tokens=4).indices
    unrouted0 = torch.ones(2, 12, dtype=torch.bool).scatter(1, qi0, False)
    y0 = attn0(x)
    assert (y0[unrouted0] == 0).all() and (y0[~unrouted0] != 0).any()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("routes", [1, 2])
def test_shapes_and_dtypes(seeded, autocast, routes):
    attn = make(num_routed_kv=routes, rotary_emb=True)
    x = torch.randn(2, 10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = attn(x, mask=padded_mask(2, 10, [10, 6]))
        y2 = attn(x, num_heavy_tokens_q=2, num_heavy_tokens_kv=9)
    assert y.shape == y2.shape == x.shape
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()


@pytest.mark.parametrize("routes", [1, 2])
def test_changing_padding_changes_no_real_output(seeded, routes):
    b, n = 3, 15
    attn = make(num_routed_kv=routes, rotary_emb=True)
    x = torch.randn(b, n, D)
    mask = padded_mask(b, n, [15, 7, 2])
    x2 = torch.where(mask.unsqueeze(-1), x, torch.randn(b, n, D) * 5)
    assert torch.equal(attn(x, mask=mask)[mask], attn(x2, mask=mask)[mask])


def test_gradients_reach_every_parameter(seeded):
    attn = make(num_routed_kv=2, rotary_emb=True, router_kwargs=dict(eps=1.0))
    with torch.no_grad():  # off saturation: saturated picks get exactly zero gradient
        for name, p in attn.named_parameters():
            if "routing_token" in name:
                p.mul_(0.1)
    x = torch.randn(2, 14, D, requires_grad=True)
    attn(x, mask=padded_mask(2, 14, [14, 9])).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [1, 3, 5])
def test_short_sequences_and_padded_rows_are_finite(seeded, n):
    attn = make(num_routed_kv=2, rotary_emb=True)
    x = torch.randn(2, n, D, requires_grad=True)
    mask = padded_mask(2, n, [n, 0])
    y = attn(x, mask=mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_errors():
    with pytest.raises(ValueError, match="divisible by num_routed_kv"):
        make(num_routed_kv=3)
    with pytest.raises(ValueError, match="num_heavy_tokens_q"):
        make(num_heavy_tokens_q=0)
    with pytest.raises(ValueError, match="num_heavy_tokens_kv"):
        make(num_heavy_tokens_kv=0)
    with pytest.raises(ValueError, match="even heavy_dim_head"):
        make(rotary_emb=True, heavy_dim_head=7)
    attn = make()
    with pytest.raises(ValueError, match="rank"):
        attn(torch.randn(8, D))
    with pytest.raises(ValueError, match="last dimension"):
        attn(torch.randn(1, 8, D + 2))
    with pytest.raises(ValueError, match="mask must have shape"):
        attn(torch.randn(1, 8, D), mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_heavy_tokens_kv"):
        attn(torch.randn(1, 8, D), num_heavy_tokens_kv=0)


def test_use_triton_matches_reference(seeded):
    ref = make(num_routed_kv=2, use_triton=False, router_kwargs=dict(eps=0.5))
    tri = make(num_routed_kv=2, use_triton=True, router_kwargs=dict(eps=0.5))
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 12, D)
    mask = padded_mask(2, 12, [12, 8])
    y_ref, y_tri = ref(x, mask=mask), tri(x, mask=mask)
    assert_close(y_tri, y_ref, 1e-5, "output")
    params = [ref.q_router.routing_token, ref.kv_router.routing_token]
    g_ref = torch.autograd.grad(y_ref.square().sum(), params)
    g_tri = torch.autograd.grad(y_tri.square().sum(), [tri.q_router.routing_token, tri.kv_router.routing_token])
    for a, c in zip(g_tri, g_ref):
        assert_close(a, c, 1e-4, "router grad")
