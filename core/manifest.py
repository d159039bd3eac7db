"""`manifest.json`: the only contract between export and every runtime (Python, C++, ...).

torch-free. The exporter writes it with :func:`write_manifest`; runtimes read it with
:func:`load_manifest`, which refuses a symlinked or oversized manifest, parses it with limits
(nesting depth, number sizes, valid Unicode), validates it against the declared schema
(:mod:`maven_edge.core.manifest_schema`, published as docs/manifest.schema.json) and its
cross-field rules, and checks that every listed file is a regular file inside the artifact
directory (no path traversal) with the listed size and sha256, and that every external-data
location written inside an ONNX file is one of the files listed for it. Every failure is an
:class:`ArtifactError` that names the file and the field. The runtimes then check each ONNX
graph's inputs and outputs against its component entry (:func:`check_graph_io`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maven_edge.core.config import MavenConfig
from maven_edge.core.errors import ArtifactError
from maven_edge.core.manifest_schema import (  # noqa: F401 - COMPONENTS, FORMAT_VERSION: part of this API
    COMPONENTS,
    FORMAT_VERSION,
    SCHEMA_PATH,
    ManifestModel,
    cross_check,
)
from maven_edge.core.tokenizer import VocabLayout

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20  # an export's manifest is ~12 KB; anything near this is not one


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
    """Write `manifest` as `directory`/manifest.json, after checking it against the schema and its
    cross-field rules (a writer that breaks the contract fails here, not on a device)."""
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    path = Path(directory) / MANIFEST
    validate_manifest_text(text.encode(), str(path))
    path.write_text(text)
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
    """`directory / relative`, refusing absolute paths and anything that escapes the directory
    (symlinks resolved first). An unresolvable path (a symlink loop, a name over the OS limit,
    a NUL byte) is an ArtifactError too."""
    try:
        root = directory.resolve()
        candidate = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
        raise ArtifactError(
            f"manifest entry {relative!r} cannot be resolved inside {directory} ({_reason(exc)}); re-export the "
            "artifacts"
        ) from None
    if Path(relative).is_absolute() or (candidate != root and root not in candidate.parents):
        raise ArtifactError(
            f"manifest entry {relative!r} points outside the artifact directory {root}; refusing to read it"
        )
    return candidate


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


def _reason(exc: BaseException) -> str:
    """An OS error as words: 'symlink loop', 'file name too long', ... (never a traceback)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return {errno.ELOOP: "a symlink loop", errno.ENAMETOOLONG: "a file name over the OS limit"}.get(
            exc.errno, os.strerror(exc.errno))
    if isinstance(exc, RuntimeError):
        return "a symlink loop"
    if isinstance(exc, ValueError) and "null" in str(exc):
        return "a NUL byte in the path"
    return f"{type(exc).__name__}: {exc}"


