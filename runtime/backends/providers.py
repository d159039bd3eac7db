"""ONNX Runtime execution providers: one table, :data:`PROVIDERS`, short name -> how to use it.

| name     | onnxruntime provider          | KV cache lives on | falls back to |
|----------|-------------------------------|-------------------|---------------|
| cpu      | CPUExecutionProvider          | host              | -             |
| cuda     | CUDAExecutionProvider         | GPU               | cpu           |
| tensorrt | TensorrtExecutionProvider     | GPU               | cuda, cpu     |

Each entry builds its provider options from the :class:`~.ort_backend.SessionConfig` (device id,
engine cache, precision flags) and, per component, from the manifest (the TensorRT execution
provider gets explicit ``trt_profile_min/opt/max_shapes`` covering every KV-cache length up to
``trt_profile_max_seq``, so it builds each engine once instead of again whenever a new past
length falls outside the shapes it has seen); ``SessionConfig.provider_options[name]`` is merged
over them. Every option name is checked against the names ONNX Runtime's provider parses
(:data:`ORT_OPTION_NAMES`) before a session is created. Adding a provider is one ``PROVIDERS.add``
line (the CLI's ``--provider`` choices come from here). This module does not import onnxruntime
until providers are resolved.

GPU installs: ``onnxruntime`` and ``onnxruntime-gpu`` install the same ``onnxruntime`` package;
with both present, whichever was installed last owns the files and the CUDA / TensorRT providers
can disappear. :func:`ort_distributions` detects that and the error says how to repair it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maven_edge.core.errors import BackendError, InputError
from maven_edge.core.registry import Registry

if TYPE_CHECKING:
    from maven_edge.core.manifest import Component, Manifest
    from maven_edge.runtime.backends.ort_backend import SessionConfig

#: Provider option names ONNX Runtime parses (unknown names make session creation fail), read
#: from its sources: ``core/providers/cuda/cuda_execution_provider_info.cc`` and
#: ``core/providers/tensorrt/tensorrt_execution_provider_info.cc`` (provider_option_names).
ORT_OPTION_NAMES: dict[str, frozenset[str]] = {
    "cpu": frozenset(),
    "cuda": frozenset({
        "device_id", "has_user_compute_stream", "user_compute_stream", "gpu_mem_limit", "arena_extend_strategy",
        "cudnn_conv_algo_search", "do_copy_in_default_stream", "gpu_external_alloc", "gpu_external_free",
        "gpu_external_empty_cache", "cudnn_conv_use_max_workspace", "enable_cuda_graph", "cudnn_conv1d_pad_to_nc1d",
        "tunable_op_enable", "tunable_op_tuning_enable", "tunable_op_max_tuning_duration_ms",
        "enable_skip_layer_norm_strict_mode", "prefer_nhwc", "use_ep_level_unified_stream", "use_tf32",
    }),
    "tensorrt": frozenset({
        "device_id", "has_user_compute_stream", "user_compute_stream", "trt_max_partition_iterations",
        "trt_min_subgraph_size", "trt_max_workspace_size", "trt_fp16_enable", "trt_int8_enable",
        "trt_int8_calibration_table_name", "trt_int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core",
        "trt_dump_subgraphs", "trt_engine_cache_enable", "trt_engine_cache_path", "trt_weight_stripped_engine_enable",
        "trt_onnx_model_folder_path", "trt_engine_cache_prefix", "trt_engine_decryption_enable",
        "trt_engine_decryption_lib_path", "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable",
        "trt_layer_norm_fp32_fallback", "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache",
        "trt_detailed_build_log", "trt_build_heuristics_enable", "trt_sparsity_enable",
        "trt_builder_optimization_level", "trt_auxiliary_streams", "trt_tactic_sources", "trt_extra_plugin_lib_paths",
        "trt_profile_min_shapes", "trt_profile_max_shapes", "trt_profile_opt_shapes", "trt_cuda_graph_enable",
        "trt_ep_context_embed_mode", "trt_ep_context_file_path", "trt_dump_ep_context_model",
        "trt_engine_hw_compatible", "trt_onnx_bytestream", "trt_onnx_bytestream_size",
        "trt_external_data_bytestream", "trt_external_data_bytestream_size", "trt_op_types_to_exclude",
    }),
}


@dataclass(frozen=True)
class ProviderSpec:
    ort_name: str  # onnxruntime's provider name
    io_device: str  # where IOBinding keeps tensors: "cpu" or "cuda"
    options: Callable[[SessionConfig, Path], dict[str, Any]]  # provider options
    fallbacks: tuple[str, ...] = ()  # short names added after it, for the nodes it does not take
    install: str = "reinstall onnxruntime"  # what to do when this onnxruntime lacks it
    # per-session options from the component's I/O contract (None: the same for every component)
    component_options: Callable[[SessionConfig, Manifest, Component], dict[str, Any]] | None = None
    gpu: bool = False  # runs on a GPU: the decoder precision rules of `check_decoder_for` apply


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


#: Default context (prompt + new tokens) the TensorRT provider's profiles cover; the manifest's
#: max_position_embeddings caps it.
TRT_PROFILE_MAX_SEQ = 1024


def profile_axes(manifest: Manifest, max_seq: int, max_batch: int = 1) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic axis, for ONE explicit TensorRT profile per component:
    the decoder's past from 0 (the h_eos pass and prefill) to max_seq - 1, tuned for one decode
    step; images and batch up to the model's max_images (the batched h_eos pass)."""
    cfg = manifest.maven_config()
    max_seq = min(max_seq, cfg.llm.max_position_embeddings)
    images = max(1, cfg.max_images)
    wide = max(max_batch, images)
    opt_past = min(max_seq - 1, 64)
    return {"images": (1, 1, images), "batch": (1, 1, wide), "seq": (1, 1, max_seq), "past": (0, opt_past, max_seq - 1),
            "total": (1, opt_past + 1, max_seq)}


