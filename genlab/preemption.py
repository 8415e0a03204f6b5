"""Stop cleanly on a termination signal: checkpoint, requeue on SLURM, continue later.

SLURM signals a job shortly before its time limit or a preemption (submitit requests
SIGUSR2, `#SBATCH --signal` scripts often use SIGUSR1) and sends SIGTERM when it ends it.
On any of these the run finishes the training step in progress, saves last.ckpt and
stops. train.py then closes the loggers and, under SLURM, requeues the job: the requeue
comes last because SLURM responds to it by sending SIGTERM to every process of the job,
the W&B service among them. The requeued job resumes from last.ckpt in the same run
directory (see genlab/resume.py), at the same global step.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import Callback

from genlab.resume import LastCheckpoint

log = logging.getLogger(__name__)


class StopOnSignal(Callback):
    """Save a checkpoint at the next step boundary after one of `signals`, then stop.

    Args:
        signals: names of the signals to handle, such as ["SIGUSR1", "SIGUSR2", "SIGTERM"].
        requeue: under SLURM, requeue the job with `scontrol requeue` (see `finish`).
    """

    def __init__(
        self, signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGUSR2", "SIGTERM"),
        requeue: bool = True,
    ) -> None:  # fmt: skip
        unknown = [name for name in signals if not hasattr(signal, name)]
        if unknown:
            raise ValueError(
                f"callbacks.stop_on_signal.signals has unknown signal names {unknown}; "
                "use names such as SIGUSR1, SIGUSR2 and SIGTERM"
            )
        self.signals = [getattr(signal, name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.checkpoint_path: str | None = None
        self._run_dir = ""
        self._is_global_zero = True
        self._previous_handlers: dict[int, Any] = {}

    @property
    def stopped(self) -> bool:
        """Whether training stopped because of a signal."""
        return self.checkpoint_path is not None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed once training starts, so that these handlers replace those of Lightning's
        # SLURM plugin and of submitit, which would stop without a usable checkpoint.
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            log.warning(
                "Received %s: stopping after the current training step",
                signal.Signals(signum).name,
            )

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.stopped or not self._any_rank_received(trainer):
            return
        path = _last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self.checkpoint_path = path
        self._run_dir = trainer.default_root_dir
        self._is_global_zero = trainer.is_global_zero
        trainer.should_stop = True
        if trainer.is_global_zero:
            signal_name = signal.Signals(self.received).name if self.received else "a signal"
            log.warning(
                "Stopped on %s at global step %d; saved %s",
                signal_name, trainer.global_step, path,
            )  # fmt: skip

    def finish(self) -> None:
        """Requeue the SLURM job, or log how to continue; call after the loggers are closed."""
        if not self.stopped or not self._is_global_zero:
            return
        job_id = slurm_job_id()
        if self.requeue and job_id is not None:
            _requeue(job_id)
        else:
            log.warning("Continue this run with: %s", continue_command(self._run_dir))

    def _any_rank_received(self, trainer: L.Trainer) -> bool:
        # A signal may reach some processes and not others; all must stop at the same step.
        received = self.received is not None
        if trainer.world_size > 1:
            flag = torch.tensor(int(received), device=trainer.strategy.root_device)
            received = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        return received


# Signals a DataLoader worker ignores. SLURM sends its signals to every process of the
# job, and a worker killed by one would fail the run before it can save a checkpoint. The
# workers end with the main process anyway.
WORKER_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def init_dataloader_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore stop signals, and seed as Lightning would."""
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Lightning adds its own worker_init_fn only to loaders without one; with
    # seed_everything(workers=True), which train.py uses, it sets PL_SEED_WORKERS.
    if os.environ.get("PL_SEED_WORKERS") == "1":
        pl_worker_init_function(worker_id)


def continue_command(run_dir: str) -> str:
    """Return the command that resumes the run in `run_dir` with the overrides it started with."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    repeated = [
        override
        for override in overrides
        if not override.startswith(("hydra.run.dir=", "resume=", "ckpt_path="))
    ]
    return shlex.join(
        ["python", "train.py", *repeated, f"hydra.run.dir={run_dir}", "resume=auto"]
    )


def _last_checkpoint_path(trainer: L.Trainer) -> str:
    """Path of last.ckpt, where the LastCheckpoint callback (or else the run) keeps it."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, LastCheckpoint):
            return callback.path
    return str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")


def slurm_job_id() -> str | None:
    """Return the id `scontrol requeue` takes for this SLURM job (an array task's own id)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def _requeue(job_id: str) -> None:
    result = subprocess.run(
        ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
    )
    if result.returncode == 0:
        log.warning("Requeued SLURM job %s; it resumes from the checkpoint", job_id)
    else:
        log.error(
            "scontrol requeue %s failed (exit %d): %s. Resubmit the job to continue.",
            job_id, result.returncode, result.stderr.strip(),
        )  # fmt: skip
