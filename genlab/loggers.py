"""Weights & Biases set-up that falls back to offline mode instead of waiting for the network."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hydra
import lightning.pytorch.loggers
import wandb
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

from genlab.ddp import is_global_zero
from genlab.run_dir import flatten_config
from genlab.sweep import wandb_run_identity

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")
DEFAULT_WANDB_URL = "https://api.wandb.ai"
# Seconds to wait for the W&B server before falling back to offline mode.
CONNECT_TIMEOUT_S = 3.0


def wandb_logger(
    mode: str = "auto",
    project: str = "genlab",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    job_type: str = "train",
    save_dir: str = ".",
) -> WandbLogger:
    """Build a WandbLogger, online only when credentials are set and the server responds.

    In "auto" mode the logger runs offline when there is no API key (WANDB_API_KEY or an
    entry for the W&B host in ~/.netrc) or when the server cannot be reached within a few
    seconds. Offline runs are written under `<save_dir>/wandb/` and can be uploaded later
    with `wandb sync`.

    When `<save_dir>/wandb/` already contains a run, as it does for a run directory that is
    resumed, the logger continues that W&B run (same id) instead of starting another.
    """
    if mode not in WANDB_MODES:
        raise ValueError(
            f"logger.wandb.mode={mode!r} is invalid: use one of {', '.join(WANDB_MODES)}"
        )

    resolved = resolve_wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    # Only global rank 0 creates the W&B run, so only it logs the upload command.
    if resolved == "offline" and is_global_zero():
        log.info(
            "W&B runs offline; upload this run later with: wandb sync %s",
            Path(save_dir).resolve() / "wandb" / "offline-run-*",
        )
    # Only rank 0 writes W&B files; other ranks would find rank 0's new run here.
    run_id = existing_run_id(Path(save_dir)) if is_global_zero() else None
    if run_id is not None:
        log.info("Continuing W&B run %s", run_id)
    return WandbLogger(
        project=project,
        id=run_id,
        resume="allow" if run_id is not None else None,
        entity=entity,
        name=name,
        group=group,
        tags=list(tags) if tags else None,
        job_type=job_type,
        save_dir=save_dir,
        offline=resolved == "offline",
        mode=resolved,
        # The run summary gives the sync command; W&B's own end-of-run history table would
        # push it out of view.
        settings=wandb.Settings(quiet=True),
    )


def build_loggers(logger_cfg: DictConfig | None, task_name: str) -> list[Logger]:
    """Instantiate the loggers; an unset W&B group and name describe the sweep and the job."""
    if not logger_cfg:
        return []
    loggers = []
    for name, node in logger_cfg.items():
        if node is None or "_target_" not in node:
            continue
        log.info("  %s <%s>", name, node._target_)
        if node._target_ == "genlab.loggers.wandb_logger":
            group, run_name = wandb_run_identity(task_name)
            node.group = node.get("group") or group
            node.name = node.get("name") or run_name
        loggers.append(hydra.utils.instantiate(node))
    return loggers


def finish_wandb_run(exit_code: int) -> None:
    """Close the W&B run of this process, if one is open, marking it with `exit_code`."""
    if wandb.run is None:
        return
    try:
        wandb.finish(exit_code=exit_code)
    except Exception as error:  # the W&B service may be gone, e.g. after a signal
        log.warning("Could not close the W&B run: %s", error)


def log_config(loggers: list[Logger], config: dict[str, Any]) -> None:
    """Send the run's resolved config to every logger.

    W&B gets it flattened to dotted keys ("model.lr"), one column per setting in the runs
    table, so runs can be filtered, grouped and plotted by any setting. The other loggers
    get it nested, as config.yaml has it.
    """
    for logger in loggers:
        flat = isinstance(logger, WandbLogger)
        logger.log_hyperparams(flatten_config(config) if flat else config)


def wandb_identity(logger: WandbLogger) -> dict[str, Any]:
    """Return the identity of the logger's W&B run: project, group, name, id, job type, mode."""
    run = logger.experiment
    return {
        "project": run.project,
        "group": run.group or None,
        "name": run.name,
        "id": run.id,
        "job_type": run.job_type,
        "mode": "offline" if getattr(run, "offline", False) else "online",
    }


def existing_run_id(save_dir: Path) -> str | None:
    """Id of the newest W&B run under `<save_dir>/wandb/`, or None when there is none.

    W&B names each run's folder run-<time>-<id> (offline-run-<time>-<id> offline).
    """
    folders = [path for path in (save_dir / "wandb").glob("*run-*-*") if path.is_dir()]
    folders.sort(key=lambda path: path.name.split("run-", 1)[1])
    return folders[-1].name.rsplit("-", 1)[1] if folders else None


def resolve_wandb_mode(mode: str) -> str:
    """Return "online", "offline" or "disabled" for the configured mode and this machine."""
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        # wandb also accepts "dryrun" as an old name of "offline".
        env_mode = "offline" if env_mode == "dryrun" else env_mode
        if env_mode != mode and mode != "auto":
            log.info("WANDB_MODE=%s overrides logger.wandb.mode=%s", env_mode, mode)
        return env_mode
    if mode != "auto":
        return mode

    url = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL))
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    if not _has_api_key(host):
        log.info("No W&B API key found (WANDB_API_KEY or ~/.netrc), so W&B runs offline")
        return "offline"
    if not _is_reachable(host, port):
        log.info("W&B server %s:%d is unreachable, so W&B runs offline", host, port)
        return "offline"
    return "online"


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False


def _is_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


class CSVLogger(lightning.pytorch.loggers.CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to its metrics.csv.

    Lightning's own writer deletes an existing metrics.csv when it starts, which would
    lose the history of a run that resumes in its own directory.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Called by the constructor in place of the check that deletes the file. The writer
        # appends rows under the existing header, whose columns Lightning keeps sorted.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))
