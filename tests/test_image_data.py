"""Tests of ImageDataModule on every source, with small files the tests write."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from image_files import write_cifar10, write_mnist, write_png_folder
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import datasets

from datamodules.images import ImageDataModule

# A loopback port with no server: a download from it fails at once, without the network.
UNREACHABLE_MIRROR = "http://127.0.0.1:9/"


def setup_datamodule(**kwargs) -> ImageDataModule:
    datamodule = ImageDataModule(**kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def first_batch(
    datamodule: ImageDataModule, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    loader = datamodule.train_dataloader() if train else datamodule.val_dataloader()
    return next(iter(loader))


def all_images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


# Digits


def test_digits_batches_follow_contract():
    datamodule = setup_datamodule(source="digits", image_size=8, channels=1, batch_size=16)
    images, labels = first_batch(datamodule)

    assert images.shape == (16, 1, 8, 8)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert len(datamodule.train_set) + len(datamodule.val_set) == 1797


def test_digits_values_are_scaled_grey_levels():
    datamodule = setup_datamodule(source="digits", image_size=8, channels=1, val_fraction=0.1)
    index = datamodule.val_set.indices[0]
    expected = torch.as_tensor(load_digits().images[index], dtype=torch.float32) / 16.0

    image, label = datamodule.val_set[0]

    assert torch.allclose(image[0], expected)
    assert label == load_digits().target[index]


def test_digits_resized_to_rgb():
    datamodule = setup_datamodule(source="digits", image_size=32, channels=3, batch_size=4)
    images, _ = first_batch(datamodule)

    assert images.shape == (4, 3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 1])
    assert torch.equal(images[:, 0], images[:, 2])


def test_model_inputs_read_no_data():
    datamodule = ImageDataModule(
        source="folder", path="/nonexistent/images", image_size=28, channels=1
    )

    assert datamodule.model_inputs() == {"image_size": 28, "channels": 1}
    assert datamodule.train_set is None


# Split


def test_split_is_deterministic():
    first = setup_datamodule(source="digits", image_size=8, channels=1, split_seed=3)
    second = setup_datamodule(source="digits", image_size=8, channels=1, split_seed=3)
    other = setup_datamodule(source="digits", image_size=8, channels=1, split_seed=4)

    assert first.val_set.indices == second.val_set.indices
    assert first.val_set.indices != other.val_set.indices


def test_split_sizes_follow_val_fraction():
    datamodule = setup_datamodule(source="digits", image_size=8, channels=1, val_fraction=0.25)

    assert len(datamodule.val_set) == round(0.25 * 1797)
    assert not set(datamodule.val_set.indices) & set(datamodule.train_set.indices)


def test_split_ignores_global_rng():
    torch.manual_seed(0)
    first = setup_datamodule(source="digits", image_size=8, channels=1)
    torch.manual_seed(1)
    second = setup_datamodule(source="digits", image_size=8, channels=1)

    assert first.val_set.indices == second.val_set.indices


def test_validation_loader_is_not_shuffled():
    datamodule = setup_datamodule(source="digits", image_size=8, channels=1, batch_size=32)

    first, _ = first_batch(datamodule, train=False)
    second, _ = first_batch(datamodule, train=False)

    assert torch.equal(first, second)


# MNIST and Fashion-MNIST


@pytest.mark.parametrize(
    ("source", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_idx_files_load(tmp_path: Path, source: str, folder: str):
    train_images, train_labels = write_mnist(tmp_path, folder=folder, num_train=40)
    datamodule = setup_datamodule(
        source=source, root=str(tmp_path), image_size=28, channels=1, val_fraction=0.25
    )

    assert len(datamodule.train_set) == 30
    assert len(datamodule.val_set) == 10
    for position in (0, 5):
        index = datamodule.val_set.indices[position]
        image, label = datamodule.val_set[position]
        expected = torch.from_numpy(train_images[index]).float() / 255.0
        assert image.shape == (1, 28, 28)
        assert torch.allclose(image[0], expected)
        assert label == int(train_labels[index])


def test_mnist_gz_files_are_extracted(tmp_path: Path):
    train_images, _ = write_mnist(tmp_path, gz=True, num_train=20)
    datamodule = setup_datamodule(source="mnist", root=str(tmp_path), image_size=28, channels=1)

    raw = tmp_path / "MNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").is_file()
    assert (raw / "t10k-labels-idx1-ubyte").is_file()
    assert len(datamodule.train_set) + len(datamodule.val_set) == 20


def test_mnist_resized_to_rgb(tmp_path: Path):
    write_mnist(tmp_path, num_train=20)
    datamodule = setup_datamodule(
        source="mnist", root=str(tmp_path), image_size=16, channels=3, batch_size=4
    )
    images, labels = first_batch(datamodule)

    assert images.shape == (4, 3, 16, 16)
    assert labels.dtype == torch.int64
    assert torch.equal(images[:, 0], images[:, 2])


def test_mnist_missing_files_error_names_them(tmp_path: Path):
    datamodule = ImageDataModule(source="mnist", root=str(tmp_path), image_size=28, channels=1)

    with pytest.raises(FileNotFoundError) as error:
        datamodule.prepare_data()

    message = str(error.value)
    assert "train-images-idx3-ubyte" in message
    assert "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "data.download" in message


def test_mnist_failed_download_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(datasets.MNIST, "mirrors", [UNREACHABLE_MIRROR])
    datamodule = ImageDataModule(
        source="mnist", root=str(tmp_path), image_size=28, channels=1, download=True
    )

    with pytest.raises(FileNotFoundError) as error:
        datamodule.prepare_data()

    message = str(error.value)
    assert "download failed" in message
    assert "train-images-idx3-ubyte" in message
    assert str(tmp_path / "MNIST" / "raw") in message


def test_setup_without_prepare_data_checks_files(tmp_path: Path):
    datamodule = ImageDataModule(source="mnist", root=str(tmp_path), image_size=28, channels=1)

    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        datamodule.setup("fit")


# CIFAR-10


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """CIFAR-10 batches written by the test, with torchvision's expected md5 sums set to theirs."""
    md5 = write_cifar10(tmp_path, per_batch=6)
    cifar = datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[name, md5[name]] for name, _ in cifar.train_list])
    monkeypatch.setattr(cifar, "test_list", [[name, md5[name]] for name, _ in cifar.test_list])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5["batches.meta"]})
    return tmp_path


