"""route_causal: the causal router's selection, fused Triton kernels (interpreter on CPU) against
the PyTorch reference in float64: indices and slot masks exactly, weights and the gradient
with respect to the scores; masks (random, fully masked windows and rows), ragged last windows,
ties, causality, poisoned outputs, bad arguments, torch.compile and the router wired to it.

The Triton side computes in fp32, the reference here in fp64, so a candidate whose logit lies
within rounding of the threshold (or a weight at the clamp) could legitimately differ:
`_unambiguous` nudges such scores away first (rarely needed; it asserts it converges).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from colt5.causal_routing import CausalCoordinateDescentRouter
from colt5.kernels.route_causal import pad_windows, route_causal, route_causal_reference, soft_top_k_offset
from conftest import assert_close, requires_cuda

rc = importlib.import_module("colt5.kernels.route_causal")

SCHED = dict(n_iters=5, eps=0.2, eps_init=2.0, eps_decay=0.7)
ROUTER_SCHED = dict(n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7)  # the routers' default


pytestmark = pytest.mark.usefixtures("poisoned")


def _inputs(b, r, n, *, density=1.0, ties=False, empty_windows=(), empty_rows=(), W=1, dtype=torch.float32):
    scores = torch.randn(b, r, n, dtype=torch.float64) * 1.5
    if ties:  # few distinct values: equal scores inside windows and across them
        scores = scores.mul(2).round().div(2)
    mask = None
    if density < 1 or empty_windows or empty_rows:
        mask = torch.rand(b, n) < density
        for w in empty_windows:
            mask[:, w * W : (w + 1) * W] = False
        for row in empty_rows:
            mask[row] = False
    return scores.to(dtype), mask


def _unambiguous(scores, mask, W, k, sched, tol=1e-4):
    """scores with every logit s + a_{w-1} at least tol away from the candidacy threshold
    -e ln 2 and from the clamp at 0 (fp64 duals); the nudge moves a score up by 20 tol."""
    n = scores.shape[-1]
    for _ in range(10):
        s, real = pad_windows(scores.double(), mask, W)
        if s.shape[2] == 1:
            return scores
        a, e = soft_top_k_offset(s[:, :, :-1], k=k, mask=real[:, :, :-1], backend="reference", **sched)
        logit = s[:, :, 1:] + a
        near = ((logit + e * math.log(2.0)).abs() < tol) | (logit.abs() < tol)
        near = F.pad(near.flatten(2), (W, 0))[..., :n]
        if not near.any():
            return scores
        scores = scores + (20 * tol * near).to(scores.dtype)
    raise AssertionError("could not move the scores away from the thresholds")


def _call(scores, mask, W, C, k, sched, straight_through, backend):
    return route_causal(scores, window_size=W, capacity=C, k=k, mask=mask, straight_through=straight_through,
                        backend=backend, **sched)


def _check_against_reference(scores, mask, W, C, *, k=None, sched=SCHED, straight_through=True, touch=1.0,
                             expect_grad=True, grad_rtol=1e-4, weight_rtol=1e-5):
    """Triton on `scores` vs the reference on scores in fp64: outputs, and ds of a random
    weighting of the weights (of a random `touch` fraction of the slots)."""
    k = min(C * 1.5, W) if k is None else k
    scores = _unambiguous(scores, mask, W, k, sched)
    b, r, n = scores.shape
    nw = -(-n // W)
    s_t = scores.clone().requires_grad_()
    s_r = scores.double().requires_grad_()
    idx, w, sm = _call(s_t, mask, W, C, k, sched, straight_through, "triton")
    idx_r, w_r, sm_r = _call(s_r, mask, W, C, k, sched, straight_through, "reference")
    assert idx.shape == w.shape == sm.shape == (b, r, nw * C)
    assert idx.dtype == torch.int64 and sm.dtype == torch.bool
    assert w.dtype == (torch.float64 if scores.dtype == torch.float64 else torch.float32)
    assert torch.equal(idx, idx_r), f"indices differ at {(idx != idx_r).nonzero()[:5].tolist()}"
    assert torch.equal(sm, sm_r), f"slot masks differ at {(sm != sm_r).nonzero()[:5].tolist()}"
    assert_close(w, w_r, weight_rtol, "weights")
    if straight_through:
        assert torch.equal(w, torch.ones_like(w))

    dev = scores.device
    g = torch.randn(b, r, nw * C, dtype=torch.float64, device=dev) * (torch.rand(b, r, nw * C, device=dev) < touch)
    (ds,) = torch.autograd.grad((w * g.to(w.dtype)).sum(), s_t)
    if w_r.requires_grad:
        (ds_r,) = torch.autograd.grad((w_r * g).sum(), s_r)
    else:  # window 0 alone: the reference's weights are constants
        ds_r = torch.zeros_like(s_r)
    assert ds.dtype == scores.dtype
    if expect_grad:
        assert ds_r.abs().sum() > 0, "a case whose gradient is 0 tests nothing"
    assert_close(ds, ds_r, grad_rtol, "ds")
    return idx, w, sm


CASES = {
    # b, r, n, W, C, k (None: the router's min(1.5 C, W)), mask density, ties, fully masked
    # windows, fully masked rows, straight_through, fraction of slots the loss touches
    "b1-r1-n1-W4-C1": (1, 1, 1, 4, 1, None, 1.0, False, (), (), True, 1.0),
    "b2-r2-n37-W4-C3-masked": (2, 2, 37, 4, 3, None, 0.7, False, (), (), False, 1.0),
    "b1-r2-n24-W1-C1": (1, 2, 24, 1, 1, None, 1.0, False, (), (), True, 1.0),
    "b2-r1-n300-W37-C3-masked": (2, 1, 300, 37, 3, None, 0.6, False, (), (), True, 1.0),
    "b1-r2-n300-W16-C16-k6": (1, 2, 300, 16, 16, 6.0, 1.0, False, (), (), False, 0.3),
    "b2-r1-n200-W16-C3-ties": (2, 1, 200, 16, 3, None, 1.0, True, (), (), True, 1.0),
    "b2-r2-n150-W37-C37-masked-ties": (2, 2, 150, 37, 37, None, 0.8, True, (), (), True, 0.5),
    "b2-r1-n100-W16-C1-empty-windows": (2, 1, 100, 16, 1, None, 0.7, False, (1, 2, 5), (), False, 1.0),
    "b2-r2-n45-W4-C3-empty-row": (2, 2, 45, 4, 3, None, 0.5, False, (3,), (1,), True, 1.0),
    "b1-r1-n16-W16-C3-one-window": (1, 1, 16, 16, 3, None, 0.5, False, (), (), False, 1.0),
    "b2-r1-n33-W16-C3-ragged": (2, 1, 33, 16, 3, None, 1.0, False, (), (), False, 1.0),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_reference(case):
    b, r, n, W, C, k, density, ties, empty_windows, empty_rows, st, touch = CASES[case]
    scores, mask = _inputs(b, r, n, density=density, ties=ties, empty_windows=empty_windows,
                           empty_rows=empty_rows, W=W)
    k = min(C * 1.5, W) if k is None else k
    # no gradient: window 0 alone, or k = W (every y saturates at 1)
    expect_grad = n > W and k < W
    _check_against_reference(scores, mask, W, C, k=k, straight_through=st, touch=touch, expect_grad=expect_grad)


def test_router_schedule_and_fp64_scores():
    """The routers' schedule (20 iterations down to eps 0.03), fp64 scores into the kernels."""
    scores, mask = _inputs(2, 1, 70, density=0.8)
    _check_against_reference(scores.double(), mask, 16, 4, sched=ROUTER_SCHED, straight_through=False,
                             weight_rtol=1e-4, grad_rtol=1e-3)


