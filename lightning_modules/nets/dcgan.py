"""DCGAN generator and discriminator (Radford, Metz and Chintala, 2016, arXiv:1511.06434).

Both networks follow the image size: for image_size = s0 * 2**k (see image_size.py) the
generator projects the latent vector to an s0 x s0 feature map and doubles its side k
times; the discriminator halves the side k times and reads one logit off the s0 x s0 map.
For 64 x 64 images (s0 = 4, k = 4) this is the network of the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.nets.image_size import base_size_and_depth


def dcgan_init_(module: nn.Module) -> None:
    """Initialise weights as in the DCGAN paper: conv weights and BatchNorm scales from
    N(0, 0.02) (the scales centred on 1), biases at 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, mean=1.0, std=0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """Map latents (B, latent_dim) to images (B, channels, image_size, image_size) in [-1, 1]."""

    def __init__(self, latent_dim: int, image_size: int, channels: int, width: int = 64) -> None:
        super().__init__()
        base, depth = base_size_and_depth(image_size)
        self.latent_dim = latent_dim

        # The widest map is the first one; each upsampling block halves the width, so the
        # last hidden map (full size / 2) has `width` channels.
        hidden = width * 2 ** (depth - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(
                latent_dim, hidden, kernel_size=base, stride=1, padding=0, bias=False
            ),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        ]
        # Each ConvTranspose2d(4, 2, 1) doubles the side: (s - 1) * 2 - 2 + 4 = 2s.
        for _ in range(depth - 1):
            layers += [
                nn.ConvTranspose2d(
                    hidden, hidden // 2, kernel_size=4, stride=2, padding=1, bias=False
                ),
                nn.BatchNorm2d(hidden // 2),
                nn.ReLU(inplace=True),
            ]
            hidden //= 2
        layers += [
            nn.ConvTranspose2d(hidden, channels, kernel_size=4, stride=2, padding=1, bias=False),
            nn.Tanh(),
        ]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init_)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # (B, latent_dim) -> (B, latent_dim, 1, 1): the first layer reads z as a 1 x 1 map.
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """Map images (B, channels, image_size, image_size) in [-1, 1] to real/fake logits (B,)."""

    def __init__(self, image_size: int, channels: int, width: int = 64) -> None:
        super().__init__()
        base, depth = base_size_and_depth(image_size)

        # The first block has no BatchNorm, as in the paper; each later block halves the
        # side and doubles the width.
        hidden = width
        layers: list[nn.Module] = [
            nn.Conv2d(channels, hidden, kernel_size=4, stride=2, padding=1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for _ in range(depth - 1):
            layers += [
                nn.Conv2d(hidden, hidden * 2, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(hidden * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            hidden *= 2
        # The s0 x s0 map collapses to a single logit.
        layers.append(nn.Conv2d(hidden, 1, kernel_size=base, stride=1, padding=0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()
