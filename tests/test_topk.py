"""Differentiable top-k: hard indices equal torch.topk's, gradients reach x through soft top-k."""

import importlib

import pytest
import torch

from colt5 import topk
from conftest import assert_close

cd = importlib.import_module("colt5.kernels.soft_topk")


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_topk_indices_values_and_gradients(fused, masked, seeded):
    x = torch.randn(3, 50, requires_grad=True)
    mask = torch.rand(3, 50) > 0.3 if masked else None
    out = topk(x, 8, mask=mask, n_iters=10, eps=1.0, fused=fused)  # unsaturated soft scores
    ranked = x.detach() if mask is None else x.detach().masked_fill(~mask, torch.finfo(x.dtype).min)
    values, indices = ranked.topk(8, dim=-1)
    assert torch.equal(out.indices, indices)
    assert_close(out.values, values, 1e-7, "values")
    assert torch.equal(out.gates, torch.ones_like(out.gates))
    assert ((out.coor_descent_values > 0) & (out.coor_descent_values <= 1)).all()
    out.values.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the gradient reaches positions outside the top-k too, through the soft scores
    outside = torch.ones_like(x, dtype=torch.bool).scatter(-1, indices, False)
    if mask is not None:
        outside &= mask
    assert x.grad[outside].abs().sum() > 0


def test_topk_fused_matches_reference(seeded):
    x = torch.randn(2, 40, requires_grad=True)
    grads = []
    for fused in (False, True):
        x.grad = None
        out = topk(x, 5, n_iters=8, eps=0.5, fused=fused)
        (out.values * torch.arange(5.0)).sum().backward()
        grads.append(x.grad.clone())
    assert_close(grads[1], grads[0], 1e-4, "dx triton vs reference")


def test_topk_non_differentiable(seeded):
    x = torch.randn(4, 30)
    out = topk(x, 6, non_differentiable=True)
    values, indices = x.topk(6, dim=-1)
    assert torch.equal(out.indices, indices) and torch.equal(out.values, values)
    assert out.coor_descent_values is None and out.gates is None


X = torch.randn(2, 10)
BAD = {
    "k0": (dict(k=0), ValueError, "k"),
    "k-above-n": (dict(k=11), ValueError, "k"),
    "k-float": (dict(k=2.5), TypeError, "k"),
    "k-bool": (dict(k=True), TypeError, "k"),
    "ratio-below-1": (dict(coor_descent_k_ratio=0.5), ValueError, "coor_descent_k_ratio"),
    "mask-shape": (dict(mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, "mask"),
    "mask-dtype": (dict(mask=torch.ones(2, 10)), TypeError, "mask"),
    "x-int": (dict(x=torch.ones(2, 10, dtype=torch.long)), TypeError, "x"),
    "n_iters0": (dict(n_iters=0), ValueError, "n_iters"),
    "eps0": (dict(eps=0.0), ValueError, "eps"),
    "eps_decay-above-1": (dict(eps_decay=2.0), ValueError, "eps_decay"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_topk_bad_arguments(case):
    kwargs, error, name = BAD[case]
    kwargs = {"x": X, "k": 3, **kwargs}
    x = kwargs.pop("x")
    with pytest.raises(error, match=name):
        topk(x, **kwargs)
