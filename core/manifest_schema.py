"""The declared schema of ``manifest.json`` (format version 1), as pydantic v2 models.

Every field's type and range is declared here once; :func:`maven_edge.core.manifest.load_manifest`
validates a manifest against :class:`ManifestModel` in strict mode (no coercion: ``true`` is not
an integer, ``"1"`` is not a number) and then :func:`cross_check` checks the fields against each
other (counts derived from the config, vocabulary layout, tensor shapes). The same contract is
published as JSON Schema in ``docs/manifest.schema.json`` so hosts in other languages validate
what this one does; regenerate it after changing a model here:

    python -m maven_edge.core.manifest_schema --write docs/manifest.schema.json

(tests/test_manifest_schema.py fails while the published file is out of date). Free-form
``extra`` objects stay open for extensions, but the keys a runtime reads there are typed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from maven_edge.core.config import VISUAL_MODES, MavenConfig
from maven_edge.core.tokenizer import SPECIAL_TOKENS

FORMAT_VERSION = 1
COMPONENTS = ("vision_encoder", "discrete_tokenizer", "embed_tokens", "patch_selector", "decoder")
SCHEMA_PATH = "docs/manifest.schema.json"

#: numpy dtype names a tensor may declare (ONNX element types the runtimes handle).
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
#: ONNX Runtime's type strings for them (``NodeArg.type``).
ORT_TYPES = {f"tensor({t})": d for t, d in (
    ("float", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("double", "float64"),
    ("int64", "int64"), ("int32", "int32"), ("int16", "int16"), ("int8", "int8"), ("uint8", "uint8"),
    ("bool", "bool"))}

MAX_INT = 2**31 - 1
MAX_PATH_BYTES = 1024  # well under PATH_MAX; each part is also held under NAME_MAX (255 bytes)


def _check_relative_path(value: str) -> str:
    """A path inside the artifact directory, as written by the exporter: '/'-separated parts,
    no NUL or control characters, encodable as UTF-8, each part at most 255 bytes. Whether it
    stays inside the directory is checked when it is resolved (load_manifest)."""
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (it holds a lone surrogate)") from None
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("holds a NUL or control character")
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"is {len(encoded)} bytes long, over {MAX_PATH_BYTES}")
    if any(len(part.encode("utf-8")) > 255 for part in value.replace("\\", "/").split("/")):
        raise ValueError("has a part longer than 255 bytes (the file-name limit)")
    return value


Count = Annotated[int, Field(ge=1, le=MAX_INT)]
NonNegative = Annotated[int, Field(ge=0, le=MAX_INT)]
RelativePath = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATH_BYTES, pattern=r"^[^\x00-\x1f\x7f]+$"),
                         AfterValidator(_check_relative_path)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
Dim = Annotated[int, Field(ge=0, le=MAX_INT)] | Identifier  # a fixed size, or a named dynamic axis


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class _Open(BaseModel):
    """An ``extra`` object: any further keys (JSON values) are kept; the typed ones are checked."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, frozen=True)


class FileEntryModel(_Model):
    """One file of the artifact directory, with its size and sha256 (both checked at load)."""

    path: RelativePath = Field(description="relative to the artifact directory ('/'-separated)")
    sha256: Sha256
    size_bytes: Annotated[int, Field(ge=0, le=2**53)]


class TensorSpecModel(_Model):
    """A graph input or output as the runtime will feed or read it."""

    name: Label
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: Annotated[list[Dim], Field(max_length=8)] = Field(
        description="fixed sizes as integers, dynamic axes by name (images, batch, seq, past, total)")


class ComponentExtraModel(_Open):
    """Component details. Keys the runtimes read are typed; any other key is free."""

    # vision_encoder
    image_size: Count | None = None
    patch_size: Count | None = None
    num_patches: Count | None = None
    # discrete_tokenizer
    num_codes: Count | None = None
    codebook_size: Count | None = None
    visual_offset: NonNegative | None = None
    codes_offset: bool | None = None
    # patch_selector
    k: Count | None = None
    keep_ratio: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # embed_tokens / decoder
    vocab_size: Count | None = None
    hidden_size: Count | None = None
    num_layers: Count | None = None
    num_heads: Count | None = None
    num_kv_heads: Count | None = None
    head_dim: Count | None = None
    max_position_embeddings: Count | None = None
    needs_position_ids: bool | None = None
    past_present_share_buffer: bool | None = Field(
        None, description="decoder: bind one preallocated buffer per layer as both past and present "
        "(needs a decoder whose attention writes into it, e.g. GroupQueryAttention)")


