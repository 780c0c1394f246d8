"""The routed block against a dense block of the same width, on one GPU.

    python benchmarks/block.py                 # table: eager and compiled, fwd+bwd and fwd
    python benchmarks/block.py --modes eager compiled graphs   # graphs: compile + CUDA graphs
    python benchmarks/block.py --modes captured  # compile, the whole step in one CUDA graph
    python benchmarks/block.py --profile 32768 # per-component CUDA time of the routed block

Configuration (issue 6): batch 1, dim 512, light and heavy attention 8 heads x 64, light window
128, light ff mult 0.5, heavy ff mult 4, heavy tokens (ff, q, kv) = n/16, bf16 autocast,
forward+backward of output.sum(), and forward alone under no_grad. Baseline: pre-norm dense
block, SDPA (flash), ff mult 4.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

import torch

DIM, HEADS, DIM_HEAD, WINDOW = 512, 8, 64, 128


def routed_block(n: int, causal: bool = False) -> torch.nn.Module:
    common = dict(
        light_dim_head=DIM_HEAD,
        light_heads=HEADS,
        light_window_size=WINDOW,
        heavy_dim_head=DIM_HEAD,
        heavy_heads=HEADS,
        light_ff_mult=0.5,
        heavy_ff_mult=4,
    )
    if causal:
        # Causal token counts are capacities per routing window: W/16 of each window is n/16 overall.
        from colt5.autoregressive import ConditionalRoutedAutoregressiveTransformerBlock as Block

        per_window = dict(heavy_window_size=WINDOW, num_heavy_attn_tokens_q=WINDOW // 16,
                          num_heavy_attn_tokens_kv=WINDOW // 16, num_heavy_ff_tokens=WINDOW // 16)
        return Block(DIM, **per_window, **common)
    from colt5.block import ConditionalRoutedTransformerBlock as Block

    return Block(
        DIM,
        num_heavy_attn_tokens_q=n // 16,
        num_heavy_attn_tokens_kv=n // 16,
        num_heavy_ff_tokens=n // 16,
        **common,
    )


def dense_block(causal: bool = False) -> torch.nn.Module:
    from colt5.dense import DenseTransformerBlock

    return DenseTransformerBlock(DIM, heads=HEADS, dim_head=DIM_HEAD, ff_mult=4, causal=causal)


def measure(block: torch.nn.Module, n: int, mode: str) -> dict[str, float]:
    """Median ms of fwd+bwd and of fwd (no_grad), and peak GiB of one fwd+bwd."""
    from triton.testing import do_bench

    if mode == "captured":
        return measure_captured(block, n)
    # graphs = inductor plus CUDA graphs: replays hide the per-kernel host cost that bounds the
    # small sizes (see RESULTS.md: the eager step at 32k is 14 ms for 4.8 ms of GPU time).
    fn = {"eager": block, "compiled": torch.compile(block), "graphs": torch.compile(block, mode="reduce-overhead")}[mode]
    x = torch.randn(1, n, DIM, device="cuda")

    params = list(block.parameters())

    def fwd_bwd():
        # A fresh step, as a training loop with zero_grad(set_to_none=True) has: accumulating into
        # .grad from the last step would read a CUDA-graph output that this replay overwrites.
        torch.compiler.cudagraph_mark_step_begin()
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x)
        out.float().sum().backward()

    def fwd():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            fn(x)

    # Peak over warm-up (compile, CUDA-graph capture) and one more step: a graph's private pool
    # is allocated during capture, so a peak taken only over a replay would miss it.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(3):  # compile and warm up outside the timed region
        fwd_bwd()
        fwd()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    t_fb = do_bench(fwd_bwd, warmup=50, rep=300, grad_to_none=params, return_mode="median")
    t_f = do_bench(fwd, warmup=50, rep=300, return_mode="median")
    return {"fwd_bwd": t_fb, "fwd": t_f, "peak": peak}


def measure_captured(block: torch.nn.Module, n: int) -> dict[str, float]:
    """`measure` for the inductor-compiled block with the whole step (forward and backward, or
    forward alone) captured in one CUDA graph by hand: the GPU's time, free of the host's
    per-step cost, which moves reduce-overhead's figures from one host to the next."""
    from timing import graph_us

    compiled = torch.compile(block)
    fwd_bwd = bf16_step(compiled, n)
    x = torch.randn(1, n, DIM, device="cuda")

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            compiled(x)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t_fb = graph_us(fwd_bwd, tuple(block.parameters())) / 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30  # warm-up and the graph's pool
    return {"fwd_bwd": t_fb, "fwd": graph_us(fwd) / 1e3, "peak": peak}


