"""TensorRT engines from exported artifacts: one engine per component (`maven-edge build-trt`).

    from maven_edge.calibration.tensorrt import TrtBuildOptions, build_engines, plan_engines
    plans = plan_engines(load_manifest("artifacts/tiny"), TrtBuildOptions("artifacts/tiny", "out"))  # no GPU needed
    result = build_engines(TrtBuildOptions("artifacts/tiny", "artifacts/tiny-trt", precision="fp16"))

What is planned here is pure Python and testable without a GPU (:func:`plan_engines`):

- **Optimisation profiles** from the manifest's symbolic axes (``images``, ``batch``, ``seq``,
  ``past``, ``total``) and the limits (``--max-images``, ``--max-seq``, ``--max-batch``). The
  decoder gets two: ``prefill`` (prompt of 1..max_seq tokens, empty past; batch up to
  max(max_batch, max_images) for the ``[codes, <eos_vis>]`` pass) and ``decode`` (one token,
  past 1..max_seq-1). An INT8-calibrated engine also gets a fixed one-image calibration profile.
- **Precision per component** (the recipes and the TensorRT releases each supports are in
  :data:`maven_edge.calibration.trt_support.ENGINE_RECIPES`): ``fp16`` builds everything with
  FP16 kernels and keeps the layers that need range in FP32 (normalisations, reductions,
  softmax, pow/sqrt/reciprocal: :func:`keep_fp32_layer`). ``int8`` gives the vision side
  (vision encoder, discrete tokenizer, patch selector, projector) INT8 + FP16 and keeps the
  decoder and embed_tokens FP16: from fp32 artifacts with an entropy calibrator fed by
  :mod:`maven_edge.calibration.readers` (and a calibration cache), from ``int8-trt`` artifacts
  with their explicit, symmetric Q/DQ scales. ``fp8`` (Ada/Hopper, compute capability >= 8.9)
  quantizes the vision side to FP8 E4M3 Q/DQ with onnxruntime's calibrator first (explicit
  quantization) and keeps the decoder FP16. These three are weakly typed (TensorRT 8.6 - 10.x);
  ``typed`` builds strongly typed networks whose precision comes from the ONNX files (TensorRT
  >= 10.0, the path TensorRT 11 keeps). Any Q/DQ in a weakly typed network adds its type's flag.
- **Refusals up front**: each plan checks its ONNX file against the ONNX parser's op / opset
  table of the TensorRT release (:func:`maven_edge.export.trt_compat.graph_problems`: contrib
  ops, int8-dynamic's integer ops, opset 18 on TensorRT 8.6, asymmetric Q/DQ) and the recipe's
  range; :func:`build_engines` stops before building anything when a plan is refused, and
  ``--dry-run`` (:func:`plan_summary`) prints every plan with its reason.
- **Caches**: the engine cache key is a sha256 over the manifest hash, the component file's
  hash, GPU name + compute capability, TensorRT version and the build settings
  (:func:`engine_cache_key`); an engine whose key is in the cache is reused, not rebuilt.
  INT8 calibration caches are keyed by manifest hash + component + calibration set digest +
  TensorRT version and use TensorRT's own text format (:func:`format_calibration_cache`), whose
  header carries the version (:func:`trt_version_tag`). The timing cache is one
  file per GPU + TensorRT version, shared by every build.

:func:`build_engines` then runs the TensorRT builder (``tensorrt`` and cuda-python imported
lazily) and writes ``engines.json`` + ``<component>.engine`` + ``tokenizer.json``, which
:class:`maven_edge.runtime.backends.trt_backend.TrtBackend` runs. Without TensorRT or a GPU it raises a
:class:`BackendError` that says so, before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maven_edge.calibration.quantize import WEIGHT_OPS, discrete_sensitive_nodes, quiet_quantizer
from maven_edge.calibration.readers import (
    ComponentFeeds,
    FeedReader,
    make_ort_reader,
    resolve_calibration_set,
)
from maven_edge.calibration.trt_runtime import (
    ENGINES_FORMAT,
    ENGINES_JSON,
    Cuda,
    import_tensorrt,
    tensorrt_version,
)
from maven_edge.calibration.trt_support import (
    ENGINE_RECIPES,
    calibration_version_tag,
    check_recipe_version,
    parse_trt_version,
)
from maven_edge.core.errors import ArtifactError, BackendError, CalibrationError, InputError
from maven_edge.core.manifest import MANIFEST, Component, Manifest, file_entry, load_manifest, sha256_file
from maven_edge.export import trt_compat

PRECISIONS = tuple(ENGINE_RECIPES.names())
#: The TensorRT release `build-trt --dry-run` plans for when none is installed and none is given
#: (JetPack 6.1 / 6.2).
DEFAULT_PLAN_TRT = "10.3"
VISION_SIDE = ("vision_encoder", "discrete_tokenizer", "patch_selector", "projector")
DEFAULT_MAX_SEQ = 1024
#: TensorRT layer types (trt.LayerType names) kept in FP32 in reduced-precision engines, and
#: element-wise / unary operations (trt.ElementWiseOperation / trt.UnaryOperation names).
FP32_LAYER_TYPES = ("NORMALIZATION", "REDUCE", "SOFTMAX")
FP32_LAYER_OPS = {"ELEMENTWISE": ("POW",), "UNARY": ("SQRT", "RECIP", "EXP", "LOG", "COS", "SIN")}
#: calibration algorithm -> the name TensorRT writes in a calibration cache header
CALIB_ALGORITHMS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration"}
FP8_MIN_CC = (8, 9)


@dataclass
class TrtBuildOptions:
    """What `maven-edge build-trt` can be told."""

    artifacts: str | Path
    out: str | Path
    precision: str = "fp16"
    max_images: int | None = None  # default: the model's max_images
    max_seq: int | None = None  # context (prompt + new tokens); default min(1024, max positions)
    max_batch: int = 1  # sequences per decode call
    opt_images: int | None = None  # shape TensorRT tunes for (default min(2, max_images))
    opt_seq: int | None = None  # default: opt_images images + 32 text tokens
    workspace_gb: float = 2.0
    builder_optimization_level: int = 3
    timing_cache: str | None = None
    engine_cache: str | None = None  # default <out>/cache
    components: tuple[str, ...] | None = None  # subset to build (default all)
    calib_images: str | None = None
    calib_samples: int = 32
    calib_split: str = "val"
    calib_algorithm: str = "entropy"  # entropy | minmax (implicit INT8)
    calib_source: str = "tensorrt"  # tensorrt (calibrate on the GPU) | onnxruntime (ranges measured on the CPU)
    allow_upscale: bool = False
    force: bool = False  # rebuild even on an engine-cache hit
    progress: bool = True
    device_id: int = 0
    target_trt: str | None = None  # planning only: the TensorRT release to plan for (a build uses the installed one)

    def validate(self) -> TrtBuildOptions:
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("max_images", "max_seq", "opt_images", "opt_seq"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 0 < self.workspace_gb <= 1024:
            raise InputError(f"--workspace must be in (0, 1024] GB, got {self.workspace_gb}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise InputError(f"--opt-level must be 0..5, got {self.builder_optimization_level}")
        if self.calib_algorithm not in CALIB_ALGORITHMS:
            raise InputError(f"calibration algorithm must be one of {', '.join(CALIB_ALGORITHMS)}")
        if self.calib_source not in ("tensorrt", "onnxruntime"):
            raise InputError(f"--calib-source must be tensorrt or onnxruntime, got {self.calib_source!r}")
        if self.target_trt is not None:
            parse_trt_version(self.target_trt)
        return self


# ---- limits and profiles -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_seq: int
    max_batch: int
    opt_images: int
    opt_seq: int
    tokens_per_image: int  # incl. <img_start>/<img_end>

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def resolve_limits(manifest: Manifest, opts: TrtBuildOptions) -> Limits:
    cfg = manifest.maven_config()
    max_images = opts.max_images or cfg.max_images
    max_seq = opts.max_seq or min(DEFAULT_MAX_SEQ, cfg.llm.max_position_embeddings)
    if max_seq > cfg.llm.max_position_embeddings:
        raise InputError(f"--max-seq {max_seq} exceeds the model's max_position_embeddings "
                         f"{cfg.llm.max_position_embeddings}")
    if max_seq < 2:
        raise InputError("--max-seq must be >= 2 (a prompt and one new token)")
    tpi = cfg.visual_tokens_per_image(manifest.mode) + 2
    if max_images * tpi >= max_seq:
        raise InputError(
            f"--max-seq {max_seq} cannot hold --max-images {max_images} images ({tpi} tokens each in "
            f"{manifest.mode} mode = {max_images * tpi}) plus text; raise --max-seq or lower --max-images"
        )
    opt_images = min(opts.opt_images or 2, max_images)
    opt_seq = min(opts.opt_seq or opt_images * tpi + 32, max_seq)
    return Limits(max_images, max_seq, opts.max_batch, opt_images, opt_seq, tpi)


@dataclass
class Profile:
    """One optimisation profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


