"""Writers of small image data sets in their original on-disk formats, for the image tests.

- MNIST-style IDX files (big-endian header, then uint8 pixels), as torchvision reads them
  from <root>/MNIST/raw/ or <root>/FashionMNIST/raw/.
- CIFAR-10 python pickle batches in <root>/cifar-10-batches-py/.
- Folders of PNG files, flat or with one subfolder per class.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """Write uint8 images (N, 28, 28) as an IDX3 file (magic 0x00000803)."""
    n, rows, cols = images.shape
    header = struct.pack(">IIII", 0x0803, n, rows, cols)
    _write(path, header + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """Write uint8 labels (N,) as an IDX1 file (magic 0x00000801)."""
    header = struct.pack(">II", 0x0801, len(labels))
    _write(path, header + labels.astype(np.uint8).tobytes())


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as file:
            file.write(data)
    else:
        path.write_bytes(data)


def write_mnist(
    root: Path,
    folder: str = "MNIST",
    num_train: int = 40,
    num_test: int = 8,
    gz: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Write the four MNIST IDX files under <root>/<folder>/raw; return the training images
    (N, 28, 28) uint8 and labels (N,)."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    suffix = ".gz" if gz else ""
    train_images = rng.integers(0, 256, size=(num_train, 28, 28), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=num_train, dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(num_test, 28, 28), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=num_test, dtype=np.uint8)
    write_idx_images(raw / f"train-images-idx3-ubyte{suffix}", train_images)
    write_idx_labels(raw / f"train-labels-idx1-ubyte{suffix}", train_labels)
    write_idx_images(raw / f"t10k-images-idx3-ubyte{suffix}", test_images)
    write_idx_labels(raw / f"t10k-labels-idx1-ubyte{suffix}", test_labels)
    return train_images, train_labels


def write_cifar10(root: Path, per_batch: int = 6, seed: int = 0) -> dict[str, str]:
    """Write the CIFAR-10 pickle batches under <root>/cifar-10-batches-py.

    Returns the md5 sum of every written file by name, since torchvision checks them.
    Images are stored as rows of 3072 bytes: 1024 red, then 1024 green, then 1024 blue.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "batch_label": name,
            "labels": rng.integers(0, 10, size=per_batch).tolist(),
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def write_png_folder(
    path: Path,
    classes: list[str] | None,
    per_class: int = 6,
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
) -> None:
    """Write RGB PNG files of `size` (width, height): flat in `path` when `classes` is None,
    else `per_class` files in each class subfolder."""
    rng = np.random.default_rng(seed)
    folders = [path] if classes is None else [path / name for name in classes]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"image_{i:03d}.png")
