"""Which ONNX files an onnxruntime release loads, and how to make exported files fit one.

Edge devices often carry an older onnxruntime than the machine that exports (Jetson wheels for
JetPack 6 are 1.18 - 1.20). A release refuses a file whose IR version is newer than it knows
("Unsupported model IR version: 14, max supported IR version: 13") and a file that imports a
newer opset than it implements. Every exported file therefore names a *target* release and is
stamped with at most that release's IR version and opsets; an op that only exists in a newer
opset is refused at export time instead of failing on the device.

torch-free; `onnx` is imported only by the functions that edit or inspect a model.

    target = get_target("1.18")            # OrtTarget(max_opset=21, max_ir_version=10, ...)
    problems = compat_problems(model_proto, target)
    cap_model(model_proto, target)         # lowers ir_version / opset imports in place or raises
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from maven_edge.core.errors import ExportError

#: Domain names as they appear in opset imports.
AI_ONNX = ""
AI_ONNX_ML = "ai.onnx.ml"
MS_DOMAIN = "com.microsoft"

#: The oldest opset the exported files may use (docs/design.md §4: LayerNormalization needs 17).
MIN_OPSET = 17
#: The opset the torch dynamo exporter (torchlib) emits natively; other opsets go through a
#: version conversion, so this is the default whenever the target allows it.
NATIVE_EXPORT_OPSET = 18
#: Default target: an older, widely deployed release (Jetson JetPack 6 wheels are 1.18 - 1.20).
DEFAULT_TARGET = "1.18"


@dataclass(frozen=True)
class OrtTarget:
    """What one onnxruntime release loads."""

    release: str  # "1.18"
    onnx_release: str  # the onnx release it was built against
    max_opset: int  # ai.onnx
    max_ml_opset: int  # ai.onnx.ml
    max_ir_version: int
    contrib_opset: int = 1  # com.microsoft: version 1 in every release so far
    source: str = "onnxruntime docs/reference/compatibility.md"

    def max_domain_version(self, domain: str) -> int | None:
        """Highest version of `domain` this release loads; None for a domain it does not know."""
        return {
            AI_ONNX: self.max_opset,
            "ai.onnx": self.max_opset,
            AI_ONNX_ML: self.max_ml_opset,
            MS_DOMAIN: self.contrib_opset,
        }.get(domain)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DOCS = "onnxruntime docs/reference/compatibility.md"
_MEASURED = "measured here: loading probe models in onnxruntime 1.31.1"

#: release -> what it loads. Rows up to 1.20 are the onnxruntime compatibility table; 1.21 is
#: from its release notes (onnx 1.17); 1.31 was measured on this machine by loading probe files
#: (IR 13 loads, IR 14 is refused; opset 26 loads, 27 is refused). Releases between are left
#: out rather than guessed: use `--target-ort installed` on such a device to probe it.
ORT_TABLE: dict[str, OrtTarget] = {
    t.release: t
    for t in (
        OrtTarget("1.14", "1.13", 18, 3, 8, source=_DOCS),
        OrtTarget("1.15", "1.14", 19, 3, 8, source=_DOCS),
        OrtTarget("1.16", "1.14.1", 19, 3, 9, source=_DOCS),
        OrtTarget("1.17", "1.15", 20, 4, 9, source=_DOCS),
        OrtTarget("1.18", "1.16", 21, 4, 10, source=_DOCS),
        OrtTarget("1.19", "1.16.1", 21, 4, 10, source=_DOCS),
        OrtTarget("1.20", "1.16.1", 21, 4, 10, source=_DOCS),
        OrtTarget("1.21", "1.17", 22, 5, 10, source="onnxruntime 1.21 release notes (onnx 1.17)"),
        OrtTarget("1.31", "-", 26, 5, 13, source=_MEASURED),
    )
}

#: Tensor element types that need a newer IR version than 8 (onnx IR changelog).
_DTYPE_MIN_IR = {
    "FLOAT8E4M3FN": 9, "FLOAT8E4M3FNUZ": 9, "FLOAT8E5M2": 9, "FLOAT8E5M2FNUZ": 9,
    "UINT4": 10, "INT4": 10, "FLOAT4E2M1": 11, "FLOAT8E8M0": 12, "UINT2": 13, "INT2": 13,
}


def _release_key(release: str) -> str:
    parts = release.strip().lstrip("v").split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ExportError(
            f"unknown --target-ort {release!r}: give an onnxruntime release such as 1.18, or 'installed'; "
            f"known releases: {', '.join(ORT_TABLE)}"
        )
    return f"{int(parts[0])}.{int(parts[1])}"


def get_target(release: str | None = None) -> OrtTarget:
    """The target for `release` ("1.18", "1.18.1", "installed"); None means DEFAULT_TARGET."""
    release = DEFAULT_TARGET if release is None else str(release)
    if release == "installed":
        return installed_target()
    key = _release_key(release)
    if key in ORT_TABLE:
        return ORT_TABLE[key]
    try:
        import onnxruntime

        if _release_key(onnxruntime.__version__) == key:
            return installed_target()
    except ImportError:
        pass
    raise ExportError(
        f"unknown --target-ort {release!r}: this maven-edge knows {', '.join(ORT_TABLE)}. Pick the closest "
        "older release (files it loads also load in every newer one), or run the export where that "
        "onnxruntime is installed with --target-ort installed"
    )


def installed_target() -> OrtTarget:
    """The onnxruntime installed here, measured by loading tiny probe models (cached)."""
    global _INSTALLED
    if _INSTALLED is None:
        import onnxruntime

        key = _release_key(onnxruntime.__version__)
        max_ir = _probe_max(lambda v: _probe_loads(ir_version=v, opset=MIN_OPSET), 7, 20)
        max_opset = _probe_max(lambda v: _probe_loads(ir_version=min(max_ir, 8), opset=v), MIN_OPSET, 40)
        known = ORT_TABLE.get(key)
        _INSTALLED = OrtTarget(
            key, known.onnx_release if known else "?", max_opset,
            known.max_ml_opset if known else 3, max_ir, source=f"probed onnxruntime {onnxruntime.__version__}",
        )
    return _INSTALLED


_INSTALLED: OrtTarget | None = None


def _probe_max(loads, low: int, high: int) -> int:
    best = low
    for v in range(low, high + 1):
        if not loads(v):
            break
        best = v
    return best


def _probe_loads(ir_version: int, opset: int) -> bool:
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own Fail/InvalidGraph types
        return False
    return True


def min_ir_for_opset(opset: int) -> int:
    """Lowest IR version the onnx spec pairs with ai.onnx `opset` (onnx.helper.VERSION_TABLE)."""
    from onnx import helper

    candidates = [ir for _, ir, op, *_ in helper.VERSION_TABLE if op >= opset]
    return min(candidates) if candidates else helper.VERSION_TABLE[-1][1]


def resolve_opset(requested: int | None, target: OrtTarget) -> int:
    """The ai.onnx opset to export at: `requested`, else the exporter's native one, capped by the target."""
    if requested is None:
        return min(NATIVE_EXPORT_OPSET, target.max_opset)
    if requested < MIN_OPSET:
        raise ExportError(
            f"--opset {requested} is too old: the exported graphs use LayerNormalization and other ops "
            f"that need opset {MIN_OPSET}; use --opset {MIN_OPSET} or newer"
        )
    if requested > target.max_opset:
        raise ExportError(
            f"--opset {requested} is newer than onnxruntime {target.release} loads (opset {target.max_opset}); "
            f"use --opset {target.max_opset} or lower, or a newer --target-ort"
        )
    return requested


