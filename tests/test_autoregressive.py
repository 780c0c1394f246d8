"""Strictly causal routing and the autoregressive CoLT5 layers."""

from __future__ import annotations

import math
import os

import pytest
import torch

from colt5 import coor_descent
from colt5.autoregressive import (
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedAutoregressiveFeedForward,
    ConditionalRoutedAutoregressiveTransformer,
    ConditionalRoutedAutoregressiveTransformerBlock,
)
from colt5.causal_routing import CausalCoordinateDescentRouter, soft_top_k_offset
from conftest import TOLERANCES, assert_close

D = 16
LIGHT_W = 4  # light window: edges at 4, 8, 12, ...
HEAVY_W = 6  # heavy (routing) window: edges at 6, 12, 18, ...
SMALL = dict(light_dim_head=8, light_heads=2, light_window_size=LIGHT_W, heavy_window_size=HEAVY_W, heavy_dim_head=8, heavy_heads=4)


def attention(**kw) -> ConditionalRoutedAutoregressiveAttention:
    args = dict(num_heavy_tokens_q=2, num_heavy_tokens_kv=3, num_routed_kv=2, rotary_emb=True, **SMALL)
    args.update(kw)
    return ConditionalRoutedAutoregressiveAttention(D, **args)


def feedforward(**kw) -> ConditionalRoutedAutoregressiveFeedForward:
    return ConditionalRoutedAutoregressiveFeedForward(D, **{"num_heavy_tokens": 2, "heavy_window_size": HEAVY_W, **kw})


def block(**kw) -> ConditionalRoutedAutoregressiveTransformerBlock:
    args = dict(num_heavy_attn_tokens_q=2, num_heavy_attn_tokens_kv=3, num_routed_kv=2, num_heavy_ff_tokens=2, rotary_emb=True, **SMALL)
    args.update(kw)
    return ConditionalRoutedAutoregressiveTransformerBlock(D, **args)


def stack(**kw) -> ConditionalRoutedAutoregressiveTransformer:
    args = dict(num_heavy_attn_tokens_q=2, num_heavy_attn_tokens_kv=3, num_heavy_ff_tokens=2, **SMALL)
    args.update(kw)
    return ConditionalRoutedAutoregressiveTransformer(D, depth=2, **args)


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Non-zero null tokens and larger routing tokens, so every path shows in the output."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "null" in name or "routing_token" in name:
                p.normal_(0, 1.0)
    return module


# -------------------------------------------------------------------------------------------
# causality


N_CAUSAL = 23  # not a multiple of either window
# Window edges (light 4, heavy 6) and their neighbours, the first window, the last position.
JS = sorted({1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 16, 17, 18, 19, 22})


def causal_violations(model: torch.nn.Module, n: int = N_CAUSAL, js=JS, **forward_kw) -> list[tuple[int, float]]:
    """Positions j where replacing x[:, j:] changes some output before j by more than 1e-9."""
    torch.manual_seed(1)
    x = torch.randn(2, n, D, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x, **forward_kw)
        bad = []
        for j in js:
            x2 = x.clone()
            x2[:, j:] = torch.randn_like(x2[:, j:]) * 3
            out = model(x2, **forward_kw)
            err = (out[:, :j] - ref[:, :j]).abs().max().item()
            if not err <= 1e-9:
                bad.append((j, err))
            # The replacement must matter at j itself, or the test would prove nothing.
            assert (out[:, j] - ref[:, j]).abs().max().item() > 1e-6
    return bad


@pytest.mark.parametrize("make", [attention, feedforward, block, stack], ids=["attention", "feedforward", "block", "stack"])
def test_causal(make):
    torch.manual_seed(0)
    model = randomise(make()).double()
    assert causal_violations(model) == []


def test_causal_options():
    torch.manual_seed(0)
    model = randomise(block(multiply_keys_by_score=True, multiply_queries_by_score=True, use_null_q_tokens=False,
                            router_straight_through=False, router_kwargs={"cosine_sim_routing": True})).double()
    assert causal_violations(model) == []