def trt_profile_options(manifest: Manifest, comp: Component, max_seq: int) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for `comp`'s inputs with a symbolic axis, in the
    provider's syntax (``name:1x3x64x64,name2:...``)."""
    axes = profile_axes(manifest, max_seq)
    parts: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for t in comp.inputs:
        if all(isinstance(d, int) for d in t.shape):
            continue
        for i, key in enumerate(("min", "opt", "max")):
            dims = []
            for d in t.shape:
                if isinstance(d, int):
                    dims.append(d)
                elif d in axes:
                    dims.append(axes[d][i])
                else:
                    raise InputError(f"{comp.name}: input {t.name} has an axis {d!r} the TensorRT provider profiles "
                                     "do not know; re-export the artifacts")
            parts[key].append(f"{t.name}:{'x'.join(str(x) for x in dims)}")
    if not parts["min"]:
        return {}
    return {f"trt_profile_{k}_shapes": ",".join(v) for k, v in parts.items()}


def _tensorrt_component_options(cfg: SessionConfig, manifest: Manifest, comp: Component) -> dict[str, Any]:
    return trt_profile_options(manifest, comp, cfg.trt_profile_max_seq or TRT_PROFILE_MAX_SEQ)


def check_option_names(name: str, options: dict[str, Any]) -> None:
    """Refuse option names the provider does not parse (onnxruntime would fail later, less clearly)."""
    known = ORT_OPTION_NAMES.get(name)
    if known is None:
        return
    bad = sorted(k for k in options if k not in known)
    if bad:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in bad]
        raise InputError(f"unknown {name} provider option(s): {', '.join(hints)}; onnxruntime's "
                         f"{PROVIDERS.get(name).ort_name} takes {', '.join(sorted(known)) or 'none'}")


def ort_distributions() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` package (more than one breaks it)."""
    from importlib import metadata

    names = set()
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name == "onnxruntime" or (name.startswith("onnxruntime-")
                                     and not name.startswith(("onnxruntime-genai", "onnxruntime-extensions"))):
            names.add(name)
    return sorted(names)


def gpu_install_hint(dists: Sequence[str]) -> str:
    if "onnxruntime" in dists and any(d.startswith("onnxruntime-gpu") for d in dists):
        return ("both onnxruntime and onnxruntime-gpu are installed; they share the onnxruntime package and the CPU "
                "one can hide the GPU providers: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                "onnxruntime-gpu (docs/usage/quantization.md, GPU installs)")
    return _GPU


class ProviderRegistry(Registry[ProviderSpec]):
    def by_ort_name(self, ort_name: str) -> str:
        """The short name of an onnxruntime provider name."""
        return next(name for name, spec in self.items() if spec.ort_name == ort_name)


_GPU = ("install onnxruntime-gpu (with CUDA, cuDNN and, for tensorrt, TensorRT libraries) instead of "
        "onnxruntime: pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
PROVIDERS = ProviderRegistry("execution provider")
PROVIDERS.add("cpu", ProviderSpec("CPUExecutionProvider", "cpu", lambda cfg, artifacts: {}))
PROVIDERS.add("cuda", ProviderSpec("CUDAExecutionProvider", "cuda", _cuda_options, ("cpu",), _GPU, gpu=True))
PROVIDERS.add("tensorrt", ProviderSpec("TensorrtExecutionProvider", "cuda", _tensorrt_options, ("cuda", "cpu"), _GPU,
                                       component_options=_tensorrt_component_options, gpu=True))


def check_decoder_for(provider: str, comp: Component) -> None:
    """Refuse a decoder the provider would run largely on the CPU: the onnxruntime-genai fp32 decoder's
    GroupQueryAttention has CUDA kernels only for fp16 / bf16, so under cuda / tensorrt its attention
    falls back to the CPU with the KV cache copied across every step."""
    spec = PROVIDERS.get(provider)
    if not spec.gpu or comp.name != "decoder":
        return
    genai = (bool(comp.extra.get("past_present_share_buffer"))
             or str(comp.extra.get("builder", "")).startswith("onnxruntime-genai"))
    if genai and comp.precision not in ("fp16", "bf16"):
        raise BackendError(
            f"the {comp.precision} onnxruntime-genai decoder (export --decoder genai) runs GroupQueryAttention, which has "
            f"CUDA kernels only for fp16/bf16: under --provider {provider} its attention would fall back to the CPU. "
            "Re-export with --decoder torch for GPUs (and `maven-edge quantize --recipe fp16` for fp16)")


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [name for name, spec in PROVIDERS.items() if spec.ort_name in have]


def resolve_providers(
    names: Sequence[str] | str | None, cfg: SessionConfig, artifacts: Path,
    manifest: Manifest | None = None, component: Component | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(onnxruntime provider, options) pairs for InferenceSession, in priority order, with fallbacks;
    with `manifest` and `component`, the per-component options too (TensorRT profiles)."""
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
            install = gpu_install_hint(ort_distributions()) if spec.gpu else spec.install
            raise BackendError(
                f"execution provider {n} ({spec.ort_name}) is not available in this onnxruntime "
                f"{ort.__version__} (it has {', '.join(sorted(have))}); {install}, or use --provider cpu"
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
        if spec.component_options is not None and manifest is not None and component is not None:
            opts.update(spec.component_options(cfg, manifest, component))
        opts.update(cfg.provider_options.get(n, {}))
        check_option_names(n, opts)
        out.append((spec.ort_name, opts))
    return out
