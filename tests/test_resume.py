"""Resuming: resume=auto, bit-exact continuation after SIGKILL, atomic checkpoints, signals."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_train
from torch.utils.data import DataLoader, Dataset
from wandb_records import read_history

from genlab.preemption import init_dataloader_worker
from genlab.resume import AtomicCheckpointIO

# Short runs that save last.ckpt every 2 steps and validate at each epoch end (8 batches),
# so a kill can land anywhere: before or after a checkpoint, inside an epoch or at its end.
COMMON = [
    "debug=smoke",
    "trainer.max_epochs=100",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=1",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "callbacks.rich_progress_bar=null",
    "trainer.deterministic=true",
    "seed=7",
]
MODELS = {
    "vae": ["model.fid=null", "trainer.max_steps=30"],
    # A GAN's global step counts both optimizers' steps: 30 batches.
    "gan": ["experiment=digits_gan", "model.fid=null", "trainer.max_steps=60"],
    "gpt": [
        "experiment=embedded_gpt",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "model.dropout=0.1",
        "model.sample_length=8",
        "data.block_size=16",
        "trainer.max_steps=80",
    ],
}


def train_command(run_dir: Path, args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *args]


def final_weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor], list]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return checkpoint["global_step"], checkpoint["state_dict"], checkpoint["optimizer_states"]


def kill_after_first_checkpoint(command: list[str], cwd: Path, run_dir: Path) -> int:
    """Start training, SIGKILL it once a checkpoint exists; return the step it was killed at."""
    env = {**os.environ, "GENLAB_DATA_DIR": str(cwd / "data")}
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, (
        f"training ended before it could be killed (exit {process.returncode}); "
        + stderr.decode()[-2000:]
    )
    return torch.load(last, weights_only=False)["global_step"]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_sigkill_and_resume_auto_match_an_uninterrupted_run(model, tmp_path):
    args = [*COMMON, *MODELS[model], "logger=csv"]
    straight = tmp_path / "straight"
    result = run_train([f"hydra.run.dir={straight}", *args], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    killed_at = kill_after_first_checkpoint(train_command(interrupted, args), tmp_path, interrupted)
    final_step, _, _ = final_weights(straight)
    assert killed_at < final_step

    result = run_train([f"hydra.run.dir={interrupted}", "resume=auto", *args], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {interrupted / 'checkpoints' / 'last.ckpt'}" in result.stdout

    step_a, weights_a, optimizers_a = final_weights(straight)
    step_b, weights_b, optimizers_b = final_weights(interrupted)
    assert step_a == step_b
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), f"{key} differs after resuming"
    for state_a, state_b in zip(optimizers_a, optimizers_b, strict=True):
        for param_id, param_state in state_a["state"].items():
            for name, value in param_state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(
                    state_b["state"][param_id][name]
                )), f"optimizer state {name} differs after resuming"


def test_resume_auto_starts_fresh_without_checkpoint(tmp_path):
    run_dir = tmp_path / "new"
    result = run_train([f"hydra.run.dir={run_dir}", "resume=auto", "debug=smoke"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No checkpoint in" in result.stdout
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4


def test_resume_auto_continues_wandb_and_csv(tmp_path):
    run_dir = tmp_path / "run"
    first = run_train([f"hydra.run.dir={run_dir}", "debug=smoke"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(
        [
            f"hydra.run.dir={run_dir}",
            "resume=auto",
            "debug=smoke",
            "trainer.max_steps=8",
            "trainer.max_epochs=2",
        ],
        tmp_path,
    )
    assert second.returncode == 0, second.stderr[-3000:]

    run_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    run_ids = {path.stem.removeprefix("run-") for path in run_files}
    assert len(run_ids) == 1, f"the resumed run started a new W&B run: {run_ids}"
    steps = [row["trainer/global_step"] for path in run_files for row in read_history(path)
             if "train/loss" in row]  # fmt: skip
    assert steps == sorted(steps)
    assert len(steps) == len(set(steps)) == 8

    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    train_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert train_steps == list(range(8)), "the CSV log was not continued"
    run_info = json.loads((run_dir / "run_info.json").read_text())
    assert len(run_info["resumed"]) == 1
    # The settings changed on resuming are logged and recorded.
    assert "trainer.max_steps: 4 -> 8" in second.stdout
    assert run_info["resumed"][0]["changed"]["trainer.max_steps"] == [4, 8]


def test_run_dir_with_checkpoints_is_refused_without_resume(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train([f"hydra.run.dir={run_dir}", "debug=smoke"], tmp_path).returncode == 0
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    result = run_train([f"hydra.run.dir={run_dir}", "debug=smoke"], tmp_path)
    assert result.returncode == 2
    assert "resume=auto" in result.stdout + result.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_invalid_resume_value_is_rejected(tmp_path):
    result = run_train(["resume=yes"], tmp_path)
    assert result.returncode == 2
    assert "resume='yes' is invalid: use resume=auto" in result.stdout + result.stderr


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.arange(1000)}, path)
    big = torch.randn(1_000_000)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "weights": big, "bad": _FailsToPickle()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


SAVE_LOOP = """
import sys, torch
from torch.utils.data import DataLoader, Dataset

