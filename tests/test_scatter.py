"""The fused scatter back (`colt5.kernels.scatter`): the Triton op (interpreter on CPU) against
the PyTorch reference, output and every gradient, with padding picks holding NaN."""

import pytest
import torch

from colt5.kernels.scatter import scatter_back_reference, scatter_back_triton
from conftest import assert_close, requires_cuda

CASES = {
    # b, n, k, d, light, weights, real, null, routed dtype
    "b1-n9-k3-d8-plain": (1, 9, 3, 8, False, False, False, False, torch.float32),
    "b2-n20-k7-d24-all": (2, 20, 7, 24, True, True, True, True, torch.float32),
    "b3-n17-k17-d5-null-real": (3, 17, 17, 5, False, False, True, True, torch.float32),
    "b2-n33-k5-d40-weights-bf16": (2, 33, 5, 40, True, True, False, False, torch.bfloat16),
}


def _inputs(b, n, k, d, light, weights, real, null, dtype):
    base = torch.randn(b, n, d, dtype=torch.float64)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(b)])
    routed = torch.randn(b, k, d, dtype=torch.float64)
    ins = dict(
        light=torch.randn(b, n, d, dtype=torch.float64) if light else None,
        weights=torch.rand(b, k, dtype=torch.float64) if weights else None,
        real=(torch.rand(b, k) > 0.3) if real else None,
        null=torch.randn(d, dtype=torch.float64) if null else None,
    )
    return base, routed, idx, ins


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_float64_reference(case):
    b, n, k, d, *_, dtype = CASES[case]
    base, routed, idx, ins = _inputs(*CASES[case])
    if ins["real"] is not None:
        routed[~ins["real"]] = float("nan")  # padding rows: must reach nothing
    leaves64 = {"base": base, "routed": routed, **{k_: v for k_, v in ins.items() if v is not None and v.is_floating_point()}}
    leaves64 = {k_: v.clone().requires_grad_() for k_, v in leaves64.items()}
    cast = {"base": torch.float32, "routed": dtype, "light": dtype, "weights": torch.float32, "null": torch.float32}
    leaves = {k_: v.detach().to(cast[k_]).requires_grad_() for k_, v in leaves64.items()}

    def run(fn, t):
        return fn(t["base"], t["routed"], idx, light=t.get("light"), weights=t.get("weights"), real=ins["real"], null=t.get("null"))

    out = run(scatter_back_triton, leaves)
    want = run(scatter_back_reference, leaves64)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close(out, want, rtol, "out")
    g = torch.randn(b, n, d, dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), g.float())
    grads64 = torch.autograd.grad(want, list(leaves64.values()), g)
    for name, got, expected in zip(leaves, grads, grads64):
        if name == "routed" and ins["real"] is not None:
            assert (got[~ins["real"]] == 0).all()
            got, expected = got[ins["real"]], expected[ins["real"]]
        assert got.dtype == leaves[name].dtype and torch.isfinite(got).all(), name
        assert_close(got, expected, 1e-5 if dtype == torch.float32 else 2e-2, name)


def test_every_position_without_a_real_pick_gets_null():
    base = torch.zeros(1, 6, 2)
    routed = torch.ones(1, 2, 2)
    null = torch.tensor([5.0, -5.0])
    out = scatter_back_triton(base, routed, torch.tensor([[1, 4]]), real=torch.tensor([[True, False]]), null=null)
    expected = null.expand(1, 6, 2).clone()
    expected[0, 1] = 1.0
    assert torch.equal(out, expected)


def test_library_op_passes_opcheck():
    base = torch.randn(2, 10, 4, requires_grad=True)
    routed = torch.randn(2, 3, 4, requires_grad=True)
    idx = torch.stack([torch.randperm(10)[:3] for _ in range(2)])
    weights = torch.rand(2, 3, requires_grad=True)
    null = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.colt5.scatter_back.default,
                          (base, None, routed, idx, weights, torch.rand(2, 3) > 0.5, null),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
@requires_cuda
def test_gpu_matches_reference():
    b, n, k, d = 2, 8192, 512, 512
    base = torch.randn(b, n, d, device="cuda", requires_grad=True)
    light = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    routed = torch.randn(b, k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(n, device="cuda")[:k] for _ in range(b)])
    w = torch.rand(b, k, device="cuda", requires_grad=True)
    real = torch.rand(b, k, device="cuda") > 0.1
    null = torch.randn(d, device="cuda", requires_grad=True)
    leaves = [base, light, routed, w, null]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out = scatter_back_triton(base, routed, idx, light=light, weights=w, real=real, null=null)
    b64, l64, r64, w64, n64 = leaves64
    want = scatter_back_reference(b64, r64, idx, light=l64, weights=w64, real=real, null=n64)
    assert_close(out, want, 1e-6, "out")  # fp32 arithmetic on the bf16 inputs
    g = torch.randn_like(out)
    for t, a, c in zip(leaves, torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves64, g.double())):
        assert_close(a, c, 1e-5 if t.dtype == torch.float32 else 1e-2, "grad")
