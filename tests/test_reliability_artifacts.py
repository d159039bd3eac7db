"""Reliability of artifact loading (issue 8, part 3): tampered, missing, newer or escaping files.

Every refusal is an :class:`ArtifactError` (or :class:`CheckpointError`) that names the file, and
happens before onnxruntime builds a single session: the tests replace
``onnxruntime.InferenceSession`` with a tripwire. The artifacts are the seeded random test model
(exported once per machine into pytest's cache, shared with tests/test_runtime.py); a copy with all
weights in external-data files is made per module.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from maven_edge.core.errors import ArtifactError, CheckpointError, MavenError
from maven_edge.core.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    external_data_locations,
    load_manifest,
    sha256_file,
)

ROOT = Path(__file__).resolve().parents[1]
COMPONENT_NAMES = (
    "vision_encoder",
    "discrete_tokenizer",
    "embed_tokens",
    "patch_selector",
    "projector",
    "decoder",
)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def artifacts(pytestconfig) -> Path:
    from tools.soak import cached_test_artifacts

    return cached_test_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"))


def to_external_data(directory: Path) -> None:
    """Move every component's weights into `<file>.onnx.data` and rewrite the manifest to match."""
    import onnx

    from maven_edge.core.manifest import file_entry, write_manifest

    manifest = load_manifest(directory, verify=False)
    for comp in manifest.components.values():
        path = directory / comp.file.path
        model = onnx.load(str(path))
        data = path.name + ".data"
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data,
            size_threshold=1024,
        )
        comp.file = file_entry(directory, path)
        comp.external_data = [file_entry(directory, directory / data)]
    write_manifest(manifest, directory)


