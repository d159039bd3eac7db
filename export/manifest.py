"""`manifest.json`: the only contract between export and every runtime (Python, C++, ...).

torch-free. The exporter writes it with :func:`write_manifest`; runtimes read it with
:func:`load_manifest`, which verifies the format version, that every listed file exists inside
the artifact directory (no path traversal), and each file's sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model_src.config import MavenConfig
from model_src.errors import ArtifactError
from model_src.tokenizer import VocabLayout

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPONENTS = ("vision_encoder", "discrete_tokenizer", "embed_tokens", "patch_selector", "decoder")


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, ...
    shape: list[int | str]  # ints for fixed axes, names for symbolic axes


@dataclass
class FileEntry:
    path: str  # relative to the artifact directory
    sha256: str
    size_bytes: int


@dataclass
class Component:
    name: str
    file: FileEntry
    precision: str  # fp32, fp16, int8, int4, ...
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opsets: dict[str, int]  # domain ("" = ai.onnx) -> version
    ir_version: int
    external_data: list[FileEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. decoder: num_layers, kv heads, head_dim


@dataclass
class Manifest:
    preset: str
    config: dict[str, Any]  # MavenConfig.to_dict()
    vocab: dict[str, Any]  # VocabLayout.to_dict()
    preprocess: dict[str, Any]  # image_size, mean, std, resample, pad_to_square
    mode: str
    keep_ratio: float
    num_patches: int
    num_kept_patches: int  # k, fixed in patch_selector.onnx
    components: dict[str, Component]
    tokenizer: FileEntry
    target_ort: str  # oldest onnxruntime release the files load in
    exporter: dict[str, str]  # versions of torch, onnx, onnxruntime, maven-edge used
    recipe: str = "fp32"  # quantization recipe that produced the files
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # -- views the runtime needs --------------------------------------------------------------
    def maven_config(self) -> MavenConfig:
        return MavenConfig.from_dict(self.config)

    def vocab_layout(self) -> VocabLayout:
        v = self.vocab
        return VocabLayout(v["text_vocab_size"], v["tokenizer_size"], v["codebook_size"], v["special_ids"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["components"] = {
            k: Component(
                **{
                    **c,
                    "file": FileEntry(**c["file"]),
                    "inputs": [TensorSpec(**t) for t in c["inputs"]],
                    "outputs": [TensorSpec(**t) for t in c["outputs"]],
                    "external_data": [FileEntry(**e) for e in c.get("external_data", [])],
                }
            )
            for k, c in d["components"].items()
        }
        d["tokenizer"] = FileEntry(**d["tokenizer"])
        return cls(**d)

    def all_files(self) -> list[FileEntry]:
        files = [self.tokenizer]
        for c in self.components.values():
            files.append(c.file)
            files.extend(c.external_data)
        return files


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(directory: Path, path: Path) -> FileEntry:
    return FileEntry(str(path.relative_to(directory)), sha256_file(path), path.stat().st_size)


def write_manifest(manifest: Manifest, directory: str | Path) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def resolve_inside(directory: Path, relative: str) -> Path:
    """`directory / relative`, refusing absolute paths and anything that escapes the directory."""
    root = directory.resolve()
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or (candidate != root and root not in candidate.parents):
        raise ArtifactError(
            f"manifest entry {relative!r} points outside the artifact directory {root}; refusing to read it"
        )
    return candidate


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and check `manifest.json`. With `verify`, every file's sha256 is checked."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{directory} has no {MANIFEST}; export one with `maven-edge export --checkpoint DIR --out {directory}`"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise ArtifactError(f"{path} is not a maven-edge manifest (no format_version)")
    version = raw["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {version!r}; this maven-edge reads up to {FORMAT_VERSION}. "
            "Upgrade maven-edge or re-export with this version"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (TypeError, KeyError) as exc:
        raise ArtifactError(f"{path} does not follow the manifest schema: {exc}") from exc
    missing = [name for name in COMPONENTS if name not in manifest.components]
    if missing:
        raise ArtifactError(f"{path} lacks component(s) {missing}")
    for entry in manifest.all_files():
        target = resolve_inside(directory, entry.path)
        if not target.is_file():
            raise ArtifactError(f"artifact file {entry.path} listed in {MANIFEST} is missing from {directory}")
        if verify and sha256_file(target) != entry.sha256:
            raise ArtifactError(
                f"artifact file {entry.path} does not match the sha256 in {MANIFEST}: it was modified or "
                "corrupted; re-export the artifacts"
            )
    return manifest