from genlab.preemption import init_dataloader_worker
from genlab.resume import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
step = 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "weights": torch.full((4_000_000,), float(step))}, path)
    print(step, flush=True)
"""


def test_sigkill_while_saving_never_leaves_a_broken_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    for delay in (0.5, 0.73, 0.91):
        process = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip().isdigit()
        time.sleep(delay)
        process.kill()
        process.wait()
        checkpoint = torch.load(path, weights_only=True)
        assert torch.all(checkpoint["weights"] == checkpoint["step"])


def test_sigterm_then_resume_is_exact(tmp_path):
    args = [*COMMON, *MODELS["vae"], "trainer.max_steps=200", "logger=csv"]
    straight = tmp_path / "straight"
    assert run_train([f"hydra.run.dir={straight}", *args], tmp_path).returncode == 0

    stopped = tmp_path / "stopped"
    env = {**os.environ, "GENLAB_DATA_DIR": str(tmp_path / "data")}
    process = subprocess.Popen(
        train_command(stopped, args), cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    last = stopped / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Received SIGTERM: stopping after the current training step" in output
    continue_line = next(line for line in output.splitlines() if "Continue this run with:" in line)
    command = shlex.split(continue_line.split("Continue this run with: ", 1)[1])
    assert command[:2] == ["python", "train.py"]
    assert command[-2:] == [f"hydra.run.dir={stopped}", "resume=auto"]
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert summary["global_step"] < 200

    # The printed command carries the run's overrides: run it as printed.
    result = run_train(command[2:], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "settings that differ" not in result.stdout
    step_a, weights_a, _ = final_weights(straight)
    step_b, weights_b, _ = final_weights(stopped)
    assert step_a == step_b == 200
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
    with open(stopped / "csv" / "metrics.csv", newline="") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert steps == list(range(200)), "steps were lost or logged twice"


class _WorkerPids(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> int:
        time.sleep(0.005)
        return os.getpid()


@pytest.mark.parametrize("worker_init_fn", [init_dataloader_worker, None])
def test_dataloader_workers_survive_slurm_signals(worker_init_fn):
    loader = DataLoader(_WorkerPids(), batch_size=4, num_workers=2, worker_init_fn=worker_init_fn)
    iterator = iter(loader)
    pids = set(next(iterator).tolist()) | set(next(iterator).tolist())
    assert len(pids) == 2
    for pid in pids:
        for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            os.kill(pid, signum)
    if worker_init_fn is None:
        # Without it, the first signal kills the worker and the loader fails.
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            list(iterator)
    else:
        assert len(list(iterator)) == 14
