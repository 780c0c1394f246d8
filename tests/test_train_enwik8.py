"""examples/train_enwik8.py end to end in one process: training, exact resume, and every way a run could be lost.

Several processes (DDP, FSDP2, a failing rank) are in test_distributed.py; the data tests (split
rule, default corpus, sampler) in test_data.py.
"""

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_enwik8.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def load_script():
    spec = importlib.util.spec_from_file_location("train_enwik8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as importlib's recipe does: dataclasses look their module up there
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


TINY = ["--dense", "--seq-len", "32", "--batch-size", "4", "--dim", "32", "--depth", "2", "--eval-batches", "2",
        "--generate-length", "16", "--no-progress", "--log-every", "1", "--device", "cpu", "--lr", "3e-3"]
# Smaller still, for the tests of refusals and failures: a run of a few steps in well under a second.
MINI = ["--dense", "--seq-len", "32", "--batch-size", "2", "--dim", "16", "--depth", "1", "--eval-batches", "1",
        "--generate-every", "0", "--no-progress", "--log-every", "1", "--device", "cpu"]


def read_metrics(out: Path):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["train_loss"] for r in lines if "train_loss" in r}
    val = {r["step"]: r["val_bpc"] for r in lines if "val_bpc" in r}
    return train, val


def snapshot(path: Path) -> dict:
    """Every file under path (or path itself) -> its bytes; {} when nothing is there."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def refused(script, argv, capsys, *, code=2, match=""):
    """main(argv) must exit with `code` after one stderr line "error: ..." matching `match`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == code, (info.value.code, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert match.lower() in err.lower(), err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step MINI run (checkpoint at steps 2 and 4) to copy from."""
    base = tmp_path_factory.mktemp("finished")
    data = base / "corpus.txt"
    data.write_bytes(synthetic_text(20_000, seed=2))
    load_script().main(["--data", str(data), "--steps", "4", "--eval-every", "2", *MINI, "--out", str(base / "run")])
    return base / "run", data


# ---- training and resuming ------------------------------------------------------------------------
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
    assert sorted(p.name for p in out.iterdir()) == sorted({"checkpoint.pt", "metrics.jsonl", "summary.json"}
                                                           | ({"loss_curve.png"} if (out / "loss_curve.png").exists() else set()))
    # An existing run directory is not overwritten without --resume.
    before = snapshot(out)
    refused(script, ["--data", str(text_file), "--steps", "2", "--out", str(out), *TINY], capsys, match="--resume")
    # Resuming the finished run reports it in one line and changes nothing.
    assert script.main(["--out", str(out), "--resume", "--no-progress"]) == json.loads((out / "summary.json").read_text())
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "finished run (step 30 of 30" in line and "larger --steps" in line, line
    # Training longer is refused: --steps is fixed on resume (the schedule ends there).
    refused(script, ["--out", str(out), "--resume", "--steps", "60"], capsys, match="fixed on resume")
    assert snapshot(out) == before


@pytest.mark.parametrize("backbone", ["dense", "routed"])
def test_resume_gives_the_same_losses(tmp_path, text_file, backbone):
    script = load_script()
    tiny = TINY if backbone == "dense" else TINY[1:]
    common = ["--data", str(text_file), "--steps", "16", "--eval-every", "5", "--generate-every", "0", *tiny]
    script.main([*common, "--out", str(tmp_path / "straight")])
    script.main([*common, "--out", str(tmp_path / "stopped"), "--stop-at", "7"])
    _, val_stopped = read_metrics(tmp_path / "stopped")
    assert 7 in val_stopped and 8 not in val_stopped
    if backbone == "dense":
        # A crash after the checkpoint at step 7: records of steps 8-9 written, then a torn line.
        with open(tmp_path / "stopped" / "metrics.jsonl", "a") as f:
            f.write('{"step": 8, "train_loss": 99.0}\n{"step": 9, "train_loss": 99.0}\n{"step": 10, "train_lo')
    # The resumed run takes model, data and schedule settings from the checkpoint.
    script.main(["--out", str(tmp_path / "stopped"), "--resume", "--no-progress", "--generate-every", "0", "--log-every", "1"])
    train_a, val_a = read_metrics(tmp_path / "straight")
    train_b, val_b = read_metrics(tmp_path / "stopped")
    assert sorted(train_b) == list(range(1, 17))
    for step in train_a:
        assert abs(train_a[step] - train_b[step]) <= 1e-6, (step, train_a[step], train_b[step])
    assert abs(val_a[15] - val_b[15]) <= 1e-6 and abs(val_a[16] - val_b[16]) <= 1e-6
    # Changing what defines the run on resume is refused.
    with pytest.raises(SystemExit) as info:
        script.main(["--out", str(tmp_path / "stopped"), "--resume", "--dim", "64"])
    assert info.value.code == 2


def resume_edited_checkpoint(script, tmp_path: Path, common: list[str], stop: int, edit) -> tuple[dict, dict]:
    """Train `common` straight and stopped at `stop`, rewrite the stopped run's checkpoint with
    edit(state) and resume it: every train loss must be the straight run's. Returns both runs'
    validation {step: bpc}."""
    script.main([*common, "--out", str(tmp_path / "straight")])
    script.main([*common, "--out", str(tmp_path / "stopped"), "--stop-at", str(stop)])
    path = tmp_path / "stopped" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    script.main(["--out", str(tmp_path / "stopped"), "--resume", "--no-progress", "--log-every", "1"])
    (train_a, val_a), (train_b, val_b) = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    assert sorted(train_b) == sorted(train_a)
    for step in train_a:
        assert abs(train_a[step] - train_b[step]) <= 1e-6, (step, train_a[step], train_b[step])
    return val_a, val_b


def test_checkpoint_of_the_earlier_format_resumes_exactly(tmp_path, text_file):
    """Checkpoints written before this script saved get_state_dict's output: an optimizer state
    keyed by parameter index (Optimizer.state_dict) and no world_size."""

    def earlier_format(state):
        named = state["optimizer"]
        assert all(isinstance(name, str) for group in named["param_groups"] for name in group["params"])
        index = {name: i for i, name in enumerate(name for group in named["param_groups"] for name in group["params"])}
        state["optimizer"] = {"state": {index[name]: value for name, value in named["state"].items()},
                              "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}
        del state["world_size"]
        del state["args"]["model_args"]  # and no --model-arg
        del state["args"]["positions"]  # and no rotary embeddings: they trained with the position table only

    common = ["--data", str(text_file), "--steps", "6", "--eval-every", "3", *MINI, "--positions", "learned"]
    val_a, val_b = resume_edited_checkpoint(load_script(), tmp_path, common, 3, earlier_format)
    assert sorted(read_metrics(tmp_path / "stopped")[0]) == list(range(1, 7)) and sorted(val_b) == [0, 3, 6]
    assert abs(val_a[6] - val_b[6]) <= 1e-6


def test_checkpoint_with_rotary_through_model_arg_resumes_as_rotary(tmp_path, text_file):
    """Before --positions, rotary embeddings came only through --model-arg rotary_emb=True: such a
    checkpoint resumes with rotary positions (the same model) and says so."""

    def earlier_format(state):
        del state["args"]["positions"]
        state["args"]["model_args"] = {"rotary_emb": True}

    common = ["--data", str(text_file), "--steps", "6", "--eval-every", "3", *MINI]
    resume_edited_checkpoint(load_script(), tmp_path, common, 3, earlier_format)
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["positions"] == "rotary"
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["args"]["model_args"] == {}


def test_checkpoint_of_the_half_dim_light_feedforward_resumes_with_it(tmp_path, text_file):
    """The routed model's light feedforward was 1/2 dim before it became 2: a checkpoint of that
    width that does not name it resumes with it, exactly, and names it from then on."""

    def earlier_format(state):
        assert state["args"]["model_args"] == {"light_ff_mult": 0.5}
        state["args"]["model_args"] = {}

    routed = [arg for arg in MINI if arg != "--dense"]
    common = ["--data", str(text_file), "--steps", "4", "--eval-every", "2", *routed, "--model-arg", "light_ff_mult=0.5"]
    resume_edited_checkpoint(load_script(), tmp_path, common, 2, earlier_format)
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert saved["args"]["model_args"] == {"light_ff_mult": 0.5}
    assert saved["model"]["backbone.layers.0.ff.light_ff.net.0.weight"].shape == (8, 16)


def test_checkpoint_of_the_routing_window_light_attention_resumes_with_it(tmp_path, text_file):
    """The routed model's light window was its routing window, min(128, seq-len / 4), before it
    became min(512, seq-len / 4): a checkpoint that does not name it resumes with the old one."""
    script = load_script()
    routed = [arg for arg in MINI if arg not in ("--dense", "--seq-len", "32")]
    common = ["--data", str(text_file), "--steps", "4", "--eval-every", "2", "--seq-len", "1024", "--batch-size", "1",
              *routed]
    fresh = script.fill_defaults(script.parse_args(common), torch.device("cpu"), None)
    assert fresh.light_window == 256 and script.model_config(fresh)["heavy_window_size"] == 128

    def earlier_format(state):
        assert state["args"]["light_window"] == 128
        del state["args"]["light_window"]

    resume_edited_checkpoint(script, tmp_path, [*common, "--light-window", "128"], 2, earlier_format)
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["args"]["light_window"] == 128

    def through_model_arg(state):  # and a window set by --model-arg, before the flag
        del state["args"]["light_window"]
        state["args"]["model_args"] = {"light_window_size": 64}

    resume_edited_checkpoint(script, tmp_path / "model-arg", [*common, "--light-window", "64"], 2, through_model_arg)
    saved = torch.load(tmp_path / "model-arg" / "stopped" / "checkpoint.pt", weights_only=True)["args"]
    assert saved["light_window"] == 64 and saved["model_args"] == {}


def test_flat_gradients_collect_every_gradient_in_one_buffer():
    """The captured step under DDP reduces one buffer: the first backward's gradients move into it
    unchanged, later backwards accumulate into it, and zeroing it zeroes every .grad. A parameter
    the backward never reaches keeps no gradient (so AdamW skips it, as in one process)."""
    script = load_script()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model.unused = torch.nn.Parameter(torch.ones(3))
    x = torch.randn(5, 3)
    model(x).square().sum().backward()
    before = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    flat = script.flat_gradients(model)
    assert model.unused.grad is None and torch.equal(flat, before) and flat.any()
    reached = [p for p in model.parameters() if p is not model.unused]
    assert flat.numel() == sum(p.numel() for p in reached)
    assert all(p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in reached)
    model(x).square().sum().backward()  # a second micro-batch accumulates in the buffer
    assert torch.allclose(flat, 2 * before) and model.unused.grad is None
    flat.zero_()
    assert all(not p.grad.any() for p in reached)


def test_captured_step_under_ddp_starts_each_step_from_zero_gradients():
    """Several processes: each step's backward zeroes the one reduced buffer before it
    accumulates (a step's gradients, not a running sum), and the parameter the backward never
    reaches stays without a gradient."""
    script = load_script()

    class Bytes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.unused = torch.nn.Embedding(256, 8), torch.nn.Parameter(torch.ones(3))
            self.out = torch.nn.Linear(8, 256)

        def forward(self, tokens):
            return self.out(self.emb(tokens))

    model = Bytes()
    run = SimpleNamespace(args=SimpleNamespace(grad_accum=2, batch_size=2, seq_len=5, fsdp=False), device=torch.device("cpu"),
                          world=2, model=model, net=model, ddp=None, autocast=nullcontext)
    step = script.CapturedStep(run)
    step.batches.random_(0, 256)
    step._forward_backward(run)
    step.grads = script.flat_gradients(model)
    first = step.grads.clone()
    step._forward_backward(run)
    assert torch.allclose(step.grads, first) and step.grads.any() and model.unused.grad is None
    assert model.out.bias.grad.untyped_storage().data_ptr() == step.grads.untyped_storage().data_ptr()


def test_tokens_per_s_leaves_out_the_warm_up():
    """The first --log-every steps (compilation, graph capture) are not in the summary's tokens/s."""
    tokens_per_s = load_script().Run.tokens_per_s
    run = SimpleNamespace(world=2, args=SimpleNamespace(batch_size=2, grad_accum=1, seq_len=10), train_steps=30,
                          train_time=13.0, warmup=(10, 10.0))
    assert tokens_per_s(run) == 20 * 40 / 3.0
    run.warmup = (30, 13.0)  # no step timed after the first flush: all of them
    assert tokens_per_s(run) == 30 * 40 / 13.0


def test_profile_writes_a_trace(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    load_script().main(["--data", str(text_file), "--steps", "7", "--eval-every", "7", *MINI, "--profile", "2",
                        "--out", str(out)])
    printed = capsys.readouterr().out
    assert "profile of steps 5-6 (rank 0):" in printed and "Self CPU" in printed, printed[-2000:]
    trace = json.loads((out / "profile_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::addmm" in names or "aten::mm" in names, sorted(names)[:50]
    assert sorted(read_metrics(out)[0]) == list(range(1, 8))


def test_script_routed_default_model(tmp_path, text_file, capsys):
    """The default (CoLT5) model trains, evaluates and samples through the script."""
    summary = load_script().main(["--data", str(text_file), "--steps", "4", "--eval-every", "2", "--generate-every", "4",
                                  *TINY[1:]])
    printed = capsys.readouterr().out
    assert "model: colt5" in printed and "--- sample at step 4 ---" in printed
    assert summary["model"] == "colt5" and math.isfinite(summary["final_val_bpc"])


def test_model_arg_reaches_the_model_and_is_fixed_on_resume(tmp_path, text_file, capsys):
    script = load_script()
    out = tmp_path / "run"
    common = ["--data", str(text_file), "--steps", "4", "--eval-every", "2", *MINI[1:]]
    script.main([*common, "--model-arg", "num_heavy_ff_tokens=3", "--model-arg", "light_ff_mult=1.0", "--out", str(out),
                 "--stop-at", "2"])
    args = script.parse_args([*common, "--model-arg", "num_heavy_ff_tokens=3", "--model-arg", "light_ff_mult=1.0"])
    model = script.build_model(script.fill_defaults(args, torch.device("cpu"), None))
    assert args.model_args == {"num_heavy_ff_tokens": 3, "light_ff_mult": 1.0}
    assert model.backbone.layers[0].ff.num_heavy_tokens == 3, "the override did not reach the layer"
    assert model.backbone.layers[0].attn.heavy.rotary is not None, "rotary positions are the default"
    narrow = script.build_model(script.fill_defaults(script.parse_args([*common, "--light-window", "4"]),
                                                     torch.device("cpu"), None))
    assert narrow.backbone.layers[0].attn.light_attn.window_size == 4 != model.backbone.layers[0].attn.light_attn.window_size
    learned = script.build_model(script.fill_defaults(script.parse_args([*common, "--positions", "learned"]),
                                                      torch.device("cpu"), None))
    assert learned.backbone.layers[0].attn.heavy.rotary is None
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["args"]["model_args"] == args.model_args
    refused(script, ["--out", str(out), "--resume", "--model-arg", "num_heavy_ff_tokens=4"], capsys, match="--model-arg")
    capsys.readouterr()
    # the saved overrides come back; a flag given as saved is accepted
    script.main(["--out", str(out), "--resume", "--no-progress", "--light-window", "8"])
    assert "num_heavy_ff_tokens=3, light_ff_mult=1.0" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    refused(script, [*common, "--model-arg", "heads"], capsys, match="KEY=VALUE")
    refused(script, [*common, "--model-arg", "dim=64"], capsys, match="its own flag (--dim)")
    refused(script, [*common, "--model-arg", "rotary_emb=False"], capsys, match="its own flag (--positions)")
    refused(script, [*common, "--model-arg", "light_window_size=8"], capsys, match="its own flag (--light-window)")
    refused(script, ["--out", str(out), "--resume", "--light-window", "4"], capsys, match="--light-window 4 differs")
    dense = script.fill_defaults(script.parse_args([*MINI, "--light-window", "4"]), torch.device("cpu"), None)
    assert dense.light_window is None  # a dense model has none
    refused(script, ["--out", str(out), "--resume", "--positions", "learned"], capsys, match="--positions learned differs")
    refused(script, [*common, "--model-arg", "light_ff_mult=half"], capsys, match="not a Python literal")
    refused(script, [*common, "--model-arg", "no_such_option=1", "--out", str(tmp_path / "bad")], capsys,
            match="refuses it")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_script_default_corpus_log_line(capsys):
    """Without --data: the embedded Python-source corpus, named with its size in the log."""
    summary = load_script().main(["--steps", "1", "--eval-every", "1", *MINI])
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("corpus: "))
    assert line.startswith("corpus: default, the .py source of Python ") and " stdlib + torch " in line, line
    assert " MB train, " in line and " MB valid, " in line and line.endswith(" files"), line
    assert summary["corpus_bytes"] >= 50_000_000 and math.isfinite(summary["final_val_bpc"])


# ---- refusals: one line, exit code 2, nothing written ---------------------------------------------
def test_script_errors(tmp_path, text_file, capsys):
    script = load_script()
    refused(script, ["--data", str(tmp_path / "missing.zip"), "--steps", "1", *TINY], capsys, match="does not exist")
    refused(script, ["--data", str(text_file), "--steps", "1", *TINY, "--seq-len", "5000"], capsys, match="too short for seq_len")
    refused(script, ["--resume", "--steps", "1", *TINY], capsys, match="--resume needs --out")
    refused(script, ["--steps", "0", *TINY], capsys, match="--steps")
    refused(script, ["--lr", "inf", *TINY], capsys, match="positive finite")
    refused(script, ["--lr", "nan", *TINY], capsys, match="positive finite")
    refused(script, ["--overwrite", *TINY], capsys, match="--overwrite needs --out")
    refused(script, ["--out", str(tmp_path / "r"), "--resume", "--overwrite", *TINY], capsys, match="one of them")
    refused(script, ["--out", str(tmp_path / "r"), "--resume", *TINY], capsys, match="no checkpoint")
    assert not (tmp_path / "r").exists()


def test_parallel_and_compile_flags_are_refused_where_they_cannot_work(tmp_path, text_file, capsys):
    script = load_script()
    common = ["--data", str(text_file), "--steps", "1", *MINI, "--out", str(tmp_path / "r")]
    refused(script, [*common, "--fsdp"], capsys, match="torchrun --nproc_per_node")
    refused(script, [*common, "--cuda-graphs"], capsys, match="needs a CUDA device")
    refused(script, [*common, "--eager", "--compile"], capsys, match="--eager runs plain eager steps")
    refused(script, [*common, "--no-compile", "--compile"], capsys, match="contradict")
    refused(script, [*common, "--compile", "nonsense"], capsys, match="not a torch.compile backend")
    refused(script, [*common, "--dist-timeout", "0"], capsys, match="--dist-timeout")
    refused(script, [*common, "--device", "cpu", "--dist-backend", "nccl"], capsys, match="needs CUDA devices")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "foo", "mps"])
def test_bad_device_is_refused(tmp_path, text_file, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available() and (device == "cuda" or torch.cuda.device_count() > 7):
        pytest.skip("this device exists here")
    out = tmp_path / "run"
    match = {"foo": "not a device", "mps": "cpu or cuda"}.get(device, "--device cpu" if not torch.cuda.is_available() else "")
    refused(load_script(), ["--data", str(text_file), *MINI[:-2], "--device", device, "--out", str(out)], capsys, match=match)
    assert not out.exists()


def test_bad_out_is_refused(tmp_path, text_file, capsys):
    script = load_script()
    common = ["--data", str(text_file), "--steps", "2", *MINI]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    refused(script, [*common, "--out", str(a_file)], capsys, match="is a file")
    refused(script, [*common, "--out", str(a_file / "run")], capsys, match="is a file")
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("how", ["chmod", "procfs"])
def test_read_only_out_is_refused(tmp_path, text_file, capsys, how):
    if how == "chmod":
        parent = tmp_path / "read_only"
        parent.mkdir()
        parent.chmod(0o555)
        if os.access(parent, os.W_OK):
            parent.chmod(0o755)
            pytest.skip("permissions do not stop this user (root)")
        out = parent / "run"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        out = Path("/proc/colt5-test-run")  # procfs refuses mkdir, even to root
    try:
        refused(load_script(), ["--data", str(text_file), "--steps", "2", *MINI, "--out", str(out)], capsys,
                match="writ")
        assert not out.exists()
    finally:
        if how == "chmod":
            parent.chmod(0o755)


def test_another_runs_files_need_overwrite(tmp_path, text_file, capsys):
    """An --out with metrics/summary but no checkpoint (a run that stopped early, or another one)."""
    script = load_script()
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "val_bpc": 8.0}\n')
    (out / "summary.json").write_text('{"step": 3}\n')
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    common = ["--data", str(text_file), "--steps", "2", "--eval-every", "2", *MINI, "--out", str(out)]
    refused(script, common, capsys, match="--overwrite")
    refused(script, [*common, "--resume"], capsys, match="stopped before its first checkpoint")
    assert snapshot(out) == before
    script.main([*common, "--overwrite"])
    train, val = read_metrics(out)
    assert sorted(train) == [1, 2] and sorted(val) == [0, 2]
    assert json.loads((out / "summary.json").read_text())["step"] == 2 and (out / "notes.txt").read_text() == "mine"
    # --overwrite also starts afresh over a checkpointed run.
    script.main(["--data", str(text_file), "--steps", "3", "--eval-every", "3", *MINI, "--out", str(out), "--overwrite"])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3 and sorted(read_metrics(out)[0]) == [1, 2, 3]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign", "wrong-model"])
def test_bad_checkpoint_is_refused(tmp_path, finished_run, capsys, damage):
    src, data = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["step"], state["args"]["stop_at"] = 2, None  # an unfinished run, so that resuming has work to do
    torch.save(state, ckpt)
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint" * 100)
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"weights": torch.ones(3)}, ckpt)
    else:
        state["model"] = {k: v[..., :1] for k, v in state["model"].items()}
        torch.save(state, ckpt)
    before = snapshot(out)
    match = {"foreign": "not a checkpoint of this script", "wrong-model": "does not fit"}.get(damage, "not a readable checkpoint")
    refused(load_script(), ["--out", str(out), "--resume", "--no-progress"], capsys, match=match)
    assert snapshot(out) == before


