"""Whole layers on a GPU (every fused op: norm and scores, selection, attention, scatter back)
against the same layers on the CPU in float64 (every reference), output and every gradient."""

import copy

import pytest
import torch

from conftest import assert_close, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


def _encoder():
    from colt5 import ConditionalRoutedTransformerBlock

    return ConditionalRoutedTransformerBlock(64, num_heavy_attn_tokens_q=64, num_heavy_attn_tokens_kv=96, num_routed_kv=2,
                                             num_heavy_ff_tokens=64, light_dim_head=32, light_heads=2, light_window_size=64,
                                             heavy_dim_head=32, heavy_heads=4), (2, 1000)


def _autoregressive():
    from colt5 import ConditionalRoutedAutoregressiveTransformerBlock

    return ConditionalRoutedAutoregressiveTransformerBlock(64, light_dim_head=32, light_heads=2, heavy_dim_head=32,
                                                           heavy_heads=4, light_window_size=64, num_routed_kv=2), (2, 1000)


@pytest.mark.parametrize("make", [_encoder, _autoregressive], ids=["encoder", "autoregressive"])
def test_cuda_layer_matches_float64_cpu(make, seeded):
    block, (b, n) = make()
    with torch.no_grad():  # unsaturated soft weights: gradients reach the routers
        for name, p in block.named_parameters():
            if "routing_token" in name:
                p.mul_(0.05)
            if "null_q_token" in name:
                p.normal_()
    cpu = copy.deepcopy(block).double()
    gpu = block.cuda()
    x = torch.randn(b, n, 64, dtype=torch.float64)
    mask = None
    if make is _encoder:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[1, 700:] = False
    xg = x.float().cuda().requires_grad_()
    xc = x.clone().requires_grad_()
    out_g = gpu(xg, mask=mask.cuda()) if mask is not None else gpu(xg)
    out_c = cpu(xc, mask=mask) if mask is not None else cpu(xc)
    assert_close(out_g, out_c, 1e-4, "output")
    g = torch.randn(b, n, 64, dtype=torch.float64)
    grads_g = torch.autograd.grad(out_g, [xg, *gpu.parameters()], g.float().cuda())
    grads_c = torch.autograd.grad(out_c, [xc, *cpu.parameters()], g)
    names = ["x", *(name for name, _ in gpu.named_parameters())]
    for name, a, c in zip(names, grads_g, grads_c):
        assert_close(a, c, 1e-3, name)


@pytest.mark.parametrize("make", [_encoder, _autoregressive], ids=["encoder", "autoregressive"])
def test_bf16_compile_and_graphs_match_eager(make, seeded):
    block, (b, n) = make()
    block = block.cuda()
    x = torch.randn(b, n, 64, device="cuda")

    def step(fn):
        for p in block.parameters():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x)
        out.float().sum().backward()
        return out.detach().float(), [p.grad.clone() for p in block.parameters()]

    want = step(block)
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        fn = torch.compile(block, mode=mode)
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            got = step(fn)
        assert_close(got[0], want[0], 2e-2, f"{mode} output")
        for a, c in zip(got[1], want[1]):
            assert_close(a, c, 5e-2, f"{mode} grad")
