"""colt5.data (corpora, split, sampler) and examples/train_enwik8.py end to end, resume, DDP."""

import gzip
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from colt5.data import (
    ENWIK8_BYTES,
    RandomWindowSampler,
    default_corpus_files,
    load_corpus,
    load_default_corpus,
    load_enwik8,
    split_corpus,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_enwik8.py"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy machine's OpenMP stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script():
    spec = importlib.util.spec_from_file_location("train_enwik8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_text(n_bytes: int, seed: int = 0) -> bytes:
    """Word soup from a small vocabulary: learnable structure, so the loss visibly falls."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "and", "a", "dog", "ran", "to", "its", "home", "<page>", "\n"]
    out = bytearray()
    while len(out) < n_bytes:
        out += (rng.choice(words) + " ").encode()
    return bytes(out[:n_bytes])


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(synthetic_text(40_000))
    return path


# ---- data ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [100, 1000, 12_345])
def test_split_is_90_5_5_in_order(n):
    data = bytes(random.Random(n).randrange(256) for _ in range(n))
    c = split_corpus(data, name="x")
    assert (c.train.numel(), c.valid.numel()) == (n * 90 // 100, n * 5 // 100)
    assert c.num_bytes == n
    assert bytes(torch.cat([c.train, c.valid, c.test]).tolist()) == data


def test_enwik8_size_gives_standard_split():
    c = split_corpus(torch.zeros(ENWIK8_BYTES, dtype=torch.uint8), name="enwik8")
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (90_000_000, 5_000_000, 5_000_000)


def test_raw_gz_zip_read_the_same(tmp_path):
    data = synthetic_text(3000, seed=1)
    raw = tmp_path / "enwik8"
    raw.write_bytes(data)
    gz = tmp_path / "enwik8.gz"
    gz.write_bytes(gzip.compress(data))
    zipped = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README", "not this one")
        zf.writestr("enwik8", data)
    single = tmp_path / "other.zip"
    with zipfile.ZipFile(single, "w") as zf:
        zf.writestr("somename.txt", data)
    expected = load_enwik8(raw)
    for path in (gz, zipped, single):
        c = load_corpus(path)
        for split in ("train", "valid", "test"):
            assert torch.equal(getattr(c, split), getattr(expected, split)), (path, split)


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_enwik8(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a regular file"):
        load_enwik8(tmp_path)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(ValueError, match="could not read"):
        load_enwik8(bad_gz)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        zf.writestr("a", "1")
        zf.writestr("b", "2")
    with pytest.raises(ValueError, match="none is named 'enwik8'"):
        load_enwik8(many)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_enwik8(empty)
    short = split_corpus(b"x" * 100, name="short")
    with pytest.raises(ValueError, match="too short for seq_len=90"):
        RandomWindowSampler(short.train, seq_len=90, batch_size=1)


def test_default_corpus_loads_deterministically():
    files = default_corpus_files()
    rel = [f.relative_to(sysconfig.get_paths()["stdlib"]).as_posix() for f in files]
    assert len(files) > 100 and rel == sorted(rel)
    assert not any({"site-packages", "test", "tests"} & set(r.split("/")) for r in rel)
    a = load_default_corpus()
    assert a.num_bytes > 1_000_000 and "stdlib" in a.name
    assert a.valid.numel() == a.num_bytes * 5 // 100
    b = load_corpus(None)
    assert torch.equal(a.train[-1000:], b.train[-1000:]) and torch.equal(a.test, b.test)


def test_sampler_windows_determinism_sharding_and_resume():
    data = torch.arange(5000) % 251  # consecutive values: a contiguous window increases by 1 mod 251
    data = data.to(torch.uint8)
    s = RandomWindowSampler(data, seq_len=16, batch_size=6, seed=3)
    batches = [s.next_batch() for _ in range(4)]
    for batch in batches:
        assert batch.shape == (6, 17) and batch.dtype == torch.long
        assert ((batch[:, 1:] - batch[:, :-1]) % 251 == 1).all()
    assert not torch.equal(batches[0], batches[1])
    # Resume: a fresh sampler with the saved state continues identically.
    state = s.state_dict()
    s2 = RandomWindowSampler(data, seq_len=16, batch_size=6, seed=3)
    s2.load_state_dict(state)
    assert torch.equal(s.next_batch(), s2.next_batch())
    # Sharding: ranks' slices of a step make up the single-process global batch.
    ranks = [RandomWindowSampler(data, seq_len=16, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([r.batch_at(0) for r in ranks]), batches[0])
    with pytest.raises(ValueError, match="rank"):
        RandomWindowSampler(data, seq_len=4, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        RandomWindowSampler(data, seq_len=4, batch_size=1, seed=4).load_state_dict(state)


# ---- training script ----------------------------------------------------------------------------
TINY = ["--dense", "--seq-len", "32", "--batch-size", "4", "--dim", "32", "--depth", "2", "--eval-batches", "2",
        "--generate-length", "16", "--no-progress", "--log-every", "1", "--device", "cpu", "--lr", "3e-3"]


def read_metrics(out: Path):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["train_loss"] for r in lines if "train_loss" in r}
    val = {r["step"]: r["val_bpc"] for r in lines if "val_bpc" in r}
    return train, val


def test_script_end_to_end(tmp_path, text_file, capsys):
    script = load_script()
    out = tmp_path / "run"
    summary = script.main(["--data", str(text_file), "--steps", "30", "--eval-every", "10", "--generate-every", "15",
                           "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert "corpus: file" in printed and "40,000 bytes" in printed
    assert "--- sample at step 15 ---" in printed and "--- sample at step 30 ---" in printed
    assert printed.strip().splitlines()[-1].startswith("SUMMARY model=dense")
    train, val = read_metrics(out)
    assert sorted(train) == list(range(1, 31)) and sorted(val) == [0, 10, 20, 30]
    assert val[30] < val[0] - 1.0, f"validation bpc did not fall: {val}"
    assert (out / "checkpoint.pt").exists() and json.loads((out / "summary.json").read_text())["step"] == 30
    assert summary["final_val_bpc"] == val[30] and summary["train_tokens_per_s"] > 0
    assert importlib.util.find_spec("matplotlib") is None or (out / "loss_curve.png").exists()
    # An existing run directory is not overwritten without --resume.
    with pytest.raises(SystemExit):
        script.main(["--data", str(text_file), "--steps", "2", "--out", str(out), *TINY])


@pytest.mark.parametrize("backbone", ["dense", "routed"])
def test_resume_gives_the_same_losses(tmp_path, text_file, backbone):
    script = load_script()
    tiny = TINY if backbone == "dense" else TINY[1:]
    common = ["--data", str(text_file), "--steps", "16", "--eval-every", "5", "--generate-every", "0", *tiny]
    script.main([*common, "--out", str(tmp_path / "straight")])
    script.main([*common, "--out", str(tmp_path / "stopped"), "--stop-at", "7"])
    _, val_stopped = read_metrics(tmp_path / "stopped")
    assert 7 in val_stopped and 8 not in val_stopped
    # The resumed run takes model, data and schedule settings from the checkpoint.
    script.main(["--out", str(tmp_path / "stopped"), "--resume", "--no-progress", "--generate-every", "0", "--log-every", "1"])
    train_a, val_a = read_metrics(tmp_path / "straight")
    train_b, val_b = read_metrics(tmp_path / "stopped")
    assert sorted(train_b) == list(range(1, 17))
    for step in train_a:
        assert abs(train_a[step] - train_b[step]) <= 1e-6, (step, train_a[step], train_b[step])
    assert abs(val_a[15] - val_b[15]) <= 1e-6 and abs(val_a[16] - val_b[16]) <= 1e-6
    # Changing what defines the run on resume is refused.
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path / "stopped"), "--resume", "--dim", "64"])


def test_script_routed_default_model(tmp_path, text_file, capsys):
    """The default (CoLT5) model trains, evaluates and samples through the script."""
    summary = load_script().main(["--data", str(text_file), "--steps", "4", "--eval-every", "2", "--generate-every", "4",
                                  *TINY[1:]])
    printed = capsys.readouterr().out
    assert "model: colt5" in printed and "--- sample at step 4 ---" in printed
    assert summary["model"] == "colt5" and math.isfinite(summary["final_val_bpc"])


def test_script_errors(tmp_path, text_file):
    script = load_script()
    with pytest.raises(SystemExit, match="does not exist"):
        script.main(["--data", str(tmp_path / "missing.zip"), "--steps", "1", *TINY])
    with pytest.raises(SystemExit, match="too short for seq_len"):
        script.main(["--data", str(text_file), "--steps", "1", *TINY, "--seq-len", "5000"])
    with pytest.raises(SystemExit):
        script.main(["--resume", "--steps", "1", *TINY])  # --resume needs --out
    with pytest.raises(SystemExit):
        script.main(["--steps", "0", *TINY])


def test_ddp_two_processes_gloo_match_single_process(tmp_path, text_file):
    """2 ranks x batch 2 (gloo, CPU) give the losses of 1 process x batch 4: same global windows.

    Uses the default (routed CoLT5) model: its parameters must all get gradients under DDP.
    """
    if shutil.which("torchrun") is None and importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun not available")
    common = ["--data", str(text_file), "--steps", "6", "--eval-every", "3", "--generate-every", "3",
              "--seq-len", "32", "--dim", "32", "--depth", "2", "--eval-batches", "2", "--generate-length", "8",
              "--no-progress", "--log-every", "1", "--device", "cpu", "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints: one summary line, one sample per sampling step.
    assert proc.stdout.count("SUMMARY") == 1 and proc.stdout.count("--- sample at step 3 ---") == 1
    assert "x2" in proc.stdout
    load_script().main([*common, "--batch-size", "4", "--out", str(tmp_path / "single")])
    train_ddp, val_ddp = read_metrics(tmp_path / "ddp")
    train_one, val_one = read_metrics(tmp_path / "single")
    assert sorted(train_ddp) == list(range(1, 7))
    for step in train_one:
        assert abs(train_ddp[step] - train_one[step]) <= 1e-4, (step, train_ddp[step], train_one[step])
    for step in val_one:
        assert abs(val_ddp[step] - val_one[step]) <= 1e-4, (step, val_ddp[step], val_one[step])
