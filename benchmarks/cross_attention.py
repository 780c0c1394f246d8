"""Routed cross attention over a million memories, on one GPU.

    python benchmarks/cross_attention.py                    # the table below
    python benchmarks/cross_attention.py --memories 262144  # a smaller context
    python benchmarks/cross_attention.py --device cpu --memories 4096 --queries 64 --reps 2  # smoke

Configuration: batch 1, 1,024 queries (dim 512) over 1,048,576 memories (dim 512, stored in bf16,
frozen: they take no gradient unless --context-grad), 8 heads x 64, bf16 autocast. Each row is one
(num_tokens_q, route_block_size, num_tokens_kv, kv_routing_tokens) setting; the baseline row is
dense pre-norm cross attention (every query over every memory, SDPA) with the same widths.
Times: median ms of forward (no_grad) and of forward+backward of output.sum(). Memory: peak GiB
allocated during one forward+backward above what was allocated before it (inputs, weights).
A failing row prints its error and the table goes on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, DIM_HEAD = 512, 8, 64

# (num_tokens_q, route_block_size, num_tokens_kv, kv_routing_tokens)
ROWS = [
    (1024, None, 8192, 1),  # one soft top-k over the whole 1M row (streamed by the Triton kernel)
    (1024, 16384, 8192, 1),  # 64 blocks x 128 picks
    (1024, 32768, 8192, 1),  # 32 blocks x 256 picks
    (1024, 32768, 32768, 1),  # 32 blocks x 1024 picks
    (1024, 32768, 32768, 4),  # 4 kv routes (2 heads each), 32768 picks per route
    (256, 32768, 32768, 1),  # a quarter of the queries routed as well
]


class DenseCrossAttention(nn.Module):
    """Baseline: pre-norm multi-head cross attention over the whole context (no routing)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm, self.context_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_q(self.norm(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(self.context_norm(context)).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def routed(nq: int, block: int | None, nkv: int, r: int) -> nn.Module:
    from colt5 import ConditionalRoutedCrossAttention

    return ConditionalRoutedCrossAttention(
        DIM, num_tokens_q=nq, num_tokens_kv=nkv, dim_head=DIM_HEAD, heads=HEADS, kv_routing_tokens=r, route_block_size=block
    )


def median_ms(fn, device: str, reps: int, params: list[torch.Tensor]) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        try:
            return do_bench(fn, warmup=25, rep=max(reps, 1) * 10, grad_to_none=params, return_mode="median")
        except TypeError:  # older triton without return_mode
            return do_bench(fn, warmup=25, rep=max(reps, 1) * 10, grad_to_none=params, quantiles=[0.5])
    times = []
    for _ in range(reps):
        for p in params:
            p.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(module: nn.Module, x: torch.Tensor, context: torch.Tensor, device: str, reps: int) -> dict[str, float]:
    dtype = torch.bfloat16

    def fwd_bwd():
        with torch.autocast(device, dtype=dtype):
            out = module(x, context)
        out.float().sum().backward()

    def fwd():
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            module(x, context)

    params = list(module.parameters()) + ([context] if context.requires_grad else [])
    fwd_bwd()  # warm up (Triton compiles, autotuning)
    fwd()
    peak = float("nan")
    if device == "cuda":
        torch.cuda.synchronize()
        for p in params:
            p.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"fwd": median_ms(fwd, device, reps, []), "fwd_bwd": median_ms(fwd_bwd, device, reps, params), "peak": peak}


def row(label: str, make, x, context, device: str, reps: int) -> dict[str, float] | None:
    try:
        torch.manual_seed(0)
        return measure(make().to(device), x, context, device, reps)
    except Exception as err:  # one failing row must not kill the table
        msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        print(f"  ! {label}: {type(err).__name__}: {msg}", file=sys.stderr, flush=True)
        return None
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--memories", type=int, default=1_048_576)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context-grad", action="store_true", help="the context takes gradients too")
    parser.add_argument("--context-dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions (x10 ms budget on CUDA)")
    args = parser.parse_args()

    import triton

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (cpu)"
    print(f"GPU {gpu} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    print(
        f"batch {args.batch}, {args.queries} queries over {args.memories} memories, dim {DIM}, {HEADS} heads x {DIM_HEAD}, "
        f"bf16 autocast, context {args.context_dtype}{' with grad' if args.context_grad else ' frozen'}",
        flush=True,
    )
    ctx_dtype = torch.bfloat16 if args.context_dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.queries, DIM, device=args.device, requires_grad=True)
    context = torch.randn(args.batch, args.memories, DIM, device=args.device, dtype=ctx_dtype)
    context.requires_grad_(args.context_grad)

    head = f"{'impl':<8} {'q':>6} {'block':>7} {'kv/route':>8} {'routes':>6} | {'fwd ms':>8} {'f+b ms':>8} | {'peak GiB':>8} | {'f+b / dense':>11}"
    print(head)
    print("-" * len(head), flush=True)
    dense = None
    if not args.no_dense:
        dense = row("dense", lambda: DenseCrossAttention(DIM, HEADS, DIM_HEAD), x, context, args.device, args.reps)
        g = (lambda k: None) if dense is None else dense.get
        print(f"{'dense':<8} {args.queries:>6} {'-':>7} {args.memories:>8} {'-':>6} | {fmt(g('fwd')):>8} {fmt(g('fwd_bwd')):>8} | {fmt(g('peak')):>8} | {'1.000' if dense else '-':>11}", flush=True)
    for nq, block, nkv, r in ROWS:
        label = f"routed q={nq} block={block} kv={nkv} r={r}"
        res = row(label, lambda: routed(nq, block, nkv, r), x, context, args.device, args.reps)
        g = (lambda k: None) if res is None else res.get
        ratio = res["fwd_bwd"] / dense["fwd_bwd"] if res and dense else None
        print(
            f"{'routed':<8} {nq:>6} {str(block):>7} {nkv:>8} {r:>6} | {fmt(g('fwd')):>8} {fmt(g('fwd_bwd')):>8} | {fmt(g('peak')):>8} | {fmt(ratio, '.3f'):>11}",
            flush=True,
        )


if __name__ == "__main__":
    main()
