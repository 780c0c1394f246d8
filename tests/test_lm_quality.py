"""benchmarks/lm_quality.py end to end on the CPU, tiny: both models calibrated, trained for the
budget, and compared at the steps both reached."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
        assert curve and curve[-1][0] == summary["step"] > 12  # trained past the calibration, evaluated at the end
        assert all(t1 > t0 for (_, t0, _), (_, t1, _) in zip(curve, curve[1:]))  # training seconds grow
