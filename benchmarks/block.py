"""Routed blocks and the language model against their dense baselines, on one GPU.

    python benchmarks/block.py                    # both tables
    python benchmarks/block.py --no-lm            # the block table only
    python benchmarks/block.py --sizes 8192 --modes eager compiled graphs --no-lm
    python benchmarks/block.py --profile 8192     # top kernels of one step of each block, eager

Block table: batch 1, dim 512, bf16 autocast, forward+backward of the output's sum, median ms
(`triton.testing.do_bench`), CUDA kernels per forward+backward and GPU-busy ms (the sum of their
times) from torch.profiler, peak memory of a step above the input. Encoder block: 8 light + 8
heavy heads of 64, light window 128, n/16 heavy tokens (ff, q, kv). Autoregressive block: the
language model's layer with light window 128, light ff mult 1/2 (2 light + 6 heavy heads of 64,
W/16 queries, W/8 key-values, W/16 ff tokens per window). Dense: a pre-norm block with SDPA
(flash) and ff mult 4, causal beside the autoregressive block. Modes: *eager*; *compiled* = torch.compile default mode;
*graphs* = torch.compile(mode="reduce-overhead") with cudagraph_mark_step_begin() each step.

LM table: CoLT5LanguageModel (the training example's sizes, dim 512, depth 6, but light window
128, light ff 1/2) and its dense baseline, 65,536 tokens per step at several sequence lengths, AdamW, bf16 autocast; tokens/s over
timed steps after warm-up. Compiled = every block compiled on its own (regional compilation:
the blocks share one compiled graph).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

DIM = 512


def encoder_block(n: int) -> torch.nn.Module:
    from colt5.block import ConditionalRoutedTransformerBlock

    return ConditionalRoutedTransformerBlock(
        DIM, num_heavy_attn_tokens_q=n // 16, num_heavy_attn_tokens_kv=n // 16, num_heavy_ff_tokens=n // 16,
        light_dim_head=64, light_heads=8, light_window_size=128, heavy_dim_head=64, heavy_heads=8,
        light_ff_mult=0.5, heavy_ff_mult=4,
    )


def autoregressive_block(n: int) -> torch.nn.Module:
    from colt5.autoregressive import ConditionalRoutedAutoregressiveTransformerBlock

    return ConditionalRoutedAutoregressiveTransformerBlock(
        DIM, light_dim_head=64, light_heads=2, heavy_dim_head=64, heavy_heads=6, light_window_size=128,
        heavy_window_size=128, light_ff_mult=0.5, heavy_ff_mult=4,
    )


def dense_block(causal: bool) -> torch.nn.Module:
    from colt5.dense import DenseTransformerBlock

    return DenseTransformerBlock(DIM, heads=8, dim_head=64, ff_mult=4, causal=causal)


BLOCKS = {
    "encoder": (encoder_block, lambda n: dense_block(False)),
    "autoregressive": (autoregressive_block, lambda n: dense_block(True)),
}


def make_step(block: torch.nn.Module, n: int, mode: str):
    """One forward+backward of block on a fixed random [1, n, DIM] input, in the given mode."""
    fn = {"eager": block, "compiled": torch.compile(block), "graphs": torch.compile(block, mode="reduce-overhead")}[mode]
    x = torch.randn(1, n, DIM, device="cuda")
    params = list(block.parameters())

    def step():
        # a fresh step, as with zero_grad(set_to_none=True): accumulating into .grad would read
        # a CUDA-graph output the next replay overwrites
        torch.compiler.cudagraph_mark_step_begin()
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x)
        out.float().sum().backward()

    return step, params


def kernel_stats(step, steps: int = 5) -> tuple[float, float, list]:
    """(kernels per step, GPU-busy ms per step, [(name, ms per step, launches per step)])."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    count, busy, per_kernel = 0.0, 0.0, defaultdict(lambda: [0.0, 0.0])
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", 0) or 0
        if evt.device_type != torch.autograd.DeviceType.CUDA or not us:
            continue
        count += evt.count / steps
        busy += us / steps / 1e3
        per_kernel[evt.key][0] += us / steps / 1e3
        per_kernel[evt.key][1] += evt.count / steps
    top = sorted(((k, v[0], v[1]) for k, v in per_kernel.items()), key=lambda t: -t[1])
    return count, busy, top


