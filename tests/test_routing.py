"""The fused router selection (`colt5.kernels.routing.route_top_k`): the Triton op (interpreter
on CPU) against the PyTorch reference in float64, picks, weights, real flags and the gradient."""

import importlib

import pytest
import torch

from colt5.kernels.routing import route_top_k, route_top_k_reference
from conftest import assert_close, requires_cuda

routing = importlib.import_module("colt5.kernels.routing")
SCHEDULE = dict(n_iters=8, eps=0.1, eps_init=2.0, eps_decay=0.7)

CASES = {
    # b, r, n, k, shared mask density (None: no mask), straight-through, rows routed by torch.topk
    "b1-r1-n37-k5": (1, 1, 37, 5, None, True, False),
    "b2-r3-n64-k9-masked": (2, 3, 64, 9, 0.6, True, False),
    "b2-r2-n50-k50-masked-soft": (2, 2, 50, 50, 0.8, False, False),
    "b3-r1-n100-k12-soft": (3, 1, 100, 12, None, False, False),
    "b2-r2-n90-k7-masked-topk-path": (2, 2, 90, 7, 0.7, False, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_float64_reference(case, monkeypatch):
    b, r, n, k, density, straight, topk_path = CASES[case]
    if topk_path:
        monkeypatch.setattr(routing, "SELECT_MAX_N", 16)
    s64 = torch.randn(b, r, n, dtype=torch.float64)
    mask = None if density is None else torch.rand(b, n) < density
    cfg = dict(num_tokens=k, k_soft=min(n, k * 9 / 8), mask=mask, straight_through=straight, **SCHEDULE)
    s = s64.float().requires_grad_()
    got = route_top_k(s, backend="triton", **cfg)
    s_ref = s64.clone().requires_grad_()
    want = route_top_k(s_ref, backend="reference", **cfg)

    order, order_ref = got.indices.argsort(-1), want.indices.argsort(-1)
    idx, idx_ref = got.indices.gather(-1, order), want.indices.gather(-1, order_ref)
    assert got.indices.dtype == torch.int64 and torch.equal(idx, idx_ref)
    w, w_ref = got.weights.gather(-1, order), want.weights.gather(-1, order_ref)
    assert got.weights.dtype == torch.float32
    assert_close(w, w_ref, 1e-5, "weights")
    if straight:
        assert (got.weights == 1).all()
    if mask is None:
        assert got.real is None and want.real is None
    else:
        assert torch.equal(got.real.gather(-1, order), want.real.gather(-1, order_ref))
    g = torch.randn(b, r, k, dtype=torch.float64)
    (ds,) = torch.autograd.grad((w * g.float()).sum(), s)
    (ds_ref,) = torch.autograd.grad((w_ref * g).sum(), s_ref)
    assert_close(ds, ds_ref, 1e-4, "ds")
    if mask is not None:
        assert (ds.detach()[~mask.unsqueeze(1).expand(b, r, n)] == 0).all()


def test_nan_and_masked_scores_rank_last_on_every_backend():
    """One rule everywhere: NaN and masked positions are picked only when nothing else is left,
    and get weight 0 (1 with straight-through) and no gradient."""
    s = torch.randn(1, 2, 20)
    s[0, :, 3] = float("nan")
    s[0, :, 4] = 100.0  # masked below: ranks last despite the score
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, 4] = False
    for backend in ("triton", "reference"):
        picks = route_top_k(s, num_tokens=18, k_soft=10.0, mask=mask, straight_through=False, backend=backend, **SCHEDULE)
        assert not (picks.indices == 3).any() and not (picks.indices == 4).any()
        picks = route_top_k(s, num_tokens=20, k_soft=10.0, mask=mask, straight_through=False, backend=backend, **SCHEDULE)
        at_nan = picks.weights[picks.indices == 3]
        at_masked = picks.weights[picks.indices == 4]
        assert (at_nan == 0).all() and (at_masked == 0).all() and not picks.real[picks.indices == 4].any()


def test_poisoned_outputs_are_all_written(poisoned):
    picks = route_top_k(torch.randn(2, 3, 40), num_tokens=7, k_soft=8.0, straight_through=False,
                        mask=torch.rand(2, 40) > 0.2, backend="triton", **SCHEDULE)
    assert (picks.indices >= 0).all() and torch.isfinite(picks.weights).all()


def test_library_op_passes_opcheck_and_compiles():
    s = torch.randn(4, 30, requires_grad=True)
    mask = torch.rand(2, 30) > 0.3
    args = (s, mask, 2, 5, 6.0, 4, 0.1, 1.0, 0.7, True)
    torch.library.opcheck(torch.ops.colt5.route_top_k.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def fn(x):
        picks = route_top_k(x.view(2, 2, 30), num_tokens=5, k_soft=6.0, mask=mask, backend="triton", **SCHEDULE)
        return picks.weights.sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(s), fn(s))


def test_bad_shapes():
    s = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="num_tokens"):
        route_top_k(s, num_tokens=11, k_soft=3.0, **SCHEDULE)
    with pytest.raises(ValueError, match="mask"):
        route_top_k(s, num_tokens=3, k_soft=3.0, mask=torch.ones(2, 9, dtype=torch.bool), **SCHEDULE)


