"""Samplers as small pure functions, k-diffusion style.

Each takes a model function, starting noise and a tensor of noise levels, and returns clean
latents. Model functions follow one contract: `velocity_fn(x, sigma) -> velocity`, with sigma
of shape [B]. Conditioning is closed over by the caller (see `guided_velocity`).
"""

from __future__ import annotations

from typing import Callable

import torch

from causvid.schedule import add_noise, x0_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]


def guided_velocity(
    denoiser: Callable[..., torch.Tensor],
    text: torch.Tensor,
    null_text: torch.Tensor,
    guidance_scale: float,
) -> VelocityFn:
    """Classifier-free guidance (Ho & Salimans 2022): v_uncond + s * (v_cond - v_uncond).

    The conditional and unconditional passes run as one batch. A scale of 1 skips the
    unconditional pass.
    """

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return denoiser(x, sigma, text)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([text, null_text]))
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return velocity


def sample_euler(
    velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """Euler integration of the probability-flow ODE dx/dsigma = v from sigmas[0] to sigmas[-1]."""
    x = noise
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(x.shape[0])
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * velocity_fn(x, sigma)
        if callback is not None:
            callback(i, x)
    return x


def sample_unipc(
    velocity_fn: VelocityFn, noise: torch.Tensor, num_steps: int, shift: float = 1.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) through diffusers' flow-matching `UniPCMultistepScheduler`.

    The scheduler keeps its multistep history internally, so a fresh one is made per call.
    """
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
    )
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        # The scheduler's own sigma, not t / 1000: its timesteps are rounded to integers.
        sigma = scheduler.sigmas[i].float().expand(x.shape[0]).to(noise.device)
        x = scheduler.step(velocity_fn(x, sigma), t, x, return_dict=False)[0]
        if callback is not None:
            callback(i, x)
    return x


def sample_few_step(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The distilled student's sampler (DMD, Yin et al. 2024): predict x0, re-noise to the next level.

    `sigmas` holds only the student's levels, e.g. [1, .75, .5, .25]; the last x0 is returned.
    `noise_sampler()` gives the fresh noise for each re-noising (k-diffusion's convention), so a
    caller decides where randomness comes from, e.g. one RNG per stream in a batch.
    """
    noise_sampler = noise_sampler or (lambda: torch.randn_like(noise))
    x = noise
    for i, sigma_value in enumerate(sigmas):
        sigma = sigma_value.expand(x.shape[0])
        x0 = x0_from_velocity(x, velocity_fn(x, sigma), sigma)
        if i + 1 == len(sigmas):
            return x0
        x = add_noise(x0, noise_sampler().to(x.device, x.dtype), sigmas[i + 1].expand(x.shape[0]))
    raise ValueError("sample_few_step needs at least one noise level")
