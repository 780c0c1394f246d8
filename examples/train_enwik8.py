#!/usr/bin/env python
"""Train a byte-level CoLT5 language model on enwik8, or on an embedded default corpus.

    python examples/train_enwik8.py                       # CPU: small model, loss falls in minutes
    python examples/train_enwik8.py --data enwik8.zip --out runs/colt5
    python examples/train_enwik8.py --dense --out runs/dense        # same size, dense baseline
    python examples/train_enwik8.py --out runs/colt5 --resume       # continue a stopped run
    torchrun --nproc_per_node=2 examples/train_enwik8.py ...         # DDP (NCCL on CUDA, gloo on CPU)

Without --data the corpus is this Python's standard-library source (colt5.data). Validation is
reported in bits per byte (bpc). Defaults depend on the device: a small model on CPU, a real size
(seq-len 4096) on CUDA; any flag overrides them. With --out DIR the run writes
DIR/metrics.jsonl, DIR/checkpoint.pt, DIR/loss_curve.png (if matplotlib is installed) and
DIR/summary.json; the last line printed starts with SUMMARY and carries tokens/s, the final
validation bpc, peak CUDA memory and wall time.

Only rank 0 prints and writes. The sampler draws the global batch per step from (seed, step) and
each rank keeps its slice, so resuming restores the data position exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from colt5.data import RandomWindowSampler, load_corpus
from colt5.lm import CoLT5LanguageModel

# Per-device defaults for every flag left unset. CPU (2 cores, idle machine, stdlib corpus): the
# CoLT5 model goes from 8.00 to 3.11 val bpc in 600 steps, 81 s wall, 35k tokens/s (dense: 2.87).
DEFAULTS = {
    "cpu": dict(
        steps=600, seq_len=256, batch_size=16, grad_accum=1, lr=2e-3, dim=128, depth=2,
        eval_every=100, eval_batches=8, generate_every=300, generate_length=200, precision="fp32",
    ),
    "cuda": dict(
        steps=5000, seq_len=4096, batch_size=8, grad_accum=1, lr=6e-4, dim=512, depth=6,
        eval_every=500, eval_batches=16, generate_every=1000, generate_length=512, precision="bf16",
    ),
}
# Flags that define the model, data or the optimisation trajectory: a resumed run must not change them.
FIXED_ON_RESUME = ("data", "seq_len", "batch_size", "grad_accum", "lr", "dim", "depth", "dense", "seed", "warmup", "steps")
EVAL_SEED = 12345  # the same validation windows at every evaluation, on every run
LOG2 = math.log(2.0)


# ---- command line ------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="enwik8 (raw, .gz or .zip); default: the embedded stdlib-source corpus")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps (cpu 600, cuda 5000)")
    p.add_argument("--seq-len", type=_positive_int, help="context length in bytes (cpu 256, cuda 4096)")
    p.add_argument("--batch-size", type=_positive_int, help="sequences per micro-batch per process (cpu 16, cuda 8)")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimizer step (1)")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (cpu 2e-3, cuda 6e-4)")
    p.add_argument("--warmup", type=_non_negative_int, help="linear warmup steps (default: min(200, steps // 20))")
    p.add_argument("--dim", type=_positive_int, help="model width (cpu 128, cuda 512)")
    p.add_argument("--depth", type=_positive_int, help="number of blocks (cpu 2, cuda 6)")
    p.add_argument("--eval-every", type=_positive_int, help="evaluate (and checkpoint) every N steps (cpu 100, cuda 500)")
    p.add_argument("--eval-batches", type=_positive_int, help="validation batches per evaluation (cpu 8, cuda 16)")
    p.add_argument("--generate-every", type=_non_negative_int, help="print a sample every N steps, 0 = never (cpu 300, cuda 1000)")
    p.add_argument("--generate-length", type=_positive_int, help="bytes per sample (cpu 200, cuda 512)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="refresh the progress bar / flush metrics every N steps")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 = autocast (default on CUDA), fp32 (default on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default=None, help="directory for metrics.jsonl, checkpoint.pt, loss_curve.png, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (needs --out)")
    p.add_argument("--stop-at", type=_positive_int, default=None, help="stop (checkpointed) after this step, as if interrupted")
    p.add_argument("--seed", type=int, default=None, help="seed for init, data and sampling (0)")
    p.add_argument("--dense", action="store_true", default=None, help="dense transformer of the same width/depth instead of CoLT5")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def fill_defaults(args: argparse.Namespace, device: torch.device, saved: dict | None) -> argparse.Namespace:
    """Unset flags take the checkpoint's value when resuming, else the device default."""
    if saved is not None:
        for key in FIXED_ON_RESUME:
            given = getattr(args, key)
            if given is not None and given != saved[key]:
                raise SystemExit(f"error: --{key.replace('_', '-')} {given} differs from the checkpoint's {saved[key]}; "
                                 "a resumed run keeps the model, data and schedule")
        for key in (*FIXED_ON_RESUME, *DEFAULTS["cpu"]):
            if getattr(args, key) is None:
                setattr(args, key, saved[key])
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seed is None:
        args.seed = 0
    if args.dense is None:
        args.dense = False
    if args.warmup is None:
        args.warmup = min(200, args.steps // 20)
    return args


def model_config(args: argparse.Namespace) -> dict:
    """The language model's constructor kwargs for a run: the one place sizes are derived."""
    config = dict(dim=args.dim, depth=args.depth, max_seq_len=args.seq_len, dense=args.dense)
    heads = max(2, args.dim // 64)  # heads of 64 dims, as the dense baseline has
    if args.dense:
        config.update(heads=heads, dim_head=64, ff_mult=4)
    else:
        # CoLT5's split: 1/4 of the heads local (light), the rest routed (heavy); light ff 1/2,
        # heavy ff 4x; per routing window W: W/16 queries, W/8 key-values, W/16 ff tokens (the
        # block's defaults). W = the light window, 128 as in the paper (radius 127), smaller for
        # short contexts so that a sequence spans several routing windows.
        light_heads = max(1, heads // 4)
        window = min(128, max(1, args.seq_len // 4))
        config.update(
            light_heads=light_heads, light_dim_head=64, heavy_heads=heads - light_heads, heavy_dim_head=64,
            light_window_size=window, heavy_window_size=window, light_ff_mult=0.5, heavy_ff_mult=4,
        )
    return config


# ---- distributed -------------------------------------------------------------------------------
def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)  # one process per GPU
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # set_device and memory stats need an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t


# ---- pieces of the loop ------------------------------------------------------------------------
def lr_lambda(warmup: int, steps: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine down to 10 %

    return f


@torch.no_grad()
def evaluate(model, valid, args, device, autocast, rank: int, world: int) -> float:
    """Mean validation bits per byte over eval_batches fixed random windows (all ranks)."""
    sampler = RandomWindowSampler(valid, seq_len=args.seq_len, batch_size=args.batch_size, seed=EVAL_SEED, rank=rank, world_size=world)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(args.eval_batches):
        batch = sampler.batch_at(i).to(device)
        with autocast():
            logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).double()
    model.train(was_training)
    return all_reduce_mean(total / args.eval_batches, world).item() / LOG2


def sample_text(model, valid, args, device, autocast, step: int) -> str:
    g = torch.Generator().manual_seed(args.seed * 7919 + step)
    prime_len = max(1, min(128, args.seq_len // 2))
    start = int(torch.randint(0, valid.numel() - prime_len, (1,), generator=g))
    prime = valid[start : start + prime_len].long().to(device)
    gen_device = torch.Generator(device=device).manual_seed(args.seed * 7919 + step)
    with autocast():
        out = model.generate(prime, length=args.generate_length, temperature=1.0, top_k=None, generator=gen_device)
    decode = lambda t: bytes(t.tolist()).decode("utf-8", errors="replace")  # noqa: E731
    return f"--- sample at step {step} ---\n[prompt] {decode(prime)}\n[model] {decode(out.cpu())}\n---"


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(out: Path, records: list[dict]) -> str | None:
    """Write out/loss_curve.png; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; skipped loss_curve.png (pip install matplotlib)"
    train = [(r["step"], r["train_loss"] / LOG2) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_bpc"]) for r in records if "val_bpc" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=120)
    plt.close(fig)
    return None


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


# ---- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Run training; returns the summary dict (rank 0; other ranks return it too, unprinted)."""
    wall_start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR (the run directory holding checkpoint.pt)")
    if args.data is not None:
        args.data = str(Path(args.data).resolve())  # a resumed run may start from another directory
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)

    out = Path(args.out) if args.out else None
    ckpt_path = out / "checkpoint.pt" if out else None
    checkpoint = None
    if args.resume:
        if not ckpt_path.exists():
            parser.error(f"--resume: no checkpoint at {ckpt_path}")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    elif ckpt_path is not None and ckpt_path.exists():
        parser.error(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")
    args = fill_defaults(args, device, checkpoint["args"] if checkpoint else None)
    if args.precision == "bf16" and device.type == "cpu":
        log("note: bf16 autocast on CPU is slow; --precision fp32 is the CPU default")

    try:
        corpus = load_corpus(args.data)
        # Built here so a too-short corpus fails before any work (and with the flag's name).
        sampler = RandomWindowSampler(corpus.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world)
        RandomWindowSampler(corpus.valid, seq_len=args.seq_len, batch_size=args.batch_size)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    log(f"corpus: {corpus.describe()}")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = CoLT5LanguageModel(**model_config(args)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    kind = "dense" if args.dense else "colt5"
    log(f"model: {kind}, dim {args.dim}, depth {args.depth}, {n_params / 1e6:.2f}M parameters; device {device}, "
        f"precision {args.precision}, world size {world}")
    log(f"batch: {world} x {args.batch_size} x {args.grad_accum} sequences of {args.seq_len} bytes per step, {args.steps} steps")

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        sampler.load_state_dict(checkpoint["sampler"])
        set_rng_state(checkpoint["rng"], device)
        step = checkpoint["step"]
        log(f"resumed from {ckpt_path} at step {step}")

    net = ddp = model
    if world > 1:
        # A context within one routing window gives the routers no gradient (the first window is
        # routed by position); only then must DDP look for unused parameters.
        one_window = not args.dense and args.seq_len <= model_config(args)["heavy_window_size"]
        net = ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=one_window
        )
    if args.compile:
        net = torch.compile(net)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    metrics_path = out / "metrics.jsonl" if out else None
    records: list[dict] = []
    if is_main and out:
        out.mkdir(parents=True, exist_ok=True)
        # A resumed run drops what the stopped run logged after its last checkpoint.
        records = [r for r in read_metrics(metrics_path) if r["step"] <= step] if checkpoint else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def emit(record: dict) -> None:
        records.append(record)
        if is_main and metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint_now() -> None:
        if is_main and out:
            save_checkpoint(
                ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                sampler=sampler.state_dict(), rng=rng_state(device), step=step, args=vars(args),
            )
            note = plot_losses(out, records)
            if note and not getattr(checkpoint_now, "noted", False):
                log(f"note: {note}")
                checkpoint_now.noted = True

    from tqdm import tqdm

    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    bar = tqdm(total=args.steps, initial=step, disable=not is_main or args.no_progress, dynamic_ncols=True, unit="step")
    tokens_per_step = world * args.batch_size * args.grad_accum * args.seq_len
    last_val = None
    if step == 0:
        last_val = evaluate(model, corpus.valid, args, device, autocast, rank, world)
        emit({"step": 0, "val_bpc": last_val})
        bar.write(f"step 0: val {last_val:.4f} bpc") if is_main else None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_time, train_steps, pending = 0.0, 0, []
    t0 = time.perf_counter()
    model.train()
    while step < stop:
        step_loss = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            batch = sampler.next_batch().to(device, non_blocking=True)
            sync = nullcontext() if world == 1 or micro == args.grad_accum - 1 else ddp.no_sync()
            with sync:
                with autocast():
                    logits = net(batch[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                (loss / args.grad_accum).backward()
            step_loss += loss.detach() / args.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_steps += 1
        pending.append(step_loss)
        bar.update(1)

        boundary = step % args.eval_every == 0 or step == stop
        sample_due = args.generate_every and step % args.generate_every == 0
        if step % args.log_every == 0 or boundary or sample_due:
            losses = all_reduce_mean(torch.stack(pending), world).tolist()  # one sync per flush
            train_time += time.perf_counter() - t0
            for i, value in enumerate(losses):
                emit({"step": step - len(losses) + 1 + i, "train_loss": value})
            pending = []
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{train_steps * tokens_per_step / train_time:,.0f}")
            if boundary:
                last_val = evaluate(model, corpus.valid, args, device, autocast, rank, world)
                emit({"step": step, "val_bpc": last_val})
                bar.write(f"step {step}: train {losses[-1] / LOG2:.4f} bpc, val {last_val:.4f} bpc") if is_main else None
            if sample_due and is_main:
                bar.write(sample_text(model, corpus.valid, args, device, autocast, step))
            if boundary:
                checkpoint_now()
            t0 = time.perf_counter()
    bar.close()

    summary = {
        "model": kind, "params": n_params, "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "world_size": world, "precision": args.precision, "seq_len": args.seq_len, "step": step,
        "train_tokens_per_s": (train_steps * tokens_per_step / train_time) if train_time > 0 else None,
        "final_val_bpc": last_val,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "wall_s": time.perf_counter() - wall_start, "corpus": corpus.name, "corpus_bytes": corpus.num_bytes,
    }
    if is_main:
        if out:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        print(
            f"SUMMARY model={kind} params={n_params / 1e6:.2f}M device={summary['device']} x{world} "
            f"precision={args.precision} seq_len={args.seq_len} steps={step} "
            f"tokens/s={fmt(summary['train_tokens_per_s'], ',.0f')} val_bpc={fmt(last_val, '.4f')} "
            f"peak_mem_gib={fmt(summary['peak_mem_gib'], '.2f')} wall={summary['wall_s']:.1f}s"
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
