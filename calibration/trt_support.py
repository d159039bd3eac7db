"""Which TensorRT releases each engine recipe supports, and which graphs TensorRT can parse.

Everything here is static and needs neither TensorRT nor a GPU, so `build-trt --dry-run` and
the default test suite can tell what a build would do on a given TensorRT release:

- :data:`ENGINE_RECIPES` — the ``--precision`` choices of ``build-trt`` with the TensorRT range
  each supports and the TensorRT API names it relies on. The weakly typed recipes (``fp16``,
  ``int8``, ``fp8``: builder precision flags, per-layer FP32 pins, INT8 calibrators) end before
  TensorRT 11, which removed those APIs; ``typed`` builds a strongly typed network whose
  precision comes from the ONNX files (``quantize --recipe fp16`` / ``int8-trt``), the path
  TensorRT 10 introduced and 11 keeps.
- :func:`maven_edge.export.trt_compat.graph_problems` (the ONNX parser's operator table per
  release and TensorRT's quantization rules) is applied to every graph a plan builds from.
- ``trt_api.json`` — ``dir()`` of the real TensorRT Python bindings of several releases
  (recorded by ``tools/trt_api_table.py`` without a GPU); :func:`recipe_api_problems` checks a
  recipe's API names against it, and the tests build a strict fake TensorRT from it.
- :func:`calibration_version_tag` — the version number TensorRT writes in INT8 calibration
  cache headers (``TRT-<tag>-<algorithm>``), whose formula changed in TensorRT 10.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from maven_edge.core.errors import ExportError, InputError
from maven_edge.core.registry import Registry
from maven_edge.export.trt_compat import parse_trt_version as _parse

API_TABLE = Path(__file__).resolve().parent / "trt_api.json"


def parse_trt_version(text: str) -> tuple[int, int, int]:
    """'10.3.0.26' -> (10, 3, 0); '8.6' -> (8, 6, 0)."""
    try:
        return _parse(text)
    except ExportError as exc:
        raise InputError(str(exc)) from None

Version = tuple[int, int]


def _fmt(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


# ---- engine recipes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRecipe:
    """One `build-trt --precision` choice."""

    help: str
    typed: bool  # strongly typed network: tensor precisions come from the ONNX file, no precision flags
    min_trt: Version  # oldest TensorRT release (inclusive)
    below_trt: Version | None  # first release that no longer has the APIs (exclusive); None: open
    api: tuple[str, ...]  # "Class.member" / "module_name" the recipe's build uses (checked against trt_api.json)
    why: str  # why the range is what it is

    def supports(self, version: str | tuple[int, ...]) -> bool:
        v = parse_trt_version(version) if isinstance(version, str) else tuple(version)
        return v[:2] >= self.min_trt and (self.below_trt is None or v[:2] < self.below_trt)

    def range_text(self) -> str:
        if self.below_trt is None:
            return f"TensorRT >= {_fmt(self.min_trt)}"
        return f"TensorRT {_fmt(self.min_trt)} - {self.below_trt[0] - 1}.x"


_WEAK_API = ("Builder.create_network", "Builder.create_builder_config", "Builder.create_optimization_profile",
             "Builder.build_serialized_network", "IBuilderConfig.set_flag", "IBuilderConfig.set_memory_pool_limit",
             "IBuilderConfig.add_optimization_profile", "IBuilderConfig.create_timing_cache",
             "IBuilderConfig.set_timing_cache", "MemoryPoolType.WORKSPACE", "OnnxParser.parse_from_file",
             "BuilderFlag.FP16", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS", "ILayer.precision",
             "ILayer.set_output_type", "IElementWiseLayer.op", "IUnaryLayer.op")
_CALIB_API = ("BuilderFlag.INT8", "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile",
              "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator")
_RUNTIME_API = ("Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
                "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype", "ICudaEngine.create_execution_context",
                "ICudaEngine.num_optimization_profiles", "IExecutionContext.set_input_shape",
                "IExecutionContext.set_tensor_address", "IExecutionContext.get_tensor_shape",
                "IExecutionContext.execute_async_v3", "IExecutionContext.set_optimization_profile_async",
                "TensorIOMode.INPUT", "nptype", "init_libnvinfer_plugins")

ENGINE_RECIPES: Registry[EngineRecipe] = Registry("engine recipe")
ENGINE_RECIPES.add("fp16", EngineRecipe(
    "weakly typed: FP16 kernels, normalisations/reductions/softmax and the discrete heads pinned to FP32 "
    "(INT8 too when the files carry Q/DQ)", False, (8, 6), (11, 0), _WEAK_API + ("BuilderFlag.INT8",) + _RUNTIME_API,
    "BuilderFlag.FP16, PREFER_PRECISION_CONSTRAINTS and ILayer.precision were removed in TensorRT 11 "
    "(weak typing is deprecated since 10.12)"))
ENGINE_RECIPES.add("int8", EngineRecipe(
    "weakly typed: vision side INT8 + FP16 (calibrated on the GPU, or from symmetric int8-trt Q/DQ), decoder "
    "and embed_tokens FP16", False, (8, 6), (11, 0), _WEAK_API + _CALIB_API + _RUNTIME_API,
    "INT8 calibrators were deprecated in TensorRT 10.1 and removed in 11 with BuilderFlag.INT8"))
ENGINE_RECIPES.add("fp8", EngineRecipe(
    "weakly typed: vision side FP8 E4M3 Q/DQ (onnxruntime's calibrator, explicit), decoder FP16; compute "
    "capability >= 8.9", False, (10, 0), (11, 0), _WEAK_API + ("BuilderFlag.FP8",) + _RUNTIME_API,
    "the ONNX parser imports FP8 Q/DQ from TensorRT 10.0; BuilderFlag.FP8 is gone in 11"))
ENGINE_RECIPES.add("typed", EngineRecipe(
    "strongly typed: every tensor keeps the type the ONNX file gives it (fp32 export = FP32/TF32, "
    "`quantize --recipe fp16` = FP16, `--recipe int8-trt` = INT8 Q/DQ); no precision flags, no calibration",
    True, (10, 0), None,
    ("NetworkDefinitionCreationFlag.STRONGLY_TYPED",) + tuple(a for a in _WEAK_API if a.split(".")[0] not in
                                                               ("BuilderFlag", "ILayer", "IElementWiseLayer",
                                                                "IUnaryLayer")) + _RUNTIME_API,
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED exists from TensorRT 10.0; it is the path 11 keeps"))

#: The oldest TensorRT any recipe supports, and the newest release whose API was recorded.
MIN_TRT: Version = (8, 6)


def recipes_for(version: str) -> list[str]:
    return [name for name, r in ENGINE_RECIPES.items() if r.supports(version)]


def check_recipe_version(recipe: str, version: str) -> None:
    """Refuse (InputError) a recipe on a TensorRT release outside its range, saying what to use."""
    r = ENGINE_RECIPES.get(recipe)
    if r.supports(version):
        return
    others = recipes_for(version)
    hint = (f"on TensorRT {version} use --precision {' or '.join(others)}" if others else
            f"TensorRT {version} is older than any recipe supports ({_fmt(MIN_TRT)}); upgrade TensorRT")
    extra = ""
    if "typed" in others and not r.typed:
        extra = (" with artifacts that carry their precision (`maven-edge quantize --recipe fp16`, or "
                 "`--recipe int8-trt` for INT8)")
    raise InputError(f"--precision {recipe} supports {r.range_text()}, not {version}: {r.why}; {hint}{extra}")


# ---- the recorded Python API ----------------------------------------------------------------------


@cache
def api_table() -> dict[str, Any]:
    return json.loads(API_TABLE.read_text())["releases"]


def recorded_api_release(version: str) -> str | None:
    """The recorded release with the same major version closest at or below `version` (else the oldest above)."""
    v = parse_trt_version(version)
    same = sorted((parse_trt_version(r), r) for r in api_table() if parse_trt_version(r)[0] == v[0])
    if not same:
        return None
    below = [r for pv, r in same if pv <= v]
    return below[-1] if below else same[0][1]


def api_has(release: str, name: str) -> bool:
    """Whether the recorded `release` has `name` ("Class.member" or a module-level name)."""
    data = api_table()[release]
    if "." not in name:
        return name in data["module"]
    cls, member = name.split(".", 1)
    return member in data["classes"].get(cls, ())


def recipe_api_problems(recipe: str, version: str) -> list[str]:
    """API names the recipe uses that the recorded bindings of `version` (or its nearest recorded
    release of the same major version) lack."""
    release = recorded_api_release(version)
    if release is None:
        return [f"no TensorRT {parse_trt_version(version)[0]}.x API was recorded (tools/trt_api_table.py)"]
    return [f"{name} (absent in the recorded {release} bindings)" for name in ENGINE_RECIPES.get(recipe).api
            if not api_has(release, name)]


# ---- calibration cache headers ---------------------------------------------------------------------


def calibration_version_tag(version: str) -> str:
    """The integer TensorRT writes in a calibration cache header (``TRT-<tag>-<algorithm>``):
    NV_TENSORRT_VERSION, major*1000 + minor*100 + patch up to 8.x ('8.6.1' -> '8601'), and
    major*10000 + minor*100 + patch from 10.0 ('10.3.0' -> '100300'). TensorRT ignores a cache
    whose header names another version. TensorRT 11 has no calibration (refused)."""
    major, minor, patch = parse_trt_version(version)
    if major >= 11:
        raise InputError(f"TensorRT {version} has no INT8 calibration (removed in 11); build with --precision typed "
                         "from `maven-edge quantize --recipe int8-trt` artifacts")
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def supported_versions_markdown() -> str:
    """The recipe x TensorRT table for the docs."""
    rows = ["| `--precision` | TensorRT | what it builds | why the range |", "|---|---|---|---|"]
    for name, r in ENGINE_RECIPES.items():
        rows.append(f"| `{name}` | {r.range_text()} | {r.help} | {r.why} |")
    return "\n".join(rows)


