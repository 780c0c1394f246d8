"""Bad input fails clearly at every public entry: colt5.validation, per-row k, dtypes and devices,
route_back, empty inputs; routers made by a router_class; one definition of the block options;
how far the soft top-k converges (RouterStats)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from colt5 import (
    CoLT5LanguageModel,
    ConditionalRoutedAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedImageAttention,
    ConditionalRoutedMoEFeedForward,
    ConditionalRoutedTransformer,
    ConditionalRoutedTransformerBlock,
    DenseTransformer,
    DenseTransformerBlock,
    coor_descent,
    topk,
)
from colt5 import validation
from colt5.autoregressive import (
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedAutoregressiveFeedForward,
    ConditionalRoutedAutoregressiveTransformer,
    ConditionalRoutedAutoregressiveTransformerBlock,
)
from colt5.block_options import ATTENTION_OPTIONS, FEEDFORWARD_OPTIONS, SHARED_OPTIONS, split_block_options
from colt5.causal_routing import CausalCoordinateDescentRouter
from colt5.kernels import coor_descent_offset, coor_descent_reference, triton_coor_descent
from colt5.routers import CoordinateDescentRouter, Router, RouterStats
from colt5.vit import _BLOCK_OPTION_OF, ConditionalRoutedViT
from conftest import assert_close, requires_cuda

D = 16
HEADS = dict(light_dim_head=8, light_heads=2, heavy_dim_head=8, heavy_heads=2)


# -------------------------------------------------------------------------------------------
# the layers, small


def routed_ff(**kw):
    return ConditionalRoutedFeedForward(D, num_heavy_tokens=4, **kw)


def routed_attn(**kw):
    return ConditionalRoutedAttention(D, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, light_window_size=4, **HEADS, **kw)


def routed_moe(**kw):
    return ConditionalRoutedMoEFeedForward(D, num_experts=2, num_heavy_tokens=4, **kw)


def routed_block(**kw):
    return ConditionalRoutedTransformerBlock(D, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4,
                                             num_heavy_ff_tokens=4, light_window_size=4, **HEADS, **kw)


def routed_stack(**kw):
    return ConditionalRoutedTransformer(D, depth=1, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4,
                                        num_heavy_ff_tokens=4, light_window_size=4, **HEADS, **kw)


CAUSAL = dict(light_window_size=4, heavy_window_size=6, **HEADS)


def causal_attn(**kw):
    return ConditionalRoutedAutoregressiveAttention(D, num_heavy_tokens_q=2, num_heavy_tokens_kv=2, **CAUSAL, **kw)


def causal_ff(**kw):
    return ConditionalRoutedAutoregressiveFeedForward(D, num_heavy_tokens=2, heavy_window_size=6, **kw)


def causal_block(**kw):
    return ConditionalRoutedAutoregressiveTransformerBlock(D, num_heavy_attn_tokens_q=2, num_heavy_attn_tokens_kv=2,
                                                           num_heavy_ff_tokens=2, **CAUSAL, **kw)


def causal_stack(**kw):
    return ConditionalRoutedAutoregressiveTransformer(D, depth=1, num_heavy_attn_tokens_q=2, num_heavy_attn_tokens_kv=2,
                                                      num_heavy_ff_tokens=2, **CAUSAL, **kw)


def dense_block():
    return DenseTransformerBlock(D, heads=2, dim_head=8)


def dense_stack():
    return DenseTransformer(D, depth=1, heads=2, dim_head=8)


SEQUENCE_LAYERS = {
    "ff": routed_ff, "attn": routed_attn, "moe": routed_moe, "block": routed_block, "stack": routed_stack,
    "causal_attn": causal_attn, "causal_ff": causal_ff, "causal_block": causal_block, "causal_stack": causal_stack,
    "dense_block": dense_block, "dense_stack": dense_stack,
}
MASKED = {"ff", "attn", "moe", "block", "stack", "dense_block", "dense_stack"}


def cross(**kw):
    return ConditionalRoutedCrossAttention(D, num_tokens_q=4, num_tokens_kv=4, dim_head=8, heads=2, dim_context=12, **kw)


def image(**kw):
    return ConditionalRoutedImageAttention(D, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, light_window_size=2, **HEADS, **kw)


def vit(**kw):
    return ConditionalRoutedViT(
        image_size=8, patch_size=2, num_classes=3, dim=D, depth=1, attn_num_heavy_tokens_q=4, attn_num_heavy_tokens_kv=4,
        attn_heavy_dim_head=8, attn_heavy_heads=2, attn_light_dim_head=8, attn_light_heads=2, attn_light_window_size=2,
        ff_num_heavy_tokens=4, ff_heavy_mult=2, ff_light_mult=0.5, **kw,
    )


def lm(**kw):
    return CoLT5LanguageModel(dim=D, depth=1, max_seq_len=32, **CAUSAL, **kw)


def run(name, layer, x):
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


# -------------------------------------------------------------------------------------------
# colt5.validation


@pytest.mark.parametrize(
    "fn, value, error, match",
    [
        (validation.positive_int, 0, ValueError, "n must be >= 1, got 0"),
        (validation.positive_int, -3, ValueError, "n must be >= 1, got -3"),
        (validation.positive_int, 2.0, TypeError, "n must be an int, got float"),
        (validation.positive_int, True, TypeError, "n must be an int, got bool"),
        (validation.positive_int, "4", TypeError, "n must be an int, got str"),
        (validation.positive_number, 0, ValueError, "n must be a finite number > 0, got 0"),
        (validation.positive_number, -0.5, ValueError, "finite number > 0"),
        (validation.positive_number, math.inf, ValueError, "finite number > 0, got inf"),
        (validation.positive_number, math.nan, ValueError, "finite number > 0, got nan"),
        (validation.positive_number, "1", TypeError, "n must be a number, got str"),
        (validation.positive_number, False, TypeError, "n must be a number, got bool"),
    ],
    ids=lambda v: str(v)[:12] if not callable(v) else v.__name__,
)
def test_numbers(fn, value, error, match):
    with pytest.raises(error, match=match):
        fn("n", value)


def test_numbers_pass_through():
    assert validation.positive_int("n", 3) == 3
    assert validation.int_at_least("n", 0, 0) == 0
    assert validation.positive_number("n", 0.25) == 0.25
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        validation.int_at_least("n", -1, 0)


def test_tokens_and_masks():
    x = torch.randn(2, 5, 8)
    validation.tokens(x, 8, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got list"):
        validation.tokens([[1.0]], 8, "y")
    with pytest.raises(ValueError, match=r"y must have shape \[batch, seq, 8\], got rank 2"):
        validation.tokens(torch.randn(5, 8), 8, "y")
    with pytest.raises(ValueError, match="y must have last dimension 8, got 7"):
        validation.tokens(torch.randn(2, 5, 7), 8, "y")
    with pytest.raises(TypeError, match="y must be floating point"):
        validation.tokens(torch.ones(2, 5, 8, dtype=torch.long), 8, "y")
    with pytest.raises(TypeError, match=r"mask must be a bool tensor \[batch, seq\], got torch.float32"):
        validation.tokens(x, 8, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\) \(batch, seq of x\), got \(2, 4\)"):
        validation.tokens(x, 8, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be on the device of x \(cpu\), got meta"):
        validation.tokens(x, 8, mask=torch.ones(2, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"ctx_mask must have shape \(2, 3\) \(batch, seq of ctx\)"):
        validation.bool_mask(torch.ones(2, 5, dtype=torch.bool), (2, 3), "ctx_mask", of="ctx")


def test_matches_module():
    layer = nn.Linear(4, 4)
    validation.matches_module(torch.randn(3, 4), layer)
    validation.matches_module(torch.ones(3, 4, dtype=torch.long), layer)  # not floating: dtype not compared
    validation.matches_module(torch.randn(3, 4), nn.ReLU())  # no parameters: nothing to compare
    with pytest.raises(TypeError, match="h has dtype torch.float64 but the parameters of Linear are torch.float32"):
        validation.matches_module(torch.randn(3, 4, dtype=torch.float64), layer, "h")
    with pytest.raises(ValueError, match="h is on meta but the parameters of Linear are on cpu"):
        validation.matches_module(torch.randn(3, 4, device="meta"), layer, "h")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        validation.matches_module(torch.randn(3, 4, dtype=torch.bfloat16), layer)
        with pytest.raises(TypeError, match="float64"):  # autocast does not cast fp64
            validation.matches_module(torch.randn(3, 4, dtype=torch.float64), layer)
    validation.matches_module(torch.randn(3, 4, dtype=torch.float64), layer.double())


# -------------------------------------------------------------------------------------------
# per-row k, eps: every backend, eager and compiled

BAD_K = {"nan": math.nan, "inf": math.inf, "zero": 0.0, "negative": -2.0}
K_FUNCTIONS = {
    "reference": lambda s, k: coor_descent(s, n_iters=3, k=k, backend="reference"),
    "triton": lambda s, k: coor_descent(s, n_iters=3, k=k, backend="triton"),
    "triton_coor_descent": lambda s, k: triton_coor_descent(s, n_iters=3, k=k),
    "offset": lambda s, k: coor_descent_offset(s, n_iters=3, k=k)[0],
}


@pytest.mark.parametrize("fn", list(K_FUNCTIONS))
@pytest.mark.parametrize("bad", list(BAD_K))
def test_per_row_k_values(fn, bad):
    s = torch.randn(2, 3, 17)
    k = torch.full((2, 3), 4.0)
    k[1, 2] = BAD_K[bad]
    with pytest.raises(ValueError, match=r"k must be finite and > 0 in every row, got .* at row 5 \(1 of 6 rows"):
        K_FUNCTIONS[fn](s, k)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_row_k_checked_under_compile_without_graph_break(backend):
    """fullgraph=True: the value check is an op of the graph (colt5::checked_k), no graph break;
    a good k gives the eager result and gradient, a bad one the same ValueError."""
    torch._dynamo.reset()
    s = torch.randn(3, 20, requires_grad=True)

    def fn(x, k):
        return coor_descent(x, n_iters=3, k=k, backend=backend) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    k = torch.tensor([2.0, 3.0, 4.5], requires_grad=True)
    y = compiled(s, k)
    grads = torch.autograd.grad(y.square().sum(), (s, k))
    y_eager = fn(s, k)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), (s, k))
    assert_close(y, y_eager, 1e-6, "y")
    assert_close(grads[1], grads_eager[1], 1e-5, "dk")
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match="k must be finite and > 0 in every row"):
            compiled(s, torch.tensor([2.0, bad, 4.5]))


def test_numeric_k_adds_no_check_to_the_graph():
    """Only a tensor k costs a check in the compiled graph."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    s = torch.randn(3, 20)
    for k in (4.0, torch.tensor([2.0, 3.0, 4.5])):
        torch._dynamo.reset()
        torch.compile(lambda x, kk: coor_descent(x, n_iters=3, k=kk, backend="triton"), fullgraph=True, backend=record)(s, k)
    assert len(graphs) == 2
    assert "checked_k" not in graphs[0] and "checked_k" in graphs[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=math.inf), "eps must be a finite number > 0, got inf"),
        (dict(eps=math.nan), "eps must be a finite number > 0"),
        (dict(eps_init=math.inf), "eps_init must be a finite number > 0 or None, got inf"),
        (dict(k=math.inf), "k must be a finite number > 0, got inf"),
        (dict(k=math.nan), "k must be a finite number > 0, got nan"),
    ],
    ids=["eps-inf", "eps-nan", "eps_init-inf", "k-inf", "k-nan"],
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_schedule_and_k_must_be_finite(kwargs, match, backend):
    args = {"n_iters": 3, "k": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        coor_descent(torch.randn(2, 9), **args, backend=backend)


def test_topk_checks_in_every_mode():
    x = torch.randn(2, 10)
    for non_differentiable in (False, True):
        with pytest.raises(ValueError, match="n_iters"):
            topk(x, 3, n_iters=0, non_differentiable=non_differentiable)
        with pytest.raises(ValueError, match="eps must be a finite"):
            topk(x, 3, eps=math.inf, non_differentiable=non_differentiable)
    with pytest.raises(ValueError, match="coor_descent_k_ratio must be a finite number >= 1"):
        topk(x, 3, coor_descent_k_ratio=math.inf)
    with pytest.raises(TypeError, match="coor_descent_k_ratio must be a number"):
        topk(x, 3, coor_descent_k_ratio="2")


def test_router_schedule_must_be_finite():
    with pytest.raises(ValueError, match="fetch_k_ratio must be a finite number >= 1"):
        CoordinateDescentRouter(D, fetch_k_ratio=math.inf)
    with pytest.raises(ValueError, match="eps must be a finite"):
        CoordinateDescentRouter(D, eps=math.inf)
    with pytest.raises(ValueError, match="eps_init must be a finite"):
        routed_ff(router_kwargs={"eps_init": math.inf})


@pytest.mark.gpu
@requires_cuda
def test_per_row_k_check_skipped_while_capturing_a_cuda_graph():
    s = torch.randn(4, 300, device="cuda")
    k = torch.full((4,), 7.0, device="cuda")
    y = coor_descent(s, n_iters=5, k=k)  # warm-up (and the eager check)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        coor_descent(s, n_iters=5, k=k)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = coor_descent(s, n_iters=5, k=k)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, y, 1e-6, "replayed")


# -------------------------------------------------------------------------------------------
# dtype and device of the input against the layer's


@pytest.mark.parametrize("name", list(SEQUENCE_LAYERS))
def test_dtype_and_device_of_sequence_layers(name):
    layer = SEQUENCE_LAYERS[name]()
    kind = type(layer).__name__
    x = torch.randn(2, 9, D)
    with pytest.raises(TypeError, match=f"x has dtype torch.float64 but the parameters of {kind} are torch.float32"):
        layer(x.double())
    with pytest.raises(TypeError, match=f"x has dtype torch.bfloat16 but the parameters of {kind} are torch.float32"):
        layer(x.bfloat16())
    with pytest.raises(ValueError, match=f"x is on meta but the parameters of {kind} are on cpu"):
        layer(x.to("meta"))
    if name in MASKED:
        with pytest.raises(ValueError, match=r"mask must be on the device of x \(cpu\), got meta"):
            layer(x, mask=torch.ones(2, 9, dtype=torch.bool, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what mixed precision users do: runs
        out = run(name, layer, x.bfloat16())
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    out = run(name, layer.double(), x.double())  # a converted layer takes its own dtype
    assert out.dtype == torch.float64


def test_dtype_and_device_of_other_layers():
    c = cross()
    x, ctx = torch.randn(2, 5, D), torch.randn(2, 9, 12)
    with pytest.raises(TypeError, match="context has dtype torch.float64"):
        c(x, ctx.double())
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16"):
        c(x.bfloat16(), ctx)
    with pytest.raises(ValueError, match="context is on meta"):
        c(x, ctx.to("meta"))
    with pytest.raises(ValueError, match=r"context_mask must be on the device of context \(cpu\), got meta"):
        c(x, ctx, context_mask=torch.ones(2, 9, dtype=torch.bool, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert c(x.bfloat16(), ctx).shape == x.shape

    im = image()
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the parameters of ConditionalRoutedImageAttention"):
        im(torch.randn(1, 4, 4, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="x is on meta"):
        im(torch.randn(1, 4, 4, D, device="meta"))

    v = vit()
    with pytest.raises(TypeError, match="img has dtype torch.float64 but the parameters of ConditionalRoutedViT"):
        v(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="img is on meta"):
        v(torch.randn(1, 3, 8, 8, device="meta"))

    model = lm()
    tokens = torch.zeros(1, 5, dtype=torch.long)
    for call in (model, model.loss, lambda t: model.generate(t, length=1)):
        with pytest.raises(ValueError, match="is on meta but the parameters of CoLT5LanguageModel are on cpu"):
            call(tokens.to("meta"))


@pytest.mark.gpu
@requires_cuda
def test_cpu_input_to_a_cuda_layer():
    layer = routed_block().cuda()
    with pytest.raises(ValueError, match="x is on cpu but the parameters of ConditionalRoutedTransformerBlock are on cuda"):
        layer(torch.randn(1, 9, D))


# -------------------------------------------------------------------------------------------
# Router.route_back


def _routed(routes=1):
    router = CoordinateDescentRouter(D, num_routing_tokens=routes)
    x = torch.randn(2, 11, D)
    out = router(x, num_tokens=4, keep_one_route_dim=routes > 1)
    return router, x, out


@pytest.mark.parametrize("routes", [1, 3])
@pytest.mark.parametrize("bad", [11, -1], ids=["n", "negative"])
def test_route_back_index_out_of_range(routes, bad):
    router, x, out = _routed(routes)
    indices = out.indices.clone()
    indices[0, ..., 0] = bad  # 11 would land in sample 1
    heavy = torch.randn_like(out.routed_tokens)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 11\) \(positions of a sample\)"):
        router.route_back(torch.zeros_like(x), heavy, indices, out.routed_mask)
    # in range, the same arguments go through
    y = router.route_back(torch.zeros_like(x), heavy, out.indices, out.routed_mask)
    assert y.shape == x.shape


def test_route_back_shapes_and_types():
    router, x, out = _routed()
    base, heavy, idx = torch.zeros_like(x), torch.randn_like(out.routed_tokens), out.indices
    cases = [
        (dict(out=torch.zeros(11, D)), ValueError, r"out must have shape \[batch, seq, dim\]"),
        (dict(routed_out=heavy[:1]), ValueError, r"routed_out must have shape \[2, \(routes,\) k, 16\]"),
        (dict(routed_out=heavy[..., :3]), ValueError, "routed_out must have shape"),
        (dict(routed_out=heavy.long()), TypeError, "routed_out must be a floating-point tensor"),
        (dict(indices=idx.float()), TypeError, "indices must be an int64 tensor or None"),
        (dict(indices=idx[:, :3]), ValueError, r"indices must have shape \(2, 4\)"),
        (dict(indices=None), ValueError, "with indices None, routed_out must have out's positions"),
        (dict(routed_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, r"routed_mask must have shape \(2, 4\)"),
        (dict(routed_mask=torch.ones(2, 4)), TypeError, "routed_mask must be a bool tensor"),
        (dict(indices=idx.to("meta")), ValueError, r"indices must be on the device of out \(cpu\)"),
    ]
    for change, error, match in cases:
        args = dict(out=base, routed_out=heavy, indices=idx, routed_mask=None, **{})
        args.update(change)
        with pytest.raises(error, match=match):
            router.route_back(args["out"], args["routed_out"], args["indices"], args["routed_mask"])


def test_route_back_under_compile_asserts_on_the_device():
    """Under torch.compile the range check is a device-side assertion: no graph break, no
    host read; it fails with the same message."""
    torch._dynamo.reset()
    router, x, out = _routed()
    heavy = torch.randn_like(out.routed_tokens)
    compiled = torch.compile(lambda o, h, i: router.route_back(o, h, i), fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, heavy, out.indices), router.route_back(x, heavy, out.indices), 1e-6, "route_back")
    bad = out.indices.clone()
    bad[0, 0] = 11
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 11\)"):
        compiled(x, heavy, bad)


def test_layers_skip_route_back_checks(monkeypatch):
    """The routed layers scatter their own routers' picks: no value check on the hot path."""
    import colt5.routers as routers

    def fail(*args):
        raise AssertionError("check_route_back on a layer's hot path")

    monkeypatch.setattr(routers, "check_route_back", fail)
    x = torch.randn(2, 9, D)
    for make in (routed_ff, routed_moe, routed_attn, causal_attn, causal_ff):
        run("", make(), x)


@pytest.mark.gpu
@requires_cuda
def test_route_back_on_cuda_is_captured_by_cuda_graphs():
    router, x, out = _routed()
    router, x = router.cuda(), x.cuda()
    indices, heavy = out.indices.cuda(), torch.randn_like(out.routed_tokens).cuda()
    expected = router.route_back(x, heavy, indices)  # warm-up
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        router.route_back(x, heavy, indices)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = router.route_back(x, heavy, indices)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, expected, 1e-6, "captured route_back")


# -------------------------------------------------------------------------------------------
# empty in, empty out


@pytest.mark.parametrize("name", list(SEQUENCE_LAYERS))
@pytest.mark.parametrize("shape", [(0, 9, D), (2, 0, D), (0, 0, D)], ids=["batch0", "seq0", "both0"])
def test_empty_sequences(name, shape):
    layer = SEQUENCE_LAYERS[name]()
    x = torch.randn(*shape, requires_grad=True)
    out = run(name, layer, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("shape", [(1, 0, 0, D), (2, 0, 4, D), (2, 4, 0, D), (0, 4, 4, D)])
def test_empty_feature_maps(shape):
    layer = image()
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    first = image(channel_first=True)
    assert first(x.detach().movedim(-1, 1)).shape == x.movedim(-1, 1).shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype the non-empty map would give
        assert layer(x.detach()).dtype == layer(torch.randn(1, 2, 2, D)).dtype == torch.bfloat16


def test_empty_cross_vit_and_language_model():
    c = cross()
    assert c(torch.randn(0, 5, D), torch.randn(0, 7, 12)).shape == (0, 5, D)
    assert c(torch.randn(2, 0, D), torch.randn(2, 7, 12)).shape == (2, 0, D)
    assert c(torch.randn(2, 5, D), torch.randn(2, 0, 12)).shape == (2, 5, D)
    assert vit()(torch.randn(0, 3, 8, 8)).shape == (0, 3)
    model = lm()
    assert model(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 256)
    assert model(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 256)
    assert model.generate(torch.zeros(0, 3, dtype=torch.long), length=4).shape == (0, 4)
    assert model.generate(torch.zeros(1, 3, dtype=torch.long), length=0).shape == (1, 0)
    with pytest.raises(ValueError, match="tokens must hold at least 1 sequence for a next-token loss"):
        model.loss(torch.zeros(0, 5, dtype=torch.long))


# -------------------------------------------------------------------------------------------
# router_class: routers made by the layers from a class or factory


class MLPRouter(Router):
    """Scores each token with a small MLP (the README's example)."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, self.num_routing_tokens))

    def score(self, x, routing_tokens=None):
        return self.net(x).transpose(1, 2)


class CausalMLPRouter(CausalCoordinateDescentRouter):
    """A causal router with its own per-token scoring (still causal: a token's score is its own)."""

    def __init__(self, dim, **kwargs):
        super().__init__(dim, **kwargs)
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, self.num_routing_tokens))

    def score(self, x, routing_tokens=None):
        return self.net(x).transpose(1, 2)


def _routers(module):
    return [m for m in module.modules() if isinstance(m, Router)]


ROUTED = {
    "ff": (routed_ff, 1), "attn": (routed_attn, 2), "moe": (routed_moe, 1), "block": (routed_block, 3),
    "stack": (routed_stack, 3), "cross": (cross, 2), "image": (image, 2), "vit": (vit, 3),
}


def _forward(name, layer):
    if name == "cross":
        return layer(torch.randn(2, 9, D), torch.randn(2, 40, 12))
    if name == "image":
        return layer(torch.randn(2, 4, 4, D))
    if name == "vit":
        return layer(torch.randn(2, 3, 8, 8))
    return run(name, layer, torch.randn(2, 9, D))


@pytest.mark.parametrize("name", list(ROUTED))
def test_router_class_makes_every_router(name):
    make, count = ROUTED[name]
    layer = make(router_class=MLPRouter, router_kwargs={"n_iters": 7})
    routers = _routers(layer)
    assert len(routers) == count and all(type(r) is MLPRouter for r in routers)
    assert all(r.n_iters == 7 for r in routers)
    _forward(name, layer).float().square().sum().backward()
    for r in routers:  # the heavy branch's gradient reaches each router's own parameters
        assert r.net[0].weight.grad is not None and r.net[0].weight.grad.abs().sum() > 0


def test_router_class_factory_and_routes():
    made = []

    def factory(dim, **kwargs):
        made.append(kwargs.get("num_routing_tokens", 1))
        return CoordinateDescentRouter(dim, cosine_sim_routing=True, **kwargs)

    layer = routed_attn(router_class=factory, num_routed_kv=2)
    assert made == [1, 2] and layer.kv_router.num_routing_tokens == 2 and layer.q_router.cosine_sim_routing
    assert layer(torch.randn(2, 9, D)).shape == (2, 9, D)
    moe = routed_moe(router_class=factory)
    assert moe.router.num_routing_tokens == 2
    c = cross(router_class=factory, route_block_size=16, kv_routing_tokens=2)
    assert c.kv_router.route_block_size == 16 and c.kv_router.dim == 12


def test_router_class_errors():
    with pytest.raises(TypeError, match="router_class must be a Router subclass or a callable returning one"):
        routed_ff(router_class="CoordinateDescentRouter")
    with pytest.raises(TypeError, match=r"router_class must return a colt5.routers.Router \(for router\), got Linear"):
        routed_ff(router_class=lambda dim, **kw: nn.Linear(dim, 1))
    with pytest.raises(ValueError, match="kv_router must have num_routing_tokens=2, router_class made one with 1"):
        routed_attn(num_routed_kv=2, router_class=lambda dim, num_routing_tokens=1, **kw: CoordinateDescentRouter(dim, **kw))
    # the causal layers rely on the causal router's window slots
    with pytest.raises(TypeError, match=r"must return a colt5.causal_routing.CausalCoordinateDescentRouter \(for q_router\)"):
        causal_attn(router_class=lambda dim, window_size, **kw: CoordinateDescentRouter(dim, **kw))


def _causal_violations(model, n=14):
    torch.manual_seed(1)
    x = torch.randn(2, n, D, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        bad = []
        for j in (1, 5, 6, 7, 12):
            x2 = x.clone()
            x2[:, j:] = torch.randn_like(x2[:, j:]) * 3
            if not (model(x2)[:, :j] - ref[:, :j]).abs().max() <= 1e-9:
                bad.append(j)
    return bad


@pytest.mark.parametrize("make", [causal_attn, causal_ff, causal_block, causal_stack],
                         ids=["attention", "feedforward", "block", "stack"])
def test_causal_router_class(make):
    layer = make(router_class=CausalMLPRouter)
    routers = _routers(layer)
    assert routers and all(type(r) is CausalMLPRouter for r in routers)
    assert all(r.window_size == 6 for r in routers)
    assert _causal_violations(layer.double()) == []
    layer.float()(torch.randn(2, 14, D)).square().sum().backward()
    assert all(r.net[0].weight.grad is not None for r in routers)


def test_language_model_takes_the_causal_router_class():
    model = lm(router_class=CausalMLPRouter)
    assert all(type(r) is CausalMLPRouter for r in _routers(model)) and len(_routers(model)) == 3
    model.loss(torch.randint(0, 256, (2, 13))).backward()


def test_readme_router_class_snippet():
    """The snippet the README shows for router_class (tests/test_readme.py runs it from there)."""
    snippet = '''
import torch
from torch import nn
from colt5.routers import Router
from colt5 import ConditionalRoutedFeedForward, ConditionalRoutedTransformerBlock


class MLPRouter(Router):
    """Scores each token with a small MLP instead of a dot product with a routing token."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)          # the schedule, routes, straight-through, backend
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, self.num_routing_tokens))

    def score(self, x, routing_tokens=None):
        return self.net(x).transpose(1, 2)                              # [b, r, n]


x = torch.randn(2, 128, 64)
ff = ConditionalRoutedFeedForward(64, num_heavy_tokens=16, router_class=MLPRouter)
assert isinstance(ff.router, MLPRouter) and ff(x).shape == x.shape

block = ConditionalRoutedTransformerBlock(                               # every router of the block
    64, num_heavy_attn_tokens_q=16, num_heavy_attn_tokens_kv=32, num_heavy_ff_tokens=16,
    light_window_size=32, router_class=MLPRouter, router_kwargs={"n_iters": 10},
)
assert block(x).shape == x.shape

stats = ff.routing_stats(x)                      # how far the soft top-k got: weights sum to ~0.77 k'
assert stats.weights.shape == (2, 1, 128) and 0.5 < stats.sum_ratio.mean() < 1
'''
    exec(compile(snippet, "readme_router_class", "exec"), {"__name__": "readme_router_class"})


# -------------------------------------------------------------------------------------------
# one definition of the block options


def _keywords(cls):
    return [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]


@pytest.mark.parametrize(
    "block, attention, feedforward",
    [
        (ConditionalRoutedTransformerBlock, ConditionalRoutedAttention, ConditionalRoutedFeedForward),
        (ConditionalRoutedAutoregressiveTransformerBlock, ConditionalRoutedAutoregressiveAttention,
         ConditionalRoutedAutoregressiveFeedForward),
    ],
    ids=["encoder", "causal"],
)
def test_block_options_cover_the_signatures(block, attention, feedforward):
    """Every keyword of a block is a block option, and each goes to an argument its sublayer has."""
    names = _keywords(block)
    attn_kwargs, ff_kwargs = split_block_options({name: object() for name in names})
    assert set(attn_kwargs) <= set(_keywords(attention)), set(attn_kwargs) - set(_keywords(attention))
    assert set(ff_kwargs) <= set(_keywords(feedforward)), set(ff_kwargs) - set(_keywords(feedforward))
    # nothing the sublayers take (but their own per-layer defaults) is left out of the block
    assert set(_keywords(attention)) - set(attn_kwargs) <= {"has_light_attn"}
    assert set(_keywords(feedforward)) - set(ff_kwargs) <= set()


def test_vit_options_map_onto_block_options():
    vit_names = set(_keywords(ConditionalRoutedViT))
    assert set(_BLOCK_OPTION_OF) <= vit_names
    assert {n for n in vit_names if n.startswith(("attn_", "ff_", "router")) or n == "use_triton"} <= set(_BLOCK_OPTION_OF)
    known = set(ATTENTION_OPTIONS) | set(FEEDFORWARD_OPTIONS) | set(SHARED_OPTIONS)
    assert set(_BLOCK_OPTION_OF.values()) <= known


def test_split_block_options():
    attn, ff = split_block_options(dict(num_heavy_attn_tokens_q=3, num_heavy_ff_tokens=5, light_ff_mult=1.0,
                                        heavy_window_size=8, router_kwargs={"n_iters": 4}, rotary_emb=True))
    assert attn == dict(num_heavy_tokens_q=3, heavy_window_size=8, rotary_emb=True, router_kwargs={"n_iters": 4})
    assert ff == dict(num_heavy_tokens=5, light_ff_mult=1.0, heavy_window_size=8, router_kwargs={"n_iters": 4})
    with pytest.raises(TypeError, match="unexpected block option"):
        split_block_options(dict(num_heavy_tokens=3))


def test_blocks_pass_their_options_on():
    b = routed_block(rotary_emb=True, light_ff_mult=1.0, heavy_ff_mult=2, multiply_keys_by_score=True, num_routed_kv=2,
                     router_kwargs={"n_iters": 7}, use_triton=False, router_straight_through=False, has_light_attn=False)
    assert b.attn.heavy.rotary is not None and b.attn.heavy.multiply_keys_by_score and b.attn.light_attn is None
    assert b.attn.kv_router.num_routing_tokens == 2 and b.attn.num_heavy_tokens_q == 4
    assert b.ff.light_ff.net[0].out_features == D and b.ff.heavy_ff.net[0].out_features == 2 * D
    for r in _routers(b):
        assert (r.n_iters, r.use_triton, r.straight_through) == (7, False, False)
    c = ConditionalRoutedAutoregressiveTransformerBlock(D, light_ff_mult=1.0, use_null_q_tokens=False, **CAUSAL)
    assert c.attn.heavy_window_size == c.ff.heavy_window_size == 6
    assert c.attn.num_heavy_tokens_q == 1 and c.ff.num_heavy_tokens == 1  # W // 16, at least 1
    assert c.attn.heavy.null_q_token is None and c.ff.light_ff.net[0].out_features == D


# -------------------------------------------------------------------------------------------
# how far the soft top-k converges


def test_routing_stats_are_the_soft_top_k_of_the_router():
    router = CoordinateDescentRouter(D, num_routing_tokens=2).double()
    x = torch.randn(3, 40, D, dtype=torch.float64)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[2, 5:] = False  # 5 real tokens: fewer than k' = 9
    stats = router.routing_stats(x, num_tokens=8, mask=mask)
    assert isinstance(stats, RouterStats)
    scores = torch.einsum("bnd, rd -> brn", x, router.routing_token)
    k_soft = 8 * 9 / 8
    expected = coor_descent_reference(scores, n_iters=20, k=k_soft, eps=0.03, eps_init=4.0, eps_decay=0.7,
                                      mask=mask.unsqueeze(1).expand(3, 2, 40))
    assert_close(stats.weights, expected, 1e-10, "weights")
    assert stats.target.shape == (3, 2, 1)
    assert torch.equal(stats.target[:2], torch.full((2, 2, 1), k_soft, dtype=torch.float64))
    assert torch.equal(stats.target[2], torch.full((2, 1), 5.0, dtype=torch.float64))
    assert_close(stats.weight_sum, expected.sum(-1, keepdim=True), 1e-12, "sums")
    assert_close(stats.sum_ratio, stats.weight_sum / stats.target, 1e-12, "ratio")
    top = expected[:2].topk(8, dim=-1).values.mean(-1, keepdim=True)
    assert_close(stats.picked_weight[:2], top, 1e-12, "picked")
    assert (stats.weights[2, :, 5:] == 0).all()


def test_routing_stats_rows_are_blocks_and_windows():
    router = CoordinateDescentRouter(D, route_block_size=16)
    stats = router.routing_stats(torch.randn(2, 40, D), num_tokens=6)
    assert stats.weights.shape == (2, 1, 40) and stats.weight_sum.shape == (2, 1, 3)
    assert torch.equal(stats.target[0, 0], torch.tensor([2.25, 2.25, 2.25]))  # ceil(6 / 3) * 9/8; the last block has 8 real
    causal = CausalCoordinateDescentRouter(D, window_size=8, num_routing_tokens=2)
    stats = causal.routing_stats(torch.randn(2, 30, D), num_tokens=2)
    assert stats.weights.shape == (2, 2, 30) and stats.weight_sum.shape == (2, 2, 4)
    assert torch.allclose(stats.target, torch.tensor(3.0))  # 1.5 C per window


def test_default_schedule_stops_short_of_k():
    """The figure the docs state: with the routers' default schedule the soft weights sum to
    about 0.77 of k' on N(0, 1) scores; 200 iterations get there."""
    torch.manual_seed(0)
    x = torch.randn(16, 1024, D)
    router = CoordinateDescentRouter(D)
    with torch.no_grad():
        router.routing_token.copy_(torch.nn.functional.normalize(router.routing_token, dim=-1))  # scores ~ N(0, 1)
    ratio = router.routing_stats(x, num_tokens=64).sum_ratio
    assert 0.74 < ratio.mean() < 0.81, ratio.mean()
    converged = CoordinateDescentRouter(D, n_iters=200)
    converged.load_state_dict(router.state_dict())
    assert converged.routing_stats(x, num_tokens=64).sum_ratio.mean() > 0.98


def test_layer_routing_stats():
    x = torch.randn(2, 30, D)
    assert routed_ff().routing_stats(x).weights.shape == (2, 1, 30)
    assert routed_moe().routing_stats(x).weights.shape == (2, 2, 30)
    stats = routed_attn(num_routed_kv=2).routing_stats(x, num_heavy_tokens_kv=6)
    assert set(stats) == {"q", "kv"} and stats["kv"].weights.shape == (2, 2, 30)
    assert torch.allclose(stats["kv"].target, torch.tensor(6 * 9 / 8))
    with pytest.raises(ValueError, match="x must have last dimension 16"):
        routed_ff().routing_stats(torch.randn(2, 30, 8))