def test_causal_random_route():
    torch.manual_seed(0)
    model = randomise(block()).double()
    # Same coins for the reference run and each replaced run: reseed inside the forward.
    forward = model.forward

    def seeded_forward(x, **kw):
        torch.manual_seed(123)
        return forward(x, **kw)

    model.forward = seeded_forward
    assert causal_violations(model, random_route=True) == []


class LeakyRouter(CausalCoordinateDescentRouter):
    """A router that thresholds each window by its OWN soft top-k: not causal."""

    def _window_weights(self, s, real, C):
        a, e = soft_top_k_offset(s, k=C, n_iters=self.n_iters, eps=self.eps, eps_init=self.eps_init, eps_decay=self.eps_decay, mask=real)
        logits = s.double() + a
        return torch.exp(logits.clamp_max(0) / e), logits > -e * math.log(2)


def test_causality_check_catches_a_leaky_router():
    torch.manual_seed(0)
    model = randomise(attention(num_routed_kv=1)).double()
    leaky = LeakyRouter(D, window_size=HEAVY_W).double()
    leaky.load_state_dict(model.q_router.state_dict())
    model.q_router = leaky
    assert causal_violations(model) != []


# -------------------------------------------------------------------------------------------
# the router against a loop reference


def reference_routing(scores: torch.Tensor, C: int, W: int, k: float, sched: dict) -> tuple[list, list]:
    """One row of scores [n]: routed positions and their soft weights, token by token."""
    n = scores.shape[0]
    picked, weights = [], []
    for start in range(0, n, W):
        taken = 0
        if start > 0:
            prev = scores[start - W : start]
            y_prev = coor_descent(prev, k=k, **sched)
            # Recover the dual from the soft top-k's definition: sum_j exp(min(s_j + a, 0)/e) = k',
            # solved by bisection, independent of soft_top_k_offset.
            e = sched["eps"]
            lo, hi = -prev.max().item() - 50, -prev.min().item() + 50
            target = y_prev.sum().item()
            for _ in range(200):
                mid = (lo + hi) / 2
                if torch.exp((prev + mid).clamp_max(0) / e).sum().item() > target:
                    hi = mid
                else:
                    lo = mid
            a = (lo + hi) / 2
        for i in range(start, min(start + W, n)):
            if start == 0:
                ok, y = True, 1.0
            else:
                y = math.exp(min(scores[i].item() + a, 0.0) / e)
                ok = y > 0.5
            if ok and taken < C:
                picked.append(i)
                weights.append(y)
                taken += 1
    return picked, weights


