"""Multirun support: W&B names for the jobs of a sweep, failed jobs, and the sweep's report.

A failed job of a multirun must not stop the sweep. Hydra's basic sweeper raises the first
failed job's exception once its batch of jobs has run, and the Optuna sweeper stops at its
`max_failure_rate`. So train.py catches the error of a multirun job itself: it writes the
error into the job's summary.json and log, and returns a `FailedJob` in place of the metric.
Optuna marks that trial failed (the value cannot be converted to a float), the basic sweeper
ignores it, and `SweepReport` counts the failed jobs when the sweep ends.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


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

    Optuna's sweeper converts a job's return value with float(); this object refuses, so the
    trial is marked failed, and its text (the error) appears in Optuna's warning.
    """

    def __init__(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"

    def __float__(self) -> float:
        raise TypeError(self.error)

    def __repr__(self) -> str:
        return f"job failed with {self.error}"


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Write the error of a failed run into `<run_dir>/summary.json`."""
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
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, log how many jobs failed and exit non-zero if any.

    It reads the summary.json that each job directory holds. A job directory without one
    (a job killed from outside, say) counts as failed.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra 1.3 builds the sweeper and the launcher before any job sets HydraConfig, and
        # the sweep directory resolves ${hydra:...} values (through paths.log_dir and
        # task_name). Hydra calls this hook before it builds them.
        HydraConfig.instance().set_config(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failures = []
        job_dirs = _job_dirs(sweep_dir)
        for job_dir in job_dirs:
            status, error = _job_status(job_dir)
            if status != "finished":
                failures.append((job_dir, error or f"status {status}"))

        for job_dir, error in failures:
            log.error("Job %s failed: %s", job_dir.name, error.splitlines()[0])
        if failures:
            log.error(
                "Sweep finished: %d of %d jobs failed; see summary.json and train.log in "
                "their directories under %s",
                len(failures), len(job_dirs), sweep_dir,
            )  # fmt: skip
            logging.shutdown()
            sys.exit(1)
        log.info("Sweep finished: all %d jobs succeeded (%s)", len(job_dirs), sweep_dir)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep: those Hydra wrote a config into."""
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
