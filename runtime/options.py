"""How to open a pipeline, as plain options: :class:`PipelineOptions` (and :class:`PipelineLimits`).

    import maven_edge
    pipe = maven_edge.open_pipeline(artifacts="artifacts/tiny", threads=2)           # ort, CPU
    pipe = maven_edge.open_pipeline(artifacts="artifacts/tiny", providers=["cuda"])  # ort, CUDA
    pipe = maven_edge.open_pipeline(checkpoint="model_src/checkpoints/tiny")         # torch reference

The CLI (`generate`, `demo`, `inspect`, the server) builds its pipeline through this too, so a
program and the command line get the same pipeline from the same options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maven_edge.core.errors import InputError
from maven_edge.core.preprocess import ImageLimits
from maven_edge.runtime.backends import BACKENDS
from maven_edge.runtime.caches import DEFAULT_PREFIX_CACHE_MB, DEFAULT_VISUAL_CACHE_MB


@dataclass
class PipelineLimits:
    """What one request may ask for; everything beyond is refused before any model runs."""

    max_images: int = 8
    image: ImageLimits = field(default_factory=ImageLimits)  # max pixels, bytes, aspect ratio, ...
    max_prompt_chars: int = 100_000  # checked before tokenization

    def __post_init__(self) -> None:
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 0:
            raise InputError(f"max_images must be an integer >= 0, got {self.max_images!r}")
        if not isinstance(self.max_prompt_chars, int) or self.max_prompt_chars < 1:
            raise InputError(f"max_prompt_chars must be an integer >= 1, got {self.max_prompt_chars!r}")



@dataclass
class CachingOptions:
    """Work shared across requests (see :mod:`maven_edge.runtime.caches` and :mod:`.batching`)."""

    visual_cache_mb: int = DEFAULT_VISUAL_CACHE_MB  # per-image visual-stage results; 0 = off
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # KV of prompt prefixes; 0 = off
    max_batch: int = 4  # continuous batching of decode: most requests per step; 1 = off
    batch_capacity: int | None = None  # positions per batch slot (default: the model's context length)

    def __post_init__(self) -> None:
        for name in ("visual_cache_mb", "prefix_cache_mb", "max_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an integer >= 0, got {v!r}")
        if self.batch_capacity is not None and (not isinstance(self.batch_capacity, int) or self.batch_capacity < 2):
            raise InputError(f"batch_capacity must be an integer >= 2, got {self.batch_capacity!r}")


#: every request computes everything (for latency measurements of the stages themselves)
NO_CACHING = CachingOptions(visual_cache_mb=0, prefix_cache_mb=0, max_batch=1)


@dataclass
class PipelineOptions:
    """Everything that decides which pipeline is opened. One of `artifacts` / `checkpoint`."""

    artifacts: str | Path | None = None  # exported artifacts (manifest.json + files): ort / trt backends
    checkpoint: str | Path | None = None  # a checkpoint directory: torch backend
    backend: str | None = None  # a name in BACKENDS; default: torch for a checkpoint, ort for artifacts
    providers: Sequence[str] = ("cpu",)  # ort: execution providers in preference order (PROVIDERS)
    threads: int = 0  # ort: intra-op threads (0 = onnxruntime's default, one per physical core)
    opt_level: str = "all"  # ort: graph optimization level: disable | basic | extended | all
    session_options: Any = None  # ort: a SessionConfig (or dict of its fields); overrides the three above
    trt_cache: str | None = None  # ort + tensorrt provider: engine cache (default <artifacts>/trt_cache)
    trt_fp16: bool = False  # ort + tensorrt provider: allow fp16 engines
    verify: bool = True  # check every artifact file's sha256 at load
    device: str = "cpu"  # torch: the torch device
    device_id: int = 0  # trt: the GPU
    max_images: int | None = None  # images per request (default: the model's max_images)
    max_pixels: int | None = None  # pixels per image, checked before decoding it (default: ImageLimits)
    visual_cache_mb: int = DEFAULT_VISUAL_CACHE_MB  # visual-feature cache bound (0 = off)
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # prefix KV cache bound (0 = off)
    max_batch: int = 4  # continuous batching of decode across concurrent requests (1 = off)
    extra: dict[str, Any] = field(default_factory=dict)  # further keywords for the backend's constructor

    def backend_name(self) -> str:
        if self.artifacts is not None and self.checkpoint is not None:
            raise InputError("give either artifacts (ort / trt) or a checkpoint (torch), not both")
        if self.artifacts is None and self.checkpoint is None:
            raise InputError("give artifacts=DIR (exported with `maven-edge export`) or checkpoint=DIR")
        name = self.backend or ("torch" if self.checkpoint is not None else "ort")
        spec = BACKENDS.get(name)
        if spec.runs == "checkpoint" and self.checkpoint is None:
            raise InputError(f"the {name} backend runs a checkpoint: give --checkpoint DIR instead of --artifacts")
        if spec.runs == "artifacts" and self.artifacts is None:
            raise InputError(f"the {name} backend runs exported artifacts: give --artifacts DIR (export them with "
                             "`maven-edge export --checkpoint DIR --out DIR`)")
        return name

    def caching(self) -> CachingOptions:
        return CachingOptions(self.visual_cache_mb, self.prefix_cache_mb, self.max_batch)

    def limits(self, default_max_images: int) -> PipelineLimits:
        image = ImageLimits(max_pixels=self.max_pixels) if self.max_pixels else ImageLimits()
        max_images = default_max_images if self.max_images is None else self.max_images
        return PipelineLimits(max_images=max_images, image=image)
