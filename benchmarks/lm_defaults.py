"""The training example's defaults, chosen by measurement: variants of the CoLT5 model at equal steps.

    python benchmarks/lm_defaults.py                  # CUDA: seq 4096, 1500 steps each (~1 minute per variant)
    python benchmarks/lm_defaults.py --steps 3000 --variants default "lr 6e-4" dense
    python benchmarks/lm_defaults.py --device cpu --seq 64 --steps 20 --variants default dense -- --dim 32 --depth 1   # a smoke run
    python benchmarks/lm_defaults.py --reuse          # a sweep split over calls: keep the runs that finished

Every variant trains from the same seed for the same number of steps (so with the same schedule
and the same batches) on the default corpus, in the example's default mode for the device, and the
table compares their validation bpc at the end and their training tokens/s. The runs go one after
another: eight CUDA-graph runs sharing one H200 made about a third of the steps that the same
runs make one at a time. Arguments after `--` go to every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

from example_runs import SCRIPT, evaluations, example_command, split_extra


def model_args(**kwargs) -> list[str]:
    return [arg for key, value in kwargs.items() for arg in ("--model-arg", f"{key}={value}")]


# name -> the example's flags. The default: rotary positions, lr 1e-3; of 8 heads 2 light (window
# 512) and 6 heavy; light ff mult 2, heavy 4; per routing window of 128: 8 routed queries, 16
# routed key-values, 8 routed feedforward tokens. Dense: 8 heads, ff mult 4, the same positions
# and rate.
LEARNED = ["--positions", "learned"]
HEADS_4_4 = model_args(light_heads=4, heavy_heads=4)
HEADS_4_6 = model_args(light_heads=4)
ROUTED_2X = model_args(num_heavy_attn_tokens_q=16, num_heavy_attn_tokens_kv=32, num_heavy_ff_tokens=16)
LIGHT_FF_HALF = model_args(light_ff_mult=0.5)  # colt5-attention's light width
HEAVY_FF_16 = model_args(heavy_ff_mult=16)  # the paper's heavy width: four times T5's 4 dim
VARIANTS = {
    "default": [],
    "lr 3e-4": ["--lr", "3e-4"],
    "lr 6e-4": ["--lr", "6e-4"],
    "lr 2e-3": ["--lr", "2e-3"],
    "4 light + 4 heavy heads": HEADS_4_4,
    "4 light + 6 heavy heads": HEADS_4_6,
    "2x routed tokens": ROUTED_2X,
    "light window 128 (the paper's)": ["--light-window", "128"],
    "light window 256": ["--light-window", "256"],
    "light window 1024": ["--light-window", "1024"],
    "light window 2048": ["--light-window", "2048"],
    "every query heavy": model_args(num_heavy_attn_tokens_q=128),
    "every query heavy, 2x routed key-values": model_args(num_heavy_attn_tokens_q=128, num_heavy_attn_tokens_kv=32),
    "light ff mult 4": model_args(light_ff_mult=4),
    "router eps 1 (the paper's)": model_args(router_kwargs={"eps": 1.0}),
    "router eps 0.3": model_args(router_kwargs={"eps": 0.3}),
    "1 routed token per window (q, kv, ff)": model_args(num_heavy_attn_tokens_q=1, num_heavy_attn_tokens_kv=1,
                                                        num_heavy_ff_tokens=1),
    "heavy ff mult 16": HEAVY_FF_16,
    "heavy ff mult 16, 4 light + 6 heavy heads": [*HEAVY_FF_16, *HEADS_4_6],
    "heavy ff mult 16, 2x routed tokens": [*HEAVY_FF_16, *ROUTED_2X],
    "light ff mult 1/2": LIGHT_FF_HALF,
    "light ff mult 1/2, 2x routed tokens": [*LIGHT_FF_HALF, *ROUTED_2X],
    "light ff mult 1/2, lr 6e-4, 4 light + 4 heavy heads": [*LIGHT_FF_HALF, "--lr", "6e-4", *HEADS_4_4],
    "learned positions, lr 3e-4": [*LEARNED, "--lr", "3e-4"],
    "learned positions, lr 6e-4": [*LEARNED, "--lr", "6e-4"],
    "learned positions, lr 1e-3": [*LEARNED, "--lr", "1e-3"],
    "learned positions, lr 2e-3": [*LEARNED, "--lr", "2e-3"],
    "learned positions, lr 6e-4, 4 light + 4 heavy heads": [*LEARNED, "--lr", "6e-4", *HEADS_4_4],
    "learned positions, lr 6e-4, 2x routed tokens": [*LEARNED, "--lr", "6e-4", *ROUTED_2X],
    "dense": ["--dense"],
    "dense, lr 6e-4": ["--dense", "--lr", "6e-4"],
    "dense, learned positions, lr 6e-4": ["--dense", *LEARNED, "--lr", "6e-4"],
}


COMMAND = "lm_defaults_command.json"


def run_dir_name(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", variant.replace(" + ", " and "))


def final_validation(out: Path) -> tuple[int, float] | None:
    """(step, val bpc) of the run's last evaluation, or None if it made none."""
    seen = evaluations(out)
    return (seen[-1]["step"], seen[-1]["val_bpc"]) if seen else None


def tokens_per_s(out: Path) -> float | None:
    """The run's training tokens/s after its warm-up (the example's summary), or None."""
    summary = out / "summary.json"
    return json.loads(summary.read_text()).get("train_tokens_per_s") if summary.exists() else None


def main(argv: list[str] | None = None) -> None:
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default=None, help="passed to the training example (default: its own)")
    p.add_argument("--out", default="runs/defaults")
    p.add_argument("--reuse", action="store_true",
                   help="keep a variant's run in OUT that this same command already trained to the end")
    args = p.parse_args(own)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = {}
    example_hash = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()
    for name in args.variants:
        run_dir = out / run_dir_name(name)
        cmd = example_command(run_dir, seq=args.seq, steps=args.steps, eval_every=max(1, args.steps // 5),
                              flags=[*VARIANTS[name], *extra], device=args.device)
        # What made a run that finished: --reuse keeps it for the same command of the same example
        # (whose defaults a variant's flags are relative to).
        made_by, record = run_dir / COMMAND, {"command": cmd[1:], "example_sha256": example_hash}
        if args.reuse and made_by.exists() and json.loads(made_by.read_text()) == record:
            print(f"{name}: kept the finished run in {run_dir}")
            continue
        made_by.unlink(missing_ok=True)
        with open(out / f"{run_dir.name}.log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
                failed[name] = log.name
            else:
                made_by.write_text(json.dumps(record))

    print(f"examples/train_enwik8.py --seq-len {args.seq} --steps {args.steps}{' ' + ' '.join(extra) if extra else ''}, "
          f"the same seed and batches for every variant")
    print("| variant | flags | val bpc at the end | vs default | tokens/s |")
    print("|---|---|---|---|---|")
    base = final_validation(out / "default") if "default" in args.variants and "default" not in failed else None
    for name in args.variants:
        result = None if name in failed else final_validation(out / run_dir_name(name))
        flags = " ".join(VARIANTS[name]) or "-"
        if result is None:
            print(f"| {name} | {flags} | failed (see {failed.get(name, 'its log')}) | - | - |")
            continue
        delta = f"{result[1] - base[1]:+.4f}" if base and name != "default" else "-"
        speed = tokens_per_s(out / run_dir_name(name))
        print(f"| {name} | `{flags}` | {result[1]:.4f} (step {result[0]:,}) | {delta} | "
              f"{'-' if speed is None else f'{speed:,.0f}'} |")


if __name__ == "__main__":
    main()
