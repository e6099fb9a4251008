"""A patch discriminator for the autoencoder's adversarial loss (training only, never shipped).

A squared-error loss pays for the mean where an edge's exact position is uncertain, and the
mean of a sharp edge in several places is a soft one: corners of small objects come back round.
A discriminator that scores each patch of a frame as real or reconstructed makes softness
itself costly (Esser et al. 2021, taming transformers; Isola et al. 2017, PatchGAN).
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """Per-frame real/fake logits [B, T, H/4, W/4] for videos [B, 3, T, H, W] in [-1, 1].

    Frames are scored alone: the loss is after sharp shapes, not motion. Each logit sees a
    26-pixel window: a small object (12 pixels across at 64x64) with its surroundings.
    """

    def __init__(self, channels: int = 32):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),
            nn.GroupNorm(8, 2 * channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            nn.GroupNorm(8, 2 * channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 1, 3, padding=1),
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        batch, _, frames, height, width = video.shape
        images = video.transpose(1, 2).reshape(batch * frames, 3, height, width)
        logits = self.layers(images)
        return logits.reshape(batch, frames, *logits.shape[-2:])


def frozen_forward(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """`module(*inputs)` with its weights as constants: gradients reach the inputs only.

    The decoder's adversarial term must not touch the discriminator's gradients. Under DDP the
    hooks on those weights would fire for it and all-reduce the wrong gradients, after which the
    discriminator's own gradients are left un-synchronised and the processes drift apart.
    """
    constants = {name: tensor.detach() for name, tensor in module.named_parameters()}
    return torch.func.functional_call(module, constants, inputs)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator: real logits above 1, fake ones below -1."""
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def adaptive_adversarial_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor,
                                last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """The weight that gives the adversarial gradient on `last_layer` the reconstruction's norm.

    The two losses live on unrelated scales (here a log of squared error against logits), and
    the ratio drifts as both train; matching gradient norms at the decoder's output layer keeps
    the adversarial term a steady fraction of the update (taming transformers' rule).
    """
    reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adversarial_grad = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grad.norm() / (adversarial_grad.norm() + 1e-4)
    return weight.clamp(0, max_weight).detach()
