"""Where the host time of the Triton coor_descent goes: kernels alone vs through autograd.

    python benchmarks/coor_descent_overhead.py

Two tables. Host us per call: the Python/launch cost measured with perf_counter over many calls
without synchronising (the GPU keeps up, so this is what the CPU spends). do_bench us: median
of the usual GPU-event timing. Rows: forward launcher, backward launcher, both, the public op's
forward, forward+backward through autograd, the backward launcher on a worker thread, and a
plain `exp` through autograd for the engine's own cost; then a CUDA-graph replay of f+b (what is
left once host costs are gone) and a cProfile of the autograd step (top functions by own time).
"""

import cProfile
import importlib
import pstats
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import triton

from colt5.kernels import coor_descent as cd_public
from timing import ExpFunction, graph_us, us
from colt5.kernels.coor_descent import CoorDescentFunction, coor_descent_bwd, coor_descent_fwd

SHAPES = [(16, 4096), (1024, 1024), (2, 131072)]
KW = dict(n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7)


def host_us(fn, calls=200):
    """CPU microseconds per call: many calls back to back, no synchronisation inside."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main():
    worker = ThreadPoolExecutor(max_workers=1)
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"
          f" | python {sys.version.split()[0]} | switch interval {sys.getswitchinterval()}")
    names = ["fwd launcher", "bwd launcher", "both", "op fwd", "autograd f+b", "bwd on thread", "exp f+b"]
    for rows, n in SHAPES:
        s = torch.randn(rows, n, device="cuda")
        gy = torch.randn_like(s)
        sg = s.clone().requires_grad_()
        _, stats, _ = coor_descent_fwd(s, None, None, n / 8, 20, 0.03, 4.0, 0.7)
        calls = [
            lambda: coor_descent_fwd(s, None, None, n / 8, 20, 0.03, 4.0, 0.7),
            lambda: coor_descent_bwd(gy, s, None, None, stats, 20),
            lambda: coor_descent_bwd(gy, s, None, None, coor_descent_fwd(s, None, None, n / 8, 20, 0.03, 4.0, 0.7)[1], 20),
            lambda: cd_public(s, k=n / 8, **KW),
            lambda: torch.autograd.grad(cd_public(sg, k=n / 8, **KW), sg, gy),
            lambda: worker.submit(coor_descent_bwd, gy, s, None, None, stats, 20).result(),
            lambda: torch.autograd.grad(sg.exp(), sg, gy),
        ]
        host = [host_us(fn) for fn in calls]
        bench = [us(fn) for fn in calls]
        t_graph = graph_us(lambda: cd_public(sg, k=n / 8, **KW).backward(gy), (sg,))
        print(f"\n{rows} x {n}: graph replay f+b {t_graph:.1f} us")
        print(f"  {'':<14} {'host us':>8} {'do_bench us':>12}")
        for name, h, b in zip(names, host, bench):
            print(f"  {name:<14} {h:>8.1f} {b:>12.1f}", flush=True)
        sys.setswitchinterval(1e-6)
        print(f"  autograd f+b with switch interval 1e-6: host {host_us(calls[4]):.1f} do_bench {us(calls[4]):.1f}")
        sys.setswitchinterval(0.005)
        # The engine-thread hypothesis: with multithreading off the backward runs on this thread.
        with torch.autograd.set_multithreading_enabled(False):
            print(f"  autograd f+b, backward on the calling thread: host {host_us(calls[4]):.1f} do_bench {us(calls[4]):.1f}")

    pieces()
    backward_profile()


def pieces() -> None:
    """Host us of each piece of the 16 x 4096 autograd step, to find what costs."""
    cd = importlib.import_module("colt5.kernels.coor_descent")  # the package re-exports a function of that name
    from colt5.kernels.checks import check_coor_descent_args

    s = torch.randn(16, 4096, device="cuda")
    sg = s.clone().requires_grad_()
    gy = torch.randn_like(s)
    y, stats, _ = coor_descent_fwd(s, None, None, 512, 20, 0.03, 4.0, 0.7)
    plan = cd._plan(16, 4096, s.device)
    fwd_args = (s, s, stats, y, stats, stats, stats, 4096, 1, 20, 0, 21, 6.2, 0.03, 4.0, 0.7)
    fwd_kw = dict(HAS_MASK=False, K_PER_ROW=False, BLOCK_N=plan.block_n, SPLIT_LEN=plan.split_len,
                  SPLITS_P2=1, SPLIT=False, COOPERATIVE=False, WRITE_Y=True, num_warps=plan.num_warps)
    jit = lambda: cd._coor_descent_fwd_kernel[(16, 1)](*fwd_args, **fwd_kw)  # noqa: E731
    compiled = cd._coor_descent_fwd_kernel.warmup(*fwd_args, grid=(16, 1), **fwd_kw)
    consts = [fwd_kw[k] for k in ("HAS_MASK", "K_PER_ROW", "BLOCK_N", "SPLIT_LEN", "SPLITS_P2", "SPLIT", "COOPERATIVE", "WRITE_Y")]
    runner = compiled[(16, 1, 1)]
    stream = torch.cuda.current_stream().cuda_stream
    ptr_args = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in fwd_args)
    # the key coor_descent_fwd built for this call (kept by the launcher when it ran above)
    key = next((key for _, key in cd._launch_fwd.kernels if key[0] is plan), None)
    rows = {
        "argument checks": lambda: check_coor_descent_args(s, n_iters=20, k=512.0, eps=0.03, eps_init=4.0, eps_decay=0.7, mask=None),
        "torch.empty_like(s)": lambda: torch.empty_like(s),
        "s.new_empty(stats shape, dtype=)": lambda: s.new_empty((16, 5, 21), dtype=torch.float32),
        "torch.empty(shape, dtype=, device=)": lambda: torch.empty((16, 5, 21), dtype=torch.float32, device=s.device),
        "jit launch (fwd kernel)": jit,
        "CompiledKernel[grid](...)": lambda: runner(*fwd_args, *consts, stream=stream),
        "kernel.run, tensor args": lambda: compiled.run(16, 1, 1, stream, compiled.function, compiled.packed_metadata,
                                                        None, None, None, *fwd_args, *consts),
        "kernel.run, int pointers": lambda: compiled.run(16, 1, 1, stream, compiled.function, compiled.packed_metadata,
                                                         None, None, None, *ptr_args, *consts),
        "Launcher.keyed, kept kernel": lambda: cd._launch_fwd.keyed(key, plan.grid, fwd_args, None),
        "fwd launcher": lambda: coor_descent_fwd(s, None, None, 512, 20, 0.03, 4.0, 0.7),
        "bwd launcher": lambda: coor_descent_bwd(gy, s, None, None, stats, 20),
        "public fwd, no grad": lambda: cd_public(s, k=512, **KW),
        "public fwd, grad input": lambda: cd_public(sg, k=512, **KW),
        "Function.apply fwd, grad": lambda: CoorDescentFunction.apply(sg, None, None, (512.0, 20, 0.03, 4.0, 0.7)),
        "public f+b": lambda: torch.autograd.grad(cd_public(sg, k=512, **KW), sg, gy),
        "exp f+b": lambda: torch.autograd.grad(sg.exp(), sg, gy),
        "python Function exp f+b": lambda: torch.autograd.grad(ExpFunction.apply(sg), sg, gy),
    }
    print("\npieces of the 16 x 4096 step (host us per call, then do_bench us):")
    for name, fn in rows.items():
        try:
            print(f"  {name:<36} {host_us(fn):>8.1f} {us(fn):>8.1f}", flush=True)
        except Exception as err:  # an API difference in one row must not hide the others
            print(f"  {name:<36} failed: {type(err).__name__}: {str(err)[:150]}")


def backward_profile() -> None:
    """The backward runs on the autograd engine's thread: time and cProfile it from inside."""
    s = torch.randn(16, 4096, device="cuda", requires_grad=True)
    gy = torch.randn_like(s)
    step = lambda: torch.autograd.grad(cd_public(s, k=512, **KW), s, gy)  # noqa: E731
    host_us(step)
    original, bwd_prof, bwd_wall, gaps = CoorDescentFunction.backward, cProfile.Profile(), [], []
    marks = {}

    def timed_backward(ctx, gy):
        t0 = time.perf_counter()
        gaps.append(t0 - marks["grad called"])
        out = bwd_prof.runcall(original, ctx, gy)
        bwd_wall.append(time.perf_counter() - t0)
        marks["backward done"] = time.perf_counter()
        return out

    # Without cProfile: the launcher's share of the body, and whether it hit its kernel cache.
    cd = importlib.import_module("colt5.kernels.coor_descent")
    launcher, launch_wall, misses = cd._launch_bwd, [], []

    class TimedLauncher:
        def keyed(self, *args):
            before = len(launcher.kernels)
            t0 = time.perf_counter()
            launcher.keyed(*args)
            launch_wall.append(time.perf_counter() - t0)
            misses.append(len(launcher.kernels) != before)

    def plain_backward(ctx, gy):
        t0 = time.perf_counter()
        out = original(ctx, gy)
        bwd_wall.append(time.perf_counter() - t0)
        return out

    cd._launch_bwd, CoorDescentFunction.backward = TimedLauncher(), staticmethod(plain_backward)
    for _ in range(200):
        torch.autograd.grad(cd_public(s, k=512, **KW), s, gy)
    torch.cuda.synchronize()
    cd._launch_bwd = launcher
    med = lambda v: 1e6 * sorted(v)[len(v) // 2]  # noqa: E731
    print(f"\nengine thread, no profiler: backward body {med(bwd_wall):.1f} us, of which the bwd launch "
          f"{med(launch_wall):.1f} us; launcher cache misses {sum(misses)} of {len(misses)}")
    bwd_wall.clear()

    CoorDescentFunction.backward = staticmethod(timed_backward)
    back = []
    for _ in range(200):
        y = cd_public(s, k=512, **KW)
        marks["grad called"] = time.perf_counter()
        torch.autograd.grad(y, s, gy)
        back.append(time.perf_counter() - marks["backward done"])
    torch.cuda.synchronize()
    CoorDescentFunction.backward = staticmethod(original)
    print(f"\nautograd.grad -> backward starts on the engine thread: {med(gaps):.0f} us; backward body "
          f"{med(bwd_wall):.0f} us; backward done -> grad returns: {med(back):.0f} us (medians)")
    print("cProfile of the backward body (engine thread), own time:")
    pstats.Stats(bwd_prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
