"""Graph hygiene for exported ONNX files: checks, optimization, clean-up and a size/op report.

torch-free (``onnx``, ``onnx_ir`` and ``onnxscript`` are imported inside the functions that
need them, so a device with only onnxruntime can still import this module).

    check_graph(path)                       # onnx.checker full_check (strict shape inference)
    check_external_data(path, root, allowed)  # every external-data location stays inside root
    remove_unused_initializers(ir_model)    # drop initializers no node reads
    optimize_model(ir_model, "onnxscript")  # constant folding, CSE, rewrite rules
    report(path) -> GraphReport             # size, node count, op histogram, parameters
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maven_edge.core.errors import ArtifactError, ExportError
from maven_edge.core.manifest import resolve_inside

#: Optimizers `--optimize` accepts. `onnxscript` ships with the project's dependencies;
#: `onnxslim` is used only when that package is installed (pip install onnxslim).
OPTIMIZERS = ("onnxscript", "onnxslim")


@dataclass
class GraphReport:
    """What one exported file holds."""

    file: str
    size_bytes: int  # the .onnx file itself
    external_data_bytes: int  # all external data files it references
    node_count: int
    op_histogram: dict[str, int]  # "domain::Op" (ai.onnx without prefix) -> count, most common first
    initializer_count: int
    parameter_count: int  # elements in all initializers
    unused_initializers: list[str] = field(default_factory=list)
    ir_version: int = 0
    opsets: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.size_bytes + self.external_data_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def check_graph(path: str | Path) -> None:
    """`onnx.checker.check_model(full_check=True)` on the file (works beyond 2 GB: it reads by path)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{Path(path).name} fails the ONNX checker (full check): {exc}") from exc