def test_bf16_scores():
    scores, mask = _inputs(1, 2, 50, density=0.8, dtype=torch.bfloat16)
    # ds in bf16: rounding to 8 bits of mantissa
    _check_against_reference(scores, mask, 8, 2, straight_through=False, grad_rtol=1e-2)


def test_reference_semantics():
    """The reference on a hand-checked row: window 0 takes its first C real tokens with weight
    1, later windows their first C candidates (y > 1/2) in position order, unused slots point at
    the window's earliest other positions (clamped to n - 1) and are masked."""
    W, C = 4, 2
    # window 0: 1, 2, 3 real, so 1 and 2 take its slots; its dual a_0 ~ -5 makes 5 and 7 (s = 9)
    # window 1's candidates; a_1 (< 0, where 9 + a_1 saturates) leaves 8 (s = -9) no candidate:
    # the slots point at 8 and at the padding, clamped to n - 1 = 8
    scores = torch.tensor([[[0.0, 5.0, 5.0, 5.0, -9.0, 9.0, -9.0, 9.0, -9.0]]], dtype=torch.float64)
    mask = torch.tensor([[False] + [True] * 8])
    for backend in ("reference", "triton"):
        idx, w, sm = route_causal(scores, window_size=W, capacity=C, k=2.0, mask=mask, straight_through=False,
                                  backend=backend, **SCHED)
        assert idx[0, 0].tolist() == [1, 2, 5, 7, 8, 8]
        assert sm[0, 0].tolist() == [True, True, True, True, False, False]
        assert w[0, 0, :2].tolist() == [1.0, 1.0]
        assert (w[0, 0, 2:4] > 0.5).all() and w[0, 0, 4] < 1e-6


