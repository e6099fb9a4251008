"""The parallel long-video model's objective: a Video Interface Network and the DiT it guides,
trained end to end on flow matching of whole long clips denoised as parallel chunks."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch

from causvid.data import build_dataset
from causvid.data.latent_bank import LatentBank
from causvid.models.autoencoder import num_pixel_frames
from causvid.models.vin import VideoInterfaceNetwork
from causvid.parallel import ChunkLayout, ParallelDenoiser
from causvid.pipeline import CausVidPipeline
from causvid.schedule import add_noise, randn_like, shift_sigma, velocity_target
from causvid.train import Objective
from causvid.video_io import write_video



class VinObjective(Objective):
    """Flow matching of `ParallelDenoiser` (DiT + VIN) on clips `num_chunks` chunks long.

    `init_from` is a pipeline directory: its teacher starts the DiT, and its autoencoder, text
    encoder and sampling settings are the run's; the export is that pipeline with the parallel
    model added. `dit_from`, another pipeline directory, starts the DiT from its teacher instead,
    so the parallel model depends on that teacher alone: a pipeline whose teacher or student is
    retrained takes it over by re-exporting the finished run (`--resume`) with a new `init_from`.
    The loss is taken on the fused velocity, exactly what sampling integrates: each frame from the
    chunk that owns it, overlaps blended at high noise. Context frames enter a chunk only as noisy
    inputs, so no gradient flows through them. `chunk_frames` + `context_frames` is best the
    teacher's clip length (in latent frames), the length its attention learnt.
    """

    def __init__(self, config, init_from: str, num_chunks: int = 4, chunk_frames: int = 5, context_frames: int = 1,
                 blend_cutoff: float = 0.5, vin: dict | None = None, caption_dropout: float = 0.1,
                 bank_size: int = 1024, sample_steps: int = 50, sample_prompts: list[str] | None = None,
                 dit_from: str | None = None):
        self.config = config
        base = CausVidPipeline.from_pretrained(init_from, "cpu", torch.float32)
        dit_source = base if dit_from is None else CausVidPipeline.from_pretrained(dit_from, "cpu", torch.float32)
        for path, pipe in ((init_from, base), (dit_from, dit_source)):
            if pipe.teacher is None:
                raise ValueError(f"{path} has no teacher/ to start the parallel model from")
        self.base = base
        self.layout = ChunkLayout(num_chunks, chunk_frames, context_frames)
        self.clip_frames = num_pixel_frames(self.layout.total_frames)
        teacher = copy.deepcopy(dit_source.teacher).train()  # the base pipeline keeps the frozen teacher for baselines
        dit = teacher.config
        vin_config = dict(in_channels=dit.in_channels, patch_size=tuple(dit.patch_size),
                          dim=dit.num_attention_heads * dit.attention_head_dim, text_dim=dit.text_dim,
                          num_heads=dit.num_attention_heads, dit_layers=dit.num_layers) | (vin or {})
        torch.manual_seed(config.seed)
        self.model = ParallelDenoiser(teacher, chunk_frames, context_frames, blend_cutoff,
                                      VideoInterfaceNetwork(**vin_config)).train()
        self.caption_dropout = caption_dropout
        self.bank_size = bank_size
        self.sample_steps = sample_steps
        self.sample_prompts = sample_prompts or [
            "a red circle moving right on a black background",
            "a small yellow square bouncing and a large blue circle staying still on a gray background",
        ]

    def trainable(self):
        return {"parallel": self.model}

    def place(self, device: torch.device) -> None:
        self.base.autoencoder.to(device)
        self.base.text_encoder.to(device)

    def dataset(self):
        data = dict(self.config.data)
        if data.setdefault("num_frames", self.clip_frames) != self.clip_frames:
            raise ValueError(f"data.num_frames must be {self.clip_frames} for {self.layout.num_chunks} chunks "
                             f"({self.layout.total_frames} latent frames), got {data['num_frames']}")
        return LatentBank.build_or_load(Path(self.config.out_dir) / "latent_bank", self.base.autoencoder,
                                        build_dataset(data), self.bank_size, self.config.seed, self.config.num_workers)

    def losses(self, models, batch, step, rng):
        x0 = batch["latents"]
        batch_size = x0.shape[0]
        drop = torch.rand(batch_size, generator=rng) < self.caption_dropout
        captions = [self.base.config.negative_prompt if d else c for d, c in zip(drop.tolist(), batch["caption"])]
        text = self.base.text_encoder.encode(captions).to(x0.device)
        noise = randn_like(x0, rng)
        sigma = shift_sigma(torch.rand(batch_size, generator=rng), self.base.config.shift).to(x0.device)
        velocity = models["parallel"](add_noise(x0, noise, sigma), sigma, text)
        loss = (velocity.float() - velocity_target(x0, noise)).square().mean()
        return {"parallel": (loss, {})}

    def pipeline(self, model: ParallelDenoiser) -> CausVidPipeline:
        """The base pipeline with this parallel model in it."""
        base, layout = self.base, self.layout
        config = replace(base.config, chunk_frames=layout.chunk_frames, context_frames=layout.context_frames,
                         blend_cutoff=model.blend_cutoff)
        return CausVidPipeline(base.denoiser, base.autoencoder, base.text_encoder, config, base.teacher, parallel=model)

    @torch.no_grad()
    def sample(self, ema, out_dir, step):
        pipe = self.pipeline(ema["parallel"].eval())
        for i, prompt in enumerate(self.sample_prompts):
            video = pipe.generate(prompt, self.clip_frames, seed=i, mode="parallel", steps=self.sample_steps)
            write_video(out_dir / f"step{step:07d}_{i}.mp4", video, self.base.config.fps)
        return {}

    def export(self, ema, out_dir):
        self.pipeline(ema["parallel"]).save_pretrained(out_dir)