@pytest.fixture(scope="module")
def ext_artifacts(artifacts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ext") / "art"
    shutil.copytree(artifacts, out)
    to_external_data(out)
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(src: Path) -> Path:
        dst = tmp_path / "art"
        shutil.copytree(src, dst)  # copies contents: never touch the shared cache (files may be hard links)
        return dst

    return make


class SessionTripwire(BaseException):
    """Not an Exception, so the backend's `except Exception` cannot turn it into an ArtifactError."""


@pytest.fixture
def no_sessions(monkeypatch):
    """Any attempt to build an onnxruntime session fails the test."""
    import onnxruntime as ort

    def tripwire(*a: Any, **k: Any) -> None:
        raise SessionTripwire("an InferenceSession was created for artifacts that should have been refused")

    monkeypatch.setattr(ort, "InferenceSession", tripwire)


def load_pipeline(directory: Path, **kw: Any):
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.pipeline import MavenPipeline

    return MavenPipeline.from_artifacts(
        directory, providers=["cpu"], session_options=SessionConfig(intra_op_num_threads=1), **kw
    )


def flip_byte(path: Path, where: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(int(size * where))
        b = f.read(1)
        f.seek(int(size * where))
        f.write(bytes([b[0] ^ 0x01]))


def edit_manifest(directory: Path, fn) -> None:
    path = directory / MANIFEST
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def set_locations(onnx_path: Path, location: str) -> None:
    """Point every external tensor of `onnx_path` at `location` (without touching the data)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(onnx_path))


def rehash(directory: Path, component: str) -> None:
    """Make the manifest agree with the component's current .onnx file (a consistent forgery)."""
    f = directory / f"{component}.onnx"

    def fix(raw: dict) -> None:
        raw["components"][component]["file"].update(sha256=sha256_file(f), size_bytes=f.stat().st_size)

    edit_manifest(directory, fix)


# ---- sanity: both layouts load and agree -----------------------------------------------------------


def test_external_data_layout_loads_and_answers_the_same(artifacts, ext_artifacts):
    m = load_manifest(ext_artifacts)
    assert all(len(c.external_data) == 1 for c in m.components.values())
    assert all(
        external_data_locations(ext_artifacts / c.file.path) == [c.file.path + ".data"]
        for c in m.components.values()
    )
    assert external_data_locations(artifacts / "decoder.onnx") == []
    a = load_pipeline(artifacts).generate([], "Question: what is red?\nAnswer:", max_new_tokens=4)
    b = load_pipeline(ext_artifacts).generate([], "Question: what is red?\nAnswer:", max_new_tokens=4)
    assert a.token_ids == b.token_ids


# ---- tampered files: sha256 -------------------------------------------------------------------------


TAMPER_TARGETS = (
    ["tokenizer.json"] + [f"{c}.onnx" for c in COMPONENT_NAMES] + [f"{c}.onnx.data" for c in COMPONENT_NAMES]
)


@pytest.mark.parametrize("name", TAMPER_TARGETS)
def test_flipped_byte_is_refused_with_the_file_name(ext_artifacts, copy_of, no_sessions, name):
    art = copy_of(ext_artifacts)
    flip_byte(art / name)
    with pytest.raises(ArtifactError, match=rf"{re.escape(name)} does not match the sha256") as exc:
        load_pipeline(art)
    assert "re-export" in str(exc.value)


@pytest.mark.parametrize("where", [0.0, 0.999])
def test_flipped_first_and_last_byte_of_an_inline_model(artifacts, copy_of, no_sessions, where):
    art = copy_of(artifacts)
    flip_byte(art / "decoder.onnx", where)
    with pytest.raises(ArtifactError, match="decoder.onnx does not match the sha256"):
        load_pipeline(art)


def test_verify_false_skips_hashes_but_not_paths(ext_artifacts, copy_of):
    """--no-verify is for trusted, slow storage: the hash check goes, the containment checks stay."""
    art = copy_of(ext_artifacts)
    flip_byte(art / "tokenizer.json", 0.0)  # '{' -> 'z': not JSON any more
    with pytest.raises(MavenError, match="tokenizer"):
        load_pipeline(art, verify=False)
    art2 = art.parent / "art2"
    shutil.copytree(ext_artifacts, art2)
    set_locations(art2 / "decoder.onnx", "../decoder.onnx.data")
    size = (art2 / "decoder.onnx").stat().st_size  # a forgery with the right size (sizes are checked without verify)
    edit_manifest(art2, lambda raw: raw["components"]["decoder"]["file"].update(size_bytes=size))
    shutil.copy(art2 / "decoder.onnx.data", art2.parent / "decoder.onnx.data")
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        load_manifest(art2, verify=False)


# ---- missing files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TAMPER_TARGETS)
def test_missing_file_is_refused_with_its_name(ext_artifacts, copy_of, no_sessions, name):
    art = copy_of(ext_artifacts)
    (art / name).unlink()
    with pytest.raises(ArtifactError, match=rf"{re.escape(name)} listed in manifest.json is missing"):
        load_pipeline(art)


def test_missing_manifest_and_directory(tmp_path, no_sessions):
    with pytest.raises(ArtifactError, match="no manifest.json.*maven-edge export"):
        load_pipeline(tmp_path)
    with pytest.raises(ArtifactError, match=r"artifact directory .*does-not-exist does not exist; check the path"):
        load_pipeline(tmp_path / "does-not-exist")


def test_missing_component_entry(artifacts, copy_of, no_sessions):
    art = copy_of(artifacts)
    edit_manifest(art, lambda raw: raw["components"].pop("decoder"))
    with pytest.raises(ArtifactError, match=r"lacks component\(s\) \['decoder'\]"):
        load_pipeline(art)


# ---- manifest format --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, match",
    [
        (
            FORMAT_VERSION + 1,
            rf"format version {FORMAT_VERSION + 1}; this maven-edge reads up to {FORMAT_VERSION}",
        ),
        (99, "format version 99"),
        ("1", "format version '1'"),
        (None, "format version None"),
        (1.5, "format version 1.5"),
    ],
)
def test_newer_or_odd_format_version_is_refused(artifacts, copy_of, no_sessions, version, match):
    art = copy_of(artifacts)
    edit_manifest(art, lambda raw: raw.update(format_version=version))
    with pytest.raises(ArtifactError, match=match):
        load_pipeline(art)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2, 3]", "no format_version"),
        (b'{"format_version": 1}', "schema"),
        (b'{"format_version": 1, "components": []}', "schema"),
    ],
)
def test_broken_manifest_files(artifacts, copy_of, no_sessions, content, match):
    art = copy_of(artifacts)
    (art / MANIFEST).write_bytes(content)
    with pytest.raises(ArtifactError, match=match):
        load_pipeline(art)


