"""Where the host time of the Triton coor_descent goes: kernels alone vs through autograd.

    python benchmarks/coor_descent_overhead.py

Rows: the forward launcher alone, the backward launcher alone (main thread), both launchers
back to back, forward+backward through autograd, the same captured in a CUDA graph (what is
left once host costs are gone), and a plain PyTorch op of the same size through autograd for
the engine's own cost. Median microseconds from triton.testing.do_bench; a CPU-side profile of the autograd
step follows.
"""

from concurrent.futures import ThreadPoolExecutor

import torch
import triton
from triton.testing import do_bench

from colt5.kernels import coor_descent as cd_public
from colt5.kernels.coor_descent import coor_descent_bwd, coor_descent_fwd

SHAPES = [(16, 4096), (1024, 1024), (2, 131072)]
KW = dict(n_iters=20, eps=0.03, eps_init=4.0, eps_decay=0.7)


def us(fn, **kw):
    return 1e3 * do_bench(fn, warmup=25, rep=200, return_mode="median", **kw)


def graph_us(step, leaf) -> float:
    """Median us of replaying `step` (forward+backward) captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up outside capture (compiles, allocator pools)
            leaf.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    leaf.grad = None
    with torch.cuda.graph(graph):
        step()
    return us(graph.replay)


def main():
    global worker
    worker = ThreadPoolExecutor(max_workers=1)
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"{'rows x n':>12} {'fwd launcher':>13} {'bwd launcher':>13} {'both':>7} {'autograd f+b':>13} {'graph f+b':>10} {'exp f+b':>9}")
    for rows, n in SHAPES:
        s = torch.randn(rows, n, device="cuda")
        gy = torch.randn_like(s)
        y, stats = coor_descent_fwd(s, None, None, n / 8, 20, 0.03, 4.0, 0.7)
        t_f = us(lambda: coor_descent_fwd(s, None, None, n / 8, 20, 0.03, 4.0, 0.7))
        t_b = us(lambda: coor_descent_bwd(gy, s, None, None, stats, 20))
        t_both = us(lambda: coor_descent_bwd(gy, s, None, None, coor_descent_fwd(s, None, None, n / 8, 20, 0.03, 4.0, 0.7)[1], 20))
        sg = s.clone().requires_grad_()
        t_fb = us(lambda: cd_public(sg, k=n / 8, **KW).backward(gy), grad_to_none=[sg])
        t_graph = graph_us(lambda: cd_public(sg, k=n / 8, **KW).backward(gy), sg)
        t_exp = us(lambda: sg.exp().backward(gy), grad_to_none=[sg])
        # The thread hypothesis: the backward launcher from a worker thread (as the autograd
        # engine runs it), against the same hop with a plain op.
        t_thread = us(lambda: worker.submit(coor_descent_bwd, gy, s, None, None, stats, 20).result())
        t_hop = us(lambda: worker.submit(torch.neg, gy).result())
        print(f"{rows:>5} x {n:<6} {t_f:>13.1f} {t_b:>13.1f} {t_both:>7.1f} {t_fb:>13.1f} {t_graph:>10.1f} {t_exp:>9.1f}"
              f" | bwd launcher on a thread {t_thread:.1f}, plain op on a thread {t_hop:.1f}", flush=True)

    from torch.profiler import ProfilerActivity, profile

    s = torch.randn(16, 4096, device="cuda", requires_grad=True)
    for _ in range(5):
        cd_public(s, k=512, **KW).sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            cd_public(s, k=512, **KW).sum().backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
