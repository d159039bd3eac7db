"""The declared manifest schema (issue 31): every edit of manifest.json is an ArtifactError naming
the file and the field, never a traceback and never a late failure inside onnxruntime.

- the published JSON Schema (docs/manifest.schema.json) is what the pydantic models say, and a
  JSON Schema validator in any language accepts a real manifest and refuses broken ones;
- each case the red-team run found (NUL byte, over-long name, symlink loop, lone surrogate, deep
  nesting, a 5,000-digit integer, unchecked ranges, contradictions between manifest and graphs,
  a symlinked manifest.json) is refused with the field named;
- a Hypothesis fuzzer runs FUZZ_EXAMPLES mutated manifests (types, ranges, paths, nesting, huge
  numbers, unicode, swapped entries) through load + backend, and a generate for those that load:
  only ArtifactError may escape.

The artifacts are the seeded random test model (tools/soak.py), exported once per machine.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maven_edge.core.errors import ArtifactError
from maven_edge.core.manifest import MANIFEST, load_manifest
from maven_edge.core.manifest_schema import SCHEMA_PATH, json_schema, schema_text

ROOT = Path(__file__).resolve().parents[1]
SOAK = bool(os.environ.get("MAVEN_SOAK"))
FUZZ_EXAMPLES = int(os.environ.get("MAVEN_FUZZ_N", 0)) or (20_000 if SOAK else 2_000)
PROMPT = "<image>\nQuestion: what color is the circle?\nAnswer:"


@pytest.fixture(scope="module")
def artifacts(pytestconfig) -> Path:
    from tools.soak import cached_test_artifacts

    return cached_test_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"))


@pytest.fixture(scope="module")
def raw_manifest(artifacts) -> dict:
    return json.loads((artifacts / MANIFEST).read_text())


@pytest.fixture
def art(artifacts, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(artifacts, dst)
    return dst


def edit(directory: Path, fn) -> None:
    raw = json.loads((directory / MANIFEST).read_text())
    fn(raw)
    (directory / MANIFEST).write_text(json.dumps(raw))


def backend(directory: Path, **kw: Any):
    from maven_edge.runtime.backends.ort_backend import OrtBackend, SessionConfig

    return OrtBackend(directory, session_options=SessionConfig(intra_op_num_threads=1), **kw)


# ---- the published schema ----------------------------------------------------------------------


def test_published_json_schema_is_up_to_date():
    published = (ROOT / SCHEMA_PATH).read_text()
    assert published == schema_text(), (
        f"{SCHEMA_PATH} is out of date: run python -m maven_edge.core.manifest_schema --write {SCHEMA_PATH}")
    done = subprocess.run([sys.executable, "-m", "maven_edge.core.manifest_schema", "--check", SCHEMA_PATH],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_json_schema_validator_agrees(raw_manifest):
    """What a host in another language does with the published file: a real manifest is valid,
    a retyped, out-of-range or unknown field is not."""
    import jsonschema

    schema = json.loads((ROOT / SCHEMA_PATH).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    assert list(validator.iter_errors(raw_manifest)) == []
    for path, value in [
        (("num_kept_patches",), -3), (("vocab", "codebook_size"), -1), (("format_version",), 0),
        (("format_version",), True), (("mode",), "holographic"), (("components", "decoder", "file", "size_bytes"), "1"),
        (("components", "decoder", "file", "sha256"), "abc"), (("config", "llm", "num_heads"), 0),
        (("components", "decoder", "extra", "past_present_share_buffer"), "yes"),
        (("tokenizer", "path"), "a\u0000b"), (("unknown_field",), 1),
    ]:
        bad = copy.deepcopy(raw_manifest)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert list(validator.iter_errors(bad)), f"the JSON Schema accepts {path} = {value!r}"


# ---- the red-team cases, one by one --------------------------------------------------------------


def _set(path: tuple, value: Any):
    def fn(raw: dict) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return fn


FIELD_CASES = [
    # (edit, the field the message must name, a phrase of the message)
    (_set(("num_kept_patches",), -3), "num_kept_patches", "greater than or equal to 1"),
    (_set(("num_kept_patches",), 65), "num_kept_patches", "more than num_patches"),
    (_set(("vocab", "codebook_size"), -1), "vocab.codebook_size", "greater than or equal to 1"),
    (_set(("vocab", "tokenizer_size"), 10**12), "vocab.tokenizer_size", "less than or equal to"),
    (_set(("vocab", "tokenizer_size"), 100_000), "vocab.tokenizer_size", "more than text_vocab_size"),
    (_set(("mode",), "holographic"), "mode", "input should be 'hybrid', 'discrete' or 'continuous'"),
    (_set(("keep_ratio",), 1.5), "keep_ratio", "less than or equal to 1"),
    (_set(("components", "decoder", "file", "size_bytes"), -1), "components.decoder.file.size_bytes", "greater than or equal to 0"),
    (_set(("components", "decoder", "file", "sha256"), "not-a-hash"), "components.decoder.file.sha256", "pattern"),
    (_set(("components", "decoder", "opsets", ""), 0), "components.decoder.opsets.", "greater than or equal to 1"),
    (_set(("components", "decoder", "inputs", 0, "dtype"), "complex64"), "components.decoder.inputs[0].dtype", ""),
    (_set(("components", "discrete_tokenizer", "outputs", 0, "shape"), ["images", 16]),
     "components.discrete_tokenizer.outputs[0].shape", "visual_codes is [images, 16]: axis 1 should be 32"),
    (_set(("components", "decoder", "extra", "past_present_share_buffer"), "yes"),
     "components.decoder.extra.past_present_share_buffer", "valid boolean"),
    (_set(("config", "discrete", "num_codes"), 16), "components.discrete_tokenizer.outputs[0].shape", "axis 1"),
    (_set(("components", "decoder", "name"), "projector"), "components.decoder.name", "but the entry is"),
    (_set(("preprocess", "image_size"), 65), "preprocess.image_size", "config.preprocess.image_size"),
    (_set(("vocab", "special_ids", "<eos>"), 900), "vocab.special_ids", "not below tokenizer_size"),
    (_set(("extra",), []), "extra", "input should be an object"),
    (_set(("surprise",), 1), "surprise", "extra inputs are not permitted"),
]


@pytest.mark.parametrize("fn, field, phrase", FIELD_CASES, ids=[c[1] + ":" + c[2][:20] for c in FIELD_CASES])
def test_unchecked_fields_are_refused_naming_the_field(art, fn, field, phrase):
    edit(art, fn)
    with pytest.raises(ArtifactError) as exc:
        load_manifest(art, verify=False)
    message = str(exc.value)
    assert str(art / MANIFEST) in message and field in message and phrase in message, message


@pytest.mark.parametrize("version", [0, -1, True, 2, "1", 1.0, None])
def test_odd_format_versions(art, version):
    edit(art, _set(("format_version",), version))
    with pytest.raises(ArtifactError, match=r"manifest.json has format version .* reads up to 1"):
        load_manifest(art, verify=False)


def test_wrong_size_bytes_is_refused_without_hashing(art):
    edit(art, lambda raw: raw["components"]["projector"]["file"].update(size_bytes=1234))
    with pytest.raises(ArtifactError, match=r"artifact file projector.onnx is \d+ bytes, but manifest.json lists "
                                            r"size_bytes 1234"):
        load_manifest(art, verify=False)


def _raw_text(raw: dict, marker: str, replacement: str) -> bytes:
    return json.dumps(raw).replace(json.dumps(marker), replacement).encode()


@pytest.mark.parametrize("kind", ["nul", "long_name", "long_path", "symlink_loop", "surrogate_escape",
                                  "surrogate_bytes", "deep_nesting", "huge_int", "nan", "directory",
                                  "fifo", "not_utf8"])
def test_red_team_edits_are_artifact_errors(art, raw_manifest, kind):
    """The 15 edits of the red-team run that gave a raw traceback, and their relatives."""
    raw = copy.deepcopy(raw_manifest)
    entry = raw["components"]["decoder"]["file"]
    if kind == "nul":
        entry["path"] = "decoder\u0000.onnx"
        data = json.dumps(raw).encode()
    elif kind == "long_name":
        entry["path"] = "d" * 300 + ".onnx"
        data = json.dumps(raw).encode()
    elif kind == "long_path":
        entry["path"] = "/".join(["dir"] * 400)
        data = json.dumps(raw).encode()
    elif kind == "symlink_loop":
        os.symlink("loop_b", art / "loop_a")
        os.symlink("loop_a", art / "loop_b")
        entry["path"] = "loop_a"
        data = json.dumps(raw).encode()
    elif kind == "surrogate_escape":
        entry["path"] = "@@"
        data = _raw_text(raw, "@@", '"decoder\\ud800.onnx"')
    elif kind == "surrogate_bytes":  # a surrogate written as UTF-8 bytes (CESU-8): not valid UTF-8
        data = json.dumps(raw).encode().replace(b'"decoder.onnx"', b'"decoder\xed\xa0\x80.onnx"', 1)
    elif kind == "deep_nesting":
        raw["extra"]["deep"] = "@@"
        data = _raw_text(raw, "@@", "[" * 5000 + "]" * 5000)
    elif kind == "huge_int":
        entry["size_bytes"] = "@@"
        data = _raw_text(raw, "@@", "9" * 5000)
    elif kind == "nan":
        raw["keep_ratio"] = "@@"
        data = _raw_text(raw, "@@", "NaN")
    elif kind == "directory":
        (art / "sub").mkdir()
        entry["path"] = "sub"
        data = json.dumps(raw).encode()
    elif kind == "fifo":
        os.mkfifo(art / "pipe")
        entry["path"] = "pipe"
        data = json.dumps(raw).encode()
    else:  # not_utf8
        data = json.dumps(raw).encode().replace(b'"tiny"', b'"ti\xffny"')
    (art / MANIFEST).write_bytes(data)
    with pytest.raises(ArtifactError) as exc:
        load_manifest(art, verify=False)
    assert str(art) in str(exc.value) or "manifest entry" in str(exc.value) or "artifact file" in str(exc.value)


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_a_symlinked_manifest_is_refused(art, tmp_path, where):
    """manifest.json decides which files are trusted and what their hashes are, so it is never
    followed through a symlink, wherever the link points (a copy is loaded fine)."""
    real = (art / "elsewhere.json") if where == "inside" else (tmp_path / "manifest-outside.json")
    shutil.move(art / MANIFEST, real)
    os.symlink(real, art / MANIFEST)
    with pytest.raises(ArtifactError, match=r"manifest.json is a symlink; refusing to follow it"):
        load_manifest(art)
    os.unlink(art / MANIFEST)
    shutil.copy(real, art / MANIFEST)
    assert load_manifest(art).num_kept_patches == 16


def test_missing_directory_and_file_instead_of_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"artifact directory .*nope does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        load_manifest(tmp_path / "file")
    with pytest.raises(ArtifactError, match="cannot be opened"):
        load_manifest(tmp_path / ("x" * 5000))


def test_oversized_manifest_is_refused_before_parsing(art):
    (art / MANIFEST).write_bytes(b" " * (5 << 20))
    with pytest.raises(ArtifactError, match="over the 4 MiB a manifest may have"):
        load_manifest(art)


# ---- manifest vs graphs ------------------------------------------------------------------------------


def _consistent_num_codes(raw: dict, q: int) -> None:
    """A manifest whose own fields all agree on `q` codes per image (the graph still makes 32)."""
    raw["config"]["discrete"]["num_codes"] = q
    raw["components"]["discrete_tokenizer"]["outputs"][0]["shape"] = ["images", q]
    raw["components"]["discrete_tokenizer"]["extra"]["num_codes"] = q


def test_num_codes_contradicting_the_tokenizer_graph(art):
    edit(art, lambda raw: _consistent_num_codes(raw, 16))
    load_manifest(art, verify=False)  # self-consistent ...
    with pytest.raises(ArtifactError, match=r"discrete_tokenizer.onnx does not match manifest.json: "
                                            r"components.discrete_tokenizer.outputs\[0\].shape is \['images', 16\] "
                                            r"for visual_codes, the graph's is \['images', 32\]"):
        backend(art)  # ... but not what the graph computes: refused at load, not an AssertionError at generate


def test_share_buffer_flag_contradicting_the_decoder_graph(art):
    edit(art, _set(("components", "decoder", "extra", "past_present_share_buffer"), True))
    with pytest.raises(ArtifactError, match=r"decoder.onnx cannot run the KV-cache loop manifest.json declares "
                                            r"\(components.decoder.extra: past_present_share_buffer\)"):
        backend(art)  # at load, not an onnxruntime shape error in the first generate


def test_dtype_and_names_contradicting_the_graph(art):
    edit(art, _set(("components", "projector", "outputs", 0, "dtype"), "float16"))
    with pytest.raises(ArtifactError, match=r"projector.onnx does not match manifest.json: components.projector."
                                            r"outputs\[0\].dtype is 'float16' for projected_embeds"):
        backend(art)
    edit(art, _set(("components", "projector", "outputs", 0, "dtype"), "float32"))
    edit(art, _set(("components", "vision_encoder", "outputs", 0, "name"), "features"))
    with pytest.raises(ArtifactError, match=r"has no tensor 'patch_features'"):
        load_manifest(art)  # the contract's tensor names are part of the schema's rules ...
    edit(art, _set(("components", "vision_encoder", "outputs", 0, "name"), "patch_features"))
    edit(art, _set(("components", "embed_tokens", "inputs", 0, "name"), "ids"))
    with pytest.raises(ArtifactError, match=r"has no tensor 'input_ids'"):
        load_manifest(art)
    from maven_edge.core.manifest import Component, TensorSpec, check_graph_io

    comp = Component("c", None, "fp32", [TensorSpec("a", "float32", ["n", 3])], [TensorSpec("y", "int64", [2])], {}, 1)
    assert check_graph_io(comp, [TensorSpec("b", "float32", ["n", 3])], [TensorSpec("y", "int64", [2])]) == [
        "components.c.inputs lists ['a'], the graph has ['b'] (not listed: ['b'], not in the graph: ['a'])"]
    assert check_graph_io(comp, [TensorSpec("a", "float32", [5, 3])], [TensorSpec("y", "int64", ["m"])]) == [
        "components.c.inputs[0].shape is ['n', 3] for a, the graph's is [5, 3] (axis 0)"]  # ... and graph vs entry


def test_tokenizer_size_contradicting_tokenizer_json(art):
    edit(art, _set(("vocab", "tokenizer_size"), 505))
    with pytest.raises(ArtifactError, match=r"tokenizer.json has 503 ids, but vocab.tokenizer_size in manifest.json "
                                            r"is 505"):
        backend(art)


def test_cli_prints_one_line_and_exits_2(art):
    edit(art, _set(("num_kept_patches",), -3))
    done = subprocess.run([sys.executable, "-m", "maven_edge", "generate", "--artifacts", str(art), "--prompt",
                           "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_kept_patches" in lines[0] and "Traceback" not in done.stderr, done.stderr


# ---- the fuzzer -----------------------------------------------------------------------------------


class Raw:
    """JSON text spliced in verbatim (what json.dumps cannot write)."""

    def __init__(self, text: str):
        self.text = text


RAW_VALUES = [Raw("[" * 3000 + "]" * 3000), Raw('{"a":' * 1000 + "1" + "}" * 1000), Raw("9" * 5000),
              Raw("-" + "9" * 400), Raw("1e999"), Raw("NaN"), Raw("-Infinity"), Raw('"\\ud800"'), Raw('"\\udfff x"')]
ODD_VALUES = [None, True, False, 0, -1, 1, 2, 2**31, 2**53 + 1, 2**63, -(2**63), 1.5, -0.0, 1e308, "", "x",
              "../x", "/etc/passwd", [], {}, ["a"], {"a": 1}, [1, 2, 3], "float32", "images", "hybrid"]
PATH_VALUES = ["decoder\u0000.onnx", "d" * 300, "/".join(["dir"] * 300), "loop_a", "sub", "pipe", ".", "",
               "../decoder.onnx", "/etc/passwd", "decoder.onnx/", "vision_encoder.onnx", "projector.onnx",
               "tokenizer.json", "manifest.json", "décodeur.onnx", "\u202edecoder.onnx", "dec\\oder.onnx",
               "C:\\decoder.onnx", "./decoder.onnx", "sub/../decoder.onnx", "nope.onnx"]

values = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.sampled_from(RAW_VALUES),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.lists(st.integers(-2, 70), max_size=4),
)
#: values a schema-valid manifest may hold in its free-form fields (extra, exporter, preset, source)
free_values = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc",)), min_size=1, max_size=16),
    st.integers(-(2**40), 2**40), st.booleans(), st.none(),
    st.lists(st.text(max_size=4), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _dump(obj: Any) -> bytes:
    raws: list[str] = []

    def default(o: Any) -> str:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"@@RAW{len(raws) - 1}@@"
        raise TypeError(type(o).__name__)

    text = json.dumps(obj, default=default)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def fuzz_dir(artifacts, tmp_path_factory):
    """A copy of the test export with a symlink loop, a directory and a FIFO to point paths at,
    in memory (/dev/shm) where there is one: the fuzzer rewrites manifest.json 2,000 times, which
    costs ~3 ms a write on this project's disk and ~0.04 ms on tmpfs. The ONNX files never change
    here, so their onnxruntime sessions and their external-data scan (8 MB read per load) are made
    once per file and reused; an example costs a load, and for every eighth that loads, a backend
    on cached sessions and one short generate."""
    import tempfile

    import onnxruntime as ort

    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="maven-fuzz-", dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path_factory.mktemp("fuzz")
    art = root / "art"
    shutil.copytree(artifacts, art)
    os.symlink("loop_b", art / "loop_a")
    os.symlink("loop_a", art / "loop_b")
    (art / "sub").mkdir()
    os.mkfifo(art / "pipe")
    text = (art / MANIFEST).read_text()
    raw = json.loads(text)
    paths = _paths(raw)
    file_paths = [p for p in paths if p[-1] == "path"]
    structural = [p for p in paths if len(p) <= 3 or p[0] in ("vocab", "preprocess", "tokenizer")
                  or p[-1] in ("file", "path", "sha256", "size_bytes", "shape", "dtype", "name", "extra",
                               "past_present_share_buffer", "num_codes", "k", "num_layers", "inputs", "outputs")]
    free = [p for p in paths if p[0] in ("exporter", "preset") or (p[0] == "extra" and len(p) >= 2
            and p[1] not in ("model_fingerprint", "source")) or (len(p) >= 4 and p[0] == "components"
            and p[2] == "extra" and p[3] in ("optimized", "purpose", "scores", "ranking", "order", "attention_mask",
                                             "kv_layout", "hidden_states", "past_key_name", "feature_layer"))]
    anywhere = st.sampled_from(paths)
    structural_or_any = st.sampled_from(structural) | anywhere
    edit = st.one_of(  # (op, where, payload): one strategy, drawn once per example
        st.tuples(st.just("set"), structural_or_any, values),
        st.tuples(st.just("path"), st.sampled_from(file_paths) | anywhere, st.sampled_from(PATH_VALUES)),
        st.tuples(st.just("delete"), structural_or_any, st.none()),
        st.tuples(st.just("copy"), structural_or_any, anywhere),
        st.tuples(st.just("nest"), structural_or_any, st.booleans()),
        st.tuples(st.just("free"), st.sampled_from(free), st.tuples(st.booleans(), st.text(max_size=8), free_values)),
    )
    strategies = st.lists(edit, min_size=1, max_size=3)
    real = ort.InferenceSession
    cache: dict[str, Any] = {}

    def cached(path, *args, **kwargs):
        key = str(path)
        if key not in cache:
            cache[key] = real(path, *args, **kwargs)
        return cache[key]

    from maven_edge.core import manifest as manifest_module

    real_locations = manifest_module.external_data_locations
    locations: dict[Path, list[str]] = {}

    def cached_locations(path: Path) -> list[str]:  # the ONNX files never change here (manifest.json does)
        if path.name == MANIFEST:
            return real_locations(path)
        if path not in locations:
            locations[path] = real_locations(path)
        return locations[path]

    cached.locations = cached_locations  # type: ignore[attr-defined]

    stats = {"examples": 0, "refused": 0, "loaded": 0, "refused_by_backend": 0, "generated": 0}
    yield art, text, paths, strategies, cached, stats
    shutil.rmtree(root, ignore_errors=True)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_manifests_only_artifact_errors(fuzz_dir, monkeypatch, data):
    """Up to three edits of manifest.json (set any field to an odd value or a raw JSON token, point
    a file entry anywhere, delete a field, copy one subtree over another, wrap a value in nesting,
    or put any value in a field the schema leaves free), then load it; every eighth manifest that
    loads also builds a backend (graph checks and probe) and runs a generate. Only ArtifactError
    may escape."""
    import onnxruntime as ort

    from maven_edge.core import manifest as manifest_module
    from maven_edge.runtime.pipeline import MavenPipeline

    art, text, paths, strategies, cached, stats = fuzz_dir
    monkeypatch.setattr(ort, "InferenceSession", cached)
    monkeypatch.setattr(manifest_module, "external_data_locations", cached.locations)
    m = json.loads(text)
    for op, path, payload in data.draw(strategies, label="edits"):
        try:
            parent = m
            for k in path[:-1]:
                parent = parent[k]
            old = parent[path[-1]]
            if op == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif op == "copy":
                value = m
                for k in payload:
                    value = value[k]
                parent[path[-1]] = json.loads(json.dumps(value))
            elif op == "nest":
                parent[path[-1]] = [old] if payload else {"x": old}
            elif op == "free":  # a field the schema leaves open: the manifest must still load
                new_key, key, value = payload
                if isinstance(old, dict) and new_key:
                    old[key] = value
                else:
                    parent[path[-1]] = value
            elif op != "delete":  # set, path
                parent[path[-1]] = payload
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or retyped the parent
            continue
    (art / MANIFEST).write_bytes(_dump(m))
    stats["examples"] += 1
    try:
        load_manifest(art, verify=False)  # hashes are tested elsewhere; here the structure is the point
    except ArtifactError:
        stats["refused"] += 1
        return
    stats["loaded"] += 1
    if stats["loaded"] % 8 != 1:  # load only; every eighth manifest that loads also runs
        return
    try:
        pipe = MavenPipeline(backend(art, verify=False))
    except ArtifactError:  # loads, but contradicts a graph
        stats["refused_by_backend"] += 1
        return
    res = pipe.generate([str(ROOT / "model_src" / "samples" / "demo_1.png")], PROMPT, max_new_tokens=2)
    assert res.token_ids
    stats["generated"] += 1


def test_fuzz_ran_what_the_docs_say(fuzz_dir):
    """Runs after the fuzzer (same module): the counts docs/reliability.md reports."""
    stats = fuzz_dir[-1]
    if not stats["examples"]:
        pytest.skip("the fuzzer did not run in this session")
    print(f"\nmanifest fuzz: {stats}")
    assert stats["examples"] >= FUZZ_EXAMPLES
    assert stats["refused"] + stats["loaded"] == stats["examples"]
    assert stats["refused_by_backend"] + stats["generated"] == (stats["loaded"] + 7) // 8
    assert stats["loaded"] >= FUZZ_EXAMPLES // 10 and stats["generated"] >= stats["loaded"] // 10
    assert stats["refused"] >= FUZZ_EXAMPLES // 3


def test_schema_module_round_trip(raw_manifest):
    """json_schema() is a plain JSON document (what --write publishes)."""
    schema = json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert re.match(r"https://json-schema.org/draft/2020-12/schema", schema["$schema"])
