"""ConditionalRoutedCrossAttention against a float64 per-query loop built from the routers' picks."""

import math

import pytest
import torch
from conftest import assert_close

from colt5 import ConditionalRoutedCrossAttention

D, DC, DH = 16, 12, 4


def make(heads=4, r=1, block=None, nq=5, nkv=6, straight_through=False, **kw):
    torch.manual_seed(0)
    mod = ConditionalRoutedCrossAttention(
        D,
        num_tokens_q=nq,
        num_tokens_kv=nkv,
        dim_head=DH,
        heads=heads,
        kv_routing_tokens=r,
        route_block_size=block,
        router_straight_through=straight_through,
        router_kwargs=dict(eps=0.5),
        dim_context=DC,
        **kw,
    ).double()
    if mod.heavy.null_q_token is not None:
        with torch.no_grad():  # zeros at initialisation: make it visible
            mod.heavy.null_q_token.normal_()
    return mod


def inputs(b=2, n=11, m=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, D, generator=g, dtype=torch.float64), torch.randn(b, m, DC, generator=g, dtype=torch.float64)


def reference(mod, x, context, nq, nkv, mask=None, context_mask=None):
    """Per batch, per routed query, per head: softmax over [null] + that head's route's picks."""
    b, n, _ = x.shape
    h, r = mod.heads, mod.kv_routing_tokens
    g = h // r
    qr = mod.q_router(x, num_tokens=nq, mask=mask)
    kvr = mod.kv_router(context, num_tokens=nkv, mask=context_mask, keep_one_route_dim=True)
    q_idx = torch.arange(n).expand(b, n) if qr.indices is None else qr.indices
    heavy = mod.heavy
    wkv = heavy.to_kv.weight.view(r, 2, g * DH, DC)  # rows ordered (route, k|v, head-in-route, dh)
    null_k, null_v = heavy.null_kv
    out = torch.zeros(b, n, D, dtype=torch.float64)
    null_out = heavy.null_q_token if heavy.null_q_token is not None else torch.zeros(D, dtype=torch.float64)
    for bi in range(b):
        out[bi] = null_out.detach()
        for qi_pos, qi in enumerate(q_idx[bi].tolist()):
            q = heavy.to_q(mod.norm(x[bi, qi]))
            heads_out = []
            for hh in range(h):
                route = hh // g
                toks = mod.context_norm(kvr.routed_tokens[bi, route])  # [j, c]
                rows = slice((hh % g) * DH, (hh % g + 1) * DH)
                k, v = toks @ wkv[route, 0, rows].T, toks @ wkv[route, 1, rows].T
                if kvr.scores is not None:
                    s = kvr.scores[bi, route].unsqueeze(-1)
                    v = v * s
                    if heavy.multiply_keys_by_score:
                        k = k * s
                keep = torch.ones(k.shape[0], dtype=torch.bool) if kvr.routed_mask is None else kvr.routed_mask[bi, route]
                k = torch.cat([null_k[hh : hh + 1], k[keep]])
                v = torch.cat([null_v[hh : hh + 1], v[keep]])
                logits = k @ q[hh * DH:(hh + 1) * DH] / math.sqrt(DH)
                heads_out.append(torch.softmax(logits, 0) @ v)
            o = heavy.to_out(torch.cat(heads_out))
            if qr.scores is not None:
                o = o * qr.scores[bi, qi_pos]
            out[bi, qi] = o
    return out.detach()


@pytest.mark.parametrize(
    "heads,r,block,m,keys",
    [
        (4, 1, None, 40, False),
        (4, 1, 8, 40, False),  # context routed in 5 blocks
        (4, 2, 16, 37, True),  # two kv routes, ragged last block, keys scaled too
        (6, 3, None, 40, False),
        (4, 2, None, 5, False),  # context shorter than its routed count
    ],
    ids=["plain", "blocks", "routes2-blocks-ragged-keys", "routes3", "short-context"],
)
def test_matches_reference(heads, r, block, m, keys):
    mod = make(heads=heads, r=r, block=block, multiply_keys_by_score=keys)
    x, context = inputs(m=m)
    with torch.no_grad():
        assert_close(mod(x, context), reference(mod, x, context, 5, 6), 1e-10, "output")


def test_block_routing_takes_top_of_each_block():
    mod = make(r=2, block=10, nkv=8)
    _, context = inputs(m=40)
    kvr = mod.kv_router(context, num_tokens=8, keep_one_route_dim=True)
    scores = torch.einsum("b m c, r c -> b r m", context, mod.kv_router.routing_token.detach())
    for bi in range(2):
        for route in range(2):
            picks = kvr.indices[bi, route]
            assert picks.numel() == 8
            for blk in range(4):
                in_blk = picks[(picks >= blk * 10) & (picks < blk * 10 + 10)]
                expected = scores[bi, route, blk * 10 : blk * 10 + 10].topk(2).indices + blk * 10
                assert sorted(in_blk.tolist()) == sorted(expected.tolist())


