"""Where an eager step's host time goes: host microseconds per call of each kind of op the routed
layers run, then a cProfile of eager block steps.

    python benchmarks/host_overhead.py [--n 8192] [--profile-steps 5]

Host us = perf_counter over calls queued without synchronising (the GPU work is small enough
that the queue never fills), so it is what the CPU spends per call.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _tiny_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


def _tiny(x):
    _tiny_kernel[(1,)](x, x.numel(), BLOCK=128)
    return x


@torch.library.custom_op("colt5_probe::tiny", mutates_args=())
def _tiny_op(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    return _tiny(y)


@_tiny_op.register_fake
def _(x):
    return torch.empty_like(x)


_tiny_op.register_autograd(lambda ctx, g: g)


class _TinyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _tiny(x.clone())

    @staticmethod
    def backward(ctx, g):
        return g


def host_us(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def op_table(n: int) -> None:
    from colt5.kernels import attention, local_attention_packed, norm_score, route_top_k
    from colt5.kernels.scatter import scatter_back_triton

    dev = "cuda"
    small = torch.randn(128, device=dev)
    small_g = torch.randn(128, device=dev, requires_grad=True)
    x = torch.randn(1, n, 512, device=dev, requires_grad=True)
    w = torch.randn(512, 512, device=dev, requires_grad=True)
    ln_w, ln_b = torch.ones(512, device=dev, requires_grad=True), torch.zeros(512, device=dev, requires_grad=True)
    tokens = torch.randn(2, 512, device=dev, requires_grad=True)
    scores = torch.randn(1, 2, n, device=dev, requires_grad=True)
    k = n // 16
    q = torch.randn(1, k, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, 1, k, 2, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    null_kv = torch.randn(2, 8, 64, device=dev, requires_grad=True)
    kv_w = torch.rand(1, 1, k, device=dev, requires_grad=True)
    qkv = torch.randn(1, n, 3, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    light = torch.randn(1, n, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
    routed = torch.randn(1, k, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randperm(n, device=dev)[:k].view(1, k)
    q_w = torch.rand(1, k, device=dev, requires_grad=True)
    sched = dict(n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7)

    def linear():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.nn.functional.linear(x, w)

    rows = [
        ("torch add, small", lambda: small + 1.0),
        ("Triton launch, tiny kernel", lambda: _tiny(small)),
        ("autograd.Function around it, grad", lambda: _TinyFunction.apply(small_g)),
        ("custom_op around it, grad", lambda: _tiny_op(small_g)),
        ("F.linear under autocast, grad", linear),
        ("norm_score", lambda: norm_score(x, ln_w, ln_b, tokens, out_dtype=torch.bfloat16)),
        ("route_top_k (2 rows)", lambda: route_top_k(scores, num_tokens=k, k_soft=k * 1.125, **sched)),
        ("attention (heavy)", lambda: attention(q, kv, null_kv=null_kv, kv_scale=kv_w)),
        ("local_attention_packed", lambda: local_attention_packed(qkv, window_size=128)),
        ("scatter_back", lambda: scatter_back_triton(x, routed, idx, light=light, weights=q_w)),
    ]
    print(f"\nhost us per call (forward, inputs requiring grad where marked or real), n={n}")
    print("| op | host us |")
    print("|---|---|")
    for name, fn in rows:
        print(f"| {name} | {host_us(fn):.1f} |", flush=True)

    def fwd_bwd(fn):
        def step():
            out = fn()
            if hasattr(out, "weights"):  # a router's picks
                out = out.weights
            elif isinstance(out, tuple):
                out = out[0]
            out.float().sum().backward()
        return step

    print("\nhost us per forward+backward")
    print("| op | host us |")
    print("|---|---|")
    for name, fn in rows[2:]:
        print(f"| {name} | {host_us(fwd_bwd(fn), calls=100):.1f} |", flush=True)


def block_profile(n: int, steps: int) -> None:
    import sys

    sys.path.insert(0, "benchmarks")
    from block import BLOCKS, make_step

    for name, (make, _) in BLOCKS.items():
        block = make(n).cuda()
        step, _ = make_step(block, n, "eager")
        host = host_us(step, calls=20)
        print(f"\n{name} block n={n} eager: {host:.0f} us of host time per forward+backward")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        prof.disable()
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(30)
            print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:7000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--profile-steps", type=int, default=5)
    args = parser.parse_args()
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    op_table(args.n)
    block_profile(args.n, args.profile_steps)


if __name__ == "__main__":
    main()
