"""DCGAN trained with the non-saturating GAN loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from genlab.fid import FIDSettings, KIDSettings
from genlab.samples import log_image_grid
from lightning_modules.image_module import (
    ImageGenerativeModule,
    check_channels,
    check_positive_floats,
    check_positive_ints,
)
from lightning_modules.nets.dcgan import Discriminator, Generator


class GAN(ImageGenerativeModule):
    """DCGAN (Radford et al., 2016) with the non-saturating loss of Goodfellow et al. (2014).

    Each training batch makes one discriminator step and one generator step (manual
    optimization, so Lightning's `trainer.global_step` grows by 2 per batch). The losses:

    - discriminator: BCE(D(x), 1) + BCE(D(G(z)), 0), logged as `train/d_loss`;
    - generator: BCE(D(G(z)), 1), i.e. -log sigmoid(D(G(z))), logged as `train/g_loss`;
    - `train/loss` = d_loss + g_loss, the sum of both players' objectives. It is logged so
      every model has a `train/loss`, but it does not fall steadily as a GAN improves.

    `train/d_real` and `train/d_fake` are the batch means of D(x) and D(G(z)) as
    probabilities (sigmoid of the logits), measured in the discriminator step. Images
    arrive in [0, 1] and are scaled to [-1, 1], the range of the generator's Tanh output.
    The best checkpoint is chosen by FID; with `fid` null, `monitor` is None.
    """

    validation_metrics = ("val/d_loss", "val/g_loss")
    # Read by the config validator: training_step runs both optimizers itself.
    manual_optimization = True

    def __init__(
        self,
        image_size: int,
        channels: int,
        latent_dim: int = 100,
        generator_width: int = 64,
        discriminator_width: int = 64,
        generator_lr: float = 2e-4,
        discriminator_lr: float = 2e-4,
        betas: Sequence[float] = (0.5, 0.999),
        num_grid_samples: int = 64,
        sample_seed: int = 0,
        fid: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(fid)
        self.save_hyperparameters(logger=False)
        check_channels(channels)
        check_positive_ints(
            latent_dim=latent_dim,
            generator_width=generator_width,
            discriminator_width=discriminator_width,
            num_grid_samples=num_grid_samples,
        )
        check_positive_floats(generator_lr=generator_lr, discriminator_lr=discriminator_lr)
        self.betas = _adam_betas(betas)
        self.automatic_optimization = False

        self.generator = Generator(latent_dim, image_size, channels, width=generator_width)
        self.discriminator = Discriminator(image_size, channels, width=discriminator_width)

        # The sample grid of every epoch, and of a resumed run, shows the same latents.
        latents = torch.randn(
            num_grid_samples, latent_dim, generator=torch.Generator().manual_seed(sample_seed)
        )
        self.register_buffer("fixed_latents", latents, persistent=True)

    @property
    def monitor(self) -> str | None:
        return self.fid_key

    @property
    def monitor_mode(self) -> str:
        return "min"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate images in [0, 1] from latents (B, latent_dim)."""
        return (self.generator(z) + 1.0) / 2.0

    def generate_images(self, num_images: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(num_images, self.hparams.latent_dim, generator=generator)
        return self(z.to(self.device))

    def configure_test(
        self,
        split: str = "test",
        fid: FIDSettings | None = None,
        kid: KIDSettings | None = None,
    ) -> None:
        """Choose the split name and the FID and KID settings of `Trainer.test`.

        The test metrics of the GAN are FID and KID alone (the discriminator's losses depend
        on random latents and measure no quality), so `fid` is required.
        """
        if fid is None:
            raise ValueError(
                "the GAN's test metrics are FID and KID, so FID settings are required; "
                "without them there is nothing to evaluate (in eval.py: remove fid=null)"
            )
        super().configure_test(split, fid, kid)

    def configure_optimizers(self):
        # Order matters: training_step unpacks (discriminator, generator).
        discriminator_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=self.hparams.discriminator_lr, betas=self.betas
        )
        generator_optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=self.hparams.generator_lr, betas=self.betas
        )
        return [discriminator_optimizer, generator_optimizer]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        discriminator_optimizer, generator_optimizer = self.optimizers()
        real = batch[0] * 2.0 - 1.0
        z = torch.randn(real.shape[0], self.hparams.latent_dim, device=self.device)
        fake = self.generator(z)

        # Discriminator step. The fake images are detached so that no gradient reaches G.
        self.toggle_optimizer(discriminator_optimizer)
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake.detach())
        d_loss = _bce(real_logits, 1.0) + _bce(fake_logits, 0.0)
        discriminator_optimizer.zero_grad()
        self.manual_backward(d_loss)
        discriminator_optimizer.step()
        self.untoggle_optimizer(discriminator_optimizer)

        # Generator step with the non-saturating loss -log D(G(z)), against the updated D.
        self.toggle_optimizer(generator_optimizer)
        g_loss = _bce(self.discriminator(fake), 1.0)
        generator_optimizer.zero_grad()
        self.manual_backward(g_loss)
        generator_optimizer.step()
        self.untoggle_optimizer(generator_optimizer)

        self.log_dict(
            {
                "train/d_loss": d_loss,
                "train/g_loss": g_loss,
                "train/loss": d_loss + g_loss,
                "train/d_real": torch.sigmoid(real_logits).mean(),
                "train/d_fake": torch.sigmoid(fake_logits).mean(),
            },
            prog_bar=False,
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        real = batch[0] * 2.0 - 1.0
        z = torch.randn(real.shape[0], self.hparams.latent_dim, device=self.device)
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(self.generator(z))
        d_loss = _bce(real_logits, 1.0) + _bce(fake_logits, 0.0)
        g_loss = _bce(fake_logits, 1.0)
        self.log_dict(
            {"val/d_loss": d_loss, "val/g_loss": g_loss},
            batch_size=real.shape[0],
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            log_image_grid(self, "samples/generated", self(self.fixed_latents))
        super().on_validation_epoch_end()


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _adam_betas(betas: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(b) for b in betas)
    if len(values) != 2 or not all(0.0 <= b < 1.0 for b in values):
        raise ValueError(f"model.betas must be two numbers in [0, 1), got {list(betas)!r}")
    return values
