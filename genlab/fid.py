"""Fréchet distance between real and generated images: feature extractors and metric set-up.

Two feature extractors are offered:

- ``inception``: the 2048-d pool features of the TensorFlow Inception-v3 used by the
  published FID numbers (torch-fidelity's port, weights file
  ``weights-inception-2015-12-05-6726825d.pth``). Images are resized to 299 x 299 by
  torchmetrics. The weights come from the torch hub cache, a download, or a local file.
- ``randconv``: a small convolutional network whose weights are drawn from a fixed seed.
  It needs no download, so FID works offline and in the default run. Its numbers are
  comparable between runs of this project but not with published FID values.

The metric key contains the extractor and the number of generated samples
(``val/fid_randconv_1000``), so numbers that cannot be compared never share a key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from genlab.downloads import socket_timeout

EXTRACTORS = ("inception", "randconv")

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURES = 2048

# Seconds a socket may wait during the Inception weights download, so an offline machine
# fails quickly instead of hanging.
DOWNLOAD_TIMEOUT_S = 30


def fid_metric_key(extractor: str, num_samples: int) -> str:
    """Return the metric key for FID with these settings, e.g. ``val/fid_randconv_1000``."""
    return f"val/fid_{extractor}_{num_samples}"


@dataclass(frozen=True)
class FIDSettings:
    """FID settings from the ``fid`` node of a model config."""

    # Feature extractor: "inception" or "randconv".
    extractor: str = "randconv"
    # Generated images per evaluation; real images are capped at the same number.
    num_samples: int = 1000
    # FID is computed in the validation of every n-th training epoch.
    every_n_epochs: int = 1
    # Local Inception weights file; None reads the torch hub cache or downloads the file.
    inception_weights_path: str | None = None

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise ValueError(
                f"model.fid.extractor must be one of {EXTRACTORS}, got {self.extractor!r}"
            )
        if (
            isinstance(self.num_samples, bool)
            or not isinstance(self.num_samples, int)
            or self.num_samples < 2
        ):
            raise ValueError(
                f"model.fid.num_samples must be an integer >= 2 (a covariance needs two "
                f"samples), got {self.num_samples!r}"
            )
        if (
            isinstance(self.every_n_epochs, bool)
            or not isinstance(self.every_n_epochs, int)
            or self.every_n_epochs < 1
        ):
            raise ValueError(
                f"model.fid.every_n_epochs must be an integer >= 1, got {self.every_n_epochs!r}"
            )
        if self.inception_weights_path is not None and self.extractor != "inception":
            raise ValueError(
                f"model.fid.inception_weights_path is set to {self.inception_weights_path!r} "
                f"but model.fid.extractor is {self.extractor!r}; set the path to null or the "
                f"extractor to 'inception'"
            )

    @property
    def key(self) -> str:
        return fid_metric_key(self.extractor, self.num_samples)

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> FIDSettings | None:
        """Read a ``fid`` config node; None (FID disabled) gives None.

        Unknown keys raise ValueError, so that a misspelt key is not silently ignored.
        """
        if node is None:
            return None
        if not isinstance(node, Mapping):
            raise ValueError(f"model.fid must be a mapping or null, got {node!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(
                f"model.fid has unknown key(s) {unknown}; the allowed keys are {sorted(known)}"
            )
        path = node.get("inception_weights_path")
        return cls(
            extractor=node.get("extractor", cls.extractor),
            num_samples=node.get("num_samples", cls.num_samples),
            every_n_epochs=node.get("every_n_epochs", cls.every_n_epochs),
            inception_weights_path=None if path is None else str(path),
        )


class RandomConvFeatures(nn.Module):
    """Features of a fixed random convolutional network, an offline stand-in for Inception.

    Input: uint8 images (B, 3, H, W) with values in [0, 255], any H and W, as Inception
    takes them. They are resized to INPUT_SIZE x INPUT_SIZE, scaled to [-1, 1] and passed
    through three 3x3 stride-2 convolutions with ReLU (32 -> 16 -> 8 -> 4 pixels). The last
    4 x 4 map is average-pooled to 2 x 2 and flattened. Output: (B, num_features) with
    num_features = 64 * 2 * 2 = 256.

    The weights are He-normal draws from a private torch.Generator seeded with `seed`, so
    they are the same in every process and do not depend on, or change, the global RNG.
    """

    INPUT_SIZE = 32
    WIDTHS = (32, 64, 64)
    POOLED_SIZE = 2

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        in_channels = 3
        for index, out_channels in enumerate(self.WIDTHS):
            fan_in = in_channels * 3 * 3
            weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator)
            # Buffers, not parameters: the network is never trained.
            self.register_buffer(f"weight{index}", weight * math.sqrt(2.0 / fan_in))
            in_channels = out_channels
        self.num_features = self.WIDTHS[-1] * self.POOLED_SIZE**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"RandomConvFeatures expects uint8 images of shape (B, 3, H, W), got "
                f"{images.dtype} images of shape {tuple(images.shape)}"
            )
        x = F.interpolate(
            images.to(self.weight0.dtype) / 255.0,
            size=(self.INPUT_SIZE, self.INPUT_SIZE),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        x = (x - 0.5) / 0.5
        for index in range(len(self.WIDTHS)):
            x = F.relu(F.conv2d(x, getattr(self, f"weight{index}"), stride=2, padding=1))
        return F.adaptive_avg_pool2d(x, self.POOLED_SIZE).flatten(1)


def images_for_fid(images: torch.Tensor) -> torch.Tensor:
    """Convert images (B, C, H, W) in [0, 1] with C = 1 or 3 to the metric's input: uint8
    RGB in [0, 255], grey images repeated to 3 channels.

    Values are rounded to the nearest level, as when an image is saved to a file.
    torchmetrics' own conversion (normalize=True) truncates instead, which lowers values
    between two levels (generated or resized images) by half a level on average.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"FID expects images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}"
        )
    images = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def build_fid_metric(settings: FIDSettings) -> FrechetInceptionDistance:
    """Create the torchmetrics FID metric for these settings.

    The metric takes uint8 RGB images (see `images_for_fid`) and keeps its real-image
    statistics across `reset()` calls (reset_real_features=False), so they are computed
    once per run.
    """
    if settings.extractor == "randconv":
        return FrechetInceptionDistance(
            feature=RandomConvFeatures(), reset_real_features=False, normalize=False
        )
    return _build_inception_fid(settings.inception_weights_path)


