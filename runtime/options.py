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
    """What one request may ask for; everything beyond is refused before any model runs.

    Per image (``image``, an :class:`ImageLimits`): 40 MP, 64 MiB encoded, 192 MiB to decode
    (estimated from the header), aspect ratio 50:1. Per request: ``max_images`` images and
    ``max_request_pixels`` pixels in all (checked on each header before that image is decoded).
    Images are decoded one at a time, so a request's memory is bounded by its largest image
    (docs/reliability.md: measured peaks)."""

    max_images: int = 8
    image: ImageLimits = field(default_factory=ImageLimits)  # max pixels, bytes, decode memory, aspect ratio, ...
    max_prompt_chars: int = 100_000  # checked before tokenization
    max_request_pixels: int = 100_000_000  # all images of one request together

    def __post_init__(self) -> None:
        for name in ("max_images", "max_prompt_chars", "max_request_pixels"):
            value, least = getattr(self, name), 0 if name == "max_images" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
        if not isinstance(self.image, ImageLimits):
            raise InputError(f"image must be an ImageLimits, got {type(self.image).__name__}")



@dataclass
class CachingOptions:
    """Work shared across requests (see :mod:`maven_edge.runtime.caches` and :mod:`.batching`)."""

    visual_cache_mb: int = DEFAULT_VISUAL_CACHE_MB  # per-image visual-stage results; 0 = off
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # KV of prompt prefixes; 0 = off
    max_batch: int = 4  # continuous batching of decode: most requests per step; 1 = off
    batch_capacity: int | None = None  # positions per batch slot (default: the model's context length)
    #: batched decode steps wait while another request encodes and prefills (runtime/batching.py)
    prefill_first: bool = True

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
    max_pixels: int | None = None  # pixels per image, checked before decoding it (default: ImageLimits, 40 MP)
    max_request_pixels: int | None = None  # pixels of all images of a request (default: PipelineLimits, 100 MP)
    max_decode_bytes: int | None = None  # memory to decode one image (default: ImageLimits, 192 MiB)
    visual_cache_mb: int = DEFAULT_VISUAL_CACHE_MB  # visual-feature cache bound (0 = off)
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # prefix KV cache bound (0 = off)
    max_batch: int = 4  # continuous batching of decode across concurrent requests (1 = off)
    prefill_first: bool = True  # batched decode waits while another request prefills (False: steps beside it)
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
        return CachingOptions(self.visual_cache_mb, self.prefix_cache_mb, self.max_batch,
                              prefill_first=self.prefill_first)

    def limits(self, default_max_images: int) -> PipelineLimits:
        image = {k: v for k, v in (("max_pixels", self.max_pixels), ("max_decode_bytes", self.max_decode_bytes))
                 if v is not None}
        request = {} if self.max_request_pixels is None else {"max_request_pixels": self.max_request_pixels}
        max_images = default_max_images if self.max_images is None else self.max_images
        return PipelineLimits(max_images=max_images, image=ImageLimits(**image), **request)