@pytest.mark.parametrize("n, fetch", [(1, 1.5), (3, 1.5), (6, 1.5), (7, 1.5), (29, 1.5), (48, 1.5), (48, 1.0), (48, 2.0)])
def test_router_matches_loop_reference(n, fetch):
    torch.manual_seed(n)
    W, C = 8, 3
    sched = dict(n_iters=30, eps=0.1, eps_init=4.0, eps_decay=0.7)
    router = CausalCoordinateDescentRouter(D, window_size=W, straight_through=False, fetch_k_ratio=fetch, **sched).double()
    x = torch.randn(2, n, D, dtype=torch.float64)
    indices, weights, tokens, mask = router(x, num_tokens=C)
    nw = -(-n // W)
    assert indices.shape == weights.shape == mask.shape == (2, nw * C) and tokens.shape == (2, nw * C, D)
    scores = router.score(x)[:, 0]
    for bi in range(2):
        picked, ws = reference_routing(scores[bi], C, W, min(C * fetch, W), sched)
        assert indices[bi][mask[bi]].tolist() == picked
        assert_close(weights[bi][mask[bi]], torch.tensor(ws, dtype=torch.float64), 1e-6, "weights")
        assert_close(tokens[bi][mask[bi]], x[bi, picked], 0.0, "gathered tokens")


def test_offset_reproduces_coor_descent():
    torch.manual_seed(0)
    s = torch.randn(5, 37, dtype=torch.float64) * 2
    mask = torch.rand(5, 37) > 0.2
    sched = dict(n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7)
    a, e = soft_top_k_offset(s, k=4.5, mask=mask, **sched)
    y = torch.exp((s + a).clamp_max(0) / e).masked_fill(~mask, 0)
    assert_close(y, coor_descent(s, k=4.5, mask=mask, **sched), TOLERANCES[torch.float64][0], "y")


def test_router_fills_slots_by_score():
    """Stationary scores: windows after the first take about C tokens, the higher-scored ones."""
    torch.manual_seed(0)
    W, C = 32, 4
    router = CausalCoordinateDescentRouter(D, window_size=W)
    x = torch.randn(4, 32 * W, D)
    indices, _, _, mask = router(x, num_tokens=C)
    used = mask.view(4, 32, C)[:, 1:].float().sum(-1)
    assert used.mean() > 0.8 * C  # about 0.88 C at the default fetch_k_ratio 1.5
    scores = router.score(x)[:, 0]
    picked = scores.gather(1, indices)[mask]
    assert picked.mean() > scores.mean() + 1.0  # routed tokens score well above average


# -------------------------------------------------------------------------------------------
# gradients, dtypes, edge cases


def test_gradients_reach_routers_and_branches():
    torch.manual_seed(0)
    # A soft enough eps that some routed weights are below 1 (saturated ones carry no gradient).
    model = stack(num_routed_kv=2, rotary_emb=True, router_kwargs={"eps": 0.5})
    x = torch.randn(2, 29, D, requires_grad=True)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "routing_token" in name:
            assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_straight_through_weights_are_one_in_forward():
    router = CausalCoordinateDescentRouter(D, window_size=8)
    _, w, _, _ = router(torch.randn(2, 30, D), num_tokens=2)
    assert torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize("make", [attention, feedforward, block, stack], ids=["attention", "feedforward", "block", "stack"])
def test_bf16_autocast(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 19, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    ref = model(x)
    assert_close(out.float(), ref, 0.1, "bf16 vs fp32")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 13])
def test_short_sequences_finite(n):
    """n = 1, n below the routed counts, n not a multiple of any window: finite, gradients too."""
    torch.manual_seed(0)
    model = stack(num_routed_kv=2, rotary_emb=True)
    x = torch.randn(3, n, D, requires_grad=True)
    out = model(x)
    assert out.shape == (3, n, D) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_sequence_within_capacity_is_routed_entirely():
    router = CausalCoordinateDescentRouter(D, window_size=8)
    indices, _, _, mask = router(torch.randn(2, 3, D), num_tokens=4)
    assert indices.shape == (2, 4)
    assert indices[mask].view(2, 3).tolist() == [[0, 1, 2]] * 2


def test_random_route_shapes():
    torch.manual_seed(0)
    model = block()
    out = model(torch.randn(2, 17, D), random_route=True)
    assert out.shape == (2, 17, D) and torch.isfinite(out).all()


def test_forward_overrides_token_counts():
    torch.manual_seed(0)
    model = block()
    x = torch.randn(1, 20, D)
    a = model(x, num_heavy_attn_tokens_q=1, num_heavy_attn_tokens_kv=1, num_heavy_ff_tokens=1)
    b = model(x, num_heavy_attn_tokens_q=HEAVY_W, num_heavy_attn_tokens_kv=HEAVY_W, num_heavy_ff_tokens=HEAVY_W)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="num_heavy_ff_tokens|num_heavy_tokens"):
        model(x, num_heavy_ff_tokens=HEAVY_W + 1)


def test_defaults_construct():
    model = ConditionalRoutedAutoregressiveTransformer(32, depth=1, light_window_size=32)
    assert model(torch.randn(1, 40, 32)).shape == (1, 40, 32)
    attn = model.layers[0].attn
    assert (attn.num_heavy_tokens_q, attn.num_heavy_tokens_kv, model.layers[0].ff.num_heavy_tokens) == (2, 4, 2)