def test_bad_metrics_line_mid_file_is_refused(tmp_path, finished_run, capsys):
    src, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["step"] = 2
    torch.save(state, out / "checkpoint.pt")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join([lines[0], "garbage\n", *lines[1:]]))
    before = snapshot(out)
    refused(load_script(), ["--out", str(out), "--resume", "--no-progress"], capsys, match="line 2")
    assert snapshot(out) == before


def test_stop_at_before_the_checkpoint_is_refused(tmp_path, text_file, capsys):
    script = load_script()
    out = tmp_path / "run"
    script.main(["--data", str(text_file), "--steps", "6", "--eval-every", "2", "--stop-at", "4", *MINI, "--out", str(out)])
    before = snapshot(out)
    refused(script, ["--out", str(out), "--resume", "--stop-at", "3"], capsys, match="--stop-at 3")
    assert snapshot(out) == before


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    script = load_script()
    path = tmp_path / "checkpoint.pt"
    script.save_checkpoint(path, {"step": 1})

    def torn_save(obj, f):
        f.write(b"PK\x03\x04half")
        raise OSError("disk full")

    monkeypatch.setattr(script.torch, "save", torn_save)
    with pytest.raises(OSError):
        script.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


# ---- failures while training: divergence, Ctrl-C --------------------------------------------------
def test_divergence_stops_the_run(tmp_path, text_file, capsys):
    script = load_script()
    out = tmp_path / "run"
    refused(script, ["--data", str(text_file), "--steps", "4", "--eval-every", "1", *MINI, "--lr", "1e30", "--out", str(out)],
            capsys, code=1, match="diverged")
    assert not (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, text_file, capsys, monkeypatch):
    script = load_script()
    out = tmp_path / "run"
    real = script.forward_backward

    def poisoned(run, batches):  # the model's weights turn NaN before step 4 (a blow-up the loss shows only then)
        if run.step == 3:
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("nan"))
        return real(run, batches)

    monkeypatch.setattr(script, "forward_backward", poisoned)
    err = refused(script, ["--data", str(text_file), "--steps", "8", "--eval-every", "2", *MINI, "--out", str(out)],
                  capsys, code=1, match="train loss nan at step 4")
    assert "checkpoint (step 2) is kept" in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    train, _ = read_metrics(out)
    assert sorted(train) == [1, 2, 3]


