"""Which ONNX graphs TensorRT's ONNX parser takes, per TensorRT release (like :mod:`.ort_compat`).

``trt_ops.json`` (written by ``tools/trt_op_table.py`` from onnx-tensorrt's ``docs/operators.md``
of each release branch) holds, per recorded release, the opset range, the supported operators
with their types, and the restrictions. :func:`graph_problems` applies it to one graph: the
opset (TensorRT 8.6 parses up to 17 and reads the opset-18 ``axes`` input of the reductions as
absent), ops without an importer (onnxruntime contrib ops of the genai decoder and of the
int4 / int8-dynamic recipes), constant-axes restrictions, and TensorRT's quantization rules
(symmetric Q/DQ only, the types its DequantizeLinear takes). :func:`max_opset` gives the opset
``maven-edge export --target-trt`` writes. torch-free; `onnx` is imported by the graph checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from maven_edge.core.errors import ExportError

OP_TABLE = Path(__file__).resolve().parent / "trt_ops.json"


def parse_trt_version(text: str) -> tuple[int, int, int]:
    """'10.3.0.26' -> (10, 3, 0); '8.6' -> (8, 6, 0)."""
    nums = [int(p) for p in re.findall(r"\d+", str(text))[:3]]
    if len(nums) < 2:
        raise ExportError(f"not a TensorRT version: {text!r} (expected e.g. 10.3 or 8.6.2)")
    return (nums[0], nums[1], nums[2] if len(nums) > 2 else 0)


# ---- the ONNX parser's operator table --------------------------------------------------------------


@cache
def op_tables() -> dict[str, Any]:
    return json.loads(OP_TABLE.read_text())["releases"]


def op_table_for(version: str) -> tuple[str, dict[str, Any], str | None]:
    """(recorded release, its table, a note) for TensorRT `version`: the newest recorded release
    at or below it. Releases above the newest recorded one use that one (the parser only gains ops)."""
    v = parse_trt_version(version)[:2]
    rows = sorted((parse_trt_version(r)[:2], r) for r in op_tables())
    below = [r for pv, r in rows if pv <= v]
    if not below:
        raise ExportError(f"TensorRT {version} is older than {rows[0][1]}, the oldest parser table recorded; "
                         "maven-edge supports TensorRT >= 8.6")
    release = below[-1]
    note = None
    if parse_trt_version(release)[:2] != v:
        note = f"TensorRT {v[0]}.{v[1]}'s parser table is not recorded; the {release} table applies (ops are only added)"
    return release, op_tables()[release], note


#: Reductions whose axes moved from an attribute to an input in opset 18.
AXES_INPUT_OPS = ("ReduceMean", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMin",
                  "ReduceProd", "ReduceSumSquare")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: Why a foreign op is in a graph, and what to do instead.
OP_HINTS = {
    "GroupQueryAttention": "the onnxruntime-genai decoder (export --decoder genai): re-export with --decoder torch",
    "SkipSimplifiedLayerNormalization": "the onnxruntime-genai decoder: re-export with --decoder torch",
    "SimplifiedLayerNormalization": "the onnxruntime-genai decoder: re-export with --decoder torch",
    "RotaryEmbedding": "the onnxruntime-genai decoder: re-export with --decoder torch",
    "MatMulNBits": "int4-weight quantization (an onnxruntime op): build from the fp32, fp16 or int8-trt artifacts",
    "DynamicQuantizeLinear": "int8-dynamic quantization: build from the fp32 or fp16 decoder",
    "MatMulInteger": "int8-dynamic quantization: build from the fp32 or fp16 decoder",
}


def _graphs(model: Any) -> Iterator[Any]:
    stack = [model.graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _nodes(model: Any) -> Iterator[Any]:
    for g in _graphs(model):
        yield from g.node
    for f in model.functions:
        yield from f.node


def _constants(model: Any) -> dict[str, Any]:
    """name -> numpy value of every initializer and Constant-node output (what the parser sees as weights)."""
    from onnx import numpy_helper

    out = {}
    for g in _graphs(model):
        for t in g.initializer:
            out[t.name] = t
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        out[n.output[0]] = a.t
    return {k: numpy_helper.to_array(v) if v.data_location != 1 else None for k, v in out.items()}


def qdq_types(model: Any) -> set[str]:
    """Element types of the quantized side of the Q/DQ nodes in `model` ("int8", "uint8",
    "float8_e4m3fn", "int32", ...), from their zero points, their constant inputs and
    QuantizeLinear's default (uint8 without a zero point or `output_dtype`)."""
    from onnx import TensorProto, helper

    types: dict[str, int] = {}
    for g in _graphs(model):
        for t in g.initializer:
            types[t.name] = t.data_type
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        types[n.output[0]] = a.t.data_type
    out: set[int] = set()
    for n in _nodes(model):
        if n.op_type not in QDQ_OPS:
            continue
        if len(n.input) > 2 and n.input[2] in types:
            out.add(types[n.input[2]])
        elif n.op_type == "DequantizeLinear" and n.input[0] in types:
            out.add(types[n.input[0]])
        elif n.op_type == "QuantizeLinear":
            dtype = next((a.i for a in n.attribute if a.name == "output_dtype" and a.i), TensorProto.UINT8)
            out.add(dtype)
    return {str(helper.tensor_dtype_to_np_dtype(t).name) for t in out}


