"""What the routed block keeps for its backward, against the dense block, on one GPU.

    python benchmarks/block_memory.py [--n 32768]

For each of ours (eager, compiled) and dense (compiled), same configuration as block.py: MB
live after the forward (the activations saved for the backward, and the output), the forward's
peak and the step's peak, then the allocation sites holding the most memory after the forward
(our source lines, or the inductor-generated lines that allocate the buffers).
"""

from __future__ import annotations

import argparse
import linecache
from collections import defaultdict

import torch
import triton

from block import DIM, dense_block, routed_block

OWN_CODE = ("torchinductor", "/colt5/", "benchmarks", "local_attention")


def site(frames: list[dict]) -> str:
    """The first frame in our code or in inductor's output, with its source line."""
    for f in frames:
        name = f["filename"]
        if any(part in name for part in OWN_CODE) and "site-packages/torch/" not in name:
            return f"{name.split('/')[-1]}:{f['line']} {linecache.getline(name, f['line']).strip()[:90]}"
    f = frames[0]
    return f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"


def probe(name: str, block: torch.nn.Module, compiled: bool, n: int, top: int) -> None:
    fn = torch.compile(block) if compiled else block
    x = torch.randn(1, n, DIM, device="cuda")

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(x)

    for _ in range(2):  # compile and warm up
        forward().float().sum().backward()
        for p in block.parameters():
            p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    out = forward()
    torch.cuda.synchronize()
    live, fwd_peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    snapshot = torch.cuda.memory._snapshot()
    out.float().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.memory._record_memory_history(enabled=None)

    by_site = defaultdict(float)
    for segment in snapshot["segments"]:
        for blk in segment["blocks"]:
            if blk["state"] == "active_allocated" and blk.get("frames"):
                by_site[site(blk["frames"])] += blk["size"] / 2**20
    mode = "compiled" if compiled else "eager"
    print(f"\n{name} {mode}: live after fwd {live / 2**20:.0f} MB, fwd peak {fwd_peak / 2**20:.0f} MB, step peak {peak / 2**20:.0f} MB")
    for where, mb in sorted(by_site.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {mb:7.1f} MB  {where}")
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--top", type=int, default=15, help="allocation sites listed per block")
    args = parser.parse_args()
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | n {args.n}")
    for name, make, compiled in (("ours", lambda: routed_block(args.n), False), ("ours", lambda: routed_block(args.n), True),
                                 ("dense", dense_block, True)):
        torch.manual_seed(0)
        probe(name, make().cuda(), compiled, args.n, args.top)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
