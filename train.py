"""Train a generative model described by a Hydra config.

    python train.py                                  # VAE on the embedded digits
    python train.py experiment=shakespeare_char      # character-level GPT
    python train.py model.lr=1e-3 trainer.max_epochs=5 seed=0
    python train.py --cfg job                        # print the composed config
    python train.py -m model.lr=1e-3,3e-4 seed=1,2   # a sweep of four jobs
    python train.py hparams_search=vae_optuna        # an Optuna search
    python train.py hydra.run.dir=logs/vae_digits/runs/<run> resume=auto

Each run writes one directory under logs/<task_name>/runs/: the resolved config, the
checkpoints (best and last), sample images, the CSV metrics and the W&B run files.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from genlab.config_check import ConfigError, check_config
from genlab.ddp import distributed_job
from genlab.loggers import build_loggers, finish_wandb_run, log_config
from genlab.preemption import StopOnSignal
from genlab.resume import resolve_ckpt_path
from genlab.run_dir import prepare_run_dir
from genlab.sweep import FailedJob, is_multirun, record_failure

log = logging.getLogger("genlab.train")

# The datamodules store their position in the epoch in checkpoints (datamodules/sampling.py),
# which this Lightning warning about mid-epoch checkpoints does not know about.
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate the config, build every component, fit, and return the final metrics."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    check_config(cfg, choices)
    ckpt_path = resolve_ckpt_path(cfg.get("resume"), cfg.ckpt_path, Path(cfg.paths.output_dir))
    run_dir = prepare_run_dir(cfg, ckpt_path)
    log.info("Run directory: %s", run_dir)

    if cfg.seed is not None:
        log.info("Seeding every random number generator with seed=%d", cfg.seed)
        L.seed_everything(cfg.seed, workers=True, verbose=False)

    log.info("Building datamodule <%s>", cfg.data._target_)
    # _convert_="all" passes plain dicts and lists, so the hyperparameters stored in
    # checkpoints load with torch.load(weights_only=True), torch's default since 2.6.
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")

    log.info("Preparing data")
    try:
        # Downloads or checks the files now, so that missing data fails before a W&B run
        # or a model exists. Lightning calls prepare_data again; it returns at once then.
        datamodule.prepare_data()
        model_inputs = datamodule.model_inputs()
    except FileNotFoundError as error:
        raise DataNotFoundError(str(error)) from error

    log.info("Building model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all", **model_inputs)

    log.info("Building loggers")
    loggers = build_loggers(cfg.get("logger"), cfg.task_name)

    log.info("Building callbacks")
    callbacks = build_callbacks(cfg.get("callbacks"), model, has_loggers=bool(loggers))

    log.info("Building trainer <%s>", cfg.trainer._target_)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )

    log_config(trainer.loggers, OmegaConf.to_container(cfg, resolve=True))

    log.info("Training" + (f", resuming from {ckpt_path}" if ckpt_path else ""))
    trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    stop = next((c for c in trainer.callbacks if isinstance(c, StopOnSignal)), None)
    if cfg.get("validate_best") and not (stop is not None and stop.stopped):
        validate_best_checkpoint(trainer, model, datamodule)
    finish_wandb_run(exit_code=0)
    if stop is not None and stop.stopped:
        stop.finish()
        raise RunStopped(stop.received or 0)
    return metrics


def validate_best_checkpoint(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule
) -> None:
    """Validate the best checkpoint of the run, on every process; log its metrics again."""
    best = next(
        (c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor is not None), ""
    )
    if not best:
        log.warning("No best checkpoint to validate: no checkpoint callback has a monitor")
        return
    log.info("Validating the best checkpoint: %s", best)
    trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)


def build_callbacks(
    callbacks_cfg: DictConfig | None, model: L.LightningModule, has_loggers: bool
) -> list[Callback]:
    """Instantiate the callbacks; an unset checkpoint monitor follows the model's main metric."""
    if not callbacks_cfg:
        return []
    checkpoint_cfg = callbacks_cfg.get("model_checkpoint")
    if checkpoint_cfg is not None and checkpoint_cfg.get("monitor") is None:
        checkpoint_cfg.monitor = model.monitor
        checkpoint_cfg.mode = model.monitor_mode
        log.info("Best checkpoint chosen by %s (%s)", model.monitor, model.monitor_mode)

        # FID is only logged every fid.every_n_epochs validations; ModelCheckpoint fails on
        # an epoch without its monitored metric, so it saves on the FID epochs alone.
        # NOTE: this assumes validation every epoch (trainer.check_val_every_n_epoch=1).
        fid_settings = getattr(model, "fid_settings", None)
        if (
            fid_settings is not None
            and model.monitor == fid_settings.key
            and fid_settings.every_n_epochs > 1
        ):
            checkpoint_cfg.every_n_epochs = fid_settings.every_n_epochs
            log.info("Checkpoints are saved every %d epochs, with FID", fid_settings.every_n_epochs)

    callbacks = []
    for name, node in callbacks_cfg.items():
        if node is None or "_target_" not in node:
            continue
        if node._target_.endswith(".LearningRateMonitor") and not has_loggers:
            # LearningRateMonitor raises without a logger to write to.
            log.info("  %s skipped: there is no logger", name)
            continue
        log.info("  %s <%s>", name, node._target_)
        callbacks.append(hydra.utils.instantiate(node))
    return callbacks


