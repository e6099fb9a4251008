"""The bidirectional teacher's training objective: flow matching on a latent bank, with caption dropout."""

from __future__ import annotations

from pathlib import Path

import torch

from causvid.data import build_dataset
from causvid.data.latent_bank import LatentBank
from causvid.errors import UserError
from causvid.models.autoencoder import VideoAutoencoder, num_pixel_frames
from causvid.models.denoiser import WanDenoiser
from causvid.pipeline import CausVidPipeline, PipelineConfig
from causvid.presets import build_transformer, preset
from causvid.schedule import add_noise, randn_like, shift_sigma, velocity_target, with_clean_prefix
from causvid.text import load_text_encoder
from causvid.train import Objective
from causvid.video_io import write_video


def random_windows(latents: torch.Tensor, masks: torch.Tensor, frames: int, mid_clip: bool,
                   rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One window of `frames` latent frames per clip, latents [B, C, F, H, W] and object masks
    [B, F, H, W] cut alike: the clip's start, or (`mid_clip`) a uniformly random later start
    with the latent before it leading the window, as its clean prefix (1 + frames frames)."""
    total = latents.shape[2]
    if frames + mid_clip > total:
        raise UserError(f"window_frames ({frames}) needs clips of at least {frames + 1} latent frames; "
                        f"the bank's have {total}")
    if mid_clip:
        starts = (torch.randint(total - frames, (latents.shape[0],), generator=rng) + 1).tolist()
    else:
        starts = [0] * latents.shape[0]
    first = [s - mid_clip for s in starts]
    return (torch.stack([clip[:, f : s + frames] for clip, f, s in zip(latents, first, starts)]),
            torch.stack([mask[f : s + frames] for mask, f, s in zip(masks, first, starts)]))


class TeacherObjective(Objective):
    """Flow matching of the bidirectional teacher on latents, with caption dropout for CFG.

    `init_from` names a pipeline directory whose teacher/ starts the run (a warm start).
    `object_weight` > 0 weights the latent cells that hold an object by 1 + object_weight, as
    the autoencoder's loss does with pixels: objects are a few cells of a mostly flat frame.
    Objects are found against a flat background (`object_pixels`), so this suits the shapes
    world, not footage; 0 (the default) is the plain loss. Training noise levels follow the
    sampler's shifted schedule, where it spends its steps.

    `window_frames` trains on windows of that many latent frames cut from longer clips, for a
    teacher that judges a stream's later blocks (long-rollout DMD). A share `mid_clip_share` of
    the steps cut them at random places after the clip's start and hand the latent before as a
    clean prefix (noise level 0), as DMD hands a later block's window the frame before it; the
    rest cut the clip's start, as a stream's first window. The prefix tells the two apart: a
    window from mid-clip starts with a latent of 4 frames, a clip with a lone first frame.
    None: whole clips.
    """

    def __init__(self, config, autoencoder: str, preset_name: str = "shapes", caption_dropout: float = 0.1,
                 bank_size: int = 4096, sample_steps: int = 50, sample_prompts: list[str] | None = None,
                 init_from: str | None = None, object_weight: float = 0.0, window_frames: int | None = None,
                 mid_clip_share: float = 0.5):
        self.config = config
        self.preset_name = preset_name
        self.pipeline_config = PipelineConfig(**preset(preset_name)["pipeline"])
        self.autoencoder = VideoAutoencoder.from_pretrained(autoencoder).eval().requires_grad_(False)
        self.text_encoder = load_text_encoder(self.pipeline_config.text_encoder)
        self.text_encoder.cache_size = 4096
        block_frames = self.pipeline_config.block_frames
        if init_from is not None:  # continue from a trained pipeline's teacher (e.g. the shipped one)
            self.denoiser = WanDenoiser.from_pretrained(Path(init_from) / "teacher", block_frames).float().train()
        else:
            self.denoiser = WanDenoiser(build_transformer(preset_name, config.seed), block_frames).train()
        self.caption_dropout = caption_dropout
        self.object_weight = object_weight
        if not 0.0 <= mid_clip_share <= 1.0:
            raise UserError(f"mid_clip_share must be in [0, 1], got {mid_clip_share}")
        self.window_frames = window_frames
        self.mid_clip_share = mid_clip_share
        self.bank_size = bank_size
        self.sample_steps = sample_steps
        self.sample_prompts = sample_prompts or [
            "a red circle moving right on a black background",
            "a large blue square moving up on a white background",
            "a small yellow triangle bouncing on a gray background",
            "a green circle staying still on a black background",
        ]

    def trainable(self):
        return {"teacher": self.denoiser}

    def place(self, device: torch.device) -> None:
        self.autoencoder.to(device)
        self.text_encoder.to(device)

    def dataset(self):
        return LatentBank.build_or_load(Path(self.config.out_dir) / "latent_bank", self.autoencoder,
                                        build_dataset(self.config.data), self.bank_size, self.config.seed,
                                        self.config.num_workers)

    def losses(self, models, batch, step, rng):
        x0 = batch["latents"]
        batch_size = x0.shape[0]
        # Without object masks (footage, not a flat background) every cell weighs the same.
        objects = batch["object_mask"].float() if "object_mask" in batch else torch.zeros_like(x0[:, 0])
        prefix = None
        if self.window_frames is not None:
            mid_clip = float(torch.rand(1, generator=rng)) < self.mid_clip_share
            x0, objects = random_windows(x0, objects, self.window_frames, mid_clip, rng)
            if mid_clip:
                prefix, x0, objects = x0[:, :, :1], x0[:, :, 1:], objects[:, 1:]
        # Caption dropout: the empty prompt stands for "unconditional", as at sampling time.
        drop = torch.rand(batch_size, generator=rng) < self.caption_dropout
        captions = [self.pipeline_config.negative_prompt if d else c for d, c in zip(drop.tolist(), batch["caption"])]
        text = self.text_encoder.encode(captions)
        noise = randn_like(x0, rng)
        sigma = shift_sigma(torch.rand(batch_size, generator=rng), self.pipeline_config.shift).to(x0.device)
        x_t, levels = with_clean_prefix(prefix, add_noise(x0, noise, sigma), sigma)
        velocity = models["teacher"](x_t, levels, text)[:, :, x_t.shape[2] - x0.shape[2]:]
        weights = (1 + self.object_weight * objects)[:, None]
        error = (velocity.float() - velocity_target(x0, noise)).square()
        loss = (error * weights).mean() / weights.mean()
        return {"teacher": (loss, {})}

    def pipeline(self, teacher: WanDenoiser) -> CausVidPipeline:
        """A pipeline around the current teacher; the student starts as the same weights."""
        return CausVidPipeline(teacher, self.autoencoder, self.text_encoder, self.pipeline_config, teacher)

    @torch.no_grad()
    def sample(self, ema, out_dir, step):
        pipe = self.pipeline(ema["teacher"]).to(next(ema["teacher"].parameters()).device, torch.float32)
        frames = self.config.data.get("num_frames", 21)
        if self.window_frames is not None:
            frames = num_pixel_frames(self.window_frames)
        for i, prompt in enumerate(self.sample_prompts):
            video = pipe.generate(prompt, frames, seed=i, mode="teacher", steps=self.sample_steps)
            write_video(out_dir / f"step{step:07d}_{i}.mp4", video, self.pipeline_config.fps)
        return {}

    def export(self, ema, out_dir):
        self.pipeline(ema["teacher"]).save_pretrained(out_dir)