AxisRanges = dict[str, tuple[int, int, int]]


def axis_ranges(component: str, limits: Limits) -> list[tuple[str, AxisRanges]]:
    """(profile name, symbolic axis -> (min, opt, max)) for one component."""
    lim = limits
    images = (1, lim.opt_images, lim.max_images)
    wide = max(lim.max_batch, lim.max_images)  # the h_eos pass has one row per image
    if component == "decoder":
        opt_past = min(lim.opt_seq + 16, lim.max_seq - 1)
        return [
            ("prefill", {"batch": (1, 1, wide), "seq": (1, lim.opt_seq, lim.max_seq), "past": (0, 0, 0),
                         "total": (1, lim.opt_seq, lim.max_seq)}),
            ("decode", {"batch": (1, 1, lim.max_batch), "seq": (1, 1, 1), "past": (1, opt_past, lim.max_seq - 1),
                        "total": (2, opt_past + 1, lim.max_seq)}),
        ]
    if component == "embed_tokens":
        return [("default", {"batch": (1, 1, wide), "seq": (1, lim.opt_seq, lim.max_seq)})]
    return [("default", {"images": images, "batch": (1, 1, wide)})]


def component_profiles(comp: Component, limits: Limits) -> list[Profile]:
    """Optimisation profiles for every input of `comp`, from its symbolic shapes in the manifest."""
    out = []
    for pname, ranges in axis_ranges(comp.name, limits):
        shapes = {}
        for t in comp.inputs:
            lo, opt, hi = [], [], []
            for d in t.shape:
                if isinstance(d, int):
                    lo.append(d)
                    opt.append(d)
                    hi.append(d)
                elif d in ranges:
                    a, b, c = ranges[d]
                    lo.append(a)
                    opt.append(b)
                    hi.append(c)
                else:
                    raise ArtifactError(f"{comp.name}: input {t.name} has symbolic axis {d!r} that build-trt does not "
                                        f"know (known: {', '.join(ranges)}); re-export the artifacts")
            shapes[t.name] = (tuple(lo), tuple(opt), tuple(hi))
        out.append(Profile(pname, shapes))
    return out


