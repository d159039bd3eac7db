"""ONNX Runtime execution providers: one table, :data:`PROVIDERS`, short name -> how to use it.

| name     | onnxruntime provider          | KV cache lives on | falls back to |
|----------|-------------------------------|-------------------|---------------|
| cpu      | CPUExecutionProvider          | host              | -             |
| cuda     | CUDAExecutionProvider         | GPU               | cpu           |
| tensorrt | TensorrtExecutionProvider     | GPU               | cuda, cpu     |

Each entry builds its provider options from the :class:`~.ort_backend.SessionConfig` (device id,
engine cache, precision flags); ``SessionConfig.provider_options[name]`` is merged over them.
Adding a provider is one ``PROVIDERS.add`` line (the CLI's ``--provider`` choices come from
here). This module does not import onnxruntime until providers are resolved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maven_edge.core.errors import BackendError, InputError
from maven_edge.core.registry import Registry

if TYPE_CHECKING:
    from maven_edge.runtime.backends.ort_backend import SessionConfig


@dataclass(frozen=True)
class ProviderSpec:
    ort_name: str  # onnxruntime's provider name
    io_device: str  # where IOBinding keeps tensors: "cpu" or "cuda"
    options: Callable[[SessionConfig, Path], dict[str, Any]]  # provider options
    fallbacks: tuple[str, ...] = ()  # short names added after it, for the nodes it does not take
    install: str = "reinstall onnxruntime"  # what to do when this onnxruntime lacks it


def _cuda_options(cfg: SessionConfig, artifacts: Path) -> dict[str, Any]:
    return {"device_id": cfg.device_id}


def _tensorrt_options(cfg: SessionConfig, artifacts: Path) -> dict[str, Any]:
    cache = Path(cfg.trt_engine_cache_path) if cfg.trt_engine_cache_path else artifacts / "trt_cache"
    cache.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "device_id": cfg.device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": cfg.trt_fp16,
        "trt_int8_enable": cfg.trt_int8,
    }
    if cfg.trt_max_workspace_size:
        opts["trt_max_workspace_size"] = int(cfg.trt_max_workspace_size)
    return opts


class ProviderRegistry(Registry[ProviderSpec]):
    def by_ort_name(self, ort_name: str) -> str:
        """The short name of an onnxruntime provider name."""
        return next(name for name, spec in self.items() if spec.ort_name == ort_name)


_GPU = ("install onnxruntime-gpu (with CUDA, cuDNN and, for tensorrt, TensorRT libraries) instead of "
        "onnxruntime")
PROVIDERS = ProviderRegistry("execution provider")
PROVIDERS.add("cpu", ProviderSpec("CPUExecutionProvider", "cpu", lambda cfg, artifacts: {}))
PROVIDERS.add("cuda", ProviderSpec("CUDAExecutionProvider", "cuda", _cuda_options, ("cpu",), _GPU))
PROVIDERS.add("tensorrt", ProviderSpec("TensorrtExecutionProvider", "cuda", _tensorrt_options, ("cuda", "cpu"), _GPU))


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [name for name, spec in PROVIDERS.items() if spec.ort_name in have]


def resolve_providers(
    names: Sequence[str] | str | None, cfg: SessionConfig, artifacts: Path
) -> list[tuple[str, dict[str, Any]]]:
    """(onnxruntime provider, options) pairs for InferenceSession, in priority order, with fallbacks."""
    import onnxruntime as ort

    if names is None:
        names = ["cpu"]
    if isinstance(names, str):
        names = [names]
    names = [str(n).lower() for n in names]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown or not names:
        raise InputError(f"unknown execution provider(s) {unknown}; choose from {', '.join(PROVIDERS)}")
    have = set(ort.get_available_providers())
    for n in names:
        spec = PROVIDERS.get(n)
        if spec.ort_name not in have:
            raise BackendError(
                f"execution provider {n} ({spec.ort_name}) is not available in this onnxruntime "
                f"{ort.__version__} (it has {', '.join(sorted(have))}); {spec.install}, or use --provider cpu"
            )
    order: list[str] = []
    for n in names:
        for m in (n, *PROVIDERS.get(n).fallbacks):
            if m not in order and PROVIDERS.get(m).ort_name in have:
                order.append(m)
    if "cpu" not in order:
        order.append("cpu")
    out = []
    for n in order:
        spec = PROVIDERS.get(n)
        opts = spec.options(cfg, artifacts)
        opts.update(cfg.provider_options.get(n, {}))
        out.append((spec.ort_name, opts))
    return out