@pytest.mark.parametrize("block", [None, 8])
def test_padded_context_never_changes_real_outputs(block):
    mod = make(r=2, block=block)
    x, context = inputs(m=40)
    cmask = torch.ones(2, 40, dtype=torch.bool)
    cmask[0, 25:] = False
    cmask[1, ::3] = False
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    with torch.no_grad():
        out = mod(x, context, mask=mask, context_mask=cmask)
        other = context.clone()
        other[~cmask] = torch.randn(int((~cmask).sum()), DC, dtype=torch.float64) * 100
        again = mod(x, other, mask=mask, context_mask=cmask)
        assert_close(again[mask], out[mask], 1e-12, "padding values changed real outputs")
        assert_close(out, reference(mod, x, context, 5, 6, mask, cmask), 1e-10, "masked vs reference")
    if block is None:
        # Appending more padding changes nothing either.
        longer = torch.cat([context, torch.randn(2, 9, DC, dtype=torch.float64)], 1)
        lmask = torch.cat([cmask, torch.zeros(2, 9, dtype=torch.bool)], 1)
        with torch.no_grad():
            assert_close(mod(x, longer, mask=mask, context_mask=lmask)[mask], out[mask], 1e-12, "appended padding")


@pytest.mark.parametrize("block", [None, 8])
def test_fully_padded_context_row_attends_null_only(block):
    mod = make(r=2, block=block)
    x, context = inputs(m=40)
    cmask = torch.ones(2, 40, dtype=torch.bool)
    cmask[1] = False
    out = mod(x, context, context_mask=cmask)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        qr = mod.q_router(x[1:], num_tokens=5)
        null_attn = mod.heavy.to_out(mod.heavy.null_kv[1].reshape(-1))  # softmax over the null slot alone
        assert_close(out[1, qr.indices[0]], (qr.scores[0, :, None] * null_attn).detach(), 1e-12, "null only")
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters() if p.grad is not None)


@pytest.mark.parametrize("use_null", [True, False])
def test_short_queries_and_unrouted_null(use_null):
    mod = make(use_null_q_tokens=use_null)
    x, context = inputs(n=3, m=40)  # fewer queries than num_tokens_q: all routed, no null
    with torch.no_grad():
        assert_close(mod(x, context), reference(mod, x, context, 5, 6), 1e-10, "short queries")
        x, context = inputs(n=11, m=40)
        out = mod(x, context, num_tokens_q=2, num_tokens_kv=3)
        picked = mod.q_router(x, num_tokens=2).indices
        unrouted = torch.ones(2, 11, dtype=torch.bool)
        unrouted.scatter_(1, picked, False)
        null = mod.heavy.null_q_token if use_null else torch.zeros(D, dtype=torch.float64)
        assert torch.equal(out[unrouted], null.expand(int(unrouted.sum()), D))
        assert_close(out, reference(mod, x, context, 2, 3), 1e-10, "forward overrides")


def test_gradients_reach_routers_and_weights():
    torch.manual_seed(0)
    mod = ConditionalRoutedCrossAttention(
        D, num_tokens_q=4, num_tokens_kv=6, dim_head=DH, heads=4, kv_routing_tokens=2, route_block_size=10, dim_context=DC
    )
    x, context = (t.float() * 0.1 for t in inputs(m=40))  # small scores: soft weights not saturated
    out = mod(x, context.requires_grad_())
    (out * torch.randn_like(out)).sum().backward()
    assert out.shape == (2, 11, D)
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert context.grad.abs().sum() > 0


def test_bf16_autocast_cpu():
    mod = make(r=2, block=8).float()
    x, context = (t.float() for t in inputs(m=40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x, context)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 11, D)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(mod.heavy.to_kv.weight.grad).all()


def test_bad_input():
    mod = make()
    x, context = inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        mod(x[0], context)
    with pytest.raises(ValueError, match="context must have shape"):
        mod(x, context[0])
    with pytest.raises(ValueError, match="context must have last dimension 12"):
        mod(x, torch.randn(2, 40, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have last dimension 16"):
        mod(x[..., :5], context)
    with pytest.raises(ValueError, match="context must have batch 2"):
        mod(x, context[:1])
    with pytest.raises(ValueError, match="num_tokens_q must be >= 1"):
        mod(x, context, num_tokens_q=0)
    with pytest.raises(ValueError, match="num_tokens_kv must be >= 1"):
        mod(x, context, num_tokens_kv=-3)
    with pytest.raises(TypeError, match="context_mask must be a bool"):
        mod(x, context, context_mask=torch.ones(2, 40))
    with pytest.raises(ValueError, match="context_mask must have shape"):
        mod(x, context, context_mask=torch.ones(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        mod(x, context, mask=torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_tokens_kv must be >= 1"):
        ConditionalRoutedCrossAttention(D, num_tokens_q=1, num_tokens_kv=0)
    with pytest.raises(ValueError, match="divisible by kv_routing_tokens"):
        ConditionalRoutedCrossAttention(D, num_tokens_q=1, num_tokens_kv=1, heads=4, kv_routing_tokens=3)
    with pytest.raises(ValueError, match="route_block_size"):
        ConditionalRoutedCrossAttention(D, num_tokens_q=1, num_tokens_kv=1, router_kwargs=dict(route_block_size=4))


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break (host syncs, data-dependent Python branches)."""
    mod = make(r=2, block=8).float()
    x, context = (t.float() for t in inputs(m=40))
    cmask = torch.ones(2, 40, dtype=torch.bool)
    cmask[1, 20:] = False
    compiled = torch.compile(mod, backend="eager", fullgraph=True)
    out = compiled(x, context, context_mask=cmask)
    assert_close(out, mod(x, context, context_mask=cmask), 1e-6, "compiled")
    out.sum().backward()