def _causal_outputs(scores, mask, p, W, C, backend):
    """Slots used by positions < p, all weights, and ds of a loss on those slots only."""
    s = scores.clone().requires_grad_()
    # a soft final eps: many used slots have y < 1, so their gradient is not 0
    idx, w, sm = _call(s, mask, W, C, 3.0, dict(SCHED, eps=1.0), False, backend)
    before = sm & (idx < p)
    g = torch.linspace(-1, 2, idx.shape[-1], dtype=w.dtype).expand_as(w)
    (ds,) = torch.autograd.grad((w * g * before).sum(), s)
    return before, idx, w.detach(), ds


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_causal(backend):
    """Replacing scores (and the mask) at positions >= p changes no slot used by a position < p,
    nor the gradient of a loss on those slots; that loss has no gradient at positions >= p."""
    W, C, n = 8, 3, 36
    scores, mask = _inputs(1, 1, n, density=0.8, dtype=torch.float64)
    for p in (1, 7, 9, 17, 27):
        before, idx, w, ds = _causal_outputs(scores, mask, p, W, C, backend)
        other = scores.clone()
        other[..., p:] = torch.randn_like(other[..., p:]) * 3
        other_mask = mask.clone()
        other_mask[:, p:] = torch.rand(1, n - p) < 0.5
        before2, idx2, w2, ds2 = _causal_outputs(other, other_mask, p, W, C, backend)
        assert torch.equal(before, before2), p
        assert torch.equal(idx[before], idx2[before]) and torch.equal(w[before], w2[before]), p
        assert torch.equal(ds[..., :p], ds2[..., :p]), p
        assert not ds2[..., p:].any(), p
        # the replacement shows in later slots: the checks above are not vacuous
        assert not torch.equal(w, w2), p
    assert before.sum() > 3 and ds.abs().sum() > 0