#: Ops onnxruntime registers itself in the ai.onnx domain (contrib kernels without an ONNX schema),
#: as the onnxruntime-genai model builder emits them.
ORT_ONNX_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def lowering_problems(nodes: Iterable[tuple[str, str, str]], imports: dict[str, int], target: OrtTarget) -> list[str]:
    """Ops that need a newer opset than the target loads: (domain, op_type, node name) triples.

    An opset import may be lowered to the target's cap only when every op of that domain resolves
    to the same schema at the cap (its `since_version` is not above it).
    """
    from onnx import defs

    problems = []
    for domain, op_type, name in nodes:
        domain = "" if domain == "ai.onnx" else domain
        cap = target.max_domain_version(domain)
        if domain not in (AI_ONNX, AI_ONNX_ML) or cap is None or (domain == AI_ONNX and op_type in ORT_ONNX_DOMAIN_OPS):
            continue
        version = imports.get(domain, imports.get("ai.onnx", cap)) if domain == AI_ONNX else imports.get(domain, cap)
        try:
            since = defs.get_schema(op_type, min(version, defs.onnx_opset_version()), domain).since_version
        except defs.SchemaError:
            problems.append(f"op {domain or 'ai.onnx'}::{op_type} has no schema at opset {version}")
            continue
        if since > cap:
            problems.append(f"op {op_type} (node {name!r}) needs {domain or 'ai.onnx'} opset {since} > {cap}")
    return sorted(set(problems))