def safe_measure(make, n, mode):
    try:
        torch.manual_seed(0)
        block = make().cuda()
        return measure(block, n, mode)
    except Exception as err:  # one failing row must not kill the table
        msg = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        print(f"  ! n={n} mode={mode} {type(err).__name__}: {msg}", file=sys.stderr)
        return None
    finally:
        torch.cuda.empty_cache()
        torch._dynamo.reset()


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def table(sizes: list[int], causal: bool, modes: list[str], skip_dense: bool = False) -> None:
    kind = "autoregressive block vs causal dense" if causal else "encoder block vs dense"
    print(f"\n{kind}: median ms (fwd+bwd | fwd no_grad), peak GiB of fwd+bwd, ratio = ours/dense")
    head = f"{'n':>7} {'mode':>8} | {'ours f+b':>9} {'dense f+b':>9} {'ratio':>6} | {'ours f':>7} {'dense f':>7} | {'ours GiB':>8} {'dense GiB':>9}"
    print(head)
    print("-" * len(head))
    for n in sizes:
        for mode in modes:
            ours = safe_measure(lambda: routed_block(n, causal), n, mode)
            dense = None if skip_dense else safe_measure(lambda: dense_block(causal), n, mode)
            ratio = ours["fwd_bwd"] / dense["fwd_bwd"] if ours and dense else None
            g = lambda r, key: None if r is None else r[key]  # noqa: E731
            print(
                f"{n:>7} {mode:>8} | {fmt(g(ours, 'fwd_bwd')):>9} {fmt(g(dense, 'fwd_bwd')):>9} {fmt(ratio, '.3f'):>6} |"
                f" {fmt(g(ours, 'fwd')):>7} {fmt(g(dense, 'fwd')):>7} | {fmt(g(ours, 'peak')):>8} {fmt(g(dense, 'peak')):>9}",
                flush=True,
            )


# Kernel-name patterns -> component, checked in order (the first match wins).
COMPONENTS = [
    ("coordinate descent", r"coor_descent|_cd_"),
    ("light attention (flex/local)", r"flex|triton_tem_fused|local"),
    ("heavy attention (sdpa/flash)", r"flash|fmha|attention|efficient|cudnn"),
    ("gathers and scatters", r"index|gather|scatter|topk|sort|radix"),
    ("matmuls (projections, ffs, routing)", r"gemm|sm90|cutlass|matmul|mm_|nvjet|xmma"),
    ("norms", r"norm"),
]


def bf16_step(fn, n: int):
    """One forward+backward of fn on a fresh [1, n, DIM] input under bf16 autocast."""
    x = torch.randn(1, n, DIM, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x)
        out.float().sum().backward()

    return step


def profile(n: int, causal: bool, mode: str = "eager", top: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    block = routed_block(n, causal).cuda()
    step = bf16_step(torch.compile(block) if mode == "compiled" else block, n)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    per_component = defaultdict(float)
    per_kernel = defaultdict(float)
    launches = defaultdict(float)
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type != torch.autograd.DeviceType.CUDA or not cuda_us:
            continue
        name = evt.key
        component = next((c for c, pat in COMPONENTS if re.search(pat, name, re.I)), "elementwise/other")
        per_component[component] += cuda_us / 5
        per_kernel[name] += cuda_us / 5
        launches[name] += evt.count / 5
    total = sum(per_component.values())
    print(f"\nprofile of the {'autoregressive' if causal else 'encoder'} block, n={n}, {mode}, fwd+bwd: CUDA time per step"
          " (a fused inductor kernel counts for the first component whose pattern its name matches)")
    print(f"{'component':<38} {'ms':>7} {'share':>6}")
    for c, us in sorted(per_component.items(), key=lambda kv: -kv[1]):
        print(f"{c:<38} {us / 1e3:>7.3f} {us / total:>6.1%}")
    print(f"{'total GPU time':<38} {total / 1e3:>7.3f}")
    print(f"{'kernel launches per step':<38} {sum(launches.values()):>7.0f}")
    print(f"\ntop kernels ({top}): ms per step, launches per step, name")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1e3:7.3f} ms {launches[name]:4.0f}x  {name[:110]}")


def host_profile(n: int) -> None:
    """Host (CPU) cost of one fwd+bwd step, eager and compiled: us per step from perf_counter
    over steps queued without synchronising, then the top Python functions by own time."""
    import cProfile
    import pstats
    import time

    block = routed_block(n).cuda()
    for mode, fn in (("eager", block), ("compiled", torch.compile(block))):
        step = bf16_step(fn, n)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        host = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t0) / 20 * 1e3
        print(f"\nhost profile n={n} {mode}: {host:.2f} ms of CPU per step queued, {gpu:.2f} ms per step incl. drain")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--ar-sizes", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled", "graphs", "captured"], default=["eager", "compiled"])
    parser.add_argument("--skip-dense", action="store_true", help="time only the routed block")
    parser.add_argument("--profile", type=int, nargs="*", default=None, help="profile the block at these n instead")
    parser.add_argument("--profile-modes", nargs="+", choices=["eager", "compiled"], default=["eager"])
    parser.add_argument("--profile-top", type=int, default=25, help="kernels listed per profile")
    parser.add_argument("--host-profile", type=int, nargs="*", default=None, help="host cost of a step at these n")
    args = parser.parse_args()
    import triton

    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    if args.host_profile:
        for n in args.host_profile:
            host_profile(n)
    if args.profile:
        for n in args.profile:
            for mode in args.profile_modes:
                profile(n, causal=False, mode=mode, top=args.profile_top)
    if args.profile or args.host_profile:
        return
    modes = args.modes
    table(args.sizes, causal=False, modes=modes, skip_dense=args.skip_dense)
    if args.ar_sizes:
        table(args.ar_sizes, causal=True, modes=modes, skip_dense=args.skip_dense)


if __name__ == "__main__":
    main()
