"""Callbacks that report on the run as a whole."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from genlab.loggers import wandb_identity
from genlab.metrics import is_lower_better
from genlab.run_dir import write_json
from genlab.samples import samples_dir

log = logging.getLogger(__name__)


class RunSummary(Callback):
    """Track the best value of every validation metric and report the run when fit ends.

    The best value is tracked for the validation metrics that are better when lower:
    losses, perplexity, negative ELBO, bits, reconstruction error and FID. The metric that
    chooses the best checkpoint is tracked in its checkpoint callback's direction. Other
    metrics, such as the KL term or a GAN's losses, get only a final value.

    Each new best value is also written to the summary of the W&B run as `best/<metric>`,
    next to W&B's own last value, so the runs table can sort runs by their best result.

    The report is printed and written to `<run dir>/summary.json`: final and best metrics,
    the run directory, the best and last checkpoints, the sample images, the W&B run and,
    for offline W&B runs, the sync command.
    """

    def __init__(self) -> None:
        self.best: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self._trained = False
        # Metric key -> "min" or "max" for the metrics with a direction other than by name.
        self._modes: dict[str, str] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if callback.monitor is not None:
                self._modes[callback.monitor] = callback.mode

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self._trained = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epoch-level metrics reach callback_metrics after on_validation_epoch_end hooks run.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        improved = {}
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("val/"):
                continue
            value = float(value)
            self.final[key] = value
            mode = self._modes.get(key, "min" if is_lower_better(key) else None)
            if mode is None or math.isnan(value):
                continue
            previous = self.best.get(key)
            if previous is None or (value < previous if mode == "min" else value > previous):
                self.best[key] = improved[key] = value
        if improved:
            _publish_best(trainer, improved)

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "final": dict(self.final)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = dict(state_dict.get("best", {}))
        self.final = dict(state_dict.get("final", {}))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.default_root_dir)
        if not self._trained and (run_dir / "summary.json").is_file():
            # A resumed run that had nothing left to train keeps the summary it had.
            log.info("No training step ran; %s is unchanged", run_dir / "summary.json")
            return
        summary = self.summarize(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "summary.json", summary)
        _print_summary(summary)
        # The table above goes to the terminal only; these lines also reach train.log.
        log.info(
            "Run %s at global step %d; summary written to %s",
            summary["status"],
            summary["global_step"],
            run_dir / "summary.json",
        )
        log.info(
            "Final validation metrics: %s",
            ", ".join(
                f"{key}={value:.6g}"
                for key, value in summary["final"].items()
                if key.startswith("val/")
            )
            or "none",
        )
        log.info("Best checkpoint: %s", summary["best_checkpoint"] or "none")

    def summarize(self, trainer: L.Trainer) -> dict:
        """Collect the facts of the run into a JSON-serialisable dict."""
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/"):
                self.final[key] = float(value)

        # The best checkpoint comes from the callback with a monitor, the last one from the
        # callback without (see conf/callbacks/default.yaml).
        checkpoints = trainer.checkpoint_callbacks
        best = next((c.best_model_path for c in checkpoints if c.monitor is not None), "")
        last = next((c.last_model_path for c in checkpoints if c.monitor is None), "")
        sample_folder = samples_dir(trainer)
        stopped = any(getattr(c, "stopped", False) for c in trainer.callbacks)
        summary = {
            # "finished", or "stopped" on a signal; train.py writes "failed" on an error.
            "status": "stopped" if stopped else "finished",
            "run_dir": str(Path(trainer.default_root_dir).resolve()),
            "global_step": trainer.global_step,
            "final": dict(sorted(self.final.items())),
            "best": dict(sorted(self.best.items())),
            "best_checkpoint": best or None,
            "last_checkpoint": last or None,
            "samples_dir": str(sample_folder.resolve()) if sample_folder.exists() else None,
            "wandb": None,
            "wandb_sync": None,
        }
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                summary["wandb"] = wandb_identity(logger)
                if summary["wandb"]["mode"] == "offline":
                    # experiment.dir is <run>/wandb/offline-run-<time>-<id>/files.
                    summary["wandb_sync"] = f"wandb sync {Path(logger.experiment.dir).parent}"
        return summary


@rank_zero_only
def _publish_best(trainer: L.Trainer, best: dict[str, float]) -> None:
    """Write new best values into the summary of each W&B run, as best/<metric>."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({f"best/{key}": value for key, value in best.items()})


class FailOnNonFinite(Callback):
    """Fail the run as soon as a training or validation metric is NaN or infinite.

    A diverged run otherwise trains on for hours and saves useless checkpoints. In a
    sweep, the failure marks the job failed and the sweep goes on with the others.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self._check(trainer, "train/")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, "val/")

    @staticmethod
    def _check(trainer: L.Trainer, prefix: str) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and not torch.isfinite(value).all():
                raise NonFiniteMetricError(
                    f"{key} is {value.item()} at global step {trainer.global_step}: training "
                    "diverged. Lower the learning rate (model.lr, or model.generator_lr and "
                    "model.discriminator_lr), or clip gradients with trainer.gradient_clip_val."
                )


class NonFiniteMetricError(ArithmeticError):
    """A logged metric is NaN or infinite."""


def _print_summary(summary: dict) -> None:
    table = Table(title="Run summary", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    for key in sorted(set(summary["final"]) | set(summary["best"])):
        final = summary["final"].get(key)
        best = summary["best"].get(key)
        table.add_row(key, _format(final), _format(best))

    console = Console()
    console.print(table)
    lines = [
        f"Run directory:    {summary['run_dir']}",
        f"Best checkpoint:  {summary['best_checkpoint'] or '(none)'}",
        f"Last checkpoint:  {summary['last_checkpoint'] or '(none)'}",
        f"Samples:          {summary['samples_dir'] or '(none)'}",
    ]
    if summary["wandb_sync"]:
        lines.append(f"W&B ran offline; upload with: {summary['wandb_sync']}")
    for line in lines:
        # Paths stay on one line so that they can be copied from the terminal.
        console.print(line, soft_wrap=True, highlight=False)


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