# The manifest fuzzer (2,000 mutated manifests through load + backend + generate) lives in
# tests/test_manifest_schema.py with the declared schema it exercises.


# ---- paths: traversal, absolute paths, symlinks -------------------------------------------------------


def _entry(raw: dict, where: str) -> dict:
    if where == "tokenizer":
        return raw["tokenizer"]
    if where == "component":
        return raw["components"]["decoder"]["file"]
    return raw["components"]["decoder"]["external_data"][0]


@pytest.mark.parametrize("where", ["tokenizer", "component", "external_data"])
@pytest.mark.parametrize("kind", ["parent", "deep_parent", "absolute", "dotdot_inside"])
def test_manifest_paths_outside_the_directory_are_refused(ext_artifacts, tmp_path, no_sessions, where, kind):
    """The entry points at a byte-identical copy outside the directory (same sha256): only the
    path can make it wrong."""
    art = tmp_path / "a" / "b" / "art"
    shutil.copytree(ext_artifacts, art)
    name = _entry(json.loads((art / MANIFEST).read_text()), where)["path"]
    outside = {
        "parent": art.parent / name,
        "deep_parent": tmp_path / name,
        "absolute": tmp_path / "abs" / name,
        "dotdot_inside": art.parent / name,
    }[kind]
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(art / name, outside)
    rel = {
        "parent": f"../{name}",
        "deep_parent": f"../../../{name}",
        "absolute": str(outside),
        "dotdot_inside": f"sub/../../{name}",
    }[kind]
    edit_manifest(art, lambda raw: _entry(raw, where).update(path=rel))
    with pytest.raises(ArtifactError, match="points outside the artifact directory"):
        load_pipeline(art)


@pytest.mark.parametrize("name", ["decoder.onnx", "decoder.onnx.data", "tokenizer.json"])
def test_symlink_out_of_the_directory_is_refused(ext_artifacts, tmp_path, no_sessions, name):
    art = tmp_path / "art"
    shutil.copytree(ext_artifacts, art)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    os.replace(art / name, outside)
    (art / name).symlink_to(outside)  # same bytes, same sha256
    with pytest.raises(ArtifactError, match="points outside the artifact directory"):
        load_pipeline(art)


# ---- external-data locations written inside the ONNX files (enforced in load_manifest) -----------------


@pytest.mark.parametrize("kind", ["parent", "absolute", "unlisted_inside", "other_component"])
def test_external_data_location_outside_or_unlisted_is_refused(ext_artifacts, tmp_path, no_sessions, kind):
    """A consistent forgery: decoder.onnx is rewritten to read its weights from elsewhere and the
    manifest's sha256 is updated to match, so only the location check can catch it. onnxruntime
    >= 1.24 refuses the first two itself; older releases, and the in-directory cases, rely on us."""
    art = tmp_path / "x" / "art"
    shutil.copytree(ext_artifacts, art)
    data = art / "decoder.onnx.data"
    loc = {
        "parent": "../decoder.onnx.data",
        "absolute": str(tmp_path / "abs.data"),
        "unlisted_inside": "unlisted.data",
        "other_component": "embed_tokens.onnx.data",
    }[kind]
    for target in (art.parent / "decoder.onnx.data", tmp_path / "abs.data", art / "unlisted.data"):
        shutil.copy(data, target)
    set_locations(art / "decoder.onnx", loc)
    rehash(art, "decoder")
    want = "outside the artifact directory" if kind in ("parent", "absolute") else "does not list"
    with pytest.raises(
        ArtifactError, match=rf"decoder.onnx references external data {re.escape(repr(loc))}.*{want}"
    ):
        load_pipeline(art)