# -------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(num_heavy_tokens_q=0), ValueError, "num_heavy_tokens_q"),
        (dict(num_heavy_tokens_kv=-1), ValueError, "num_heavy_tokens_kv"),
        (dict(num_heavy_tokens_q=2.5), TypeError, "num_heavy_tokens_q"),
        (dict(num_heavy_tokens_q=HEAVY_W + 1), ValueError, "heavy_window_size"),
        (dict(heavy_heads=4, num_routed_kv=3), ValueError, "divisible"),
        (dict(router_kwargs={"window_size": 3}), ValueError, "window_size"),
        (dict(router_kwargs=[1]), TypeError, "router_kwargs"),
    ],
)
def test_attention_bad_config(kw, err, match):
    with pytest.raises(err, match=match):
        attention(**kw)


def test_bad_inputs():
    model = block()
    with pytest.raises(ValueError, match="rank"):
        model(torch.randn(4, D))
    with pytest.raises(ValueError, match="last dimension"):
        model(torch.randn(1, 4, D + 1))
    with pytest.raises(TypeError, match="floating"):
        model(torch.ones(1, 4, D, dtype=torch.long))
    with pytest.raises(ValueError, match="num_heavy_attn_tokens_q|num_heavy_tokens_q"):
        model(torch.randn(1, 4, D), num_heavy_attn_tokens_q=0)
    with pytest.raises(ValueError, match="num_heavy_tokens"):
        feedforward(num_heavy_tokens=0)
    with pytest.raises(ValueError, match="depth"):
        ConditionalRoutedAutoregressiveTransformer(D, depth=0)
    with pytest.raises(ValueError, match="route_block_size"):
        CausalCoordinateDescentRouter(D, window_size=4, route_block_size=8)


# -------------------------------------------------------------------------------------------
# torch.compile


