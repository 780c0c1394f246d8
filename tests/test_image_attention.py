"""ConditionalRoutedImageAttention: window light branch vs a per-window loop, layouts, errors."""

import math

import pytest
import torch
from conftest import assert_close

from colt5 import ConditionalRoutedAttention, ConditionalRoutedImageAttention
from colt5.image_attention import WindowAttention

D = 16


def make(channel_first=False, s=4, r=1, nq=10, nkv=12):
    torch.manual_seed(0)
    return ConditionalRoutedImageAttention(
        D,
        num_heavy_tokens_q=nq,
        num_heavy_tokens_kv=nkv,
        num_routed_kv=r,
        light_dim_head=8,
        light_heads=2,
        light_window_size=s,
        heavy_dim_head=4,
        heavy_heads=4,
        router_kwargs=dict(eps=0.5),
        channel_first=channel_first,
    ).double()


def window_reference(mod: WindowAttention, x):
    """Loop over windows; explicit softmax attention among the s*s tokens of each."""
    b, H, W, d = x.shape
    s, h, dh = mod.window_size, mod.heads, mod.dim_head
    out = torch.empty_like(x)
    for bi in range(b):
        for i0 in range(0, H, s):
            for j0 in range(0, W, s):
                win = mod.norm(x[bi, i0 : i0 + s, j0 : j0 + s].reshape(s * s, d))
                q, k, v = mod.to_qkv(win).chunk(3, -1)
                heads = []
                for hh in range(h):
                    cols = slice(hh * dh, (hh + 1) * dh)
                    a = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(dh), -1)
                    heads.append(a @ v[:, cols])
                out[bi, i0 : i0 + s, j0 : j0 + s] = mod.to_out(torch.cat(heads, -1)).reshape(s, s, d)
    return out.detach()


@pytest.mark.parametrize("H,W,s", [(8, 12, 4), (6, 6, 3), (4, 8, 1)])
def test_window_attention_matches_loop(H, W, s):
    torch.manual_seed(0)
    mod = WindowAttention(D, window_size=s, dim_head=8, heads=2).double()
    x = torch.randn(2, H, W, D, dtype=torch.float64)
    with torch.no_grad():
        assert_close(mod(x), window_reference(mod, x), 1e-10, "window attention")


def test_output_is_window_light_plus_routed_heavy():
    mod = make(r=2)
    x = torch.randn(2, 8, 12, D, dtype=torch.float64)
    with torch.no_grad():
        heavy = ConditionalRoutedAttention(
            D, num_heavy_tokens_q=10, num_heavy_tokens_kv=12, num_routed_kv=2, has_light_attn=False,
            heavy_dim_head=4, heavy_heads=4, router_kwargs=dict(eps=0.5),
        ).double()
        heavy.load_state_dict(mod.heavy_attn.state_dict())
        # Heavy attention sees the map in row-major order.
        expected = window_reference(mod.light_attn, x) + heavy(x.reshape(2, 96, D)).reshape(2, 8, 12, D)
        assert_close(mod(x), expected, 1e-10, "light + heavy")


def test_channel_first_equals_channel_last():
    last, first = make(), make(channel_first=True)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 8, 12, D, dtype=torch.float64)
    out_last = last(x)
    out_first = first(x.permute(0, 3, 1, 2).contiguous())
    assert out_first.shape == (2, D, 8, 12)
    assert_close(out_first.permute(0, 2, 3, 1), out_last, 1e-12, "channel_first")


def test_light_branch_is_local():
    """A change in one window moves the light branch's output inside that window only."""
    mod = make()
    x = torch.randn(1, 8, 8, D, dtype=torch.float64)
    y = x.clone()
    y[0, 1, 2] += 1.0  # window (0, 0)
    with torch.no_grad():
        a, b = mod.light_attn(x), mod.light_attn(y)
    changed = (a - b).abs().amax(-1)[0] > 0
    assert changed[:4, :4].any() and not changed[4:].any() and not changed[:, 4:].any()


def test_gradients_reach_routers():
    torch.manual_seed(0)
    mod = ConditionalRoutedImageAttention(
        D, num_heavy_tokens_q=6, num_heavy_tokens_kv=8, light_window_size=4, light_dim_head=8, light_heads=2,
        heavy_dim_head=4, heavy_heads=2, router_kwargs=dict(eps=1.0, cosine_sim_routing=True, cosine_sim_scale=1.0),
    )
    x = torch.randn(2, 8, 8, D)
    out = mod(x)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_and_overrides():
    mod = make(channel_first=True).float()
    x = torch.randn(2, D, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x, num_heavy_tokens_q=3, num_heavy_tokens_kv=200)  # kv: whole map (64 < 200)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out).all()
    out.float().sum().backward()


def test_bad_input():
    mod = make()
    with pytest.raises(ValueError, match="divisible by light_window_size 4"):
        mod(torch.randn(1, 8, 10, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by light_window_size 4"):
        mod(torch.randn(1, 6, 8, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank 3"):
        mod(torch.randn(8, 8, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="16 channels"):
        mod(torch.randn(1, 8, 8, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="16 channels"):
        make(channel_first=True)(torch.randn(1, 8, 8, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_heavy_tokens_q must be >= 1"):
        mod(torch.randn(1, 8, 8, D, dtype=torch.float64), num_heavy_tokens_q=0)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        make(s=0)
