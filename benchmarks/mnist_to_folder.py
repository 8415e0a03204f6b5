"""Write MNIST IDX files as PNG images, one subfolder per label, for the image-folder source.

    python benchmarks/mnist_to_folder.py --output /tmp/mnist_folder
    python benchmarks/mnist_to_folder.py ../shared/data/mnist-t10k --output /tmp/mnist_folder

The source folder contains t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (or the
train-* pair with --split train), in the IDX format of the MNIST distribution. The
output is <output>/<label>/<index>.png, which `data=image_folder` reads with class labels.
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "mnist-t10k"

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def read_idx_images(path: Path) -> np.ndarray:
    """Read an IDX3 file (optionally gzipped) into a uint8 array (N, rows, cols)."""
    data = _read(path)
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise ValueError(
            f"{path} is not an IDX image file: magic number {magic:#010x}, "
            f"expected {IDX_IMAGES_MAGIC:#010x}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """Read an IDX1 file (optionally gzipped) into a uint8 array (N,)."""
    data = _read(path)
    magic, count = struct.unpack(">II", data[:8])
    if magic != IDX_LABELS_MAGIC:
        raise ValueError(
            f"{path} is not an IDX label file: magic number {magic:#010x}, "
            f"expected {IDX_LABELS_MAGIC:#010x}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=8, count=count)


def _read(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as file:
            return file.read()
    return path.read_bytes()


def find_file(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(f"{stem}.gz (or {stem}) not found in {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source",
        type=Path,
        nargs="?",
        default=DEFAULT_SOURCE,
        help="folder of the IDX files (default: %(default)s)",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder to write <label>/<index>.png into"
    )
    parser.add_argument(
        "--split",
        choices=("t10k", "train"),
        default="t10k",
        help="file prefix to read (default: %(default)s)",
    )
    parser.add_argument("--limit", type=int, default=None, help="write only the first N images")
    args = parser.parse_args()

    images = read_idx_images(find_file(args.source, f"{args.split}-images-idx3-ubyte"))
    labels = read_idx_labels(find_file(args.source, f"{args.split}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels in {args.source}")
    count = len(images) if args.limit is None else min(args.limit, len(images))

    for label in sorted(set(labels[:count].tolist())):
        (args.output / str(label)).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(images[index]).save(args.output / str(labels[index]) / f"{index:05d}.png")
    print(f"Wrote {count} images from {args.source} to {args.output}")


if __name__ == "__main__":
    main()