def compat_problems(model: Any, target: OrtTarget) -> list[str]:
    """Why `model` (onnx.ModelProto, external data not needed) would not load in `target`."""
    from onnx import TensorProto

    imports = {op.domain: op.version for op in model.opset_import}
    problems = lowering_problems(((n.domain, n.op_type, n.name) for n in _all_nodes(model)), imports, target)
    for domain, version in imports.items():
        cap = target.max_domain_version(domain)
        if cap is None:
            # Model-local function domains are fine when every function is defined in the file.
            if any(f.domain == domain for f in model.functions):
                continue
            problems.append(f"opset domain {domain!r} is unknown to onnxruntime {target.release}")
        elif version > cap:
            problems.append(f"imports {domain or 'ai.onnx'} opset {version} > {cap}")
    if model.ir_version > target.max_ir_version:
        problems.append(f"IR version {model.ir_version} > {target.max_ir_version}")
    opset = imports.get(AI_ONNX, imports.get("ai.onnx"))
    if opset is not None and min_ir_for_opset(opset) > model.ir_version:
        problems.append(f"opset {opset} needs IR version {min_ir_for_opset(opset)} > {model.ir_version}")
    used = {TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    for name in used:
        need = _DTYPE_MIN_IR.get(name)
        if need and need > model.ir_version:
            problems.append(f"tensor type {name} needs IR {need} > {model.ir_version}")
    return sorted(set(problems))


def _all_nodes(model: Any):
    stack = [model.graph] + list(model.functions)
    while stack:
        g = stack.pop()
        for node in g.node:
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _refuse(problems: list[str], target: OrtTarget) -> None:
    if problems:
        raise ExportError(
            f"the exported graph does not fit onnxruntime {target.release}: " + "; ".join(problems)
            + ". Choose a newer --target-ort, or a lower --opset if the ops allow it"
        )


def _lower(imports: dict[str, int], ir_version: int, target: OrtTarget) -> tuple[dict[str, int], int]:
    lowered = {}
    for domain, version in imports.items():
        cap = target.max_domain_version(domain)
        lowered[domain] = cap if cap is not None and version > cap else version
    return lowered, min(ir_version, target.max_ir_version)


def cap_model(model: Any, target: OrtTarget) -> Any:
    """Stamp `model` (onnx.ModelProto) with at most the target's IR version and opsets, in place.

    Refuses (ExportError) when an op needs a newer opset than the target loads, or when the
    file's opset needs a newer IR version than the target knows.
    """
    imports = {op.domain: op.version for op in model.opset_import}
    _refuse(lowering_problems(((n.domain, n.op_type, n.name) for n in _all_nodes(model)), imports, target), target)
    lowered, model.ir_version = _lower(imports, model.ir_version, target)
    for op in model.opset_import:
        op.version = lowered[op.domain]
    _refuse(compat_problems(model, target), target)
    return model


def cap_ir_model(ir_model: Any, target: OrtTarget) -> Any:
    """:func:`cap_model` for an `onnx_ir.Model` (before saving); the saved file is checked again."""
    imports = dict(ir_model.opset_imports)
    nodes = ((n.domain, n.op_type, n.name or "") for n in ir_model.graph.all_nodes())
    _refuse(lowering_problems(nodes, imports, target), target)
    lowered, ir_model.ir_version = _lower(imports, ir_model.ir_version, target)
    for domain, version in lowered.items():
        ir_model.opset_imports[domain] = version
    return ir_model


def table_markdown() -> str:
    """The target table as Markdown (docs/usage/export.md shows it)."""
    rows = ["| onnxruntime | onnx | ai.onnx opset | ai.onnx.ml | com.microsoft | IR version | source |",
            "|---|---|---|---|---|---|---|"]
    for t in ORT_TABLE.values():
        rows.append(f"| {t.release} | {t.onnx_release} | {t.max_opset} | {t.max_ml_opset} | {t.contrib_opset} "
                    f"| {t.max_ir_version} | {t.source} |")
    return "\n".join(rows)
