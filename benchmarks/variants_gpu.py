"""Every routed layer on CUDA: fp32, bf16 autocast and torch.compile(fullgraph=True), forward+backward.

    python benchmarks/variants_gpu.py

Prints one line per layer and mode: finite output and gradients, and the wall time of the step
(the compiled step includes its compile time).
"""

import time

import torch

from colt5 import (
    ConditionalRoutedCrossAttention,
    ConditionalRoutedImageAttention,
    ConditionalRoutedTransformerBlock,
)
from colt5.autoregressive import ConditionalRoutedAutoregressiveTransformerBlock
from colt5.vit import ConditionalRoutedViT

D = 256


def cases():
    yield "encoder block", ConditionalRoutedTransformerBlock(
        D, num_heavy_attn_tokens_q=128, num_heavy_attn_tokens_kv=128, num_heavy_ff_tokens=128,
        light_window_size=128), lambda: (torch.randn(2, 2048, D),)
    yield "autoregressive block", ConditionalRoutedAutoregressiveTransformerBlock(
        D, num_heavy_attn_tokens_q=8, num_heavy_attn_tokens_kv=16, num_heavy_ff_tokens=8,
        light_window_size=128, heavy_window_size=128), lambda: (torch.randn(2, 2048, D),)
    yield "cross attention", ConditionalRoutedCrossAttention(
        D, num_tokens_q=64, num_tokens_kv=1024, kv_routing_tokens=2, route_block_size=8192
    ), lambda: (torch.randn(2, 256, D), torch.randn(2, 65536, D))
    yield "image attention (channel first)", ConditionalRoutedImageAttention(
        D, num_heavy_tokens_q=64, num_heavy_tokens_kv=64, light_window_size=8, channel_first=True
    ), lambda: (torch.randn(2, D, 32, 32),)
    yield "vit", ConditionalRoutedViT(
        image_size=64, patch_size=4, num_classes=10, dim=D, depth=2, attn_num_heavy_tokens_q=64,
        attn_num_heavy_tokens_kv=64, attn_heavy_dim_head=64, attn_heavy_heads=4, attn_light_dim_head=64,
        attn_light_heads=4, attn_light_window_size=4, ff_num_heavy_tokens=64, ff_heavy_mult=4,
        ff_light_mult=0.5), lambda: (torch.randn(2, 3, 64, 64),)


def step(fn, module, inputs, bf16):
    for p in module.parameters():
        p.grad = None
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = fn(*inputs)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    ok = bool(torch.isfinite(out).all()) and all(
        p.grad is None or bool(torch.isfinite(p.grad).all()) for p in module.parameters()
    )
    got_grad = sum(p.grad is not None for p in module.parameters())
    return ok, got_grad, time.perf_counter() - t0


def main():
    import triton

    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    for name, module, make in cases():
        module = module.cuda()
        inputs = tuple(x.cuda() for x in make())
        n_params = sum(1 for _ in module.parameters())
        for mode in ("fp32", "bf16", "compiled bf16"):
            try:
                fn = torch.compile(module, fullgraph=True) if mode.startswith("compiled") else module
                ok, got, secs = step(fn, module, inputs, bf16=mode != "fp32")
                print(f"{name:32} {mode:14} finite={ok} grads={got}/{n_params} {secs:7.2f} s", flush=True)
            except Exception as err:  # report and go on
                print(f"{name:32} {mode:14} FAILED {type(err).__name__}: {str(err).splitlines()[0][:150]}", flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
