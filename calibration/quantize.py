"""Reduced-precision artifacts: INT8 static (QDQ), INT8 dynamic, INT4 weight-only, FP16.

    from maven_edge.calibration.quantize import QuantizeOptions, quantize_artifacts
    result = quantize_artifacts("artifacts/tiny", "artifacts/tiny-int8", QuantizeOptions(recipe="int8-static"))
    result.manifest.components["vision_encoder"].precision   # "int8"

A recipe assigns a method to each component; components not named keep their fp32 file:

| recipe        | vision_encoder, discrete_tokenizer, patch_selector, projector | decoder      | embed_tokens |
|---------------|------------------------------------------------------------|--------------|--------------|
| int8-static   | int8 static QDQ (calibrated)                                | fp32         | fp32         |
| int8-trt      | int8 static QDQ, symmetric (TensorRT's explicit quantization) | fp32       | fp32         |
| int8-dynamic  | fp32                                                       | int8 dynamic | fp32         |
| int4-weight   | fp32                                                       | int4 MatMulNBits | fp32     |
| int8-int4     | int8 static QDQ                                            | int4 MatMulNBits | fp32     |
| fp16          | fp16                                                       | fp16         | fp16         |

``--component NAME=METHOD`` overrides any entry (methods: fp32, int8-static, int8-trt, int8-dynamic,
int4-weight, fp16), so components may mix precisions freely.

- **int8-static**: ``onnxruntime.quantization.quantize_static`` in QDQ format, weights int8
  per channel, activations int8 (S8S8, onnxruntime's recommended first choice), calibrated with
  MinMax, Entropy or Percentile on :mod:`maven_edge.calibration.readers` feeds. Only MatMul/Gemm/Conv are
  quantized, and a MatMul whose result reaches an ArgMax/TopK without another MatMul in between
  (the VQ codebook lookup, the selector's score head) stays fp32: int8 noise there flips
  discrete choices.
- **int8-trt**: the same calibration and node selection as int8-static, but what TensorRT's ONNX
  parser accepts: symmetric activations and weights (every zero point 0), int8 activations,
  per-channel weights (MatMul on the output-channel axis), biases left fp32 (no int32
  DequantizeLinear). ``build-trt`` refuses the asymmetric int8-static files up front.
- **int4-weight**: ``MatMulNBitsQuantizer`` (com.microsoft ``MatMulNBits``), block size and
  accuracy level configurable (accuracy level 4 = int8 compute on CPU, the fast path).
- **int8-dynamic**: ``quantize_dynamic`` of the MatMuls with constant weights (per channel).
- **fp16**: ``onnxruntime.transformers.float16`` (the onnxconverter-common converter) with
  float32 inputs/outputs kept, and the ops that need fp32 range kept fp32: the RMSNorm chain
  (Pow, ReduceMean, Sqrt, Reciprocal), Softmax, RoPE (Cos, Sin, Range), the VQ normalisation
  (ReduceL2) and ArgMax/TopK, plus the converter's own block list.

The output is a new artifact directory: the files, ``tokenizer.json`` and a ``manifest.json``
whose ``recipe`` names the recipe and whose components record their precision and, in
``extra.quantization``, the method, options and a parity check against fp32. The files are
kept loadable by the manifest's ``target_ort`` where the ops allow; otherwise the manifest's
``target_ort`` is raised to the oldest release that loads them, and the result says so.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.calibration.readers import (
    DEFAULT_SPLIT,
    CalibrationSet,
    ComponentFeeds,
    make_ort_reader,
    resolve_calibration_set,
)
from maven_edge.core.errors import ArtifactError, CalibrationError, ExportError, InputError
from maven_edge.core.manifest import (
    MANIFEST,
    Component,
    Manifest,
    TensorSpec,
    file_entry,
    load_manifest,
    sha256_file,
    staged_artifacts,
    write_manifest,
)
from maven_edge.core.registry import Registry

CALIB_METHODS = ("minmax", "entropy", "percentile")
VISION_SIDE = ("vision_encoder", "discrete_tokenizer", "patch_selector", "projector")
#: ops the fp16 recipe keeps in fp32 (on top of the converter's DEFAULT_OP_BLOCK_LIST)
FP16_KEEP_FP32_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "Cos", "Sin", "Range", "ReduceL2",
                      "ArgMax", "TopK", "CumSum")
#: ops that make a discrete choice: a MatMul feeding one of them stays fp32 in int8-static
DISCRETE_OPS = ("ArgMax", "ArgMin", "TopK")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
#: files larger than this are saved with external data (protobuf's 2 GiB cap, with margin)
EXTERNAL_DATA_BYTES = 1_800_000_000


def recipe_plan(recipe: str, components: Sequence[str], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """component -> method for `recipe` over the artifacts' `components`, with overrides."""
    r = QUANT_RECIPES.get(recipe)
    plan = {c: r.method_for(c) for c in components}
    for c, m in (overrides or {}).items():
        if c not in plan:
            raise InputError(f"--component {c}={m}: the artifacts have no component {c!r} (they have "
                             f"{', '.join(components)})")
        if m not in QUANT_METHODS:
            raise InputError(f"--component {c}={m}: unknown method; choose one of {', '.join(QUANT_METHODS)}")
        plan[c] = m
    if "embed_tokens" in plan and not QUANT_METHODS.get(plan["embed_tokens"]).table_lookup_ok:
        raise InputError("embed_tokens is a Gather (a table lookup): it can be fp32 or fp16, not "
                         f"{plan['embed_tokens']}")
    return plan


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--component {item!r} must look like NAME=METHOD (e.g. decoder=int8-dynamic)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@dataclass
class QuantizeOptions:
    """What `maven-edge quantize` can be told."""

    recipe: str = "int8-static"
    calib_method: str = "minmax"  # minmax | entropy | percentile (int8-static)
    calib_images: str | None = None  # folder of images / saved set / .npy; None: synthetic split
    calib_samples: int = 32
    calib_split: str = DEFAULT_SPLIT
    allow_upscale: bool = False  # accept calibration images smaller than the model input
    percentile: float = 99.999
    per_channel: bool = True
    activation_type: str = "int8"  # int8 (S8S8) | uint8 (U8S8)
    keep_discrete_fp32: bool = True  # MatMuls feeding ArgMax/TopK stay fp32 (int8-static)
    block_size: int = 32  # int4-weight, int8-weight (32: Q4_0 / Q8_0's block)
    accuracy_level: int | None = 4  # int4-weight: 0/None = fp32 compute, 4 = int8 compute (CPU fast path)
    symmetric: bool = True  # int4-weight
    quantize_lm_head: bool = True  # int4-weight / int8-dynamic: the vocabulary projection too
    components: dict[str, str] = field(default_factory=dict)  # overrides NAME -> METHOD
    calib_cache: str | None = None  # directory: reuse calibration ranges across runs
    force: bool = False  # overwrite --out when it holds other artifacts
    progress: bool = True
    check_samples: int = 4  # samples used for the parity check against fp32 (0 = skip)

    def validate(self) -> QuantizeOptions:
        QUANT_RECIPES.get(self.recipe)  # InputError for an unknown recipe
        if self.calib_method not in CALIB_METHODS:
            raise InputError(f"unknown calibration method {self.calib_method!r}; choose one of {', '.join(CALIB_METHODS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise InputError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.activation_type not in ("int8", "uint8"):
            raise InputError(f"--activation-type must be int8 or uint8, got {self.activation_type!r}")
        if not 90.0 <= self.percentile < 100.0:
            raise InputError(f"--percentile must be in [90, 100), got {self.percentile}")
        if self.calib_samples < 1:
            raise CalibrationError(f"the calibration set is empty: --calib-samples must be >= 1, got {self.calib_samples}")
        return self


@dataclass
class ComponentResult:
    name: str
    method: str
    precision: str
    fp32_bytes: int
    bytes: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.bytes / self.fp32_bytes if self.fp32_bytes else 1.0


@dataclass
class QuantizeResult:
    out: Path
    manifest: Manifest
    components: list[ComponentResult]
    calibration: dict[str, Any] | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "recipe": self.manifest.recipe, "seconds": round(self.seconds, 2),
                "calibration": self.calibration, "notes": self.notes, "target_ort": self.manifest.target_ort,
                "components": [asdict(c) | {"ratio": round(c.ratio, 4)} for c in self.components]}

    def table(self) -> str:
        rows = [f"{'component':<20} {'method':<13} {'fp32 MB':>9} {'MB':>9} {'ratio':>6}  parity"]
        for c in self.components:
            par = c.details.get("parity", {})
            ptxt = ", ".join(f"{k} {v:.3g}" for k, v in par.items()) if par else "-"
            rows.append(f"{c.name:<20} {c.method:<13} {c.fp32_bytes / 1e6:9.2f} {c.bytes / 1e6:9.2f} "
                        f"{c.ratio:6.2f}  {ptxt}")
        return "\n".join(rows)


