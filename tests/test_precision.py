"""colt5.precision: the autocast cast after the norms, and fp32 routing scores that keep x in
its own dtype for the backward."""

import pytest
import torch

from colt5.precision import fp32_scores, to_autocast_dtype
from conftest import assert_close


def test_to_autocast_dtype_follows_autocast():
    x = torch.randn(2, 3)
    assert to_autocast_dtype(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert to_autocast_dtype(x).dtype == torch.bfloat16
        ints = torch.arange(3)
        assert to_autocast_dtype(ints) is ints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched_tokens", [False, True], ids=["tokens-rd", "tokens-brd"])
def test_fp32_scores_match_float64(dtype, batched_tokens):
    gen = torch.Generator().manual_seed(0)
    b, n, d, r = 2, 9, 16, 3
    x = torch.randn(b, n, d, generator=gen).to(dtype).requires_grad_()
    rt = torch.randn(*((b,) if batched_tokens else ()), r, d, generator=gen).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # must not lower the scores' precision
        s = fp32_scores(x, rt)
    assert s.dtype == torch.float32 and s.shape == (b, r, n)
    x64, rt64 = x.detach().double().requires_grad_(), rt.detach().double().requires_grad_()
    spec = "b n d, b r d -> b r n" if batched_tokens else "b n d, r d -> b r n"
    want = torch.einsum(spec, x64, rt64)
    assert_close(s, want, 1e-6, "scores")
    g = torch.randn(b, r, n, generator=gen)
    gx, grt = torch.autograd.grad(s, (x, rt), g)
    wx, wrt = torch.autograd.grad(want, (x64, rt64), g.double())
    assert gx.dtype == dtype and grt.dtype == torch.float32
    assert_close(gx, wx, 1e-6 if dtype == torch.float32 else 1e-2, "grad x")
    assert_close(grt, wrt, 1e-6, "grad routing tokens")


def test_fp32_scores_save_x_in_its_own_dtype():
    x = torch.randn(1, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    rt = torch.randn(2, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp32_scores(x, rt)
    big = [t for t in saved if t.numel() == x.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big), [t.dtype for t in big]


def test_fp32_scores_compiled_matches_eager():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 8, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    rt = torch.randn(3, 8, generator=gen, requires_grad=True)
    eager = fp32_scores(x, rt)
    compiled = torch.compile(fp32_scores, fullgraph=True, backend="aot_eager")(x, rt)
    assert compiled.dtype == torch.float32
    assert_close(compiled, eager, 1e-6, "compiled scores")
    g = torch.randn_like(eager)
    for a, c in zip(torch.autograd.grad(compiled, (x, rt), g), torch.autograd.grad(eager, (x, rt), g)):
        assert_close(a.float(), c.float(), 1e-2, "compiled grads")


@pytest.mark.parametrize("bias", [True, False])
def test_eager_autocast_linear_matches_autocast(bias):
    """colt5.precision.Linear: the casts and matmul of nn.Linear under autocast, as one autograd
    node: bitwise autocast's output and gradients; without autocast it is nn.Linear."""
    from colt5.precision import Linear

    lin, ref = Linear(16, 24, bias=bias), torch.nn.Linear(16, 24, bias=bias)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(3, 5, 16, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yr = lin(x), ref(xr)
    assert y.dtype == yr.dtype == torch.bfloat16 and torch.equal(y, yr)
    assert type(y.grad_fn).__name__ == "_AutocastLinearBackward"
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert torch.equal(x.grad, xr.grad) and x.grad.dtype == torch.float32
    for p, q in zip(lin.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, q.grad)
    assert torch.equal(lin(x), ref(x))  # no autocast: nn.Linear itself


def test_eager_autocast_gelu_mlp_matches_autocast():
    from colt5.precision import gelu_mlp

    l1, l2 = torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)
    x = torch.randn(7, 16, dtype=torch.bfloat16, requires_grad=True)
    params = [l1.weight, l1.bias, l2.weight, l2.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gelu_mlp(x, *params)
        yr = l2(torch.nn.functional.gelu(l1(x)))
    assert torch.equal(y, yr)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], g)
    want = torch.autograd.grad(yr, [x, *params], g)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