def test_cifar10_pickle_batches_load(cifar_root: Path):
    datamodule = setup_datamodule(
        source="cifar10", root=str(cifar_root), image_size=32, channels=3, val_fraction=0.2
    )

    # Five training batches of 6 images; test_batch is not part of the training split.
    assert len(datamodule.train_set) + len(datamodule.val_set) == 30
    index = datamodule.val_set.indices[0]
    batch, row = divmod(index, 6)
    raw = pickle.loads(
        (cifar_root / "cifar-10-batches-py" / f"data_batch_{batch + 1}").read_bytes()
    )
    expected = torch.from_numpy(raw["data"][row].reshape(3, 32, 32)).float() / 255.0
    image, label = datamodule.val_set[0]
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image, expected)
    assert label == raw["labels"][row]


def test_cifar10_converted_to_grey(cifar_root: Path):
    datamodule = setup_datamodule(
        source="cifar10", root=str(cifar_root), image_size=16, channels=1, batch_size=5
    )
    images, _ = first_batch(datamodule)

    assert images.shape == (5, 1, 16, 16)


def test_cifar10_missing_files_error_names_them(tmp_path: Path):
    datamodule = ImageDataModule(source="cifar10", root=str(tmp_path), image_size=32, channels=3)

    with pytest.raises(FileNotFoundError) as error:
        datamodule.prepare_data()

    message = str(error.value)
    assert "data_batch_1" in message
    assert "batches.meta" in message
    assert str(tmp_path / "cifar-10-batches-py") in message


def test_cifar10_corrupted_file_error(cifar_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [["data_batch_1", "0" * 32]])
    datamodule = ImageDataModule(source="cifar10", root=str(cifar_root), image_size=32, channels=3)

    with pytest.raises(RuntimeError, match="corrupted"):
        datamodule.setup("fit")


# Image folders


def test_flat_folder_converted_and_resized(tmp_path: Path):
    write_png_folder(tmp_path / "images", classes=None, per_class=10, size=(40, 30))
    datamodule = setup_datamodule(
        source="folder", path=str(tmp_path / "images"), image_size=16, channels=1, batch_size=4
    )
    images, labels = first_batch(datamodule)

    assert images.shape == (4, 1, 16, 16)
    assert images.dtype == torch.float32
    assert torch.all(labels == -1)
    assert len(datamodule.train_set) + len(datamodule.val_set) == 10


def test_class_folders_give_labels(tmp_path: Path):
    write_png_folder(tmp_path / "images", classes=["cat", "dog"], per_class=5)
    datamodule = setup_datamodule(
        source="folder", path=str(tmp_path / "images"), image_size=8, channels=3
    )

    labels = sorted(
        int(datamodule.train_set.dataset[i][1]) for i in range(len(datamodule.train_set.dataset))
    )
    image, _ = datamodule.train_set[0]
    assert labels == [0] * 5 + [1] * 5
    assert image.shape == (3, 8, 8)


