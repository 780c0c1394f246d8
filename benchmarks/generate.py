"""Generation speed: new bytes per second, cached decoding against re-running the model.

    python benchmarks/generate.py --device cpu --dim 64 --depth 2 --prompts 768 --new 128
    python benchmarks/generate.py                 # CUDA: dim 512, depth 6, prompts 1k/4k/16k, 512 new, bf16

One table: prompt length x implementation, greedy `CoLT5LanguageModel.generate` on a batch of
random bytes, median over --repeats calls (after one warm-up call), bytes/s = new bytes / the
call's wall time, which includes the prefill (its own column) and, for graphs, capturing the
step's graphs. Implementations: CoLT5 cached (`cache=True`), cached + CUDA graphs
(`cuda_graph=True`, CUDA only), CoLT5 re-run (`cache=False`: the model on the whole context at
every step; timed over --rerun-new bytes, its rate is steady), and the dense baseline cached
(with and without graphs). max_seq_len = the longest prompt + new bytes, so no context overflows.
Model: the LM benchmark's (benchmarks/block.py: dim 512, depth 6, 2 light + 6 heavy heads of 64,
windows 128) unless --dim / --depth say otherwise; on the CPU fp32, on CUDA bf16 autocast.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import torch


def make_model(dense: bool, *, dim: int, depth: int, max_seq_len: int, small: bool) -> torch.nn.Module:
    from colt5.lm import CoLT5LanguageModel

    if small:  # the package defaults (8 + 8 heads of 64, window 128): the CPU figure's model
        kw = dict(heads=8, dim_head=64) if dense else {}
    elif dense:
        kw = dict(heads=8, dim_head=64, ff_mult=4)
    else:
        kw = dict(light_heads=2, light_dim_head=64, heavy_heads=6, heavy_dim_head=64, light_window_size=128,
                  heavy_window_size=128, light_ff_mult=0.5, heavy_ff_mult=4)
    return CoLT5LanguageModel(dim=dim, depth=depth, max_seq_len=max_seq_len, dense=dense, **kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=None, help="model width (default 512; 64 with --device cpu)")
    p.add_argument("--depth", type=int, default=None, help="blocks (default 6; 2 with --device cpu)")
    p.add_argument("--prompts", type=int, nargs="+", default=None, help="prompt lengths (CUDA 1024 4096 16384, CPU 768)")
    p.add_argument("--new", type=int, default=None, help="new bytes per call (CUDA 512, CPU 128)")
    p.add_argument("--rerun-new", type=int, default=None, help="new bytes of the re-run rows (default min(new, 64); CPU: new)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-rerun", action="store_true", help="skip the re-run rows")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    dim = args.dim or (64 if cpu else 512)
    depth = args.depth or (2 if cpu else 6)
    prompts = args.prompts or ([768] if cpu else [1024, 4096, 16384])
    new = args.new or (128 if cpu else 512)
    rerun_new = args.rerun_new or (new if cpu else min(new, 64))
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = nullcontext() if cpu else torch.autocast("cuda", dtype=torch.bfloat16)
    graphs = [False] if cpu else [False, True]

    import triton

    where = f"CPU, {torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name(device)
    print(f"# {where}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"greedy generate, dim {dim}, depth {depth}, batch {args.batch}, {new} new bytes "
          f"(re-run: {rerun_new}), {'fp32' if cpu else 'bf16 autocast'}: new bytes/s (prefill ms)")
    columns = [("CoLT5", False, False, g) for g in graphs] + [("CoLT5", False, True, False)] * (not args.no_rerun)
    columns += [("dense", True, False, g) for g in graphs]
    names = [f"{n} {'re-run' if rerun else 'cached'}{' + graphs' if g else ''}" for n, _, rerun, g in columns]
    print("| prompt | " + " | ".join(names) + " | cached / re-run |")
    print("|---|" + "---|" * (len(names) + 1))

    max_seq_len = max(prompts) + new
    models = {}
    for dense in (False, True):
        torch.manual_seed(0)
        models[dense] = make_model(dense, dim=dim, depth=depth, max_seq_len=max_seq_len, small=cpu).to(device).eval()
    for n in prompts:
        prompt = torch.randint(0, 256, (args.batch, n), device=device)
        cells, rates, prefills = [], {}, {}  # prefill s per model: the same for both cached columns
        for name, dense, rerun, graph in columns:
            model = models[dense]
            count = rerun_new if rerun else new
            try:
                with torch.no_grad(), autocast:
                    seconds = timed(lambda: model.generate(prompt, length=count, temperature=0, cache=not rerun,
                                                           cuda_graph=graph), device, 1 if rerun else args.repeats)
                    if not rerun and dense not in prefills:
                        prefills[dense] = timed(lambda: model(prompt, cache=model.new_cache()), device, args.repeats)
                rate = count / seconds
                rates[(name, rerun, graph)] = rate
                cells.append(f"{rate:,.1f}" + ("" if rerun else f" ({prefills[dense] * 1e3:,.1f})"))
            except Exception as err:  # one failing cell must not end the table
                print(f"  ! prompt={n} {name} rerun={rerun} graphs={graph} {type(err).__name__}: "
                      f"{' | '.join(str(err).splitlines()[:4])[:600]}", file=sys.stderr)
                cells.append("failed")
        best = max((r for (nm, rerun, _), r in rates.items() if nm == "CoLT5" and not rerun), default=None)
        base = rates.get(("CoLT5", True, False))
        ratio = f"{best / base:,.1f}x" if best and base else "-"
        print(f"| {n:,} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
