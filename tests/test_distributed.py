"""examples/train_enwik8.py on several processes (gloo, CPU): DDP and FSDP2 against one process,
gradient reductions per step, exact resume, checkpoints that move between modes, a failing rank.

Two processes with batch B/2 see the windows of one process with batch B (colt5.data), so their
losses must agree to float rounding. One torchrun launch (this file run as a script: `driver`)
runs the whole plan of multi-process runs in the same two processes, since starting processes
is most of the cost here; the tests then read the run directories. The same plan on 2 or 4 GPUs
(NCCL, inductor, CUDA graphs) is the `gpu` test at the end:
`COLT5_GPU_TESTS=1 python -m pytest -q -m gpu tests/test_distributed.py`.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as torchrun's script: the helpers beside it
from test_train_enwik8 import ROOT, SCRIPT, load_script, read_metrics, synthetic_text  # noqa: E402

from conftest import requires_cuda  # noqa: E402

STEPS, STOP = 6, 3


def common(device: str = "cpu") -> list[str]:
    """Routed (CoLT5) model, 2 micro-batches per step: a missing no_sync would reduce twice."""
    return ["--steps", str(STEPS), "--eval-every", str(STOP), "--generate-every", str(STOP), "--seq-len", "32",
            "--dim", "32", "--depth", "2", "--eval-batches", "2", "--generate-length", "8", "--grad-accum", "2",
            "--no-progress", "--log-every", "1", "--device", device, "--precision", "fp32", "--lr", "3e-3"]


COMMON = common()
# Compiled blocks on the CPU: the dense model (aot_eager traces it in seconds; the routed one
# takes ~10 s per process on this CPU: it matched too, checked by hand).
DENSE = [*COMMON, "--dense"]
FLOAT_TOL = 1e-5  # one process vs two: the same sums in another order
EXACT_TOL = 1e-6  # a resumed run vs the uninterrupted one, same mode
GPU_TOL = 1e-3  # GPU: atomics and inductor's fusions reorder sums; a wrong gradient moves the loss by > 1e-2


def plan(base: Path, data: Path) -> list[dict]:
    """The multi-process runs, in order; `copy` (rank 0, before the run) and `fail` (a rank raises)."""
    d = ["--data", str(data)]
    return [
        {"argv": [*d, *COMMON, "--batch-size", "2", "--out", str(base / "ddp")]},
        {"argv": [*d, *COMMON, "--batch-size", "2", "--fsdp", "--out", str(base / "fsdp")]},
        {"argv": [*d, *COMMON, "--batch-size", "2", "--fsdp", "--stop-at", str(STOP), "--out", str(base / "fsdp_stopped")]},
        {"copy": [str(base / "fsdp_stopped"), str(base / "fsdp_to_single")],
         "argv": ["--out", str(base / "fsdp_stopped"), "--resume", "--fsdp", "--no-progress", "--log-every", "1"]},
        {"argv": ["--out", str(base / "single_to_fsdp"), "--resume", "--fsdp", "--no-progress", "--log-every", "1"]},
        {"argv": [*d, *DENSE, "--batch-size", "2", "--compile", "aot_eager", "--out", str(base / "ddp_compiled")]},
        {"argv": [*d, *DENSE, "--batch-size", "2", "--fsdp", "--compile", "aot_eager", "--out", str(base / "fsdp_compiled")]},
        # Last: rank 1 raises in step 3, the job must end (no other run can follow it).
        {"fail": {"rank": 1, "step": 3},
         "argv": [*d, *COMMON, "--batch-size", "2", "--steps", "8", "--out", str(base / "failing")]},
    ]


def gpu_plan(base: Path, data: Path, world: int) -> list[dict]:
    """The GPU plan on `world` GPUs (2 or 4; global batch 4): DDP and FSDP2 eager, compiled blocks
    (inductor) under both, DDP's default (compiled, the step captured), FSDP resumed from a one-GPU
    checkpoint; then rank 1 fails (NCCL)."""
    d, c = ["--data", str(data)], [*common("cuda"), "--batch-size", str(4 // world)]
    return [
        {"argv": [*d, *c, "--eager", "--out", str(base / "ddp")]},
        {"argv": [*d, *c, "--fsdp", "--out", str(base / "fsdp")]},
        {"argv": [*d, *c, "--compile", "--no-cuda-graphs", "--out", str(base / "ddp_compiled")]},
        {"argv": [*d, *c, "--fsdp", "--compile", "--out", str(base / "fsdp_compiled")]},
        {"argv": [*d, *c, "--out", str(base / "ddp_graphs")]},
        {"argv": ["--out", str(base / "single_to_fsdp"), "--resume", "--fsdp", "--no-progress", "--log-every", "1"]},
        {"fail": {"rank": 1, "step": 3}, "argv": [*d, *c, "--eager", "--steps", "8", "--out", str(base / "failing")]},
    ]


def driver(plan_path: str) -> None:
    """Under torchrun: run every entry of the plan in these processes, one process group for all.

    Counts the gradient reductions of every optimizer step (DDP: buckets through a comm hook, and
    the last bucket of each backward; FSDP2: reduce-scatters) into <out>/reductions.json.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    torch.set_num_threads(1)
    script = load_script()
    entries = json.loads(Path(plan_path).read_text())
    if "--device" in entries[0]["argv"] and "cuda" in entries[0]["argv"]:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    counts = {"buckets": 0, "backwards": 0, "reduce_scatters": 0}
    per_step = []

    def counting_hook(state, bucket):
        counts["buckets"] += 1
        counts["backwards"] += int(bucket.is_last())
        return default_hooks.allreduce_hook(None, bucket)

    real_distribute, real_update, real_reduce_scatter = script.distribute, script.optimizer_step, dist.reduce_scatter_single

    def distribute(model, args, **kwargs):
        net, ddp = real_distribute(model, args, **kwargs)
        if ddp is not None:
            ddp.register_comm_hook(None, counting_hook)
        return net, ddp

    def optimizer_step(run):
        per_step.append(dict(counts))
        counts.update(dict.fromkeys(counts, 0))
        return real_update(run)

    def reduce_scatter(*args, **kwargs):
        counts["reduce_scatters"] += 1
        return real_reduce_scatter(*args, **kwargs)

    script.distribute, script.optimizer_step, dist.reduce_scatter_single = distribute, optimizer_step, reduce_scatter
    for entry in entries:
        if "copy" in entry and rank == 0:
            shutil.copytree(*entry["copy"])
        dist.barrier()
        if "fail" in entry:
            fail = entry["fail"]
            real_forward_backward = script.forward_backward

            def forward_backward(run, batches, fail=fail, real=real_forward_backward):
                if run.rank == fail["rank"] and run.step + 1 == fail["step"]:
                    raise RuntimeError("injected failure")
                return real(run, batches)

            script.forward_backward = forward_backward
        per_step.clear()
        script.main(entry["argv"])
        out = Path(entry["argv"][entry["argv"].index("--out") + 1])
        if rank == 0:
            (out / "reductions.json").write_text(json.dumps(per_step))
    dist.destroy_process_group()