def test_reference_is_coor_descent_at_the_top_k():
    from colt5.kernels import coor_descent

    s = torch.randn(3, 25, dtype=torch.float64)
    picks = route_top_k_reference(s, num_tokens=4, k_soft=5.0, straight_through=False, **SCHEDULE)
    assert torch.equal(picks.indices.sort(-1).values, s.topk(4, -1).indices.sort(-1).values)
    assert torch.equal(picks.weights, coor_descent(s, k=5.0, **SCHEDULE).gather(-1, picks.indices))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("n", [8192, 32768])
def test_gpu_matches_reference(n):
    s64 = torch.randn(2, 2, n, dtype=torch.float64, device="cuda")
    mask = torch.rand(2, n, device="cuda") > 0.1
    cfg = dict(num_tokens=n // 16, k_soft=n / 16 * 9 / 8, mask=mask, straight_through=False,
               n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7)
    s = s64.float().requires_grad_()
    got = route_top_k(s, **cfg)
    s_ref = s64.clone().requires_grad_()
    want = route_top_k(s_ref, backend="reference", **cfg)
    o, o_ref = got.indices.argsort(-1), want.indices.argsort(-1)
    assert torch.equal(got.indices.gather(-1, o), want.indices.gather(-1, o_ref))
    w, w_ref = got.weights.gather(-1, o), want.weights.gather(-1, o_ref)
    assert_close(w, w_ref, 1e-5, "weights")
    g = torch.randn_like(w_ref)
    (ds,) = torch.autograd.grad((w * g.float()).sum(), s)
    (ds_ref,) = torch.autograd.grad((w_ref * g).sum(), s_ref)
    assert_close(ds, ds_ref, 1e-3, "ds")


def test_eager_function_and_library_op_agree():
    """KernelOp: eager calls go through an autograd.Function, torch.compile through the library
    op; both run the same implementation and the same autograd formula."""
    s = torch.randn(4, 30, requires_grad=True)
    mask = torch.rand(2, 30) > 0.3
    args = (s, mask, 2, 5, 6.0, 4, 0.1, 1.0, 0.7, False)
    eager = routing._route_op(*args)
    library = routing._route_op.op(*args)
    assert type(eager[1].grad_fn).__name__ == "FunctionBackward"  # the eager autograd.Function
    assert all(torch.equal(a, b) for a, b in zip(eager[:3], library[:3]))  # picks, weights, real
    g = torch.randn(4, 5)
    assert torch.equal(torch.autograd.grad(eager[1], s, g)[0], torch.autograd.grad(library[1], s, g)[0])
    with torch.no_grad():
        assert routing._route_op(*args)[1].grad_fn is None


def test_aot_compiled_forward_and_backward_match_eager():
    """AOTAutograd traces the op and its backward formula (fake tensors reach the backward's
    op, which must dispatch to the library op, not launch kernels)."""
    s = torch.randn(4, 30, requires_grad=True)
    mask = torch.rand(2, 30) > 0.3

    def fn(x):
        picks = route_top_k(x.view(2, 2, 30), num_tokens=5, k_soft=6.0, mask=mask, straight_through=False,
                            backend="triton", **SCHEDULE)
        return (picks.weights * torch.arange(5.0)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)  # inductor: the backward is compiled at the first backward
    (g_compiled,) = torch.autograd.grad(compiled(s), s)
    (g_eager,) = torch.autograd.grad(fn(s), s)
    assert torch.allclose(g_compiled, g_eager)