def test_interrupt_saves_the_last_step_and_resumes_exactly(tmp_path, text_file, capsys, monkeypatch):
    """KeyboardInterrupt in the middle of step 6: checkpoint at step 5, exit 130, exact resume."""
    script = load_script()
    common = ["--data", str(text_file), "--steps", "9", "--eval-every", "4", *MINI]
    script.main([*common, "--out", str(tmp_path / "straight")])
    real = script.forward_backward

    def interrupt_at_6(run, batches):
        if run.step == 5:  # half-way through the step: the sampler has moved on
            raise KeyboardInterrupt
        return real(run, batches)

    monkeypatch.setattr(script, "forward_backward", interrupt_at_6)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        script.main([*common, "--out", str(tmp_path / "stopped")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 130 and len(err.splitlines()) == 1, err
    assert "interrupted at step 5; checkpoint saved at step 5" in err and "--resume" in err, err
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["step"] == 5
    monkeypatch.undo()
    script.main(["--out", str(tmp_path / "stopped"), "--resume", "--no-progress"])
    train_a, val_a = read_metrics(tmp_path / "straight")
    train_b, val_b = read_metrics(tmp_path / "stopped")
    assert sorted(train_b) == list(range(1, 10)) and sorted(val_b) == [0, 4, 8, 9]
    for step in train_a:
        assert abs(train_a[step] - train_b[step]) <= 1e-6, (step, train_a[step], train_b[step])
    assert abs(val_a[9] - val_b[9]) <= 1e-6


def test_interrupt_guard_defers_ctrl_c_to_the_end_of_an_update():
    guard = load_script().InterruptGuard()
    done = []
    with guard:
        with pytest.raises(KeyboardInterrupt):
            with guard.update():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("rest of the update")
        assert done == ["rest of the update"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the signal lands here, at once
            done.append("not reached")
    assert done == ["rest of the update"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_real_process(tmp_path, text_file):
    """SIGINT to the script: one line on stderr, exit 130, a checkpoint at the last finished step."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--data", str(text_file), "--steps", "100000", "--eval-every", "100000",
           *MINI, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("train_loss") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and "interrupted at step" in err and "--resume" in err, err[-3000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    train, _ = read_metrics(out)
    assert step >= 3 and sorted(train) == list(range(1, step + 1))


# ---- the captured step (CUDA) ----------------------------------------------------------------
# Small enough for seconds per run, long enough for several routing windows (heavy window 128).
GPU_RUN = ["--seq-len", "512", "--batch-size", "2", "--grad-accum", "2", "--dim", "64", "--depth", "2", "--steps", "12",
           "--eval-every", "6", "--eval-batches", "2", "--generate-every", "6", "--generate-length", "16",
           "--no-progress", "--log-every", "1", "--device", "cuda", "--lr", "3e-3", "--precision", "fp32"]
GRAPH_TOL = 1e-4  # the same kernels replayed: only the order of atomic adds may differ


def assert_losses_match(a: Path, b: Path, tol: float, steps=None) -> None:
    (ta, va), (tb, vb) = read_metrics(a), read_metrics(b)
    for step in steps or sorted(tb):
        assert abs(ta[step] - tb[step]) <= tol * abs(tb[step]), (step, ta[step], tb[step])
    for step in set(va) & set(vb):
        assert abs(va[step] - vb[step]) <= tol * abs(vb[step]), (step, va[step], vb[step])


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dense", [False, True])
def test_gpu_captured_step_matches_eager_and_resumes_exactly(tmp_path, text_file, dense):
    """The CUDA default (the step captured in one CUDA graph; two micro-batches, evaluation and
    sampling between replays) gives --eager's losses; stopped and resumed it gives the
    uninterrupted run's, and its checkpoint resumes under --eager too."""
    script = load_script()
    d = ["--data", str(text_file), *GPU_RUN, *(["--dense"] if dense else [])]
    eager = script.main([*d, "--eager", "--out", str(tmp_path / "eager")])
    graphs = script.main([*d, "--no-compile", "--out", str(tmp_path / "graphs")])
    assert graphs["cuda_graphs"] is True and eager["cuda_graphs"] is False and graphs["compile"] is None
    assert sorted(read_metrics(tmp_path / "graphs")[0]) == list(range(1, 13))
    assert_losses_match(tmp_path / "graphs", tmp_path / "eager", GRAPH_TOL)

    script.main([*d, "--no-compile", "--stop-at", "6", "--out", str(tmp_path / "stopped")])
    shutil.copytree(tmp_path / "stopped", tmp_path / "stopped_eager")
    script.main(["--out", str(tmp_path / "stopped"), "--resume", "--no-compile", "--no-progress"])
    assert_losses_match(tmp_path / "stopped", tmp_path / "graphs", GRAPH_TOL)
    script.main(["--out", str(tmp_path / "stopped_eager"), "--resume", "--eager", "--no-progress"])
    assert_losses_match(tmp_path / "stopped_eager", tmp_path / "eager", GRAPH_TOL)


@requires_cuda
@pytest.mark.gpu
def test_gpu_default_compiles_the_blocks_in_the_captured_step(tmp_path, text_file):
    """The CUDA default: each block compiled on its own, inside the captured step; --eager's
    losses within the tolerance of inductor's reordered float sums."""
    script = load_script()
    d = ["--data", str(text_file), *GPU_RUN]
    script.main([*d, "--eager", "--out", str(tmp_path / "eager")])
    summary = script.main([*d, "--out", str(tmp_path / "compiled")])
    assert summary["compile"] == "inductor" and summary["cuda_graphs"] is True
    assert_losses_match(tmp_path / "compiled", tmp_path / "eager", 1e-3)


@requires_cuda
@pytest.mark.gpu
def test_gpu_captured_step_follows_the_schedule(tmp_path, text_file):
    """The learning rate reaches the replayed optimizer: a run whose rate warms up from ~0 moves
    the loss only as --eager does (a rate frozen at capture would train at step 3's rate)."""
    script = load_script()
    d = ["--data", str(text_file), *GPU_RUN, "--dense", "--warmup", "10"]
    script.main([*d, "--eager", "--out", str(tmp_path / "eager")])
    script.main([*d, "--no-compile", "--out", str(tmp_path / "graphs")])
    assert_losses_match(tmp_path / "graphs", tmp_path / "eager", GRAPH_TOL)


def test_resume_takes_this_runs_optimizer_kernels(tmp_path, text_file):
    """A checkpoint saved by a captured CUDA run (capturable, fused) resumes here with this run's
    implementation flags, and gives the uninterrupted run's losses."""
    script = load_script()
    seen = {}
    real = script.restore

    def restore(run, checkpoint, where):
        real(run, checkpoint, where)
        seen.update({k: run.optimizer.param_groups[0][k] for k in ("capturable", "fused", "foreach")})

    def as_captured(state):
        for group in state["optimizer"]["param_groups"]:
            group.update(capturable=True, fused=True, foreach=False)

    script.restore = restore
    common = ["--data", str(text_file), "--steps", "8", "--eval-every", "4", *MINI]
    resume_edited_checkpoint(script, tmp_path, common, 4, as_captured)
    assert seen == {"capturable": False, "fused": None, "foreach": None}, seen
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert all(type(g["lr"]) is float for g in saved["optimizer"]["param_groups"])
