"""Multiruns submitted to SLURM with hydra/launcher=slurm, on a real one-node cluster.

The cluster (tests/slurm_cluster.py) starts once for the module. Its tests are skipped,
with the reason, where SLURM or MUNGE is not installed or the user is not root.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from slurm_cluster import SlurmCluster, local_slurm_cluster

# Seconds a whole sweep may take. A job that dies without submitit's result file (killed
# by a signal, say) makes the launcher wait forever, because submitit queries sacct for
# the job's state, and sacct needs an accounting database that the test cluster lacks.
SWEEP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    with local_slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@dataclass
class Sweep:
    """A finished `train.py -m hydra/launcher=slurm` run and the directories it made."""

    result: subprocess.CompletedProcess
    sweep_dir: Path

    @property
    def submitit_dir(self) -> Path:
        return self.sweep_dir / ".submitit"

    def array_job_id(self) -> str:
        """Return the id of the one job array the sweep submitted."""
        scripts = list(self.submitit_dir.glob("*/*_submission.sh"))
        assert len(scripts) == 1, f"expected one sbatch script, found {scripts}"
        return scripts[0].parent.name


def slurm_sweep_command(
    cluster: SlurmCluster, cwd: Path, overrides: list[str]
) -> tuple[list[str], dict[str, str]]:
    """Return the command and environment of `python train.py -m hydra/launcher=slurm ...`.

    Tests that signal a job while the sweep runs start it with subprocess.Popen.
    """
    env = {
        **cluster.env,
        "PYTHONUNBUFFERED": "1",
        "GENLAB_DATA_DIR": str(cwd / "data"),
        # Each job unpickles the task function in `python -m submitit.core._submit`, which
        # imports genlab by name. `make setup` installs genlab into the venv, and this path
        # makes the test independent of that install.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={cluster.partition}",
        # With a limit under 10 minutes, submitit counts every signal as a time-out, so a
        # job is requeued only while hydra.launcher.max_num_timeout allows.
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.cpus_per_task=1",
        *overrides,
    ]
    return command, env


def run_slurm_sweep(cluster: SlurmCluster, cwd: Path, overrides: list[str]) -> Sweep:
    """Run a sweep on the cluster from `cwd`, check that it succeeded, and return it."""
    command, env = slurm_sweep_command(cluster, cwd, overrides)
    try:
        result = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        queue = subprocess.run(
            ["squeue", "--states=all"], env=cluster.env, capture_output=True, text=True
        ).stdout
        pytest.fail(
            f"the sweep did not finish within {SWEEP_TIMEOUT_S} s.\n{queue}\n"
            f"{_text(error.stdout)[-3000:]}\n{_text(error.stderr)[-3000:]}\n{cluster.log_tail()}"
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    sweep_dirs = list((cwd / "logs").glob("*/multiruns/*"))
    assert len(sweep_dirs) == 1, f"expected one sweep directory, found {sweep_dirs}"
    return Sweep(result=result, sweep_dir=sweep_dirs[0])


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


@pytest.fixture(scope="module")
def smoke_sweep(slurm_cluster, tmp_path_factory) -> Sweep:
    """Two smoke runs of the default VAE (seed=1,2), each one a SLURM job."""
    cwd = tmp_path_factory.mktemp("slurm_sweep")
    return run_slurm_sweep(slurm_cluster, cwd, ["debug=smoke", "logger=csv", "seed=1,2"])


# ---------------------------------------------------------------------- the preset


def test_slurm_preset_runs_one_task_per_device(compose):
    cfg = compose("hydra/launcher=slurm", "trainer.devices=2")
    assert cfg.hydra.launcher.tasks_per_node == 2
    assert cfg.hydra.launcher.nodes == 1


def test_slurm_preset_keeps_submitit_files_in_sweep_dir(compose):
    cfg = compose("hydra/launcher=slurm")
    assert cfg.hydra.launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"


# ---------------------------------------------------------------------- a submitted sweep


def test_sweep_submits_one_job_array(smoke_sweep, slurm_cluster):
    array_id = smoke_sweep.array_job_id()
    script = (smoke_sweep.submitit_dir / array_id / f"{array_id}_submission.sh").read_text()
    sbatch_lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --array=0-1%2" in sbatch_lines
    assert f"#SBATCH --partition={slurm_cluster.partition}" in sbatch_lines
    assert "#SBATCH --time=5" in sbatch_lines
    assert "#SBATCH --ntasks-per-node=1" in sbatch_lines
    assert "#SBATCH --cpus-per-task=1" in sbatch_lines
    assert "#SBATCH --signal=USR2@120" in sbatch_lines
    assert any(line.startswith("srun ") for line in script.splitlines())


def test_sweep_jobs_complete_in_slurm(smoke_sweep, slurm_cluster):
    array_id = smoke_sweep.array_job_id()
    tasks = slurm_cluster.wait_until_ended(array_id)
    tasks.sort(key=lambda task: task["ArrayTaskId"])
    assert [task["ArrayTaskId"] for task in tasks] == ["0", "1"]
    for task in tasks:
        assert task["JobState"] == "COMPLETED", task
        assert task["ExitCode"] == "0:0", task
        assert task["Partition"] == slurm_cluster.partition


@pytest.mark.parametrize("job_num", [0, 1])
def test_sweep_job_ran_as_array_task(smoke_sweep, job_num):
    job_id = f"{smoke_sweep.array_job_id()}_{job_num}"
    submitit_log = (smoke_sweep.submitit_dir / job_id / f"{job_id}_0_log.out").read_text()
    assert f"Starting with JobEnvironment(job_id={job_id}," in submitit_log
    assert (smoke_sweep.submitit_dir / job_id / f"{job_id}_0_result.pkl").is_file()
    hydra_config = yaml.safe_load(
        (smoke_sweep.sweep_dir / str(job_num) / ".hydra" / "hydra.yaml").read_text()
    )
    assert hydra_config["hydra"]["job"]["id"] == job_id


@pytest.mark.parametrize("job_num, seed", [(0, 1), (1, 2)])
def test_sweep_job_dir_contains_run_outputs(smoke_sweep, job_num, seed):
    job_dir = smoke_sweep.sweep_dir / str(job_num)
    config = yaml.safe_load((job_dir / "config.yaml").read_text())
    assert config["seed"] == seed
    checkpoints = sorted(path.name for path in (job_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("best-") for name in checkpoints)
    summary = json.loads((job_dir / "summary.json").read_text())
    assert "val/nelbo" in summary["final"]
    last_checkpoint = (job_dir / "checkpoints" / "last.ckpt").resolve()
    assert Path(summary["last_checkpoint"]).resolve() == last_checkpoint


# ---------------------------------------------------------------------- checks and requeue


def test_tasks_per_node_must_match_devices(slurm_cluster, tmp_path):
    command, env = slurm_sweep_command(
        slurm_cluster, tmp_path, ["debug=smoke", "hydra.launcher.tasks_per_node=2", "seed=1,2"]
    )
    jobs_before = slurm_cluster.run("squeue", "--noheader", "--states=all").stdout
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "hydra.launcher.tasks_per_node=2 does not match trainer.devices=1" in output
    assert not list(tmp_path.glob("logs/*/multiruns/*/.submitit")), "a job was submitted"
    jobs_after = slurm_cluster.run("squeue", "--noheader", "--states=all").stdout
    assert jobs_after == jobs_before, "a job was submitted"


def test_signalled_job_saves_requeues_and_finishes(slurm_cluster, tmp_path):
    """SIGUSR2, the signal submitit requests from SLURM before the time limit, mid-training."""
    max_steps = 1500
    command, env = slurm_sweep_command(
        slurm_cluster,
        tmp_path,
        [
            "debug=smoke",
            "model.fid=null",
            "callbacks.rich_progress_bar=null",
            f"trainer.max_steps={max_steps}",
            "trainer.max_epochs=1000",
            "trainer.limit_train_batches=50",
            "trainer.limit_val_batches=1",
            "seed=3",
        ],
    )
    sweep = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        job_dir = _wait_for(lambda: next(iter(tmp_path.glob("logs/*/multiruns/*/0")), None))
        _wait_for(lambda: (job_dir / "checkpoints" / "last.ckpt").is_file() or None)
        # The SLURM job id, <array job id>_0, as the job recorded it.
        hydra_config = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())
        job_id = hydra_config["hydra"]["job"]["id"]
        slurm_cluster.run("scancel", "--signal=USR2", job_id)

        # The requeued job waits in PENDING for its BeginTime (about 11 s on this cluster)
        # and then runs again, as on a real cluster. Moving its start time forward with
        # `scontrol update StartTime=now` once made SLURM 22.05 fail the job instead.
        output, _ = sweep.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output[-3000:]

    log = (job_dir / "train.log").read_text()
    assert "Received SIGUSR2: stopping after the current training step" in log
    assert f"Requeued SLURM job {job_id}" in log
    assert "Training, resuming from" in log
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["global_step"] == max_steps

    # Every optimizer step appears once in the CSV log: none lost, none repeated.
    with open(job_dir / "csv" / "metrics.csv", newline="") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert steps == list(range(max_steps))

    # The requeued job continued the same W&B run.
    run_files = sorted((job_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    assert len({path.stem for path in run_files}) == 1
    run_info = json.loads((job_dir / "run_info.json").read_text())
    assert len(run_info["resumed"]) == 1
    assert int(slurm_cluster.jobs(job_id)[0]["Restarts"]) == 1


def _wait_for(condition, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value is not None:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"condition not met within {timeout_s} s")
