#!/usr/bin/env python
"""Train a byte-level CoLT5 language model on enwik8, or on an embedded default corpus.

    python examples/train_enwik8.py                       # CPU: small model, loss falls in minutes
    python examples/train_enwik8.py --data enwik8.zip --out runs/colt5
    python examples/train_enwik8.py --dense --out runs/dense        # same size, dense baseline
    python examples/train_enwik8.py --out runs/colt5 --resume       # continue a stopped run
    torchrun --nproc_per_node=2 examples/train_enwik8.py ...         # DDP (NCCL on CUDA, gloo on CPU)
    torchrun --nproc_per_node=8 examples/train_enwik8.py --fsdp ...  # FSDP2: each block sharded

Without --data the corpus is the `.py` source of this install: Python's standard library and
torch, triton, einops, numpy, ... (colt5.data, about 120 MB). Validation is reported in bits per
byte (bpc). Defaults depend on the device: a small model on CPU, a real size (seq-len 4096) on
CUDA; any flag overrides them. With --out DIR the run writes DIR/metrics.jsonl,
DIR/checkpoint.pt, DIR/loss_curve.png (if matplotlib is installed) and DIR/summary.json; the last
line printed starts with SUMMARY and carries tokens/s (of the training steps after the first
--log-every: compilation and warm-up excluded), the final validation bpc, peak CUDA memory and
wall time. --profile N prints rank 0's top ops over N steps and writes a trace.

A run is never lost or overwritten by accident. A DIR holding another run is refused unless
--resume (continue it) or --overwrite (start again) is given. Checkpoints are written atomically
at every evaluation, and on Ctrl-C (exit code 130) at the last finished step (under DDP at the
next metrics flush, every --log-every steps, so that all ranks stop at the same step). --resume
restores the run exactly, keeps its model, data and schedule flags (--steps too: the learning
rate decays over exactly --steps, so to train longer start a new run with a larger --steps; the
step's mode, --eager, --compile or --cuda-graphs, is chosen afresh and moves losses by float
rounding only), and drops the metrics logged after the checkpoint, a line torn by a crash
included. Resuming a finished run reports it and changes nothing. A non-finite loss stops the
run (exit code 1) before it can replace the last good checkpoint. Any other mistake is one line
on stderr naming the problem and the fix, exit code 2, with nothing written.

Only rank 0 prints and writes. The sampler draws the global batch per step from (seed, step) and
each rank keeps its slice, so resuming restores the data position exactly.

Several processes (torchrun) replicate the model with DDP, or with --fsdp shard it (FSDP2:
`fully_shard` on each block, then on the rest), for models that one GPU cannot hold; --fsdp in a
single process is refused (exit 2). With --grad-accum N the gradients are reduced once per step,
on the last micro-batch. The checkpoint holds the full (unsharded) model and optimizer state,
gathered on rank 0, so one file resumes in one process, under DDP or under FSDP, on any number of
processes that divides its global batch (processes x --batch-size, which a resumed run keeps).
On CUDA the run takes its fastest path by default: each block compiled on its own (--compile,
regional compilation) and the training step captured in a CUDA graph (--cuda-graphs): after two
eager steps the whole step (every micro-batch's forward and backward, the clipping, the
optimizer) is captured once and then replayed, so the host's cost per operation is paid once per
run instead of once per step. Under DDP the captured step sums the gradients over the ranks with
one all-reduce between two graphs (the backward's and the optimizer's). --eager opts out of
both, --no-compile of the compilation. FSDP2's steps are eager unless --compile (which composes
with DDP and FSDP2). --dist-backend gloo on CUDA lets several processes share one GPU (two
nodes of one process each on one machine, say). A rank that fails prints its error with
its rank and exits at once (code 1) without waiting for the others, which stop when their next
collective fails, when torchrun stops them, or after --dist-timeout seconds.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from colt5.data import Corpus, RandomWindowSampler, load_corpus
from colt5.lm import CoLT5LanguageModel

# Per-device defaults for every flag left unset. CPU (2 cores, idle machine, the 122 MB default
# corpus, rotary positions): the CoLT5 model goes from 7.8 to 2.87 val bpc in 600 steps, 148 s wall, 19k tokens/s
# (dense: 2.67). CUDA: chosen by measurement (benchmarks/lm_defaults.py, benchmarks/RESULTS.md).
DEFAULTS = {
    "cpu": dict(
        steps=600, seq_len=256, batch_size=16, grad_accum=1, lr=2e-3, dim=128, depth=2, positions="rotary",
        eval_every=100, eval_batches=8, generate_every=300, generate_length=200, precision="fp32",
    ),
    "cuda": dict(
        steps=5000, seq_len=4096, batch_size=8, grad_accum=1, lr=1e-3, dim=512, depth=6, positions="rotary",
        eval_every=500, eval_batches=16, generate_every=1000, generate_length=512, precision="bf16",
    ),
}
# Flags that define the model, data or the optimisation trajectory: a resumed run must not change them.
FIXED_ON_RESUME = ("data", "seq_len", "batch_size", "grad_accum", "lr", "dim", "depth", "dense", "positions", "seed", "warmup",
                   "steps", "light_window", "model_args")
MODEL_FLAGS = {"dim": "--dim", "depth": "--depth", "dense": "--dense", "max_seq_len": "--seq-len", "num_tokens": "bytes: 256",
               "rotary_emb": "--positions", "light_window_size": "--light-window"}
EVAL_SEED = 12345  # the same validation windows at every evaluation, on every run
LOG2 = math.log(2.0)
CHECKPOINT, METRICS, SUMMARY, PLOT = "checkpoint.pt", "metrics.jsonl", "summary.json", "loss_curve.png"
PROFILE = "profile_rank0.json"  # --profile's chrome trace (chrome://tracing, ui.perfetto.dev)
PROFILE_SKIP = 3  # steps before the profiled ones: compilation, first allocations, DDP's bucket rebuild
RUN_FILES = (CHECKPOINT, METRICS, SUMMARY, PLOT)
LIGHT_WINDOW, HEAVY_WINDOW = 512, 128  # CoLT5's local attention window and routing window W
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "sampler", "rng", "step", "args")  # and world_size (optional)


class RunError(SystemExit):
    """A problem the user can fix: main prints "error: <message>" on one line and exits with `code`.

    A SystemExit, so an uncaught one ends the script with the code and no traceback; str() is the
    message, so a caller of main (a test) can read it.
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}"


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
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a constructor keyword and a Python literal), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a Python literal (a number, True/False, None, ...)") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise RunError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="enwik8 (raw, .gz or .zip); default: the embedded Python-source corpus")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps (cpu 600, cuda 5000); fixed on resume")
    p.add_argument("--seq-len", type=_positive_int, help="context length in bytes (cpu 256, cuda 4096)")
    p.add_argument("--batch-size", type=_positive_int, help="sequences per micro-batch per process (cpu 16, cuda 8)")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimizer step (1)")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (cpu 2e-3, cuda 1e-3)")
    p.add_argument("--warmup", type=_non_negative_int, help="linear warmup steps (default: min(200, steps // 20))")
    p.add_argument("--dim", type=_positive_int, help="model width (cpu 128, cuda 512)")
    p.add_argument("--model-arg", type=_model_arg, action="append", dest="model_args", metavar="KEY=VALUE",
                   help="override one constructor keyword of the model (colt5.lm.CoLT5LanguageModel and its backbone), "
                        "e.g. num_heavy_ff_tokens=16; repeatable; fixed on resume")
    p.add_argument("--depth", type=_positive_int, help="number of blocks (cpu 2, cuda 6)")
    p.add_argument("--positions", choices=("rotary", "learned"),
                   help="rotary (default): a learned position table and rotary embeddings in every attention; learned: "
                        "the table only; fixed on resume")
    p.add_argument("--light-window", type=_positive_int,
                   help="CoLT5's local attention window (default min(512, seq-len / 4)); the routing window stays "
                        "min(128, seq-len / 4); fixed on resume; ignored with --dense")
    p.add_argument("--eval-every", type=_positive_int, help="evaluate (and checkpoint) every N steps (cpu 100, cuda 500)")
    p.add_argument("--eval-batches", type=_positive_int, help="validation batches per evaluation (cpu 8, cuda 16)")
    p.add_argument("--generate-every", type=_non_negative_int, help="print a sample every N steps, 0 = never (cpu 300, cuda 1000)")
    p.add_argument("--generate-length", type=_positive_int, help="bytes per sample (cpu 200, cuda 512)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="refresh the progress bar / flush metrics every N steps")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 = autocast (default on CUDA), fp32 (default on CPU)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="compile each block on its own (torch.compile backend, default inductor; aot_eager to rule inductor "
                        "out); the default on CUDA without --fsdp")
    p.add_argument("--no-compile", action="store_true", help="leave the blocks uncompiled (on CUDA without --fsdp the step is still captured)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the training step in CUDA graphs and replay it (the default on CUDA without --fsdp; "
                        "--no-cuda-graphs: compiled blocks, eager steps)")
    p.add_argument("--eager", action="store_true", help="plain eager steps: no captured step, no compilation")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP; needs torchrun")
    p.add_argument("--dist-backend", choices=("nccl", "gloo"), default=None,
                   help="the collectives' backend (nccl on CUDA, gloo on CPU); gloo on CUDA also lets processes share a "
                        "GPU (each process is on cuda:LOCAL_RANK: nodes of one process each on one machine)")
    p.add_argument("--dist-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                   help="how long a collective waits for the other ranks before the job stops (600)")
    p.add_argument("--profile", type=_positive_int, default=None, metavar="STEPS",
                   help=f"rank 0: profile STEPS training steps after {PROFILE_SKIP + 1} (torch.profiler); prints the "
                        f"top ops, writes DIR/{PROFILE}; those steps' tokens/s are not a measurement")
    p.add_argument("--out", default=None, help="directory for metrics.jsonl, checkpoint.pt, loss_curve.png, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (needs --out)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds another run, replacing its files")
    p.add_argument("--stop-at", type=_positive_int, default=None, help="stop (checkpointed) after this step, as if interrupted")
    p.add_argument("--seed", type=int, default=None, help="seed for init, data and sampling (0)")
    p.add_argument("--dense", action="store_true", default=None, help="dense transformer of the same width/depth instead of CoLT5")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.resume and args.out is None:
        raise RunError("--resume needs --out DIR (the run directory holding checkpoint.pt)")
    if args.overwrite and args.out is None:
        raise RunError("--overwrite needs --out DIR (the run directory to start afresh)")
    if args.resume and args.overwrite:
        raise RunError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if args.compile is not None and args.compile not in torch.compiler.list_backends(exclude_tags=()):
        raise RunError(f"--compile {args.compile}: not a torch.compile backend; use inductor (the default) or aot_eager")
    if args.eager and (args.compile is not None or args.cuda_graphs):
        raise RunError("--eager runs plain eager steps; leave out --compile and --cuda-graphs")
    if args.no_compile and args.compile is not None:
        raise RunError(f"--no-compile and --compile {args.compile} contradict each other: pass one of them")
    if args.model_args is not None:
        args.model_args = dict(args.model_args)
        taken = sorted(set(args.model_args) & MODEL_FLAGS.keys())
        if taken:
            raise RunError(f"--model-arg {taken[0]}: set by its own flag ({MODEL_FLAGS[taken[0]]}), not --model-arg")
    if args.data is not None:
        args.data = str(Path(args.data).resolve())  # a resumed run may start from another directory
    return args


def fill_defaults(args: argparse.Namespace, device: torch.device, saved: dict | None, *, world: int = 1,
                  saved_world: int = 1) -> argparse.Namespace:
    """Unset flags take the checkpoint's value when resuming, else the device default.

    A resumed run keeps the checkpoint's global batch (saved_world processes x its --batch-size),
    so on `world` processes its --batch-size is global / world: the same windows every step.
    """
    if saved is not None:
        saved = {**saved, "batch_size": resumed_batch_size(args.batch_size, saved["batch_size"], saved_world, world)}
        for key in FIXED_ON_RESUME:
            given = getattr(args, key)
            if given is None or given == saved[key] or (key == "light_window" and saved["dense"]):
                continue  # (a dense model has no light window)
            if key == "steps":
                raise RunError(
                    f"--steps {given} differs from the checkpoint's {saved[key]}: --steps is fixed on resume (the learning "
                    f"rate decays over exactly --steps); to train longer start a new run with --steps {given} in another --out"
                )
            flag = "--model-arg" if key == "model_args" else f"--{key.replace('_', '-')}"
            raise RunError(f"{flag} {given} differs from the checkpoint's {saved[key]}; "
                           "a resumed run keeps the model, data and schedule (leave the flag out)")
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
    if args.model_args is None:
        args.model_args = {}
    if args.warmup is None:
        args.warmup = min(200, args.steps // 20)
    if args.dense:
        args.light_window = None
    elif args.light_window is None:
        args.light_window = default_window(args.seq_len, LIGHT_WINDOW)
    return args


def resumed_batch_size(given: int | None, saved: int, saved_world: int, world: int) -> int:
    """The per-process batch that keeps a checkpoint's global batch on `world` processes."""
    total = saved * saved_world
    saved_text = f"{total} sequences ({saved_world} process{'es' if saved_world > 1 else ''} x --batch-size {saved})"
    if given is not None and given * world != total:
        raise RunError(f"--batch-size {given} on {world} process(es) is a global batch of {given * world}; the checkpoint's "
                       f"is {saved_text} and a resumed run keeps it (leave --batch-size out)")
    if total % world:
        raise RunError(f"the checkpoint's global batch of {saved_text} does not split over {world} processes; "
                       "resume on a number of processes that divides it")
    return total // world


def model_config(args: argparse.Namespace) -> dict:
    """The language model's constructor kwargs for a run: the one place sizes are derived."""
    config = dict(dim=args.dim, depth=args.depth, max_seq_len=args.seq_len, dense=args.dense,
                  rotary_emb=args.positions == "rotary")
    heads = max(2, args.dim // 64)  # heads of 64 dims, as the dense baseline has
    if args.dense:
        config.update(heads=heads, dim_head=64, ff_mult=4)
    else:
        # CoLT5's split: 1/4 of the heads local (light), the rest routed (heavy); light ff 2 dim
        # (the paper's: half of T5's 4 dim), heavy ff 4 dim (measured: the paper's 16 trains no
        # better and 6% slower); per routing window W: W/16 queries, W/8 key-values, W/16 ff tokens
        # (the block's defaults). W = 128 as in the paper, the light window 512 (measured: 128 as
        # in the paper is 0.11 bpc worse at seq 4,096, 1024 no better and slower); both smaller for
        # short contexts so that a sequence spans several windows.
        light_heads = max(1, heads // 4)
        config.update(
            light_heads=light_heads, light_dim_head=64, heavy_heads=heads - light_heads, heavy_dim_head=64,
            light_window_size=args.light_window, heavy_window_size=default_window(args.seq_len, HEAVY_WINDOW),
            light_ff_mult=2, heavy_ff_mult=4,
        )
    return {**config, **args.model_args}


def default_window(seq_len: int, window: int) -> int:
    """`window`, or a quarter of a shorter context, so that a sequence spans several windows."""
    return min(window, max(1, seq_len // 4))


# ---- devices and distributed -------------------------------------------------------------------
def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device_arg: str | None, world: int, local_rank: int) -> torch.device:
    """The device this process trains on; refuses one that does not exist. Changes nothing."""
    try:
        device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise RunError(f"--device {device_arg!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RunError(f"--device {device_arg}: this script trains on cpu or cuda (cuda:N); use one of those")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise RunError(f"--device {device_arg}: {why} (torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if world > 1:
        device = torch.device("cuda", local_rank)  # one process per GPU
    elif device.index is None:
        device = torch.device("cuda", 0)  # set_device and memory stats need an index
    if device.index >= count:
        hint = f"start at most {count} processes per node" if world > 1 else f"use cuda:0 to cuda:{count - 1}"
        raise RunError(f"--device: {device} does not exist, {count} CUDA device(s) visible; {hint}")
    return device


def check_parallel_flags(args: argparse.Namespace, world: int, device: torch.device) -> None:
    """The flags that need several processes or a GPU, refused where they cannot work; the step's
    default mode (CUDA without --fsdp: blocks compiled, the step captured; otherwise eager)."""
    if args.fsdp and world == 1:
        raise RunError("--fsdp shards the model over several processes: start it with torchrun --nproc_per_node=N "
                       "(N > 1), or leave --fsdp out")
    if args.cuda_graphs and device.type != "cuda":
        raise RunError(f"--cuda-graphs needs a CUDA device (this run is on {device}); leave it out or use --compile")
    if args.cuda_graphs and args.fsdp:
        # FSDP2 gathers each block's parameters every step at new addresses.
        raise RunError("--cuda-graphs and --fsdp: FSDP2's step cannot be captured; leave --cuda-graphs out (use --compile)")
    if args.dist_backend == "nccl" and device.type != "cuda":
        raise RunError(f"--dist-backend nccl needs CUDA devices (this run is on {device}); use gloo or leave it out")
    fastest = device.type == "cuda" and not args.fsdp and not args.eager  # measured: benchmarks/RESULTS.md
    if args.cuda_graphs is None:
        args.cuda_graphs = fastest
    if args.compile is None and fastest and not args.no_compile:
        args.compile = "inductor"


def init_distributed(device: torch.device, world: int, timeout_s: float, backend: str | None = None) -> bool:
    """Join torchrun's process group; True if this call created it (a caller may have already).

    The timeout bounds every collective: a rank whose peers are gone (a crash NCCL cannot see)
    stops after timeout_s instead of waiting for ever (gloo raises, NCCL's watchdog aborts).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1 or dist.is_initialized():
        return False
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    return True


def parallel_mode(args: argparse.Namespace, world: int) -> str:
    return "fsdp" if args.fsdp else "ddp" if world > 1 else "none"


def all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t


# ---- the run directory -------------------------------------------------------------------------
def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an --out this run cannot use (a file, not writable, another run's), writing nothing."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; choose another --out")
    parent = out
    while not parent.exists():  # the directory that --out would be created in
        parent = parent.parent
    if not parent.is_dir():
        raise RunError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {out}: {parent} is not writable; choose another --out")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume and CHECKPOINT not in existing:
        stopped = f" (it holds {', '.join(existing)}: that run stopped before its first checkpoint)" if existing else ""
        raise RunError(f"--resume: no checkpoint at {out / CHECKPOINT}{stopped}; run without --resume to start one")
    if not resume and not overwrite and existing:
        if CHECKPOINT in existing:
            raise RunError(f"{out / CHECKPOINT} exists; pass --resume to continue it, --overwrite to start again, "
                           "or choose another --out")
        raise RunError(f"--out {out} holds {', '.join(existing)} of another run and no checkpoint to resume; "
                       "pass --overwrite to replace them or choose another --out")


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at path, checked to be one of this script's; RunError otherwise."""
    try:
        # mmap: every rank reads the file, and the pages are shared instead of one copy per process.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupt, or not a torch file: torch raises many types
        raise RunError(f"{path} is not a readable checkpoint ({_first_line(e)}); it may be truncated or another "
                       "program's: start again with --overwrite or choose another --out") from None
    args = state.get("args") if isinstance(state, dict) else None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if isinstance(args, dict):
        args.setdefault("model_args", {})  # joined the checkpoint's args later: older runs had none
        if "positions" not in args:  # older runs: the position table, rotary only through --model-arg
            args["positions"] = "rotary" if args["model_args"].pop("rotary_emb", False) else "learned"
        if "light_window" not in args and isinstance(args.get("seq_len"), int):  # older runs: the routing window
            args["light_window"] = args["model_args"].pop("light_window_size", default_window(args["seq_len"], HEAVY_WINDOW))
        if isinstance(state.get("model"), dict):
            _keep_light_ff_width(args, state["model"])
        missing += [f"args.{k}" for k in (*FIXED_ON_RESUME, *DEFAULTS["cpu"]) if k not in args]
    if isinstance(state, dict) and not isinstance(state.get("world_size", 1), int):
        missing.append("a valid world_size")
    if missing or not isinstance(args, dict) or not isinstance(state["step"], int):
        raise RunError(f"{path} is not a checkpoint of this script (missing {', '.join(missing) or 'a valid args/step'}); "
                       "start again with --overwrite or choose another --out")
    return state


def _keep_light_ff_width(args: dict, model_state: dict) -> None:
    """The CoLT5 light feedforward was 1/2 dim before it became 2: a checkpoint of that width
    that does not name it resumes with it (as --model-arg light_ff_mult, fixed on resume)."""
    if args.get("dense") or "light_ff_mult" in args["model_args"] or not isinstance(args.get("dim"), int):
        return
    first = next((v for k, v in model_state.items() if k.endswith("layers.0.ff.light_ff.net.0.weight")), None)
    if isinstance(first, torch.Tensor) and first.dim() == 2 and first.shape[0] == max(1, args["dim"] // 2):
        args["model_args"]["light_ff_mult"] = 0.5


def read_metrics(path: Path, *, upto: int) -> list[dict]:
    """The records of metrics.jsonl up to step `upto` (the checkpoint's), to continue the file.

    Records are written before the checkpoint that follows them, so a last line torn by a crash is
    newer than the checkpoint: it is dropped with the other records after it. A bad line anywhere
    else is an error.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if i == len(lines) - 1:
                break  # torn by a crash mid-write
            raise RunError(f"{path} line {i + 1} is not a metrics record; delete that line and resume again")
        if record["step"] <= upto:
            records.append(record)
    return records


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_out_dir(out: Path, records: list[dict], *, overwrite: bool) -> None:
    """Create --out and start metrics.jsonl: the resumed run's records, or empty (rank 0, first write)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (CHECKPOINT, SUMMARY, PLOT):
                (out / name).unlink(missing_ok=True)
        write_atomic(out / METRICS, "".join(json.dumps(r) + "\n" for r in records))
    except OSError as e:
        raise RunError(f"--out {out} cannot be written ({e.strerror or e}); choose a writable --out") from None


def read_summary(out: Path) -> dict:
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


# ---- set-up ------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything the training loop, evaluation, checkpointing and the summary share."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    corpus: Corpus
    sampler: RandomWindowSampler
    model: nn.Module  # the language model (under --fsdp sharded in place: its parameters are DTensors)
    net: nn.Module  # what the loop calls: the model, or its DDP wrapper
    ddp: DistributedDataParallel | None  # None in one process, under FSDP and in the captured step
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out: Path | None
    owns_group: bool = False  # set_up created the process group, so main destroys it
    step: int = 0  # optimizer steps done; the model, optimizer and scheduler are at this step
    saved_step: int = -1  # the step of checkpoint.pt on disk, -1: none
    records: list[dict] = field(default_factory=list)
    unwritten: list[str] = field(default_factory=list)  # metrics lines not yet appended to the file
    pending: list[torch.Tensor] = field(default_factory=list)  # losses of the steps since the last flush
    bad_grads: torch.Tensor | None = None  # > 0 if a gradient norm since the last flush was not finite
    committed: dict = field(default_factory=dict)  # sampler and RNG state at `step`
    last_val: float | None = None
    train_time: float = 0.0  # seconds in training steps (not evaluation, sampling, checkpoints)
    train_steps: int = 0
    warmup: tuple[int, float] | None = None  # (train_steps, train_time) at this process' first flush
    plot_noted: bool = False
    captured: CapturedStep | None = None  # --cuda-graphs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> str:
        return parallel_mode(self.args, self.world)

    def log(self, *a, **k) -> None:
        if self.is_main:
            print(*a, **k)

    def tokens_per_s(self) -> float | None:
        """Training tokens/s after the first metrics flush that follows the warm-up (compilation,
        CUDA-graph capture, allocator warm-up), or over all steps when no later ones were timed."""
        steps, seconds = self.train_steps, self.train_time
        if self.warmup is not None and steps > self.warmup[0]:
            steps, seconds = steps - self.warmup[0], seconds - self.warmup[1]
        tokens_per_step = self.world * self.args.batch_size * self.args.grad_accum * self.args.seq_len
        return steps * tokens_per_step / seconds if seconds > 0 else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16")

    def eager(self):
        """Evaluation and sampling run the compiled blocks eagerly: no second compile for no-grad
        mode and for every context length while sampling; a few batches every --eval-every steps."""
        return torch.compiler.set_stance("force_eager") if self.args.compile else nullcontext()


def load_data(args: argparse.Namespace, rank: int, world: int) -> tuple[Corpus, RandomWindowSampler]:
    try:
        corpus = load_corpus(args.data)
        # Built here so a too-short corpus fails before any work (and with the flag's name).
        sampler = RandomWindowSampler(corpus.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                                      rank=rank, world_size=world)
        RandomWindowSampler(corpus.valid, seq_len=args.seq_len, batch_size=args.batch_size)
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    return corpus, sampler


def build_model(args: argparse.Namespace) -> CoLT5LanguageModel:
    """The seeded model, on the CPU: every rank builds the same one (FSDP2 moves each block's shard)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    try:
        return CoLT5LanguageModel(**model_config(args))
    except (TypeError, ValueError) as e:
        if not args.model_args:
            raise
        raise RunError(f"--model-arg {args.model_args}: the model refuses it ({_first_line(e)})") from None


def model_units(model: CoLT5LanguageModel) -> list[nn.Module]:
    """The modules the backbone calls once per layer: FSDP2's units and --compile's regions.

    The routed stack calls each block. DenseTransformer.forward calls each layer's attn and ff
    itself (it skips the layer's input check), so hooks or compilation on a dense layer would
    never run: there the units are the attn and ff modules.
    """
    if model.dense:
        return [sub for layer in model.backbone[0].layers for sub in (layer.attn, layer.ff)]
    return list(model.backbone.layers)


def distribute(model: CoLT5LanguageModel, args: argparse.Namespace, *, world: int,
               device: torch.device) -> tuple[nn.Module, DistributedDataParallel | None]:
    """Place, shard or replicate, and compile the model: (what the loop calls, the DDP wrapper or None).

    --fsdp shards `model` in place (its parameters become DTensors), so the optimizer is built
    after this. DDP keeps a gradient bucket per ~25 MB of parameters; gradient_as_bucket_view
    makes each .grad a view into its bucket, which drops the copy of every gradient into the
    bucket and back (and that memory). static_graph=True would spare find_unused_parameters' walk
    of the graph, but torch 2.13's reducer fails an internal assert when the first micro-step
    runs under no_sync, so it is left off.
    """
    units = model_units(model)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # FSDP2 warns when a unit returns a view (the routed blocks' CPU path returns index_add's
        # result viewed back to [b, n, d]): an in-place op on it would skip the unit's backward
        # all-gather. Nothing here modifies a block's output in place, and
        # tests/test_distributed.py checks FSDP's losses against one process'.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (world,))
        for unit in units:
            fully_shard(unit, mesh=mesh)  # moves the unit to the device, keeps 1/world of it
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, logits
    else:
        model.to(device)
    if args.compile:
        # Regional compilation: the blocks share one compiled graph, DDP's and FSDP2's hooks stay
        # outside it (a whole-model compile of DDP splits the graph at bucket boundaries).
        for unit in units:
            unit.compile(backend=args.compile)
    if world == 1 or args.fsdp:
        return model, None
    if args.cuda_graphs:
        # No DDP wrapper: the captured step sums the gradients itself (CapturedStep). Every
        # replica starts from rank 0's parameters, as DDP would make them.
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        return model, None
    # A context within one routing window gives the routers no gradient (the first window is
    # routed by position); only then must DDP look for unused parameters.
    one_window = not args.dense and args.seq_len <= model_config(args)["heavy_window_size"]
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=one_window, gradient_as_bucket_view=True)
    return ddp, ddp


def param_groups(model: nn.Module) -> list[tuple[float, list[tuple[str, nn.Parameter]]]]:
    """AdamW's groups as (weight decay, [(name, parameter)]): decay on matrices, none on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [(0.1, decay), (0.0, no_decay)]


def build_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device):
    groups = [{"params": [p for _, p in named], "weight_decay": wd} for wd, named in param_groups(model)]
    # fused on CUDA: one kernel per parameter group instead of one per op and group (foreach);
    # the step is bound by the host's cost per launch on the H200 host (benchmarks/RESULTS.md).
    # capturable: the captured step (CapturedStep) reads the learning rate from a device tensor.
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda" or None,
                                  capturable=bool(args.cuda_graphs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    return optimizer, scheduler


def named_optimizer_state(state: dict, model: nn.Module) -> dict:
    """An optimizer state keyed by parameter index (torch's Optimizer.state_dict, as this script
    wrote it before its checkpoints held get_state_dict's output) re-keyed by parameter name."""
    groups = state["param_groups"]
    if not all(isinstance(i, int) for group in groups for i in group["params"]):
        return state
    names = [name for _, named in param_groups(model) for name, _ in named]
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in groups]}


def this_runs_kernels(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state whose groups take this run's implementation flags (fused,
    capturable, foreach: they follow the device and the mode, not the run that saved it; loading
    also places the step counters by them)."""
    flags = {k: optimizer.param_groups[0][k] for k in ("fused", "capturable", "foreach") if k in optimizer.param_groups[0]}
    return {**state, "param_groups": [{**group, **flags} for group in state["param_groups"]]}


def restore(run: Run, checkpoint: dict, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict  # see full_state

    try:
        # The full state of one file into whatever the model is now: one process, DDP's replica
        # or FSDP2's shards (each rank keeps its part).
        set_state_dict(run.model, run.optimizer, model_state_dict=checkpoint["model"],
                       optim_state_dict=this_runs_kernels(named_optimizer_state(checkpoint["optimizer"], run.model), run.optimizer),
                       options=StateDictOptions(full_state_dict=True))
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        run.sampler.load_state_dict(checkpoint["sampler"])
        set_rng_state(checkpoint["rng"], run.device)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise RunError(f"{path} does not fit this script's model ({_first_line(e)}); start again with --overwrite "
                       "or choose another --out") from None
    run.step = run.saved_step = checkpoint["step"]


def finished_run(out: Path, checkpoint: dict, is_main: bool) -> dict:
    """--resume of a run that reached --steps: say so and change nothing."""
    summary = read_summary(out)
    val = summary.get("final_val_bpc")
    val_text = f", final val {val:.4f} bpc" if isinstance(val, (int, float)) else ""
    if is_main:
        print(f"{out} holds a finished run (step {checkpoint['step']} of {checkpoint['args']['steps']}{val_text}); nothing "
              "to resume. To train longer start a new run with a larger --steps (--steps is fixed on resume)")
    return summary


def set_up(argv: list[str] | None) -> Run | dict:
    """Arguments, device, run directory, checkpoint, data, distributed, model, optimizer.

    Every check that can refuse the run comes before the first write. Returns the saved summary
    instead of a Run when --resume finds a finished run.
    """
    args = parse_args(argv)
    rank, world, local_rank = distributed_env()
    device = resolve_device(args.device, world, local_rank)
    check_parallel_flags(args, world, device)
    out = Path(args.out) if args.out else None
    checkpoint = None
    if out is not None:
        check_out_dir(out, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        checkpoint = load_checkpoint(out / CHECKPOINT)
    saved_world = checkpoint.get("world_size", world) if checkpoint else world  # older checkpoints: as now
    args = fill_defaults(args, device, checkpoint["args"] if checkpoint else None, world=world, saved_world=saved_world)
    if checkpoint is not None and checkpoint["step"] >= args.steps:
        return finished_run(out, checkpoint, rank == 0)
    if checkpoint is not None and args.stop_at is not None and args.stop_at <= checkpoint["step"]:
        raise RunError(f"--stop-at {args.stop_at} is not after the checkpoint's step {checkpoint['step']}; "
                       "pass a later step or leave it out")
    records = read_metrics(out / METRICS, upto=checkpoint["step"]) if checkpoint else []
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.precision == "bf16" and device.type == "cpu":
        log("note: bf16 autocast on CPU is slow; --precision fp32 is the CPU default")

    corpus, sampler = load_data(args, rank, world)
    log(f"corpus: {corpus.describe()}")
    owns_group = init_distributed(device, world, args.dist_timeout, args.dist_backend)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    parallel = parallel_mode(args, world)
    overrides = "".join(f", {key}={value!r}" for key, value in args.model_args.items())
    log(f"model: {'dense' if args.dense else 'colt5'}, dim {args.dim}, depth {args.depth}, {args.positions} positions"
        f"{'' if args.dense else f', light window {args.light_window}'}{overrides}, {n_params / 1e6:.2f}M "
        f"parameters; device {device}, precision {args.precision}, world size {world}"
        f"{f' ({parallel})' if world > 1 else ''}{f', compiled ({args.compile})' if args.compile else ''}"
        f"{', the step captured in CUDA graphs' if args.cuda_graphs else ''}")
    log(f"batch: {world} x {args.batch_size} x {args.grad_accum} sequences of {args.seq_len} bytes per step, {args.steps} steps")
    net, ddp = distribute(model, args, world=world, device=device)
    optimizer, scheduler = build_optimizer(model, args, device)
    run = Run(args=args, rank=rank, world=world, device=device, corpus=corpus, sampler=sampler, model=model, net=net,
              ddp=ddp, optimizer=optimizer, scheduler=scheduler, out=out, owns_group=owns_group, records=records)
    if checkpoint is not None:
        restore(run, checkpoint, out / CHECKPOINT)
        resumed_from = f" (saved by {saved_world} process{'es' if saved_world > 1 else ''})" if saved_world != world else ""
        log(f"resumed from {out / CHECKPOINT} at step {run.step}{resumed_from}")
    run.committed = {"sampler": sampler.state_dict(), "rng": rng_state(device)}
    if args.cuda_graphs:
        run.captured = CapturedStep(run)
    if run.is_main and out is not None:
        prepare_out_dir(out, records, overwrite=args.overwrite)
    return run


# ---- the training loop -------------------------------------------------------------------------
def lr_lambda(warmup: int, steps: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine down to 10 %

    return f


class InterruptGuard:
    """Ctrl-C raises KeyboardInterrupt at once, except inside `update()`, where it waits for the end.

    So the model, optimizer and scheduler are always at a whole step when a KeyboardInterrupt
    lands, and the checkpoint saved then is a consistent one. With `always` (DDP) it only sets
    `pending`, which the next metrics flush all-reduces, so that every rank stops after the same
    step: a rank raising at once could leave the others waiting in a collective for ever. Only
    installed in the main thread when SIGINT has Python's default handler.
    """

    def __init__(self, *, always: bool = False) -> None:
        self.always = always
        self.deferring = self.pending = False
        self.previous = None

    @property
    def installed(self) -> bool:
        return self.previous is not None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if self.deferring or self.always:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def update(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending and not self.always:
            self.pending = False
            raise KeyboardInterrupt


def gradient_sync(run: Run, last: bool):
    """Reduce gradients over the ranks on the last micro-batch of a step only: one all-reduce
    (DDP) or reduce-scatter (FSDP2) per bucket or unit per step, however many micro-batches."""
    if run.ddp is not None and not last:
        return run.ddp.no_sync()
    if run.args.fsdp and run.args.grad_accum > 1:
        run.model.set_requires_gradient_sync(last)
    return nullcontext()


def load_batches(run: Run, out: torch.Tensor | None = None) -> torch.Tensor:
    """The step's micro-batches [grad_accum, b, seq_len + 1] on the device, copied into `out` (the
    captured step's static input) when given; no sync."""
    batches = torch.stack([run.sampler.next_batch() for _ in range(run.args.grad_accum)])
    if run.device.type == "cuda":
        batches = batches.pin_memory()  # from pageable memory a non_blocking copy is not asynchronous
    if out is None:
        return batches.to(run.device, non_blocking=True)
    return out.copy_(batches, non_blocking=True)


def forward_backward(run: Run, batches: torch.Tensor) -> torch.Tensor:
    """The step's micro-batches, gradients accumulated; returns the step's mean loss (no sync)."""
    accum = len(batches)
    step_loss = torch.zeros((), device=run.device)
    for micro, batch in enumerate(batches):
        with gradient_sync(run, micro == accum - 1):
            with run.autocast():
                logits = run.net(batch[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            (loss / accum).backward()
        step_loss += loss.detach() / accum
    return step_loss


def optimizer_step(run: Run) -> torch.Tensor:
    """Clip and step the optimizer; returns 1.0 if the gradient norm was not finite (no sync)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    if run.args.fsdp:  # a DTensor: the norm over every rank's shards, replicated
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    return (~torch.isfinite(grad_norm)).float()


def training_step(run: Run, guard: InterruptGuard) -> None:
    """One optimizer step, eager or captured, then the schedule's step on the host; its loss and
    non-finite flag join the pending ones (no sync). Ctrl-C waits for the parameters' update (an
    eager forward and backward may still be interrupted; a replay is the update)."""
    if run.captured is not None:
        with guard.update():
            loss, bad = run.captured(run)
            _commit_step(run, loss, bad)
        return
    loss = forward_backward(run, load_batches(run))
    with guard.update():
        bad = optimizer_step(run)
        run.optimizer.zero_grad(set_to_none=True)
        _commit_step(run, loss, bad)


def _commit_step(run: Run, loss: torch.Tensor, bad: torch.Tensor) -> None:
    run.scheduler.step()
    run.step += 1
    run.committed = {"sampler": run.sampler.state_dict(), "rng": rng_state(run.device)}
    run.bad_grads += bad
    run.pending.append(loss)


class CapturedStep:
    """The training step as CUDA graphs (--cuda-graphs, the default on CUDA without --fsdp).

    The first WARMUP steps run eagerly on a side stream (compilation, the optimizer's state, the
    first call of every kernel); the next one is captured and it and every later step replay it:
    the host copies the micro-batches into a static input and the learning rate into a device
    tensor, and replays write the loss and the non-finite flag to static outputs. Nothing in a
    step waits for the host, which is what lets it be captured; evaluation and sampling run
    eagerly in between.

    One process: one graph runs every forward and backward, the clipping and the optimizer; the
    gradients live in the graph's memory pool and each replay writes them afresh. Several
    processes: the first backward's gradients move into one flat buffer, and the step is two
    graphs around one collective: the first zeroes the buffer and runs the forward and backward
    passes, the host then sums the buffer over the ranks (queued behind the graph on the current
    stream, with NCCL no wait for the host), and the second divides it by the world size, clips
    and steps. The collective stays out of the graphs, so every backend works, gloo included.
    """

    WARMUP = 2

    def __init__(self, run: Run) -> None:
        a = run.args
        self.batches = torch.zeros((a.grad_accum, a.batch_size, a.seq_len + 1), dtype=torch.long, device=run.device)
        self.grads: torch.Tensor | None = None  # several processes: every .grad a view into it (flat_gradients)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.eager_steps = 0
        self.lrs: list[torch.Tensor] = []
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def warming_up(self) -> bool:
        return not self.graphs

    def __call__(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        load_batches(run, out=self.batches)
        if not self.graphs and self.eager_steps < self.WARMUP:
            side = torch.cuda.Stream(run.device)
            side.wait_stream(torch.cuda.current_stream(run.device))
            with torch.cuda.stream(side):
                loss = self._forward_backward(run)
                if run.world > 1 and self.grads is None:
                    self.grads = flat_gradients(run.model)
                self._sum_gradients()
                bad = self._update(run)
                if self.grads is None:
                    run.optimizer.zero_grad(set_to_none=True)  # the capture starts from no gradients
            torch.cuda.current_stream(run.device).wait_stream(side)
            self.eager_steps += 1
            return loss, bad
        if not self.graphs:
            self._capture(run)
        for group, lr in zip(run.optimizer.param_groups, self.lrs):
            if group["lr"] is not lr:  # a scheduler that assigns a number rather than filling the tensor
                lr.fill_(group["lr"])
                group["lr"] = lr
        self.graphs[0].replay()
        if len(self.graphs) > 1:
            self._sum_gradients()
            self.graphs[1].replay()
        loss, bad = self.outputs
        return loss.clone(), bad.clone()  # the next replay overwrites the static outputs

    def _forward_backward(self, run: Run) -> torch.Tensor:
        if self.grads is not None:
            self.grads.zero_()
        return forward_backward(run, self.batches)

    def _sum_gradients(self) -> None:
        if self.grads is not None:
            dist.all_reduce(self.grads)

    def _update(self, run: Run) -> torch.Tensor:
        if self.grads is not None:
            self.grads.div_(run.world)
        return optimizer_step(run)

    def _capture(self, run: Run) -> None:
        for group in run.optimizer.param_groups:
            self.lrs.append(torch.tensor(float(group["lr"]), device=run.device))
            group["lr"] = self.lrs[-1]
        first = torch.cuda.CUDAGraph()
        with torch.cuda.graph(first):  # records the kernels without running them
            loss = self._forward_backward(run)
            if self.grads is None:
                self.outputs = (loss, self._update(run))
        self.graphs = [first]
        if self.grads is not None:
            second = torch.cuda.CUDAGraph()
            with torch.cuda.graph(second, pool=first.pool()):
                self.outputs = (loss, self._update(run))
            self.graphs.append(second)


def flat_gradients(model: nn.Module) -> torch.Tensor:
    """The gradients a backward made, moved into one buffer (each .grad a view into it, later
    backwards accumulate there), so that one collective reduces them all. A parameter the
    backward did not reach (a context within one routing window leaves the routers without one)
    keeps no gradient, as in one process: AdamW skips it instead of decaying it. The step is the
    same every time and on every rank, so the same parameters are reached."""
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def emit(run: Run, record: dict) -> None:
    run.records.append(record)
    run.unwritten.append(json.dumps(record) + "\n")


def write_metrics(run: Run) -> None:
    """Append the unwritten records to metrics.jsonl in one write (rank 0)."""
    lines, run.unwritten = run.unwritten, []
    if run.is_main and run.out is not None and lines:
        with open(run.out / METRICS, "a") as f:
            f.write("".join(lines))


def diverged(run: Run, what: str) -> RunError:
    kept = f"the last good checkpoint (step {run.saved_step}) is kept" if run.saved_step >= 0 and run.out else "nothing was saved"
    return RunError(f"training diverged: {what}; {kept}. Start a new run with a lower --lr "
                    f"(now {run.args.lr:g}; it is fixed on resume)", code=1)


def flush_losses(run: Run, guard: InterruptGuard | None = None, *, reduce: bool = True) -> list[float]:
    """All-reduce the pending step losses (one sync) and emit them; stop on a non-finite one.

    A Ctrl-C that `guard` deferred on any rank raises KeyboardInterrupt on all, after the emits.
    reduce=False (a KeyboardInterrupt under DDP that did not come through the guard: the ranks are
    not in step for a collective) only checks this rank's losses, and emits nothing.
    """
    stop = torch.tensor(float(guard is not None and guard.pending), device=run.device)
    values = torch.stack([*run.pending, run.bad_grads, stop])
    values = (all_reduce_mean(values, run.world) if reduce else values).tolist()
    run.pending, run.bad_grads = [], torch.zeros((), device=run.device)
    losses, bad, stop = values[:-2], values[-2], values[-1]
    first = run.step - len(losses) + 1
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            write_metrics(run)
            raise diverged(run, f"train loss {value} at step {first + i}")
        if reduce:
            emit(run, {"step": first + i, "train_loss": value})
    if bad:
        write_metrics(run)
        raise diverged(run, f"non-finite gradient norm between steps {first} and {run.step}")
    if stop:
        raise KeyboardInterrupt
    return losses


def train(run: Run, guard: InterruptGuard) -> None:
    """Steps up to --steps (or --stop-at): evaluate, sample and checkpoint at their intervals."""
    from tqdm import tqdm

    args = run.args
    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    bar = tqdm(total=args.steps, initial=run.step, disable=not run.is_main or args.no_progress, dynamic_ncols=True, unit="step")
    if run.step == 0:
        run.last_val = evaluate(run)
        emit(run, {"step": 0, "val_bpc": run.last_val, "train_s": 0.0})
        write_metrics(run)
        bar.write(f"step 0: val {run.last_val:.4f} bpc") if run.is_main else None

    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.pending, run.bad_grads = [], torch.zeros((), device=run.device)
    profiler = start_profiler(run)
    t0 = time.perf_counter()
    run.model.train()
    while run.step < stop:
        warming = run.captured.warming_up if run.captured is not None else bool(args.compile) and run.train_steps == 0
        if warming:  # the first steps take seconds: say why
            doing = ["compiling"] * bool(args.compile) + ["capturing the step"] * (run.captured is not None)
            bar.set_description(f"warm-up ({', '.join(doing)})")
        training_step(run, guard)
        if warming and not (run.captured is not None and run.captured.warming_up):
            bar.set_description(None)
        run.train_steps += 1
        bar.update(1)

        step = run.step
        boundary = step % args.eval_every == 0 or step == stop
        sample_due = args.generate_every and step % args.generate_every == 0
        if step % args.log_every == 0 or boundary or sample_due:
            losses = flush_losses(run, guard)
            run.train_time += time.perf_counter() - t0
            if run.captured is None or not run.captured.warming_up:  # time the steps after the warm-up
                run.warmup = run.warmup or (run.train_steps, run.train_time)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{run.tokens_per_s():,.0f}")
            if boundary:
                val = evaluate(run)
                if not math.isfinite(val):
                    write_metrics(run)
                    raise diverged(run, f"validation {val} bpc at step {step}")
                run.last_val = val
                emit(run, {"step": step, "val_bpc": val, "train_s": round(run.train_time, 3)})
                bar.write(f"step {step}: train {losses[-1] / LOG2:.4f} bpc, val {val:.4f} bpc") if run.is_main else None
            write_metrics(run)
            if sample_due and (run.is_main or run.args.fsdp):  # FSDP: every rank's shards take part
                text = sample_text(run, step)
                bar.write(text) if run.is_main else None
            if boundary:
                checkpoint(run)
            t0 = time.perf_counter()
        if profiler is not None:
            profiler.step()  # after the step's flush, evaluation and checkpoint: they belong to it
    if profiler is not None:
        profiler.stop()
    bar.close()


def start_profiler(run: Run) -> torch.profiler.profile | None:
    """--profile N, rank 0 only: N training steps after PROFILE_SKIP + 1, host and (CUDA) device
    activity. The table of ops by self time goes to stdout; DIR/profile_rank0.json shows the
    timeline: host gaps, the gradients' all-reduces (nccl kernels on their own stream: DDP's per bucket
    during the backward, the captured step's one between its two graphs)."""
    if not (run.args.profile and run.is_main):
        return None
    cuda = run.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

    def report(prof: torch.profiler.profile) -> None:
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        run.log(f"profile of steps {run.step - run.args.profile + 1}-{run.step} (rank 0):\n"
                f"{prof.key_averages().table(sort_by=sort, row_limit=25)}")
        if run.out is not None:
            prof.export_chrome_trace(str(run.out / PROFILE))

    schedule = torch.profiler.schedule(skip_first=PROFILE_SKIP, wait=0, warmup=1, active=run.args.profile, repeat=1)
    profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=report)
    profiler.start()
    return profiler


def interrupted(run: Run | None, *, in_step: bool) -> SystemExit:
    """Ctrl-C: checkpoint the last finished step if checkpoint.pt is older, say how to go on; exit 130.

    in_step: every rank stops at this step (one process, or the guard's flush decided it), so a
    collective is safe; under FSDP the checkpoint is one (the gather), so it is skipped otherwise.
    """
    if run is None:
        print("interrupted before training started", file=sys.stderr)
        return SystemExit(130)
    saved = run.saved_step
    if run.out is not None and run.step > run.saved_step and (in_step or not run.args.fsdp):
        # A second Ctrl-C (or torchrun passing the first one on) must not tear the save.
        ignoring = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignoring else None
        try:
            if run.pending:
                flush_losses(run, reduce=run.world == 1)  # never checkpoint a diverged model
            write_metrics(run)
            checkpoint(run)
        finally:
            if ignoring:
                signal.signal(signal.SIGINT, previous)
    if run.is_main:
        if run.out is None:
            line = f"interrupted at step {run.step}; nothing saved (no --out)"
        elif run.saved_step < 0:
            line = f"interrupted before the first step finished; nothing to resume in {run.out} (start again with --overwrite)"
        else:
            what = "saved" if run.saved_step > saved else "kept"
            line = (f"interrupted at step {run.step}; checkpoint {what} at step {run.saved_step}: continue with "
                    f"`python {os.path.relpath(__file__)} --out {run.out} --resume`")
        print(line, file=sys.stderr)
    return SystemExit(130)


# ---- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation bits per byte over eval_batches fixed random windows (all ranks)."""
    args = run.args
    sampler = RandomWindowSampler(run.corpus.valid, seq_len=args.seq_len, batch_size=args.batch_size, seed=EVAL_SEED,
                                  rank=run.rank, world_size=run.world)
    was_training = run.model.training
    run.model.eval()
    total = torch.zeros((), device=run.device, dtype=torch.float64)
    for i in range(args.eval_batches):
        batch = sampler.batch_at(i).to(run.device)
        with run.autocast(), run.eager():
            logits = run.model(batch[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).double()
    run.model.train(was_training)
    return all_reduce_mean(total / args.eval_batches, run.world).item() / LOG2


@contextmanager
def whole_model(run: Run):
    """For generate, which calls the model's inner method rather than forward: FSDP2's root hooks
    (that gather the embeddings and logits) do not run, so gather them here (the blocks gather
    themselves)."""
    if run.args.fsdp:
        run.model.unshard()
    try:
        yield
    finally:
        if run.args.fsdp:
            run.model.reshard()


def sample_text(run: Run, step: int) -> str:
    args, valid, device = run.args, run.corpus.valid, run.device
    g = torch.Generator().manual_seed(args.seed * 7919 + step)
    prime_len = max(1, min(128, args.seq_len // 2))
    start = int(torch.randint(0, valid.numel() - prime_len, (1,), generator=g))
    prime = valid[start : start + prime_len].long().to(device)
    gen_device = torch.Generator(device=device).manual_seed(args.seed * 7919 + step)
    with run.autocast(), run.eager(), whole_model(run):
        # CUDA graphs of the decode steps (generate's default on CUDA) need parameters that stay
        # put: FSDP's gathered ones do not.
        out = run.model.generate(prime, length=args.generate_length, temperature=1.0, top_k=None, generator=gen_device,
                                 cuda_graph=False if args.fsdp else None)
    decode = lambda t: bytes(t.tolist()).decode("utf-8", errors="replace")  # noqa: E731
    return f"--- sample at step {step} ---\n[prompt] {decode(prime)}\n[model] {decode(out.cpu())}\n---"


# ---- checkpointing -----------------------------------------------------------------------------
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


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, fsync, then rename: a crash never leaves a torn checkpoint.pt."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def full_state(run: Run) -> tuple[dict, dict]:
    """The model's and optimizer's full (unsharded) state, keyed by parameter name, on rank 0's CPU
    (other ranks get empty dicts). Under FSDP a collective: every rank calls it."""
    # Imported where used: torch.distributed.checkpoint costs ~0.7 s of start-up (this CPU).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(run.model, run.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def checkpoint(run: Run) -> None:
    """Save the run at its current step and redraw the loss curve (rank 0 writes, with --out).

    One file whatever the run's mode: it resumes in one process, under DDP or under FSDP.
    """
    if run.out is None:
        run.saved_step = run.step
        return
    if run.args.fsdp or run.is_main:
        model_state, optimizer_state = full_state(run)
    if not run.is_main:
        run.saved_step = run.step
        return
    path = run.out / CHECKPOINT
    # The captured step's learning rates are float32 device tensors: stored as the schedule's
    # numbers, as in every mode.
    sched = run.scheduler
    lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
    optimizer_state["param_groups"] = [{**g, "lr": lr} for g, lr in zip(optimizer_state["param_groups"], lrs)]
    scheduler_state = {**sched.state_dict(), "_last_lr": lrs}
    try:
        save_checkpoint(path, dict(
            model=model_state, optimizer=optimizer_state, scheduler=scheduler_state,
            sampler=run.committed["sampler"], rng=run.committed["rng"], step=run.step, args=vars(run.args),
            world_size=run.world,
        ))
    except OSError as e:
        kept = (f"the checkpoint of step {run.saved_step} is kept: free space or fix --out, then --resume"
                if run.saved_step >= 0 else "no checkpoint was saved: free space or fix --out, then start again")
        raise RunError(f"cannot write {path} at step {run.step} ({_first_line(e)}); {kept}", code=1) from None
    run.saved_step = run.step
    note = plot_losses(run.out, run.records)
    if note and not run.plot_noted:
        run.log(f"note: {note}")
        run.plot_noted = True


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
    tmp = out / (PLOT + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, out / PLOT)
    plt.close(fig)
    return None


# ---- summary -----------------------------------------------------------------------------------
def summarize(run: Run, wall_start: float) -> dict:
    """summary.json (rank 0, with --out) and the SUMMARY line; returns the summary on every rank."""
    args, device = run.args, run.device
    kind = "dense" if args.dense else "colt5"
    n_params = sum(p.numel() for p in run.model.parameters())
    summary = {
        "model": kind, "positions": args.positions, "params": n_params,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "world_size": run.world, "parallel": run.parallel, "compile": args.compile, "cuda_graphs": args.cuda_graphs,
        "precision": args.precision, "seq_len": args.seq_len, "step": run.step,
        "tokens_per_step": run.world * args.batch_size * args.grad_accum * args.seq_len,
        "train_tokens_per_s": run.tokens_per_s(),
        "warmup_s": run.warmup[1] if run.warmup else None,  # the first --log-every steps: compiling, capturing
        "final_val_bpc": run.last_val,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "wall_s": time.perf_counter() - wall_start, "corpus": run.corpus.name, "corpus_bytes": run.corpus.num_bytes,
    }
    if run.is_main:
        if run.out is not None:
            write_atomic(run.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        print(
            f"SUMMARY model={kind} params={n_params / 1e6:.2f}M device={summary['device']} x{run.world} "
            f"parallel={run.parallel} precision={args.precision} seq_len={args.seq_len} steps={run.step} "
            f"tokens/s={fmt(summary['train_tokens_per_s'], ',.0f')} warmup={fmt(summary['warmup_s'], '.1f')}s "
            f"val_bpc={fmt(run.last_val, '.4f')} "
            f"peak_mem_gib={fmt(summary['peak_mem_gib'], '.2f')} wall={summary['wall_s']:.1f}s"
        )
    return summary


# ---- main --------------------------------------------------------------------------------------
def leave_job(code: int) -> NoReturn:
    """End this rank of a distributed run that failed, at once: no collective and no process-group
    teardown, either of which could wait for ever on a rank that is gone. The other ranks stop
    when their next collective fails (gloo sees the closed socket), when torchrun stops them, or
    after --dist-timeout (NCCL's watchdog)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> dict:
    """Run training; returns the summary dict (rank 0; other ranks return it too, unprinted).

    Exit codes (SystemExit): 2 a mistake the user can fix (one line on stderr, nothing written),
    1 the loss diverged or a rank failed, 130 interrupted (Ctrl-C; the last finished step is
    checkpointed). On several processes a rank that fails leaves at once, without waiting for the
    others: a RunError with its line and code, any other exception with its traceback, a last line
    "[rank R] error: in step S: ..." and code 1 (this ends the process even when the caller of
    main made the process group).
    """
    wall_start = time.perf_counter()
    rank, world, _ = distributed_env()
    prefix = f"[rank {rank}] " if world > 1 else ""
    run = guard = None
    try:
        try:
            run = set_up(argv)
            if isinstance(run, dict):  # --resume of a finished run
                return run
            with InterruptGuard(always=run.world > 1) as guard:
                train(run, guard)
            summary = summarize(run, wall_start)
        except KeyboardInterrupt:
            # Under DDP/FSDP the guard turns Ctrl-C into a KeyboardInterrupt on every rank after
            # the same step; without it (not the main thread) the ranks are not in step.
            raise interrupted(run, in_step=run is None or run.world == 1 or (guard is not None and guard.installed)) from None
    except RunError as e:
        print(f"{prefix}error: {e.message}", file=sys.stderr)
        if world > 1 and dist.is_initialized():
            leave_job(e.code)  # raised on this rank alone, perhaps: the others may be in a collective
        raise
    except SystemExit:  # interrupted (exit 130): nothing is left to wait for
        if isinstance(run, Run) and run.owns_group:
            dist.destroy_process_group()
        raise
    except Exception as e:
        if world == 1:
            raise
        traceback.print_exc()
        where = "in set-up" if run is None else f"in step {run.step + 1}"
        print(f"{prefix}error: {where}: {_first_line(e, 300)} (traceback above); this rank stops. If another rank "
              "failed first, its error is the cause", file=sys.stderr)
        leave_job(1)
    end_distributed(run)
    return summary


def end_distributed(run: Run | None) -> None:
    """The orderly end of a distributed run (all ranks here): wait for rank 0's last writes."""
    if run is None or run.world == 1:
        return
    dist.barrier()
    if run.owns_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