def test_external_data_locations_found_in_every_tensor(tmp_path):
    """Node attributes, subgraphs and sparse tensors are searched too, not only graph initializers."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def ext(name: str, loc: str) -> TensorProto:
        t = numpy_helper.from_array(np.zeros(4, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=loc)
        return t

    then = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=ext("c1", "../sub.data"))],
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=ext("c0", "/abs/const.data")),
        helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=then),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
        initializer=[ext("w", "w.data")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert sorted(external_data_locations(path)) == ["../sub.data", "/abs/const.data", "w.data"]


def test_truncated_onnx_with_location_bytes_is_an_artifact_error(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff\x0f location garbage")
    with pytest.raises(ArtifactError, match="bad.onnx is not a valid ONNX file"):
        external_data_locations(path)


# ---- no pickle: checkpoints are safetensors only --------------------------------------------------------


class _Payload:
    """Unpickling this creates a directory: the proof that a loader executed pickle code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_disguised_as_safetensors_is_refused_without_running_it(tmp_path):
    import torch

    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import (
        CONFIG,
        TOKENIZER,
        WEIGHTS,
        build_model,
        load_checkpoint,
        save_checkpoint,
    )

    ckpt = save_checkpoint(build_model(get_config("tiny", ["llm.num_layers=1"]), seed=0), tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    torch.save({"weight": _Payload(marker)}, ckpt / WEIGHTS)  # a torch zip pickle under the safetensors name
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(ckpt)
    (ckpt / WEIGHTS).write_bytes(pickle.dumps(_Payload(marker)))  # a bare pickle
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(ckpt)
    assert not marker.exists(), "the checkpoint loader executed pickled code"
    # PyTorch's own formats are not read at all, even when they are the only weights there
    (ckpt / WEIGHTS).unlink()
    torch.save({"weight": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"no {WEIGHTS}"):
        load_checkpoint(ckpt)
    assert (ckpt / CONFIG).is_file() and (ckpt / TOKENIZER).is_file()


_UNSAFE_LOADS = re.compile(r"allow_pickle\s*=\s*True|weights_only\s*=\s*False")


def test_no_unsafe_deserialisation_in_the_code_base():
    """tests/test_checkpoint.py forbids pickle, torch.save and torch.load; this adds numpy's pickle
    switch and torch.load's unsafe mode, should either ever come back."""
    offenders = []
    for folder in ("model_src", "runtime", "export", "calibration", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for m in _UNSAFE_LOADS.finditer(path.read_text(errors="replace")):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not offenders, offenders


def test_exported_artifacts_hold_no_pickles(ext_artifacts):
    for f in ext_artifacts.iterdir():
        head = f.read_bytes()[:4]
        assert head[:1] != b"\x80" and not head.startswith(b"PK"), f"{f.name} looks like a pickle / torch zip"
    assert json.loads((ext_artifacts / MANIFEST).read_text())["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize(
    "override",
    [
        "vision.patch_size=0",
        "llm.num_heads=0",
        "llm.num_kv_heads=0",
        "discrete.num_heads=0",
        "vision.num_heads=0",
        "llm.hidden_size=-1",
    ],
)
def test_config_with_a_zero_divisor_is_a_config_error(artifacts, copy_of, no_sessions, override):
    """Regression (found by the manifest fuzz): a zero head count or patch size in a manifest's or
    checkpoint's config raised ZeroDivisionError from MavenConfig.validate. In a manifest it is an
    ArtifactError naming the field (the schema's range), in a checkpoint or --set a ConfigError."""
    from maven_edge.core.config import get_config
    from maven_edge.core.errors import ConfigError

    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be an integer >= 1"):
        get_config("tiny", [override])
    art = copy_of(artifacts)
    section, name = key.split(".")
    edit_manifest(art, lambda raw: raw["config"][section].update({name: int(value)}))
    with pytest.raises(ArtifactError, match=rf"manifest.json does not follow the manifest schema .*config\.{re.escape(key)}: "
                       "input should be greater than or equal to 1"):
        load_pipeline(art)
