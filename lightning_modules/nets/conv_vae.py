"""Convolutional encoder and decoder of a VAE with a diagonal Gaussian posterior.

Depth follows the image size as in the DCGAN networks (see image_size.py): for
image_size = s0 * 2**k the encoder halves the side k times down to s0 x s0 and the decoder
doubles it back. There is no BatchNorm, so the ELBO of an image does not depend on the
other images of its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.nets.image_size import base_size_and_depth


class Encoder(nn.Module):
    """Map images (B, C, H, W) to the posterior parameters mu and logvar, each (B, latent_dim)."""

    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int = 32) -> None:
        super().__init__()
        base, depth = base_size_and_depth(image_size)

        layers: list[nn.Module] = []
        in_channels, out_channels = channels, width
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1),
                nn.ReLU(inplace=True),
            ]
            in_channels, out_channels = out_channels, out_channels * 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        # One linear layer gives mu and logvar side by side.
        self.to_posterior = nn.Linear(in_channels * base * base, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_posterior(self.features(x)).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """Map latents (B, latent_dim) to per-pixel outputs (B, C, H, W).

    The outputs are unconstrained: Bernoulli logits or Gaussian means, as the VAE's
    likelihood reads them.
    """

    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int = 32) -> None:
        super().__init__()
        base, depth = base_size_and_depth(image_size)

        # Mirror of the encoder: the s0 x s0 map has the encoder's widest width.
        hidden = width * 2 ** (depth - 1)
        self.base = base
        self.hidden = hidden
        self.from_latent = nn.Linear(latent_dim, hidden * base * base)

        layers: list[nn.Module] = [nn.ReLU(inplace=True)]
        for _ in range(depth - 1):
            layers += [
                nn.ConvTranspose2d(hidden, hidden // 2, kernel_size=4, stride=2, padding=1),
                nn.ReLU(inplace=True),
            ]
            hidden //= 2
        layers.append(nn.ConvTranspose2d(hidden, channels, kernel_size=4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(-1, self.hidden, self.base, self.base)
        return self.net(h)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Draw z ~ N(mu, exp(logvar)) as mu + sigma * eps, so gradients flow to mu and logvar."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in nats, summed over the latent dimensions: (B,)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)
