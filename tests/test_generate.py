"""Cached generation (colt5/decoding.py): a prefill and one cached step per token give the full
forward's logits (float64, 1e-9) for the routed and the dense model, generate's tokens equal
re-running's, past max_seq_len as documented, in far fewer operations; errors; GPU and CUDA
graphs (marked)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from colt5.autoregressive import (
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedAutoregressiveFeedForward,
)
from colt5.decoding import DecodePosition, step_key
from colt5.lm import CoLT5LanguageModel
from colt5.local_attention import LocalMHA

from conftest import requires_cuda


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


# Routing windows of W = 8 with capacities 3 (queries, ff) and 4 (key-values): sequences of a few
# dozen bytes cross several windows, and windows fill up (fetch_k_ratio 1.5 asks for more
# candidates than slots).
ROUTED = dict(
    num_heavy_attn_tokens_q=3, num_heavy_attn_tokens_kv=4, num_heavy_ff_tokens=3, light_dim_head=8, light_heads=2,
    light_window_size=4, heavy_window_size=8, heavy_dim_head=8, heavy_heads=2, light_ff_mult=0.5, heavy_ff_mult=2,
)
VARIANTS = {
    "base": {},
    "routes2": dict(num_routed_kv=2),
    "no-null-q": dict(use_null_q_tokens=False),
    # K = 9 > W: Ckv = 1 slot per window, each query window sees the 9 most recent (restricts past 72)
    "span": dict(num_heavy_attn_tokens_kv=9, num_routed_kv=2),
    "soft-weights": dict(router_straight_through=False, multiply_keys_by_score=True, multiply_queries_by_score=True),
    "rotary": dict(rotary_emb=True),
    "light-wider-than-heavy": dict(light_window_size=8, heavy_window_size=4, num_heavy_attn_tokens_q=1,
                                   num_heavy_attn_tokens_kv=2, num_heavy_ff_tokens=2),
}
N = 90  # sequence length of the step tests: 11 routing windows of 8
PROMPTS = (1, 5, 8, 21)  # within the first window, mid-window, a window's end, mid-window later


def routed_model(max_seq_len: int = 128, dim: int = 16, depth: int = 2, **kw) -> CoLT5LanguageModel:
    return CoLT5LanguageModel(dim=dim, depth=depth, max_seq_len=max_seq_len, **{**ROUTED, **kw})


def dense_model(max_seq_len: int = 128, **kw) -> CoLT5LanguageModel:
    return CoLT5LanguageModel(dim=16, depth=2, max_seq_len=max_seq_len, dense=True, heads=2, dim_head=8, **kw)


def stepped_logits(model, tokens: torch.Tensor, prompt: int, watch=None) -> torch.Tensor:
    """Logits [b, n, V] of a prefill over tokens[:, :prompt] and then one cached step per token."""
    cache = model.new_cache()
    logits = [model(tokens[:, :prompt], cache=cache)]
    for p in range(prompt, tokens.shape[1]):
        assert cache.length == p
        logits.append(model(tokens[:, p : p + 1], cache=cache))
        if watch is not None:
            watch(cache)
    return torch.cat(logits, dim=1)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_steps_equal_the_full_forward(variant):
    """Every prefill and step logit equals the full forward's at its position (float64, 1e-9),
    for a batch of different prompts ending within the first window, mid-window and at a
    window's end, followed by steps across several routing windows."""
    model = routed_model(**VARIANTS[variant]).double().eval()
    tokens = torch.randint(0, 256, (3, N))
    seen = {"overfull": False}
    attn = model.backbone.layers[0].attn

    def watch(cache):  # a window got more candidates than slots: capacity decides
        seen["overfull"] |= bool((cache.layers[0].attn.q.count > attn.num_heavy_tokens_q).any())

    with torch.no_grad():
        full = model(tokens)
        for prompt in PROMPTS:
            err = max_err(stepped_logits(model, tokens, prompt, watch), full)
            assert err <= 1e-9, f"prompt {prompt}: cached logits differ from the full forward by {err:.3e}"
        # The routing was exercised: slots used and unused, over-subscribed windows.
        cache = model.new_cache()
        model(tokens, cache=cache)
        used = cache.layers[0].attn.slots.mask[:, :, :-1]
        assert used.any() and not used.all()
        assert seen["overfull"]