def qdq_problems(model: Any, types: dict[str, list[str]]) -> list[str]:
    """TensorRT's quantization rules: zero points all 0 (symmetric), and only types its
    DequantizeLinear importer lists (`types`: the op table's types per op)."""
    import numpy as np

    consts = _constants(model)
    asym: list[str] = []
    for n in _nodes(model):
        if n.op_type not in QDQ_OPS or len(n.input) < 3 or not n.input[2]:
            continue
        zp = consts.get(n.input[2])
        if zp is None or np.any(np.asarray(zp).astype(np.float64) != 0):
            asym.append(n.name or n.output[0])
    problems = []
    if asym:
        problems.append(
            f"{len(asym)} Q/DQ node(s) with non-zero zero points (asymmetric quantization, e.g. {asym[0]}); TensorRT "
            "accepts only symmetric Q/DQ: quantize with `maven-edge quantize --recipe int8-trt`")
    allowed = {t.lower() for t in types.get("DequantizeLinear", [])}
    names = {"int8": "int8", "uint8": "uint8", "int32": "int32", "float8_e4m3fn": "fp8", "int4": "int4"}
    for t in sorted(qdq_types(model)):
        short = names.get(t, t)
        if short not in allowed:
            why = {"uint8": "activations must be int8 (S8S8), not uint8",
                   "int32": "quantized biases (int32 DequantizeLinear) are not imported"}.get(short, "")
            problems.append(f"{short} Q/DQ is not imported by this TensorRT's ONNX parser (it takes "
                            f"{', '.join(sorted(allowed)) or 'none'}){': ' + why if why else ''}; quantize with "
                            "`maven-edge quantize --recipe int8-trt`")
    return problems


def graph_problems(model: Any, version: str) -> list[str]:
    """Why TensorRT `version`'s ONNX parser would reject (or silently mis-read) `model`, up front."""
    release, table, _ = op_table_for(version)
    problems: list[str] = []
    imports = {op.domain or "ai.onnx": op.version for op in model.opset_import}
    lo, hi = table["opsets"]
    opset = imports.get("ai.onnx")
    if opset is not None and opset > hi:
        why = ""
        if hi < 18 <= opset:
            why = (" (its parser reads the opset-18 `axes` input of ReduceMean / ReduceSumSquare / ReduceL2 as "
                   "absent and reduces over every axis: RMSNorm and the VQ normalisation would be silently wrong)")
        problems.append(f"ai.onnx opset {opset} is newer than TensorRT {release}'s ONNX parser supports ({hi}){why}; "
                        f"re-export with `maven-edge export --target-trt {release}` (opset {hi})")
    local = {f.domain for f in model.functions}
    consts = _constants(model)
    seen: set[str] = set()
    for n in _nodes(model):
        domain = n.domain or "ai.onnx"
        key = f"{domain}::{n.op_type}"
        if key in seen:
            continue
        if domain in local:
            continue  # a model-local function: its body's nodes are checked
        if domain != "ai.onnx" or n.op_type not in table["types"]:
            seen.add(key)
            hint = OP_HINTS.get(n.op_type)
            problems.append(f"{key} has no TensorRT {release} importer" + (f" ({hint})" if hint else ""))
            continue
        if n.op_type in AXES_INPUT_OPS or n.op_type == "CumSum":
            if len(n.input) > 1 and n.input[1] and n.input[1] not in consts:
                seen.add(key)
                problems.append(f"{n.op_type} node {n.name!r} takes its axes from a computed tensor; TensorRT needs "
                                "them constant")
    problems += qdq_problems(model, table["types"])
    return problems


def graph_problems_file(path: str | Path, version: str) -> list[str]:
    import onnx

    return graph_problems(onnx.load(str(path), load_external_data=False), version)


def max_opset(version: str) -> int:
    """The newest ai.onnx opset TensorRT `version`'s parser supports (for `export --target-trt`)."""
    return op_table_for(version)[1]["opsets"][1]