class ComponentModel(_Model):
    name: Identifier
    file: FileEntryModel
    precision: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_+.-]{0,31}$")] = Field(
        description="fp32, fp16, int8, int4, ...")
    inputs: Annotated[list[TensorSpecModel], Field(min_length=1, max_length=256)]
    outputs: Annotated[list[TensorSpecModel], Field(min_length=1, max_length=256)]
    opsets: Annotated[dict[Annotated[str, StringConstraints(max_length=128)], Annotated[int, Field(ge=1, le=1000)]],
                      Field(min_length=1)] = Field(description='domain ("" = ai.onnx) -> opset version')
    ir_version: Annotated[int, Field(ge=1, le=100)]
    external_data: Annotated[list[FileEntryModel], Field(max_length=64)] = []
    extra: ComponentExtraModel = ComponentExtraModel()


class VocabModel(_Model):
    """The unified vocabulary: [text + special tokens (+ image slots) | visual codes]."""

    text_vocab_size: Count
    tokenizer_size: Count = Field(description="ids tokenizer.json produces (BPE + special tokens)")
    codebook_size: Count
    special_ids: dict[Literal[SPECIAL_TOKENS], NonNegative]  # type: ignore[valid-type]
    visual_offset: NonNegative | None = Field(None, description="= text_vocab_size")
    vocab_size: Count | None = Field(None, description="= text_vocab_size + codebook_size")


class PreprocessModel(_Model):
    image_size: Annotated[int, Field(ge=1, le=16384)]
    mean: Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0.0, le=10.0)]], Field(min_length=3, max_length=3)]
    resample: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]
    pad_to_square: bool


class ManifestExtraModel(_Open):
    model_fingerprint: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{0,128}$")] | None = None
    source: dict[str, Any] | None = None


