"""RunSummary: which metrics get a best value, and the best values W&B dashboards receive."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from wandb_records import read_summary

from genlab.callbacks import RunSummary
from genlab.loggers import wandb_logger
from genlab.metrics import is_lower_better


@pytest.mark.parametrize(
    "key", ["val/loss", "val/nelbo", "val/bpd", "val/bpt", "val/ppl", "val/recon",
            "val/fid_randconv_1000", "val/fid_inception_50000", "test/kid_randconv_350",
            "val/nll_iwae_100"],
)
def test_lower_is_better_metrics(key):
    assert is_lower_better(key)


@pytest.mark.parametrize(
    "key", ["val/kl", "val/d_loss", "val/g_loss", "val/d_real", "val/kid_randconv_350_std"]
)
def test_metrics_without_direction(key):
    assert not is_lower_better(key)


class ScriptedMetrics(L.LightningModule):
    """Logs a given value of val/loss and val/accuracy at each validation."""

    LOSSES = (3.0, 1.0, 2.0)
    ACCURACIES = (0.1, 0.5, 0.3)

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        epoch = self.current_epoch
        self.log("val/loss", self.LOSSES[epoch])
        self.log("val/accuracy", self.ACCURACIES[epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_wandb_summary_holds_best_and_last_values(tmp_path):
    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    logger = wandb_logger(mode="offline", save_dir=str(tmp_path), group="g", tags=["t"])
    trainer = L.Trainer(
        max_epochs=3,
        logger=logger,
        callbacks=[
            RunSummary(),
            ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/accuracy", mode="max"),
        ],
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ScriptedMetrics(), train_dataloaders=loader, val_dataloaders=loader)
    logger.experiment.finish()

    run_file, = Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb")
    summary = read_summary(run_file)
    # Lower is better for a loss; the checkpoint callback's mode sets the accuracy's direction.
    assert summary["best/val/loss"] == 1.0
    assert summary["best/val/accuracy"] == 0.5
    assert summary["val/loss"] == 2.0  # W&B's own summary keeps the last value

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["best"] == {"val/loss": 1.0, "val/accuracy": 0.5}
    assert written["wandb"]["group"] == "g"
    assert written["wandb"]["id"] == run_file.stem.removeprefix("run-")
