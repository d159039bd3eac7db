"""Per-component ONNX export of a MavenModel, as docs/design.md §4 specifies, plus `manifest.json`.

    from maven_edge.export.onnx_export import ExportOptions, export_model
    result = export_model(model, ExportOptions(out="artifacts/tiny-onnx"))
    result.manifest, result.reports, result.seconds

Files (names, inputs, outputs and symbolic axes in :func:`component_specs`):

    vision_encoder.onnx      pixel_values -> patch_features
    discrete_tokenizer.onnx  patch_features -> visual_codes (offset into the unified vocab)
    embed_tokens.onnx        input_ids -> inputs_embeds
    patch_selector.onnx      patch_features, h_eos -> scores, selected_embeds, selected_indices
    projector.onnx           patch_features -> projected_embeds (all N patches: `continuous` mode)
    decoder.onnx             inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value
                             -> logits, hidden_states, present.{i}.key/value

Every component goes through the torch dynamo exporter (``torch.onnx.export(dynamo=True)``), which
handles all of them here, including the empty-past first decoder step, so the legacy TorchScript
exporter is not used. Each file is then cleaned (unused initializers), optionally optimized,
stamped for the target onnxruntime release (:mod:`maven_edge.export.ort_compat`), saved (weights above
`external_data_threshold` bytes go to ``<file>.data`` beside it), checked with the ONNX checker
(full check), loaded in onnxruntime and run once against torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maven_edge.core.errors import ArtifactError, ExportError
from maven_edge.core.host_contract import host_section
from maven_edge.core.manifest import (
    MANIFEST,
    Component,
    FileEntry,
    Manifest,
    TensorSpec,
    file_entry,
    load_manifest,
    resolve_inside,
    staged_artifacts,
    write_manifest,
)
from maven_edge.export import graph_tools, ort_compat
from maven_edge.model_src.modeling.maven import MavenModel
from maven_edge.model_src.modeling.selector import gather_patches, select_patches

#: Weights per file above this many bytes go to external data (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
#: Order of export (and of the progress bar). `projector` is the continuous-mode extra.
COMPONENT_ORDER = ("vision_encoder", "discrete_tokenizer", "embed_tokens", "patch_selector", "projector",
                   "decoder")
#: Tolerance the optimized graph must keep against the plain one.
OPTIMIZE_ATOL = 1e-4


class _NoTorchvisionNotice(logging.Filter):
    """torch.onnx's exporter logs "torchvision is not installed. Skipping torchvision::nms" (and 23
    more ops) on every export when torchvision is absent. maven-edge exports no torchvision op, so
    the notice says nothing about our export: it is dropped (only it; other records pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


TORCH_ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
logging.getLogger(TORCH_ONNX_REGISTRATION_LOGGER).addFilter(_NoTorchvisionNotice())


@dataclass
class ExportOptions:
    """Everything `maven-edge export` can be told besides the model."""

    out: str | Path
    opset: int | None = None  # ai.onnx opset; default: the exporter's native 18, capped by the target
    target_ort: str = ort_compat.DEFAULT_TARGET  # oldest onnxruntime release the files must load in
    optimize: str | None = None  # None, "onnxscript" or "onnxslim"
    force: bool = False  # overwrite an output directory that holds another model's export
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD  # bytes of weights per file
    check_load: bool = True  # open every file in onnxruntime and run it once against torch
    progress: bool = True  # tqdm bar over the components
    genai: bool = False  # also write genai_config.json + tokenizer_config.json (onnxruntime-genai, text only)
    decoder: str = "torch"  # "torch" (torch.onnx), "genai" / "genai-int4" (onnxruntime-genai model builder)
    target_trt: str | None = None  # TensorRT release the files must parse in (caps the opset: 8.6 -> 17)


@dataclass
class ComponentSpec:
    """One ONNX file: the torch module, example inputs, dynamic axes and the I/O contract."""

    name: str
    module: nn.Module
    args: tuple[Any, ...]
    dynamic_shapes: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


@dataclass
class ExportResult:
    manifest: Manifest
    reports: list[graph_tools.GraphReport]
    parity: dict[str, dict[str, float]]  # component -> output -> max abs diff vs torch (example inputs)
    seconds: dict[str, float]  # component -> export seconds, plus "total"
    out: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "seconds": self.seconds,
            "parity": self.parity,
            "reports": [r.to_dict() for r in self.reports],
            "target_ort": self.manifest.target_ort,
        }


