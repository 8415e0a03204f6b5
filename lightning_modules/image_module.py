"""Base class of the image models: FID during validation, FID and KID in `Trainer.test`.

Subclasses implement `generate_images` and call this class's validation and test hooks
through `super()` when they override them. FID is computed on every rank inside the
validation hooks: each rank feeds its share of real and generated images into the
torchmetrics metric, and `compute()` sums the feature statistics over ranks. The shares are
chosen so that, whatever the number of ranks, the images are those of one process:

- real images: the datamodule splits the validation set over the ranks without repeating
  any (rank r reads items r, r + W, r + 2W, ... of W ranks, see genlab.ddp), and each
  rank keeps its first `shard_size` images. Together these are the first
  `fid.num_samples` images of the validation set.
- generated images: batch i of FID_BATCH_SIZE images draws its latents from a generator
  seeded FID_SEED + i, and rank r generates the batches i = r, r + W, r + 2W, ... .

The test hooks (used by eval.py) follow the same code path with the split and settings
given to `configure_test`, so a checkpoint tested on the validation split with its own FID
settings gives the FID its run logged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from genlab.checkpoints import RecordsModelClass
from genlab.fid import FIDSettings, ImageDistanceMetrics, KIDSettings, images_for_fid

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

    `Trainer.test` logs `<split>/fid_...` and, with KID settings, `<split>/kid_...` and
    `<split>/kid_..._std`, for the split and settings given to `configure_test` (by
    default: "test" and the model's own FID settings, without KID).
    """

    modality = "image"
    # Validation metrics a subclass logs besides FID.
    validation_metrics: tuple[str, ...] = ()

    def __init__(self, fid: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.fid_settings = FIDSettings.from_config(fid)
        self._is_fid_epoch = False
        self._real_statistics_done = False
        # Name of the split `Trainer.test` reads, the first part of the test metric keys.
        self.test_split = "test"
        self._test_fid_settings = self.fid_settings
        self._test_kid_settings: KIDSettings | None = None
        # object.__setattr__ skips nn.Module.__setattr__, which would register the metrics.
        object.__setattr__(self, "_fid_metrics", None)
        object.__setattr__(self, "_test_metrics", None)

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
        """The validation FID metric (None until `setup` builds it, or when FID is disabled).

        It receives features, not images: `ImageDistanceMetrics` runs the extractor.
        """
        return None if self._fid_metrics is None else self._fid_metrics.fid

    def configure_test(
        self,
        split: str = "test",
        fid: FIDSettings | None = None,
        kid: KIDSettings | None = None,
    ) -> None:
        """Choose what `Trainer.test` computes: the split name of the metric keys, and FID
        and KID settings (None: no FID, or no KID).

        The metrics are built here, so a missing Inception weights file fails before any
        data is read. `every_n_epochs` of `fid` is not read: the test computes FID once.
        """
        if kid is not None and fid is None:
            raise ValueError(
                "kid settings were given without fid settings, but KID uses the feature "
                "extractor and the number of samples of FID. Give fid settings too."
            )
        self.test_split = split
        self._test_fid_settings = fid
        self._test_kid_settings = kid
        metrics = None if fid is None else ImageDistanceMetrics(fid, kid)
        object.__setattr__(self, "_test_metrics", metrics)

    # ------------------------------------------------------------------ hooks

    def setup(self, stage: str) -> None:
        # Building the metric here, before training starts, makes missing Inception
        # weights fail at once instead of after the first training epoch.
        if (
            self.fid_settings is not None
            and self._fid_metrics is None
            and stage in ("fit", "validate")
        ):
            object.__setattr__(self, "_fid_metrics", ImageDistanceMetrics(self.fid_settings))
        if stage == "test" and self._test_metrics is None and self._test_fid_settings is not None:
            self.configure_test(self.test_split, self._test_fid_settings, self._test_kid_settings)

    def on_validation_epoch_start(self) -> None:
        self._is_fid_epoch = (
            self._fid_metrics is not None
            and not self.trainer.sanity_checking
            and (self.current_epoch + 1) % self.fid_settings.every_n_epochs == 0
        )
        if self._is_fid_epoch:
            self._fid_metrics.to(self.device)

    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._is_fid_epoch and not self._real_statistics_done:
            self._add_real_images(self._fid_metrics, batch[0])

    def on_validation_epoch_end(self) -> None:
        if not self._is_fid_epoch:
            return
        if not self._real_statistics_done:
            self._real_statistics_done = True
            self._warn_if_few_real_images(self._fid_metrics, "validation", "model.fid.num_samples")
        self._log_image_distances(self._fid_metrics, "val")

    def on_test_epoch_start(self) -> None:
        if self._test_metrics is not None:
            # A second Trainer.test call starts from empty statistics.
            self._test_metrics.reset()
            self._test_metrics.to(self.device)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Collect the real images of FID and KID; subclasses add their own test metrics."""
        if self._test_metrics is not None:
            self._add_real_images(self._test_metrics, batch[0])

    def on_test_epoch_end(self) -> None:
        if self._test_metrics is not None:
            self._warn_if_few_real_images(self._test_metrics, self.test_split, "fid.num_samples")
            self._log_image_distances(self._test_metrics, self.test_split)

    # ------------------------------------------------------------------ FID and KID

    def _add_real_images(self, metrics: ImageDistanceMetrics, images: torch.Tensor) -> None:
        """Feed this rank's share of the first `num_samples` real images of the split."""
        limit = shard_size(metrics.settings.num_samples, self.global_rank, self.trainer.world_size)
        remaining = limit - metrics.real_images_seen
        if remaining > 0:
            metrics.update(images_for_fid(images[:remaining]), real=True)

    def _warn_if_few_real_images(
        self, metrics: ImageDistanceMetrics, split: str, setting: str
    ) -> None:
        num_samples = metrics.settings.num_samples
        limit = shard_size(num_samples, self.global_rank, self.trainer.world_size)
        if metrics.real_images_seen < limit:
            rank_zero_warn(
                f"FID real statistics use {metrics.real_images_seen} {split} images on this "
                f"process, fewer than the {limit} that {setting}={num_samples} asks for; "
                f"enlarge the {split} split or lower {setting}."
            )

    def _log_image_distances(self, metrics: ImageDistanceMetrics, split: str) -> None:
        """Generate the images, then log FID (and KID) under `split`/."""
        num_samples = metrics.settings.num_samples
        # Batches are dealt to the ranks in turn, so a rank may get none.
        num_batches = math.ceil(num_samples / FID_BATCH_SIZE)
        for batch_index in range(self.global_rank, num_batches, self.trainer.world_size):
            count = min(FID_BATCH_SIZE, num_samples - batch_index * FID_BATCH_SIZE)
            generator = torch.Generator().manual_seed(FID_SEED + batch_index)
            metrics.update(images_for_fid(self.generate_images(count, generator)), real=False)

        # compute() combines the statistics of all ranks; every rank gets the values.
        values = metrics.compute(split)
        metrics.reset_generated()
        for key, value in values.items():
            self.log(key, value, sync_dist=True)
            rank_zero_info(f"{key} = {value.item():.6g}")


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
