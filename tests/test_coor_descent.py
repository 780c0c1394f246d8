"""Soft top-k: reference vs the literal iteration, Triton (interpreter on CPU) vs float64 reference.

The Triton cases force tiny chunks and splits so that streaming and the multi-launch split path
run on rows of a few hundred elements.
"""

import importlib

import pytest
import torch

from colt5 import coor_descent
from colt5.kernels import coor_descent_reference, triton_coor_descent
from conftest import TOLERANCES, assert_close, literal_coor_descent

cd = importlib.import_module("colt5.kernels.soft_topk")


pytestmark = pytest.mark.usefixtures("poisoned")


def _inputs(rows, n, *, density, per_row_k, k, dtype=torch.float32, empty_rows=()):
    s = torch.randn(rows, n, dtype=torch.float64).to(dtype)
    mask = torch.rand(rows, n) < density if density < 1 else None
    if empty_rows:
        mask = torch.ones(rows, n, dtype=torch.bool) if mask is None else mask
        mask[list(empty_rows)] = False
    if per_row_k:
        # fractional k: k equal to a row's valid count puts s + a on the relu kink exactly
        k = torch.rand(rows, dtype=torch.float64) * n / 2 + 0.3
    return s, mask, k


@pytest.mark.parametrize("n_iters,eps_init,eps_decay", [(1, None, 1.0), (7, 3.0, 0.6), (20, None, 1.0)])
def test_reference_matches_literal_iteration(n_iters, eps_init, eps_decay, seeded):
    s, mask, k = _inputs(5, 40, density=0.7, per_row_k=True, k=None, dtype=torch.float64)
    mask[:, 0] = True  # the literal form has no fully masked rows
    s.requires_grad_()
    k.requires_grad_()
    cfg = dict(n_iters=n_iters, eps=0.2, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    g = torch.randn_like(s)
    y = coor_descent_reference(s, k=k, **cfg)
    ds, dk = torch.autograd.grad(y, (s, k), g)
    _, y_lit = literal_coor_descent(s, k=k, **cfg)
    ds_lit, dk_lit = torch.autograd.grad(y_lit, (s, k), g)
    assert_close(y, y_lit, 1e-12, "y")
    assert_close(ds, ds_lit, 1e-10, "ds")
    assert_close(dk, dk_lit, 1e-10, "dk")


# (rows, n, mask density, per-row k, k, n_iters, eps, eps_init, eps_decay, dtype, empty rows, forced plan)
CASES = {
    "rows2-n1-k0.4": (2, 1, 1.0, False, 0.4, 20, 0.1, None, 1.0, torch.float32, (), {}),
    "rows3-n2-masked-k0.7": (3, 2, 0.6, False, 0.7, 2, 0.1, None, 1.0, torch.float32, (), {}),
    "rows4-n63-masked-rowk-scaled": (4, 63, 0.5, True, None, 20, 0.05, 2.0, 0.7, torch.float32, (), {}),
    "rows3-n257-dense-iters1": (3, 257, 1.0, False, 30.5, 1, 0.1, None, 1.0, torch.float32, (), {}),
    "rows3-n257-sparse-iters2": (3, 257, 0.1, False, 5.5, 2, 0.1, 1.0, 0.5, torch.float32, (), {}),
    "rows3-n63-k-above-n": (3, 63, 0.8, False, 100.0, 20, 0.1, None, 1.0, torch.float32, (), {}),
    "rows4-n100-empty-rows-rowk": (4, 100, 0.7, True, None, 20, 0.1, 1.0, 0.8, torch.float32, (1, 3), {}),
    "rows3-n257-masked-bf16": (3, 257, 0.7, False, 20.5, 20, 0.1, 2.0, 0.8, torch.bfloat16, (), {}),
    "rows2-n300-streamed-rowk": (2, 300, 0.7, True, None, 6, 0.1, 2.0, 0.6, torch.float32, (1,), {"block_n": 64}),
    "rows3-n300-split-streamed": (3, 300, 0.7, True, None, 6, 0.1, 2.0, 0.6, torch.float32, (2,), {"block_n": 64, "split_len": 128}),
    "rows2-n200-split-regs-k-above-n": (2, 200, 0.5, False, 150.5, 3, 0.2, None, 1.0, torch.float32, (), {"split_len": 32}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_float64_reference(case, seeded, force_plan):
    rows, n, density, per_row_k, k, n_iters, eps, eps_init, eps_decay, dtype, empty, force = CASES[case]
    force_plan(**force)
    s, mask, k = _inputs(rows, n, density=density, per_row_k=per_row_k, k=k, dtype=dtype, empty_rows=empty)
    cfg = dict(n_iters=n_iters, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    s.requires_grad_()
    inputs = (s,)
    k_tri = k
    if per_row_k:
        k_tri = k.float().requires_grad_()
        inputs = (s, k_tri)
    y = triton_coor_descent(s, k=k_tri, **cfg)
    assert y.dtype == dtype
    g = torch.randn(rows, n, dtype=torch.float64)
    grads = torch.autograd.grad(y, inputs, g.to(dtype))

    s64 = s.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_() if per_row_k else k
    y64 = coor_descent_reference(s64, k=k64, **cfg)
    grads64 = torch.autograd.grad(y64, (s64, k64) if per_row_k else (s64,), g)

    rtol_y, rtol_g = TOLERANCES[dtype]
    assert_close(y, y64, rtol_y, "y")
    for name, got, want in zip(("ds", "dk"), grads, grads64):
        assert_close(got, want, rtol_g, name)
    if empty:
        assert (y[list(empty)] == 0).all() and (grads[0][list(empty)] == 0).all()


def test_forward_without_grad_matches_the_differentiable_path(seeded):
    """Inference (nothing requires grad, or no_grad) gives bitwise the values of the
    differentiable path, without an autograd node."""
    from colt5.kernels import coor_descent_offset

    s = torch.randn(3, 50)
    mask = torch.rand(3, 50) > 0.3
    k = torch.rand(3) * 5 + 1
    cfg = dict(n_iters=5, eps=0.1, eps_init=1.0, eps_decay=0.7, mask=mask)
    y_grad = triton_coor_descent(s.clone().requires_grad_(), k=k, **cfg)
    a_grad, _ = coor_descent_offset(s, k=k.clone().requires_grad_(), backend="triton", **cfg)
    assert y_grad.grad_fn is not None and a_grad.grad_fn is not None
    with torch.no_grad():
        y_nograd = triton_coor_descent(s.clone().requires_grad_(), k=k, **cfg)
    y_plain = triton_coor_descent(s, k=k, **cfg)
    a_plain, _ = coor_descent_offset(s, k=k, backend="triton", **cfg)
    for got, want in ((y_nograd, y_grad), (y_plain, y_grad), (a_plain, a_grad)):
        assert got.grad_fn is None and torch.equal(got, want.detach())


def test_library_op_passes_opcheck(seeded):
    """The op every mode runs passes torch.library's own checks."""
    s = torch.randn(3, 40, requires_grad=True)
    k = (torch.rand(3) * 10 + 1).requires_grad_()
    mask = torch.rand(3, 40) > 0.3
    args = (s.detach().requires_grad_(), mask, k.detach().requires_grad_(), 1.0, 3, 0.1, 0.5, 0.9)
    torch.library.opcheck(
        torch.ops.colt5.coor_descent_fwd.default, args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, seeded):
    s = torch.randn(4, 33, requires_grad=True)
    mask = torch.rand(4, 33) > 0.2

    def routed(x):
        return coor_descent(x.tanh() * 3, n_iters=4, k=5.5, eps=0.1, mask=mask, backend=backend) * 2

    compiled = torch.compile(routed, fullgraph=True, backend="inductor" if backend == "reference" else "aot_eager")
    y = compiled(s)
    (ds,) = torch.autograd.grad(y.sum(), s)
    y_eager = routed(s)
    (ds_eager,) = torch.autograd.grad(y_eager.sum(), s)
    assert_close(y, y_eager, 1e-5, "y")
    assert_close(ds, ds_eager, 1e-4, "ds")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_finite_scores(backend, seeded):
    """+inf takes weight 1, -inf and NaN weight 0 (as if masked); gradients finite; no hang."""
    s = torch.randn(3, 20)
    s[0, 3], s[0, 7], s[1, 0], s[1, 5] = float("inf"), float("-inf"), float("nan"), float("inf")
    s[2] = float("nan")
    s.requires_grad_()
    y = coor_descent(s, n_iters=10, k=4.5, backend=backend)
    (ds,) = torch.autograd.grad(y.sum() + (y * torch.arange(20.0)).sum(), s)
    assert torch.isfinite(y).all() and torch.isfinite(ds).all()
    assert y[0, 3] == 1 and y[1, 5] == 1
    assert y[0, 7] == 0 and y[1, 0] == 0 and (y[2] == 0).all()
    assert ds[0, 3] == 0 and ds[0, 7] == 0 and ds[1, 0] == 0 and (ds[2] == 0).all()
    finite = s.detach().clone()
    mask = torch.isfinite(finite) | (finite == float("inf"))
    finite[~mask] = 0.0
    expected = coor_descent_reference(finite.double(), n_iters=10, k=4.5, mask=mask)
    assert_close(y, expected, 1e-5, "y vs masked")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(importlib.import_module("colt5.kernels.runtime"), "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_coor_descent(torch.randn(2, 5), n_iters=2, k=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        coor_descent(torch.randn(2, 5), n_iters=2, k=1, backend="triton")


S = torch.randn(2, 6)
BAD = {
    "n_iters0": (dict(n_iters=0), ValueError, "n_iters"),
    "n_iters-float": (dict(n_iters=2.0), TypeError, "n_iters"),
    "k0": (dict(k=0), ValueError, "k"),
    "k-negative": (dict(k=-1.5), ValueError, "k"),
    "k-tensor-nonpositive": (dict(k=torch.tensor([1.0, 0.0])), ValueError, "k"),
    "k-tensor-shape": (dict(k=torch.ones(3)), ValueError, "k"),
    "k-string": (dict(k="2"), TypeError, "k"),
    "eps0": (dict(eps=0.0), ValueError, "eps"),
    "eps_init-negative": (dict(eps_init=-1.0), ValueError, "eps_init"),
    "eps_decay0": (dict(eps_decay=0.0), ValueError, "eps_decay"),
    "eps_decay-above-1": (dict(eps_decay=1.5), ValueError, "eps_decay"),
    "mask-shape": (dict(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "mask"),
    "mask-dtype": (dict(mask=torch.ones(2, 6)), TypeError, "mask"),
    "mask-device": (dict(mask=torch.ones(2, 6, dtype=torch.bool, device="meta")), ValueError, "mask must be on"),
    "s-int": (dict(s=torch.ones(2, 6, dtype=torch.long)), TypeError, "s"),
    "s-not-tensor": (dict(s=[[1.0, 2.0]]), TypeError, "s"),
}


@pytest.mark.parametrize("fn", [coor_descent, triton_coor_descent], ids=["coor_descent", "triton_coor_descent"])
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments(fn, case):
    kwargs, error, name = BAD[case]
    kwargs = {"s": S, "n_iters": 3, "k": 2.0, **kwargs}
    s = kwargs.pop("s")
    with pytest.raises(error, match=name):
        fn(s, **kwargs)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        coor_descent(S, n_iters=2, k=1, backend="cuda")