# ---- graph helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs every node at INFO and prints calibration progress; keep it quiet."""
    loggers = [logging.getLogger(n) for n in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer",
                                              "onnxruntime.transformers")]
    root = logging.getLogger()
    old = [lg.level for lg in loggers] + [root.level]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    root.setLevel(max(root.level, logging.ERROR))  # "consider pre-processing" hints go to the root logger
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print() their progress
            yield
    finally:
        for lg, lvl in zip([*loggers, root], old, strict=True):
            lg.setLevel(lvl)


def discrete_sensitive_nodes(model: Any) -> list[str]:
    """Names of weight nodes (MatMul/Gemm/Conv) whose result reaches an ArgMax/ArgMin/TopK
    through non-weight ops only: quantizing them moves discrete decisions."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    out = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        seen, stack, hit = set(), list(node.output), False
        while stack and not hit:
            t = stack.pop()
            for c in consumers.get(t, []):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                if c.op_type in DISCRETE_OPS:
                    hit = True
                    break
                if c.op_type in WEIGHT_OPS:
                    continue
                stack.extend(c.output)
        if hit:
            out.append(node.name)
    return out


def lm_head_nodes(model: Any) -> list[str]:
    """MatMul nodes that produce the `logits` graph output (directly or through an Add)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out, stack, seen = [], ["logits"], set()
    while stack:
        t = stack.pop()
        n = producers.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type in ("MatMul", "Gemm"):
            out.append(n.name)
        elif n.op_type in ("Add", "Reshape", "Identity", "Cast"):
            stack.extend(n.input)
    return out


