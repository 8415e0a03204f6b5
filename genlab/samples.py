"""Image grids: save them as PNG files in the run directory and send them to the loggers."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

# Grids of small images (8x8 digits) are enlarged to at least this many pixels per tile
# with nearest-neighbour scaling, so that a PNG viewer shows them at a readable size.
MIN_TILE_PIXELS = 32


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Arrange images of shape (B, C, H, W) with values in [0, 1] into one (C, H', W') grid."""
    if images.ndim != 4:
        raise ValueError(
            f"image_grid expects a (B, C, H, W) tensor, got shape {tuple(images.shape)}"
        )
    images = images.detach().float().clamp(0, 1).cpu()
    scale = max(1, -(-MIN_TILE_PIXELS // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, int(round(images.shape[0] ** 0.5)))
    return make_grid(images, nrow=nrow, padding=2, pad_value=0.5)


def samples_dir(trainer: L.Trainer) -> Path:
    """Folder of sample images inside the run directory."""
    return Path(trainer.default_root_dir) / "samples"


@rank_zero_only
def log_image_grid(module: L.LightningModule, key: str, images: torch.Tensor) -> Path:
    """Save `images` as a PNG grid under the run's samples folder and log it to every logger.

    `key` is the metric-style name, such as "samples/generated". The PNG file name contains
    the key, the epoch and the global step, so grids from different epochs sit side by side.
    Returns the path of the PNG file.
    """
    trainer = module.trainer
    grid = image_grid(images)
    stem = re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")
    path = (
        samples_dir(trainer)
        / f"{stem}_epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}.png"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)

    for logger in trainer.loggers:
        log_image = getattr(logger, "log_image", None)
        if log_image is not None:
            log_image(key=key, images=[grid], step=trainer.global_step)
    return path
