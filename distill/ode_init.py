"""Stage 2 of CausVid (arXiv 2412.07772, sec. 3.3): ODE-trajectory initialisation of the student.

The causal student starts as a copy of the bidirectional teacher and learns, under the
block-causal mask, to jump from any of its few-step noise levels straight to the teacher's
ODE endpoint. Each block gets its own level, as at inference where earlier blocks are clean
context for later ones. This gives DMD a student that already produces plausible videos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from causvid.errors import UserError
from causvid.schedule import x0_from_velocity
from distill.ode_pairs import OdePairs
from distill.student import StudentObjective, block_levels, build_dataset


def ode_regression_loss(
    student, trajectory: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor, block_frames: int,
    rng: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """MSE between the student's x0 and the trajectory endpoint, from per-block trajectory latents.

    `trajectory` is [B, S+1, C, F, H, W]: latents at the S levels `sigmas[:S]`, then the endpoint.
    """
    batch, stored, _, frames = trajectory.shape[:4]
    level = block_levels(batch, frames, block_frames, stored - 1, rng).to(trajectory.device)
    # Frame f of sample b comes from the trajectory latent at that frame's level.
    index = level[:, None, None, :, None, None].expand(-1, 1, *trajectory.shape[2:])
    x_t = trajectory.gather(1, index)[:, 0]
    sigma = sigmas.to(trajectory.device)[level]  # [B, F], constant within a block
    x0 = x0_from_velocity(x_t, student(x_t, sigma, text, causal=True), sigma)
    return F.mse_loss(x0.float(), trajectory[:, -1].float()), {}


class OdeInitObjective(StudentObjective):
    """Train the causal student (init: teacher weights) by ODE regression on `causvid distill ode-pairs` data."""

    def __init__(self, config, teacher: str, sample_cases: int = 4, sample_frames: int = 33):
        super().__init__(config, teacher, sample_cases, sample_frames)
        if self.config.data.get("type", "ode_pairs") != "ode_pairs":
            raise UserError("ode_init trains on ODE pairs: data must be {type: ode_pairs, root: DIR}")
        self.pairs: OdePairs = build_dataset(self.config.data)
        self.sigmas = self.pairs.sigmas  # the stored levels: the student's, then 0
        expected = self.teacher_pipeline.student_sigmas()
        if self.sigmas[:-1].shape != expected.shape or not torch.allclose(self.sigmas[:-1], expected, atol=1e-6):
            raise UserError(f"{self.pairs.root}: pairs hold levels {self.sigmas[:-1].tolist()}, "
                             f"but the student samples at {expected.tolist()}")
        self.student = self.load_student()

    def trainable(self):
        return {"student": self.student}

    def dataset(self) -> OdePairs:
        return self.pairs

    def losses(self, models, batch, step, rng):
        device = self.device
        text = self.encode(batch["caption"], device)
        loss = ode_regression_loss(models["student"], batch["trajectory"].to(device), self.sigmas, text,
                                   self.pipeline_config.block_frames, rng)
        return {"student": loss}
