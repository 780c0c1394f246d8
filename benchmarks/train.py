"""The training example's speed per mode: CoLT5 against its dense baseline, tokens/s.

    python benchmarks/train.py                                   # seq 4096 and 16384, default and eager
    python benchmarks/train.py --seqs 4096 --modes default no-compile eager --steps 300

Each cell is one run of examples/train_enwik8.py with its defaults for the device (on CUDA:
dim 512, depth 6, batch 8, bf16, the embedded corpus) for --steps steps, evaluation and
sampling off. tokens/s counts the steps after the first 10; warm-up is the wall time of those
first 10 (compiling, capturing the step). Modes: *default* (each block compiled, the whole step
captured in one CUDA graph), *no-compile* (the step captured, blocks eager), *eager*.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from example_runs import example_command

FLAGS = {"default": [], "no-compile": ["--no-compile"], "eager": ["--eager"]}


def run(seq: int, dense: bool, mode: str, steps: int) -> dict | None:
    """summary.json of one run, or None (its last lines of output on stderr)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = example_command(out, seq=seq, steps=steps, eval_every=10 * steps,
                              flags=["--eval-batches", "2", *FLAGS[mode]] + ["--dense"] * dense)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"  ! seq={seq} dense={dense} mode={mode}: {(proc.stderr or proc.stdout).strip()[-600:]}", file=sys.stderr)
            return None
        return json.loads((Path(out) / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--modes", nargs="+", choices=list(FLAGS), default=["default", "eager"])
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()

    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"examples/train_enwik8.py, {args.steps} steps per cell: tokens/s (warm-up s)")
    print("| seq | mode | CoLT5 tokens/s | dense tokens/s | CoLT5 / dense | CoLT5 warm-up s | dense warm-up s | CoLT5 / dense peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in args.seqs:
        for mode in args.modes:
            ours, dense = run(seq, False, mode, args.steps), run(seq, True, mode, args.steps)
            rate = lambda s: s and s["train_tokens_per_s"]  # noqa: E731
            ratio = rate(ours) / rate(dense) if rate(ours) and rate(dense) else None
            mem = f"{fmt(ours and ours['peak_mem_gib'], '.2f')} / {fmt(dense and dense['peak_mem_gib'], '.2f')}"
            print(f"| {seq:,} | {mode} | {fmt(rate(ours), ',.0f')} | {fmt(rate(dense), ',.0f')} | {fmt(ratio, '.2f')} | "
                  f"{fmt(ours and ours['warmup_s'], '.1f')} | {fmt(dense and dense['warmup_s'], '.1f')} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
