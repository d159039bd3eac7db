"""`manifest.json`: the only contract between export and every runtime (Python, C++, ...).

torch-free. The exporter writes it with :func:`write_manifest`; runtimes read it with
:func:`load_manifest`, which verifies the format version, the field types, that every listed file
exists inside the artifact directory (no path traversal), each file's sha256, and that every
external-data location written inside an ONNX file is one of the files listed for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maven_edge.core.config import MavenConfig
from maven_edge.core.errors import ArtifactError
from maven_edge.core.tokenizer import VocabLayout

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
    # What a runtime does besides running the files (tokenizer rules, prompt template, visual
    # sequence, h_eos, preprocessing numerics, stop tokens): core/host_contract.py, docs/hosts.md.
    # Written since the Node host (issue #37); {} in older manifests, which Python reads as before.
    host: dict[str, Any] = field(default_factory=dict)

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


@contextlib.contextmanager
def staged_artifacts(out: Path, clear: Callable[[Path], None]) -> Iterator[Path]:
    """Write a new artifact directory's files into a staging folder inside `out`, then swap them in.

    The body writes into the yielded folder. When it succeeds, ``clear(staging)`` removes what the
    new files replace (never the staging folder itself), and every staged item is moved into
    `out` with an atomic rename; on an error `out` keeps its previous contents. The staging folder
    is always removed. Used by the exporter and the quantizer.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        clear(staging)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_inside(directory: Path, relative: str) -> Path:
    """`directory / relative`, refusing absolute paths and anything that escapes the directory."""
    root = directory.resolve()
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or (candidate != root and root not in candidate.parents):
        raise ArtifactError(
            f"manifest entry {relative!r} points outside the artifact directory {root}; refusing to read it"
        )
    return candidate


_ENTRY_TYPES = {"path": str, "sha256": str, "size_bytes": int}
_TOP_TYPES: dict[str, type | tuple[type, ...]] = {
    "preset": str, "config": dict, "vocab": dict, "preprocess": dict, "mode": str, "keep_ratio": (int, float),
    "num_patches": int, "num_kept_patches": int, "components": dict, "tokenizer": dict, "target_ort": str,
    "exporter": dict, "recipe": str, "extra": dict, "host": dict,
}
_COMPONENT_TYPES: dict[str, type] = {
    "file": dict, "precision": str, "inputs": list, "outputs": list, "opsets": dict, "ir_version": int,
    "external_data": list, "extra": dict,
}


def _check_types(raw: dict[str, Any]) -> str | None:
    """What is wrong with the types of the fields a runtime reads (None when nothing is)."""

    def bad(where: str, value: Any, want: type | tuple[type, ...]) -> str | None:
        if isinstance(value, bool) or not isinstance(value, want):
            return f"{where} is {type(value).__name__}, expected {getattr(want, '__name__', 'a number')}"
        return None

    def entry(where: str, value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"{where} is {type(value).__name__}, expected an object"
        problems = (bad(f"{where}.{k}", value[k], t) for k, t in _ENTRY_TYPES.items() if k in value)
        return next((p for p in problems if p), None)

    for key, want in _TOP_TYPES.items():
        if key in raw and (problem := bad(key, raw[key], want)):
            return problem
    if not isinstance(raw.get("vocab"), dict):
        return "vocab is missing"
    for key in ("text_vocab_size", "tokenizer_size", "codebook_size"):
        if problem := bad(f"vocab.{key}", raw["vocab"].get(key), int):
            return problem
    if not isinstance(raw["vocab"].get("special_ids"), dict) or not all(
            isinstance(v, int) for v in raw["vocab"]["special_ids"].values()):
        return "vocab.special_ids must map token names to integer ids"
    if "tokenizer" in raw and (problem := entry("tokenizer", raw["tokenizer"])):
        return problem
    for name, comp in (raw.get("components") or {}).items():
        if not isinstance(comp, dict):
            return f"components.{name} is {type(comp).__name__}, expected an object"
        for key, want in _COMPONENT_TYPES.items():
            if key in comp and (problem := bad(f"components.{name}.{key}", comp[key], want)):
                return problem
        for i, e in enumerate([comp.get("file")] + list(comp.get("external_data", []))):
            if problem := entry(f"components.{name}." + ("file" if i == 0 else f"external_data[{i - 1}]"), e):
                return problem
    return None


def external_data_locations(path: Path) -> list[str]:
    """The external-data locations written inside an ONNX file, in every tensor it holds (graph
    initializers, node attributes, subgraphs, functions); [] when it has none.

    The file is scanned for the bytes ``location`` first (every external-data entry holds them), so
    a file without external data is never parsed. Parsing needs the ``onnx`` package.
    """
    import mmap

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm.find(b"location") < 0:
                return []
    try:
        import onnx
    except ImportError:
        raise ArtifactError(
            f"{path.name} may reference external data; checking where it points needs the onnx package "
            "(pip install onnx)"
        ) from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ArtifactError(f"{path.name} is not a valid ONNX file ({exc}); re-export the artifacts") from exc
    found: list[str] = []
    stack: list[Any] = [model]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto) and msg.data_location == onnx.TensorProto.EXTERNAL:
            for e in msg.external_data:
                if e.key == "location" and e.value not in found:
                    found.append(e.value)
        for fd, value in msg.ListFields():
            if fd.message_type is not None:
                stack.extend([value] if hasattr(value, "ListFields") else value)
    return found


def check_external_references(directory: Path, component: Component) -> None:
    """Refuse an ONNX file whose tensors point at external data outside the artifact directory or
    at any file the component's manifest entry does not list (and hash). Done before onnxruntime
    opens the file: older onnxruntime releases follow any location, even ``../../etc/shadow``."""
    onnx_path = resolve_inside(directory, component.file.path)
    listed = {resolve_inside(directory, e.path) for e in component.external_data}
    base = Path(component.file.path).parent
    for loc in external_data_locations(onnx_path):
        try:
            target = resolve_inside(directory, str(base / loc))
        except ArtifactError:
            raise ArtifactError(
                f"{component.file.path} references external data {loc!r} outside the artifact directory; "
                "refusing to load it (the file was tampered with): re-export the artifacts"
            ) from None
        if target not in listed:
            raise ArtifactError(
                f"{component.file.path} references external data {loc!r} that {MANIFEST} does not list for "
                "it; refusing to load unverified data: re-export the artifacts"
            )


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and check `manifest.json`. With `verify`, every file's sha256 is checked. Always: the
    field types, that every listed file is inside `directory`, and that the ONNX files reference
    external data only from the files listed for them."""
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
    problem = None
    try:
        problem = _check_types(raw)
        manifest = Manifest.from_dict(raw)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        problem = problem or f"{type(exc).__name__}: {exc}"
    if problem:
        raise ArtifactError(f"{path} does not follow the manifest schema: {problem}; re-export the artifacts")
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
    for comp in manifest.components.values():
        check_external_references(directory, comp)
    return manifest