def test_backward_state_and_every_output_written():
    """The forward's outputs (poisoned beforehand) are all written, and its backward state is
    consistent: each used slot's position has that slot number."""
    W, C = 16, 5
    scores, mask = _inputs(2, 2, 70, density=0.7)
    idx, w, sm, stats, slot_of = rc.route_causal_fwd(scores, mask, W, C, 6.0, SCHED["n_iters"], SCHED["eps"],
                                                     SCHED["eps_init"], SCHED["eps_decay"], False)
    nw = -(-70 // W)
    assert stats.shape == (4, nw, 5, SCHED["n_iters"] + 1) and torch.isfinite(stats).all()
    assert slot_of.shape == (4, nw * W) and slot_of.min() >= -1 and slot_of.max() < C
    assert torch.isfinite(w).all() and idx.min() >= 0 and idx.max() < 70
    windowed = slot_of.view(4, nw, W)
    assert ((windowed >= 0).sum(-1) == C).all()  # every slot has exactly one position
    local = idx.view(4, nw, C) - torch.arange(nw).view(1, nw, 1) * W
    used = sm.view(4, nw, C)
    got = windowed.gather(-1, local.clamp_max(W - 1))
    assert torch.equal(got[used], torch.arange(C).expand(4, nw, C)[used])
    # entry w holds window w - 1's dual: coor_descent_offset's, from the soft top-k kernels
    s, real = pad_windows(scores, mask, W)
    a, _ = soft_top_k_offset(s[:, :, :-1], k=6.0, mask=real[:, :, :-1], backend="triton", **SCHED)
    assert_close(stats[:, 1:, 0, -1], a.view(4, nw - 1), 1e-6, "a_T")


def test_straight_through_only_changes_forward_values():
    scores, mask = _inputs(1, 2, 40, density=0.8)
    outs = []
    for st in (True, False):
        s = scores.clone().requires_grad_()
        idx, w, sm = _call(s, mask, 8, 3, 4.5, SCHED, st, "triton")
        (ds,) = torch.autograd.grad(w.sum(), s)
        outs.append((idx, w.detach(), sm, ds))
    (i1, w1, m1, d1), (i2, w2, m2, d2) = outs
    assert torch.equal(i1, i2) and torch.equal(m1, m2) and torch.equal(d1, d2) and d1.abs().sum() > 0
    assert torch.equal(w1, torch.ones_like(w1)) and (w2 < 1).any()


def test_dispatch_and_fallback(monkeypatch):
    scores, mask = _inputs(1, 1, 40, density=0.8)
    kw = dict(window_size=8, capacity=3, k=4.5, mask=mask, **SCHED)
    default = route_causal(scores, **kw)  # a CPU tensor: the reference
    for got, want in zip(default, route_causal_reference(scores, **kw, backend="reference")):
        assert torch.equal(got, want)
    # windows past MAX_WINDOW: the reference, its duals on the backend asked for
    monkeypatch.setattr(rc, "MAX_WINDOW", 4)
    for got, want in zip(route_causal(scores, **kw, backend="triton"),
                         route_causal_reference(scores, **kw, backend="triton")):
        assert torch.equal(got, want)


class _OverridingRouter(CausalCoordinateDescentRouter):
    def _window_weights(self, s, real, C):
        return super()._window_weights(s, real, C)


def test_router_uses_the_op(monkeypatch):
    """The router on the fused op (use_triton=True) and on the reference agree, gradients of its
    routing tokens included; a subclass overriding _window_weights keeps the torch path."""
    cr = importlib.import_module("colt5.causal_routing")
    calls = []
    monkeypatch.setattr(cr, "route_causal", lambda *a, **kw: calls.append(kw["backend"]) or route_causal(*a, **kw))
    torch.manual_seed(0)
    D, W, C = 8, 8, 3
    x = torch.randn(2, 29, D)
    mask = torch.rand(2, 29) > 0.2
    results = []
    for cls, use_triton in ((CausalCoordinateDescentRouter, True), (CausalCoordinateDescentRouter, False),
                            (_OverridingRouter, True)):
        router = cls(D, window_size=W, num_routing_tokens=2, use_triton=use_triton, straight_through=False,
                     eps=0.3, n_iters=6)
        with torch.no_grad():
            router.routing_token.copy_(torch.linspace(-1, 1, 2 * D).view(2, D))
        indices, weights, tokens, routed_mask = router(x, num_tokens=C, mask=mask)
        (weights * torch.linspace(0, 1, weights.shape[-1])).sum().backward()
        results.append((indices, weights.detach(), tokens, routed_mask, router.routing_token.grad))
    assert calls == ["triton", "reference"]  # not the overriding router
    (i2, w2, t2, m2, g2) = results[1]
    assert g2.abs().sum() > 0
    for i1, w1, t1, m1, g1 in (results[0], results[2]):
        assert torch.equal(i1, i2) and torch.equal(m1, m2) and torch.equal(t1, t2)
        assert_close(w1, w2, 1e-5, "weights")
        assert_close(g1, g2, 1e-4, "routing token gradient")


def test_compile_fullgraph():
    """torch.compile traces the op without a graph break (fullgraph=True), forward and backward
    (aot_eager), and gives the eager results."""
    torch._dynamo.reset()
    scores, mask = _inputs(1, 2, 30, density=0.8)
    g = torch.randn(1, 2, 4 * 3)

    def f(s, m):
        idx, w, sm = route_causal(s, window_size=8, capacity=3, k=4.5, mask=m, straight_through=False,
                                  backend="triton", **SCHED)
        return idx, sm, (w * g).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (compiled, f):
        s = scores.clone().requires_grad_()
        idx, sm, loss = fn(s, mask)
        (ds,) = torch.autograd.grad(loss, s)
        outs.append((idx, sm, loss.detach(), ds))
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    assert outs[0][3].abs().sum() > 0


def test_library_op_registration():
    scores, mask = _inputs(1, 2, 20, density=0.8)
    args = (scores.requires_grad_(), mask, 8, 3, 4.5, 3, 0.2, 2.0, 0.7, False)
    torch.library.opcheck(rc._fwd_op.op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


BAD = [
    (dict(scores=torch.zeros(2, 10)), ValueError, "scores"),
    (dict(scores=torch.zeros(1, 1, 10, dtype=torch.long)), TypeError, "scores"),
    (dict(scores=torch.zeros(1, 1, 0)), ValueError, "scores"),
    (dict(scores=[1.0]), TypeError, "scores"),
    (dict(window_size=0), ValueError, "window_size"),
    (dict(window_size=4.0), TypeError, "window_size"),
    (dict(capacity=5), ValueError, "capacity"),
    (dict(capacity=0), ValueError, "capacity"),
    (dict(capacity=True), TypeError, "capacity"),
    (dict(k=0.0), ValueError, "k"),
    (dict(k=float("inf")), ValueError, "k"),
    (dict(k=float("nan")), ValueError, "k"),
    (dict(k=torch.ones(1)), TypeError, "k"),
    (dict(n_iters=0), ValueError, "n_iters"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps_decay=1.5), ValueError, "eps_decay"),
    (dict(eps_init=0.0), ValueError, "eps_init"),
    (dict(mask=torch.ones(1, 10)), TypeError, "mask"),
    (dict(mask=torch.ones(1, 9, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(1, 1, 10, dtype=torch.bool)), ValueError, "mask"),
    (dict(straight_through=1), TypeError, "straight_through"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("kw, err, match", BAD, ids=[f"{list(kw)[0]}-{i}" for i, (kw, _, _) in enumerate(BAD)])
def test_bad_arguments(kw, err, match):
    args = dict(scores=torch.zeros(1, 1, 10), window_size=4, capacity=2, k=3.0, n_iters=3, eps=0.1)
    args.update(kw)
    with pytest.raises(err, match=match):
        route_causal(args.pop("scores"), **args)


# -------------------------------------------------------------------------------------------
# GPU (COLT5_GPU_TESTS=1): realistic sizes, compiled kernels


GPU_CASES = {
    # b, r, n, W, C, mask density, fully masked windows (of every row), fully masked rows
    "b8-r1-n4096-W128-C8": (8, 1, 4096, 128, 8, 1.0, (), ()),
    "b8-r2-n4096-W128-C16-masked": (8, 2, 4096, 128, 16, 0.8, (), ()),
    "b8-r2-n32768-W128-C16": (8, 2, 32768, 128, 16, 1.0, (), ()),
    "b8-r1-n30000-W128-C8-masked-empty": (8, 1, 30000, 128, 8, 0.9, (3, 4, 100), (5,)),
    "b2-r2-n20000-W1024-C64-masked": (2, 2, 20000, 1024, 64, 0.9, (), ()),
    "b1-r1-n40000-W8192-C512": (1, 1, 40000, 8192, 512, 1.0, (), ()),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_matches_reference(case):
    b, r, n, W, C, density, empty_windows, empty_rows = GPU_CASES[case]
    scores, mask = _inputs(b, r, n, density=density, empty_windows=empty_windows, empty_rows=empty_rows, W=W)
    scores, mask = scores.cuda(), None if mask is None else mask.cuda()
    for straight_through in (True, False):
        _check_against_reference(scores, mask, W, C, sched=ROUTER_SCHED, straight_through=straight_through,
                                 touch=0.5, weight_rtol=1e-4, grad_rtol=1e-3)


@pytest.mark.gpu
@requires_cuda
def test_gpu_router_matches_reference_router():
    torch.manual_seed(0)
    D, W, C = 64, 128, 8
    x = torch.randn(8, 4096, D, device="cuda")
    outs = []
    for use_triton in (None, False):
        router = CausalCoordinateDescentRouter(D, window_size=W, num_routing_tokens=2, use_triton=use_triton).cuda()
        with torch.no_grad():
            router.routing_token.copy_(torch.linspace(-1, 1, 2 * D, device="cuda").view(2, D))
        indices, weights, _, routed_mask = router(x, num_tokens=C)
        (weights * torch.linspace(0, 1, weights.shape[-1], device="cuda")).sum().backward()
        outs.append((indices, routed_mask, router.routing_token.grad))
    # fp32 on both sides: a candidate within rounding of its threshold may differ (and shift
    # its window's later slots); few windows do
    (i1, m1, g1), (i2, m2, g2) = outs
    differ = ((i1 != i2) | (m1 != m2)).view(8, 2, -1, C).any(-1)
    assert differ.float().mean() < 0.01
    assert_close(g1, g2, 1e-2, "routing token gradient")


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_capture():
    """Forward and backward capture into a CUDA graph (no host synchronisation) and replay."""
    b, r, n, W, C = 4, 2, 4096, 128, 8
    kw = dict(window_size=W, capacity=C, k=12.0, straight_through=True, **ROUTER_SCHED)
    s = torch.randn(b, r, n, device="cuda", requires_grad=True)
    g = torch.randn(b, r, n // W * C, device="cuda")

    def step():
        idx, w, sm = route_causal(s, **kw)
        (ds,) = torch.autograd.grad((w * g).sum(), s)
        return idx, sm, ds

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        s.copy_(torch.randn_like(s))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)
