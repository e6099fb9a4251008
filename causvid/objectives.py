"""Training objectives of the core models: the autoencoder and the bidirectional teacher.

Each is an `Objective` for the loop in `causvid.train`: it builds its models and data, computes
losses, writes samples, and exports a loadable (diffusers-format) result.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from causvid.checkpoint import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from causvid.data.shapes import ShapesWorld, random_caption, scene_from_json
from causvid.models.autoencoder import TEMPORAL_FACTOR, VideoAutoencoder
from causvid.models.denoiser import WanDenoiser
from causvid.models.discriminator import (
    PatchDiscriminator,
    adaptive_adversarial_weight,
    discriminator_hinge_loss,
    frozen_forward,
)
from causvid.pipeline import CausVidPipeline, PipelineConfig, to_uint8
from causvid.presets import build_autoencoder, build_transformer, preset
from causvid.schedule import add_noise, randn_like, shift_sigma, velocity_target
from causvid.text import load_text_encoder
from causvid.train import Objective
from causvid.video_io import write_video


def build_dataset(data: dict) -> torch.utils.data.Dataset:
    """The dataset a training config names: {"type": "shapes", ...} or {"type": "folder", "root": ...}."""
    kwargs = {k: v for k, v in data.items() if k != "type"}
    kind = data.get("type", "shapes")
    if kind == "shapes":
        return ShapesWorld(**kwargs)
    if kind == "folder":
        from causvid.data.video_folder import VideoFolderDataset

        return VideoFolderDataset(**kwargs)
    raise ValueError(f"unknown dataset type {kind!r} (expected 'shapes' or 'folder')")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1]."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item() / 4  # range 2 -> 1
    return 10 * math.log10(1 / max(mse, 1e-12))


def object_pixels(video: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, H, W]: pixels that differ from their frame's median colour (the background)."""
    background = video.flatten(3).median(dim=3).values[..., None, None]
    return (video - background).abs().sum(dim=1, keepdim=True) > 0.1


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """A float mask [B, 1, T, H, W] grown by `pixels` in every direction within each frame."""
    if pixels <= 0:
        return mask
    k = 2 * pixels + 1
    return F.max_pool3d(mask, (1, k, k), stride=1, padding=(0, pixels, pixels))


