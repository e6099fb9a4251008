"""Rectified-flow noise schedule: the few formulas every sampler and loss shares.

x_t = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity noise - x0, and
sigma runs from 1 (pure noise) to 0 (clean). Timesteps are sigma * 1000, as Wan was trained.
"""

from __future__ import annotations

import torch

from causvid.errors import UserError


NUM_TRAIN_TIMESTEPS = 1000


def timestep_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input for a noise level."""
    return sigma * NUM_TRAIN_TIMESTEPS


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan/SD3 timestep shift: spends more steps at high noise when shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _broadcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # sigma is [B] (per clip) or [B, F] (per frame); latents are [B, C, F, H, W].
    sigma = sigma.to(x.device, x.dtype)
    if sigma.ndim == 1:
        return sigma.view(-1, 1, 1, 1, 1)
    return sigma[:, None, :, None, None]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t for clean latents `x0` at noise level `sigma`."""
    s = _broadcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def randn_like(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Gaussian noise shaped like `x`, drawn from a CPU RNG (so resume is exact on any device)."""
    return torch.randn(x.shape, generator=rng).to(x.device, x.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Clean-latent estimate from a velocity prediction."""
    return x_t - _broadcast(sigma, x_t) * velocity


def teacher_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """num_steps + 1 decreasing noise levels from 1 to 0, shifted, for the multi-step sampler."""
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def sigmas_from(sigmas: torch.Tensor, start: float) -> torch.Tensor:
    """The part of a decreasing schedule below `start`, beginning at `start` (SDEdit's truncation)."""
    if not 0.0 < start <= float(sigmas[0]):
        raise UserError(f"start noise level must lie in (0, {float(sigmas[0])}], got {start}")
    below = sigmas[sigmas < start]
    return torch.cat([sigmas.new_tensor([start]), below])


def student_sigmas(timesteps: list[int] | tuple[int, ...], shift: float | None = None) -> torch.Tensor:
    """The few-step student's noise levels, e.g. [1000, 750, 500, 250] -> [1, .75, .5, .25].

    With `shift`, the levels are warped through the shifted schedule, as the teacher saw them.
    """
    if not timesteps or any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in timesteps):
        raise UserError(f"student timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {list(timesteps)}")
    if list(timesteps) != sorted(timesteps, reverse=True):
        raise UserError(f"student timesteps must decrease, got {list(timesteps)}")
    sigma = torch.tensor(timesteps, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return (sigma if shift is None else shift_sigma(sigma, shift)).float()
