"""Runs of examples/train_enwik8.py for the benchmarks that train (train, lm_quality, lm_defaults)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_enwik8.py"


def example_command(out: Path | str, *, seq: int, steps: int, eval_every: int, flags: list[str] = (),
                    device: str | None = None) -> list[str]:
    """The command of one run into `out` (replaced if it holds a run): no sampling, no progress bar."""
    cmd = [sys.executable, str(SCRIPT), "--seq-len", str(seq), "--steps", str(steps), "--eval-every", str(eval_every),
           "--generate-every", "0", "--no-progress", "--out", str(out), "--overwrite", *flags]
    return cmd + (["--device", device] if device else [])


def load_example():
    """examples/train_enwik8.py as a module (registered first: its dataclasses look themselves up)."""
    loaded = sys.modules.get("train_enwik8")
    if loaded is not None and getattr(loaded, "__file__", None) == str(SCRIPT):
        return loaded
    spec = importlib.util.spec_from_file_location("train_enwik8", SCRIPT)
    module = sys.modules["train_enwik8"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the benchmark's own arguments, those after `--`, which go to every run)."""
    return (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])


def evaluations(out: Path) -> list[dict]:
    """The run's validation records (step, val_bpc, train_s), oldest first; [] if none."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, filter(str.strip, path.read_text().splitlines())) if "val_bpc" in r]