def two_ranks(cmd: list[str], env: dict, *, timeout: float, local_ranks=(0, 1)):
    """Run cmd as ranks 0 and 1 without torchrun: (the processes, their (stdout, stderr)); both
    are killed if either outlives `timeout`. local_ranks (0, 0): two nodes of one process each."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(local)}) for r, local in enumerate(local_ranks)]
    try:
        return procs, [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file: one process in this one, then the torchrun plan; base dir + driver output."""
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun not available")
    base = tmp_path_factory.mktemp("distributed")
    data = base / "corpus.txt"
    data.write_bytes(synthetic_text(40_000))
    script = load_script()
    d = ["--data", str(data)]
    script.main([*d, *COMMON, "--batch-size", "4", "--out", str(base / "single")])
    script.main([*d, *DENSE, "--batch-size", "4", "--out", str(base / "dense_single")])
    script.main([*d, *COMMON, "--batch-size", "4", "--stop-at", str(STOP), "--out", str(base / "single_to_fsdp")])
    plan_path = base / "plan.json"
    plan_path.write_text(json.dumps(plan(base, data)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(plan_path)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    proc.wall = time.monotonic() - t0
    # The FSDP checkpoint of step 3, resumed in one process with the whole batch.
    script.main(["--out", str(base / "fsdp_to_single"), "--resume", "--no-progress", "--log-every", "1"])
    return base, proc


def assert_same_losses(a: Path, b: Path, tol: float, steps=range(1, STEPS + 1)) -> None:
    train_a, val_a = read_metrics(a)
    train_b, val_b = read_metrics(b)
    assert sorted(train_a) == sorted(train_b) == list(steps), (sorted(train_a), sorted(train_b))
    for step in train_a:
        assert abs(train_a[step] - train_b[step]) <= tol, (a.name, b.name, step, train_a[step], train_b[step])
    assert sorted(val_a) == sorted(val_b) and val_a, (val_a, val_b)
    for step in val_a:
        assert abs(val_a[step] - val_b[step]) <= tol, (a.name, b.name, step, val_a[step], val_b[step])


def reductions(out: Path) -> list[dict]:
    return json.loads((out / "reductions.json").read_text())


def test_resumed_batch_size_keeps_the_global_batch():
    script = load_script()
    assert script.resumed_batch_size(None, 2, 2, 1) == 4 and script.resumed_batch_size(None, 4, 1, 4) == 1
    assert script.resumed_batch_size(3, 6, 1, 2) == 3
    with pytest.raises(SystemExit, match="does not split over 3 processes"):
        script.resumed_batch_size(None, 2, 2, 3)
    with pytest.raises(SystemExit, match="global batch of 4; the checkpoint's is 6"):
        script.resumed_batch_size(2, 3, 2, 2)


def test_torchrun_command_line(runs):
    """The documented launch: torchrun runs the script itself (its own process group, destroyed at
    the end), exit 0, only rank 0 prints, DDP's losses are one process'."""
    base, _ = runs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           "--data", str(base / "corpus.txt"), *COMMON, "--batch-size", "2", "--out", str(base / "cli")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("SUMMARY") == 1 and proc.stdout.count(f"--- sample at step {STOP} ---") == 1
    assert " x2 parallel=ddp " in proc.stdout
    assert "destroy_process_group" not in proc.stderr  # torch warns when a group is left alive at exit
    assert_same_losses(base / "cli", base / "single", FLOAT_TOL)


def test_the_plan_ran_until_the_injected_failure(runs):
    base, proc = runs
    # Every run before the failing one finished; only rank 0 printed its summary.
    assert proc.stdout.count("SUMMARY") == len(plan(base, base)) - 1, proc.stderr[-3000:]
    assert proc.returncode != 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, mode):
    """2 ranks x batch 2 with 2 micro-batches per step: the losses of 1 process x batch 4."""
    base, _ = runs
    assert_same_losses(base / mode, base / "single", FLOAT_TOL)
    summary = json.loads((base / mode / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == mode


def test_gradients_are_reduced_once_per_step(runs):
    """--grad-accum 2: one reduction of the gradients per optimizer step, not one per micro-batch."""
    base, _ = runs
    ddp, fsdp = reductions(base / "ddp"), reductions(base / "fsdp")
    assert len(ddp) == len(fsdp) == STEPS
    # DDP: every step's backward ends once (the last bucket), through the same buckets.
    assert all(s["backwards"] == 1 and s["buckets"] == ddp[0]["buckets"] >= 1 for s in ddp), ddp
    # FSDP2: one reduce-scatter per unit (2 blocks and the root) per step.
    assert all(s["reduce_scatters"] == 3 and s["buckets"] == 0 for s in fsdp), fsdp


def test_fsdp_resume_is_exact(runs):
    """FSDP stopped at step 3 (checkpoint gathered on rank 0) and resumed under FSDP."""
    base, _ = runs
    assert_same_losses(base / "fsdp_stopped", base / "fsdp", EXACT_TOL)


def test_checkpoints_move_between_one_process_and_fsdp(runs):
    base, _ = runs
    # FSDP (2 x batch 2) -> 1 process: --batch-size follows the global batch (4).
    assert_same_losses(base / "fsdp_to_single", base / "single", FLOAT_TOL)
    # 1 process -> FSDP: the single run's checkpoint of step 3 resumed on 2 ranks with batch 2.
    assert_same_losses(base / "single_to_fsdp", base / "single", FLOAT_TOL)
    assert json.loads((base / "fsdp_to_single" / "summary.json").read_text())["world_size"] == 1
    assert json.loads((base / "single_to_fsdp" / "summary.json").read_text())["parallel"] == "fsdp"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_compiled_blocks_under_ddp_and_fsdp(runs, mode):
    """Each block compiled on its own (aot_eager) under DDP / FSDP2: the eager single process' losses."""
    base, _ = runs
    assert_same_losses(base / f"{mode}_compiled", base / "dense_single", FLOAT_TOL)
    assert json.loads((base / f"{mode}_compiled" / "summary.json").read_text())["compile"] == "aot_eager"


def test_only_rank_0_writes(runs):
    base, proc = runs
    expected = {"checkpoint.pt", "metrics.jsonl", "summary.json", "reductions.json", "loss_curve.png"}
    for name in ("ddp", "fsdp", "fsdp_stopped", "single_to_fsdp", "ddp_compiled", "fsdp_compiled"):
        files = {p.name for p in (base / name).iterdir()}
        assert files <= expected and {"checkpoint.pt", "metrics.jsonl", "summary.json"} <= files, (name, files)
    # Samples are printed once (FSDP: every rank generates, rank 0 prints).
    assert proc.stdout.count(f"--- sample at step {STEPS} ---") == len(plan(base, base)) - 2, proc.stdout[-2000:]


def test_a_failing_rank_takes_the_job_down(runs):
    """Rank 1 raises in step 3: its traceback and a last line naming the rank, the job ends non-zero."""
    base, proc = runs
    assert proc.returncode != 0 and proc.wall < 240
    lines = [line for line in proc.stderr.splitlines() if "error: " in line and line.startswith("[rank")]
    assert any(line.startswith("[rank 1] error: in step 3: RuntimeError: injected failure") for line in lines), proc.stderr[-3000:]
    assert "Traceback" in proc.stderr
    train, _ = read_metrics(base / "failing")
    assert max(train) <= 2  # nothing of the failed step was recorded


def test_rank_0_failing_without_torchrun_does_not_hang(tmp_path):
    """Two processes started by hand (no torchrun to stop the others): rank 0 cannot write its
    checkpoint at step 2; it reports and exits, and rank 1's next collective fails instead of
    waiting for --dist-timeout."""
    data = tmp_path / "corpus.txt"
    data.write_bytes(synthetic_text(20_000))
    out = tmp_path / "run"
    (out / "checkpoint.pt.tmp").mkdir(parents=True)  # save_checkpoint's temporary file cannot be opened
    cmd = [sys.executable, str(SCRIPT), "--data", str(data), "--steps", "6", "--eval-every", "2", "--dense",
           "--seq-len", "32", "--batch-size", "2", "--dim", "16", "--depth", "1", "--eval-batches", "1",
           "--generate-every", "0", "--no-progress", "--log-every", "1", "--device", "cpu", "--dist-timeout", "200",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    t0 = time.monotonic()
    procs, results = two_ranks(cmd, env, timeout=120)
    assert time.monotonic() - t0 < 100  # far below --dist-timeout 200
    (_, err0), (_, err1) = results
    assert procs[0].returncode == 1 and procs[1].returncode == 1, (err0[-2000:], err1[-2000:])
    last0 = err0.strip().splitlines()[-1]
    assert last0.startswith("[rank 0] error: cannot write ") and "at step 2" in last0 and "IsADirectoryError" in last0, err0
    assert "no checkpoint was saved" in last0, last0
    last1 = err1.strip().splitlines()[-1]
    assert last1.startswith("[rank 1] error: in step 3: ") and "another rank failed first" in last1, err1[-3000:]


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_processes_match_one(tmp_path):
    """The CPU plan's comparisons on 2 or 4 GPUs (NCCL, all of them up to 4), with inductor; one
    GPU, eager, is the reference (and the captured step on one GPU matches it)."""
    import torch

    world = 4 if torch.cuda.device_count() >= 4 else 2
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    data = tmp_path / "corpus.txt"
    data.write_bytes(synthetic_text(40_000))
    script, d, c = load_script(), ["--data", str(data)], common("cuda")
    script.main([*d, *c, "--batch-size", "4", "--eager", "--out", str(tmp_path / "single")])
    script.main([*d, *c, "--batch-size", "4", "--out", str(tmp_path / "single_graphs")])
    script.main([*d, *c, "--batch-size", "4", "--stop-at", str(STOP), "--out", str(tmp_path / "single_to_fsdp")])
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(gpu_plan(tmp_path, data, world)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           str(plan_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.stdout.count("SUMMARY") == len(gpu_plan(tmp_path, data, world)) - 1, proc.stderr[-5000:]
    for name in ("single_graphs", "ddp", "fsdp", "ddp_compiled", "fsdp_compiled", "ddp_graphs", "single_to_fsdp"):
        assert_same_losses(tmp_path / name, tmp_path / "single", GPU_TOL)
    assert all(s["backwards"] == 1 for s in reductions(tmp_path / "ddp"))
    assert all(s["reduce_scatters"] == 3 for s in reductions(tmp_path / "fsdp"))
    assert proc.returncode != 0 and "[rank 1] error: in step 3: RuntimeError: injected failure" in proc.stderr


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_captured_step_under_ddp_on_one_gpu(tmp_path):
    """Two processes sharing one GPU (gloo; the layout of two one-GPU nodes) in DDP's CUDA default
    (compiled blocks, the step as two graphs around one all-reduce, two micro-batches, evaluation
    and sampling between replays): one process' losses with the whole batch; stopped and
    resumed in that mode, the uninterrupted run's; and one process' checkpoint resumes there."""
    import torch

    data = tmp_path / "corpus.txt"
    data.write_bytes(synthetic_text(40_000))
    script, d, c = load_script(), ["--data", str(data)], common("cuda")
    script.main([*d, *c, "--batch-size", "4", "--eager", "--out", str(tmp_path / "single")])
    script.main([*d, *c, "--batch-size", "4", "--stop-at", str(STOP), "--out", str(tmp_path / "single_to_ddp")])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}
    ranks = [sys.executable, str(SCRIPT), "--dist-backend", "gloo"]
    for argv in ([*d, *c, "--batch-size", "2", "--out", str(tmp_path / "ddp_graphs")],
                 [*d, *c, "--batch-size", "2", "--stop-at", str(STOP), "--out", str(tmp_path / "stopped")],
                 ["--out", str(tmp_path / "stopped"), "--resume", "--no-progress", "--log-every", "1"],
                 ["--out", str(tmp_path / "single_to_ddp"), "--resume", "--no-progress", "--log-every", "1"]):
        procs, results = two_ranks([*ranks, *argv], {**env, "MASTER_PORT": str(free_port())}, timeout=600,
                                   local_ranks=(0, 0))
        assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in results]
        assert results[0][0].count("SUMMARY") == 1 and "SUMMARY" not in results[1][0]
    summary = json.loads((tmp_path / "ddp_graphs" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp"
    assert summary["cuda_graphs"] is True and summary["compile"] == "inductor"
    for name in ("ddp_graphs", "stopped", "single_to_ddp"):
        assert_same_losses(tmp_path / name, tmp_path / "single", GPU_TOL)
    # AdamW hides the gradients' scale from the losses; its second moments show a sum over the
    # ranks that was not divided by the world size (4x here)
    moments = {name: sum(float(s["exp_avg_sq"].sum()) for s in torch.load(tmp_path / name / "checkpoint.pt",
                                                                          weights_only=True)["optimizer"]["state"].values())
               for name in ("ddp_graphs", "single")}
    assert 0.8 < moments["ddp_graphs"] / moments["single"] < 1.25, moments


@pytest.mark.gpu
@requires_cuda
def test_gpu_failing_rank_without_torchrun_stops_at_the_timeout(tmp_path):
    """NCCL does not see a peer's exit: the surviving rank must stop after --dist-timeout (the
    watchdog), not hang. Rank 0 cannot write its checkpoint at step 2, as in the CPU test."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    data = tmp_path / "corpus.txt"
    data.write_bytes(synthetic_text(20_000))
    out = tmp_path / "run"
    (out / "checkpoint.pt.tmp").mkdir(parents=True)
    cmd = [sys.executable, str(SCRIPT), "--data", str(data), "--steps", "6", "--eval-every", "2", "--dense",
           "--seq-len", "32", "--batch-size", "2", "--dim", "16", "--depth", "1", "--eval-batches", "1",
           "--generate-every", "0", "--no-progress", "--log-every", "1", "--device", "cuda", "--dist-timeout", "30",
           "--out", str(out)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    t0 = time.monotonic()
    procs, results = two_ranks(cmd, env, timeout=240)
    (_, err0), (_, err1) = results
    assert procs[0].returncode == 1 and "[rank 0] error: cannot write " in err0, err0[-3000:]
    assert procs[1].returncode != 0, err1[-3000:]  # the watchdog's abort, or our line after a NCCL error
    assert time.monotonic() - t0 < 200, (err0[-2000:], err1[-2000:])


if __name__ == "__main__":
    driver(sys.argv[1])