def measure(make, n: int, mode: str, counts: bool) -> dict | None:
    from triton.testing import do_bench

    try:
        torch.manual_seed(0)
        block = make(n).cuda()
        step, params = make_step(block, n, mode)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):  # compile, capture, warm up
            step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = do_bench(step, warmup=50, rep=250, grad_to_none=params, return_mode="median")
        row = {"ms": ms, "peak": peak}
        if counts:
            row["kernels"], row["busy"], row["top"] = kernel_stats(step)
        return row
    except Exception as err:  # one failing cell must not kill the table
        print(f"  ! n={n} mode={mode} {type(err).__name__}: {' | '.join(str(err).splitlines()[:6])[:800]}", file=sys.stderr)
        return None
    finally:
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def block_table(sizes: list[int], modes: list[str]) -> None:
    print("\nblocks, forward+backward: median ms | CUDA kernels | GPU-busy ms | wall / busy | peak GiB; "
          "kernels and busy from torch.profiler (eager and compiled)")
    head = "| block | n | mode | ours ms | dense ms | ours / dense | ours kernels | dense kernels | ours busy | dense busy | ours wall/busy | ours GiB | dense GiB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, (ours_fn, dense_fn) in BLOCKS.items():
        for n in sizes:
            for mode in modes:
                counts = mode != "graphs"
                ours = measure(ours_fn, n, mode, counts)
                dense = measure(dense_fn, n, mode, counts)
                g = lambda r, key: None if r is None else r.get(key)  # noqa: E731
                ratio = ours["ms"] / dense["ms"] if ours and dense else None
                wall_busy = ours["ms"] / ours["busy"] if ours and ours.get("busy") else None
                print(f"| {name} | {n:,} | {mode} | {fmt(g(ours, 'ms'))} | {fmt(g(dense, 'ms'))} | {fmt(ratio)} | "
                      f"{fmt(g(ours, 'kernels'), '.0f')} | {fmt(g(dense, 'kernels'), '.0f')} | {fmt(g(ours, 'busy'))} | "
                      f"{fmt(g(dense, 'busy'))} | {fmt(wall_busy)} | {fmt(g(ours, 'peak'))} | {fmt(g(dense, 'peak'))} |", flush=True)


def profile_blocks(n: int, top: int) -> None:
    for name, (ours_fn, _) in BLOCKS.items():
        row = measure(ours_fn, n, "eager", counts=True)
        if row is None:
            continue
        print(f"\n{name} block, n={n}, eager: {row['ms']:.2f} ms, {row['kernels']:.0f} kernels, busy {row['busy']:.3f} ms")
        for kname, ms, launches in row["top"][:top]:
            print(f"  {ms:7.3f} ms {launches:5.0f}x  {kname[:100]}")


def lm_model(seq: int, dense: bool) -> torch.nn.Module:
    from colt5.lm import CoLT5LanguageModel

    if dense:
        return CoLT5LanguageModel(dim=DIM, depth=6, max_seq_len=seq, dense=True, heads=8, dim_head=64, ff_mult=4)
    return CoLT5LanguageModel(dim=DIM, depth=6, max_seq_len=seq, light_heads=2, light_dim_head=64, heavy_heads=6,
                              heavy_dim_head=64, light_window_size=128, heavy_window_size=128, light_ff_mult=0.5,
                              heavy_ff_mult=4)


def compile_blocks(model: torch.nn.Module) -> None:
    """Regional compilation: each block compiled on its own (they share one compiled graph).
    The dense stack calls its blocks' attention and feedforward directly: those are compiled."""
    if hasattr(model.backbone, "layers"):
        for block in model.backbone.layers:
            block.compile()
        return
    for block in model.backbone[0].layers:
        block.attn.compile()
        block.ff.compile()


def lm_tokens_per_s(seq: int, dense: bool, mode: str, tokens_per_step: int, steps: int) -> tuple[float, float] | None:
    """(tokens/s, warm-up s) of training steps."""
    try:
        torch.manual_seed(0)
        model = lm_model(seq, dense).cuda()
        if mode == "compiled":
            compile_blocks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        batch = max(1, tokens_per_step // seq)
        data = torch.randint(0, 256, (batch, seq + 1), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(data)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return batch * seq * steps / (time.perf_counter() - t0), warm
    except Exception as err:
        print(f"  ! lm seq={seq} dense={dense} mode={mode} {type(err).__name__}: {' | '.join(str(err).splitlines()[:6])[:800]}", file=sys.stderr)
        return None
    finally:
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def lm_table(seqs: list[int], modes: list[str], tokens_per_step: int, steps: int) -> None:
    print(f"\nlanguage model training, dim {DIM}, depth 6, {tokens_per_step:,} tokens per step, AdamW, bf16: tokens/s")
    print("| seq | mode | CoLT5 tokens/s | dense tokens/s | CoLT5 / dense | CoLT5 warm-up s | dense warm-up s |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:  # every eager row first: compiling is what takes the time
        for seq in seqs:
            ours = lm_tokens_per_s(seq, False, mode, tokens_per_step, steps)
            dense = lm_tokens_per_s(seq, True, mode, tokens_per_step, steps)
            ratio = ours[0] / dense[0] if ours and dense else None
            print(f"| {seq:,} | {mode} | {fmt(ours and ours[0], ',.0f')} | {fmt(dense and dense[0], ',.0f')} | {fmt(ratio)} | "
                  f"{fmt(ours and ours[1], '.0f')} | {fmt(dense and dense[1], '.0f')} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled", "graphs"], default=["eager", "compiled", "graphs"])
    parser.add_argument("--no-lm", action="store_true", help="skip the language-model table")
    parser.add_argument("--no-blocks", action="store_true", help="skip the block table")
    parser.add_argument("--lm-seqs", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--lm-modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--lm-tokens", type=int, default=65536, help="tokens per training step")
    parser.add_argument("--lm-steps", type=int, default=20, help="timed steps per cell (fewer read noisy: the host-bound step varies)")
    parser.add_argument("--profile", type=int, default=None, help="list the top kernels of each routed block at this n")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    import triton

    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{time.strftime('%Y-%m-%d')}")
    if args.profile:
        profile_blocks(args.profile, args.top)
        return
    if not args.no_blocks:
        block_table(args.sizes, args.modes)
    if not args.no_lm:
        lm_table(args.lm_seqs, args.lm_modes, args.lm_tokens, args.lm_steps)


if __name__ == "__main__":
    main()