class ManifestModel(_Model):
    """manifest.json: what the exporter wrote and every runtime reads (docs/design.md §4)."""

    model_config = ConfigDict(title="maven-edge manifest.json", strict=True, extra="forbid", allow_inf_nan=False,
                              frozen=True, json_schema_extra={"$id": "https://maven-edge/manifest.schema.json"})

    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)]
    preset: Label
    config: MavenConfig
    vocab: VocabModel
    preprocess: PreprocessModel
    mode: Literal[tuple(VISUAL_MODES.names())]  # type: ignore[valid-type]
    keep_ratio: Annotated[float, Field(gt=0.0, le=1.0)]
    num_patches: Count
    num_kept_patches: Count = Field(description="k: patches the selector keeps, fixed in patch_selector.onnx")
    components: Annotated[dict[Identifier, ComponentModel], Field(min_length=1, max_length=32)]
    tokenizer: FileEntryModel
    target_ort: Annotated[str, StringConstraints(pattern=r"^\d{1,3}\.\d{1,3}(\.\d{1,3})?$")] = Field(
        description="oldest onnxruntime release the files load in")
    exporter: dict[Label, Annotated[str, StringConstraints(max_length=256)]]
    recipe: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_+.-]{0,63}$")] = "fp32"
    extra: ManifestExtraModel = ManifestExtraModel()
    host: dict[str, Any] = Field(
        default_factory=dict, description="what a runtime in another language does besides running the files "
        "(core/host_contract.py, docs/hosts.md); {} in manifests written before it")


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of manifest.json, as published in docs/manifest.schema.json."""
    schema = ManifestModel.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = (
        "maven-edge manifest.json, format version 1. Generated from maven_edge/core/manifest_schema.py "
        "(python -m maven_edge.core.manifest_schema --write docs/manifest.schema.json); do not edit by hand. "
        "A runtime also checks what a schema cannot say: the cross-field rules of "
        "maven_edge.core.manifest_schema.cross_check, every file's size and sha256, and each ONNX graph's "
        "inputs and outputs against the component entry.")
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


# ---- cross-field rules ---------------------------------------------------------------------------


def _dims(spec: TensorSpecModel) -> str:
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"


def cross_check(m: ManifestModel) -> list[tuple[str, str]]:
    """The rules between fields of a schema-valid manifest: (field, what is wrong) for each broken one."""
    problems: list[tuple[str, str]] = []
    cfg = m.config
    try:
        cfg.validate()
    except Exception as exc:  # ConfigError: the message names the config field
        problems.append(("config", str(exc).removeprefix("invalid config: ")))
        return problems
    from maven_edge.core.preprocess import resample_filter

    try:
        resample_filter(cfg.preprocess.resample)
    except Exception as exc:
        problems.append(("config.preprocess.resample", str(exc)))
    if cfg.mode not in VISUAL_MODES:
        problems.append(("config.mode", f"unknown mode {cfg.mode!r}"))
    elif m.mode != cfg.mode:
        problems.append(("mode", f"is {m.mode!r}, but config.mode is {cfg.mode!r}"))

    def same(field: str, value: Any, expected: Any, source: str) -> None:
        if value != expected:
            problems.append((field, f"is {value!r}, but {source} gives {expected!r}"))

    # geometry and counts derived from the config
    same("num_patches", m.num_patches, cfg.num_patches, "config.vision (image_size / patch_size)^2")
    if m.num_kept_patches > m.num_patches:
        problems.append(("num_kept_patches", f"is {m.num_kept_patches}, more than num_patches ({m.num_patches})"))
    same("num_kept_patches", m.num_kept_patches, cfg.num_kept_patches(m.keep_ratio), "keep_ratio x num_patches")
    pre = cfg.preprocess
    for key in ("image_size", "resample", "pad_to_square"):
        same(f"preprocess.{key}", getattr(m.preprocess, key), getattr(pre, key), f"config.preprocess.{key}")
    for key in ("mean", "std"):
        if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(getattr(m.preprocess, key), getattr(pre, key),
                                                                      strict=True)):
            same(f"preprocess.{key}", getattr(m.preprocess, key), list(getattr(pre, key)), f"config.preprocess.{key}")
    same("preprocess.image_size", m.preprocess.image_size, cfg.vision.image_size, "config.vision.image_size")
    # vocabulary
    v = m.vocab
    same("vocab.text_vocab_size", v.text_vocab_size, cfg.llm.text_vocab_size, "config.llm.text_vocab_size")
    same("vocab.codebook_size", v.codebook_size, cfg.discrete.codebook_size, "config.discrete.codebook_size")
    if v.tokenizer_size > v.text_vocab_size:
        problems.append(("vocab.tokenizer_size",
                         f"is {v.tokenizer_size}, more than text_vocab_size ({v.text_vocab_size})"))
    if v.visual_offset is not None:
        same("vocab.visual_offset", v.visual_offset, v.text_vocab_size, "text_vocab_size")
    if v.vocab_size is not None:
        same("vocab.vocab_size", v.vocab_size, v.text_vocab_size + v.codebook_size, "text_vocab_size + codebook_size")
    missing = [t for t in SPECIAL_TOKENS if t not in v.special_ids]
    if missing:
        problems.append(("vocab.special_ids", f"lacks {missing}"))
    high = {t: i for t, i in v.special_ids.items() if i >= v.tokenizer_size}
    if high:
        problems.append(("vocab.special_ids", f"ids {high} are not below tokenizer_size ({v.tokenizer_size})"))
    if len(set(v.special_ids.values())) != len(v.special_ids):
        problems.append(("vocab.special_ids", "two special tokens share an id"))
    # components
    missing = [name for name in COMPONENTS if name not in m.components]
    if missing:
        problems.append(("components", f"lacks component(s) {missing}"))
    for key, comp in m.components.items():
        if comp.name != key:
            problems.append((f"components.{key}.name", f"is {comp.name!r}, but the entry is {key!r}"))
        for side in ("inputs", "outputs"):
            names = [t.name for t in getattr(comp, side)]
            if len(set(names)) != len(names):
                problems.append((f"components.{key}.{side}", "lists a tensor name twice"))
    problems += _tensor_rules(m)
    return problems


def _tensor_rules(m: ManifestModel) -> list[tuple[str, str]]:
    """Tensor shapes the config fixes (None = any size, e.g. a dynamic axis)."""
    cfg, llm = m.config, m.config.llm
    n, k, q = m.num_patches, m.num_kept_patches, cfg.discrete.num_codes
    s, dv, d = cfg.vision.image_size, cfg.vision.hidden_size, llm.hidden_size
    vocab = llm.text_vocab_size + cfg.discrete.codebook_size
    kv = [None, llm.num_kv_heads, None, llm.head_dim]
    want: dict[str, dict[str, list[int | None]]] = {
        "vision_encoder": {"pixel_values": [None, cfg.vision.num_channels, s, s], "patch_features": [None, n, dv]},
        "discrete_tokenizer": {"visual_codes": [None, q]},
        "embed_tokens": {"input_ids": [None, None], "inputs_embeds": [None, None, d]},
        "patch_selector": {"patch_features": [None, n, dv], "h_eos": [None, d], "scores": [None, n],
                           "selected_embeds": [None, k, d], "selected_indices": [None, k]},
        "projector": {"projected_embeds": [None, n, d]},
        "decoder": {"inputs_embeds": [None, None, d], "logits": [None, None, vocab], "hidden_states": [None, None, d],
                    **{f"{p}.{i}.{kv_name}": kv for i in range(llm.num_layers)
                       for p in ("past_key_values", "present") for kv_name in ("key", "value")}},
    }
    extra_want: dict[str, dict[str, Any]] = {
        "discrete_tokenizer": {"num_codes": q, "codebook_size": cfg.discrete.codebook_size},
        "patch_selector": {"k": k, "keep_ratio": m.keep_ratio},
        "decoder": {"num_layers": llm.num_layers, "num_kv_heads": llm.num_kv_heads, "head_dim": llm.head_dim,
                    "hidden_size": d, "vocab_size": vocab},
        "embed_tokens": {"vocab_size": vocab, "hidden_size": d},
        "vision_encoder": {"image_size": s, "patch_size": cfg.vision.patch_size, "num_patches": n},
    }
    problems: list[tuple[str, str]] = []
    for comp_name, comp in m.components.items():
        specs = {t.name: (side, i, t) for side in ("inputs", "outputs") for i, t in enumerate(getattr(comp, side))}
        for tensor, dims in want.get(comp_name, {}).items():
            if tensor not in specs:
                if not tensor.startswith(("past_key_values.", "present.")) or comp_name != "decoder":
                    problems.append((f"components.{comp_name}", f"has no tensor {tensor!r}"))
                continue
            side, i, spec = specs[tensor]
            field = f"components.{comp_name}.{side}[{i}].shape"
            if len(spec.shape) != len(dims):
                problems.append((field, f"{tensor} is {_dims(spec)}: {len(spec.shape)} axes, expected {len(dims)}"))
                continue
            for axis, (got, expected) in enumerate(zip(spec.shape, dims, strict=True)):
                if expected is not None and got != expected:
                    problems.append((field, f"{tensor} is {_dims(spec)}: axis {axis} should be {expected} "
                                            "(from the config)"))
                    break
        if comp_name == "decoder":
            past = [t for t in specs if t.startswith("past_key_values.") and t.endswith(".key")]
            if len(past) != llm.num_layers:
                problems.append((f"components.{comp_name}.inputs",
                                 f"has {len(past)} past_key_values.*.key inputs, config.llm.num_layers is "
                                 f"{llm.num_layers}"))
        extra = comp.extra.model_dump(exclude_unset=True)
        for key, expected in extra_want.get(comp_name, {}).items():
            if key in extra and extra[key] is not None and extra[key] != expected:
                problems.append((f"components.{comp_name}.extra.{key}",
                                 f"is {extra[key]!r}, but the config gives {expected!r}"))
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maven_edge.core.manifest_schema",
                                 description="Print (or write) the JSON Schema of manifest.json.")
    ap.add_argument("--write", metavar="PATH", help=f"write it here (the published copy is {SCHEMA_PATH})")
    ap.add_argument("--check", metavar="PATH", help="exit 1 unless PATH holds exactly the current schema")
    args = ap.parse_args(argv)
    text = schema_text()
    if args.check:
        current = Path(args.check).read_text() if Path(args.check).is_file() else ""
        if current != text:
            print(f"{args.check} is out of date; run python -m maven_edge.core.manifest_schema --write {args.check}",
                  file=sys.stderr)
            return 1
        return 0
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