def _load(path: Path) -> Any:
    """The graph at `path` with its external data. onnx refuses external data read through a file
    with more than one hard link (its guard against hard-link attacks); artifact directories made
    by earlier versions hard-linked unchanged weights between recipes, so such a file is first
    given its own copy (same bytes, so the manifest's hashes still hold)."""
    import onnx
    from onnx.external_data_helper import (
        ExternalDataInfo,
        _get_all_tensors,
        load_external_data_for_model,
        uses_external_data,
    )

    model = onnx.load(str(path), load_external_data=False)
    for location in {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}:
        _unshare(path.parent / location)
    load_external_data_for_model(model, str(path.parent))
    return model


def _unshare(file: Path) -> None:
    """Give `file` an inode of its own when other hard links share it (copy, then atomic rename)."""
    if not file.is_file() or file.stat().st_nlink <= 1:
        return
    tmp = file.with_name(file.name + ".unshare")
    shutil.copy2(file, tmp)
    os.replace(tmp, file)


def _save(model: Any, path: Path) -> list[str]:
    """Save `model` to `path`; weights go to `<file>.data` when the file would exceed 1.8 GB."""
    import onnx

    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [data.name]
    onnx.save_model(model, str(path))
    return []


def _node_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# ---- one component, one method --------------------------------------------------------------------


#: Histogram settings of the entropy / percentile calibrators: 2048 bins, as TensorRT's entropy
#: calibrator (onnxruntime's quantize_static default of 128 bins makes entropy equal MinMax).
HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128


def calibrate_ranges(src: Path, reader: Any, method: str, percentile: float = 99.999) -> Any:
    """Activation ranges (onnxruntime ``TensorsData``) of the inputs/outputs of every weight op."""
    import tempfile

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    options: dict[str, Any] = {}
    if method == "minmax":
        cm = CalibrationMethod.MinMax
    elif method == "entropy":
        cm = CalibrationMethod.Entropy
        options.update(num_bins=HISTOGRAM_BINS, num_quantized_bins=QUANTIZED_BINS)
    else:
        cm = CalibrationMethod.Percentile
        options.update(num_bins=HISTOGRAM_BINS, percentile=percentile)
    with tempfile.TemporaryDirectory(prefix="maven-calib-") as tmp, quiet_quantizer():
        cal = create_calibrator(str(src), list(WEIGHT_OPS), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=cm, extra_options=options)
        if method == "minmax":
            # Fold ranges every 8 batches (bounded memory). onnxruntime's own max_intermediate_outputs
            # drops every full group without merging it (and raises when the count divides exactly),
            # so the reader is fed in chunks instead: each collect_data call merges its ranges.
            while cal.collect_data(_Chunk(reader, 8)) is None and not getattr(reader, "exhausted", True):
                pass
        else:
            cal.collect_data(reader)
        return cal.compute_data()


class _Chunk:
    """At most `n` batches of `reader` (a CalibrationDataReader); sets ``reader.exhausted`` at its end."""

    def __init__(self, reader: Any, n: int):
        self.reader, self.left = reader, n
        reader.exhausted = False

    def get_next(self) -> Any:
        if self.left == 0:
            return None
        self.left -= 1
        item = self.reader.get_next()
        if item is None:
            self.reader.exhausted = True
        return item


def _int8_static(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None) -> dict[str, Any]:
    return _int8_qdq(src, dst, opts, calib, tensorrt=False)


#: quantize_static options of the TensorRT-compatible recipe: TensorRT's ONNX parser takes only
#: symmetric Q/DQ (every zero point 0), int8 activations, and no int32 (quantized bias) DequantizeLinear;
#: MatMul weights per output channel (axis 1 of a [K, N] weight), as Conv's (axis 0).
TRT_QDQ_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}


def _int8_trt(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None) -> dict[str, Any]:
    return _int8_qdq(src, dst, opts, calib, tensorrt=True)


def _int8_qdq(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None,
              tensorrt: bool) -> dict[str, Any]:
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    model = _load(src)
    exclude = discrete_sensitive_nodes(model) if opts.keep_discrete_fp32 else []
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[opts.calib_method]
    act = QuantType.QInt8 if opts.activation_type == "int8" or tensorrt else QuantType.QUInt8
    per_channel = opts.per_channel or tensorrt
    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    del model
    assert calib is not None, "int8-static needs calibration inputs"
    with tempfile.TemporaryDirectory(prefix="maven-quant-") as tmp:
        ranges_path = calib.cache if calib.cache is not None else Path(tmp) / "ranges.json"
        cached = ranges_path.is_file()
        if not cached:  # our calibrator settings, handed to quantize_static as its calibration cache
            save_tensors_data(calibrate_ranges(src, calib.reader, opts.calib_method, opts.percentile), ranges_path)
        with quiet_quantizer():
            quantize_static(
                str(src), str(dst), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(WEIGHT_OPS),
                per_channel=per_channel, activation_type=act, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, calibrate_method=method, use_external_data_format=big,
                calibration_cache_path=str(ranges_path), extra_options=dict(TRT_QDQ_OPTIONS) if tensorrt else None,
            )
    extra = {"symmetric": True, "bias": "fp32 (not quantized)", "for": "TensorRT explicit quantization"} if tensorrt else {}
    return {"format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
            "activations": "int8" if tensorrt else opts.activation_type, **extra, "calibration": opts.calib_method,
            **({"percentile": opts.percentile} if opts.calib_method == "percentile" else {}),
            **({"histogram_bins": HISTOGRAM_BINS} if opts.calib_method != "minmax" else {}),
            "ranges_from_cache": cached, "ops": list(WEIGHT_OPS), "kept_fp32": exclude}