# ---- torch wrappers: one module per ONNX file, with exactly the contract's inputs/outputs ---------


class _VisionEncoder(nn.Module):
    def __init__(self, model: MavenModel):
        super().__init__()
        self.vision = model.vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)


class _DiscreteTokenizer(nn.Module):
    def __init__(self, model: MavenModel):
        super().__init__()
        self.discrete = model.discrete

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.discrete(patch_features)


class _EmbedTokens(nn.Module):
    def __init__(self, model: MavenModel):
        super().__init__()
        self.embed_tokens = model.llm.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class _PatchSelector(nn.Module):
    """Selector + top-k (ranked by logits, returned in raster order) + projector of the kept patches."""

    def __init__(self, model: MavenModel, k: int):
        super().__init__()
        self.selector, self.projector, self.k = model.selector, model.projector, k

    def forward(self, patch_features: torch.Tensor, h_eos: torch.Tensor):
        logits = self.selector(patch_features, h_eos)
        indices = select_patches(logits, self.k)
        return torch.sigmoid(logits), self.projector(gather_patches(patch_features, indices)), indices


class _Projector(nn.Module):
    def __init__(self, model: MavenModel):
        super().__init__()
        self.projector = model.projector

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.projector(patch_features)


class _Decoder(nn.Module):
    def __init__(self, model: MavenModel):
        super().__init__()
        self.llm = model.llm

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        logits, hidden, present = self.llm(inputs_embeds, attention_mask, position_ids, past_key_values)
        return (logits, hidden, *[t for kv in present for t in kv])


def decoder_input_names(num_layers: int) -> list[str]:
    return ["inputs_embeds", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")
    ]