def object_weights(video: torch.Tensor, weight: float, margin: int = 0) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, T, H, W]: 1 on background, 1 + weight on objects.

    Objects cover 3-6% of the pixels, so an unweighted loss learns the background first and
    the objects last. Weighting the object alone also makes a blurred edge cheapest on the
    background side, so objects come out dilated; `margin` > 0 extends the weight that many
    pixels past each object, so both sides of an edge weigh the same.
    """
    return 1 + weight * dilate(object_pixels(video).float(), margin)


def edge_distance(video: torch.Tensor, max_distance: int) -> torch.Tensor:
    """Long [B, 1, T, H, W]: 0 on objects, k on background k pixels from one (chessboard distance,
    up to `max_distance`), max_distance + 1 farther away."""
    objects = object_pixels(video).float()
    return sum((1 - dilate(objects, k)).long() for k in range(max_distance + 1))


def latent_object_mask(video: torch.Tensor, spatial_factor: int) -> torch.Tensor:
    """Bool [B, F, H/s, W/s]: the latent cells of a clip (1 + 4k frames) that hold an object.

    A cell counts when any pixel it encodes does (the first latent frame encodes one frame,
    later ones four), dilated by one cell because the autoencoder's convolutions spread edges.
    """
    pixels = object_pixels(video).float()
    s = spatial_factor
    cells = torch.cat([F.max_pool3d(pixels[:, :, :1], (1, s, s)),
                       F.max_pool3d(pixels[:, :, 1:], (TEMPORAL_FACTOR, s, s))], dim=2)
    return dilate(cells, 1)[:, 0] > 0


class AutoencoderObjective(Objective):
    """Reconstruction (object-weighted L1 + MSE) plus a small KL term, on the posterior mode.

    Each step reconstructs `target_frames` frames after a context, drawn from `context_frames`,
    that only warms up the causal caches (see `VideoAutoencoder.forward`): context 0 trains the
    start of a stream, longer contexts the steady state of a long one.

    `init_from` continues from a trained autoencoder directory (e.g. in a later session);
    `freeze_encoder` then trains the decoder alone, which keeps the latent space, and so every
    model trained on it, valid. `first_frame_weight` multiplies the loss weight of a stream's
    first frame in context-0 steps: it is decoded from a latent frame of its own and is only
    one of the frames in a fraction of the steps. `l1_weight` scales the L1 term: where an
    edge's exact position is uncertain, L1 pays for the median (a hard edge in either place)
    and MSE, which PSNR measures, for the mean (a soft edge); 0 trains for PSNR alone.
    `log_per_clip` averages the log of each clip's error instead of pooling the errors: the
    clip-mean PSNR is minus the mean of those logs, while pooling weighs each clip by its error,
    so clean clips (small objects, grey backgrounds) count for little in a pooled loss though
    they count fully in that mean.

    `adversarial_weight` > 0 adds a `PatchDiscriminator` (its own optimiser, lr key
    "discriminator") and a hinge GAN term against blur, scaled adaptively to the reconstruction
    term's gradient (see `adaptive_adversarial_weight`); the discriminator trains from the first
    step, the autoencoder feels it from `adversarial_start`, once it tells real from blurred.
    """

    def __init__(self, config, preset_name: str = "shapes", kl_weight: float = 1e-6, object_weight: float = 10.0,
                 object_margin: int = 0, stats_clips: int = 64, init_from: str | None = None,
                 freeze_encoder: bool = False, context_frames: tuple[int, ...] = (0,), target_frames: int = 16,
                 first_frame_weight: float = 1.0, l1_weight: float = 1.0, log_per_clip: bool = False,
                 adversarial_weight: float = 0.0, adversarial_start: int = 0, discriminator_channels: int = 32):
        self.config = config
        self.context_frames = tuple(context_frames)
        self.target_frames = target_frames
        longest = self._clip_frames(max(self.context_frames))
        if config.data.get("num_frames", 33) < longest:
            raise ValueError(f"data num_frames must be >= {longest} for context {max(self.context_frames)}")
        if init_from is not None:
            self.autoencoder = VideoAutoencoder.from_pretrained(init_from).train()
        else:
            self.autoencoder = build_autoencoder(preset_name, config.seed).train()
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.autoencoder.vae.encoder.requires_grad_(False)
            self.autoencoder.vae.quant_conv.requires_grad_(False)
        self.kl_weight = kl_weight
        self.object_weight = object_weight
        self.object_margin = object_margin
        self.first_frame_weight = first_frame_weight
        self.l1_weight = l1_weight
        self.log_per_clip = log_per_clip
        self.stats_clips = stats_clips
        self.adversarial_weight = adversarial_weight
        self.adversarial_start = adversarial_start
        self.discriminator = PatchDiscriminator(discriminator_channels) if adversarial_weight > 0 else None

    def trainable(self):
        if self.discriminator is None:
            return {"autoencoder": self.autoencoder}
        return {"autoencoder": self.autoencoder, "discriminator": self.discriminator}

    def averaged(self):
        return {"autoencoder"}

    def dataset(self):
        return build_dataset(self.config.data)

    def _clip_frames(self, context: int) -> int:
        # A stream's first chunk is one frame; after a context every chunk is four.
        return context + self.target_frames + (0 if context else 1)

    def losses(self, models, batch, step, rng):
        context = self.context_frames[int(torch.randint(len(self.context_frames), (1,), generator=rng))]
        video = batch["video"][:, :, : self._clip_frames(context)]
        reconstruction, posterior = models["autoencoder"](video, context)
        video = video[:, :, context:]
        weights = object_weights(video, self.object_weight, self.object_margin)
        if context == 0:
            weights[:, :, :1] *= self.first_frame_weight
        error = reconstruction.float() - video
        weighted = (self.l1_weight * error.abs() + error.square()) * weights
        if self.log_per_clip:
            recon = (weighted.flatten(1).mean(1) / weights.flatten(1).mean(1)).log().mean()
        else:
            recon = weighted.mean() / weights.mean()
        kl = posterior.kl().mean() / video[0].numel()
        logs = {"psnr": psnr(reconstruction, video), "kl": kl.item(), "context_frames": context}
        loss = recon + self.kl_weight * kl
        if self.discriminator is None:
            return {"autoencoder": (loss, logs)}
        # One pass through the wrapped discriminator, the only one its gradients (all-reduced under DDP) come from.
        both = models["discriminator"](torch.cat([video, reconstruction.detach().float()]))
        real_logits, fake_logits = both.chunk(2)
        discriminator_loss = discriminator_hinge_loss(real_logits, fake_logits)
        discriminator_logs = {"real_logit": real_logits.mean().item(), "fake_logit": fake_logits.mean().item()}
        if step >= self.adversarial_start:
            adversarial = -frozen_forward(self.discriminator, reconstruction.float()).mean()
            weight = adaptive_adversarial_weight(recon, adversarial, self.autoencoder.vae.decoder.conv_out.weight)
            loss = loss + self.adversarial_weight * weight * adversarial
            logs.update(adversarial=adversarial.item(), adversarial_scale=weight.item())
        # The loop steps in this order: the autoencoder's loss reads the discriminator before it steps.
        return {"autoencoder": (loss, logs), "discriminator": (discriminator_loss, discriminator_logs)}

    def _fixed_clips(self, count: int, device: torch.device) -> torch.Tensor:
        data = ShapesWorld(**{k: v for k, v in self.config.data.items() if k != "type"} | {"seed": 10_000})
        return torch.stack([data[i]["video"] for i in range(count)]).to(device)

    @torch.no_grad()
    def sample(self, ema, out_dir, step):
        clips = self._fixed_clips(4, next(ema["autoencoder"].parameters()).device)
        reconstruction = ema["autoencoder"].decode(ema["autoencoder"].encode(clips))
        side_by_side = torch.cat([clips, reconstruction], dim=4)  # original | reconstruction
        for i in range(len(clips)):
            write_video(out_dir / f"step{step:07d}_{i}.mp4", to_uint8(side_by_side[i : i + 1]))
        return {"sample_psnr": psnr(reconstruction, clips)}

    @torch.no_grad()
    def export(self, ema, out_dir):
        """Save with per-channel latent statistics measured on shapes-world clips.

        A frozen encoder keeps the statistics it was loaded with, so latents normalised for a
        teacher stay exactly as they were.
        """
        autoencoder: VideoAutoencoder = ema["autoencoder"]
        if not self.freeze_encoder:
            clips = self._fixed_clips(self.stats_clips, next(autoencoder.parameters()).device)
            latents = torch.cat([autoencoder.vae.encode(c).latent_dist.mode() for c in clips.split(1)])
            mean = latents.mean(dim=(0, 2, 3, 4))
            std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
            autoencoder.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        autoencoder.save_pretrained(out_dir)


class LatentBank(torch.utils.data.Dataset):
    """Shapes-world clips encoded once by a frozen autoencoder, so the teacher trains on latents.

    Item i is bank entry i mod N with a caption drawn afresh from (seed, i): the same clip is
    described in different words on every pass. Each entry also keeps its object mask on the
    latent grid (`latent_object_mask`) for an object-weighted loss.
    """

    def __init__(self, latents: torch.Tensor, object_masks: torch.Tensor, scenes: list[str], seed: int):
        self.latents, self.object_masks, self.scenes, self.seed = latents, object_masks, scenes, seed

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> dict:
        entry = index % len(self.latents)
        caption = random_caption(scene_from_json(self.scenes[entry]), np.random.default_rng([self.seed, index]))
        return {"latents": self.latents[entry].float(), "object_mask": self.object_masks[entry], "caption": caption}

    @classmethod
    @torch.no_grad()
    def build_or_load(cls, path: Path, autoencoder: VideoAutoencoder, data: dict, size: int, seed: int,
                      workers: int = 0) -> "LatentBank":
        """Load the bank at `path` (.safetensors + .json scenes) if present, else encode `size` clips.

        A bank saved before object masks existed gets them added: the world re-renders its
        clips exactly (item i is a pure function of the seed and i), so nothing is re-encoded.
        `workers` processes render the clips while the autoencoder encodes.
        """
        from tqdm import tqdm

        device = next(autoencoder.parameters()).device
        scenes_path = path.with_suffix(".json")
        saved = load_tensors(path) if path.exists() and scenes_path.exists() else {}
        if "object_masks" not in saved:
            encode = "latents" not in saved
            size = size if encode else len(saved["latents"])
            batches = [range(start, min(size, start + 32)) for start in range(0, size, 32)]
            loader = torch.utils.data.DataLoader(build_dataset(data), batch_sampler=batches, num_workers=workers)
            latents, masks, scenes = [], [], []
            for items in tqdm(loader, desc="building latent bank", unit="batch"):
                video = items["video"].to(device)
                masks.append(latent_object_mask(video, autoencoder.spatial_factor).cpu())
                if encode:
                    latents.append(autoencoder.encode(video).to("cpu", torch.bfloat16))
                    scenes.extend(items["scene"])
            if encode:
                saved["latents"] = torch.cat(latents)
                atomic_write_json(scenes_path, {"scenes": scenes})
            saved["object_masks"] = torch.cat(masks)
            atomic_save_tensors(path, saved)
        return cls(saved["latents"], saved["object_masks"], read_json(scenes_path)["scenes"], seed)


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
        path = Path(self.config.out_dir) / "latent_bank.safetensors"
        return LatentBank.build_or_load(path, self.autoencoder, self.config.data, self.bank_size, self.config.seed,
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
        weights = (1 + self.object_weight * batch["object_mask"].float())[:, None]
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
            video = pipe.generate(prompt, frames, seed=i, teacher=True, steps=self.sample_steps)
            write_video(out_dir / f"step{step:07d}_{i}.mp4", video, self.pipeline_config.fps)
        return {}

    def export(self, ema, out_dir):
        self.pipeline(ema["teacher"]).save_pretrained(out_dir)


OBJECTIVES = {"autoencoder": AutoencoderObjective, "teacher": TeacherObjective}
