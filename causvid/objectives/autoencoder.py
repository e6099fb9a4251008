"""The autoencoder's training objective: object-weighted reconstruction, optionally adversarial."""

from __future__ import annotations

import torch

from causvid.data import build_dataset
from causvid.data.masks import object_weights
from causvid.errors import UserError
from causvid.eval.reconstruction import psnr
from causvid.frames import to_uint8
from causvid.models.autoencoder import VideoAutoencoder
from causvid.models.discriminator import (
    PatchDiscriminator,
    adaptive_adversarial_weight,
    discriminator_hinge_loss,
    frozen_forward,
)
from causvid.presets import build_autoencoder
from causvid.train import Objective
from causvid.video_io import write_video


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
            raise UserError(f"data num_frames must be >= {longest} for context {max(self.context_frames)}")
        if init_from is not None:
            self.autoencoder = VideoAutoencoder.from_pretrained(init_from).train()
        else:
            self.autoencoder = build_autoencoder(preset_name, config.seed).train()
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.autoencoder.vae.encoder.requires_grad_(False)
            self.autoencoder.vae.quant_conv.requires_grad_(False)
        self.kl_weight = kl_weight
        self.data = build_dataset(config.data)
        # Objects are found against a flat background: on footage every pixel weighs the same.
        self.object_weight = object_weight if getattr(self.data, "flat_background", False) else 0.0
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
        return self.data

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
        """Clips for samples and latent statistics: shapes-world clips of a seed no run trains on,
        or a folder's first clips."""
        kind = self.config.data.get("type", "shapes")
        data = build_dataset(self.config.data | {"seed": 10_000}) if kind == "shapes" else self.data
        return torch.stack([data[i]["video"] for i in range(min(count, len(data)))]).to(device)

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
