"""The benchmarks built on the training example's runs, end to end on the CPU, tiny: lm_quality
(both models calibrated, trained for the budget, compared at the steps both reached),
lm_defaults (variants from the same start) and branch_ablation (a run without its heavy
branches)."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path):
    """A benchmark script as a module, importing its folder's modules (example_runs) as when run
    as a script; the folder leaves sys.path again (benchmarks/local_attention.py would shadow the
    local-attention package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_equal_budgets_and_the_table(tmp_path, capsys):
    from test_train_enwik8 import synthetic_text

    data = tmp_path / "corpus.txt"
    data.write_bytes(synthetic_text(20_000))
    quality = load(ROOT / "benchmarks" / "lm_quality.py")
    quality.main(["--device", "cpu", "--seqs", "32", "--minutes", "0.02", "--calibrate", "12", "--out", str(tmp_path / "q"),
                  "--", "--data", str(data), "--dim", "16", "--depth", "1", "--batch-size", "2", "--eval-batches", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["colt5", "dense"]
    for model in ("colt5", "dense"):
        summary = json.loads((tmp_path / "q" / f"32-{model}" / "summary.json").read_text())
        curve = quality.validation(tmp_path / "q" / f"32-{model}")
        # evaluated at the end; at least the script's floor of 10 steps (how many more depends on
        # the machine's speed: a loaded one makes fewer than the 12 of the calibration in 1.2 s)
        assert curve and curve[-1][0] == summary["step"] >= 10
        assert all(t1 > t0 for (_, t0, _), (_, t1, _) in zip(curve, curve[1:]))  # training seconds grow


def test_equal_steps_interpolate_between_evaluations():
    quality = load(ROOT / "benchmarks" / "lm_quality.py")
    curve = [(0, 0.0, 8.0), (100, 10.0, 2.0), (200, 20.0, 1.0)]  # (step, seconds, bpc)
    assert quality.at_step(curve, 150) == pytest.approx(1.5)
    assert quality.at_step(curve, 100) == 2.0 and quality.at_step(curve, 200) == 1.0
    assert quality.at_step(curve, 201) is None and quality.at_step([(5, 1.0, 3.0)], 5) == 3.0
    assert quality.at_step([*curve, (200, 21.0, 1.5)], 200) == 1.5 and quality.at_step([], 1) is None


TINY_RUN = ["--dim", "16", "--depth", "1", "--batch-size", "2", "--eval-batches", "1"]


def test_one_model_per_call_then_the_report(tmp_path, capsys):
    from test_train_enwik8 import synthetic_text

    data = tmp_path / "corpus.txt"
    data.write_bytes(synthetic_text(20_000))
    quality = load(ROOT / "benchmarks" / "lm_quality.py")
    common = ["--device", "cpu", "--seqs", "32", "--minutes", "0.01", "--calibrate", "11", "--out", str(tmp_path / "q")]
    quality.main([*common, "--models", "dense", "--", "--data", str(data), *TINY_RUN])
    assert "the table: --report" in capsys.readouterr().out  # colt5 has not trained yet
    quality.main([*common, "--models", "colt5", "--", "--data", str(data), *TINY_RUN])
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32 |")]
    quality.main([*common, "--report"])
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32 |")] == trained
    assert [row.split("|")[2].strip() for row in trained] == ["colt5", "dense"]


def test_defaults_variants_train_from_the_same_start(tmp_path, capsys, monkeypatch):
    from test_train_enwik8 import synthetic_text

    data = tmp_path / "corpus.txt"
    data.write_bytes(synthetic_text(20_000))
    defaults = load(ROOT / "benchmarks" / "lm_defaults.py")
    learned = "learned positions, lr 6e-4, 2x routed tokens"
    defaults.main(["--device", "cpu", "--seq", "256", "--steps", "6", "--variants", "default", "lr 6e-4", learned,
                   "--out", str(tmp_path / "d"), "--", "--data", str(data), *TINY_RUN])
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert {"default", "lr 6e-4", learned} <= set(rows)
    runs = {name: tmp_path / "d" / defaults.run_dir_name(name) for name in ("default", "lr 6e-4", learned)}
    start = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for name, run in runs.items()}
    start = {name: next(r["val_bpc"] for r in rows if r["step"] == 0 and "val_bpc" in r) for name, rows in start.items()}
    assert start["default"] == start["lr 6e-4"]  # one seed: the same model and batches; only the schedule differs
    checkpoints = {name: torch.load(run / "checkpoint.pt", weights_only=True)["args"] for name, run in runs.items()}
    assert checkpoints["lr 6e-4"]["lr"] == 6e-4 and checkpoints["default"]["lr"] != 6e-4
    routed = checkpoints[learned]
    assert routed["model_args"]["num_heavy_ff_tokens"] == 16 and routed["positions"] == "learned"
    assert checkpoints["default"]["positions"] == "rotary"
    finals = {name: defaults.final_validation(run) for name, run in runs.items()}
    assert all(step == 6 for step, _ in finals.values()) and finals["lr 6e-4"][1] != finals["default"][1]

    # --reuse keeps the finished runs and trains only the missing variant
    before = {name: (run / "metrics.jsonl").stat().st_mtime_ns for name, run in runs.items()}
    defaults.main(["--device", "cpu", "--seq", "256", "--steps", "6", "--variants", "default", "lr 6e-4", "lr 3e-4",
                   "--reuse", "--out", str(tmp_path / "d"), "--", "--data", str(data), *TINY_RUN])
    out = capsys.readouterr().out
    assert "default: kept" in out and "lr 6e-4: kept" in out and "lr 3e-4: kept" not in out
    assert {name: (run / "metrics.jsonl").stat().st_mtime_ns for name, run in runs.items()} == before
    assert defaults.final_validation(tmp_path / "d" / defaults.run_dir_name("lr 3e-4"))[0] == 6
    # ... but not a run that another command made (other steps, flags after --)
    reuse = ["--device", "cpu", "--seq", "256", "--steps", "6", "--variants", "default", "--reuse",
             "--out", str(tmp_path / "d"), "--", "--data", str(data), *TINY_RUN, "--lr", "5e-4"]
    defaults.main(reuse)
    assert "kept" not in capsys.readouterr().out
    assert torch.load(runs["default"] / "checkpoint.pt", weights_only=True)["args"]["lr"] == 5e-4
    defaults.main(reuse)
    assert "default: kept" in capsys.readouterr().out
    # ... nor a run of another version of the example, whose defaults may differ
    edited = tmp_path / "train_enwik8.py"
    edited.write_text(defaults.SCRIPT.read_text() + "\n# another version\n")
    monkeypatch.setattr(defaults, "SCRIPT", edited)
    defaults.main(reuse)
    assert "kept" not in capsys.readouterr().out


def test_branch_ablation_of_a_run(tmp_path, capsys):
    from test_train_enwik8 import synthetic_text

    data = tmp_path / "corpus.txt"
    data.write_bytes(synthetic_text(20_000))
    ablation = load(ROOT / "benchmarks" / "branch_ablation.py")
    example_runs = load(ROOT / "benchmarks" / "example_runs.py")
    out = tmp_path / "run"
    flags = ["--data", str(data), *TINY_RUN, "--eval-batches", "2"]
    subprocess.run(example_runs.example_command(out, seq=64, steps=8, eval_every=8, device="cpu", flags=flags),
                   check=True)
    rows = dict(ablation.main([str(out), "--device", "cpu"]))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == list(rows)
    # the run's own evaluation of the same windows, and each removal changes the model
    assert abs(rows["as trained"] - json.loads((out / "summary.json").read_text())["final_val_bpc"]) < 1e-6
    assert len(set(rows.values())) == 4
    # each removal zeroes that branch's output projection and nothing else
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model = ablation.load_example().build_model(argparse.Namespace(**state["args"]))
    model.load_state_dict(state["model"])
    heavy = {"attn.heavy.to_out.weight", "ff.heavy_ff.net.2.weight", "ff.heavy_ff.net.2.bias"}
    for attention, feedforward in ((True, False), (False, True), (True, True)):
        removed = ablation.without(model, attention=attention, feedforward=feedforward).state_dict()
        zeroed = {k.split("layers.0.")[-1] for k, v in removed.items() if not torch.equal(v, model.state_dict()[k])}
        assert zeroed == {k for k in heavy if k.startswith("attn") and attention or k.startswith("ff") and feedforward}
        assert all(not removed[f"backbone.layers.0.{k}"].any() for k in zeroed)

    dense = tmp_path / "dense"
    subprocess.run(example_runs.example_command(dense, seq=64, steps=1, eval_every=1, device="cpu",
                                                flags=["--data", str(data), *TINY_RUN, "--dense"]), check=True)
    with pytest.raises(SystemExit):
        ablation.main([str(dense)])
    assert "no heavy branches" in capsys.readouterr().err