def decoder_output_names(num_layers: int) -> list[str]:
    return ["logits", "hidden_states"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def component_specs(model: MavenModel) -> list[ComponentSpec]:
    """The six ONNX files of a model with their example inputs and I/O contract (docs/design.md §4)."""
    cfg = model.config
    v, llm = cfg.vision, cfg.llm
    n, dv, d, hd, kvh = cfg.num_patches, v.hidden_size, llm.hidden_size, llm.head_dim, llm.num_kv_heads
    k, q, vocab = cfg.num_kept_patches(), cfg.discrete.num_codes, cfg.vocab_size
    f32, i64 = "float32", "int64"
    Dim = torch.export.Dim
    images, batch, seq, past = Dim("images"), Dim("batch"), Dim("seq"), Dim("past", min=0)
    gen = torch.Generator().manual_seed(0)
    n_img = 2  # example sizes avoid 0 and 1, which torch.export would specialise
    pixels = torch.randn(n_img, v.num_channels, v.image_size, v.image_size, generator=gen)
    feats = torch.randn(n_img, n, dv, generator=gen)
    h_eos = torch.randn(n_img, d, generator=gen)
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=gen)
    b, s, p = 2, 3, 4
    past_kv = [(torch.randn(b, kvh, p, hd, generator=gen), torch.randn(b, kvh, p, hd, generator=gen))
               for _ in range(llm.num_layers)]
    dec_args = (torch.randn(b, s, d, generator=gen), torch.ones(b, p + s, dtype=torch.long),
                torch.arange(p, p + s).expand(b, s).contiguous(), past_kv)
    feat_spec = TensorSpec("patch_features", f32, ["images", n, dv])
    past_specs = [TensorSpec(name, f32, ["batch", kvh, "past", hd]) for name in decoder_input_names(llm.num_layers)[3:]]
    present_specs = [TensorSpec(name, f32, ["batch", kvh, "total", hd])
                     for name in decoder_output_names(llm.num_layers)[2:]]
    return [
        ComponentSpec(
            "vision_encoder", _VisionEncoder(model), (pixels,), {"pixel_values": {0: images}},
            [TensorSpec("pixel_values", f32, ["images", v.num_channels, v.image_size, v.image_size])], [feat_spec],
            {"image_size": v.image_size, "patch_size": v.patch_size, "num_patches": n, "feature_layer": v.feature_layer},
        ),
        ComponentSpec(
            "discrete_tokenizer", _DiscreteTokenizer(model), (feats,), {"patch_features": {0: images}},
            [feat_spec], [TensorSpec("visual_codes", i64, ["images", q])],
            {"num_codes": q, "codebook_size": cfg.discrete.codebook_size, "visual_offset": cfg.visual_offset,
             "codes_offset": True},
        ),
        ComponentSpec(
            "embed_tokens", _EmbedTokens(model), (ids,), {"input_ids": {0: batch, 1: seq}},
            [TensorSpec("input_ids", i64, ["batch", "seq"])], [TensorSpec("inputs_embeds", f32, ["batch", "seq", d])],
            {"vocab_size": vocab, "hidden_size": d},
        ),
        ComponentSpec(
            "patch_selector", _PatchSelector(model, k), (feats, h_eos),
            {"patch_features": {0: images}, "h_eos": {0: images}},
            [feat_spec, TensorSpec("h_eos", f32, ["images", d])],
            [TensorSpec("scores", f32, ["images", n]), TensorSpec("selected_embeds", f32, ["images", k, d]),
             TensorSpec("selected_indices", i64, ["images", k])],
            {"k": k, "keep_ratio": cfg.selector.keep_ratio, "scores": "sigmoid(selector logits)",
             "ranking": "selector logits (pre-sigmoid), top-k", "order": "raster (ascending patch index)",
             "projected": True},
        ),
        ComponentSpec(
            "projector", _Projector(model), (feats,), {"patch_features": {0: images}},
            [feat_spec], [TensorSpec("projected_embeds", f32, ["images", n, d])],
            {"purpose": "continuous mode: all N patches projected, raster order"},
        ),
        ComponentSpec(
            "decoder", _Decoder(model), dec_args,
            {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
             "position_ids": {0: batch, 1: seq},
             "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(llm.num_layers)]},
            [TensorSpec("inputs_embeds", f32, ["batch", "seq", d]), TensorSpec("attention_mask", i64, ["batch", "total"]),
             TensorSpec("position_ids", i64, ["batch", "seq"]), *past_specs],
            [TensorSpec("logits", f32, ["batch", "seq", vocab]), TensorSpec("hidden_states", f32, ["batch", "seq", d]),
             *present_specs],
            {"num_layers": llm.num_layers, "num_heads": llm.num_heads, "num_kv_heads": kvh, "head_dim": hd,
             "hidden_size": d, "vocab_size": vocab, "max_position_embeddings": llm.max_position_embeddings,
             "past_key_name": "past_key_values.%d.key", "past_value_name": "past_key_values.%d.value",
             "present_key_name": "present.%d.key", "present_value_name": "present.%d.value",
             "kv_layout": "[batch, kv_heads, length, head_dim]", "needs_position_ids": True,
             "attention_mask": "1 = real token, 0 = padding; causal on top; length past + seq",
             "hidden_states": "last layer, after the final norm"},
        ),
    ]


# ---- helpers -------------------------------------------------------------------------------------


def model_fingerprint(model: MavenModel) -> str:
    """sha256 over the config and every weight: identifies "the same model" across exports."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().contiguous().cpu()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    try:
        from importlib.metadata import version

        me = version("maven-edge")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        me = "0.1.0"
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "maven-edge": me, "exporter": "torch.onnx.export(dynamo=True)"}


def prepare_output_dir(out: Path, fingerprint: str, force: bool) -> list[str]:
    """Refuse to overwrite another model's export; return the old files to remove once we succeed."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory; choose another --out")
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if not force:
                raise ExportError(f"{manifest_path} is not valid JSON; pass --force to overwrite {out}") from exc
            return []
        same = isinstance(old, dict) and old.get("extra", {}).get("model_fingerprint") == fingerprint
        if not same and not force:
            name = old.get("preset", "?") if isinstance(old, dict) else "?"
            raise ExportError(
                f"{out} already holds the export of a different model (preset {name!r}, other weights or "
                "config); pass --force to overwrite it, or choose another --out"
            )
        return _listed_files(old, out)
    if any(out.glob("*.onnx")) and not force:
        raise ExportError(f"{out} holds ONNX files but no {MANIFEST}; pass --force to overwrite, or choose another --out")
    return []


def _listed_files(old: Any, out: Path) -> list[str]:
    files: list[str] = []
    try:
        for comp in old.get("components", {}).values():
            files.append(comp["file"]["path"])
            files.extend(e["path"] for e in comp.get("external_data", []))
        files.append(old["tokenizer"]["path"])
        files.extend(e["path"] for e in old.get("extra", {}).get("genai", []))
    except (KeyError, TypeError, AttributeError):
        pass
    keep = []
    for f in files:
        try:
            resolve_inside(out, f)
            keep.append(f)
        except ArtifactError:
            continue  # never delete anything outside the output directory
    return keep


def _to_numpy(x: Any) -> list[np.ndarray]:
    if isinstance(x, torch.Tensor):
        return [x.detach().cpu().numpy()]
    if isinstance(x, (list, tuple)):
        return [a for item in x for a in _to_numpy(item)]
    raise TypeError(type(x))


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _set_io_shapes(ir_model: Any, spec: ComponentSpec) -> None:
    """Give graph inputs/outputs exactly the contract's names, dtypes and symbolic axes."""
    import onnx_ir as ir

    for values, specs, kind in ((ir_model.graph.inputs, spec.inputs, "input"),
                                (ir_model.graph.outputs, spec.outputs, "output")):
        names = [v.name for v in values]
        want = [t.name for t in specs]
        if names != want:
            raise ExportError(f"{spec.name}: exported {kind}s {names} differ from the contract {want}")
        for value, t in zip(values, specs, strict=True):
            got = value.shape
            if got is None or len(got) != len(t.shape):
                raise ExportError(f"{spec.name}: {kind} {t.name} has shape {got}, expected rank {len(t.shape)}")
            for axis, (g, w) in enumerate(zip(got, t.shape, strict=True)):
                if isinstance(w, int) and g != w:
                    raise ExportError(f"{spec.name}: {kind} {t.name} axis {axis} is {g}, expected {w}")
                if isinstance(w, str) and isinstance(g, int):
                    raise ExportError(
                        f"{spec.name}: {kind} {t.name} axis {axis} ({w}) was fixed to {g} by the exporter; "
                        "it must stay dynamic"
                    )
            if np.dtype(value.dtype.numpy()).name != t.dtype:
                raise ExportError(f"{spec.name}: {kind} {t.name} has dtype {value.dtype}, expected {t.dtype}")
            value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in t.shape])


