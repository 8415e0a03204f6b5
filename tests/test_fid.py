"""Tests of the FID feature extractors, the metric set-up and the FID schedule of the modules."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from datamodules.images import ImageDataModule
from genlab import fid as genlab_fid
from genlab.fid import (
    INCEPTION_WEIGHTS_FILE,
    FIDSettings,
    ImageDistanceMetrics,
    KIDSettings,
    RandomConvFeatures,
    build_fid_metric,
    fid_metric_key,
    images_for_fid,
    kid_metric_key,
)
from lightning_modules.vae import VAE

# A loopback port with no server: a download from it fails at once, without the network.
UNREACHABLE_URL = f"http://127.0.0.1:9/{INCEPTION_WEIGHTS_FILE}"


def digit_images(count: int, offset: int = 0) -> torch.Tensor:
    """Shuffled scikit-learn digits as (count, 1, 8, 8) floats in [0, 1]."""
    images = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order][offset : offset + count]


def fid_between(metric: FrechetInceptionDistance, real: torch.Tensor, fake: torch.Tensor) -> float:
    metric.update(images_for_fid(real), real=True)
    metric.update(images_for_fid(fake), real=False)
    return float(metric.compute())


def scipy_frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets: the FID formula."""
    mu_real, mu_fake = real.mean(axis=0), fake.mean(axis=0)
    sigma_real = np.cov(real, rowvar=False)
    sigma_fake = np.cov(fake, rowvar=False)
    covariance_mean = scipy.linalg.sqrtm(sigma_real @ sigma_fake).real
    return float(
        np.sum((mu_real - mu_fake) ** 2)
        + np.trace(sigma_real)
        + np.trace(sigma_fake)
        - 2.0 * np.trace(covariance_mean)
    )


# Metric key and settings


def test_metric_key_holds_extractor_and_count():
    assert fid_metric_key("randconv", 1000) == "val/fid_randconv_1000"
    assert fid_metric_key("inception", 50000) == "val/fid_inception_50000"
    assert FIDSettings(extractor="inception", num_samples=10).key == "val/fid_inception_10"


def test_settings_from_config():
    settings = FIDSettings.from_config(
        {"extractor": "randconv", "num_samples": 64, "every_n_epochs": 2}
    )

    assert settings == FIDSettings("randconv", 64, 2, None)
    assert FIDSettings.from_config(None) is None


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"extractor": "clip"}, "extractor"),
        ({"num_samples": 1}, "num_samples"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"extractor": "randconv", "inception_weights_path": "w.pth"}, "inception_weights_path"),
        ({"num_sample": 100}, "unknown key"),
    ],
)
def test_invalid_settings_raise(node: dict, message: str):
    with pytest.raises(ValueError, match=message):
        FIDSettings.from_config(node)


# Fréchet distance


def test_fid_matches_scipy_on_same_features():
    metric = build_fid_metric(FIDSettings(extractor="randconv"))
    metric.set_dtype(torch.float64)
    real = digit_images(300)
    fake = (digit_images(300, offset=300) + 0.2 * torch.rand(300, 1, 8, 8)).clamp(0, 1)

    value = fid_between(metric, real, fake)
    real_features = metric.inception(images_for_fid(real)).double().numpy()
    fake_features = metric.inception(images_for_fid(fake)).double().numpy()
    expected = scipy_frechet_distance(real_features, fake_features)

    assert expected > 0.1
    assert value == pytest.approx(expected, rel=1e-4)


def test_randconv_same_data_closer_than_noise():
    real = digit_images(600)
    other_half = digit_images(600, offset=600)
    noise = torch.rand(600, 1, 8, 8)

    same = fid_between(build_fid_metric(FIDSettings()), real, other_half)
    different = fid_between(build_fid_metric(FIDSettings()), real, noise)

    assert same < different / 10


def test_randconv_weights_ignore_global_rng():
    torch.manual_seed(0)
    first = RandomConvFeatures()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    second = RandomConvFeatures()

    assert torch.equal(torch.get_rng_state(), state)
    for name, buffer in first.state_dict().items():
        assert torch.equal(buffer, second.state_dict()[name])


def test_randconv_feature_shape():
    features = RandomConvFeatures()(torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8))

    assert features.shape == (5, RandomConvFeatures().num_features)
    assert features.std() > 0