def _compile_check(backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = block(router_kwargs=dict(eps=0.5, n_iters=6))
    x = torch.randn(2, 19, D, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    gx = x.grad.clone()
    model.zero_grad()
    x.grad = None
    ref = model(x)
    ref.square().sum().backward()
    assert_close(out, ref, 1e-5, "compiled output")
    assert_close(x.grad, gx, 1e-4, "compiled dx")
    for (name, p), g in zip(model.named_parameters(), grads):
        assert_close(g, p.grad, 1e-4, f"compiled grad {name}")


def test_compile_block_fullgraph():
    """fullgraph=True proves there is no graph break (no host sync, no data-dependent shape);
    aot_eager also traces the backward. Inductor codegen is the slow test below."""
    _compile_check("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("COLT5_SLOW_TESTS"), reason="minutes of inductor compile on a 2-core CPU; set COLT5_SLOW_TESTS=1")
def test_compile_block_fullgraph_inductor():
    _compile_check("inductor")


@pytest.mark.parametrize("num_routed_kv", [1, 2])
def test_gradients_have_the_parameters_strides(num_routed_kv):
    """Every gradient is laid out like its parameter (size-1 dims included): DDP's buckets are
    views in the parameter's layout and copy any gradient that is not, every step."""
    torch.manual_seed(0)
    model = stack(num_routed_kv=num_routed_kv, heavy_heads=2)
    model(torch.randn(2, 29, D)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), name


# -------------------------------------------------------------------------------------------
# num_heavy_tokens_kv > heavy window: colt5-attention's meaning (a span of recent key-values)


SPAN_W = 16  # Ckv = W // 8 = 2 slots per window when num_heavy_tokens_kv > W


def span_attention(**kw) -> ConditionalRoutedAutoregressiveAttention:
    args = dict(num_heavy_tokens_q=2, num_heavy_tokens_kv=20, num_routed_kv=2, light_dim_head=8, light_heads=2,
                light_window_size=4, heavy_window_size=SPAN_W, heavy_dim_head=8, heavy_heads=4)
    args.update(kw)
    return ConditionalRoutedAutoregressiveAttention(D, **args)


def heavy_calls(model, x, monkeypatch, **forward_kw) -> list[dict]:
    """The keyword arguments of every heavy attention call of model(x)."""
    import colt5.heavy_attention as heavy

    calls = []

    def spy(q, kv, **kw):
        calls.append(kw)
        return attention_op(q, kv, **kw)

    attention_op = heavy.attention
    monkeypatch.setattr(heavy, "attention", spy)
    with torch.no_grad():
        model(x, **forward_kw)
    monkeypatch.setattr(heavy, "attention", attention_op)
    return calls


def visible_counts(call: dict, j: int) -> torch.Tensor:
    """[b, r, i]: key-value slots each routed query may see (masked slots included)."""
    from colt5.kernels.flash_attention_reference import heavy_visibility

    b, i = call["q_pos"].shape
    r = call["kv_pos"].shape[1]
    return heavy_visibility(b, r, i, j, kv_mask=None, q_pos=call["q_pos"], kv_pos=call["kv_pos"],
                            q_window_slots=call["q_window_slots"], kv_window_slots=call["kv_window_slots"],
                            kv_span=call["kv_span"], device=call["q_pos"].device).sum(-1)


@pytest.mark.parametrize("K", [17, 20])
def test_num_heavy_tokens_kv_above_the_window_is_a_span(monkeypatch, K):
    """K > W: W // 8 slots routed per window, and each query sees at most K of them (the most
    recent ones); without the span the last queries would see every earlier slot."""
    torch.manual_seed(0)
    model = span_attention(num_heavy_tokens_kv=K)
    n = 200  # 13 windows of 16: 26 key-value slots per route
    x = torch.randn(2, n, D)
    (call,) = heavy_calls(model, x, monkeypatch)
    assert (call["q_window_slots"], call["kv_window_slots"], call["kv_span"]) == (2, SPAN_W // 8, K)
    j = call["kv_pos"].shape[-1]
    assert j == 13 * (SPAN_W // 8)
    seen = visible_counts(call, j)
    assert seen.max() <= K and seen.max() >= K - SPAN_W // 8  # the last windows' queries see ~K
    unlimited = visible_counts(dict(call, kv_span=None), j)
    assert unlimited.max() > K  # the span restricts something
    out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_num_heavy_tokens_kv_within_the_window_is_unchanged(monkeypatch):
    model = span_attention(num_heavy_tokens_kv=SPAN_W)
    (call,) = heavy_calls(model, torch.randn(1, 70, D), monkeypatch)
    assert (call["kv_window_slots"], call["kv_span"]) == (SPAN_W, None)
    # forward's override follows the same rule, both ways
    (call,) = heavy_calls(model, torch.randn(1, 70, D), monkeypatch, num_heavy_tokens_kv=SPAN_W + 1)
    assert (call["kv_window_slots"], call["kv_span"]) == (SPAN_W // 8, SPAN_W + 1)
    (call,) = heavy_calls(span_attention(), torch.randn(1, 70, D), monkeypatch, num_heavy_tokens_kv=3)
    assert (call["kv_window_slots"], call["kv_span"]) == (3, None)


def test_span_layers_stay_causal():
    torch.manual_seed(0)
    model = randomise(span_attention(num_heavy_tokens_kv=6, heavy_window_size=4, rotary_emb=True)).double()
    # W = 4: 1 slot per window, a span of 6 of the 13 windows of n = 50
    assert causal_violations(model, n=50, js=[1, 4, 5, 17, 30, 41, 49]) == []
    # the block: W = 6, 1 slot per window, a span of 7 of the 10 windows of n = 60
    blk = randomise(block(num_heavy_attn_tokens_kv=HEAVY_W + 1)).double()
    assert causal_violations(blk, n=60, js=[3, 7, 12, 25, 44, 59]) == []
    assert blk.attn.num_heavy_tokens_kv == HEAVY_W + 1