def _export_one(spec: ComponentSpec, opset: int) -> Any:
    """torch -> onnx_ir.Model with the dynamo exporter (its own optimizer on: folds constants)."""
    input_names = [t.name for t in spec.inputs]
    output_names = [t.name for t in spec.outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                spec.module, spec.args, dynamo=True, opset_version=opset, dynamic_shapes=spec.dynamic_shapes,
                input_names=input_names, output_names=output_names, optimize=True, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; all mean "cannot export this"
            raise ExportError(
                f"{spec.name}: the torch exporter failed at opset {opset}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Try the default --opset"
            ) from exc
    model = program.model
    got = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if got != opset and got is not None and got > opset:
        # The exporter emits opset 18 and converts; when an op cannot be expressed at the requested
        # opset by its converter (e.g. ReduceL2 with axes as an input, opset 18, to the attribute form
        # of opset 17) it logs the failure and keeps opset 18. onnx's version converter does that one.
        model = _convert_opset(model, opset) or model
        got = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if got != opset:
        # Refuse instead of writing another opset.
        ops = sorted({n.op_type for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx")})
        raise ExportError(
            f"{spec.name} cannot be exported at --opset {opset}: the exporter could not convert its ops "
            f"({', '.join(ops)}) and produced opset {got}; use --opset {got} or newer"
        )
    return model


#: Attributes onnx's version converter leaves on a reduction moved to opset 17, where they do not
#: exist; dropped when they hold their default (0).
_OPSET18_ONLY_ATTRS = {"noop_with_empty_axes"}


def _convert_opset(ir_model: Any, opset: int) -> Any | None:
    """`ir_model` at ai.onnx `opset` through onnx's version converter (Reduce* axes input -> attribute),
    or None when it cannot (the caller refuses). Graphs over 1.8 GB are not converted (protobuf)."""
    import onnx
    import onnx_ir as ir
    from onnx import version_converter

    weights = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    if weights > 1_800_000_000:
        return None
    try:
        proto = version_converter.convert_version(ir.to_proto(ir_model), opset)
    except Exception:  # the converter raises RuntimeError / ConvertError / ValidationError
        return None
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        drop = [a for a in node.attribute if a.name in _OPSET18_ONLY_ATTRS]
        for a in drop:
            if a.i != 0:
                return None
            node.attribute.remove(a)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError:
        return None
    return ir.from_proto(proto)


def _save(ir_model: Any, path: Path, threshold: int) -> list[str]:
    """Save; weights go to `<file>.data` when they exceed `threshold` bytes. Returns data files."""
    import onnx_ir as ir

    weight_bytes = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    if weight_bytes > threshold:
        ir.save(ir_model, path, external_data=data.name, size_threshold_bytes=1024)
        return [data.name] if data.exists() else []
    ir.save(ir_model, path)
    return []


def _run_ort(path: Path, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    return _ort_session(path).run(outputs, feeds)


# ---- the export -----------------------------------------------------------------------------------


def export_model(
    model: MavenModel, options: ExportOptions, source: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export every component of `model` into `options.out` and write manifest.json last."""
    t_start = time.perf_counter()
    out = Path(options.out)
    target = ort_compat.get_target(options.target_ort)
    opset = ort_compat.resolve_opset(options.opset, target)
    if options.target_trt is not None:
        opset = _trt_opset(options, opset)
    if options.optimize is not None and options.optimize not in graph_tools.OPTIMIZERS:
        raise ExportError(f"unknown optimizer {options.optimize!r}; choose one of {', '.join(graph_tools.OPTIMIZERS)}")
    model = model.eval()
    fingerprint = model_fingerprint(model)
    old_files = prepare_output_dir(out, fingerprint, options.force)
    specs = component_specs(model)
    components: dict[str, Component] = {}
    reports, parity, seconds = [], {}, {}

    def clear_previous(staging: Path) -> None:  # the previous export's files (same model, or --force)
        for rel in old_files + [MANIFEST]:
            (out / rel).unlink(missing_ok=True)

    with staged_artifacts(out, clear_previous) as staging:
        from tqdm import tqdm

        bar = tqdm(specs, desc="export", unit="file", disable=not options.progress)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            t0 = time.perf_counter()
            if spec.name == "decoder" and options.decoder != "torch":
                comp, rep, par = _builder_decoder(model, spec, staging, target, options)
            else:
                comp, rep, par = _export_component(spec, staging, opset, target, options)
            components[spec.name] = comp
            reports.append(rep)
            parity[spec.name] = par
            seconds[spec.name] = round(time.perf_counter() - t0, 2)
            if log:
                log(f"{spec.file}: {rep.total_bytes / 1e6:.1f} MB, {rep.node_count} nodes, {seconds[spec.name]} s")
        model.tokenizer.save(staging / "tokenizer.json")
    cfg = model.config
    manifest = Manifest(
        preset=cfg.name,
        config=cfg.to_dict(),
        vocab=model.tokenizer.layout.to_dict(),
        preprocess=asdict(cfg.preprocess),
        mode=cfg.mode,
        keep_ratio=cfg.selector.keep_ratio,
        num_patches=cfg.num_patches,
        num_kept_patches=cfg.num_kept_patches(),
        components=components,
        tokenizer=file_entry(out, out / "tokenizer.json"),
        target_ort=target.release,
        exporter=_versions(),
        recipe="fp32",
        extra={
            "model_fingerprint": fingerprint,
            "source": source or {},
            "target": target.to_dict(),
            "opset": opset,
            "dynamic_axes": {
                "images": "number of images in one call", "batch": "sequences in one call",
                "seq": "new tokens in this call", "past": "tokens already in the KV cache (0 on the first step)",
                "total": "past + seq",
            },
            "continuous_component": "projector",
            "hybrid_components": ["vision_encoder", "discrete_tokenizer", "embed_tokens", "decoder", "patch_selector"],
            "h_eos": "decoder hidden_states at <eos_vis> after [codes, <eos_vis>] with an empty past",
            "optimized": options.optimize,
            "external_data_threshold": options.external_data_threshold,
            "target_trt": options.target_trt,
        },
        host=host_section(cfg, model.tokenizer.layout, "tokenizer.json"),
    )
    # File entries were hashed in staging with staging-relative paths; re-hash in place.
    for comp in manifest.components.values():
        comp.file = file_entry(out, out / comp.file.path)
        comp.external_data = [file_entry(out, out / e.path) for e in comp.external_data]
    if options.genai:
        manifest.extra["genai"] = [asdict(e) for e in write_genai_config(manifest, out)]
    write_manifest(manifest, out)
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    return ExportResult(manifest, reports, parity, seconds, out)


def _trt_opset(options: ExportOptions, opset: int) -> int:
    """The opset for `--target-trt`: TensorRT's ONNX parser reads opsets up to a cap per release
    (8.6: 17, and it misreads the opset-18 reductions' `axes` input rather than refusing them)."""
    from maven_edge.export import trt_compat

    cap = trt_compat.max_opset(options.target_trt)
    if options.decoder != "torch":
        raise ExportError(f"--decoder {options.decoder} writes onnxruntime contrib ops (GroupQueryAttention, ...) that "
                          f"TensorRT cannot parse; with --target-trt use --decoder torch")
    if options.opset is None:
        return min(opset, cap)
    if options.opset > cap:
        raise ExportError(f"--opset {options.opset} is newer than TensorRT {options.target_trt}'s ONNX parser reads "
                          f"({cap}); use --opset {cap} or leave --opset out")
    return opset


def _builder_decoder(
    model: MavenModel, spec: ComponentSpec, staging: Path, target: ort_compat.OrtTarget, options: ExportOptions
) -> tuple[Component, graph_tools.GraphReport, dict[str, float]]:
    """decoder.onnx from onnxruntime-genai's model builder (export/genai_decoder.py), checked like ours."""
    from maven_edge.export import genai_decoder

    path = staging / spec.file
    data_files = genai_decoder.build_decoder(model, staging, options.decoder)
    # No onnx.checker here: the builder uses onnxruntime-only ops in the ai.onnx domain
    # (SimplifiedLayerNormalization); loading and running the file in onnxruntime below is the check.
    graph_tools.check_external_data(path, staging, set(data_files))
    problems = ort_compat.compat_problems(graph_tools.load_structure(path), target)
    if problems:
        raise ExportError(f"decoder.onnx from the onnxruntime-genai builder does not fit onnxruntime {target.release}: "
                          f"{'; '.join(problems)}. Use --target-ort installed (or a newer release)")
    inputs = [t for t in spec.inputs if t.name != "position_ids"]
    # GroupQueryAttention takes several new tokens on top of a past only at batch 1, so check the
    # two calls the runtime makes: a batched prompt with an empty past (h_eos) and batch-1 steps.
    embeds, mask, positions, past = spec.args
    seq = embeds.shape[1]
    cases = [
        (embeds, torch.ones(embeds.shape[0], seq, dtype=torch.long), torch.arange(seq).expand(embeds.shape[0], seq),
         [(k[:, :, :0], v[:, :, :0]) for k, v in past]),
        (embeds[:1], mask[:1], positions[:1], [(k[:1], v[:1]) for k, v in past]),
    ]
    par: dict[str, float] = {}
    for args in cases:
        with torch.no_grad():
            expected = _to_numpy(spec.module(*args))
        feeds = {t.name: v for t, v in zip(spec.inputs, _to_numpy(args), strict=True) if t.name != "position_ids"}
        got = _run_ort(path, feeds, [t.name for t in spec.outputs])
        for t, g, e in zip(spec.outputs, got, expected, strict=True):
            par[t.name] = max(par.get(t.name, 0.0), max_abs_diff(g, e))
    worst = max(par.values())
    if genai_decoder.PRECISION[options.decoder] == "fp32" and worst > OPTIMIZE_ATOL:
        raise ExportError(
            f"the onnxruntime-genai decoder differs from torch by {worst:.2e} (> {OPTIMIZE_ATOL}) on the example "
            f"inputs ({par}); export with --decoder torch"
        )
    structure = graph_tools.load_structure(path)
    comp = Component(
        name=spec.name,
        file=file_entry(staging, path),
        precision=genai_decoder.PRECISION[options.decoder],
        inputs=inputs,
        outputs=spec.outputs,
        opsets={op.domain: op.version for op in structure.opset_import},
        ir_version=structure.ir_version,
        external_data=[file_entry(staging, staging / d) for d in data_files],
        extra=genai_decoder.decoder_extra(options.decoder, spec.extra),
    )
    return comp, graph_tools.report(path), par


def _export_component(
    spec: ComponentSpec, staging: Path, opset: int, target: ort_compat.OrtTarget, options: ExportOptions
) -> tuple[Component, graph_tools.GraphReport, dict[str, float]]:
    ir_model = _export_one(spec, opset)
    _set_io_shapes(ir_model, spec)
    graph_tools.remove_unused_initializers(ir_model)
    ir_model.producer_name = "maven-edge"
    ir_model.doc_string = f"maven-edge {spec.name} (docs/design.md §4)"
    ir_model.metadata_props["maven_edge.component"] = spec.name
    ir_model.metadata_props["maven_edge.target_ort"] = target.release
    ort_compat.cap_ir_model(ir_model, target)
    path = staging / spec.file
    with torch.no_grad():
        expected = _to_numpy(spec.module(*spec.args))
    feeds = dict(zip([t.name for t in spec.inputs], _to_numpy(spec.args), strict=True))
    data_files = _save(ir_model, path, options.external_data_threshold)
    _check_file(path, staging, data_files, target)
    par: dict[str, float] = {}
    if options.check_load or options.optimize:
        got = _run_ort(path, feeds)
        par = {t.name: max_abs_diff(g, e) for t, g, e in zip(spec.outputs, got, expected, strict=True)}
    if options.optimize:
        opt = optimize_file(path, spec.inputs, spec.outputs, feeds, target, options.optimize,
                            options.external_data_threshold, plain=got)
        data_files = graph_tools.external_locations(graph_tools.load_structure(path))
        par = {t.name: max_abs_diff(g, e) for t, g, e in zip(spec.outputs, opt, expected, strict=True)}
    rep = graph_tools.report(path)
    structure = graph_tools.load_structure(path)
    extra = dict(spec.extra)
    extra["optimized"] = options.optimize
    comp = Component(
        name=spec.name,
        file=file_entry(staging, path),
        precision="fp32",
        inputs=spec.inputs,
        outputs=spec.outputs,
        opsets={op.domain: op.version for op in structure.opset_import},
        ir_version=structure.ir_version,
        external_data=[file_entry(staging, staging / d) for d in data_files],
        extra=extra,
    )
    return comp, rep, par


def optimize_file(
    path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], feeds: dict[str, np.ndarray],
    target: ort_compat.OrtTarget, tool: str, threshold: int = EXTERNAL_DATA_THRESHOLD,
    plain: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Optimize one saved file in place, keeping it only if it still matches the plain graph.

    The plain file is run on `feeds` first (unless its outputs are given); the optimized file must
    give the same integer outputs and float outputs within OPTIMIZE_ATOL, pass the same checks as
    the plain export and keep the I/O contract. Returns the optimized outputs.
    """
    import onnx_ir as ir

    if plain is None:
        plain = _run_ort(path, feeds)
    ir_model = ir.load(path)
    ir_model = graph_tools.optimize_model(ir_model, tool)
    spec = ComponentSpec(path.stem, nn.Identity(), (), {}, inputs, outputs)
    _set_io_shapes(ir_model, spec)
    ort_compat.cap_ir_model(ir_model, target)
    ir_model.metadata_props["maven_edge.optimized"] = tool
    tmp = path.with_name(path.stem + ".opt.onnx")
    data_files = _save(ir_model, tmp, threshold)
    del ir_model
    # Rename tmp (+ its data file) over the plain file; the data file name is kept inside the graph.
    if data_files:
        import onnx

        proto = onnx.load(str(tmp), load_external_data=False)
        new_data = path.name + ".data"
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = new_data
        os.replace(tmp.with_name(data_files[0]), path.with_name(new_data))
        onnx.save(proto, str(path))
        tmp.unlink()
    else:
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        os.replace(tmp, path)
    _check_file(path, path.parent, [path.name + ".data"] if data_files else [], target)
    opt = _run_ort(path, feeds)
    for t, a, b in zip(outputs, opt, plain, strict=True):
        diff = max_abs_diff(a, b)
        limit = 0.0 if a.dtype.kind in "iub" else OPTIMIZE_ATOL
        if diff > limit:
            raise ExportError(
                f"{path.name}: the {tool} optimization changed output {t.name} by {diff:.3g} "
                f"(allowed {limit}); export without --optimize"
            )
    return opt


def _check_file(path: Path, root: Path, data_files: list[str], target: ort_compat.OrtTarget) -> None:
    graph_tools.check_graph(path)
    graph_tools.check_external_data(path, root, set(data_files))
    structure = graph_tools.load_structure(path)
    problems = ort_compat.compat_problems(structure, target)
    if problems:
        raise ExportError(
            f"{path.name} does not fit onnxruntime {target.release}: {'; '.join(problems)}. "
            "Choose a newer --target-ort, or a lower --opset if the ops allow it"
        )
    unused = graph_tools.unused_initializers(structure)
    if unused:
        raise ExportError(f"{path.name} still has unused initializers {unused[:5]}")


def optimize_artifact(src: str | Path, dst: str | Path, tool: str = "onnxscript", force: bool = False) -> Manifest:
    """Optimize an existing export into `dst` (may equal `src`), validating each file like `--optimize`.

    Each optimized component must reproduce the plain file's outputs on seeded example inputs
    (integers exactly, floats within OPTIMIZE_ATOL) and pass the checker and the target checks;
    the manifest is rewritten with the new hashes and `extra.optimized`.
    """

    src, dst = Path(src), Path(dst)
    manifest = load_manifest(src)
    target_info = manifest.extra.get("target")
    target = (ort_compat.OrtTarget(**target_info) if isinstance(target_info, dict)
              else ort_compat.get_target(manifest.target_ort))
    if src.resolve() != dst.resolve():
        old = prepare_output_dir(dst, manifest.extra.get("model_fingerprint", ""), force)
        dst.mkdir(parents=True, exist_ok=True)
        for rel in old:
            (dst / rel).unlink(missing_ok=True)
        extras = [e["path"] for e in manifest.extra.get("genai", [])]
        for rel in [e.path for e in manifest.all_files()] + extras:
            shutil.copy2(resolve_inside(src, rel), dst / rel)
    threshold = int(manifest.extra.get("external_data_threshold", EXTERNAL_DATA_THRESHOLD))
    vocab = int(manifest.vocab["vocab_size"])
    for comp in manifest.components.values():
        path = resolve_inside(dst, comp.file.path)
        feeds = graph_tools.example_feeds(comp.inputs, vocab)
        optimize_file(path, comp.inputs, comp.outputs, feeds, target, tool, threshold)
        structure = graph_tools.load_structure(path)
        comp.file = file_entry(dst, path)
        comp.external_data = [file_entry(dst, dst / loc) for loc in graph_tools.external_locations(structure)]
        comp.opsets = {op.domain: op.version for op in structure.opset_import}
        comp.ir_version = structure.ir_version
        comp.extra["optimized"] = tool
    manifest.extra["optimized"] = tool
    write_manifest(manifest, dst)
    return manifest


GENAI_CONFIG = "genai_config.json"


def write_genai_config(manifest: Manifest, out: str | Path, max_length: int | None = None) -> list[FileEntry]:
    """`genai_config.json` (+ `tokenizer_config.json`) for text-only generation in onnxruntime-genai.

    The decoder takes `inputs_embeds`, so the config is a `decoder-pipeline`: `embed_tokens.onnx`
    (input_ids -> inputs_embeds) then `decoder.onnx`, both on every step; the KV cache grows by
    concatenation (no shared past/present buffer). onnxruntime-genai picks tokens over the whole
    unified vocabulary (visual codes included), while maven-edge's sampler only picks text
    tokens. Returns the entries of the files written.
    """
    out = Path(out)
    dec, emb = manifest.components["decoder"], manifest.components["embed_tokens"]
    info, special = dec.extra, manifest.vocab["special_ids"]
    context = int(info["max_position_embeddings"])
    config = {
        "model": {
            "type": "decoder-pipeline",
            "bos_token_id": special["<bos>"], "eos_token_id": special["<eos>"], "pad_token_id": special["<pad>"],
            "vocab_size": int(manifest.vocab["vocab_size"]), "context_length": context,
            "decoder": {
                "hidden_size": info["hidden_size"], "num_attention_heads": info["num_heads"],
                "num_key_value_heads": info["num_kv_heads"], "num_hidden_layers": info["num_layers"],
                "head_size": info["head_dim"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": info["past_key_name"],
                           "past_value_names": info["past_value_name"]},
                "outputs": {"logits": "logits", "present_key_names": info["present_key_name"],
                            "present_value_names": info["present_value_name"]},
                "pipeline": [
                    {"embeddings": {"filename": emb.file.path, "inputs": [t.name for t in emb.inputs],
                                    "outputs": [t.name for t in emb.outputs],
                                    "run_on_prompt": True, "run_on_token_gen": True}},
                    {"decoder": {"filename": dec.file.path, "inputs": [t.name for t in dec.inputs],
                                 "outputs": [t.name for t in dec.outputs],
                                 "run_on_prompt": True, "run_on_token_gen": True}},
                ],
            },
        },
        "search": {"max_length": max_length or context, "min_length": 0, "do_sample": False, "num_beams": 1,
                   "past_present_share_buffer": False},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": context,
    }
    (out / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return [file_entry(out, out / GENAI_CONFIG), file_entry(out, out / "tokenizer_config.json")]
