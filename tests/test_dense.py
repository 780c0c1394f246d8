"""DenseTransformerBlock / DenseTransformer against a float64 reference written from the definition."""

import math

import pytest
import torch
import torch.nn.functional as F

from colt5.dense import DenseTransformer, DenseTransformerBlock
from conftest import TOLERANCES, assert_close


def reference_block(block: DenseTransformerBlock, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Pre-norm attention + feedforward with an explicit softmax over an explicit allowed-matrix."""
    attn, ff = block.attn, block.ff
    b, n, d = x.shape
    h = attn.heads
    xn = F.layer_norm(x, (d,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
    q, k, v = (xn @ attn.to_qkv.weight.T).chunk(3, dim=-1)
    split = lambda t: t.reshape(b, n, h, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    if attn.rotary is not None:  # feature i turns with feature i + e/2 by position * 10000^(-2i/e)
        e = q.shape[-1]
        angle = torch.arange(n, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, e, 2, dtype=torch.float64) / e)
        cos, sin = angle.cos(), angle.sin()
        turn = lambda t: torch.cat((t[..., : e // 2] * cos - t[..., e // 2 :] * sin,  # noqa: E731
                                    t[..., e // 2 :] * cos + t[..., : e // 2] * sin), dim=-1)
        q, k = turn(q), turn(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
    if mask is not None:
        allowed = mask[:, None, None, :] | torch.eye(n, dtype=torch.bool)
    if attn.causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, -math.inf)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1) @ attn.to_out.weight.T
    x = x + out
    norm, lin1, _, lin2 = ff.net
    hidden = F.layer_norm(x, (d,), norm.weight, norm.bias, norm.eps) @ lin1.weight.T + lin1.bias
    return x + F.gelu(hidden) @ lin2.weight.T + lin2.bias


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "masked"])
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("rotary_emb", [False, True], ids=["learned", "rotary"])
def test_block_matches_reference(causal, masked, n, rotary_emb):
    torch.manual_seed(n)
    block = DenseTransformerBlock(24, heads=3, dim_head=8, ff_mult=2, causal=causal, rotary_emb=rotary_emb).double()
    x = torch.randn(2, n, 24, dtype=torch.float64)
    mask = torch.rand(2, n) > 0.4 if masked else None
    tol = 1e-6 if rotary_emb else TOLERANCES[torch.float64][0]  # rotary angles are float32 (positions * inv_freq)
    assert_close(block(x, mask), reference_block(block, x, mask), tol, "block output")


def test_stack_matches_blocks_and_gradients_flow():
    torch.manual_seed(0)
    model = DenseTransformer(16, depth=3, heads=2, dim_head=8, causal=True).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
    y = model(x)
    expected = x
    for layer in model.layers:
        expected = reference_block(layer, expected, None)
    assert_close(y, expected, 1e-10, "stack output")
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_stack_is_causal():
    torch.manual_seed(1)
    model = DenseTransformer(16, depth=2, heads=2, dim_head=8, causal=True).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    y = model(x)
    for j in (0, 5, 11):
        x2 = x.clone()
        x2[:, j:] = torch.randn_like(x2[:, j:])
        assert torch.allclose(model(x2)[:, :j], y[:, :j], atol=1e-12, rtol=0)


def test_bf16_autocast_runs():
    model = DenseTransformer(32, depth=1, heads=2, dim_head=16, causal=True)
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_bad_inputs():
    model = DenseTransformer(8, depth=1, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        model(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 8))
    with pytest.raises(TypeError, match="x must be floating"):
        model(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="mask must be a bool"):
        model(torch.randn(2, 3, 8), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must have shape"):
        model(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="depth"):
        DenseTransformer(8, depth=0)
    with pytest.raises(ValueError, match="heads"):
        DenseTransformerBlock(8, heads=0)
    with pytest.raises(ValueError, match="ff_mult"):
        DenseTransformerBlock(8, ff_mult=-1)
    with pytest.raises(ValueError, match="dim_head must be an even int"):
        DenseTransformerBlock(8, heads=2, dim_head=5, rotary_emb=True)