def _nbits_weight(bits: int, src: Path, dst: Path, opts: QuantizeOptions) -> dict[str, Any]:
    """Weight-only ``MatMulNBits`` (4 or 8 bits per weight, per block of ``opts.block_size``),
    fp32 activations; with accuracy level 4 the CPU kernel quantizes activations per block and runs
    int8 dot products."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _load(src)
    exclude = [] if opts.quantize_lm_head else lm_head_nodes(model)
    with quiet_quantizer():
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=opts.block_size, is_symmetric=opts.symmetric,
                                 accuracy_level=opts.accuracy_level, nodes_to_exclude=exclude,
                                 op_types_to_quantize=("MatMul",))
        q.process()
    out = q.model.model
    _save(out, dst)
    n = _node_counts(out).get("MatMulNBits", 0)
    if n == 0:
        raise ExportError(f"{src.name}: no MatMul with a constant weight was found to quantize to int{bits}")
    return {"op": "com.microsoft::MatMulNBits", "bits": bits, "block_size": opts.block_size,
            "symmetric": opts.symmetric, "accuracy_level": opts.accuracy_level, "quantized_matmuls": n,
            "kept_fp32": exclude}


def _int4_weight(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None) -> dict[str, Any]:
    return _nbits_weight(4, src, dst, opts)


def _int8_weight(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None) -> dict[str, Any]:
    """8-bit weight-only ``MatMulNBits``: int8 weights per block, as llama.cpp's Q8_0 at the default block of 32."""
    return _nbits_weight(8, src, dst, opts)


def _int8_dynamic(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _load(src)
    exclude = [] if opts.quantize_lm_head else lm_head_nodes(model)
    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    with quiet_quantizer():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=opts.per_channel,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=big,
                         extra_options={"MatMulConstBOnly": True})
    return {"weights": "int8 per-channel" if opts.per_channel else "int8 per-tensor",
            "activations": "int8, quantized at run time", "ops": ["MatMul"], "kept_fp32": exclude}


def _fp16(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _load(src)
    keep_nodes = discrete_sensitive_nodes(model)
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS))
    with quiet_quantizer():
        out = convert_float_to_float16(model, keep_io_types=True, op_block_list=block, node_block_list=keep_nodes)
    dedupe_nodes(out)
    _save(out, dst)
    return {"converter": "onnxruntime.transformers.float16 (onnxconverter-common)", "io": "float32 (kept)",
            "fp32_ops": list(FP16_KEEP_FP32_OPS), "fp32_nodes": keep_nodes}


def _attention_geometry(src: Path) -> tuple[int, int]:
    """(heads, width) of the transformer in `src`, from the config in the manifest beside it
    (vision_encoder: the ViT, discrete_tokenizer: its query transformer); (0, 0) = detect from the graph."""
    try:
        manifest = load_manifest(src.parent, verify=False)
        cfg = manifest.maven_config()
    except Exception:  # noqa: BLE001 - a file outside artifacts: let the optimizer detect them
        return 0, 0
    name = next((n for n, c in manifest.components.items() if Path(c.file.path).name == src.name), "")
    part = {"vision_encoder": cfg.vision, "discrete_tokenizer": cfg.discrete}.get(name)
    return (int(part.num_heads), int(part.hidden_size)) if part is not None else (0, 0)


def fuse_transformer(src: Path, dst: Path, num_heads: int = 0, hidden_size: int = 0) -> dict[str, Any]:
    """``onnxruntime.transformers.optimizer.optimize_model(model_type="clip")`` on one file: attention
    (-> com.microsoft Attention), SkipLayerNorm, QuickGelu/BiasGelu fusions. Returns the op counts
    the fusions added."""
    from onnxruntime.transformers.optimizer import optimize_model

    before = _node_counts(_load(src))
    opt_log = logging.getLogger("onnxruntime.transformers.optimizer")
    level = opt_log.level
    opt_log.setLevel(logging.ERROR)  # "model producer not matched": our files say maven-edge, not pytorch
    with quiet_quantizer():
        m = optimize_model(str(src), model_type="clip", num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
                           use_gpu=False)
    opt_log.setLevel(level)
    out = m.model
    if any(n.domain == "com.microsoft" for n in out.graph.node) and not any(
            o.domain == "com.microsoft" for o in out.opset_import):
        from onnx import helper

        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save(out, dst)
    after = _node_counts(out)
    fused = {op: n for op, n in after.items() if op not in before or n > before.get(op, 0)}
    return {"optimizer": "onnxruntime.transformers.optimizer (model_type clip, opt_level 0)",
            "num_heads": num_heads, "hidden_size": hidden_size, "fused_ops": fused,
            "nodes": [sum(before.values()), sum(after.values())]}