def calibration_profile(comp: Component, limits: Limits) -> Profile:
    """A fixed one-image profile: TensorRT calibrates at the calibration profile's opt shape."""
    base = component_profiles(comp, limits)[0]
    fixed = {}
    for name, (lo, _, _) in base.shapes.items():
        spec = next(t for t in comp.inputs if t.name == name)
        shape = tuple(1 if d in ("images", "batch") else lo[i] for i, d in enumerate(spec.shape))
        fixed[name] = (shape, shape, shape)
    return Profile("calibration", fixed)


# ---- precision and plans -----------------------------------------------------------------------------


def qdq_kinds(path: Path) -> set[str]:
    """The Q/DQ element types in an ONNX file ("int8", "float8_e4m3fn", ...); empty without Q/DQ."""
    import onnx

    if not path.is_file():
        return set()
    return trt_compat.qdq_types(onnx.load(str(path), load_external_data=False))


def has_qdq(path: Path) -> bool:
    return bool(qdq_kinds(path))


def component_precision(name: str, precision: str, qdq: set[str] | bool) -> tuple[list[str], str]:
    """(TensorRT builder flags, how INT8/FP8 scales are obtained: none | calibrate | explicit | fp8-qdq).

    A weakly typed network with Q/DQ layers needs the builder flag of their type (INT8 / FP8) on
    top of the recipe's (TensorRT 8.6 refuses to build Q/DQ networks without it). A strongly
    typed (``typed``) network takes no precision flags at all.
    """
    kinds = ({"int8"} if qdq else set()) if isinstance(qdq, bool) else set(qdq)
    explicit = bool(kinds)
    qflags = (["INT8"] if "int8" in kinds else []) + (["FP8"] if any(k.startswith("float8") for k in kinds) else [])
    if precision == "typed":
        return [], ("explicit" if explicit else "none")
    if precision == "fp16" or name not in VISION_SIDE:
        return qflags + ["FP16"], ("explicit" if explicit else "none")
    if precision == "int8":
        return ["INT8", "FP16"] + [f for f in qflags if f != "INT8"], ("explicit" if explicit else "calibrate")
    return ["FP8", "FP16"], "fp8-qdq"


def keep_fp32_layer(layer_type: str, op: str | None = None) -> bool:
    """Whether a network layer stays FP32 in a reduced-precision engine (names as in trt.LayerType)."""
    if layer_type in FP32_LAYER_TYPES:
        return True
    return op is not None and op in FP32_LAYER_OPS.get(layer_type, ())


