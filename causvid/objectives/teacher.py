"""The bidirectional teacher's training objective: flow matching on a latent bank, with caption dropout."""

from __future__ import annotations

from pathlib import Path

import torch

from causvid.data import build_dataset
from causvid.data.latent_bank import LatentBank
from causvid.models.autoencoder import VideoAutoencoder
from causvid.models.denoiser import WanDenoiser
from causvid.pipeline import CausVidPipeline, PipelineConfig
from causvid.presets import build_transformer, preset
from causvid.schedule import add_noise, randn_like, shift_sigma, velocity_target
from causvid.text import load_text_encoder
from causvid.train import Objective
from causvid.video_io import write_video


class TeacherObjective(Objective):
    """Flow matching of the bidirectional teacher on latents, with caption dropout for CFG.

    `init_from` names a pipeline directory whose teacher/ starts the run (a warm start).
    `object_weight` > 0 weights the latent cells that hold an object by 1 + object_weight, as
    the autoencoder's loss does with pixels: objects are a few cells of a mostly flat frame.
    Objects are found against a flat background (`object_pixels`), so this suits the shapes
    world, not footage; 0 (the default) is the plain loss. Training noise levels follow the
    sampler's shifted schedule, where it spends its steps.
    """

    def __init__(self, config, autoencoder: str, preset_name: str = "shapes", caption_dropout: float = 0.1,
                 bank_size: int = 4096, sample_steps: int = 50, sample_prompts: list[str] | None = None,
                 init_from: str | None = None, object_weight: float = 0.0):
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
        # Caption dropout: the empty prompt stands for "unconditional", as at sampling time.
        drop = torch.rand(batch_size, generator=rng) < self.caption_dropout
        captions = [self.pipeline_config.negative_prompt if d else c for d, c in zip(drop.tolist(), batch["caption"])]
        text = self.text_encoder.encode(captions)
        noise = randn_like(x0, rng)
        sigma = shift_sigma(torch.rand(batch_size, generator=rng), self.pipeline_config.shift).to(x0.device)
        velocity = models["teacher"](add_noise(x0, noise, sigma), sigma, text)
        # Without object masks (footage, not a flat background) every cell weighs the same.
        objects = batch["object_mask"].float() if "object_mask" in batch else torch.zeros_like(x0[:, 0])
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
        for i, prompt in enumerate(self.sample_prompts):
            video = pipe.generate(prompt, frames, seed=i, mode="teacher", steps=self.sample_steps)
            write_video(out_dir / f"step{step:07d}_{i}.mp4", video, self.pipeline_config.fps)
        return {}

    def export(self, ema, out_dir):
        self.pipeline(ema["teacher"]).save_pretrained(out_dir)
