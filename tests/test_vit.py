"""colt5.vit.ConditionalRoutedViT: shapes, gradients, autocast, bad configuration and input."""

import pytest
import torch
from conftest import assert_close

from colt5.vit import ConditionalRoutedViT

CONFIG = dict(
    image_size=(16, 24),
    patch_size=4,
    num_classes=7,
    dim=16,
    depth=2,
    attn_num_heavy_tokens_q=8,
    attn_num_heavy_tokens_kv=12,
    attn_heavy_dim_head=4,
    attn_heavy_heads=4,
    attn_light_dim_head=4,
    attn_light_heads=2,
    attn_light_window_size=2,
    ff_num_heavy_tokens=8,
    ff_heavy_mult=2,
    ff_light_mult=0.5,
)


def make(**overrides):
    torch.manual_seed(0)
    return ConditionalRoutedViT(**{**CONFIG, **overrides})


def test_forward_backward_shapes():
    vit = make(router_kwargs=dict(eps=1.0, cosine_sim_routing=True, cosine_sim_scale=1.0))
    img = torch.randn(3, 3, 16, 24)
    logits = vit(img)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert vit.layers[0][0].heavy_attn.q_router.routing_token.grad.abs().sum() > 0
    assert vit.layers[1][1].router.routing_token.grad.abs().sum() > 0


def test_images_are_independent_in_the_batch():
    vit = make(channels=1).double()
    img = torch.randn(3, 1, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        batched = vit(img)
        single = torch.cat([vit(img[i : i + 1]) for i in range(3)])
    assert_close(batched, single, 1e-12, "batch vs one by one")


def test_bf16_autocast():
    vit = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = vit(torch.randn(2, 3, 16, 24))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        make(image_size=18)
    with pytest.raises(ValueError, match="divisible by attn_light_window_size"):
        make(attn_light_window_size=3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        make(num_classes=0)
    with pytest.raises(ValueError, match="attn_num_heavy_tokens_q|num_heavy_tokens_q"):
        make(attn_num_heavy_tokens_q=0)
    vit = make()
    with pytest.raises(ValueError, match=r"img must have shape \[batch, 3, 16, 24\]"):
        vit(torch.randn(2, 3, 24, 16))
    with pytest.raises(ValueError, match="img must have shape"):
        vit(torch.randn(3, 16, 24))
    with pytest.raises(ValueError, match="img must have shape"):
        vit(torch.randn(2, 1, 16, 24))
