"""Convolutional VAE (Kingma and Welling, 2014) with a Bernoulli or Gaussian likelihood."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from genlab.fid import FIDSettings, KIDSettings
from genlab.samples import log_image_grid
from lightning_modules.image_module import (
    ImageGenerativeModule,
    check_channels,
    check_positive_floats,
    check_positive_ints,
)
from lightning_modules.nets.conv_vae import Decoder, Encoder, gaussian_kl, reparameterize

LIKELIHOODS = ("bernoulli", "gaussian")

# Validation images shown in the reconstruction grid, each next to its reconstruction.
NUM_RECONSTRUCTIONS = 32

# Seed of the posterior noise of validation and test batch 0. Batch i of process r in a
# world of W processes uses POSTERIOR_NOISE_SEED + i * W + r, so the metrics of a
# checkpoint do not depend on the global random state, and no two batches share noise.
POSTERIOR_NOISE_SEED = 4321

# Images decoded per forward pass of the importance-weighted bound: a batch of B images
# takes max(1, IWAE_IMAGES_PER_PASS // B) posterior samples per pass, which bounds memory.
IWAE_IMAGES_PER_PASS = 4096


class VAE(ImageGenerativeModule):
    """VAE with a diagonal Gaussian posterior and a standard normal prior.

    Likelihoods p(x | z) for images x in [0, 1]:

    - ``bernoulli``: the decoder outputs logits; -log p(x | z) is the binary cross-entropy
      summed over pixels. For grey levels between 0 and 1 this is the usual cross-entropy
      objective rather than a normalised density.
    - ``gaussian``: the decoder outputs means, and a learned log standard deviation per
      channel sets the scale. -log p(x | z) is the Gaussian negative log density, a
      continuous density, so nelbo and bpd can be negative and are not comparable with
      numbers for discrete 8-bit data.

    Reported metrics, in nats per image with beta = 1 whatever the training settings:
    ``nelbo = recon + kl`` with recon = -log p(x | z) for one posterior sample z and kl =
    KL(q(z | x) || p(z)), and ``bpd = nelbo / (C * H * W * ln 2)``. The training objective
    ``train/loss = recon + kl_weight * kl`` uses kl_weight = beta * min(1, step /
    kl_warmup_steps), a linear warm-up over the first kl_warmup_steps optimizer steps.

    In validation and test, the posterior sample of each batch comes from a generator seeded
    by the batch index (POSTERIOR_NOISE_SEED), so a checkpoint gets the same metrics every
    time it is validated or tested on the same batches. Training draws from the global
    random state. With `iwae_samples` = k (see `configure_test`), the test also logs
    ``nll_iwae_<k>`` and ``bpd_iwae_<k>``, the importance-weighted estimate of -log p(x).
    """

    validation_metrics = ("val/nelbo", "val/bpd", "val/recon", "val/kl")

    def __init__(
        self,
        image_size: int,
        channels: int,
        latent_dim: int = 16,
        width: int = 32,
        likelihood: str = "bernoulli",
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        lr: float = 1e-3,
        num_grid_samples: int = 64,
        sample_seed: int = 0,
        fid: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(fid)
        self.save_hyperparameters(logger=False)
        check_channels(channels)
        check_positive_ints(latent_dim=latent_dim, width=width, num_grid_samples=num_grid_samples)
        check_positive_floats(lr=lr)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
            raise ValueError(f"model.beta must be a number >= 0, got {beta!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"model.likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if (
            isinstance(kl_warmup_steps, bool)
            or not isinstance(kl_warmup_steps, int)
            or kl_warmup_steps < 0
        ):
            raise ValueError(
                f"model.kl_warmup_steps must be an integer >= 0, got {kl_warmup_steps!r}"
            )

        self.encoder = Encoder(image_size, channels, latent_dim, width=width)
        self.decoder = Decoder(image_size, channels, latent_dim, width=width)
        if likelihood == "gaussian":
            # log sigma per channel; 0 means sigma = 1 at the start.
            self.log_scale = nn.Parameter(torch.zeros(channels))

        latents = torch.randn(
            num_grid_samples, latent_dim, generator=torch.Generator().manual_seed(sample_seed)
        )
        self.register_buffer("fixed_latents", latents, persistent=True)
        # Posterior samples per image of the importance-weighted bound in Trainer.test.
        self.iwae_samples: int | None = None

    @classmethod
    def config_problems(cls, node: Mapping[str, Any]) -> list[str]:
        problems = super().config_problems(node)
        likelihood = node.get("likelihood", "bernoulli")
        if likelihood not in LIKELIHOODS:
            problems.append(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        return problems

    @property
    def monitor(self) -> str:
        return "val/nelbo"

    @property
    def monitor_mode(self) -> str:
        return "min"

    # ------------------------------------------------------------------ model

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """Return the mean of p(x | z) for latents (B, latent_dim), as images in [0, 1]."""
        out = self.decoder(z)
        if self.hparams.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return out.clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct images x in [0, 1]: the mean of p(x | z) at the posterior mean z."""
        mu, _ = self.encoder(x)
        return self.decode_mean(mu)

    def generate_images(self, num_images: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(num_images, self.hparams.latent_dim, generator=generator)
        return self.decode_mean(z.to(self.device))

    def negative_log_likelihood(self, x: torch.Tensor, decoder_out: torch.Tensor) -> torch.Tensor:
        """Return -log p(x | z) in nats per image given the decoder output for z.

        x and decoder_out are (..., C, H, W) of the same shape; the result is (...,).
        """
        if self.hparams.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(decoder_out, x, reduction="none")
        else:
            scale = self.log_scale.exp().view(1, -1, 1, 1)
            # validate_args=False lets a diverged (NaN) decoder output reach the loss, where
            # the run's NaN check reports it, instead of failing here on the argument check.
            nll = -Normal(decoder_out, scale, validate_args=False).log_prob(x)
        return nll.flatten(-3).sum(dim=-1)

    def elbo_terms(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (recon, kl) in nats, each (B,): -log p(x | z) for one z ~ q(z | x), and the KL.

        The noise of z comes from `generator` (a CPU generator) when given, else from the
        global random state.
        """
        mu, logvar = self.encoder(x)
        if generator is None:
            z = reparameterize(mu, logvar)
        else:
            z = mu + torch.exp(0.5 * logvar) * self._standard_normal(mu, generator)
        recon = self.negative_log_likelihood(x, self.decoder(z))
        return recon, gaussian_kl(mu, logvar)

    def importance_weighted_nll(
        self, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Estimate -log p(x) in nats per image, (B,), with k = num_samples importance samples.

        The estimate is -log (1/k sum_j p(x | z_j) p(z_j) / q(z_j | x)) with z_j ~ q(z | x),
        the bound of Burda et al. (2016, "Importance Weighted Autoencoders"): in expectation
        an upper bound on -log p(x) that decreases towards it as k grows. With k = 1 it is
        the single-sample negative ELBO with a Monte Carlo KL term. The average is a logsumexp
        over the log weights, so it stays finite when every weight underflows float32 (log
        weights below about -104). Samples are
        decoded in chunks of IWAE_IMAGES_PER_PASS images. Sample j draws its noise from
        `generator` (a CPU generator) after sample j - 1, so the chunking does not change it.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        # The log weights are sums over thousands of pixels, so they are computed in float32
        # also under mixed precision.
        mu, logvar = (parameter.float() for parameter in self.encoder(x))
        std = torch.exp(0.5 * logvar)
        posterior = Normal(mu, std, validate_args=False)
        prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
        chunk_size = max(1, IWAE_IMAGES_PER_PASS // x.shape[0])

        log_weights = []
        for start in range(0, num_samples, chunk_size):
            count = min(chunk_size, num_samples - start)
            noise = torch.stack([self._standard_normal(mu, generator) for _ in range(count)])
            z = mu + std * noise  # (count, B, latent_dim)
            decoder_out = self.decoder(z.flatten(0, 1)).float().unflatten(0, (count, x.shape[0]))
            log_likelihood = -self.negative_log_likelihood(x.expand_as(decoder_out), decoder_out)
            log_prior = prior.log_prob(z).sum(dim=-1)
            log_posterior = posterior.log_prob(z).sum(dim=-1)
            log_weights.append(log_likelihood + log_prior - log_posterior)  # (count, B)

        log_weights = torch.cat(log_weights)  # (k, B)
        return math.log(num_samples) - torch.logsumexp(log_weights, dim=0)

    @staticmethod
    def _standard_normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Draw N(0, I) noise shaped like `like`, on the CPU, then move it to its device.

        A CPU generator gives the same noise on every device type.
        """
        if generator is None:
            return torch.randn_like(like)
        noise = torch.randn(like.shape, generator=generator)
        return noise.to(device=like.device, dtype=like.dtype)

    def _posterior_noise_generator(self, batch_idx: int) -> torch.Generator:
        seed = POSTERIOR_NOISE_SEED + batch_idx * self.trainer.world_size + self.global_rank
        return torch.Generator().manual_seed(seed)

    def kl_weight(self, step: int) -> float:
        """Return the weight of the KL term in the training objective at optimizer step `step`."""
        warmup = self.hparams.kl_warmup_steps
        ramp = 1.0 if warmup == 0 else min(1.0, step / warmup)
        return self.hparams.beta * ramp

    def bits_per_dim(self, nelbo: torch.Tensor) -> torch.Tensor:
        """Convert a negative ELBO in nats per image to bits per dimension."""
        c, s = self.hparams.channels, self.hparams.image_size
        return nelbo / (c * s * s * math.log(2.0))

    # ------------------------------------------------------------------ Lightning

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x = batch[0]
        recon, kl = self.elbo_terms(x)
        kl_weight = self.kl_weight(self.global_step)
        loss = (recon + kl_weight * kl).mean()
        self.log_dict(
            {
                "train/loss": loss,
                "train/nelbo": (recon + kl).mean(),
                "train/recon": recon.mean(),
                "train/kl": kl.mean(),
                "train/kl_weight": kl_weight,
            },
            batch_size=x.shape[0],
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x = batch[0]
        self._log_elbo_metrics("val", x, self._posterior_noise_generator(batch_idx))
        # The validation loader is not shuffled, so batch 0 contains the same images every epoch.
        if batch_idx == 0 and not self.trainer.sanity_checking:
            originals = x[:NUM_RECONSTRUCTIONS]
            pairs = torch.stack([originals, self(originals)], dim=1).flatten(0, 1)
            log_image_grid(self, "samples/reconstructions", pairs)

    def configure_test(
        self,
        split: str = "test",
        fid: FIDSettings | None = None,
        kid: KIDSettings | None = None,
        iwae_samples: int | None = None,
    ) -> None:
        """Choose what `Trainer.test` computes (see ImageGenerativeModule.configure_test).

        iwae_samples: k of the importance-weighted bound, an integer >= 1, or None to skip it.
        """
        if iwae_samples is not None and (
            isinstance(iwae_samples, bool) or not isinstance(iwae_samples, int) or iwae_samples < 1
        ):
            raise ValueError(f"iwae_samples must be an integer >= 1 or None, got {iwae_samples!r}")
        super().configure_test(split, fid, kid)
        self.iwae_samples = iwae_samples

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        x = batch[0]
        # The same noise as validation_step for the same batch, so that testing on the
        # validation split reproduces the validation metrics.
        generator = self._posterior_noise_generator(batch_idx)
        self._log_elbo_metrics(self.test_split, x, generator)
        if self.iwae_samples is not None:
            nll = self.importance_weighted_nll(x, self.iwae_samples, generator).mean()
            k = self.iwae_samples
            self.log_dict(
                {
                    f"{self.test_split}/nll_iwae_{k}": nll,
                    f"{self.test_split}/bpd_iwae_{k}": self.bits_per_dim(nll),
                },
                batch_size=x.shape[0],
                sync_dist=True,
            )

    def _log_elbo_metrics(self, split: str, x: torch.Tensor, generator: torch.Generator) -> None:
        """Log the batch means of nelbo, bpd, recon and kl under `split`/, weighted by size."""
        recon, kl = self.elbo_terms(x, generator)
        nelbo = (recon + kl).mean()
        self.log_dict(
            {
                f"{split}/nelbo": nelbo,
                f"{split}/bpd": self.bits_per_dim(nelbo),
                f"{split}/recon": recon.mean(),
                f"{split}/kl": kl.mean(),
            },
            batch_size=x.shape[0],
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            log_image_grid(self, "samples/generated", self.decode_mean(self.fixed_latents))
        super().on_validation_epoch_end()