def _field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_manifest_text(data: bytes, label: str) -> ManifestModel:
    """Parse and validate manifest bytes: JSON limits, format version, schema, cross-field rules.
    Raises ArtifactError naming `label` (the file) and the field."""
    import pydantic
    import pydantic_core

    try:  # jiter: refuses nesting deeper than 200, numbers out of range, lone surrogates, NaN
        raw = pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError as exc:
        raise ArtifactError(f"{label} is not valid JSON ({exc}); re-export the artifacts") from None
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise ArtifactError(f"{label} is not a maven-edge manifest (no format_version)")
    version = raw["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(
            f"{label} has format version {_short(version)}; this maven-edge reads up to {FORMAT_VERSION}. "
            "Upgrade maven-edge or re-export with this version"
        )
    try:
        model = ManifestModel.model_validate_json(data, strict=True)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        shown = "; ".join(
            f"{_field_name(e['loc'])}: {e['msg'][0].lower() + e['msg'][1:]}"
            + (f" (got {_short(e['input'])})" if e["type"] not in ("missing", "json_invalid") else "")
            for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ArtifactError(
            f"{label} does not follow the manifest schema ({SCHEMA_PATH}): {shown}{more}; re-export the artifacts"
        ) from None
    problems = cross_check(model)
    if problems:
        shown = "; ".join(f"{where} {what}" for where, what in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        missing = next((what for where, what in problems if where == "components" and "lacks" in what), None)
        if missing:  # the most common edit: say it plainly
            raise ArtifactError(f"{label} {missing}; re-export the artifacts")
        raise ArtifactError(f"{label} is inconsistent: {shown}{more}; re-export the artifacts")
    return model


def _read_manifest_bytes(directory: Path) -> tuple[bytes, str]:
    """The bytes of `directory`/manifest.json: refused when the directory does not exist, when
    manifest.json is missing, a symlink, not a regular file or over MAX_MANIFEST_BYTES."""
    export_hint = f"export one with `maven-edge export --checkpoint DIR --out {directory}`"
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        raise ArtifactError(f"artifact directory {directory} does not exist; check the path, or {export_hint}") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"artifact directory {directory!s:.200} cannot be opened ({_reason(exc)})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ArtifactError(f"{directory} is not a directory; give the directory that holds {MANIFEST}")
    path = directory / MANIFEST
    label = str(path)
    try:
        # O_NOFOLLOW: the manifest names the files to trust and their hashes, so it must be this
        # directory's own file; a symlink (to anywhere, even inside) is refused, not followed.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{directory} has no {MANIFEST}; {export_hint}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise ArtifactError(
                f"{label} is a symlink; refusing to follow it (the manifest decides which files are trusted, so it "
                "must be a regular file inside the artifact directory): copy the file in place of the link"
            ) from None
        raise ArtifactError(f"{label} cannot be read ({_reason(exc)})") from None
    with os.fdopen(fd, "rb") as f:
        opened = os.fstat(f.fileno())
        if not stat.S_ISREG(opened.st_mode):
            raise ArtifactError(f"{label} is not a regular file; re-export the artifacts")
        if opened.st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(
                f"{label} is {opened.st_size / 2**20:.1f} MiB, over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may "
                "have (an export writes about 12 KB); re-export the artifacts"
            )
        try:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise ArtifactError(f"{label} cannot be read ({_reason(exc)})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{label} grew over {MAX_MANIFEST_BYTES >> 20} MiB while it was read; re-export the artifacts")
    return data, label


def _check_file(directory: Path, entry: FileEntry, verify: bool) -> None:
    target = resolve_inside(directory, entry.path)
    try:
        info = os.stat(target)
    except FileNotFoundError:
        raise ArtifactError(f"artifact file {entry.path} listed in {MANIFEST} is missing from {directory}") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"artifact file {entry.path!r} listed in {MANIFEST} cannot be opened ({_reason(exc)})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"artifact file {entry.path} listed in {MANIFEST} is not a regular file")
    if info.st_size != entry.size_bytes:
        raise ArtifactError(
            f"artifact file {entry.path} is {info.st_size} bytes, but {MANIFEST} lists size_bytes {entry.size_bytes}: "
            "it was modified or truncated; re-export the artifacts"
        )
    if verify:
        try:
            digest = sha256_file(target)
        except OSError as exc:
            raise ArtifactError(f"artifact file {entry.path} cannot be read ({_reason(exc)})") from None
        if digest != entry.sha256:
            raise ArtifactError(
                f"artifact file {entry.path} does not match the sha256 in {MANIFEST}: it was modified or "
                "corrupted; re-export the artifacts"
            )


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and check `manifest.json` (see the module docstring). With `verify`, every file's
    sha256 is checked; always: the schema and cross-field rules, that every listed file is a
    regular file inside `directory` with the listed size, and that the ONNX files reference
    external data only from the files listed for them. Raises ArtifactError."""
    directory = Path(directory)
    data, label = _read_manifest_bytes(directory)
    validate_manifest_text(data, label)
    manifest = Manifest.from_dict(json.loads(data))
    for entry in manifest.all_files():
        _check_file(directory, entry, verify)
    for comp in manifest.components.values():
        try:
            check_external_references(directory, comp)
        except ArtifactError:
            raise
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{comp.file.path} cannot be read ({_reason(exc)}); re-export the artifacts") from None
    return manifest


def check_graph_io(component: Component, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> list[str]:
    """What differs between a component's manifest entry and its graph's real inputs and outputs
    (names, element types, number of axes, and every axis one side fixes: a fixed size must be
    the same on both sides, and a size the manifest calls dynamic must not be fixed in the graph).
    Each problem names the manifest field. A graph's unnamed dynamic axis is written "?"."""
    problems: list[str] = []
    for side, actual in (("inputs", inputs), ("outputs", outputs)):
        declared = {t.name: (i, t) for i, t in enumerate(getattr(component, side))}
        real = {t.name: t for t in actual}
        if set(declared) != set(real):
            extra, missing = sorted(set(real) - set(declared)), sorted(set(declared) - set(real))
            problems.append(f"components.{component.name}.{side} lists {sorted(declared)}, the graph has "
                            f"{sorted(real)} (not listed: {extra}, not in the graph: {missing})")
            continue
        for name, (i, spec) in declared.items():
            got = real[name]
            where = f"components.{component.name}.{side}[{i}]"
            if spec.dtype != got.dtype:
                problems.append(f"{where}.dtype is {spec.dtype!r} for {name}, the graph's is {got.dtype!r}")
            if len(spec.shape) != len(got.shape):
                problems.append(f"{where}.shape is {spec.shape} for {name}, the graph's is {got.shape}")
                continue
            for axis, (want, real_dim) in enumerate(zip(spec.shape, got.shape, strict=True)):
                if isinstance(real_dim, int) and want != real_dim:
                    problems.append(f"{where}.shape is {spec.shape} for {name}, the graph's is {got.shape} "
                                    f"(axis {axis})")
                    break
    return problems