@pytest.mark.parametrize("rotary_emb", [False, True])
def test_dense_cached_steps_equal_the_full_forward(rotary_emb):
    model = dense_model(rotary_emb=rotary_emb).double().eval()
    tokens = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        full = model(tokens)
        for prompt in (1, 7, 39):
            err = max_err(stepped_logits(model, tokens, prompt), full)
            assert err <= 1e-9, f"prompt {prompt}: {err:.3e}"


def test_a_wrong_cache_gives_wrong_logits():
    """The comparison can fail: a cache that forgot its routed key-values, or a router's count,
    no longer matches the forward."""
    model = routed_model().double().eval()
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        for corrupt in ("slots", "count", "light"):
            cache = model.new_cache()
            model(tokens[:, :21], cache=cache)
            layer = cache.layers[0].attn
            if corrupt == "slots":
                layer.slots.mask.zero_()
            elif corrupt == "count":
                cache.layers[0].ff.router.count.fill_(99)  # nothing more routed in this window
            else:
                layer.light.k.mul_(-1)
            steps = torch.cat([model(tokens[:, p : p + 1], cache=cache) for p in range(21, 30)], dim=1)
            assert max_err(steps, full[:, 21:]) > 1e-6, corrupt


@pytest.mark.parametrize("residual", [False, True])
def test_layers_decode_on_their_own(residual):
    """The attention and feedforward layers (also without a residual) decode with a position of
    their own, which the caller advances."""
    torch.manual_seed(0)
    d, n = 16, 40
    attn = ConditionalRoutedAutoregressiveAttention(
        d, num_heavy_tokens_q=2, num_heavy_tokens_kv=3, light_window_size=4, heavy_window_size=8, light_heads=2,
        light_dim_head=8, heavy_heads=2, heavy_dim_head=8, num_routed_kv=2,
    ).double()
    ff = ConditionalRoutedAutoregressiveFeedForward(d, num_heavy_tokens=2, heavy_window_size=8).double()
    x = torch.randn(2, n, d, dtype=torch.float64)
    with torch.no_grad():
        for layer in (attn, ff):
            kw = (lambda t: dict(residual=t)) if residual else (lambda t: {})
            full = layer(x, **kw(x))
            position = DecodePosition(n, "cpu")
            cache = layer.new_cache(position)
            outs = [layer(x[:, :11], cache=cache, **kw(x[:, :11]))]
            position.advance(x[:, :11])
            for p in range(11, n):
                outs.append(layer(x[:, p : p + 1], cache=cache, **kw(x[:, p : p + 1])))
                position.advance(x[:, p : p + 1])
            assert max_err(torch.cat(outs, dim=1), full) <= 1e-9, type(layer).__name__


@pytest.mark.parametrize("backbone", ["routed", "dense"])
def test_greedy_and_sampled_tokens_equal_rerunning(backbone):
    """generate with the cache gives the tokens of re-running the model on the whole prefix at
    every step: greedy, and sampled with top_k from the same generator (float64 logits, so
    that no sample sits within rounding of a boundary)."""
    model = (routed_model() if backbone == "routed" else dense_model()).double()
    prompt = torch.randint(0, 256, (3, 13))
    greedy = model.generate(prompt, length=40, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, length=40, temperature=0, cache=False))
    for kw in (dict(), dict(top_k=5, temperature=0.7)):
        cached = model.generate(prompt, length=40, generator=torch.Generator().manual_seed(3), **kw)
        rerun = model.generate(prompt, length=40, generator=torch.Generator().manual_seed(3), cache=False, **kw)
        assert torch.equal(cached, rerun), kw
    # float32, the default dtype: greedy agrees too (random models have no near-ties here)
    model.float()
    assert torch.equal(model.generate(prompt, length=24, temperature=0),
                       model.generate(prompt, length=24, temperature=0, cache=False))