def test_randconv_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        RandomConvFeatures()(torch.rand(2, 3, 8, 8))


def test_images_for_fid_rounds_to_uint8_rgb():
    grey = torch.tensor([0.0, 0.2, 0.5 / 255, 1.4 / 255, 1.0, 1.2]).view(1, 1, 2, 3)

    rgb = images_for_fid(grey)

    assert rgb.dtype == torch.uint8
    assert rgb.shape == (1, 3, 2, 3)
    assert rgb[0, 0].flatten().tolist() == [0, 51, 0, 1, 255, 255]
    assert torch.equal(rgb[:, 1], rgb[:, 0])
    assert torch.equal(rgb[:, 2], rgb[:, 0])


# Inception


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised torch-fidelity InceptionV3 state dict, saved like the real file.

    torch-fidelity's constructor always loads weights, so only while creating this fixture
    the loading is skipped; He-normal convolutions keep the random features from vanishing.
    """
    patch = pytest.MonkeyPatch()
    patch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    patch.setattr(
        fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None
    )
    try:
        network = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        patch.undo()

    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            std = (2.0 / module.weight[0].numel()) ** 0.5
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * std
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(network.state_dict(), path)
    return path


def test_inception_runs_on_local_weights_file(inception_weights: Path):
    settings = FIDSettings(
        extractor="inception", num_samples=3, inception_weights_path=str(inception_weights)
    )
    metric = build_fid_metric(settings)
    saved = torch.load(inception_weights)

    assert torch.equal(
        metric.inception.Conv2d_1a_3x3.conv.weight, saved["Conv2d_1a_3x3.conv.weight"]
    )
    real = digit_images(3)
    fake = torch.rand(3, 1, 8, 8)
    value = fid_between(metric, real, fake)
    assert np.isfinite(value)
    assert value > 0


def test_inception_reads_torch_hub_cache(inception_weights: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fidelity_inception, "URL_INCEPTION_V3", UNREACHABLE_URL)
    hub_dir = tmp_path / "hub"
    (hub_dir / "checkpoints").mkdir(parents=True)
    (hub_dir / "checkpoints" / INCEPTION_WEIGHTS_FILE).write_bytes(inception_weights.read_bytes())
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub_dir))

    metric = build_fid_metric(FIDSettings(extractor="inception"))

    assert metric.inception.features_list == ["2048"]


def test_inception_offline_error_names_file_folder_and_key(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fidelity_inception, "URL_INCEPTION_V3", UNREACHABLE_URL)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    with pytest.raises(FileNotFoundError) as error:
        build_fid_metric(FIDSettings(extractor="inception"))

    message = str(error.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "model.fid.inception_weights_path" in message


def test_inception_missing_path_error(tmp_path: Path):
    missing = tmp_path / "absent.pth"
    settings = FIDSettings(extractor="inception", inception_weights_path=str(missing))

    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_fid_metric(settings)


def test_download_timeout_restored_after_build(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fidelity_inception, "URL_INCEPTION_V3", UNREACHABLE_URL)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    before = socket.getdefaulttimeout()
    with pytest.raises(FileNotFoundError):
        build_fid_metric(FIDSettings(extractor="inception"))

    assert socket.getdefaulttimeout() == before
    assert genlab_fid.DOWNLOAD_TIMEOUT_S > 0


# FID inside a module


def fit_vae(tmp_path: Path, fid: dict | None, max_epochs: int = 2) -> tuple[VAE, L.Trainer]:
    datamodule = ImageDataModule(
        source="digits", image_size=8, channels=1, batch_size=64, val_fraction=0.1
    )
    model = VAE(**datamodule.model_inputs(), latent_dim=4, width=8, fid=fid)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule)
    return model, trainer


def test_fid_metric_not_in_state_dict_or_checkpoint(tmp_path: Path):
    model, trainer = fit_vae(tmp_path, {"extractor": "randconv", "num_samples": 50}, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)

    assert model.fid_metric is not None
    assert "val/fid_randconv_50" in trainer.callback_metrics
    metric_tensors = {
        id(t) for t in list(model.fid_metric.buffers()) + list(model.fid_metric.parameters())
    }
    assert not metric_tensors & {id(t) for t in model.state_dict(keep_vars=True).values()}
    for key in checkpoint["state_dict"]:
        assert key.startswith(("encoder.", "decoder.", "fixed_latents")), key
    assert "fid_metric" not in dict(model.named_modules())


def test_fid_every_n_epochs_and_real_statistics_once(tmp_path: Path):
    real_counts: list[int] = []

    class RecordingVAE(VAE):
        def on_validation_epoch_end(self) -> None:
            super().on_validation_epoch_end()
            if not self.trainer.sanity_checking:
                real_counts.append(int(self.fid_metric.real_features_num_samples))

    datamodule = ImageDataModule(
        source="digits", image_size=8, channels=1, batch_size=64, val_fraction=0.1
    )
    model = RecordingVAE(
        **datamodule.model_inputs(),
        latent_dim=4,
        width=8,
        fid={"num_samples": 100, "every_n_epochs": 2},
    )
    trainer = L.Trainer(
        max_epochs=4,
        limit_train_batches=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule)

    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    fid_epochs = [int(row["epoch"]) for row in rows if row.get("val/fid_randconv_100")]
    # Epochs 2 and 4 counted from 1, which Lightning numbers 1 and 3.
    assert fid_epochs == [1, 3]
    # No real images before the first FID epoch, then the same 100 for the rest of the run.
    assert real_counts == [0, 100, 100, 100]


def test_fid_real_images_capped_by_validation_set(tmp_path: Path):
    with pytest.warns(UserWarning, match="fewer than"):
        model, _ = fit_vae(tmp_path, {"num_samples": 1000}, max_epochs=1)

    assert int(model.fid_metric.real_features_num_samples) == 180


def test_fid_disabled_builds_no_metric(tmp_path: Path):
    model, trainer = fit_vae(tmp_path, None, max_epochs=1)

    assert model.fid_metric is None
    assert not any(key.startswith("val/fid") for key in trainer.callback_metrics)


# FID and KID from one feature pass


def polynomial_mmd(real: np.ndarray, fake: np.ndarray, biased: bool = False) -> float:
    """Squared MMD with the kernel (x.y / d + 1) ** 3: the U-statistic of KID, or the biased
    V-statistic that keeps the kernel's diagonal."""
    d = real.shape[1]
    k_rr = (real @ real.T / d + 1.0) ** 3
    k_ff = (fake @ fake.T / d + 1.0) ** 3
    k_rf = (real @ fake.T / d + 1.0) ** 3
    m = len(real)
    if biased:
        return float(k_rr.mean() + k_ff.mean() - 2.0 * k_rf.mean())
    off_diagonal = (k_rr.sum() - np.trace(k_rr) + k_ff.sum() - np.trace(k_ff)) / (m * (m - 1))
    return float(off_diagonal - 2.0 * k_rf.mean())


