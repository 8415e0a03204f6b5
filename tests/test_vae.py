"""Tests of the convolutional VAE networks and the VAE LightningModule, trained on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from image_files import write_mnist, write_png_folder

from datamodules.images import ImageDataModule
from lightning_modules import vae as vae_module
from lightning_modules.nets.conv_vae import Decoder, Encoder, gaussian_kl, reparameterize
from lightning_modules.vae import VAE


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
        write_png_folder(tmp_path / "images", classes=None, per_class=40, size=(24, 20))
        return ImageDataModule(
            source="folder", path=str(tmp_path / "images"), image_size=16, channels=3, batch_size=16
        )
    raise ValueError(kind)


def small_vae(datamodule: ImageDataModule, **kwargs) -> VAE:
    settings = {
        "latent_dim": 4,
        "width": 8,
        "num_grid_samples": 16,
        "fid": {"extractor": "randconv", "num_samples": 20},
    }
    settings.update(kwargs)
    return VAE(**datamodule.model_inputs(), **settings)


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
@pytest.mark.parametrize("image_size", [8, 16, 28, 32, 64])
def test_encoder_decoder_shapes(image_size: int, channels: int):
    encoder = Encoder(image_size, channels, latent_dim=6, width=4)
    decoder = Decoder(image_size, channels, latent_dim=6, width=4)

    mu, logvar = encoder(torch.rand(2, channels, image_size, image_size))
    out = decoder(reparameterize(mu, logvar))

    assert mu.shape == (2, 6)
    assert logvar.shape == (2, 6)
    assert out.shape == (2, channels, image_size, image_size)


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    posterior = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros(3), torch.ones(3))

    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=-1)

    assert torch.allclose(gaussian_kl(mu, logvar), expected, atol=1e-5)


def test_reparameterize_moments():
    mu = torch.full((20000, 1), 2.0)
    logvar = torch.full((20000, 1), math.log(0.25))

    z = reparameterize(mu, logvar)

    assert float(z.mean()) == pytest.approx(2.0, abs=0.02)
    assert float(z.std()) == pytest.approx(0.5, abs=0.02)


# Objective and metrics


def test_kl_warmup_weights():
    model = VAE(image_size=8, channels=1, beta=0.5, kl_warmup_steps=100)

    assert model.kl_weight(0) == 0.0
    assert model.kl_weight(25) == pytest.approx(0.125)
    assert model.kl_weight(50) == pytest.approx(0.25)
    assert model.kl_weight(100) == pytest.approx(0.5)
    assert model.kl_weight(1000) == pytest.approx(0.5)


def test_kl_weight_without_warmup_is_beta():
    model = VAE(image_size=8, channels=1, beta=2.0, kl_warmup_steps=0)

    assert model.kl_weight(0) == 2.0


def test_bits_per_dim_formula():
    model = VAE(image_size=16, channels=3)

    bpd = model.bits_per_dim(torch.tensor(1000.0))

    assert float(bpd) == pytest.approx(1000.0 / (3 * 16 * 16 * math.log(2)))


def test_bernoulli_nll_is_summed_cross_entropy():
    model = VAE(image_size=8, channels=1, likelihood="bernoulli")
    x = torch.rand(2, 1, 8, 8)
    logits = torch.randn(2, 1, 8, 8)

    nll = model.negative_log_likelihood(x, logits)

    p = torch.sigmoid(logits)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(nll, expected, atol=1e-4)


def test_gaussian_nll_is_log_density():
    model = VAE(image_size=8, channels=3, likelihood="gaussian")
    with torch.no_grad():
        model.log_scale.copy_(torch.tensor([-1.0, 0.0, 0.5]))
    x = torch.rand(2, 3, 8, 8)
    mean = torch.rand(2, 3, 8, 8)

    nll = model.negative_log_likelihood(x, mean)

    sigma = torch.tensor([-1.0, 0.0, 0.5]).exp().view(1, 3, 1, 1)
    log_density = -0.5 * math.log(2 * math.pi) - sigma.log() - 0.5 * ((x - mean) / sigma) ** 2
    assert torch.allclose(nll, -log_density.flatten(1).sum(1), atol=1e-4)


def test_validation_nelbo_is_recon_plus_kl(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_vae(datamodule, fid=None)
    trainer = cpu_trainer(tmp_path, limit_val_batches=3)

    trainer.fit(model, datamodule)

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert metrics["val/nelbo"] == pytest.approx(metrics["val/recon"] + metrics["val/kl"], rel=1e-5)
    assert metrics["val/bpd"] == pytest.approx(
        metrics["val/nelbo"] / (8 * 8 * math.log(2)), rel=1e-5
    )
    assert metrics["val/kl"] > 0


def test_training_loss_uses_beta_and_nelbo_does_not(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_vae(datamodule, beta=0.25, fid=None)
    trainer = cpu_trainer(tmp_path, limit_train_batches=1)

    trainer.fit(model, datamodule)

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert metrics["train/kl_weight"] == 0.25
    assert metrics["train/loss"] == pytest.approx(
        metrics["train/recon"] + 0.25 * metrics["train/kl"], rel=1e-5
    )
    assert metrics["train/nelbo"] == pytest.approx(
        metrics["train/recon"] + metrics["train/kl"], rel=1e-5
    )


def test_warmup_starts_with_zero_kl_weight(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_vae(datamodule, kl_warmup_steps=10, fid=None)
    trainer = cpu_trainer(tmp_path, limit_train_batches=1)

    trainer.fit(model, datamodule)

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert metrics["train/kl_weight"] == 0.0
    assert metrics["train/loss"] == pytest.approx(metrics["train/recon"], rel=1e-6)


# Training


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("kind", ["digits", "mnist", "folder"])
def test_vae_trains_on_each_data_kind(kind: str, likelihood: str, tmp_path: Path):
    datamodule = image_datamodule(kind, tmp_path)
    model = small_vae(datamodule, likelihood=likelihood)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = cpu_trainer(tmp_path)

    trainer.fit(model, datamodule)

    metrics = trainer.callback_metrics
    for key in (
        "train/loss",
        "train/nelbo",
        "val/nelbo",
        "val/bpd",
        "val/recon",
        "val/kl",
        model.fid_key,
    ):
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter, before[name]), f"{name} did not change"
    assert list((tmp_path / "samples").glob("samples_generated_epoch000_*.png"))
    assert list((tmp_path / "samples").glob("samples_reconstructions_epoch000_*.png"))


def test_vae_checkpoint_reload_same_outputs(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_vae(datamodule, likelihood="gaussian")
    trainer = cpu_trainer(tmp_path)
    trainer.fit(model, datamodule)
    path = tmp_path / "vae.ckpt"
    trainer.save_checkpoint(path)

    reloaded = VAE.load_from_checkpoint(path)
    model.eval()
    reloaded.eval()
    images = next(iter(datamodule.val_dataloader()))[0]

    with torch.no_grad():
        assert torch.equal(model(images), reloaded(images))
        assert torch.equal(
            model.decode_mean(model.fixed_latents), reloaded.decode_mean(reloaded.fixed_latents)
        )
    assert torch.equal(model.log_scale, reloaded.log_scale)


def test_vae_monitor():
    model = VAE(image_size=8, channels=1)

    assert model.monitor == "val/nelbo"
    assert model.monitor_mode == "min"
    assert model.fid_key is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"likelihood": "laplace"}, "likelihood"),
        ({"beta": -0.1}, "beta"),
        ({"kl_warmup_steps": -1}, "kl_warmup_steps"),
        ({"lr": 0}, "lr"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"width": 0}, "width"),
        ({"fid": {"num_samples": 1}}, "num_samples"),
    ],
)
def test_vae_invalid_arguments_raise(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        VAE(image_size=8, channels=1, **kwargs)


def test_vae_rejects_unsupported_image_size():
    with pytest.raises(ValueError, match="data.image_size"):
        VAE(image_size=18, channels=1)


def test_config_problems_of_model_node():
    valid = {"likelihood": "gaussian", "fid": {"extractor": "randconv", "num_samples": 10}}
    invalid = {"likelihood": "poisson", "fid": {"extractor": "randconv", "samples": 10}}

    problems = VAE.config_problems(invalid)

    assert VAE.config_problems(valid) == []
    assert VAE.config_problems({"fid": None}) == []
    assert len(problems) == 2
    assert problems[0].startswith("fid has unknown key(s) ['samples']")
    assert problems[1].startswith("likelihood must be one of")


# Posterior noise of validation and test; importance-weighted bound


def digit_batch(size: int = 64) -> torch.Tensor:
    datamodule = ImageDataModule(source="digits", image_size=8, channels=1, batch_size=size)
    datamodule.setup("fit")
    return next(iter(datamodule.val_dataloader()))[0]


def test_elbo_terms_follow_generator():
    model = VAE(image_size=8, channels=1, latent_dim=4, width=8).eval()
    x = digit_batch(16)

    with torch.no_grad():
        first = model.elbo_terms(x, torch.Generator().manual_seed(3))
        torch.manual_seed(0)
        second = model.elbo_terms(x, torch.Generator().manual_seed(3))
        other = model.elbo_terms(x, torch.Generator().manual_seed(4))

    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_validation_metrics_ignore_global_rng(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_vae(datamodule, fid=None)
    trainer = cpu_trainer(tmp_path, limit_val_batches=3)
    trainer.fit(model, datamodule)

    values = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        metrics = trainer.validate(model, datamodule, verbose=False)[0]
        values.append(metrics["val/nelbo"])

    assert values[0] == values[1]


def test_iwae_one_sample_is_elbo():
    model = VAE(image_size=8, channels=1, latent_dim=4, width=8, likelihood="gaussian").eval()
    x = digit_batch(16)

    with torch.no_grad():
        nll = model.importance_weighted_nll(x, 1, torch.Generator().manual_seed(5))
        recon, _ = model.elbo_terms(x, torch.Generator().manual_seed(5))
        # The same noise again, to rebuild z and the Monte Carlo KL term log q(z|x) - log p(z).
        mu, logvar = model.encoder(x)
        noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(5))
        z = mu + (0.5 * logvar).exp() * noise
        log_q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)

    assert torch.allclose(nll, recon + log_q - log_p, rtol=1e-5, atol=1e-4)


def test_iwae_bound_below_nelbo_on_average():
    torch.manual_seed(0)
    model = VAE(image_size=8, channels=1, latent_dim=4, width=8, likelihood="gaussian").eval()
    x = digit_batch(64)

    with torch.no_grad():
        draws = [model.elbo_terms(x, torch.Generator().manual_seed(seed)) for seed in range(20)]
        nelbo = torch.stack([recon + kl for recon, kl in draws]).mean()
        iwae = model.importance_weighted_nll(x, 64, torch.Generator().manual_seed(100)).mean()

    assert iwae < nelbo


def test_iwae_independent_of_chunking(monkeypatch: pytest.MonkeyPatch):
    model = VAE(image_size=8, channels=1, latent_dim=4, width=8, likelihood="bernoulli").eval()
    x = digit_batch(8)

    with torch.no_grad():
        whole = model.importance_weighted_nll(x, 10, torch.Generator().manual_seed(2))
        # 8 images per pass: one posterior sample per forward pass.
        monkeypatch.setattr(vae_module, "IWAE_IMAGES_PER_PASS", 8)
        chunked = model.importance_weighted_nll(x, 10, torch.Generator().manual_seed(2))

    assert torch.allclose(whole, chunked, rtol=1e-6)


def test_iwae_finite_for_huge_log_weights():
    model = VAE(image_size=8, channels=1, latent_dim=4, width=8, likelihood="gaussian").eval()
    with torch.no_grad():
        # sigma = exp(-30): -log p(x|z) is about 1e25 nats, so every weight exp(-1e25) is 0
        # in floating point and only a logsumexp keeps the estimate finite.
        model.log_scale.fill_(-30.0)
    x = digit_batch(8)

    with torch.no_grad():
        nll = model.importance_weighted_nll(x, 16, torch.Generator().manual_seed(0))
        single = model.importance_weighted_nll(x, 1, torch.Generator().manual_seed(0))

    assert torch.isfinite(nll).all()
    assert (nll > 1e20).all()
    assert (nll <= single * (1 + 1e-6)).all()


def test_iwae_rejects_zero_samples():
    model = VAE(image_size=8, channels=1)

    with pytest.raises(ValueError, match="num_samples"):
        model.importance_weighted_nll(torch.rand(2, 1, 8, 8), 0)


def test_test_step_logs_split_metrics(tmp_path: Path):
    datamodule = image_datamodule("digits", tmp_path)
    model = small_vae(datamodule, fid=None)
    trainer = cpu_trainer(tmp_path, limit_val_batches=3, limit_test_batches=3)
    trainer.fit(model, datamodule)
    validated = trainer.validate(model, datamodule, verbose=False)[0]

    model.configure_test(split="val", iwae_samples=8)
    tested = trainer.test(model, dataloaders=datamodule.val_dataloader(), verbose=False)[0]

    for key in ("val/nelbo", "val/bpd", "val/recon", "val/kl"):
        assert tested[key] == validated[key], key
    assert tested["val/nll_iwae_8"] < tested["val/nelbo"]
    assert tested["val/bpd_iwae_8"] == pytest.approx(
        tested["val/nll_iwae_8"] / (8 * 8 * math.log(2)), rel=1e-5
    )
