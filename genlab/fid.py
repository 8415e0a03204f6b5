"""Distances between real and generated images (FID, KID): feature extractors and metrics.

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

`ImageDistanceMetrics` runs the extractor once per image and gives the features to
torchmetrics' FrechetInceptionDistance and, when asked, KernelInceptionDistance (KID,
Binkowski et al., 2018: the unbiased estimate of the squared maximum mean discrepancy with
the kernel (x.y / d + 1) ** 3, averaged over random subsets).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from genlab.downloads import socket_timeout

EXTRACTORS = ("inception", "randconv")

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURES = 2048

# Seconds a socket may wait during the Inception weights download, so an offline machine
# fails quickly instead of hanging.
DOWNLOAD_TIMEOUT_S = 30

# KID subsets hold at most this many samples by default, the subset size of torch-fidelity
# and of the KID paper.
KID_MAX_SUBSET_SIZE = 1000
# Seed of the random subsets of KID, so that the same features always give the same value.
KID_SEED = 0


def fid_metric_key(extractor: str, num_samples: int, split: str = "val") -> str:
    """Return the metric key for FID with these settings, e.g. ``val/fid_randconv_1000``."""
    return f"{split}/fid_{extractor}_{num_samples}"


def kid_metric_key(extractor: str, num_samples: int, split: str = "val") -> str:
    """Return the metric key for the mean KID, e.g. ``test/kid_randconv_1000``.

    The standard deviation over the subsets is logged under the same key plus ``_std``.
    """
    return f"{split}/kid_{extractor}_{num_samples}"


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

    def with_overrides(
        self,
        extractor: str | None = None,
        num_samples: int | None = None,
        inception_weights_path: str | None = None,
    ) -> FIDSettings:
        """Return these settings with every argument that is not None replacing its field.

        A new extractor drops the current weights path, which belongs to the old one.
        """
        path = self.inception_weights_path
        if extractor is not None and extractor != self.extractor:
            path = None
        if inception_weights_path is not None:
            path = inception_weights_path
        return FIDSettings(
            extractor=self.extractor if extractor is None else extractor,
            num_samples=self.num_samples if num_samples is None else num_samples,
            every_n_epochs=self.every_n_epochs,
            inception_weights_path=path,
        )


@dataclass(frozen=True)
class KIDSettings:
    """Settings of the random subsets of real and generated features that KID averages over."""

    # Subsets the mean and standard deviation are taken over.
    subsets: int = 100
    # Samples per subset; None: min(KID_MAX_SUBSET_SIZE, half the samples), at least 2.
    subset_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.subsets, bool) or not isinstance(self.subsets, int) or self.subsets < 1:
            raise ValueError(f"kid.subsets must be an integer >= 1, got {self.subsets!r}")
        size = self.subset_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 2):
            raise ValueError(
                f"kid.subset_size must be an integer >= 2 (the unbiased estimate needs two "
                f"samples) or null, got {size!r}"
            )

    def resolved_subset_size(self, num_samples: int) -> int:
        """Return the subset size for `num_samples` real and generated samples.

        Subsets of half the samples differ from each other, so that the standard deviation
        over them measures how much a KID estimate from that many samples varies. A subset
        size equal to the number of samples would give the same subset every time.
        """
        if self.subset_size is not None:
            return self.subset_size
        return max(2, min(KID_MAX_SUBSET_SIZE, num_samples // 2))


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
    """Create the torchmetrics FID metric for these settings, with its feature extractor.

    The metric takes uint8 RGB images (see `images_for_fid`) and keeps its real-image
    statistics across `reset()` calls (reset_real_features=False), so they are computed
    once per run.
    """
    return FrechetInceptionDistance(
        feature=build_feature_extractor(settings), reset_real_features=False, normalize=False
    )


def build_feature_extractor(settings: FIDSettings) -> nn.Module:
    """Create the feature network of `settings.extractor`: uint8 RGB images in, (B, d) out.

    The module has a `num_features` attribute (d), which torchmetrics reads instead of
    running a test image through the network.
    """
    if settings.extractor == "randconv":
        return RandomConvFeatures()
    extractor = _build_inception(settings.inception_weights_path)
    extractor.num_features = INCEPTION_FEATURES
    return extractor


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor" for a torchmetrics metric that receives features.

    `ImageDistanceMetrics` extracts the features once and hands them to FID and KID, whose
    constructors require a feature module.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class ImageDistanceMetrics:
    """FID and, optionally, KID between real and generated images, with one feature network.

    `update` runs the extractor once per image and feeds both metrics. The real-image
    statistics survive `reset_generated()`, so a run computes them once. Under DDP each
    process feeds its share, and `compute()` combines all of them on every process.

    This is deliberately not an nn.Module, so that a LightningModule can hold it without
    putting the extractor's weights into its state_dict; `to` moves it.
    """

    def __init__(self, settings: FIDSettings, kid: KIDSettings | None = None) -> None:
        self.settings = settings
        self.kid_settings = kid
        self.extractor = build_feature_extractor(settings)
        self.reset()

    def reset(self) -> None:
        """Drop the real and the generated statistics; the extractor is kept."""
        num_features = self.extractor.num_features
        self.fid = FrechetInceptionDistance(
            feature=PrecomputedFeatures(num_features), reset_real_features=False
        )
        self.kid: KernelInceptionDistance | None = None
        if self.kid_settings is not None:
            with warnings.catch_warnings():
                # A few thousand features at most: the warning about memory does not apply.
                warnings.filterwarnings("ignore", message=".*will save all extracted features")
                self.kid = KernelInceptionDistance(
                    feature=PrecomputedFeatures(num_features),
                    subsets=self.kid_settings.subsets,
                    subset_size=self.kid_settings.resolved_subset_size(self.settings.num_samples),
                    reset_real_features=False,
                )
        # Real images given to `update` on this process, for callers that cap them.
        self.real_images_seen = 0

    def to(self, device: torch.device | str) -> ImageDistanceMetrics:
        self.extractor.to(device)
        self.fid.to(device)
        if self.kid is not None:
            self.kid.to(device)
        return self

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add uint8 RGB images (B, 3, H, W) (see `images_for_fid`) to the real or generated set."""
        features = self.extractor(images)
        self.fid.update(features, real=real)
        if self.kid is not None:
            self.kid.update(features, real=real)
        if real:
            self.real_images_seen += images.shape[0]

    def compute(self, split: str = "val") -> dict[str, torch.Tensor]:
        """Return {metric key: value}: FID, and the KID mean and standard deviation when KID is on.

        KID draws its subsets from a generator seeded with KID_SEED, inside a fork of the
        global random state, which is left as it was.
        """
        extractor, num_samples = self.settings.extractor, self.settings.num_samples
        values = {fid_metric_key(extractor, num_samples, split): self.fid.compute()}
        if self.kid is None:
            return values

        # Generated images come in batches dealt to the processes in turn, so a process may
        # have none. An empty feature tensor lets it take part in the gathering.
        device = self.fid.real_features_sum.device
        for features in (self.kid.real_features, self.kid.fake_features):
            if not features:
                features.append(torch.zeros(0, self.extractor.num_features, device=device))

        # Fewer real images than num_samples (a small split) shrink the largest subset
        # possible. The counts are those of all processes, so every process uses one size.
        with self.fid.sync_context():
            available = min(
                int(self.fid.real_features_num_samples), int(self.fid.fake_features_num_samples)
            )
        self.kid.subset_size = min(self.kid.subset_size, available)
        # NOTE: under DDP the gathered features are ordered by process, so the random
        # subsets, and the KID values, differ slightly from one process on the same images.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(KID_SEED)
            mean, std = self.kid.compute()
        key = kid_metric_key(extractor, num_samples, split)
        values[key] = mean
        values[f"{key}_std"] = std
        return values

    def reset_generated(self) -> None:
        """Drop the generated-image statistics and keep the real ones."""
        self.fid.reset()
        if self.kid is not None:
            self.kid.reset()


