"""causvid: real-time streaming video generation with a block-causal Wan denoiser."""

from causvid.checkpoint import CheckpointError
from causvid.models.attention import KVCache
from causvid.models.autoencoder import VideoAutoencoder
from causvid.models.denoiser import WanDenoiser
from causvid.pipeline import CausVidPipeline, PipelineConfig, load_pipeline
from causvid.rollout import CausalRollout

__all__ = [
    "CausVidPipeline",
    "CausalRollout",
    "CheckpointError",
    "KVCache",
    "PipelineConfig",
    "VideoAutoencoder",
    "WanDenoiser",
    "load_pipeline",
]
__version__ = "0.1.0"
