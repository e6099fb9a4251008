"""Rectified-flow schedule round-trips and the samplers' contracts, including CFG."""

from __future__ import annotations

import pytest
import torch

from causvid.samplers import guided_velocity, sample_euler, sample_few_step, sample_unipc
from causvid.schedule import (
    add_noise,
    shift_sigma,
    sigmas_from,
    student_sigmas,
    teacher_sigmas,
    velocity_target,
    x0_from_velocity,
)


@pytest.mark.parametrize("per_frame", [False, True])
def test_x0_round_trip(per_frame):
    x0, noise = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    sigma = torch.rand(2, 3) if per_frame else torch.rand(2)
    x_t = add_noise(x0, noise, sigma)
    torch.testing.assert_close(x0_from_velocity(x_t, velocity_target(x0, noise), sigma), x0)


def test_noise_endpoints():
    x0, noise = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(add_noise(x0, noise, torch.zeros(1)), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(1)), noise)


def test_shift_moves_levels_up_and_keeps_ends():
    sigma = torch.linspace(0, 1, 11)
    shifted = shift_sigma(sigma, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > sigma[1:-1]).all()
    levels = teacher_sigmas(50, 3.0)
    assert len(levels) == 51 and levels[0] == 1 and levels[-1] == 0 and (levels.diff() < 0).all()


def test_student_sigmas_defaults_and_warp():
    torch.testing.assert_close(student_sigmas([1000, 750, 500, 250]), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    warped = student_sigmas([1000, 750, 500, 250], shift=3.0)
    assert warped[0] == 1 and (warped[1:] > torch.tensor([0.75, 0.5, 0.25])).all()
    for bad in ([250, 500], [0, 1000], [1200]):
        with pytest.raises(ValueError):
            student_sigmas(bad)


def _oracle(target: torch.Tensor):
    """A perfect velocity model for a single data point: v = (x - x0) / sigma."""
    return lambda x, sigma: (x - target) / sigma.view(-1, 1, 1, 1, 1).clamp_min(1e-8)


def test_euler_and_unipc_reach_the_data_point():
    target, noise = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    torch.testing.assert_close(sample_euler(_oracle(target), noise, teacher_sigmas(8, 3.0)), target, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample_unipc(_oracle(target), noise, 8, 3.0), target, atol=1e-3, rtol=0)


def test_few_step_sampler_returns_last_x0_and_uses_its_noise_sampler():
    target = torch.randn(1, 4, 2, 3, 3)
    out = sample_few_step(_oracle(target), torch.randn_like(target), student_sigmas([1000, 500]))
    torch.testing.assert_close(out, target)
    seen = []

    def recording(x, sigma):
        seen.append(x.clone())
        return torch.zeros_like(x)

    noise, fresh = torch.randn_like(target), torch.randn_like(target)
    sample_few_step(recording, noise, student_sigmas([1000, 500]), lambda: fresh)
    # With a zero velocity x0 = x, so the second input is x re-noised with the sampler's noise.
    torch.testing.assert_close(seen[1], add_noise(noise, fresh, torch.tensor([0.5])))


def test_classifier_free_guidance_combines_passes():
    calls = []

    def denoiser(x, sigma, text):
        calls.append(x.shape[0])
        return text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1).expand_as(x).clone()

    x, sigma = torch.zeros(1, 4, 2, 3, 3), torch.ones(1)
    cond, uncond = torch.full((1, 5, 8), 2.0), torch.full((1, 5, 8), 0.5)
    guided = guided_velocity(denoiser, cond, uncond, 4.0)(x, sigma)
    torch.testing.assert_close(guided, torch.full_like(x, 0.5 + 4.0 * (2.0 - 0.5)))
    assert calls == [2]  # conditional and unconditional in one batch
    calls.clear()
    torch.testing.assert_close(guided_velocity(denoiser, cond, uncond, 1.0)(x, sigma), torch.full_like(x, 2.0))
    assert calls == [1]  # scale 1 skips the unconditional pass
    torch.testing.assert_close(guided_velocity(denoiser, cond, uncond, 0.0)(x, sigma), torch.full_like(x, 0.5))


def test_sigmas_from_starts_at_the_level_and_keeps_the_rest_of_the_schedule():
    sigmas = teacher_sigmas(10, shift=3.0)
    tail = sigmas_from(sigmas, 0.5)
    assert tail[0] == 0.5 and tail[-1] == 0.0
    assert torch.equal(tail[1:], sigmas[sigmas < 0.5])
    assert torch.equal(sigmas_from(sigmas, 1.0), sigmas)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="start noise level"):
            sigmas_from(sigmas, bad)
