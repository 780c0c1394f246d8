"""Launch shapes of the flash-attention kernels at the language model's shapes: GPU us per call.

    python benchmarks/attention_tiles.py                 # seq 16384 and 4096, batch 8
    python benchmarks/attention_tiles.py --seqs 16384 --kernels dkdv --light-window 128

Shapes are the training example's (dim 512, depth 6, bf16): the light attention is causal local
attention on the packed qkv [b, n, 3, 2, 64], window --light-window (512), one window back; the
heavy one has 6 heads of 64 on n/16 routed queries and n/8 routed key-values (8 and
16 per window of 128, sorted positions within each window), a null key/value, value scales and
causal window slots. Each candidate (BLOCK_M x BLOCK_N, warps, stages) is timed for one kernel
while the other two keep the current choice; kernel time from torch.profiler over --iters
calls, and its output checked against the current choice's (max abs difference). The current choice is marked *.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections import defaultdict

import torch

A = importlib.import_module("colt5.kernels.flash_attention")
Tiles = A.Tiles

CANDIDATES = {
    "fwd": [Tiles(128, 64, 4, 3), Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 3), Tiles(128, 32, 4, 3),
            Tiles(64, 64, 4, 3), Tiles(64, 128, 4, 3), Tiles(128, 64, 4, 2), Tiles(64, 32, 2, 3)],
    "dq": [Tiles(64, 64, 4, 2), Tiles(128, 64, 8, 2), Tiles(128, 32, 4, 2), Tiles(64, 32, 4, 2),
           Tiles(128, 64, 4, 2), Tiles(64, 64, 4, 3), Tiles(128, 128, 8, 2), Tiles(32, 64, 2, 2)],
    "dkdv": [Tiles(64, 64, 4, 2), Tiles(64, 128, 8, 2), Tiles(32, 128, 4, 2), Tiles(32, 64, 4, 2),
             Tiles(64, 128, 4, 2), Tiles(128, 128, 8, 2), Tiles(64, 64, 4, 3), Tiles(32, 64, 2, 2)],
}
KERNEL_NAMES = {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}


def light_inputs(b: int, n: int, w: int) -> tuple:
    qkv = torch.randn(b, n, 3, 2, 64, device="cuda", dtype=torch.bfloat16)
    args = (qkv, None, None, None, None, None, None, 64**-0.5, w, w, 0, 1, 0, True, False)
    return args, qkv


def sorted_positions(b: int, windows: int, per_window: int, w: int = 128) -> torch.Tensor:
    picks = torch.rand(b, windows, w, device="cuda").topk(per_window, dim=-1).indices.sort(-1).values
    return (picks + torch.arange(windows, device="cuda").view(1, -1, 1) * w).view(b, -1)


def heavy_inputs(b: int, n: int) -> tuple:
    windows, cq, ckv = n // 128, 8, 16
    q = torch.randn(b, windows * cq, 6, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(b, 1, windows * ckv, 2, 6, 64, device="cuda", dtype=torch.bfloat16)
    null = torch.randn(2, 6, 64, device="cuda", dtype=torch.bfloat16) * 0.02
    scale = torch.rand(b, 1, windows * ckv, device="cuda")
    q_pos = sorted_positions(b, windows, cq)
    kv_pos = sorted_positions(b, windows, ckv).view(b, 1, -1)
    args = (q, kv, null, scale, None, q_pos, kv_pos, 64**-0.5, cq, ckv, 0, 0, 0, False, False)
    return args, q


def kernel_us(fn, name: str, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time
    hits = [v for k, v in total.items() if name in k]
    return sum(hits) / iters if hits else float("nan")


def run_kernel(kind: str, args: tuple, do: torch.Tensor):
    if kind == "fwd":
        return lambda: A.attention_fwd(*args)
    o, lse = A.attention_fwd(*args)
    return lambda: A.attention_bwd(do, *args[:7], o, lse, *args[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 4096])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kernels", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--light-window", type=int, default=512)
    args = p.parse_args()
    original = A._configs
    chosen = original(torch.bfloat16, 64)
    index = {"fwd": 0, "dq": 1, "dkdv": 2}
    light = functools.partial(light_inputs, w=args.light_window)
    print("| attention | n | kernel | BLOCK_M x BLOCK_N | warps | stages | us | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.seqs:
        for branch, make in (("light", light), ("heavy", heavy_inputs)):
            torch.manual_seed(0)
            inputs, q = make(args.batch, n)
            do = torch.randn(q.shape[0], q.shape[1], *q.shape[-2:], device="cuda", dtype=q.dtype)
            for kind in args.kernels:
                reference = None
                for tiles in CANDIDATES[kind]:
                    config = tuple(tiles if i == index[kind] else t for i, t in enumerate(chosen))
                    A._configs = lambda dtype, dh, config=config: config
                    try:
                        fn = run_kernel(kind, inputs, do)
                        out = fn()
                        # dk/dv: the heavy branch's dkv; the light one's share the packed dqkv
                        out = out[1] if kind == "dkdv" and out[1].numel() else out[0]
                        us = kernel_us(fn, KERNEL_NAMES[kind], args.iters)
                    except Exception as err:  # a shape that does not fit shared memory, say
                        print(f"| {branch} | {n:,} | {kind} | {tiles.block_m} x {tiles.block_n} | {tiles.warps} | "
                              f"{tiles.stages} | failed: {type(err).__name__} | |", flush=True)
                        continue
                    finally:
                        A._configs = original
                    if reference is None:
                        reference = out.float()
                    diff = (out.float() - reference).abs().max().item()
                    mark = "*" if tiles == chosen[index[kind]] else ""
                    print(f"| {branch} | {n:,} | {kind} | {tiles.block_m} x {tiles.block_n}{mark} | {tiles.warps} | "
                          f"{tiles.stages} | {us:.1f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
