"""Quality per hour: CoLT5 against its dense baseline for the same wall-clock budget.

    python benchmarks/lm_quality.py                                   # CUDA: seq 4096 and 16384, 5 minutes each
    python benchmarks/lm_quality.py --seqs 4096 --minutes 20 --out runs/quality
    python benchmarks/lm_quality.py --device cpu --seqs 64 --minutes 0.2 -- --dim 32 --depth 1   # a smoke run
    python benchmarks/lm_quality.py --seqs 16384 --models dense      # one run (a device call's worth) ...
    python benchmarks/lm_quality.py --seqs 4096 16384 --report       # ... and the table and plot of the runs in OUT

For each sequence length, each model first trains --calibrate steps to measure its tokens/s in
the training example's default mode for the device (on CUDA: blocks compiled, the step
captured in one CUDA graph), then trains from scratch for as many steps as fill --minutes at
that rate, so that its learning-rate schedule (warm-up, cosine decay) ends with the budget;
validation every tenth of the run. Arguments after `--` go to examples/train_enwik8.py for
every run (sizes, --lr, ...).

Prints one table (steps, validation bpc at the end and at the steps both models reached,
tokens/s) and writes OUT/quality.png: validation bpc against training time and against steps,
one row of plots per sequence length (needs matplotlib). OUT/<seq>-<model>/ keeps each run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from example_runs import evaluations, example_command, split_extra

MODELS = ("colt5", "dense")


def train(out: Path, seq: int, model: str, steps: int, eval_every: int, extra: list[str], device: str | None) -> dict:
    """One run of the training example into `out` (replaced); returns its summary."""
    cmd = example_command(out, seq=seq, steps=steps, eval_every=eval_every, flags=[*extra] + ["--dense"] * (model == "dense"),
                          device=device)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{model} at seq {seq} failed ({' '.join(cmd)}):\n{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def validation(out: Path) -> list[tuple[int, float, float]]:
    """(step, training seconds, val bpc) of every evaluation after step 0."""
    return [(r["step"], r["train_s"], r["val_bpc"]) for r in evaluations(out) if r["step"] > 0]


def at_step(curve: list[tuple[int, float, float]], step: int) -> float | None:
    """Validation bpc at `step`: linear between the evaluations on either side of it (each run
    evaluates every tenth of its own steps, so the two models' evaluations fall at other steps)."""
    exact = [bpc for s, _, bpc in curve if s == step]
    if exact:
        return exact[-1]  # a run's final evaluation can repeat its last periodic one's step
    for (s0, _, b0), (s1, _, b1) in zip(curve, curve[1:]):
        if s0 < step < s1:
            return b0 + (b1 - b0) * (step - s0) / (s1 - s0)
    return None


def plot(path: Path, curves: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    seqs = sorted({seq for seq, _ in curves})
    fig, axes = plt.subplots(len(seqs), 2, figsize=(10, 3.6 * len(seqs)), squeeze=False)
    for row, seq in zip(axes, seqs):
        for model in MODELS:
            curve = curves[(seq, model)]
            row[0].plot([t / 60 for _, t, _ in curve], [b for *_, b in curve], marker="o", label=model)
            row[1].plot([s for s, _, _ in curve], [b for *_, b in curve], marker="o", label=model)
        minutes = max(curves[(seq, model)][-1][1] for model in MODELS) / 60
        row[0].set(title=f"seq {seq:,}: {minutes:.1f} minutes each", xlabel="training minutes", ylabel="validation bpc")
        row[1].set(title=f"seq {seq:,}", xlabel="steps", ylabel="validation bpc")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv: list[str] | None = None) -> None:
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--minutes", type=float, default=5.0, help="training time per model and length")
    p.add_argument("--calibrate", type=int, default=40, help="steps of the throughput measurement (the first 10 are warm-up)")
    p.add_argument("--device", default=None, help="passed to the training example (default: its own)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="train only these")
    p.add_argument("--report", action="store_true", help="train nothing: the table and plot of the runs already in OUT")
    p.add_argument("--out", default="runs/quality")
    args = p.parse_args(own)
    if args.calibrate <= 10:
        p.error("--calibrate must be more than 10 steps (the first 10 are warm-up)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seq in args.seqs if not args.report else []:
        for model in args.models:
            run_dir = out / f"{seq}-{model}"
            probe = train(run_dir, seq, model, args.calibrate, args.calibrate, extra, args.device)
            steps = max(10, int(args.minutes * 60 * probe["train_tokens_per_s"] / probe["tokens_per_step"]))
            train(run_dir, seq, model, steps, max(1, steps // 10), extra, args.device)
    curves, rows = {}, []
    for seq in args.seqs:
        runs = {}
        for model in MODELS:
            run_dir = out / f"{seq}-{model}"
            if not (run_dir / "summary.json").exists():
                if not args.report:  # the other model trains in another call
                    print(f"trained {', '.join(args.models)} at seq {', '.join(map(str, args.seqs))}; the table: --report")
                    return
                raise SystemExit(f"{run_dir} holds no finished run: train it first (--seqs {seq} --models {model})")
            runs[model] = json.loads((run_dir / "summary.json").read_text())
            curves[(seq, model)] = validation(run_dir)
        common = min(runs[m]["step"] for m in MODELS)
        for model in MODELS:
            s = runs[model]
            curve = curves[(seq, model)]
            rows.append((seq, model, curve[-1][1] / 60, s["step"], s["final_val_bpc"], at_step(curve, common), common,
                         s["train_tokens_per_s"]))
    print(f"examples/train_enwik8.py{' ' + ' '.join(extra) if extra else ''}: the same training time per model")
    print("| seq | model | training minutes | steps | val bpc at the end | val bpc at the step both reached | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for seq, model, minutes, steps, final, common_bpc, common, rate in rows:
        common_text = "-" if common_bpc is None else f"{common_bpc:.4f} (step {common:,})"
        print(f"| {seq:,} | {model} | {minutes:.1f} | {steps:,} | {final:.4f} | {common_text} | {rate:,.0f} |")
    note = plot(out / "quality.png", curves)
    print(note or f"plot: {out / 'quality.png'}")


if __name__ == "__main__":
    main()