@pytest.mark.parametrize("backbone", ["routed", "dense"])
def test_past_max_seq_len_slide(backbone):
    """overflow="slide" (default): once the context is full every step sees the last
    max_seq_len tokens, exactly as re-running does; prompts longer than max_seq_len too."""
    L = 24
    model = (routed_model(max_seq_len=L) if backbone == "routed" else dense_model(max_seq_len=L)).double()
    for n in (5, 30):
        prompt = torch.randint(0, 256, (2, n))
        cached = model.generate(prompt, length=30, temperature=0)
        assert torch.equal(cached, model.generate(prompt, length=30, temperature=0, cache=False)), n


@pytest.mark.parametrize("backbone", ["routed", "dense"])
def test_past_max_seq_len_restart(backbone):
    """overflow="restart": when the context fills max_seq_len positions, its last
    max_seq_len // 2 tokens become a new context at positions 0..; the tokens equal those of
    re-running the model on exactly those contexts."""
    L = 20
    model = (routed_model(max_seq_len=L) if backbone == "routed" else dense_model(max_seq_len=L)).double().eval()
    for n in (7, 26):
        prompt = torch.randint(0, 256, (2, n))
        cached = model.generate(prompt, length=35, temperature=0, overflow="restart")
        seq, start = prompt, max(0, n - L)
        with torch.no_grad():
            for _ in range(35):
                if seq.shape[1] - start > L:
                    start = seq.shape[1] - L // 2
                nxt = model(seq[:, start:])[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat((seq, nxt), dim=1)
        assert torch.equal(cached, seq[:, n:]), n
        # and it is not the sliding window (the test could fail)
        assert not torch.equal(cached, model.generate(prompt, length=35, temperature=0))


def test_cached_generation_does_far_fewer_operations():
    """The cached path's matmul FLOPs (a prefill and O(cache) steps) against re-running the
    window at every step: a timing-free stand-in for the speed-up (benchmarks/generate.py
    times it)."""
    model = routed_model(max_seq_len=256).eval()
    prompt = torch.randint(0, 256, (1, 96))
    flops = {}
    for cache in (True, False):
        with FlopCounterMode(display=False) as counter:
            model.generate(prompt, length=16, temperature=0, cache=cache)
        flops[cache] = counter.get_total_flops()
    assert flops[True] * 8 < flops[False], flops


def test_bf16_autocast_generate():
    """Under CPU autocast the prefill gives the forward's logits and the cached steps run."""
    model = routed_model().eval()
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(tokens)
        cache = model.new_cache()
        assert torch.equal(model(tokens[:, :30], cache=cache), full)
        step = model(tokens[:, :1], cache=cache)
        assert step.dtype == torch.bfloat16 and torch.isfinite(step).all()
        out = model.generate(tokens, length=12, temperature=0)
    assert out.shape == (2, 12)


def test_step_key():
    """The host-side choice of a step: first window, a window just completed (per W)."""
    assert step_key(3, (8, 8)) == ((True, False),)
    assert step_key(8, (8,)) == ((False, True),)
    assert step_key(12, (8, 4)) == ((False, True), (False, False))
    model = routed_model()
    cache = model.new_cache()
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    assert cache.step_key() == ((False, True),)
    assert dense_model().new_cache().step_key() == ()


def test_bad_cache_use():
    model = routed_model(max_seq_len=16)
    tokens = torch.randint(0, 256, (2, 10))
    cache = model.new_cache()
    with pytest.raises(ValueError, match="at least one position"):
        model(tokens[:, :0], cache=cache)
    model(tokens, cache=cache)
    with pytest.raises(ValueError, match="one position per forward"):
        model(tokens[:, :2], cache=cache)
    with pytest.raises(ValueError, match="batch of 2"):
        model(tokens[:1, :1], cache=cache)
    for _ in range(6):
        model(tokens[:, :1], cache=cache)
    with pytest.raises(ValueError, match="holds 16 of at most 16"):
        model(tokens[:, :1], cache=cache)
    with pytest.raises(ValueError, match="capacity must be <= max_seq_len=16"):
        model.new_cache(17)
    with pytest.raises(TypeError, match="cache must come from"):
        model(tokens, cache=object())
    with pytest.raises(TypeError, match="StackCache"):
        model.backbone(torch.randn(2, 3, 16), cache=dense_model().new_cache())
    with pytest.raises(ValueError, match="overflow"):
        model.generate(tokens, length=2, overflow="wrap")
    with pytest.raises(TypeError, match="cache must be a bool"):
        model.generate(tokens, length=2, cache=1)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        model.generate(tokens, length=2, cuda_graph=True)
    with pytest.raises(ValueError, match="only a causal LocalMHA"):
        LocalMHA(16, window_size=4).new_cache(DecodePosition(8, "cpu"))

    layer = model.backbone.layers[0]
    position = DecodePosition(16, "cpu")
    c = layer.attn.new_cache(position)
    x = torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match="random_route"):
        layer.attn(x, cache=c, random_route=True)
    layer.attn(x, cache=c)
    position.advance(x)
    with pytest.raises(ValueError, match="token counts must stay"):
        layer.attn(x[:, :1], cache=c, num_heavy_tokens_q=2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backbone", ["routed", "dense"])
def test_cuda_cached_steps(backbone):
    """On CUDA (Triton forward, torch-op steps) the steps match the forward to fp32 rounding."""
    model = (routed_model() if backbone == "routed" else dense_model()).cuda().eval()
    tokens = torch.randint(0, 256, (3, N), device="cuda")
    with torch.no_grad():
        full = model(tokens)
        for prompt in PROMPTS:
            steps = stepped_logits(model, tokens, prompt)
            err = max_err(steps, full) / full.abs().max().item()
            assert err <= 1e-4, f"prompt {prompt}: relative {err:.3e}"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backbone", ["routed", "routed-rotary", "dense", "dense-rotary"])
def test_cuda_graph_steps_equal_eager_steps(backbone):
    """Steps replayed from CUDA graphs (one per step key, across windows and a restart) give
    the eager steps' tokens exactly: the same kernels on the same buffers."""
    L = 64
    rotary = backbone.endswith("-rotary")
    model = (dense_model(max_seq_len=L, rotary_emb=rotary) if backbone.startswith("dense")
             else routed_model(max_seq_len=L, rotary_emb=rotary)).cuda()
    prompt = torch.randint(0, 256, (2, 13), device="cuda")
    for kw in (dict(temperature=0), dict(top_k=8)):
        eager = model.generate(prompt, length=90, overflow="restart", cuda_graph=False,
                               generator=torch.Generator("cuda").manual_seed(0), **kw)
        graphed = model.generate(prompt, length=90, overflow="restart", cuda_graph=True,
                                 generator=torch.Generator("cuda").manual_seed(0), **kw)
        assert torch.equal(eager, graphed), kw


def test_decoding_tracks_no_gradients():
    """With gradients enabled a cached forward still keeps no autograd history: each step writes
    the cache in place, and a history would chain every step onto the last."""
    model = routed_model()
    tokens = torch.randint(0, 256, (2, 30))
    cache = model.new_cache()
    logits = model(tokens[:, :20], cache=cache)
    for i in range(20, 30):
        logits = model(tokens[:, i : i + 1], cache=cache)
    assert not logits.requires_grad and logits.grad_fn is None
    assert model(tokens).requires_grad  # without a cache, as always
