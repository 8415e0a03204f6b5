"""Convolutional VAE (Kingma and Welling, 2014) with a Bernoulli or Gaussian likelihood."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

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
        """Return -log p(x | z) in nats per image, (B,), given the decoder output for z."""
        if self.hparams.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(decoder_out, x, reduction="none")
        else:
            scale = self.log_scale.exp().view(1, -1, 1, 1)
            # validate_args=False lets a diverged (NaN) decoder output reach the loss, where
            # the run's NaN check reports it, instead of failing here on the argument check.
            nll = -Normal(decoder_out, scale, validate_args=False).log_prob(x)
        return nll.flatten(1).sum(dim=1)

    def elbo_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (recon, kl) in nats, each (B,): -log p(x | z) for one z ~ q(z | x), and the KL."""
        mu, logvar = self.encoder(x)
        z = reparameterize(mu, logvar)
        recon = self.negative_log_likelihood(x, self.decoder(z))
        return recon, gaussian_kl(mu, logvar)

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
        recon, kl = self.elbo_terms(x)
        nelbo = (recon + kl).mean()
        self.log_dict(
            {
                "val/nelbo": nelbo,
                "val/bpd": self.bits_per_dim(nelbo),
                "val/recon": recon.mean(),
                "val/kl": kl.mean(),
            },
            batch_size=x.shape[0],
            sync_dist=True,
        )
        # The validation loader is not shuffled, so batch 0 contains the same images every epoch.
        if batch_idx == 0 and not self.trainer.sanity_checking:
            originals = x[:NUM_RECONSTRUCTIONS]
            pairs = torch.stack([originals, self(originals)], dim=1).flatten(0, 1)
            log_image_grid(self, "samples/reconstructions", pairs)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            log_image_grid(self, "samples/generated", self.decode_mean(self.fixed_latents))
        super().on_validation_epoch_end()
