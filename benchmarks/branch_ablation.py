"""How much a trained CoLT5 language model uses its heavy branches.

    python benchmarks/branch_ablation.py runs/colt5        # a run of examples/train_enwik8.py --out runs/colt5
    python benchmarks/branch_ablation.py runs/colt5 --batches 32 --device cuda

Loads the run's checkpoint and measures validation bpc on the run's own validation windows (the
example's evaluation: its seed, global batch and sequence length) four times: the model as trained,
every layer's heavy attention removed (its output projection zeroed, so routed positions get no
heavy output and unrouted ones keep the learned null output), every heavy feedforward removed (its
last linear zeroed), and both. What removing a branch costs is what the model gets from it; a
branch the model has not learned to use costs nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from example_runs import load_example


def zero_output(linear: nn.Linear) -> None:
    """Zero a branch's output projection, so that the branch adds nothing to the residual stream."""
    with torch.no_grad():
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


def without(model: nn.Module, *, attention: bool, feedforward: bool) -> nn.Module:
    """A copy of the routed language model without the chosen heavy branches."""
    model = copy.deepcopy(model)
    for layer in model.backbone.layers:
        if attention:
            zero_output(layer.attn.heavy.to_out)
        if feedforward:
            zero_output(layer.ff.heavy_ff.net[-1])
    return model


@torch.no_grad()
def validation_bpc(model: nn.Module, batches: list[torch.Tensor], dtype: torch.dtype | None) -> float:
    total = torch.zeros((), dtype=torch.float64, device=batches[0].device)  # one read at the end
    for batch in batches:
        with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).double()
    return total.item() / len(batches) / math.log(2)


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    example = load_example()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the --out directory of a CoLT5 run of examples/train_enwik8.py")
    p.add_argument("--batches", type=example._positive_int, default=None,
                   help="validation batches (default: the run's --eval-batches)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    state = example.load_checkpoint(args.run / example.CHECKPOINT)
    run_args = argparse.Namespace(**state["args"])
    if run_args.dense:
        p.error(f"{args.run} holds a dense run: it has no heavy branches")
    device = torch.device(args.device)
    model = example.build_model(run_args)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    corpus, _ = example.load_data(run_args, 0, 1)
    summary = args.run / example.SUMMARY
    saved_bytes = json.loads(summary.read_text()).get("corpus_bytes") if summary.exists() else None
    if saved_bytes is not None and saved_bytes != corpus.num_bytes:
        print(f"warning: the corpus holds {corpus.num_bytes:,} bytes, the run's held {saved_bytes:,}: other "
              "validation windows than the run's", file=sys.stderr)
    # The run's evaluation: every process's share of the global batch (--batch-size is per process).
    global_batch = run_args.batch_size * state.get("world_size", 1)
    sampler = example.RandomWindowSampler(corpus.valid, seq_len=run_args.seq_len, batch_size=global_batch,
                                          seed=example.EVAL_SEED, rank=0, world_size=1)
    batches = [sampler.batch_at(i).to(device) for i in range(args.batches or run_args.eval_batches)]
    dtype = torch.bfloat16 if run_args.precision == "bf16" else None  # the run's autocast

    variants = [("as trained", False, False), ("without heavy attention", True, False),
                ("without heavy feedforward", False, True), ("without both", True, True)]
    rows = [(name, validation_bpc(without(model, attention=a, feedforward=f) if a or f else model, batches, dtype))
            for name, a, f in variants]
    print(f"{args.run} (step {state['step']:,}, seq {run_args.seq_len:,}), {len(batches)} validation batches of "
          f"{global_batch}")
    print("| model | val bpc | cost of the removal |")
    print("|---|---|---|")
    for name, bpc in rows:
        print(f"| {name} | {bpc:.4f} | {'-' if name == 'as trained' else f'{bpc - rows[0][1]:+.4f}'} |")
    return rows


if __name__ == "__main__":
    main()
