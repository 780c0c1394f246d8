"""The rotary kernel (`colt5.kernels.rotary`, Triton's interpreter on CPU) against rotate-half
applied head by head in float64, forward and gradient, in the layouts the layers use."""

import pytest
import torch

from colt5.kernels.rotary import rotary_reference, rotate
from colt5.rotary import RotaryEmbedding, apply_rotary
from conftest import assert_close, requires_cuda

CASES = {
    # lead (rows), s slices, d, rotated, r (rotated features), positions: None | "rows" | "last"
    "packed-qkv": ((2, 9), 6, 16, 4, 16, None),
    "gathered-q": ((3, 5), 2, 8, 2, 8, "rows"),
    "kv-routes": ((2, 2, 7), 4, 16, 2, 16, "rows"),
    "partial-odd-d": ((2, 6), 3, 24, 3, 16, "last"),
    "one-row-float-pos": ((1, 1), 3, 8, 2, 8, "float"),
    "one-position-broadcast": ((3, 2, 1), 2, 8, 1, 8, "one"),  # a decode step's [1] over [b, r, 1]
}


def _positions(kind, lead):
    if kind is None:
        return None
    if kind == "last":  # [n], broadcast over the batch
        return torch.randperm(50)[: lead[-1]]
    if kind == "one":
        return torch.tensor([4321]).expand(lead)  # stride 0 over the rows
    if kind == "float":
        return torch.rand(lead) * 100
    return torch.randint(0, 20000, lead)  # large angles: fp32 range reduction


def _per_head64(x, inv_freq, positions, rotated):
    """apply_rotary in float64, one slice at a time: the definition the kernel must meet."""
    n = x.shape[-3]
    pos = torch.arange(n) if positions is None else positions
    angles = (pos.to(torch.float32).unsqueeze(-1) * inv_freq).double()
    out = x.double().clone()
    for s in range(rotated):
        out[..., s, :] = apply_rotary(x[..., s, :].double(), angles.expand(*x.shape[:-2], -1))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_float64_per_head(case, dtype):
    lead, s, d, rotated, r, kind = CASES[case]
    torch.manual_seed(0)
    inv_freq = RotaryEmbedding(r).inv_freq
    x = torch.randn(*lead, s, d).to(dtype).requires_grad_()
    positions = _positions(kind, lead)
    out = rotate(x, inv_freq, positions, rotated=rotated, backend="triton")
    want = _per_head64(x.detach(), inv_freq, positions, rotated)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(out, want, rtol, "out")
    assert torch.equal(out[..., rotated:, :], x[..., rotated:, :]), "slices past `rotated` are copied"
    assert torch.equal(out[..., :rotated, r:], x[..., :rotated, r:]), "features past r are copied"
    g = torch.randn(x.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, g.to(dtype))
    x64 = x.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(_per_head64(x64, inv_freq, positions, rotated), x64, g)
    assert grad.dtype == dtype
    assert_close(grad, grad64, rtol, "grad")


def test_kernel_reads_strided_inputs():
    """Views the kernel reads in place (heads of a transposed [1, h, n, d], n * d apart; heads
    padded to 16 features; rows padded to five heads) and one it gets a copy of (a last dim
    that is not contiguous): the same as on a contiguous copy."""
    torch.manual_seed(1)
    inv_freq = RotaryEmbedding(8).inv_freq
    positions = torch.randint(0, 5000, (1, 7))
    views = {
        "transposed heads": torch.randn(1, 3, 7, 8).transpose(1, 2),
        "padded heads": torch.randn(1, 7, 3, 16)[..., :8],
        "padded rows": torch.randn(1, 7, 5, 8)[:, :, 1:4],
        "strided features": torch.randn(1, 7, 3, 16)[..., ::2],
    }
    for name, x in views.items():
        x = x.requires_grad_()
        out = rotate(x, inv_freq, positions, rotated=2, backend="triton")
        want = rotary_reference(x.detach().contiguous().double(), inv_freq, positions, rotated=2)
        assert_close(out, want, 1e-5, name)
        g = torch.randn(x.shape)
        (grad,) = torch.autograd.grad(out, x, g)
        x64 = x.detach().double().requires_grad_()
        (grad64,) = torch.autograd.grad(rotary_reference(x64, inv_freq, positions, rotated=2), x64, g.double())
        assert_close(grad, grad64, 1e-5, f"{name} grad")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_is_the_kernels_definition(case):
    lead, s, d, rotated, r, kind = CASES[case]
    inv_freq = RotaryEmbedding(r).inv_freq
    x = torch.randn(*lead, s, d, dtype=torch.float64)
    positions = _positions(kind, lead)
    assert_close(rotary_reference(x, inv_freq, positions, rotated=rotated), _per_head64(x, inv_freq, positions, rotated),
                 1e-12, "reference")


def test_module_rotate_and_zero_rotated_and_errors():
    rot = RotaryEmbedding(8)
    x = torch.randn(2, 5, 3, 8)
    assert torch.equal(rot.rotate(x, rotated=0), x)
    assert_close(rot.rotate(x), rotary_reference(x, rot.inv_freq), 1e-6, "module")
    with pytest.raises(ValueError, match="rotated"):
        rotate(x, rot.inv_freq, rotated=4)
    with pytest.raises(ValueError, match="positions"):
        rotate(x, rot.inv_freq, torch.arange(4))
    with pytest.raises(ValueError, match="inv_freq"):
        rotate(x, torch.ones(5))
    with pytest.raises(TypeError, match="positions"):
        rotate(x, rot.inv_freq, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        rotate(torch.randn(5, 8), rot.inv_freq)
    with pytest.raises(TypeError, match="floating"):
        rotate(torch.ones(2, 5, 3, 8, dtype=torch.long), rot.inv_freq)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        rotate(x.double(), rot.inv_freq, backend="triton")


def test_op_registration():
    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    inv_freq = RotaryEmbedding(8).inv_freq
    torch.library.opcheck(torch.ops.colt5.rotary.default, (x.view(10, 3, 8), inv_freq, None, 5, 2, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
@requires_cuda
def test_gpu_matches_float64_eager_compiled_and_captured():
    """The language model's light layout at 16k (rows of q, k, v heads) in bf16: eager, under
    torch.compile (the op kept whole) and replayed from a CUDA graph, forward and gradient."""
    rot = RotaryEmbedding(64).cuda()
    x32 = torch.randn(2, 16384, 6, 64, device="cuda", requires_grad=True)
    want32 = _per_head64(x32.detach().cpu(), rot.inv_freq.cpu(), None, 4)
    assert_close(rot.rotate(x32, rotated=4), want32, 1e-5, "fp32 at positions up to 16k")
    x = torch.randn(2, 16384, 6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    want = _per_head64(x.detach().cpu(), rot.inv_freq.cpu(), None, 4)
    x64 = x.detach().cpu().double().requires_grad_()
    (grad64,) = torch.autograd.grad(_per_head64(x64, rot.inv_freq.cpu(), None, 4), x64, g.cpu().double())
    step = lambda t: rot.rotate(t, rotated=4)  # noqa: E731
    for mode, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True))):
        out = fn(x)
        (grad,) = torch.autograd.grad(out, x, g)
        assert_close(out, want, 1e-2, mode)
        assert_close(grad, grad64, 1e-2, f"{mode} grad")
    graph, static = torch.cuda.CUDAGraph(), x.detach().clone()
    step(static)  # warm the kernel before capture
    with torch.cuda.graph(graph):
        captured = step(static)
    static.copy_(x.detach() * 2)
    graph.replay()
    assert torch.equal(captured, step(x.detach() * 2))