@dataclass
class EnginePlan:
    component: str
    onnx: str  # path of the ONNX file the engine is built from
    onnx_sha256: str
    flags: list[str]
    scales: str  # none | calibrate | explicit | fp8-qdq
    profiles: list[Profile]
    calibration: Profile | None
    workspace_bytes: int
    optimization_level: int
    fp32_layers: bool = True  # keep_fp32_layer constraints applied (weakly typed recipes only)
    key: str | None = None  # engine cache key (needs the device)
    typed: bool = False  # strongly typed network
    file_precision: str = "fp32"  # the component's precision in the manifest
    refused: str | None = None  # why this engine cannot be built on the planned TensorRT (None: it can)
    notes: list[str] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """What the engine depends on besides the ONNX file, device and TensorRT version."""
        return {"flags": sorted(self.flags), "scales": self.scales, "profiles": [p.to_dict() for p in self.profiles],
                "calibration": self.calibration.to_dict() if self.calibration else None,
                "workspace_bytes": self.workspace_bytes, "optimization_level": self.optimization_level,
                "fp32_layers": self.fp32_layers, "typed": self.typed}


def planned_trt_version(opts: TrtBuildOptions) -> tuple[str, str]:
    """(TensorRT release to plan for, where it came from): --target-trt, else the installed
    tensorrt, else DEFAULT_PLAN_TRT."""
    if opts.target_trt:
        return opts.target_trt, "--target-trt"
    installed = tensorrt_version()
    if installed:
        return installed, "installed"
    return DEFAULT_PLAN_TRT, "default (no tensorrt installed here; --target-trt to choose)"


def plan_engines(manifest: Manifest, opts: TrtBuildOptions, artifacts: str | Path | None = None,
                 trt_version: str | None = None) -> list[EnginePlan]:
    """One plan per component: profiles, precision flags, workspace, and — for TensorRT
    `trt_version` — whether TensorRT can build it (`refused`). No TensorRT needed."""
    opts.validate()
    version = trt_version or planned_trt_version(opts)[0]
    root = Path(artifacts if artifacts is not None else opts.artifacts)
    limits = resolve_limits(manifest, opts)
    names = list(opts.components) if opts.components else list(manifest.components)
    unknown = [n for n in names if n not in manifest.components]
    if unknown:
        raise InputError(f"--components {unknown} are not in the artifacts ({', '.join(manifest.components)})")
    recipe = ENGINE_RECIPES.get(opts.precision)
    try:
        check_recipe_version(opts.precision, version)
        recipe_refusal = None
    except InputError as exc:
        recipe_refusal = str(exc)
    plans = []
    for name in names:
        comp = manifest.components[name]
        path = root / comp.file.path
        kinds = qdq_kinds(path)
        flags, scales = component_precision(name, opts.precision, kinds)
        profiles = component_profiles(comp, limits)
        calib = calibration_profile(comp, limits) if scales == "calibrate" else None
        plan = EnginePlan(name, str(path), comp.file.sha256, flags, scales, profiles, calib,
                          int(opts.workspace_gb * (1 << 30)), opts.builder_optimization_level,
                          fp32_layers=not recipe.typed, typed=recipe.typed, file_precision=comp.precision)
        problems = [f"--precision {opts.precision} does not support TensorRT {version}"] if recipe_refusal else []
        if path.is_file():
            problems += trt_compat.graph_problems_file(path, version)
        else:
            problems.append(f"{path} is missing")
        if scales == "fp8-qdq" and kinds:
            problems.append(f"{name} already carries {'/'.join(sorted(kinds))} Q/DQ; build --precision fp8 from fp32 "
                            "artifacts")
        if recipe.typed and comp.precision == "fp32" and not kinds:
            plan.notes.append("strongly typed from an fp32 file: an FP32 (TF32) engine; `maven-edge quantize --recipe "
                              "fp16` (or int8-trt) first for reduced precision")
        if scales == "calibrate" and parse_trt_version(version) >= (10, 1, 0):
            plan.notes.append("implicit INT8 calibration is deprecated since TensorRT 10.1 (removed in 11); "
                              "`maven-edge quantize --recipe int8-trt` gives explicit Q/DQ scales instead")
        plan.refused = "; ".join(problems) if problems else None
        plans.append(plan)
    return plans


