"""Base class of the image models: FID evaluation during validation.

Subclasses implement `generate_images` and call this class's validation hooks through
`super()` when they override them. FID is computed on every rank inside the validation
hooks: each rank feeds its share of real and generated images into the torchmetrics
metric, and `compute()` sums the feature statistics over ranks. The shares are chosen so
that, whatever the number of ranks, the images are those of one process:

- real images: the datamodule splits the validation set over the ranks without repeating
  any (rank r reads items r, r + W, r + 2W, ... of W ranks, see genlab.ddp), and each
  rank keeps its first `shard_size` images. Together these are the first
  `fid.num_samples` images of the validation set.
- generated images: batch i of FID_BATCH_SIZE images draws its latents from a generator
  seeded FID_SEED + i, and rank r generates the batches i = r, r + W, r + 2W, ... .
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from genlab.checkpoints import RecordsModelClass
from genlab.fid import FIDSettings, build_fid_metric, images_for_fid

# Images generated per forward pass while collecting FID samples. Changing it changes
# which latents FID uses, because each batch has a generator of its own.
FID_BATCH_SIZE = 128

# Seed of the latents of the first FID batch; batch i uses FID_SEED + i. The same latents
# at every evaluation make the FID curve of a run smoother, because sampling noise does
# not vary between evaluations.
FID_SEED = 1234


def shard_size(total: int, rank: int, world_size: int) -> int:
    """Return how many of `total` items rank `rank` handles; the shares differ by at most 1."""
    return total // world_size + (1 if rank < total % world_size else 0)


class ImageGenerativeModule(RecordsModelClass, L.LightningModule):
    """LightningModule for image models, with FID every `fid.every_n_epochs` training epochs.

    FID is computed in the validation of each epoch whose number, counted from 1, is a
    multiple of `fid.every_n_epochs`. ModelCheckpoint(every_n_epochs=...) uses the same
    rule, so a checkpoint callback that monitors FID can be given the same number.

    The real-image statistics come from the validation batches of the first FID epoch (up
    to `fid.num_samples` images over all ranks) and are kept for the rest of the run. The
    generated images come from a fixed set of latents (`FID_SEED`), the same whatever the
    number of DDP processes.

    The FID metric, with its feature network, is deliberately not a registered submodule:
    its weights stay out of `state_dict()` and checkpoints. This class moves it to the
    module's device itself.
    """

    modality = "image"
    # Validation metrics a subclass logs besides FID.
    validation_metrics: tuple[str, ...] = ()

    def __init__(self, fid: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.fid_settings = FIDSettings.from_config(fid)
        self._is_fid_epoch = False
        self._real_images_seen = 0
        self._real_statistics_done = False
        # object.__setattr__ skips nn.Module.__setattr__, which would register the metric.
        object.__setattr__(self, "_fid_metric", None)

    @classmethod
    def config_problems(cls, node: Mapping[str, Any]) -> list[str]:
        """Return the problems of a model config node that the config validator reports.

        Each problem starts with the key it concerns, without the "model." prefix.
        """
        try:
            FIDSettings.from_config(node.get("fid"))
        except ValueError as error:
            return [str(error).removeprefix("model.")]
        return []

    @classmethod
    def metric_keys(cls, node: Mapping[str, Any]) -> list[str]:
        """Return the validation metric keys a model with the config `node` logs."""
        keys = list(cls.validation_metrics)
        try:
            settings = FIDSettings.from_config(node.get("fid"))
        except ValueError:  # reported by config_problems
            settings = None
        if settings is not None:
            keys.append(settings.key)
        return keys

    # ------------------------------------------------------------------ interface

    def generate_images(self, num_images: int, generator: torch.Generator) -> torch.Tensor:
        """Return `num_images` generated images (B, C, H, W) in [0, 1] on `self.device`.

        Latent noise must be drawn from `generator` (a CPU generator) for reproducibility.
        """
        raise NotImplementedError

    @property
    def fid_key(self) -> str | None:
        """Metric key of FID with this module's settings, or None when FID is disabled."""
        return None if self.fid_settings is None else self.fid_settings.key

    @property
    def fid_metric(self):
        """The FID metric object (None until `setup` builds it, or when FID is disabled)."""
        return self._fid_metric

    # ------------------------------------------------------------------ hooks

    def setup(self, stage: str) -> None:
        # Building the metric here, before training starts, makes missing Inception
        # weights fail at once instead of after the first training epoch.
        if (
            self.fid_settings is not None
            and self._fid_metric is None
            and stage in ("fit", "validate")
        ):
            object.__setattr__(self, "_fid_metric", build_fid_metric(self.fid_settings))

    def on_validation_epoch_start(self) -> None:
        self._is_fid_epoch = (
            self._fid_metric is not None
            and not self.trainer.sanity_checking
            and (self.current_epoch + 1) % self.fid_settings.every_n_epochs == 0
        )
        if self._is_fid_epoch:
            self._fid_metric.to(self.device)

    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._is_fid_epoch or self._real_statistics_done:
            return
        images = batch[0]
        limit = shard_size(self.fid_settings.num_samples, self.global_rank, self.trainer.world_size)
        remaining = limit - self._real_images_seen
        if remaining > 0:
            images = images[:remaining]
            self._fid_metric.update(images_for_fid(images), real=True)
            self._real_images_seen += images.shape[0]

    def on_validation_epoch_end(self) -> None:
        if self._is_fid_epoch:
            self._log_fid()

    # ------------------------------------------------------------------ FID

    def _log_fid(self) -> None:
        metric = self._fid_metric
        settings = self.fid_settings

        if not self._real_statistics_done:
            self._real_statistics_done = True
            limit = shard_size(settings.num_samples, self.global_rank, self.trainer.world_size)
            if self._real_images_seen < limit:
                rank_zero_warn(
                    f"FID real statistics use {self._real_images_seen} validation images on "
                    f"this process, fewer than the {limit} that model.fid.num_samples="
                    f"{settings.num_samples} asks for; enlarge the validation split or lower "
                    f"model.fid.num_samples."
                )

        # Batches are dealt to the ranks in turn, so a rank may get none.
        num_batches = math.ceil(settings.num_samples / FID_BATCH_SIZE)
        for batch_index in range(self.global_rank, num_batches, self.trainer.world_size):
            count = min(FID_BATCH_SIZE, settings.num_samples - batch_index * FID_BATCH_SIZE)
            generator = torch.Generator().manual_seed(FID_SEED + batch_index)
            metric.update(images_for_fid(self.generate_images(count, generator)), real=False)

        # compute() sums the feature statistics over all ranks; every rank gets the value.
        fid = metric.compute()
        metric.reset()  # Drops the generated-image statistics and keeps the real ones.
        self.log(settings.key, fid, sync_dist=True)
        rank_zero_info(f"{settings.key} = {fid.item():.4f}")


# ---------------------------------------------------------------------- argument checks


def check_channels(channels: int) -> None:
    """Raise ValueError unless `channels` is 1 (grey) or 3 (RGB)."""
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(
            f"channels must be 1 (grey) or 3 (RGB), got {channels!r}; set data.channels"
        )


def check_positive_ints(**values: Any) -> None:
    """Raise ValueError for the first keyword argument that is not an integer >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{name} must be an integer >= 1, got {value!r}")


def check_positive_floats(**values: Any) -> None:
    """Raise ValueError for the first keyword argument that is not a number > 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"model.{name} must be a number > 0, got {value!r}")
