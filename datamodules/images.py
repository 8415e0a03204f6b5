"""Image data sets as (images, labels) batches: float32 images in [0, 1], shape (B, C, H, W).

Sources:

- ``digits``: scikit-learn's 8 x 8 handwritten digits (1,797 images, grey levels 0..16),
  which ship with scikit-learn, so they need no download.
- ``mnist``, ``fashion_mnist``, ``cifar10``: torchvision's classes. Training and validation
  come from the training split; the test split (``setup("test")``, ``test_dataloader``) is
  torchvision's test set. Files are read from ``root`` and downloaded there when
  ``download`` is true.
- ``folder``: any directory of images, either with one subfolder per class (labels are the
  class indices) or flat (labels are -1).

Every image is resized to image_size x image_size (Resize of the shorter side, then
CenterCrop) and converted to `channels` (1: grey, 3: RGB). The validation set is a fixed
random part of the training split, drawn with a torch.Generator seeded by `split_seed`.
The other sources have no test split.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from datamodules.sampling import ResumableTrainOrder
from genlab.ddp import validation_sampler
from genlab.downloads import socket_timeout
from genlab.preemption import init_dataloader_worker

log = logging.getLogger(__name__)

SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")
TORCHVISION_SOURCES = {
    "mnist": datasets.MNIST,
    "fashion_mnist": datasets.FashionMNIST,
    "cifar10": datasets.CIFAR10,
}

# Seconds a socket may wait during a download, so an offline machine fails quickly.
DOWNLOAD_TIMEOUT_S = 30

# Label of images that have none (a flat image folder).
NO_LABEL = -1


class ImageDataModule(ResumableTrainOrder, L.LightningDataModule):
    """Images from one of SOURCES, resized and converted to what the model expects.

    Args:
        source: one of SOURCES.
        image_size: side in pixels of the square images the model receives.
        channels: 1 (grey) or 3 (RGB).
        batch_size: images per batch, for training and validation.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_fraction: part of the training split held out for validation, in (0, 1).
        split_seed: seed of the train/validation split.
        root: data folder of the torchvision sources (e.g. ``<root>/MNIST/raw``).
        download: download missing torchvision files into `root`.
        path: the image directory of the ``folder`` source.
    """

    modality = "image"

    def __init__(
        self,
        source: str,
        image_size: int,
        channels: int,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        root: str | None = None,
        download: bool = False,
        path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        _check_args(
            source,
            image_size,
            channels,
            batch_size,
            num_workers,
            val_fraction,
            root,
            download,
            path,
        )
        self.source = source
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.root = None if root is None else Path(root)
        self.download = download
        self.path = None if path is None else Path(path)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @classmethod
    def config_problems(cls, node: dict[str, Any]) -> list[str]:
        """Return the problems of a data config node that the config validator reports.

        Each problem starts with the key it concerns, without the "data." prefix.
        """
        source = node.get("source")
        if source not in SOURCES:
            return [f"source must be one of {SOURCES}, got {source!r}"]
        return source_problems(source, node.get("root"), node.get("download"), node.get("path"))

    def model_inputs(self) -> dict[str, int]:
        """Return the model constructor arguments that depend on the data; reads no data."""
        return {"image_size": self.image_size, "channels": self.channels}

    def available_splits(self) -> tuple[str, ...]:
        """Return the splits a model can be evaluated on: "val", and "test" for torchvision data."""
        return ("val", "test") if self.source in TORCHVISION_SOURCES else ("val",)

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Extract or download the torchvision files (run on one process per machine)."""
        if self.source in TORCHVISION_SOURCES:
            prepare_torchvision_files(self.source, self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load the test split for stage "test" (if the source has one), else the training
        and validation splits."""
        if stage == "test":
            if "test" in self.available_splits():
                self._setup_test()
            return
        if self.train_set is not None:
            return
        dataset = self._load_dataset()
        if len(dataset) < 2:
            raise ValueError(
                f"data source {self.source!r} contains {len(dataset)} image(s), but at least 2 are "
                f"needed for a training and a validation split"
            )
        num_val = min(len(dataset) - 1, max(1, round(self.val_fraction * len(dataset))))
        generator = torch.Generator().manual_seed(self.split_seed)
        self.train_set, self.val_set = random_split(
            dataset, [len(dataset) - num_val, num_val], generator=generator
        )
        log.info(
            "Image data %r: %d training and %d validation images, %d x %d pixels, %d channel(s)",
            self.source,
            len(self.train_set),
            len(self.val_set),
            self.image_size,
            self.image_size,
            self.channels,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("ImageDataModule.setup() must run before the dataloaders are built")
        return self.resumable_train_loader(
            self.train_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            worker_init_fn=init_dataloader_worker,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise RuntimeError("ImageDataModule.setup() must run before the dataloaders are built")
        # Under DDP each process reads its own part of the split and no image twice, so the
        # validation metrics and FID's real images are those of a single process.
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=validation_sampler(self.val_set, self.trainer),
            num_workers=self.num_workers,
            worker_init_fn=init_dataloader_worker,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.available_splits():
            raise ValueError(
                f"data.source={self.source!r} has no test split; only the sources "
                f"{tuple(TORCHVISION_SOURCES)} have one. Evaluate on the validation split "
                f"instead."
            )
        if self.test_set is None:
            raise RuntimeError("ImageDataModule.setup('test') must run before test_dataloader()")
        # Split over DDP processes without repeats, as the validation split.
        return DataLoader(
            self.test_set,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=validation_sampler(self.test_set, self.trainer),
            num_workers=self.num_workers,
            worker_init_fn=init_dataloader_worker,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    # ------------------------------------------------------------------ loading

    def _setup_test(self) -> None:
        if self.test_set is not None:
            return
        self.test_set = self._torchvision_dataset(train=False)
        log.info(
            "Image data %r: %d test images, %d x %d pixels, %d channel(s)",
            self.source,
            len(self.test_set),
            self.image_size,
            self.image_size,
            self.channels,
        )

    def _load_dataset(self) -> Dataset:
        if self.source == "digits":
            return self._digits()
        if self.source == "folder":
            return image_folder_dataset(self.path, self._pil_transform())
        return self._torchvision_dataset(train=True)

    def _torchvision_dataset(self, train: bool) -> Dataset:
        """Load the training (train=True) or test split of a torchvision source."""
        # Without prepare_data (setup called directly) the files are still checked, and
        # extracted from .gz files when needed, but never downloaded here.
        prepare_torchvision_files(self.source, self.root, download=False)
        dataset_class = TORCHVISION_SOURCES[self.source]
        try:
            return dataset_class(str(self.root), train=train, transform=self._pil_transform())
        except RuntimeError as error:
            folder, names = expected_files(self.source, self.root)
            raise RuntimeError(
                f"torchvision could not load {self.source!r} from {self.root}: {error}. The "
                f"files {', '.join(names)} in {folder} may be corrupted; delete them and "
                f"download them again with data.download=true."
            ) from error

    def _digits(self) -> TensorDataset:
        digits = load_digits()
        # Grey levels 0..16 -> [0, 1]; shape (N, 1, 8, 8).
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = self._tensor_transform()(images)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        return TensorDataset(images, labels)

    def _pil_transform(self) -> v2.Compose:
        """Transform of PIL images: colour mode, then size, then a float tensor in [0, 1]."""
        return v2.Compose(
            [
                ConvertMode("L" if self.channels == 1 else "RGB"),
                v2.Resize(self.image_size, antialias=True),
                v2.CenterCrop(self.image_size),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.ToPureTensor(),
            ]
        )

    def _tensor_transform(self) -> v2.Compose:
        """Transform of a float grey tensor (N, 1, H, W) in [0, 1]: size, then channels."""
        return v2.Compose(
            [
                v2.Resize(self.image_size, antialias=True),
                v2.CenterCrop(self.image_size),
                RepeatChannels(self.channels),
            ]
        )


# ---------------------------------------------------------------------- transforms


class ConvertMode:
    """Convert a PIL image to a colour mode ("L" or "RGB")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert(self.mode)


class RepeatChannels:
    """Repeat a grey tensor (..., 1, H, W) to `channels` channels."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.repeat_interleave(self.channels, dim=-3) if self.channels != 1 else images


# ---------------------------------------------------------------------- image folders


class ImageFiles(Dataset):
    """A flat list of image files, all with label NO_LABEL."""

    def __init__(self, files: list[Path], transform: Any) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            return self.transform(image), NO_LABEL


def _is_image(path: Path) -> bool:
    return path.is_file() and has_file_allowed_extension(path.name, IMG_EXTENSIONS)


def image_folder_dataset(path: Path, transform: Any) -> Dataset:
    """Load a directory of images: class subfolders (torchvision's ImageFolder) or flat."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"image folder not found: data.path={str(path)!r} is not a directory"
        )

    flat_files = sorted(p for p in path.iterdir() if _is_image(p))
    class_dirs = sorted(
        d for d in path.iterdir() if d.is_dir() and any(_is_image(p) for p in d.rglob("*"))
    )
    if flat_files and class_dirs:
        raise ValueError(
            f"image folder {str(path)!r} contains both images ({flat_files[0].name}, ...) and "
            f"subfolders with images ({class_dirs[0].name}, ...). Use one layout: all images "
            f"directly in the folder, or one subfolder per class."
        )
    if flat_files:
        return ImageFiles(flat_files, transform)
    if class_dirs:
        # ImageFolder's own loader converts to RGB; ConvertMode then gives the channels.
        return datasets.ImageFolder(str(path), transform=transform, allow_empty=True)
    raise FileNotFoundError(
        f"no images found in data.path={str(path)!r}: expected files with one of the "
        f"extensions {', '.join(IMG_EXTENSIONS)}, directly in the folder or in one "
        f"subfolder per class"
    )


# ---------------------------------------------------------------------- torchvision files


def expected_files(source: str, root: Path) -> tuple[Path, list[str]]:
    """Return the folder and the file names that torchvision's class for `source` reads."""
    dataset_class = TORCHVISION_SOURCES[source]
    if source == "cifar10":
        names = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
        return root / dataset_class.base_folder, names + [dataset_class.meta["filename"]]
    # MNIST and FashionMNIST need all four files, of both splits, in <root>/<Class>/raw.
    names = [Path(name).stem for name, _ in dataset_class.resources]
    return root / dataset_class.__name__ / "raw", names


def prepare_torchvision_files(source: str, root: Path, download: bool) -> None:
    """Make sure the files of a torchvision source are in `root`, or raise FileNotFoundError.

    MNIST-style .gz files that are present but not extracted are extracted. Missing files
    are downloaded when `download` is true, with a socket timeout so that an offline
    machine fails within DOWNLOAD_TIMEOUT_S instead of hanging.
    """
    folder, names = expected_files(source, root)
    if source != "cifar10":
        _extract_gzip_files(folder, names)
    missing = [name for name in names if not (folder / name).is_file()]
    if not missing:
        return

    download_error: Exception | None = None
    if download:
        log.info("Downloading %s into %s", source, root)
        try:
            with socket_timeout(DOWNLOAD_TIMEOUT_S):
                TORCHVISION_SOURCES[source](str(root), train=True, download=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError.
            download_error = error
        missing = [name for name in names if not (folder / name).is_file()]
        if not missing:
            return

    reason = (
        f"the download failed ({download_error})"
        if download_error is not None
        else "the download is disabled (data.download=false)"
    )
    raise FileNotFoundError(
        f"{source} files not found: {', '.join(missing)} missing in {folder}, and {reason}. "
        f"Put the original files in that folder (for MNIST-style data the .gz files are "
        f"extracted automatically), or set data.download=true on a machine with internet access."
    )


def _extract_gzip_files(folder: Path, names: list[str]) -> None:
    for name in names:
        target, archive = folder / name, folder / f"{name}.gz"
        if not target.is_file() and archive.is_file():
            log.info("Extracting %s", archive)
            with gzip.open(archive, "rb") as source, open(target, "wb") as destination:
                shutil.copyfileobj(source, destination)



# ---------------------------------------------------------------------- argument checks


def _check_args(
    source: str,
    image_size: int,
    channels: int,
    batch_size: int,
    num_workers: int,
    val_fraction: float,
    root: str | None,
    download: bool,
    path: str | None,
) -> None:
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
    integers = (
        ("image_size", image_size, 1),
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
    )
    for name, value, minimum in integers:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 < val_fraction < 1
    ):
        raise ValueError(f"data.val_fraction must be a number in (0, 1), got {val_fraction!r}")

    problems = source_problems(source, root, download, path)
    if problems:
        raise ValueError(f"data.{problems[0]}")


def source_problems(source: str, root: Any, download: Any, path: Any) -> list[str]:
    """Return the problems of root, download and path for `source`, each starting with its key.

    Settings that the chosen source does not read are problems, not silently ignored.
    """
    torchvision_names = tuple(TORCHVISION_SOURCES)
    problems = []
    if source in TORCHVISION_SOURCES and root is None:
        problems.append(
            f"root must be set for data.source={source!r}: the folder that contains its files"
        )
    if source not in TORCHVISION_SOURCES and root is not None:
        problems.append(
            f"root is only read by the sources {torchvision_names}; "
            f"remove it for data.source={source!r}"
        )
    if download and source not in TORCHVISION_SOURCES:
        problems.append(
            f"download is only read by the sources {torchvision_names}; "
            f"set it to false for data.source={source!r}"
        )
    if source == "folder" and path is None:
        problems.append("path must be set for data.source='folder': the directory of images")
    if source != "folder" and path is not None:
        problems.append(
            f"path is only read by data.source='folder'; remove it for data.source={source!r}"
        )
    return problems