def load_structure(path: str | Path) -> Any:
    """The file's ModelProto without its external data (cheap even for multi-GB models)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def external_locations(model: Any) -> list[str]:
    """Distinct external-data locations the initializers of `model` (a ModelProto) reference."""
    from onnx import TensorProto

    seen: list[str] = []
    for tensor in _all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if loc is not None and loc not in seen:
                seen.append(loc)
    return seen


def _all_tensors(model: Any):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def check_external_data(path: str | Path, root: str | Path, allowed: set[str] | None = None) -> list[str]:
    """Refuse external-data locations that escape `root` or are not in `allowed`; return them.

    This is where an artifact's ONNX files are checked before onnxruntime opens them: the manifest
    check (:func:`maven_edge.core.manifest.load_manifest`) covers the files the manifest lists, this one the
    locations written *inside* each .onnx file, which a tampered file could point anywhere.
    """
    locations = external_locations(load_structure(path))
    root = Path(root)
    for loc in locations:
        resolve_inside(root, loc)  # ArtifactError when it escapes
        if allowed is not None and loc not in allowed:
            raise ArtifactError(
                f"{Path(path).name} references external data {loc!r} that manifest.json does not list; "
                "the artifact was modified: re-export it"
            )
    return locations


def unused_initializers(model: Any) -> list[str]:
    """Initializers of the main graph that no node, subgraph or graph output reads (ModelProto)."""
    used: set[str] = {o.name for o in model.graph.output}
    stack = [model.graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            used.update(node.input)
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return [t.name for t in model.graph.initializer if t.name not in used]


def remove_unused_initializers(ir_model: Any) -> int:
    """Drop unused nodes and initializers from an `onnx_ir.Model`; return how many initializers went."""
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

    before = len(ir_model.graph.initializers)
    RemoveUnusedNodesPass()(ir_model)
    RemoveUnusedFunctionsPass()(ir_model)
    RemoveUnusedOpsetsPass()(ir_model)
    graph_inputs = {v.name for v in ir_model.graph.inputs}
    for name in [n for n, v in ir_model.graph.initializers.items() if not v.uses() and n not in graph_inputs
                 and not v.is_graph_output()]:
        ir_model.graph.initializers.pop(name)
    return before - len(ir_model.graph.initializers)


def optimize_model(ir_model: Any, tool: str = "onnxscript") -> Any:
    """Simplify an `onnx_ir.Model`: constant folding, common subexpressions, rewrite rules.

    The result is only kept after it has been checked against the plain export (see
    :mod:`maven_edge.export.onnx_export`); every transformation here keeps standard ai.onnx ops only.
    """
    if tool not in OPTIMIZERS:
        raise ExportError(f"unknown optimizer {tool!r}; choose one of {', '.join(OPTIMIZERS)}")
    if tool == "onnxslim":
        try:
            import onnxslim
        except ImportError as exc:
            raise ExportError("--optimize onnxslim needs the onnxslim package: pip install onnxslim") from exc
        import onnx_ir

        proto = onnx_ir.serde.serialize_model(ir_model)
        return onnx_ir.serde.deserialize_model(onnxslim.slim(proto))
    import onnxscript.optimizer
    import onnxscript.rewriter
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, IdentityEliminationPass

    onnxscript.optimizer.optimize_ir(ir_model)
    onnxscript.rewriter.rewrite(ir_model)
    CommonSubexpressionEliminationPass()(ir_model)
    IdentityEliminationPass()(ir_model)
    onnxscript.optimizer.optimize_ir(ir_model)
    remove_unused_initializers(ir_model)
    return ir_model


def report(path: str | Path) -> GraphReport:
    """Size, node count, op histogram and parameter count of one .onnx file."""
    import numpy as np

    path = Path(path)
    model = load_structure(path)
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                  for n in model.graph.node)
    ext_bytes = 0
    for loc in external_locations(model):
        target = path.parent / loc
        ext_bytes += target.stat().st_size if target.is_file() else 0
    params = sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in model.graph.initializer)
    return GraphReport(
        file=path.name,
        size_bytes=path.stat().st_size,
        external_data_bytes=ext_bytes,
        node_count=len(model.graph.node),
        op_histogram=dict(ops.most_common()),
        initializer_count=len(model.graph.initializer),
        parameter_count=params,
        unused_initializers=unused_initializers(model),
        ir_version=model.ir_version,
        opsets={op.domain or "ai.onnx": op.version for op in model.opset_import},
    )


def format_reports(reports: list[GraphReport]) -> str:
    """A fixed-width table of reports: file, MB, nodes, parameters, top ops."""
    lines = [f"{'file':<26} {'MB':>9} {'ext MB':>9} {'nodes':>6} {'params':>13}  top ops"]
    for r in reports:
        top = ", ".join(f"{k}×{v}" for k, v in list(r.op_histogram.items())[:6])
        lines.append(f"{r.file:<26} {r.size_bytes / 1e6:>9.2f} {r.external_data_bytes / 1e6:>9.2f} "
                     f"{r.node_count:>6} {r.parameter_count:>13,}  {top}")
    return "\n".join(lines)


#: Concrete sizes for the symbolic axes when a file is run on made-up inputs.
EXAMPLE_AXES = {"images": 2, "batch": 2, "seq": 3, "past": 4, "total": 7}


def example_feeds(inputs: list[Any], vocab_size: int, axes: dict[str, int] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Seeded inputs for a component from its TensorSpecs (manifest), consistent across inputs.

    `input_ids` are drawn from the vocabulary, `attention_mask` is all ones over `total`,
    `position_ids` continue after `past`; float inputs are standard normal.
    """
    import numpy as np

    axes = {**EXAMPLE_AXES, **(axes or {})}
    axes["total"] = axes["past"] + axes["seq"]
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in inputs:
        shape = [axes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "input_ids":
            feeds[t.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif t.name == "attention_mask":
            feeds[t.name] = np.ones(shape, dtype=np.int64)
        elif t.name == "position_ids":
            feeds[t.name] = np.broadcast_to(np.arange(axes["past"], axes["past"] + shape[1], dtype=np.int64),
                                            shape).copy()
        elif np.dtype(t.dtype).kind == "f":
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
        else:
            raise ExportError(f"no example values for input {t.name} of dtype {t.dtype}")
    return feeds
