"""Stage 3 of CausVid (arXiv 2412.07772, sec. 3.2): asymmetric distribution matching distillation.

DMD (Yin et al. 2024, arXiv 2311.18828; DMD2, arXiv 2405.14867) moves the student's samples
along the difference of two score estimates at a random noise level: the frozen teacher's with
classifier-free guidance (real) and a critic's that tracks the student's own distribution
(fake). "Asymmetric": the student is block-causal, the real score the bidirectional teacher,
which sees the whole clip and so judges temporal coherence better than a causal one would
(CausVid's ablations).

`DMD` owns the real score and the loss settings; the student and the critic are passed in,
as the training loop wrapped them. `DMDObjective` wires it to `causvid.train.train`, with two
ways of producing the student's samples: CausVid's (teacher ODE endpoints noised per block,
one causal forward) or Self-Forcing's (its own autoregressive rollout, `distill.self_forcing`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from causvid.data.shapes import render_clip, scene_from_json
from causvid.errors import UserError
from causvid.frames import clip_to_tensor
from causvid.models.autoencoder import num_latent_frames
from causvid.models.denoiser import WanDenoiser
from causvid.rollout import CausalRollout
from causvid.samplers import guided_velocity
from causvid.schedule import add_noise, randn_like, shift_sigma, velocity_target, x0_from_velocity
from causvid.sharding import agreed_generator
from distill.self_forcing import self_forcing_rollout
from distill.student import StudentObjective, block_levels


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's update direction (fake_x0 - real_x0), normalised per sample by mean |x - real_x0| (DMD eq. 8)."""
    normaliser = (x - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (fake_x0 - real_x0) / normaliser.clamp_min(1e-8)


class DMD:
    """Distribution matching with a frozen real score (the teacher, with CFG) and a trainable fake score."""

    def __init__(
        self,
        real_score: WanDenoiser,
        guidance_scale: float,
        shift: float = 1.0,
        sigma_range: tuple[float, float] = (0.02, 0.98),
    ):
        self.real_score = real_score
        self.guidance_scale = guidance_scale
        self.shift = shift
        self.sigma_range = sigma_range

    def sample_sigma(self, batch: int, rng: torch.Generator) -> torch.Tensor:
        """Noise levels [B]: uniform, through the teacher's timestep shift, clipped to `sigma_range` (as CausVid)."""
        return shift_sigma(torch.rand(batch, generator=rng), self.shift).clamp(*self.sigma_range)

    def student_loss(
        self, x: torch.Tensor, fake_score, text: torch.Tensor, null_text: torch.Tensor, rng: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        """0.5 * MSE(x, stopgrad(x - grad)): its gradient with respect to x is the DMD gradient."""
        sigma = self.sample_sigma(x.shape[0], rng).to(x.device)
        with torch.no_grad():
            x_t = add_noise(x.detach(), randn_like(x, rng), sigma)
            real = guided_velocity(self.real_score, text, null_text, self.guidance_scale)(x_t, sigma)
            real_x0 = x0_from_velocity(x_t, real, sigma)
            fake_x0 = x0_from_velocity(x_t, fake_score(x_t, sigma, text), sigma)
            grad = dmd_gradient(x.detach(), real_x0, fake_x0)
        loss = 0.5 * F.mse_loss(x.float(), (x.detach() - grad).float())
        return loss, {"dmd_grad_abs": grad.abs().mean()}

    def critic_loss(
        self, x: torch.Tensor, fake_score, text: torch.Tensor, rng: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        """Flow matching of the fake score on the student's (detached) samples."""
        x = x.detach()
        sigma = self.sample_sigma(x.shape[0], rng).to(x.device)
        noise = randn_like(x, rng)
        velocity = fake_score(add_noise(x, noise, sigma), sigma, text)
        return F.mse_loss(velocity.float(), velocity_target(x, noise).float()), {}


class DMDObjective(StudentObjective):
    """Asymmetric DMD of the causal student: critic every step, student every `student_every`-th.

    Args (the config's `objective_args`):
        teacher: pipeline directory of the teacher (the real score; the critic starts as a copy).
        student_init: pipeline directory whose transformer/ starts the student (the ODE-init
            export), or None for the teacher's weights (the "no ODE init" ablation).
        student_input: "causvid" (needs data {type: ode_pairs}) or "self_forcing" (data {type: prompts}).
        guidance_scale: the real score's CFG scale (default: the pipeline's).
        sigma_range: the range DMD and critic noise levels are clipped to.
        num_frames: pixel frames of the window the scores judge (1 + 4k, whole blocks): the teacher's length.
        rollout_blocks: self-forcing only: how many blocks a rollout may run; the judged window
            starts at a random block, so rollouts past the teacher's horizon train the stream's
            later blocks too (Self-Forcing++). None: the window alone, from the first block.
        switch_probability: self-forcing only: the share of rollouts whose prompt switches (to the
            batch's `switch_caption`) at a random block by the window's start; the window is then
            judged under the new prompt (LongLive). The cache is re-cached at the switch when the
            pipeline's `switch_recache` says so, as at inference.
        image_probability: self-forcing only: the share of rollouts that start, as an image-to-video
            stream does, from a first frame of the prompt's scene (rendered, encoded and committed
            to the cache before the first block).
        sample_cases, sample_frames: the shapes-bench check run every `sample_every` steps.
    """

    def __init__(
        self,
        config,
        teacher: str,
        student_init: str | None = None,
        student_input: str = "causvid",
        student_every: int = 5,
        guidance_scale: float | None = None,
        sigma_range: tuple[float, float] = (0.02, 0.98),
        num_frames: int = 21,
        rollout_blocks: int | None = None,
        switch_probability: float = 0.0,
        image_probability: float = 0.0,
        sample_cases: int = 4,
        sample_frames: int = 33,
    ):
        super().__init__(config, teacher, sample_cases, sample_frames)
        if student_input not in ("causvid", "self_forcing"):
            raise UserError(f"student_input must be 'causvid' or 'self_forcing', got {student_input!r}")
        if student_every < 1:
            raise UserError(f"student_every must be >= 1, got {student_every}")
        wanted = "ode_pairs" if student_input == "causvid" else "prompts"
        if self.config.data.get("type", "ode_pairs") != wanted:
            raise UserError(f"student_input {student_input!r} needs data of type {wanted!r}")
        self.student_input = student_input
        self.student_every = student_every
        self.latent_frames = num_latent_frames(num_frames)
        window_blocks = -(-self.latent_frames // self.pipeline_config.block_frames)
        self.rollout_blocks = window_blocks if rollout_blocks is None else rollout_blocks
        if self.rollout_blocks < window_blocks:
            raise UserError(f"rollout_blocks ({self.rollout_blocks}) must cover the judged window ({window_blocks} blocks)")
        if student_input != "self_forcing" and (rollout_blocks is not None or switch_probability or image_probability):
            raise UserError("rollout_blocks, switch_probability and image_probability need student_input 'self_forcing'")
        for name, value in (("switch_probability", switch_probability), ("image_probability", image_probability)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {value}")
        if image_probability and self.config.data.get("file") is not None:
            raise UserError("image_probability renders shapes-world scenes: a prompt file has none; set it to 0")
        self.window_blocks = window_blocks
        self.switch_probability = switch_probability
        self.image_probability = image_probability
        # None: the teacher's weights, i.e. DMD without ODE initialisation (an ablation).
        self.student = self.load_student(student_init)
        # The critic starts as the teacher (DMD2): a good video score, which then follows the student.
        self.critic = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.dmd = DMD(
            self.teacher,
            self.pipeline_config.guidance_scale if guidance_scale is None else guidance_scale,
            self.pipeline_config.shift,
            tuple(sigma_range),
        )
        self.sigmas = self.teacher_pipeline.student_sigmas()

    def trainable(self):
        return {"student": self.student, "critic": self.critic}

    def averaged(self):
        return {"student"}

    def losses(self, models, batch, step, rng):
        device = self.device
        text = self.encode(batch["caption"], device)
        train_student = step % self.student_every == 0
        # Between student updates the samples only feed the critic: no graph needed.
        with torch.set_grad_enabled(train_student):
            x, text = self.generate(models["student"], batch, text, rng, device)
        losses = {"critic": self.dmd.critic_loss(x, models["critic"], text, rng)}
        if train_student:
            null_text = self.encode([self.pipeline_config.negative_prompt] * len(text), device)
            losses["student"] = self.dmd.student_loss(x, models["critic"], text, null_text, rng)
        return losses

    def generate(self, model, batch, text, rng, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's samples [B, C, F, H, W] for this step, in the configured input mode, and
        the prompt embeddings they were made under (the new ones after a switch)."""
        sigmas = self.sigmas.to(device)
        if self.student_input == "causvid":
            # CausVid: teacher ODE endpoints noised to a random student level per block, one causal forward.
            x0 = batch["trajectory"][:, -1].to(device)
            level = block_levels(x0.shape[0], x0.shape[2], self.pipeline_config.block_frames, len(sigmas), rng)
            sigma = sigmas[level.to(device)]
            x_t = add_noise(x0, randn_like(x0, rng), sigma)
            return x0_from_velocity(x_t, model(x_t, sigma, text, causal=True), sigma), text
        # Exactly the inference stream: the pipeline's rolling cache and switch handling.
        rollout = CausalRollout(
            self.student, sigmas, self.teacher_pipeline.latent_shape, batch=len(text),
            sink_frames=self.pipeline_config.sink_frames, window_frames=self.pipeline_config.window_frames,
            rng=rng, device=device,
        )
        # Where the window lands, switches and image starts change which forwards run: one draw for all processes.
        layout = agreed_generator(rng)
        start = int(torch.randint(self.rollout_blocks - self.window_blocks + 1, (1,), generator=layout))
        switch = None
        if start > 0 and float(torch.rand(1, generator=layout)) < self.switch_probability:
            switch = (int(torch.randint(1, start + 1, (1,), generator=layout)),
                      self.encode(batch["switch_caption"], device))
        if self.image_probability and float(torch.rand(1, generator=layout)) < self.image_probability:
            rollout.commit(self.first_frames(batch["scene"], rng).to(device), text)
        x = self_forcing_rollout(rollout, model, text, self.latent_frames, layout, start_block=start, switch=switch,
                                 recache=self.pipeline_config.switch_recache)
        return x, text if switch is None else switch[1]

    @torch.no_grad()
    def first_frames(self, scenes: list[str], rng: torch.Generator) -> torch.Tensor:
        """Latents [B, C, 1, h, w] of a rendered first frame of each scene (JSON), for image-to-video rollouts."""
        height, width = self.pipeline_config.height, self.pipeline_config.width
        seeds = torch.randint(2**31, (len(scenes),), generator=rng).tolist()
        frames = [render_clip(scene_from_json(scene), 1, height, width, np.random.default_rng(seed))
                  for scene, seed in zip(scenes, seeds)]
        video = torch.stack([clip_to_tensor(frame) for frame in frames])
        return self.autoencoder.encode(video.to(next(self.autoencoder.parameters()).device))