def _int8_fused_dynamic(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None) -> dict[str, Any]:
    """Transformer fusions (:func:`fuse_transformer`), then int8 dynamic quantization of the MatMuls
    with constant weights and of the fused Attention ops; a MatMul feeding ArgMax/TopK (the VQ
    lookup, the selector's score head) stays fp32 as in int8-static."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="maven-fuse-") as tmp:
        fused = Path(tmp) / src.name
        fusion = fuse_transformer(src, fused, *_attention_geometry(src))
        model = _load(fused)
        exclude = discrete_sensitive_nodes(model) if opts.keep_discrete_fp32 else []
        del model
        with quiet_quantizer():
            quantize_dynamic(str(fused), str(dst), op_types_to_quantize=["MatMul", "Attention"],
                             per_channel=opts.per_channel, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                             extra_options={"MatMulConstBOnly": True})
    return {"fusion": fusion, "weights": "int8 per-channel" if opts.per_channel else "int8 per-tensor",
            "activations": "int8, quantized at run time", "ops": ["MatMul", "Attention"], "kept_fp32": exclude}


def _int8_fused_static(src: Path, dst: Path, opts: QuantizeOptions, calib: CalibrationInput | None) -> dict[str, Any]:
    """Transformer fusions (:func:`fuse_transformer`), then int8 static QDQ as in int8-static."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="maven-fuse-") as tmp:
        fused = Path(tmp) / src.name
        fusion = fuse_transformer(src, fused, *_attention_geometry(src))
        details = _int8_static(fused, dst, opts, calib)
    return {"fusion": fusion, **details}


# ---- the tables: methods (what is done to one file) and recipes (a method per component) ----------


@dataclass(frozen=True)
class CalibrationInput:
    """What a calibrated method gets for one component: its feeds, and where its ranges are cached."""

    reader: Any  # an onnxruntime CalibrationDataReader
    cache: Path | None = None


@dataclass(frozen=True)
class QuantMethod:
    """One way to rewrite one ONNX file. `apply(src, dst, opts, calib)` returns the manifest's details."""

    precision: str  # what the manifest records for the component
    apply: Callable[[Path, Path, QuantizeOptions, CalibrationInput | None], dict[str, Any]] | None  # None: copy
    calibrated: bool = False  # needs calibration inputs (CalibrationInput)
    table_lookup_ok: bool = True  # may rewrite embed_tokens (a Gather)


QUANT_METHODS: Registry[QuantMethod] = Registry("quantization method")
QUANT_METHODS.add("fp32", QuantMethod("fp32", None))
QUANT_METHODS.add("int8-static", QuantMethod("int8", _int8_static, calibrated=True, table_lookup_ok=False))
QUANT_METHODS.add("int8-trt", QuantMethod("int8", _int8_trt, calibrated=True, table_lookup_ok=False))
QUANT_METHODS.add("int8-dynamic", QuantMethod("int8", _int8_dynamic, table_lookup_ok=False))
QUANT_METHODS.add("int4-weight", QuantMethod("int4", _int4_weight, table_lookup_ok=False))
QUANT_METHODS.add("fp16", QuantMethod("fp16", _fp16))
QUANT_METHODS.add("int8-weight", QuantMethod("int8", _int8_weight, table_lookup_ok=False))
QUANT_METHODS.add("int8-fused-dynamic", QuantMethod("int8", _int8_fused_dynamic, table_lookup_ok=False))
QUANT_METHODS.add("int8-fused-static", QuantMethod("int8", _int8_fused_static, calibrated=True, table_lookup_ok=False))


@dataclass(frozen=True)
class QuantRecipe:
    """A method for each group of components (vision side, decoder, embed_tokens)."""

    help: str
    vision: str = "fp32"  # vision_encoder, discrete_tokenizer, patch_selector, projector
    decoder: str = "fp32"
    embed: str = "fp32"  # embed_tokens
    vision_components: tuple[str, ...] = VISION_SIDE  # which vision-side components get `vision`

    def method_for(self, component: str) -> str:
        if component == "decoder":
            return self.decoder
        if component == "embed_tokens":
            return self.embed
        return self.vision if component in self.vision_components else "fp32"


QUANT_RECIPES: Registry[QuantRecipe] = Registry("quantization recipe")
QUANT_RECIPES.add("int8-static", QuantRecipe("vision side int8 static QDQ (calibrated)", vision="int8-static"))
QUANT_RECIPES.add("int8-trt", QuantRecipe("vision side int8 symmetric QDQ for TensorRT (zero points 0, per-channel "
                                          "weights, fp32 bias)", vision="int8-trt"))
