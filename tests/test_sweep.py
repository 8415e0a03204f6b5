"""Sweeps with real Hydra multirun and Optuna: job directories, W&B runs, failures, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_train
from wandb_records import read_run

SMOKE = ["debug=smoke", "model.fid=null"]
TINY_GPT = [
    "experiment=embedded_gpt",
    "debug=smoke",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.warmup_steps=0",
    "model.sample_length=8",
    "data.block_size=16",
]


def sweep_dir(cwd: Path, task_name: str) -> Path:
    sweeps = list((cwd / "logs" / task_name / "multiruns").iterdir())
    assert len(sweeps) == 1, f"expected one sweep directory, found {sweeps}"
    return sweeps[0]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((path for path in sweep.iterdir() if path.is_dir()), key=lambda p: int(p.name))


def wandb_files(job_dir: Path) -> list[Path]:
    return list((job_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("grid")
    result = run_train(["-m", *SMOKE, "model.lr=1e-3,3e-4", "seed=1,2"], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, result


def test_grid_sweep_job_directories(grid_sweep):
    cwd, result = grid_sweep
    sweep = sweep_dir(cwd, "vae_digits")
    jobs = job_dirs(sweep)
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    files = sorted(path.name for path in sweep.iterdir() if path.is_file())
    assert files == ["multirun.yaml", "sweep_summary.json"]
    assert not (cwd / "logs" / "vae_digits" / "runs").exists(), "a job wrote a single-run dir"
    tried = set()
    for job in jobs:
        assert summary(job)["status"] == "finished"
        assert (job / "checkpoints" / "last.ckpt").is_file()
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        tried.add(tuple(sorted(o for o in overrides if o.startswith(("model.lr", "seed")))))
    assert len(tried) == 4
    assert "Sweep finished: all 4 jobs succeeded" in result.stdout


def test_grid_sweep_wandb_runs_and_group(grid_sweep):
    cwd, _ = grid_sweep
    sweep = sweep_dir(cwd, "vae_digits")
    runs = []
    for job in job_dirs(sweep):
        files = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, f"{job} has {len(files)} W&B runs"
        runs.append(read_run(files[0]))
    assert len({run["id"] for run in runs}) == 4
    assert {run["group"] for run in runs} == {f"vae_digits-{sweep.name}"}
    names = {run["name"] for run in runs}
    for lr in ("model.lr=0.001", "model.lr=0.0003"):
        for seed in ("seed=1", "seed=2"):
            assert any(lr in name and seed in name for name in names), names


def test_failed_jobs_do_not_stop_the_sweep(tmp_path):
    # Jobs: (1e30, 8) diverges to a NaN loss, (1e30, 0) and (1e-3, 0) have an invalid batch
    # size, and (1e-3, 8), launched after two failures, must still run and finish.
    result = run_train(
        ["-m", *TINY_GPT, "model.lr=1e30,1e-3", "data.batch_size=8,0"], tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    jobs = job_dirs(sweep_dir(tmp_path, "gpt_embedded_text"))
    statuses = {job.name: summary(job)["status"] for job in jobs}
    assert statuses == {"0": "failed", "1": "failed", "2": "finished", "3": "failed"}, statuses
    nan_job, bad_value_job = summary(jobs[0]), summary(jobs[1])
    assert "NonFiniteMetricError: train/loss is nan" in nan_job["error"]
    assert "data.batch_size=0 is invalid" in bad_value_job["error"]
    assert "NonFiniteMetricError" in (jobs[0] / "train.log").read_text()
    assert (jobs[2] / "checkpoints" / "last.ckpt").is_file()
    # The diverged job's W&B run was closed, so the next job logged into a run of its own.
    failed_run, = (read_run(path) for path in wandb_files(jobs[0]))
    finished_run, = (read_run(path) for path in wandb_files(jobs[2]))
    assert failed_run["id"] != finished_run["id"]
    last_line = [line for line in result.stdout.splitlines() if line.strip()][-1]
    assert "Sweep finished: 3 of 4 jobs failed" in last_line


def test_optuna_search_optimizes_the_metric_the_jobs_return(tmp_path):
    result = run_train(
        [
            "hparams_search=gpt_optuna",
            *TINY_GPT,
            "logger=csv",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.sampler.n_startup_trials=2",
            # A search space given on the command line replaces the preset's for that key.
            # Trials with lr=1e30 diverge; Optuna must mark them failed and go on.
            "model.lr=choice(1e30, 3e-3)",
        ],
        tmp_path,
    )
    output = result.stdout + result.stderr
    sweep = sweep_dir(tmp_path, "gpt_embedded_text")
    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    finished = [summary(job) for job in jobs if summary(job)["status"] == "finished"]
    failed = [summary(job) for job in jobs if summary(job)["status"] == "failed"]
    assert finished and failed, "the search space should give both outcomes"
    assert result.returncode == 1
    assert f"Sweep finished: {len(failed)} of 4 jobs failed" in output
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(s["final"]["val/ppl"] for s in finished))
    assert results["best_params"]["model.lr"] == 3e-3

    # sweep_summary.json names the best job, the one Optuna found best.
    report = json.loads((sweep / "sweep_summary.json").read_text())
    assert report["optimized_metric"] == "val/ppl"
    assert report["best"]["value"] == pytest.approx(results["best_value"])
    assert summary(Path(report["best"]["dir"]))["final"]["val/ppl"] == report["best"]["value"]
    assert [job["status"] for job in report["jobs"]] == [summary(job)["status"] for job in jobs]
    assert f"Best job: {report['best']['dir']}" in output


def test_optuna_search_rejects_an_unknown_metric_before_training(tmp_path):
    result = run_train(["hparams_search=vae_optuna", "optimized_metric=val/nelbow"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "optimized_metric='val/nelbow' is not a metric that VAE logs" in output
    assert "(did you mean 'val/nelbo'?)" in output
    assert "val/bpd" in output
    assert not list((tmp_path / "logs").glob("*/multiruns/*/0")), "a job started"


def test_single_run_checks_the_optimized_metric(tmp_path):
    result = run_train(["optimized_metric=val/ppl", "debug=smoke"], tmp_path)
    assert result.returncode == 2
    assert "optimized_metric='val/ppl' is not a metric that VAE logs" in result.stdout


def test_simultaneous_runs_separate_directories(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    processes = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *SMOKE, "logger=csv"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    assert [process.wait(timeout=300) for process in processes] == [0, 0]
    runs = list((tmp_path / "logs" / "vae_digits" / "runs").iterdir())
    assert len(runs) == 2
    assert all((run / "checkpoints" / "last.ckpt").is_file() for run in runs)