def engine_cache_key(manifest_sha256: str, plan: EnginePlan, device: dict[str, Any], trt_version: str,
                     calibration_digest: str | None = None) -> str:
    """sha256 over everything an engine depends on: manifest, file, GPU, TensorRT, settings."""
    payload = {"manifest_sha256": manifest_sha256, "component": plan.component, "onnx_sha256": plan.onnx_sha256,
               "gpu": device.get("name"), "compute_capability": device.get("compute_capability"),
               "tensorrt": trt_version, "settings": plan.settings(), "calibration": calibration_digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def timing_cache_name(device: dict[str, Any], trt_version: str) -> str:
    return f"timing-{_slug(str(device.get('name')))}-sm{_slug(str(device.get('compute_capability')))}-trt{_slug(trt_version)}.cache"


# ---- INT8 calibration cache (TensorRT's text format) ----------------------------------------------------


@dataclass
class CalibrationTable:
    """A TensorRT calibration cache: header ``TRT-<version>-<algorithm>``, then ``tensor: <hex>``
    lines where <hex> is the big-endian IEEE-754 float32 bit pattern of the tensor's scale
    (dynamic range / 127)."""

    version: str  # e.g. "100300" (TensorRT writes its integer version)
    algorithm: str  # EntropyCalibration2 | MinMaxCalibration | ...
    scales: dict[str, float] = field(default_factory=dict)

    def dynamic_range(self, tensor: str) -> float:
        return self.scales[tensor] * 127.0


def trt_version_tag(version: str) -> str:
    """The integer form TensorRT puts in calibration cache headers: '8.6.1' -> '8601' (8.x:
    major*1000 + minor*100 + patch), '10.3.0.26' -> '100300' (10.x: major*10000 + ...)."""
    return calibration_version_tag(version)


def format_calibration_cache(table: CalibrationTable) -> bytes:
    lines = [f"TRT-{table.version}-{table.algorithm}"]
    for name, scale in table.scales.items():
        if not name or ":" in name or "\n" in name:
            raise CalibrationError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache")
        lines.append(f"{name}: {struct.pack('>f', float(scale)).hex()}")
    return ("\n".join(lines) + "\n").encode()


def parse_calibration_cache(data: bytes) -> CalibrationTable:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CalibrationError("calibration cache is not ASCII text (not a TensorRT calibration cache)") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    m = re.fullmatch(r"TRT-(\d+)-(\w+)", lines[0].strip()) if lines else None
    if not m:
        raise CalibrationError("calibration cache has no 'TRT-<version>-<algorithm>' header")
    table = CalibrationTable(m.group(1), m.group(2))
    for ln in lines[1:]:
        name, sep, hexval = ln.rpartition(": ")
        if not sep or not re.fullmatch(r"[0-9a-fA-F]{8}", hexval.strip()):
            raise CalibrationError(f"bad calibration cache line {ln!r}")
        table.scales[name] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
    return table


def table_from_ranges(ranges: dict[str, tuple[float, float]], trt_version: str,
                      algorithm: str = "EntropyCalibration2") -> CalibrationTable:
    """A TensorRT calibration table from (min, max) activation ranges (e.g. onnxruntime's calibrator):
    symmetric int8, scale = max(|min|, |max|) / 127."""
    scales = {}
    for name, (lo, hi) in ranges.items():
        amax = max(abs(float(lo)), abs(float(hi)))
        scales[name] = (amax / 127.0) if amax > 0 else 1.0 / 127.0
    return CalibrationTable(trt_version_tag(trt_version), algorithm, scales)


def ort_calibration_table(onnx_path: str | Path, rows: Sequence[dict[str, Any]], trt_version: str,
                          algorithm: str = "entropy") -> CalibrationTable:
    """A TensorRT calibration table computed on the CPU with onnxruntime's calibrator over `rows`.

    The activations' names in an ONNX-parsed TensorRT network are the ONNX tensor names, so the
    ranges onnxruntime measures for every tensor apply directly; TensorRT then reads the cache
    instead of calibrating on the GPU (a Jetson without the calibration data can build INT8).
    """
    import tempfile

    import numpy as np
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator


    method = CalibrationMethod.Entropy if algorithm == "entropy" else CalibrationMethod.MinMax
    with tempfile.TemporaryDirectory(prefix="maven-calib-") as tmp, quiet_quantizer():
        cal = create_calibrator(str(onnx_path), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=method, extra_options={"symmetric": True})
        cal.collect_data(make_ort_reader(rows, Path(onnx_path).stem))
        data = cal.compute_data()
    ranges = {}
    for name, td in data.items():
        lo, hi = (td.range_value if hasattr(td, "range_value") else td)
        ranges[name] = (float(np.min(lo)), float(np.max(hi)))  # arrays of shape () or (1,)
    return table_from_ranges(ranges, trt_version, CALIB_ALGORITHMS[algorithm])


def calibration_cache_path(cache_dir: Path, manifest_sha256: str, component: str, calib_digest: str,
                           algorithm: str, trt_version: str) -> Path:
    """The INT8 calibration cache of one component, named for the TensorRT version whose header it
    carries (TensorRT ignores a cache whose header names another version)."""
    tag = calibration_version_tag(trt_version)
    return cache_dir / f"calib-{component}-{manifest_sha256[:12]}-{calib_digest[:12]}-{algorithm}-trt{tag}.cache"


# ---- building (needs TensorRT + a GPU) ----------------------------------------------------------------------


@dataclass
class EngineResult:
    component: str
    file: str
    flags: list[str]
    scales: str
    seconds: float
    cache_hit: bool
    size_bytes: int


@dataclass
class BuildResult:
    out: Path
    engines: list[EngineResult]
    device: dict[str, Any]
    tensorrt: str
    limits: Limits

    def table(self) -> str:
        rows = [f"TensorRT {self.tensorrt} on {self.device.get('name')} (sm {self.device.get('compute_capability')}); "
                f"max_images {self.limits.max_images}, max_seq {self.limits.max_seq}",
                f"{'component':<20} {'flags':<12} {'scales':<10} {'MB':>8} {'s':>7}  cache"]
        for e in self.engines:
            rows.append(f"{e.component:<20} {'+'.join(e.flags):<12} {e.scales:<10} {e.size_bytes / 1e6:8.1f} "
                        f"{e.seconds:7.1f}  {'hit' if e.cache_hit else 'built'}")
        return "\n".join(rows)


def discrete_head_layers(layers: Sequence[tuple[str, Sequence[str], Sequence[str]]]) -> set[int]:
    """Indices of the layers between a MatMul and a TopK (TensorRT's ArgMax) that it feeds, the
    MatMul included: the VQ codebook lookup and the selector's score head. They stay FP32, as the
    int8-static recipe keeps them fp32 in onnxruntime: reduced precision there flips codes and
    kept patches. `layers` are (trt.LayerType name, input tensor names, output tensor names)."""
    producer = {t: i for i, (_, _, outs) in enumerate(layers) for t in outs}
    pinned: set[int] = set()
    for ltype, ins, _ in layers:
        if ltype != "TOPK":
            continue
        path: set[int] = set()
        stack, seen, found = [producer[t] for t in ins if t in producer], set(), False
        while stack:
            j = stack.pop()
            if j in seen:
                continue
            seen.add(j)
            jtype, jins, _ = layers[j]
            if jtype == "CONSTANT":
                continue
            path.add(j)
            if jtype == "MATRIX_MULTIPLY":
                found = True
                continue  # stop at the first MatMul on each path
            stack.extend(producer[t] for t in jins if t in producer)
        if found:
            pinned |= path
    return pinned


def _apply_fp32_layers(trt: Any, network: Any) -> int:
    """Pin normalisation / reduction / softmax / pow / sqrt layers and the discrete heads
    (:func:`discrete_head_layers`) to FP32; returns how many layers were pinned."""
    casts = {"ELEMENTWISE": trt.IElementWiseLayer, "UNARY": trt.IUnaryLayer}
    all_layers = [network.get_layer(i) for i in range(network.num_layers)]
    graph = [(lay.type.name, [lay.get_input(k).name for k in range(lay.num_inputs) if lay.get_input(k) is not None],
              [lay.get_output(k).name for k in range(lay.num_outputs)]) for lay in all_layers]
    heads = discrete_head_layers(graph)
    pinned = 0
    for i, layer in enumerate(all_layers):
        ltype = layer.type.name
        op = None
        if ltype in casts:
            layer.__class__ = casts[ltype]  # the TensorRT Python API's way to reach the subclass
            op = layer.op.name
        floats = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in (trt.float32, trt.float16)]
        if floats and (i in heads or keep_fp32_layer(ltype, op)):  # integer / shape arithmetic is left alone
            layer.precision = trt.float32
            for j in floats:
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _make_calibrator(trt: Any, cuda: Any, rows: list[dict[str, Any]], cache_path: Path, algorithm: str) -> Any:
    import numpy as np

    base = trt.IInt8EntropyCalibrator2 if algorithm == "entropy" else trt.IInt8MinMaxCalibrator

    class Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.rows, self.i = rows, 0
            self.buffers: dict[str, int] = {}
            for name in rows[0]:
                self.buffers[name] = cuda.malloc(max(np.asarray(r[name]).nbytes for r in rows))

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: shapes come from the calibration profile

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.i >= len(self.rows):
                return None
            row = self.rows[self.i]
            self.i += 1
            for n in names:
                cuda.htod(self.buffers[n], np.ascontiguousarray(row[n]))
            return [int(self.buffers[n]) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            data = bytes(cache)
            parse_calibration_cache(data)  # refuse to store something TensorRT would not read back
            cache_path.write_bytes(data)

        def free(self) -> None:
            for ptr in self.buffers.values():
                cuda.free(ptr)

    return Calibrator()


def _fp8_onnx(plan: EnginePlan, rows: list[dict[str, Any]], work: Path) -> Path:
    """The vision-side ONNX with FP8 E4M3 Q/DQ from onnxruntime's calibrator (explicit quantization)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static


    dst = work / f"{plan.component}.fp8.onnx"
    exclude = discrete_sensitive_nodes(onnx.load(plan.onnx, load_external_data=False))
    with quiet_quantizer():
        quantize_static(plan.onnx, str(dst), make_ort_reader(rows, plan.component), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(WEIGHT_OPS), activation_type=QuantType.QFLOAT8E4M3FN,
                        weight_type=QuantType.QFLOAT8E4M3FN, calibrate_method=CalibrationMethod.Distribution,
                        nodes_to_exclude=exclude, extra_options={"scenario": "same"})
    return dst


def network_flags(trt: Any, typed: bool) -> int:
    """create_network flags: explicit batch on TensorRT 8.x (implicit batch is gone from 10.0),
    STRONGLY_TYPED for the typed recipe (TensorRT >= 10.0)."""
    major = parse_trt_version(str(trt.__version__))[0]
    if typed:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _parse_network(trt: Any, builder: Any, logger: Any, onnx_path: str, typed: bool = False) -> tuple[Any, Any]:
    network = builder.create_network(network_flags(trt, typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser rejected {Path(onnx_path).name}: {errors}")
    return network, parser


def _build_one(trt: Any, logger: Any, cuda: Any, plan: EnginePlan, onnx_path: str, timing: bytes,
               calibrator: Any) -> tuple[bytes, bytes]:
    builder = trt.Builder(logger)
    network, _parser = _parse_network(trt, builder, logger, onnx_path, plan.typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.optimization_level  # TensorRT >= 8.6 (the oldest supported)
    for flag in plan.flags:  # none for a strongly typed network
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if not plan.typed and plan.fp32_layers and _apply_fp32_layers(trt, network):
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    for p in plan.profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    if calibrator is not None:
        assert plan.calibration is not None
        cprof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in plan.calibration.shapes.items():
            cprof.set_shape(name, lo, opt, hi)
        config.set_calibration_profile(cprof)
        config.int8_calibrator = calibrator
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build the {plan.component} engine (see the TensorRT log above)")
    return bytes(serialized), bytes(cache.serialize())


def build_engines(opts: TrtBuildOptions, log: Callable[[str], None] | None = None) -> BuildResult:
    """Build (or fetch from the engine cache) one engine per component and write engines.json."""
    opts.validate()
    trt = import_tensorrt()  # BackendError here, before any work, on machines without TensorRT
    cuda = Cuda(opts.device_id)  # ... or without cuda-python / a GPU
    device = cuda.properties()
    trt_version = str(trt.__version__)
    src, out = Path(opts.artifacts), Path(opts.out)
    manifest = load_manifest(src, verify=True)
    manifest_sha = sha256_file(src / MANIFEST)
    try:
        check_recipe_version(opts.precision, trt_version)
    except InputError as exc:
        raise BackendError(str(exc)) from None
    plans = plan_engines(manifest, opts, src, trt_version)
    refused = [p for p in plans if p.refused]
    if refused:  # before any engine is built
        raise BackendError(f"TensorRT {trt_version} cannot build " + "; ".join(
            f"{p.component} ({p.refused})" for p in refused) + ". `maven-edge build-trt --dry-run` shows the plan")
    limits = resolve_limits(manifest, opts)
    if opts.precision == "fp8":
        cc = tuple(int(x) for x in device["compute_capability"].split("."))
        if cc < FP8_MIN_CC:
            raise BackendError(f"--precision fp8 needs compute capability >= 8.9 (Ada, Hopper); {device['name']} is "
                               f"{device['compute_capability']}: use --precision int8 or fp16")
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(opts.engine_cache) if opts.engine_cache else out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    timing_path = Path(opts.timing_cache) if opts.timing_cache else cache_dir / timing_cache_name(device, trt_version)
    timing = timing_path.read_bytes() if timing_path.is_file() else b""
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")

    feeds = None
    calib_digest = None
    if any(p.scales in ("calibrate", "fp8-qdq") for p in plans):
        cs = resolve_calibration_set(opts.calib_images, manifest, opts.calib_samples, opts.calib_split,
                                     opts.allow_upscale)
        feeds = ComponentFeeds(src, cs, manifest)
        calib_digest = cs.digest()

    results, entries = [], {}
    from tqdm import tqdm

    try:
        for plan in tqdm(plans, desc=f"build-trt {opts.precision}", unit="engine", disable=not opts.progress):
            t0 = time.perf_counter()
            comp = manifest.components[plan.component]
            uses_calib = plan.scales in ("calibrate", "fp8-qdq")
            calib_id = None
            if plan.scales == "calibrate":
                calib_id = f"{calib_digest}:{opts.calib_source}:{opts.calib_algorithm}"
            elif plan.scales == "fp8-qdq":
                calib_id = f"{calib_digest}:onnxruntime-fp8"
            plan.key = engine_cache_key(manifest_sha, plan, device, trt_version, calib_id)
            cached = cache_dir / f"{plan.component}-{plan.key[:20]}.engine"
            hit = cached.is_file() and not opts.force
            calib_cache = None
            if not hit:
                onnx_path, calibrator, rows = plan.onnx, None, None
                if uses_calib:
                    assert feeds is not None and calib_digest is not None
                    rows = list(FeedReader(feeds.feeds(plan.component), plan.component, single_images=True))
                if plan.scales == "fp8-qdq":
                    onnx_path = str(_fp8_onnx(plan, rows or [], cache_dir))
                elif plan.scales == "calibrate":
                    calib_cache = calibration_cache_path(cache_dir, manifest_sha, plan.component, calib_digest or "",
                                                         opts.calib_algorithm, trt_version)
                    if opts.calib_source == "onnxruntime" and not calib_cache.is_file():
                        table = ort_calibration_table(plan.onnx, rows or [], trt_version, opts.calib_algorithm)
                        calib_cache.write_bytes(format_calibration_cache(table))
                    calibrator = _make_calibrator(trt, cuda, rows or [], calib_cache, opts.calib_algorithm)
                try:
                    engine, timing = _build_one(trt, logger, cuda, plan, onnx_path, timing, calibrator)
                finally:
                    if calibrator is not None:
                        calibrator.free()
                tmp = cached.with_suffix(".tmp")
                tmp.write_bytes(engine)
                os.replace(tmp, cached)
                timing_path.write_bytes(timing)  # after every engine: a failed later build keeps the tuning
            target = out / f"{plan.component}.engine"
            target.unlink(missing_ok=True)
            try:
                os.link(cached, target)
            except OSError:
                shutil.copy2(cached, target)
            seconds = round(time.perf_counter() - t0, 2)
            entries[plan.component] = {
                "file": asdict(file_entry(out, target)), "key": plan.key, "flags": plan.flags, "scales": plan.scales,
                "profiles": [p.to_dict() for p in plan.profiles],
                "inputs": [asdict(t) for t in comp.inputs], "outputs": [asdict(t) for t in comp.outputs],
                "onnx_sha256": plan.onnx_sha256, "calibration_cache": str(calib_cache) if calib_cache else None,
                "build_seconds": seconds, "cache_hit": hit,
            }
            results.append(EngineResult(plan.component, target.name, plan.flags, plan.scales, seconds, hit,
                                        target.stat().st_size))
            if log:
                log(f"{plan.component}: {'cache hit' if hit else 'built'} in {seconds:.1f} s")
    finally:
        if feeds is not None:
            feeds.close()
    shutil.copy2(src / manifest.tokenizer.path, out / "tokenizer.json")
    index = {
        "format_version": ENGINES_FORMAT, "kind": "maven-edge tensorrt engines", "precision": opts.precision,
        "tensorrt": trt_version, "device": device, "limits": limits.to_dict(),
        "source": {"artifacts": str(src), "manifest_sha256": manifest_sha, "recipe": manifest.recipe},
        "manifest": manifest.to_dict(), "tokenizer": asdict(file_entry(out, out / "tokenizer.json")),
        "engines": entries, "timing_cache": str(timing_path), "dla": "not used (GPU engines only)",
    }
    (out / ENGINES_JSON).write_text(json.dumps(index, indent=2) + "\n")
    return BuildResult(out, results, device, trt_version, limits)


def plan_summary(plans: Sequence[EnginePlan], trt_version: str | None = None, source: str = "",
                 precision: str | None = None) -> str:
    """What a build would do (`build-trt --dry-run`): per engine, the ONNX file, the precision,
    the profiles, and whether it is refused and why."""
    rows = []
    if trt_version is not None:
        head = f"plan for TensorRT {trt_version}" + (f" ({source})" if source else "")
        if precision is not None:
            r = ENGINE_RECIPES.get(precision)
            head += f", --precision {precision}: {r.help} [{r.range_text()}]"
        rows.append(head)
        if precision is not None:
            try:
                check_recipe_version(precision, trt_version)
            except InputError as exc:
                rows.append(f"REFUSED for every engine: {exc}")
    for p in plans:
        how = ("strongly typed (precision from the file)" if p.typed else "weakly typed") + (
            f", flags {'+'.join(p.flags)}" if p.flags else "")
        state = f"REFUSED: {p.refused}" if p.refused else "would be built"
        rows.append(f"{p.component}: {state}")
        rows.append(f"  from {p.onnx} ({p.file_precision}); {how}; scales: {p.scales}")
        for prof in p.profiles:
            for name, (lo, opt, hi) in prof.shapes.items():
                rows.append(f"  [{prof.name}] {name}: min {list(lo)} opt {list(opt)} max {list(hi)}")
        if p.calibration is not None:
            rows.append(f"  [calibration] one image: {', '.join(f'{k} {list(v[0])}' for k, v in p.calibration.shapes.items())}")
        rows.extend(f"  note: {n}" for n in p.notes)
    built = sum(1 for p in plans if not p.refused)
    rows.append(f"{built} engine(s) would be built, {len(plans) - built} refused")
    return "\n".join(rows)
