"""What the student objectives (ODE init, DMD) share.

The frozen teacher pipeline (teacher, autoencoder, text encoder, sampling config), the data
a config names (ODE pairs or bare training prompts), per-block noise levels, samples scored
on shapes-bench during training, and the export as a pipeline directory whose transformer/
is the student, so `causvid generate --checkpoint .../export` runs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from causvid.data.prompts import TrainingPrompts
from causvid.errors import UserError
from causvid.eval.shapes_bench import METRICS, contact_sheet, default_prompt_set
from causvid.models.denoiser import WanDenoiser
from causvid.pipeline import CausVidPipeline, load_pipeline
from causvid.train import Objective
from distill.compare import bench
from distill.ode_pairs import OdePairs


def build_dataset(data: dict) -> torch.utils.data.Dataset:
    """The dataset a distillation config names: {"type": "ode_pairs", "root": DIR}, or
    {"type": "prompts", "seed": S, "file": PROMPTS} (no file: shapes-world scenes)."""
    kind = data.get("type", "ode_pairs")
    if kind == "ode_pairs":
        if "root" not in data:
            raise UserError("data: {type: ode_pairs} needs a root (the `causvid distill ode-pairs` output)")
        return OdePairs(data["root"])
    if kind == "prompts":
        return TrainingPrompts(data.get("seed", 0), data.get("file"))
    raise UserError(f"unknown dataset type {kind!r} (expected 'ode_pairs' or 'prompts')")


def block_levels(batch: int, frames: int, block_frames: int, num_levels: int, rng: torch.Generator) -> torch.Tensor:
    """Random level indices [B, F] in [0, num_levels), one per causal block (CausVid's per-block timesteps)."""
    blocks = -(-frames // block_frames)
    level = torch.randint(num_levels, (batch, blocks), generator=rng)
    return level.repeat_interleave(block_frames, dim=1)[:, :frames]


def teacher_weights(pipeline_dir: str | Path) -> Path:
    """The teacher's transformer directory of a pipeline: teacher/, or transformer/ in a teacher-only export."""
    path = Path(pipeline_dir)
    return path / "teacher" if (path / "teacher").is_dir() else path / "transformer"


class StudentObjective(Objective):
    """Base of the distillation objectives: a frozen teacher pipeline and a causal student."""

    def __init__(self, config, teacher: str, sample_cases: int = 4, sample_frames: int = 33):
        self.config = config
        pipe = load_pipeline(teacher, "cpu", torch.float32)
        if pipe.teacher is None:
            raise UserError(f"{teacher}: the pipeline has no teacher/ to distil")
        self.teacher_dir = Path(teacher)
        self.teacher_pipeline = pipe  # its config and student_sigmas() are the student's too
        self.pipeline_config = pipe.config
        self.autoencoder = pipe.autoencoder
        self.text_encoder = pipe.text_encoder
        self.text_encoder.cache_size = 4096
        self.teacher = pipe.teacher.requires_grad_(False)
        self.sample_cases = default_prompt_set(num_seen=sample_cases, num_pairs=0)[:sample_cases]
        self.sample_frames = sample_frames
        self.device = torch.device("cpu")

    def load_student(self, pipeline_dir: str | Path | None = None) -> WanDenoiser:
        """The causal student: a pipeline's transformer/, or (None) a fresh copy of the teacher's weights."""
        path = teacher_weights(self.teacher_dir) if pipeline_dir is None else Path(pipeline_dir) / "transformer"
        return WanDenoiser.from_pretrained(path, self.pipeline_config.block_frames).train()

    def dataset(self):
        return build_dataset(self.config.data)

    def place(self, device: torch.device) -> None:
        # On an accelerator under bf16 the frozen models run in bf16, as the trained ones do under
        # autocast: at Wan2.1-1.3B's size the teacher and UMT5-XXL then hold 14 GiB less per GPU.
        dtype = torch.bfloat16 if device.type != "cpu" and self.config.mixed_precision == "bf16" else None
        self.teacher.to(device=device, dtype=dtype)
        self.text_encoder.to(device, dtype)
        self.device = device

    def encode(self, captions: list[str], device: torch.device) -> torch.Tensor:
        return self.text_encoder.encode(captions).to(device)

    def pipeline(self, student: WanDenoiser, with_teacher: bool = False) -> CausVidPipeline:
        return CausVidPipeline(student, self.autoencoder, self.text_encoder, self.pipeline_config,
                               self.teacher if with_teacher else None)

    @torch.no_grad()
    def sample(self, ema, out_dir, step):
        """Score the EMA student on a few shapes-bench prompts; write a contact sheet of its videos."""
        student = ema["student"]
        pipe = self.pipeline(student).to(next(student.parameters()).device, torch.float32)
        videos, labels = [], []
        report = bench(pipe, self.sample_cases, (0,), self.sample_frames,
                       on_video=lambda case, seed, frames: (videos.append(frames), labels.append(case.prompt)))
        contact_sheet(videos, labels, Path(out_dir) / f"step{step:07d}.png")
        return {f"bench_{name}": value for name, value in report["splits"]["all"].items()
                if name in METRICS and value is not None}

    def export(self, ema, out_dir):
        self.pipeline(ema["student"], with_teacher=True).save_pretrained(out_dir)
