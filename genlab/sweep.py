"""Multirun support: W&B names for the jobs of a sweep, failed jobs, and the sweep's report.

A failed job of a multirun must not stop the sweep. Hydra's basic sweeper raises the first
failed job's exception once its batch of jobs has run, and the Optuna sweeper stops at its
`max_failure_rate`. So train.py catches the error of a multirun job itself: it writes the
error into the job's summary.json and log, and returns a `FailedJob` in place of the metric.
Optuna marks that trial failed (the value cannot be converted to a float), the basic sweeper
ignores it, and `SweepReport` counts the failed jobs when the sweep ends.

`SweepReport` also checks, before any job starts or is submitted, what would make every
job of the sweep fail: an optimized metric the model does not log, and SLURM resources
that do not match the Trainer's devices and nodes.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from genlab.config_check import optimized_metric_problems
from genlab.metrics import is_lower_better
from genlab.run_dir import write_json

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
# Written into the sweep directory when the sweep ends: every job's status and metric.
SWEEP_SUMMARY_FILE = "sweep_summary.json"


def is_multirun() -> bool:
    """Return whether this process runs a job of a Hydra multirun (a sweep)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def wandb_run_identity(task_name: str) -> tuple[str | None, str | None]:
    """Return the W&B (group, name) of this job: the sweep, and the values the job tried.

    A job of a sweep started in logs/vae_digits/multiruns/2026-12-04_10-00-00_123456/ gets
    the group "vae_digits-2026-12-04_10-00-00_123456", and a name such as
    "model.lr=0.001,seed=1" made of its command-line overrides. A single run gets the task
    name as its group and its overrides, if any, as its name. Outside Hydra both are None.
    """
    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    name = hydra_cfg.job.override_dirname or None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"{task_name}-{Path(hydra_cfg.sweep.dir).name}", name
    return task_name, name


class FailedJob:
    """The return value of a failed multirun job, in place of its metric.

    Optuna's sweeper converts a job's return value with float(), which raises for this
    object. So Optuna marks the trial failed and prints the error in its warning.
    """

    def __init__(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"

    def __float__(self) -> float:
        raise TypeError(self.error)

    def __repr__(self) -> str:
        return f"job failed with {self.error}"


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Write the error of a failed run into `<run_dir>/summary.json` (on rank 0 only)."""
    if rank_zero_only.rank != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / SUMMARY_FILE
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    summary.update(
        status="failed",
        error=f"{type(error).__name__}: {error}",
        traceback="".join(traceback.format_exception(error)),
    )
    write_json(summary_path, summary)


class SweepReport(Callback):
    """Hydra callback that checks a multirun before it starts and reports its failed jobs.

    At the start it rejects a sweep whose every job would fail (see `sweep_problems`),
    before any job runs or is submitted. At the end it reads the summary.json of each job
    directory, logs the failed jobs and exits with status 1 if there are any. A job
    directory without summary.json (a job killed from outside, say) counts as failed.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra 1.3 builds the sweeper and the launcher before any job sets HydraConfig, and
        # the sweep directory resolves ${hydra:...} values (through paths.log_dir and
        # task_name). Hydra calls this hook before it builds them.
        HydraConfig.instance().set_config(config)
        problems = sweep_problems(config)
        if problems:
            log.error(
                "The sweep was not started:\n%s",
                "\n".join(f"  {number}. {problem}" for number, problem in enumerate(problems, 1)),
            )
            logging.shutdown()
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        job_dirs = _job_dirs(sweep_dir)
        jobs = [_job_record(job_dir, config.get("optimized_metric")) for job_dir in job_dirs]
        best = _best_job(jobs, config)
        report = {"optimized_metric": config.get("optimized_metric"), "best": best, "jobs": jobs}
        write_json(sweep_dir / SWEEP_SUMMARY_FILE, report)
        if best is not None:
            metric = report["optimized_metric"]
            log.info("Best job: %s (%s = %.6g)", best["dir"], metric, best["value"])

        failures = [job for job in jobs if job["status"] != "finished"]
        for job in failures:
            log.error("Job %s failed: %s", job["job"], textwrap.shorten(job["error"], 300))
        if failures:
            log.error(
                "Sweep finished: %d of %d jobs failed; see summary.json and train.log in "
                "their directories under %s",
                len(failures), len(job_dirs), sweep_dir,
            )  # fmt: skip
            logging.shutdown()
            sys.exit(1)
        log.info("Sweep finished: all %d jobs succeeded (%s)", len(job_dirs), sweep_dir)


def _job_record(job_dir: Path, metric: str | None) -> dict[str, Any]:
    """Return a job's entry in sweep_summary.json: its status, error and optimized metric."""
    status, error = _job_status(job_dir)
    overrides_path = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_path))
    value = None
    if metric is not None and status == "finished":
        value = json.loads((job_dir / SUMMARY_FILE).read_text()).get("final", {}).get(metric)
    return {
        "job": job_dir.name,
        "dir": str(job_dir),
        "status": status,
        "error": error or (None if status == "finished" else f"status {status}"),
        "overrides": overrides,
        "value": value,
    }