def distances(
    real: torch.Tensor, fake: torch.Tensor, kid: KIDSettings | None, num_samples: int
) -> dict[str, float]:
    metrics = ImageDistanceMetrics(FIDSettings(num_samples=num_samples), kid)
    metrics.update(images_for_fid(real), real=True)
    metrics.update(images_for_fid(fake), real=False)
    return {key: float(value) for key, value in metrics.compute("test").items()}


def test_kid_metric_key_format():
    assert kid_metric_key("randconv", 350, "val") == "val/kid_randconv_350"
    assert fid_metric_key("inception", 10, "test") == "test/fid_inception_10"


def test_shared_features_give_same_fid():
    real = digit_images(200)
    fake = (digit_images(200, offset=200) + 0.1 * torch.rand(200, 1, 8, 8)).clamp(0, 1)

    shared = distances(real, fake, kid=None, num_samples=200)
    direct = fid_between(build_fid_metric(FIDSettings()), real, fake)

    assert list(shared) == ["test/fid_randconv_200"]
    assert shared["test/fid_randconv_200"] == direct


def test_kid_matches_numpy_on_all_samples():
    real = digit_images(120)
    fake = (digit_images(120, offset=120) + 0.3 * torch.rand(120, 1, 8, 8)).clamp(0, 1)
    extractor = RandomConvFeatures()
    real_features = extractor(images_for_fid(real)).double().numpy()
    fake_features = extractor(images_for_fid(fake)).double().numpy()

    # Subsets of all 120 samples are all the same set: the mean is the full U-statistic.
    values = distances(real, fake, KIDSettings(subsets=4, subset_size=120), num_samples=120)

    expected = polynomial_mmd(real_features, fake_features)
    assert expected > 1e-3
    assert values["test/kid_randconv_120"] == pytest.approx(expected, rel=1e-4)
    assert values["test/kid_randconv_120_std"] == pytest.approx(0.0, abs=1e-6)