QUANT_RECIPES.add("int8-dynamic", QuantRecipe("decoder int8 dynamic", decoder="int8-dynamic"))
QUANT_RECIPES.add("int4-weight", QuantRecipe("decoder int4 MatMulNBits", decoder="int4-weight"))
QUANT_RECIPES.add("int8-int4", QuantRecipe("vision side int8 static + decoder int4", vision="int8-static",
                                           decoder="int4-weight"))
QUANT_RECIPES.add("fp16", QuantRecipe("every component fp16", vision="fp16", decoder="fp16", embed="fp16"))
QUANT_RECIPES.add("int8-weight", QuantRecipe("decoder int8 MatMulNBits (8-bit weight-only)", decoder="int8-weight"))
#: the latency-optimised recipes (first answer on a CPU): the ViT and the discrete tokenizer fused + int8;
#: latency-int8's decoder is int8-dynamic, whose integer GEMM prefills 2.2-2.6x faster than the 8-bit
#: MatMulNBits (and faster than fp32) and decodes faster too (docs/benchmarks.md); latency-int4's is 4-bit
LATENCY_VISION = ("vision_encoder", "discrete_tokenizer")
QUANT_RECIPES.add("vision-int8", QuantRecipe("first-answer latency: ViT + discrete tokenizer fused and int8 dynamic, "
                                             "decoder fp32 (the fastest prefill on AVX2)", vision="int8-fused-dynamic",
                                             vision_components=LATENCY_VISION))
QUANT_RECIPES.add("latency-int8", QuantRecipe("first-answer latency: ViT + discrete tokenizer fused and int8 dynamic, "
                                              "decoder int8 dynamic (per-channel weights, activations quantized at "
                                              "run time; CPU)", vision="int8-fused-dynamic",
                                              decoder="int8-dynamic", vision_components=LATENCY_VISION))
QUANT_RECIPES.add("latency-int4", QuantRecipe("first-answer latency: ViT + discrete tokenizer fused and int8 dynamic, "
                                              "decoder int4 MatMulNBits", vision="int8-fused-dynamic",
                                              decoder="int4-weight", vision_components=LATENCY_VISION))


def dedupe_nodes(model: Any) -> int:
    """Remove repeated identical nodes (same op, inputs, outputs) and rename clashing node names.

    The fp16 converter inserts one ``X_cast_to_fp32`` Cast per blocked consumer of a tensor X,
    so a tensor read by two fp32 ops gets two identical Casts with the same output: an invalid
    graph. Returns the number of nodes removed.
    """
    seen: set[bytes] = set()
    keep, removed = [], 0
    for n in model.graph.node:
        key = n.SerializeToString(deterministic=True)
        if key in seen:
            removed += 1
            continue
        seen.add(key)
        keep.append(n)
    names: dict[str, int] = {}
    for n in keep:
        if n.name:
            count = names.get(n.name, 0)
            names[n.name] = count + 1
            if count:
                n.name = f"{n.name}_{count}"
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return removed


# ---- target compatibility ---------------------------------------------------------------------------


def fit_target(path: Path, release: str) -> tuple[str, list[str]]:
    """Stamp the file for onnxruntime `release` where possible; else the oldest release that loads it.

    Returns (release the file now fits, notes).
    """
    import onnx

    from maven_edge.export import ort_compat

    model = onnx.load(str(path), load_external_data=False)
    target = ort_compat.get_target(release)
    notes: list[str] = []
    if not ort_compat.compat_problems(model, target):
        return release, notes
    try:
        ort_compat.cap_model(model, target)
        onnx.save_model(model, str(path))  # external data (if any) is unchanged
        return release, notes
    except ExportError as exc:
        problems = str(exc)
    for rel, t in ort_compat.ORT_TABLE.items():
        if _release_tuple(rel) <= _release_tuple(release):
            continue
        if not ort_compat.compat_problems(model, t):
            notes.append(f"{path.name} needs onnxruntime >= {rel} (target {release}: {problems})")
            return rel, notes
    notes.append(f"{path.name} does not fit any known onnxruntime release table entry; it loads in the installed one")
    return "installed", notes


def _release_tuple(release: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in release.split(".")[:2])
    except ValueError:
        return (99, 99)


# ---- parity check -------------------------------------------------------------------------------------


def parity(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Per output: relative L2 error (floats) or mismatch rate (integers) of dst vs src on `feeds`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    a = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in a.get_outputs()]
    integer = {o.name for o in a.get_outputs() if "int" in o.type}
    num: dict[str, float] = dict.fromkeys(names, 0.0)
    den: dict[str, float] = dict.fromkeys(names, 0.0)
    for f in feeds:
        ra, rb = a.run(None, f), b.run(None, f)
        for n, x, y in zip(names, ra, rb, strict=True):
            if x.dtype.kind in "iu":
                num[n] += float(np.sum(x != y))
                den[n] += float(x.size)
            else:
                num[n] += float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2))
                den[n] += float(np.sum(x.astype(np.float64) ** 2))
    out = {}
    for n in names:
        if n.startswith("present."):
            continue
        kind = "mismatch" if n in integer else "rel_l2"
        value = num[n] / den[n] if den[n] else 0.0
        out[f"{n}.{kind}"] = float(value if kind == "mismatch" else np.sqrt(value))
    return out


