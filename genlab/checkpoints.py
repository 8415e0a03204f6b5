"""Load a trained model from a checkpoint, whatever the model family and training set-up.

A checkpoint written by train.py names the class of its model (MODEL_CLASS_KEY, written by
`RecordsModelClass`). Older checkpoints, or ones written without that hook, are still
readable when the run directory they sit in has its config.yaml: the class is then the
config's `model._target_`.

Checkpoints of single-process and DDP runs have the same layout. Lightning's
EMAWeightAveraging callback (the `callbacks=ema` preset) stores the averaged weights in
`state_dict` and the weights being trained in `current_model_state`; `weights` picks one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

# Checkpoint key under which a module records its own class, "package.module.Class".
MODEL_CLASS_KEY = "genlab_model_class"
# Keys EMAWeightAveraging adds next to "state_dict" (lightning.pytorch.callbacks.weight_averaging).
RAW_WEIGHTS_KEY = "current_model_state"

WEIGHTS_CHOICES = ("auto", "ema", "raw")


class CheckpointError(Exception):
    """Error for a checkpoint that cannot be read or used as requested; names reason and fix."""


class RecordsModelClass:
    """LightningModule mixin that writes the module's class into every checkpoint."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint[MODEL_CLASS_KEY] = f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class LoadedCheckpoint:
    """A model restored from a checkpoint, with what is known about the run that wrote it."""

    model: L.LightningModule
    path: Path
    # "ema" or "raw": which of the checkpoint's weights the model holds.
    weights: str
    has_ema: bool
    # Keys of the checkpoint besides the weights: epoch, global_step, ...
    epoch: int | None
    global_step: int | None
    # The run's saved config (<run dir>/config.yaml), or None when the file is missing.
    run_config: DictConfig | None

    @property
    def run_dir(self) -> Path:
        """The run directory: train.py keeps checkpoints in <run dir>/checkpoints/."""
        return self.path.parent.parent


def load_checkpoint(
    ckpt_path: str | Path, weights: str = "auto", map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Rebuild the model saved in `ckpt_path` and load the chosen weights into it.

    weights: "ema" (the exponential moving average, an error when the run kept none), "raw"
    (the weights the optimizer trained) or "auto" (the average when there is one, else the
    trained weights). The model is returned in eval mode.
    """
    if weights not in WEIGHTS_CHOICES:
        raise CheckpointError(
            f"weights={weights!r} is not a choice; use one of {', '.join(WEIGHTS_CHOICES)}"
        )
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        raise CheckpointError(
            f"ckpt_path={str(path)!r} is a directory, as sharded FSDP checkpoints are. Convert "
            "it to one file first: python -m lightning.pytorch.utilities.consolidate_checkpoint "
            f"{path}"
        )
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={str(path)!r} does not exist. Runs keep their checkpoints in "
            "<run dir>/checkpoints/ (best-*.ckpt and last.ckpt)."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"ckpt_path={str(path)!r} could not be read as a PyTorch checkpoint: {error}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"ckpt_path={str(path)!r} is not a Lightning checkpoint: it has no state_dict"
        )

    run_config = _run_config(path)
    model_class = _model_class(checkpoint, run_config, path)
    hyperparameters = checkpoint.get("hyper_parameters")
    if hyperparameters is None:
        raise CheckpointError(
            f"ckpt_path={str(path)!r} has no hyper_parameters, so its model cannot be rebuilt; "
            "genlab's models save them when they are created"
        )

    has_ema = RAW_WEIGHTS_KEY in checkpoint
    if weights == "ema" and not has_ema:
        raise CheckpointError(
            f"weights=ema is invalid: {path.name} contains no averaged weights, because its "
            "run trained without the EMA callback (callbacks=ema). Use weights=raw or "
            "weights=auto."
        )
    chosen = "ema" if has_ema and weights != "raw" else "raw"
    # With an average, state_dict contains it and RAW_WEIGHTS_KEY the trained weights.
    state_dict = checkpoint[RAW_WEIGHTS_KEY if has_ema and chosen == "raw" else "state_dict"]

    model = model_class(**hyperparameters)
    model.load_state_dict(state_dict)
    model.to(map_location)
    model.eval()
    return LoadedCheckpoint(
        model=model,
        path=path,
        weights=chosen,
        has_ema=has_ema,
        epoch=checkpoint.get("epoch"),
        global_step=checkpoint.get("global_step"),
        run_config=run_config,
    )


def _run_config(path: Path) -> DictConfig | None:
    config_path = path.parent.parent / "config.yaml"
    if not config_path.is_file():
        return None
    config = OmegaConf.load(config_path)
    return config if isinstance(config, DictConfig) else None


def _model_class(
    checkpoint: dict[str, Any], run_config: DictConfig | None, path: Path
) -> type[L.LightningModule]:
    name = checkpoint.get(MODEL_CLASS_KEY)
    if name is None and run_config is not None:
        name = OmegaConf.select(run_config, "model._target_")
    if name is None:
        raise CheckpointError(
            f"Model class of {path.name} not found: the checkpoint does not name its class "
            f"and there is no config.yaml in {path.parent.parent}. Keep the checkpoint inside "
            "its run directory (<run dir>/checkpoints/)."
        )
    module_name, _, class_name = str(name).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise CheckpointError(
            f"{path.name} was written by model class {name!r}, which cannot be imported here "
            f"({error}). Run from the genlab source tree the checkpoint was trained with."
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise CheckpointError(f"{path.name} names {name!r}, which is not a LightningModule")
    return cls