def test_folder_grey_is_luminance(tmp_path: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    datamodule = setup_datamodule(source="folder", path=str(folder), image_size=8, channels=1)

    values = sorted(float(image.mean()) for image in all_images(datamodule.train_set.dataset))
    # PIL's L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded to an integer level.
    expected = sorted(255 * weight / 255 for weight in (0.299, 0.587, 0.114))
    assert values == pytest.approx(expected, abs=1 / 255)


def test_empty_folder_error(tmp_path: Path):
    (tmp_path / "images" / "empty_class").mkdir(parents=True)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    datamodule = ImageDataModule(
        source="folder", path=str(tmp_path / "images"), image_size=8, channels=1
    )

    with pytest.raises(FileNotFoundError, match="no images found"):
        datamodule.setup("fit")


def test_missing_folder_error(tmp_path: Path):
    datamodule = ImageDataModule(
        source="folder", path=str(tmp_path / "absent"), image_size=8, channels=1
    )

    with pytest.raises(FileNotFoundError, match="absent"):
        datamodule.setup("fit")


def test_mixed_folder_layout_error(tmp_path: Path):
    write_png_folder(tmp_path / "images", classes=None, per_class=2)
    write_png_folder(tmp_path / "images", classes=["a"], per_class=2)
    datamodule = ImageDataModule(
        source="folder", path=str(tmp_path / "images"), image_size=8, channels=1
    )

    with pytest.raises(ValueError, match="one layout"):
        datamodule.setup("fit")


# Arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "svhn"}, "data.source"),
        ({"channels": 2}, "data.channels"),
        ({"image_size": 0}, "data.image_size"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"path": "/tmp"}, "data.path"),
        ({"root": "/tmp"}, "data.root"),
        ({"download": True}, "data.download"),
        ({"source": "mnist"}, "data.root"),
        ({"source": "folder"}, "data.path"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, message: str):
    settings = {"source": "digits", "image_size": 8, "channels": 1, **kwargs}

    with pytest.raises(ValueError, match=message):
        ImageDataModule(**settings)


def test_val_fraction_keeps_one_image_each_side():
    datamodule = setup_datamodule(source="digits", image_size=8, channels=1, val_fraction=1e-6)

    assert len(datamodule.val_set) == 1
    assert len(datamodule.train_set) == 1796


def test_config_problems_list_source_mismatches():
    node = {"source": "digits", "root": "/data", "download": True, "path": "/images"}

    problems = ImageDataModule.config_problems(node)

    assert len(problems) == 3
    assert problems[0].startswith("root is only read")
    assert problems[1].startswith("download is only read")
    assert problems[2].startswith("path is only read")


def test_config_problems_empty_for_valid_node():
    node = {"source": "mnist", "root": "/data", "download": True, "image_size": 28}

    assert ImageDataModule.config_problems(node) == []
    assert ImageDataModule.config_problems({"source": "svhn"}) == [
        "source must be one of ('digits', 'mnist', 'fashion_mnist', 'cifar10', 'folder'), "
        "got 'svhn'"
    ]


# Test split


def test_mnist_test_split_reads_t10k(tmp_path: Path):
    write_mnist(tmp_path, num_train=20, num_test=8)
    datamodule = ImageDataModule(
        source="mnist", root=str(tmp_path), image_size=28, channels=1, batch_size=5
    )
    datamodule.prepare_data()

    datamodule.setup("test")

    raw = (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    # IDX3: a 16-byte header, then the uint8 pixels.
    expected = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(8, 28, 28) / 255.0
    batches = list(datamodule.test_dataloader())
    images = torch.cat([batch[0] for batch in batches])
    assert datamodule.available_splits() == ("val", "test")
    assert [batch[0].shape[0] for batch in batches] == [5, 3]
    assert images.shape == (8, 1, 28, 28)
    assert torch.allclose(images[:, 0], expected)
    assert datamodule.train_set is None


def test_cifar10_test_split_reads_test_batch(cifar_root: Path):
    datamodule = setup_datamodule(source="cifar10", root=str(cifar_root), image_size=32, channels=3)

    datamodule.setup("test")

    raw = pickle.loads((cifar_root / "cifar-10-batches-py" / "test_batch").read_bytes())
    image, label = datamodule.test_set[2]
    expected = torch.from_numpy(raw["data"][2].reshape(3, 32, 32)).float() / 255.0
    assert len(datamodule.test_set) == 6
    assert torch.allclose(image, expected)
    assert label == raw["labels"][2]


@pytest.mark.parametrize("source", ["digits", "folder"])
def test_sources_without_test_split(tmp_path: Path, source: str):
    write_png_folder(tmp_path / "images", classes=None, per_class=4, size=(8, 8))
    path = str(tmp_path / "images") if source == "folder" else None
    datamodule = ImageDataModule(source=source, path=path, image_size=8, channels=1)

    datamodule.setup("test")

    assert datamodule.available_splits() == ("val",)
    assert datamodule.test_set is None
    with pytest.raises(ValueError, match=f"data.source='{source}' has no test split"):
        datamodule.test_dataloader()