def _random_feeds(comp: Component, cfg: Any, n: int = 2) -> list[dict[str, np.ndarray]]:
    """Shape-correct feeds for components without calibration inputs (decoder, embed_tokens)."""
    rng = np.random.default_rng(0)
    sizes = {"images": 1, "batch": 1, "seq": 8, "past": 4, "total": 12}
    feeds = []
    for _ in range(n):
        f: dict[str, np.ndarray] = {}
        for t in comp.inputs:
            shape = [d if isinstance(d, int) else sizes.get(d, 1) for d in t.shape]
            if t.name == "input_ids":
                f[t.name] = rng.integers(0, cfg.vocab_size, shape, dtype=np.int64)
            elif t.name == "attention_mask":
                f[t.name] = np.ones(shape, np.int64)
            elif t.name == "position_ids":
                f[t.name] = np.broadcast_to(np.arange(sizes["past"], sizes["total"], dtype=np.int64), shape).copy()
            else:
                f[t.name] = rng.standard_normal(shape).astype(t.dtype) * (0.5 if "past" in t.name else 1.0)
        feeds.append(f)
    return feeds


# ---- the whole artifact directory -----------------------------------------------------------------------


def _prepare_out(src: Path, out: Path, force: bool) -> None:
    if out.resolve() == src.resolve():
        raise InputError("--out must be a new directory, not the fp32 --artifacts directory")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise InputError(f"--out {out} is not empty; pass --force to replace its contents, or choose another --out")