def inception_cache_path() -> Path:
    """Path where torch hub caches the Inception weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _build_inception(weights_path: str | None) -> NoTrainInceptionV3:
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"Inception weights file not found at model.fid.inception_weights_path="
                f"{weights_path!r}. Put {INCEPTION_WEIGHTS_FILE} there, or set the key to null "
                f"to use the torch hub cache ({inception_cache_path().parent})."
            )
        return _inception_network(weights_path)

    if inception_cache_path().is_file():
        return _inception_network(None)

    # Not cached: torch-fidelity downloads the file into the cache.
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            return _inception_network(None)
    except OSError as error:  # URLError, HTTPError and socket timeouts are OSErrors.
        raise FileNotFoundError(
            f"Inception weights for FID are missing and could not be downloaded: "
            f"{INCEPTION_WEIGHTS_FILE} is not in the torch hub cache folder "
            f"{inception_cache_path().parent} and the download failed ({error}). Copy the "
            f"file into that folder, or set model.fid.inception_weights_path to a local copy, "
            f"or use model.fid.extractor=randconv, which needs no download."
        ) from error


def _inception_network(weights_path: str | None) -> NoTrainInceptionV3:
    # antialias=False selects torch-fidelity's TensorFlow-compatible bilinear resize to
    # 299 x 299, the resize of the original FID code and of published numbers; torchmetrics'
    # default (antialias=True) resizes differently and shifts the values.
    return NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(INCEPTION_FEATURES)],
        feature_extractor_weights_path=weights_path,
        antialias=False,
    )
