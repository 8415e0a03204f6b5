"""Tests of the DCGAN networks and the GAN LightningModule, trained with a real Trainer on CPU."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from image_files import write_mnist, write_png_folder

from datamodules.images import ImageDataModule
from lightning_modules.gan import GAN
from lightning_modules.nets.dcgan import Discriminator, Generator
from lightning_modules.nets.image_size import base_size_and_depth

IMAGE_SIZES = [8, 16, 28, 32, 64]


def image_datamodule(kind: str, tmp_path: Path) -> ImageDataModule:
    """A small data module of each kind the image models accept, written into tmp_path."""
    if kind == "digits":
        return ImageDataModule(source="digits", image_size=8, channels=1, batch_size=16)
    if kind == "mnist":
        write_mnist(tmp_path / "data", num_train=48)
        return ImageDataModule(
            source="mnist", root=str(tmp_path / "data"), image_size=28, channels=1, batch_size=16
        )
    if kind == "folder":
        write_png_folder(tmp_path / "images", classes=["a", "b"], per_class=20, size=(24, 20))
        return ImageDataModule(
            source="folder", path=str(tmp_path / "images"), image_size=16, channels=3, batch_size=16
        )
    raise ValueError(kind)


def small_gan(datamodule: ImageDataModule, **kwargs) -> GAN:
    settings = {
        "latent_dim": 8,
        "generator_width": 8,
        "discriminator_width": 8,
        "num_grid_samples": 16,
        "fid": {"extractor": "randconv", "num_samples": 20},
    }
    settings.update(kwargs)
    return GAN(**datamodule.model_inputs(), **settings)


def cpu_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    settings = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 2,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "default_root_dir": tmp_path,
    }
    settings.update(kwargs)
    return L.Trainer(**settings)


# Networks


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_dcgan_shapes(image_size: int, channels: int):
    generator = Generator(latent_dim=16, image_size=image_size, channels=channels, width=8)
    discriminator = Discriminator(image_size=image_size, channels=channels, width=8)

    images = generator(torch.randn(3, 16))
    logits = discriminator(images)

    assert images.shape == (3, channels, image_size, image_size)
    assert images.min() >= -1.0
    assert images.max() <= 1.0
    assert logits.shape == (3,)


@pytest.mark.parametrize(
    ("image_size", "base", "depth"), [(8, 4, 1), (16, 4, 2), (28, 7, 2), (32, 4, 3), (64, 4, 4)]
)
def test_depth_follows_image_size(image_size: int, base: int, depth: int):
    generator = Generator(latent_dim=4, image_size=image_size, channels=1, width=8)
    upsampling = [m for m in generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]

    assert base_size_and_depth(image_size) == (base, depth)
    assert upsampling[0].kernel_size == (base, base)
    assert len(upsampling) == depth + 1


@pytest.mark.parametrize("image_size", [4, 18, 30, 100])
def test_unsupported_image_size_raises(image_size: int):
    with pytest.raises(ValueError, match=f"unsupported image_size {image_size}"):
        Generator(latent_dim=4, image_size=image_size, channels=1)


def test_dcgan_init_std():
    generator = Generator(latent_dim=100, image_size=64, channels=3)

    weight = generator.net[3].weight
    assert abs(float(weight.std()) - 0.02) < 0.002
    assert abs(float(weight.mean())) < 0.002


# Module


@pytest.mark.parametrize("kind", ["digits", "mnist", "folder"])
def test_gan_trains_on_each_data_kind(kind: str, tmp_path: Path):
    datamodule = image_datamodule(kind, tmp_path)
    model = small_gan(datamodule)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = cpu_trainer(tmp_path)

    trainer.fit(model, datamodule)

    metrics = trainer.callback_metrics
    for key in (
        "train/d_loss",
        "train/g_loss",
        "train/loss",
        "train/d_real",
        "train/d_fake",
        model.monitor,
    ):
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    assert float(metrics["train/loss"]) == pytest.approx(
        float(metrics["train/d_loss"] + metrics["train/g_loss"]), rel=1e-5
    )
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter, before[name]), f"{name} did not change"
    # One discriminator and one generator step per batch.
    assert trainer.global_step == 4
    assert list((tmp_path / "samples").glob("samples_generated_epoch000_*.png"))


def test_gan_monitor_is_fid_key():
    datamodule = image_datamodule("digits", Path("."))

    assert small_gan(datamodule).monitor == "val/fid_randconv_20"
    assert small_gan(datamodule).monitor_mode == "min"
    assert small_gan(datamodule, fid=None).monitor is None


def test_gan_optimizers_use_configured_settings():
    datamodule = image_datamodule("digits", Path("."))
    model = small_gan(datamodule, generator_lr=1e-3, discriminator_lr=3e-4, betas=[0.3, 0.9])

    discriminator_optimizer, generator_optimizer = model.configure_optimizers()

    assert discriminator_optimizer.param_groups[0]["lr"] == 3e-4
    assert generator_optimizer.param_groups[0]["lr"] == 1e-3
    assert discriminator_optimizer.param_groups[0]["betas"] == (0.3, 0.9)
    assert generator_optimizer.param_groups[0]["betas"] == (0.3, 0.9)
    assert {id(p) for p in discriminator_optimizer.param_groups[0]["params"]} == {
        id(p) for p in model.discriminator.parameters()
    }
    assert {id(p) for p in generator_optimizer.param_groups[0]["params"]} == {
        id(p) for p in model.generator.parameters()
    }


def test_fixed_latents_ignore_global_seed():
    datamodule = image_datamodule("digits", Path("."))
    torch.manual_seed(0)
    first = small_gan(datamodule)
    torch.manual_seed(1)
    second = small_gan(datamodule)

    assert torch.equal(first.fixed_latents, second.fixed_latents)
    assert "fixed_latents" in first.state_dict()


def test_gan_checkpoint_reload_same_samples(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_gan(datamodule)
    trainer = cpu_trainer(tmp_path)
    trainer.fit(model, datamodule)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)

    reloaded = GAN.load_from_checkpoint(path)
    model.eval()
    reloaded.eval()

    with torch.no_grad():
        assert torch.equal(model(model.fixed_latents), reloaded(reloaded.fixed_latents))
    assert reloaded.hparams.latent_dim == 8


def test_gan_checkpoint_holds_both_optimizer_states(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_gan(datamodule)
    trainer = cpu_trainer(tmp_path)
    trainer.fit(model, datamodule)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=False)
    states = checkpoint["optimizer_states"]

    assert len(states) == 2
    discriminator_count = len(list(model.discriminator.parameters()))
    generator_count = len(list(model.generator.parameters()))
    assert len(states[0]["state"]) == discriminator_count
    assert len(states[1]["state"]) == generator_count
    for state in states:
        assert all(int(entry["step"]) == 2 for entry in state["state"].values())
    for key in checkpoint["state_dict"]:
        assert key.startswith(("generator.", "discriminator.", "fixed_latents")), key


def test_gan_resume_continues_training(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_gan(datamodule)
    trainer = cpu_trainer(tmp_path)
    trainer.fit(model, datamodule)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)

    resumed = small_gan(datamodule)
    resumed_trainer = cpu_trainer(tmp_path, max_epochs=2)
    resumed_trainer.fit(resumed, datamodule, ckpt_path=path)

    assert resumed_trainer.global_step == 8
    assert torch.equal(resumed.fixed_latents, model.fixed_latents)
    optimizer_steps = [
        int(next(iter(optimizer.state.values()))["step"])
        for optimizer in resumed_trainer.optimizers
    ]
    assert optimizer_steps == [4, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latent_dim": 0}, "latent_dim"),
        ({"generator_lr": 0.0}, "generator_lr"),
        ({"discriminator_lr": -1.0}, "discriminator_lr"),
        ({"betas": [0.5]}, "betas"),
        ({"betas": [0.5, 1.0]}, "betas"),
        ({"num_grid_samples": 0}, "num_grid_samples"),
        ({"fid": {"extractor": "vgg"}}, "extractor"),
    ],
)
def test_gan_invalid_arguments_raise(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        GAN(image_size=8, channels=1, **kwargs)


def test_gan_rejects_two_channels():
    with pytest.raises(ValueError, match="channels"):
        GAN(image_size=8, channels=2)