def _link_or_copy(src: Path, dst: Path, external_data: bool = False) -> None:
    """An unchanged component's file in the output: a hard link where possible, but external data is
    always copied, since onnx refuses to load external data through a file with several hard links
    (quantizing either directory later would fail)."""
    dst.unlink(missing_ok=True)
    if not external_data:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def quantize_artifacts(
    artifacts: str | Path, out: str | Path, options: QuantizeOptions | None = None,
    calibration: CalibrationSet | None = None, log: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize the fp32 artifacts in `artifacts` with `options.recipe` into the new directory `out`."""
    opts = (options or QuantizeOptions()).validate()
    t0 = time.perf_counter()
    src, out = Path(artifacts), Path(out)
    manifest = load_manifest(src, verify=True)
    if manifest.recipe != "fp32":
        raise ArtifactError(
            f"{src} already holds quantized artifacts (recipe {manifest.recipe!r}); quantize the fp32 export instead"
        )
    not_fp32 = [c.name for c in manifest.components.values() if c.precision != "fp32"]
    if not_fp32:
        raise ArtifactError(f"{src}: components {not_fp32} are not fp32; quantize the fp32 export instead")
    plan = recipe_plan(opts.recipe, list(manifest.components), opts.components)
    _prepare_out(src, out, opts.force)
    cfg = manifest.maven_config()
    manifest_sha = sha256_file(src / MANIFEST)

    # Calibration inputs: only for the components that need them (and for the parity check).
    static = [c for c, m in plan.items() if QUANT_METHODS.get(m).calibrated]
    feeds_src: ComponentFeeds | None = None
    calib_info: dict[str, Any] | None = None
    if static:
        cs = calibration if calibration is not None else resolve_calibration_set(
            opts.calib_images, manifest, opts.calib_samples, opts.calib_split, opts.allow_upscale)
        feeds_src = ComponentFeeds(src, cs, manifest)
        calib_info = cs.describe() | {"method": opts.calib_method}
        if log:
            log(f"calibration: {cs.num_samples} samples, {cs.num_images} images from {cs.source}")

    results: list[ComponentResult] = []
    notes: list[str] = []
    new_components: dict[str, Component] = {}
    target = manifest.target_ort

    def clear_previous(staging: Path) -> None:  # --force: the previous contents, never the staging folder
        for item in out.iterdir():
            if item == staging:
                continue
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()

    try:
        with staged_artifacts(out, clear_previous) as staging:
            from tqdm import tqdm

            todo = list(manifest.components.items())
            bar = tqdm(todo, desc=f"quantize {opts.recipe}", unit="file", disable=not opts.progress)
            for name, comp in bar:
                bar.set_postfix_str(name)
                method = plan[name]
                t1 = time.perf_counter()
                src_path = src / comp.file.path
                dst_path = staging / comp.file.path
                dst_path.parent.mkdir(parents=True, exist_ok=True)
                details: dict[str, Any] = {"method": method}
                spec = QUANT_METHODS.get(method)
                if spec.apply is None:
                    _link_or_copy(src_path, dst_path)
                    for e in comp.external_data:
                        _link_or_copy(src / e.path, staging / e.path, external_data=True)
                else:
                    calib = None
                    if spec.calibrated:
                        assert feeds_src is not None
                        cache = None
                        if opts.calib_cache:
                            Path(opts.calib_cache).mkdir(parents=True, exist_ok=True)
                            key = f"{name}-{comp.file.sha256[:12]}-{feeds_src.cs.digest()[:12]}-{opts.calib_method}"
                            cache = Path(opts.calib_cache) / f"{key}.json"
                            details["calibration_cache"] = str(cache)
                        calib = CalibrationInput(make_ort_reader(feeds_src.feeds(name), name), cache)
                    details.update(spec.apply(src_path, dst_path, opts, calib))
                    release, n = fit_target(dst_path, manifest.target_ort)
                    notes.extend(n)
                    if release != manifest.target_ort:
                        details["target_ort"] = release
                        if release == "installed" or _release_tuple(release) > _release_tuple(target):
                            target = release
                    if opts.check_samples:
                        check = (feeds_src.feeds(name)[: opts.check_samples]
                                 if feeds_src is not None and name in static else None)
                        if check is None:
                            check = _component_check_feeds(name, comp, cfg, feeds_src, opts.check_samples)
                        details["parity"] = parity(src_path, dst_path, check)
                new_components[name] = _component_entry(comp, staging, dst_path, spec.precision, details)
                size = new_components[name].file.size_bytes + sum(e.size_bytes for e in new_components[name].external_data)
                fp32_size = comp.file.size_bytes + sum(e.size_bytes for e in comp.external_data)
                results.append(ComponentResult(name, method, spec.precision, fp32_size, size,
                                               round(time.perf_counter() - t1, 2), details))
                if log:
                    log(f"{name}: {method}, {fp32_size / 1e6:.2f} MB -> {size / 1e6:.2f} MB")
            shutil.copy2(src / manifest.tokenizer.path, staging / manifest.tokenizer.path)
    finally:
        if feeds_src is not None:
            feeds_src.close()
    new = copy.deepcopy(manifest)
    new.components = {}
    for name, comp in new_components.items():
        comp.file = file_entry(out, out / comp.file.path)
        comp.external_data = [file_entry(out, out / e.path) for e in comp.external_data]
        new.components[name] = comp
    new.tokenizer = file_entry(out, out / manifest.tokenizer.path)
    new.recipe = opts.recipe
    new.target_ort = target
    import onnxruntime

    new.exporter = dict(manifest.exporter) | {"quantizer": f"onnxruntime.quantization {onnxruntime.__version__}"}
    new.extra = dict(manifest.extra)
    new.extra["quantization"] = {
        "recipe": opts.recipe,
        "plan": plan,
        "options": _recorded_options(opts),
        "calibration": calib_info,
        "source": {"artifacts": str(src), "manifest_sha256": manifest_sha, "target_ort": manifest.target_ort,
                   "model_fingerprint": manifest.extra.get("model_fingerprint")},
        "notes": notes,
    }
    write_manifest(new, out)
    load_manifest(out, verify=True)
    return QuantizeResult(out, new, results, calib_info, time.perf_counter() - t0, notes)


def _recorded_options(opts: QuantizeOptions) -> dict[str, Any]:
    """The options a quantized set's manifest records (all but how the run reports and overwrites)."""
    return json.loads(json.dumps({k: v for k, v in asdict(opts).items() if k not in ("progress", "force")},
                                 default=str))


def made_by(out: str | Path, recipe: str, source_manifest_sha256: str, options: QuantizeOptions | None = None) -> bool:
    """Whether `out` holds a quantized set made from the fp32 manifest with that sha256 by `recipe` as the
    recipe is now (the same method per component) and, when `options` are given, with those options.

    The one check for "reuse this set or remake it" (the benchmark's quantized sets and
    ``quantize-report --reuse``): a set made before a recipe changed is remade, never reused."""
    try:
        m = load_manifest(Path(out), verify=False)  # (sizes and schema; the pipeline verifies hashes on load)
    except ArtifactError:
        return False
    made = m.extra.get("quantization", {})
    if m.recipe != recipe or made.get("source", {}).get("manifest_sha256") != source_manifest_sha256:
        return False
    try:
        if made.get("plan") != recipe_plan(recipe, list(m.components)):
            return False
    except InputError:
        return False
    return options is None or made.get("options") == _recorded_options(options)


def _component_check_feeds(name: str, comp: Component, cfg: Any, feeds_src: ComponentFeeds | None,
                           n: int) -> list[dict[str, np.ndarray]]:
    if feeds_src is not None:
        try:
            return feeds_src.feeds(name)[:n]
        except CalibrationError:
            pass
    return _random_feeds(comp, cfg, n)


def _component_entry(old: Component, root: Path, path: Path, precision: str, details: dict[str, Any]) -> Component:
    """The manifest entry of a rewritten file: same contract, new file, precision and opsets."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    data = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    comp = copy.deepcopy(old)
    comp.file = file_entry(root, path)
    comp.external_data = [file_entry(root, path.parent / d) for d in data]
    comp.precision = precision
    comp.opsets = {op.domain: op.version for op in model.opset_import}
    comp.ir_version = model.ir_version
    dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
              for v in [*model.graph.input, *model.graph.output]}
    comp.inputs = [TensorSpec(t.name, dtypes.get(t.name, t.dtype), t.shape) for t in old.inputs]
    comp.outputs = [TensorSpec(t.name, dtypes.get(t.name, t.dtype), t.shape) for t in old.outputs]
    comp.extra = dict(old.extra) | {"quantization": json.loads(json.dumps(details, default=str))}
    return comp
