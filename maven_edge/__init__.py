"""maven-edge: an edge deployment stack for MaVEn-style multimodal LLMs.

    import maven_edge
    pipe = maven_edge.open_pipeline(artifacts="artifacts/tiny", threads=2)      # onnxruntime, CPU
    res = pipe.generate(["a.png", "b.png"], "Image 1: <image>\\nImage 2: <image>\\nQuestion: ...\\nAnswer:")
    res.text, res.timings.ttft_ms

The public API is what this module exports (``__all__``); it is loaded on first use, so
``import maven_edge`` is cheap and never imports torch. The packages under it follow the data
flow, each importing only those before it (checked in CI, see docs/design.md):
``core`` <- ``model_src`` <- ``export`` <- ``calibration`` <- ``runtime`` <- ``serving``, ``benchmarks``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# name -> module that defines it
_API = {
    # running a model
    "MavenPipeline": "maven_edge.runtime.pipeline",
    "GenerateOptions": "maven_edge.runtime.pipeline",
    "GenerationResult": "maven_edge.runtime.pipeline",
    "GenerationStream": "maven_edge.runtime.pipeline",
    "PipelineLimits": "maven_edge.runtime.options",
    "Timings": "maven_edge.runtime.pipeline",
    "PipelineOptions": "maven_edge.runtime.options",
    "open_pipeline": "maven_edge.runtime.pipeline",
    # the artifact contract
    "Manifest": "maven_edge.core.manifest",
    "load_manifest": "maven_edge.core.manifest",
    # configuration
    "MavenConfig": "maven_edge.core.config",
    "get_config": "maven_edge.core.config",
    # errors
    "MavenError": "maven_edge.core.errors",
    "ConfigError": "maven_edge.core.errors",
    "InputError": "maven_edge.core.errors",
    "ImageError": "maven_edge.core.errors",
    "PromptError": "maven_edge.core.errors",
    "VideoError": "maven_edge.core.errors",
    "CheckpointError": "maven_edge.core.errors",
    "ArtifactError": "maven_edge.core.errors",
    "ExportError": "maven_edge.core.errors",
    "BackendError": "maven_edge.core.errors",
    "CalibrationError": "maven_edge.core.errors",
    "TrainingError": "maven_edge.core.errors",
    "GenerationCancelled": "maven_edge.core.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'maven_edge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