def _best_job(jobs: list[dict[str, Any]], config: DictConfig) -> dict[str, Any] | None:
    """Return the finished job with the best value of the optimized metric, or None."""
    scored = [job for job in jobs if job["value"] is not None]
    if not scored:
        return None
    # An Optuna sweep states its direction; a grid sweep follows the metric's own.
    direction = config.hydra.sweeper.get("direction")
    if direction is None:
        direction = "minimize" if is_lower_better(config.optimized_metric) else "maximize"
    pick = min if str(direction).lower().endswith("minimize") else max
    return pick(scored, key=lambda job: job["value"])


def sweep_problems(config: DictConfig) -> list[str]:
    """Return the problems of a multirun's config that would make each of its jobs fail."""
    problems = []
    key = config.get("optimized_metric")
    target = config.model.get("_target_") if config.get("model") else None
    if key is not None and target is not None:
        try:
            model_cls = hydra.utils.get_class(target)
        except Exception:  # reported by each job's config check
            model_cls = None
        model_node = OmegaConf.to_container(config.model, resolve=True)
        problems += optimized_metric_problems(key, model_cls, model_node)

    launcher = config.hydra.launcher
    if str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        trainer = config.trainer
        devices, num_nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            problems.append(
                f"trainer.devices={devices!r}: on SLURM it must be the number of devices per "
                "node, e.g. trainer.devices=4, because SLURM starts one task per device."
            )
        elif launcher.tasks_per_node != devices:
            problems.append(
                f"hydra.launcher.tasks_per_node={launcher.tasks_per_node} does not match "
                f"trainer.devices={devices}: Lightning expects SLURM to start one task per "
                f"device. Set hydra.launcher.tasks_per_node={devices}, or leave it unset to "
                "follow trainer.devices."
            )
        if launcher.nodes != num_nodes:
            problems.append(
                f"hydra.launcher.nodes={launcher.nodes} does not match trainer.num_nodes="
                f"{num_nodes}. Set both to the same number of nodes."
            )
    return problems


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Return the job directories of a sweep: those Hydra wrote a config into."""
    if not sweep_dir.is_dir():
        return []
    dirs = [path.parent.parent for path in sweep_dir.glob("*/.hydra/config.yaml")]
    return sorted(dirs, key=lambda path: (len(path.name), path.name))


def _job_status(job_dir: Path) -> tuple[str, str | None]:
    summary_path = job_dir / SUMMARY_FILE
    if not summary_path.is_file():
        return "unknown", "the job wrote no summary.json (was it killed?)"
    summary = json.loads(summary_path.read_text())
    return summary.get("status", "finished"), summary.get("error")