def test_kid_matches_torchmetrics_on_images():
    real = digit_images(150)
    fake = (digit_images(150, offset=150) + 0.2 * torch.rand(150, 1, 8, 8)).clamp(0, 1)
    reference = KernelInceptionDistance(feature=RandomConvFeatures(), subsets=20, subset_size=50)
    reference.update(images_for_fid(real), real=True)
    reference.update(images_for_fid(fake), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(genlab_fid.KID_SEED)
        expected_mean, expected_std = reference.compute()

    values = distances(real, fake, KIDSettings(subsets=20, subset_size=50), num_samples=150)

    assert values["test/kid_randconv_150"] == pytest.approx(float(expected_mean), rel=1e-5)
    assert values["test/kid_randconv_150_std"] == pytest.approx(float(expected_std), rel=1e-5)


def test_kid_near_zero_for_same_distribution():
    real = digit_images(300)
    same = digit_images(300, offset=300)
    noise = torch.rand(300, 1, 8, 8)
    extractor = RandomConvFeatures()
    settings = KIDSettings(subsets=50)

    kid_same = distances(real, same, settings, num_samples=300)["test/kid_randconv_300"]
    kid_noise = distances(real, noise, settings, num_samples=300)["test/kid_randconv_300"]
    biased_same = polynomial_mmd(
        extractor(images_for_fid(real)).double().numpy(),
        extractor(images_for_fid(same)).double().numpy(),
        biased=True,
    )

    assert abs(kid_same) < kid_noise / 100
    # The biased estimate of the same pair is pushed up by the kernel's diagonal.
    assert abs(kid_same) < biased_same / 10


def test_kid_deterministic_keeps_global_rng():
    real, fake = digit_images(100), torch.rand(100, 1, 8, 8)
    torch.manual_seed(0)
    state = torch.get_rng_state()

    first = distances(real, fake, KIDSettings(subsets=10), num_samples=100)
    second = distances(real, fake, KIDSettings(subsets=10), num_samples=100)

    assert first == second
    assert torch.equal(torch.get_rng_state(), state)


def test_kid_subset_size_default_and_cap():
    real = digit_images(30)
    fake = torch.rand(80, 1, 8, 8)
    metrics = ImageDistanceMetrics(FIDSettings(num_samples=80), KIDSettings(subsets=3))
    metrics.update(images_for_fid(real), real=True)
    metrics.update(images_for_fid(fake), real=False)

    values = metrics.compute("val")

    assert KIDSettings().resolved_subset_size(350) == 175
    assert KIDSettings().resolved_subset_size(5000) == 1000
    assert KIDSettings().resolved_subset_size(2) == 2
    assert KIDSettings(subset_size=7).resolved_subset_size(5000) == 7
    # 40 by default, but only 30 real images were given.
    assert metrics.kid.subset_size == 30
    assert np.isfinite(float(values["val/kid_randconv_80"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"subsets": 0}, "kid.subsets"), ({"subset_size": 1}, "kid.subset_size")],
)
def test_invalid_kid_settings_raise(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        KIDSettings(**kwargs)


def test_fid_settings_overrides():
    base = FIDSettings(extractor="inception", num_samples=500, inception_weights_path="w.pth")

    assert base.with_overrides(num_samples=20) == FIDSettings("inception", 20, 1, "w.pth")
    assert base.with_overrides(extractor="randconv") == FIDSettings("randconv", 500, 1, None)
    assert base.with_overrides() == base


def test_feature_extractor_not_in_state_dict(tmp_path: Path):
    model, _ = fit_vae(tmp_path, {"extractor": "randconv", "num_samples": 50}, max_epochs=1)

    extractor_tensors = {id(t) for t in model._fid_metrics.extractor.buffers()}

    assert extractor_tensors
    assert not extractor_tensors & {id(t) for t in model.state_dict(keep_vars=True).values()}