class DataNotFoundError(Exception):
    """The data a run needs is neither on disk nor downloadable.

    The message names the missing files and the folder to put them in.
    """


class RunStopped(Exception):
    """Training stopped on a signal after saving last.ckpt (see genlab/preemption.py)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"training stopped on signal {signum}")
        self.signum = signum


class MetricError(Exception):
    """The metric a sweep optimizes was not logged, or is not a finite number."""


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | FailedJob | None:
    """Run one training job; return the value of `optimized_metric` for sweepers.

    A job of a multirun that fails records its error in its directory and returns a
    FailedJob, so that the sweep goes on with its other jobs (see genlab/sweep.py).
    """
    run_dir = Path(cfg.paths.output_dir)
    try:
        with distributed_job():
            metrics = train(cfg)
        return optimized_metric_value(cfg.get("optimized_metric"), metrics)
    except RunStopped as stopped:
        # Exit without a result: SLURM requeues the job (submitit then waits for the
        # requeued run), and outside SLURM the exit status names the signal.
        logging.shutdown()
        sys.exit(128 + stopped.signum)
    except (ConfigError, DataNotFoundError) as error:
        log.error("%s", error)
        finish_wandb_run(exit_code=1)
        if is_multirun():
            record_failure(run_dir, error)
            return FailedJob(error)
        _remove_unused_run_dir(run_dir)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    except Exception as error:
        # The next job of a sweep would otherwise log into this job's W&B run.
        finish_wandb_run(exit_code=1)
        record_failure(run_dir, error)
        if not is_multirun():
            raise
        log.exception("Job failed; the sweep goes on with the other jobs")
        return FailedJob(error)


def optimized_metric_value(key: str | None, metrics: dict[str, float]) -> float | None:
    """Return the final value of the metric a sweep optimizes, or None when none is named."""
    if key is None:
        return None
    if key not in metrics:
        logged = ", ".join(sorted(name for name in metrics if name.startswith("val/")))
        raise MetricError(
            f"optimized_metric={key!r} was never logged in this run (logged: {logged or 'none'}). "
            "Train for long enough to validate at least once; FID is logged every "
            "model.fid.every_n_epochs epochs."
        )
    value = metrics[key]
    if not math.isfinite(value):
        raise MetricError(f"optimized_metric={key!r} ended at {value}, not a finite number")
    return value


def _remove_unused_run_dir(run_dir: Path) -> None:
    """Delete a run directory that contains nothing but Hydra's files from this rejected start."""
    if run_dir.is_dir() and {path.name for path in run_dir.iterdir()} <= {".hydra", "train.log"}:
        logging.shutdown()
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
