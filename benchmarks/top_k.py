"""Hard top-k positions: our Triton radix select against torch.topk, on one GPU.

    python benchmarks/top_k.py

k = n / 16 (the routers' heavy-token count), fp32 scores. Median us by do_bench of the call,
and of a CUDA-graph replay of it (the GPU's time without the host's launch cost).
"""

import torch
import triton

from colt5.kernels import top_k_indices
from timing import graph_us, us

SHAPES = [(1, 8192), (3, 8192), (1, 16384), (3, 16384), (1, 32768), (3, 32768), (1, 131072), (64, 4096), (1024, 1024)]


def main():
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    impls = {
        "torch.topk": lambda s, k: s.topk(k, dim=-1).indices,
        "topk unsorted": lambda s, k: s.topk(k, dim=-1, sorted=False).indices,
        "ours": lambda s, k: top_k_indices(s, k),
    }
    head = f"{'rows x n':>14} {'k':>6} | " + " | ".join(f"{name:>13} {'graph':>7}" for name in impls) + " | topk/ours (graph)"
    print(head)
    print("-" * len(head))
    for rows, n in SHAPES:
        s = torch.randn(rows, n, device="cuda")
        k = max(1, n // 16)
        assert torch.equal(top_k_indices(s, k), s.topk(k, dim=-1).indices.sort(-1).values)
        cells, graphs = [], {}
        for name, fn in impls.items():
            graphs[name] = graph_us(lambda: fn(s, k))
            cells.append(f"{us(lambda: fn(s, k)):>13.1f} {graphs[name]:>7.1f}")
        print(f"{rows:>6} x {n:<6} {k:>6} | " + " | ".join(cells) + f" | {graphs['torch.topk'] / graphs['ours']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
