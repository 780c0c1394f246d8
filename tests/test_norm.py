"""The fused LayerNorm + routing scores (`colt5.kernels.norm`): the Triton op (interpreter on
CPU) against the float64 reference, outputs and every gradient."""

import pytest
import torch

from colt5.kernels.norm import norm_score
from conftest import assert_close, requires_cuda

CASES = {
    # b, n, d, routes, output dtype, which gradients reach the op
    "b1-n5-d8-r1": (1, 5, 8, 1, torch.float32, "both"),
    "b2-n37-d48-r3": (2, 37, 48, 3, torch.float32, "both"),
    "b3-n20-d33-r2-bf16": (3, 20, 33, 2, torch.bfloat16, "both"),
    "b2-n17-d16-r2-only-xn": (2, 17, 16, 2, torch.float32, "xn"),
    "b2-n17-d16-r2-only-scores": (2, 17, 16, 2, torch.float32, "scores"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_float64_reference(case):
    b, n, d, R, dtype, which = CASES[case]
    x64 = torch.randn(b, n, d, dtype=torch.float64) * 3 + 1
    w64, bias64, u64 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64), torch.randn(R, d, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (x64, w64, bias64, u64)]
    leaves = [t.detach().float().requires_grad_() for t in (x64, w64, bias64, u64)]
    xn, s = norm_score(*leaves, out_dtype=dtype, backend="triton")
    xn64, s64 = norm_score(*leaves64, out_dtype=torch.float64, backend="reference")
    assert xn.dtype == dtype and s.dtype == torch.float32 and s.shape == (b, R, n)
    assert_close(xn, xn64, 1e-6 if dtype == torch.float32 else 1e-2, "xn")
    assert_close(s, s64, 1e-5, "scores")
    gx, gs = torch.randn(b, n, d, dtype=torch.float64), torch.randn(b, R, n, dtype=torch.float64)
    loss = lambda a, c, p: (a.to(p) * gx.to(p)).sum() * (which != "scores") + (c.to(p) * gs.to(p)).sum() * (which != "xn")  # noqa: E731
    grads = torch.autograd.grad(loss(xn, s, torch.float32), leaves)
    grads64 = torch.autograd.grad(loss(xn64, s64, torch.float64), leaves64)
    for name, got, want in zip(("x", "weight", "bias", "tokens"), grads, grads64):
        assert got.dtype == torch.float32
        assert_close(got, want, 1e-4 if dtype == torch.float32 else 2e-2, name)


def test_library_op_passes_opcheck():
    args = (torch.randn(2, 6, 8, requires_grad=True), torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True),
            torch.randn(2, 8, requires_grad=True), 1e-5, torch.float32)
    torch.library.opcheck(torch.ops.colt5.norm_score.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
@requires_cuda
def test_gpu_matches_reference():
    x = torch.randn(2, 8192, 512, device="cuda", requires_grad=True)
    w, bias = torch.randn(512, device="cuda", requires_grad=True), torch.randn(512, device="cuda", requires_grad=True)
    u = torch.randn(3, 512, device="cuda", requires_grad=True)
    xn, s = norm_score(x, w, bias, u, out_dtype=torch.bfloat16)
    xr, sr = norm_score(x, w, bias, u, out_dtype=torch.bfloat16, backend="reference")
    assert_close(xn, xr, 1e-2, "xn")
    assert_close(s, sr, 1e-5, "scores")
    gx, gs = torch.randn_like(xn), torch.randn_like(s)
    for a, c in zip(torch.autograd.grad((xn * gx).sum() + (s * gs).sum(), (x, w, bias, u)),
                    torch.autograd.grad((xr * gx).sum() + (sr * gs).sum(), (x, w, bias, u))):
        assert_close(a, c, 1e-2, "grad")