def inception_cache_path() -> Path:
    """Path where torch hub caches the Inception weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _build_inception_fid(weights_path: str | None) -> FrechetInceptionDistance:
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"Inception weights file not found at model.fid.inception_weights_path="
                f"{weights_path!r}. Put {INCEPTION_WEIGHTS_FILE} there, or set the key to null "
                f"to use the torch hub cache ({inception_cache_path().parent})."
            )
        return _inception_metric(weights_path)

    if inception_cache_path().is_file():
        return _inception_metric(None)

    # Not cached: torch-fidelity downloads the file into the cache.
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            return _inception_metric(None)
    except OSError as error:  # URLError, HTTPError and socket timeouts are OSErrors.
        raise FileNotFoundError(
            f"Inception weights for FID are missing and could not be downloaded: "
            f"{INCEPTION_WEIGHTS_FILE} is not in the torch hub cache folder "
            f"{inception_cache_path().parent} and the download failed ({error}). Copy the "
            f"file into that folder, or set model.fid.inception_weights_path to a local copy, "
            f"or use model.fid.extractor=randconv, which needs no download."
        ) from error


def _inception_metric(weights_path: str | None) -> FrechetInceptionDistance:
    # antialias=False selects torch-fidelity's TensorFlow-compatible bilinear resize to
    # 299 x 299, the resize of the original FID code and of published numbers; torchmetrics'
    # default (antialias=True) resizes differently and shifts the values.
    return FrechetInceptionDistance(
        feature=INCEPTION_FEATURES,
        reset_real_features=False,
        normalize=False,
        feature_extractor_weights_path=weights_path,
        antialias=False,
    )

