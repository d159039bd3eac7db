"""The GPU path checked without a GPU (issue 34).

- the TensorRT Python API the builder and the trt backend use exists in every recorded release
  their recipe claims (a strict fake built from ``calibration/trt_api.json``, which
  ``tools/trt_api_table.py`` recorded from the real bindings wheels);
- the ONNX parser's op / opset table per TensorRT release is applied to every exported graph and
  every quantization recipe; refusals come before any engine is built;
- TensorRT-compatible (symmetric) int8, calibration-cache headers per version, the TensorRT
  execution provider's explicit profiles and the provider option names ONNX Runtime parses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_runtime import export_test_artifacts
from trt_fake import API, FakeCuda, FakeTrt

from maven_edge.core.errors import BackendError, ExportError, InputError

RELEASES = sorted(API)


@pytest.fixture(scope="module")
def artifacts(pytestconfig) -> Path:
    return export_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")))


@pytest.fixture(scope="module")
def manifest(artifacts):
    from maven_edge.core.manifest import load_manifest

    return load_manifest(artifacts)


@pytest.fixture(scope="module")
def recipes(artifacts, tmp_path_factory) -> dict[str, Path]:
    """Every quantization recipe applied to the test artifacts (2 calibration samples, no parity check)."""
    from maven_edge.calibration.quantize import QUANT_RECIPES, QuantizeOptions, quantize_artifacts

    root = tmp_path_factory.mktemp("recipes")
    out = {}
    for name in QUANT_RECIPES.names():
        res = quantize_artifacts(artifacts, root / name, QuantizeOptions(recipe=name, calib_samples=2, progress=False,
                                                                         check_samples=0))
        out[name] = res.out
    return out


def _opts(artifacts, **kw):
    from maven_edge.calibration.tensorrt import TrtBuildOptions

    kw.setdefault("max_images", 2)
    kw.setdefault("max_seq", 256)
    return TrtBuildOptions(artifacts=artifacts, out="unused", progress=False, **kw)


# ---- item 1: recipes x TensorRT releases, against the recorded API ---------------------------------------


def test_recipe_ranges_match_the_recorded_api():
    from maven_edge.calibration.trt_support import ENGINE_RECIPES, check_recipe_version, recipe_api_problems

    assert {"8.6.1", "10.3.0", "11.4.0.106"} <= set(RELEASES)
    for name, recipe in ENGINE_RECIPES.items():
        for release in RELEASES:
            problems = recipe_api_problems(name, release)
            if recipe.supports(release):
                assert problems == [], (name, release, problems)
    # the weakly typed recipes end exactly where TensorRT removed their API ...
    for name in ("fp16", "int8", "fp8"):
        assert any("BuilderFlag" in p for p in recipe_api_problems(name, "11.0.0.114"))
        with pytest.raises(InputError, match="--precision typed"):
            check_recipe_version(name, "11.4.0.106")
    assert any("int8_calibrator" in p for p in recipe_api_problems("int8", "11.4.0.106"))
    # ... and the strongly typed one starts where the flag appears
    assert recipe_api_problems("typed", "8.6.1") and not ENGINE_RECIPES.get("typed").supports("8.6.2")
    assert ENGINE_RECIPES.get("fp8").supports("10.3") and not ENGINE_RECIPES.get("fp8").supports("8.6")


_LAYERS = [("MATRIX_MULTIPLY", None, ["x"], ["a"]), ("NORMALIZATION", None, ["a"], ["b"]),
           ("ELEMENTWISE", "POW", ["b"], ["c"]), ("UNARY", "SQRT", ["c"], ["d"]), ("SOFTMAX", None, ["d"], ["e"]),
           ("MATRIX_MULTIPLY", None, ["e"], ["sim"]), ("TOPK", None, ["sim"], ["code"])]


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8", "typed"])
def test_builder_touches_only_the_recorded_api(manifest, artifacts, tmp_path, release, precision):
    """Build one engine against a fake that has exactly the names of the recorded bindings: every
    recipe on every release it claims runs through; the others are refused before building."""
    from maven_edge.calibration.tensorrt import _build_one, _make_calibrator, plan_engines
    from maven_edge.calibration.trt_support import ENGINE_RECIPES

    recipe = ENGINE_RECIPES.get(precision)
    plan = plan_engines(manifest, _opts(artifacts, precision=precision, components=("patch_selector",)),
                        trt_version=release)[0]
    if not recipe.supports(release):
        assert plan.refused and f"--precision {precision} does not support" in plan.refused
        return
    trt = FakeTrt(release, _LAYERS)
    calibrator = None
    if plan.scales == "calibrate":
        comp = manifest.components["patch_selector"]
        rows = [{t.name: np.zeros([1 if isinstance(d, str) else d for d in t.shape], t.dtype) for t in comp.inputs}]
        calibrator = _make_calibrator(trt, FakeCuda(), rows, tmp_path / "calib.cache", "entropy")
    engine, timing = _build_one(trt, None, FakeCuda(), plan, plan.onnx, b"", calibrator)
    assert engine == b"engine-bytes" and timing == b"timing-bytes"
    flags = [c[1] for c in trt.calls if c[0] == "flag"]
    pinned = [c for c in trt.calls if c[0] == "output_type"]
    if recipe.typed:
        assert flags == [] and pinned == []
        assert ("network_flags", 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in trt.calls
    else:
        assert "FP16" in flags and "PREFER_PRECISION_CONSTRAINTS" in flags and pinned


@pytest.mark.parametrize("release", RELEASES)
def test_trt_backend_engines_use_only_the_recorded_api_and_real_addresses(tmp_path, release):
    """Item 4: the h_eos pass feeds empty past_key_values (0 bytes); every input still needs a
    non-null device address before execute_async_v3 (the fake refuses null ones, as TensorRT does)."""
    from maven_edge.runtime.backends.trt_backend import _Engine

    spec = {"io": [("inputs_embeds", "INPUT", np.dtype(np.float32)), ("past_key_values.0.key", "INPUT",
                                                                       np.dtype(np.float32)),
                   ("hidden_states", "OUTPUT", np.dtype(np.float32))],
            "profiles": 2, "output_shape": lambda shapes, name: shapes["inputs_embeds"]}
    trt = FakeTrt(release, engines={"decoder": spec})
    path = tmp_path / "decoder.engine"
    path.write_bytes(b"decoder")
    eng = _Engine(trt, trt.Runtime(None), FakeCuda(), "decoder", path)
    out = eng.run({"inputs_embeds": np.ones((2, 5, 8), np.float32),
                   "past_key_values.0.key": np.zeros((2, 2, 0, 4), np.float32)}, 0, fetch=["hidden_states"])
    assert out["hidden_states"].shape == (2, 5, 8)
    assert ("execute", {"inputs_embeds": (2, 5, 8), "past_key_values.0.key": (2, 2, 0, 4)}) in trt.calls


def _fake_device(monkeypatch, release):
    import maven_edge.calibration.tensorrt as mod

    trt = FakeTrt(release, _LAYERS)
    monkeypatch.setattr(mod, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(mod, "Cuda", lambda device_id=0: FakeCuda())
    return trt


def test_build_refuses_weak_typing_on_tensorrt_11_and_builds_typed(artifacts, tmp_path, monkeypatch):
    from maven_edge.calibration.tensorrt import TrtBuildOptions, build_engines

    trt = _fake_device(monkeypatch, "11.4.0.106")
    with pytest.raises(BackendError, match="supports TensorRT 8.6 - 10.x, not 11.4"):
        build_engines(TrtBuildOptions(artifacts, tmp_path / "weak", max_images=2, max_seq=256, progress=False))
    assert not [c for c in trt.calls if c[0] == "parse"]
    res = build_engines(TrtBuildOptions(artifacts, tmp_path / "typed", precision="typed", max_images=2, max_seq=256,
                                        progress=False))
    assert {e.component for e in res.engines} == {"vision_encoder", "discrete_tokenizer", "embed_tokens",
                                                  "patch_selector", "projector", "decoder"}
    assert (tmp_path / "typed" / "engines.json").is_file()
    assert not [c for c in trt.calls if c[0] == "flag"]


# ---- items 2, 3, 9: what each graph and recipe would do on each TensorRT ---------------------------------


#: recipe -> components refused on TensorRT 10.x (opset-18 files), and why
EXPECTED_REFUSALS = {
    "int8-static": ({"vision_encoder", "discrete_tokenizer", "patch_selector", "projector"}, "non-zero zero points"),
    "int8-trt": (set(), ""),
    "int8-dynamic": ({"decoder"}, "DynamicQuantizeLinear"),
    "int4-weight": ({"decoder"}, "MatMulNBits"),
    "int8-int4": ({"vision_encoder", "discrete_tokenizer", "patch_selector", "projector", "decoder"}, ""),
    "fp16": (set(), ""),
    "int8-weight": ({"decoder"}, "MatMulNBits"),
    # dynamic int8 (DynamicQuantizeLinear) and onnxruntime's fused contrib ops are CPU-side choices
    "vision-int8": ({"vision_encoder", "discrete_tokenizer"}, ""),
    "latency-int8": ({"vision_encoder", "discrete_tokenizer", "decoder"}, ""),
    "latency-int4": ({"vision_encoder", "discrete_tokenizer", "decoder"}, ""),
}


@pytest.mark.parametrize("version", ["10.3.0", "10.16.1", "11.4"])
def test_op_table_on_every_recipe(artifacts, recipes, version):
    from maven_edge.calibration.tensorrt import plan_engines
    from maven_edge.core.manifest import load_manifest

    precision = "typed" if version.startswith("11") else "fp16"
    fp32 = plan_engines(load_manifest(artifacts), _opts(artifacts, precision=precision), trt_version=version)
    assert [p.component for p in fp32 if p.refused] == []
    assert set(recipes) == set(EXPECTED_REFUSALS)
    for name, path in recipes.items():
        plans = plan_engines(load_manifest(path), _opts(path, precision=precision), trt_version=version)
        refused, why = EXPECTED_REFUSALS[name]
        assert {p.component for p in plans if p.refused} == refused, name
        assert all(why in p.refused for p in plans if p.refused), name


def test_tensorrt_86_needs_opset_17(artifacts, recipes):
    from maven_edge.calibration.tensorrt import plan_engines
    from maven_edge.core.manifest import load_manifest

    plans = plan_engines(load_manifest(artifacts), _opts(artifacts), trt_version="8.6.2")
    assert all("opset 18" in p.refused and "reduces over every axis" in p.refused and "--target-trt 8.6" in p.refused
               for p in plans)


def test_int8_trt_recipe_is_symmetric_per_channel(recipes):
    import onnx
    from onnx import numpy_helper

    from maven_edge.export.trt_compat import graph_problems, qdq_types

    model = onnx.load(str(recipes["int8-trt"] / "vision_encoder.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and qdq_types(model) == {"int8"}
    assert all(not np.any(inits[n.input[2]]) for n in qdq if len(n.input) > 2)
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(inits[n.input[1]].size > 1 for n in weights)  # per-channel scales
    assert not [n for n in weights if inits[n.input[0]].dtype == np.int32]  # no quantized bias
    assert graph_problems(model, "10.3") == [] and graph_problems(model, "8.6").__len__() == 1  # opset only
    static = onnx.load(str(recipes["int8-static"] / "vision_encoder.onnx"))
    assert any("symmetric" in p for p in graph_problems(static, "10.3"))


def test_qdq_engines_get_the_int8_flag(recipes):
    """Item 9: a weakly typed plan over Q/DQ files sets INT8 with FP16 (TensorRT 8.6 refuses Q/DQ without it)."""
    from maven_edge.calibration.tensorrt import component_precision, plan_engines
    from maven_edge.core.manifest import load_manifest

    assert component_precision("vision_encoder", "fp16", {"int8"}) == (["INT8", "FP16"], "explicit")
    assert component_precision("decoder", "int8", {"int8"}) == (["INT8", "FP16"], "explicit")
    assert component_precision("vision_encoder", "typed", {"int8"}) == ([], "explicit")
    path = recipes["int8-trt"]
    plans = {p.component: p for p in plan_engines(load_manifest(path), _opts(path, precision="fp16"),
                                                  trt_version="10.3")}
    assert plans["vision_encoder"].flags == ["INT8", "FP16"] and plans["vision_encoder"].scales == "explicit"
    assert plans["decoder"].flags == ["FP16"] and plans["decoder"].scales == "none"


def test_refusals_come_before_any_engine_is_built(recipes, tmp_path, monkeypatch):
    """Item 3: the int8-dynamic decoder (DynamicQuantizeLinear / MatMulInteger) is refused up front."""
    import maven_edge.calibration.tensorrt as mod

    _fake_device(monkeypatch, "10.3.0")
    built = []
    monkeypatch.setattr(mod, "_build_one", lambda *a, **k: built.append(a[3].component) or (b"e", b"t"))
    with pytest.raises(BackendError, match="decoder .*DynamicQuantizeLinear.*--dry-run"):
        mod.build_engines(mod.TrtBuildOptions(recipes["int8-dynamic"], tmp_path / "e", max_images=2, max_seq=256,
                                              progress=False))
    assert built == [] and not (tmp_path / "e" / "engines.json").exists()


def test_genai_contrib_ops_have_no_importer():
    from onnx import TensorProto, helper

    from maven_edge.export.trt_compat import graph_problems

    node = helper.make_node("GroupQueryAttention", ["q", "k", "v"], ["o"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "qkv"],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    (problem,) = graph_problems(model, "10.3")
    assert "com.microsoft::GroupQueryAttention has no TensorRT" in problem and "--decoder torch" in problem


def test_dry_run_says_what_would_be_built_and_what_is_refused(recipes, capsys):
    from maven_edge.cli import main

    path = str(recipes["int8-static"])
    rc = main(["build-trt", "--artifacts", path, "--out", "unused", "--dry-run", "--precision", "int8",
               "--target-trt", "10.3", "--max-images", "2", "--max-seq", "256"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "plan for TensorRT 10.3 (--target-trt), --precision int8" in out
    assert "vision_encoder: REFUSED: " in out and "int8-trt" in out
    assert "decoder: would be built" in out and f"from {path}/decoder.onnx (fp32); weakly typed, flags FP16" in out
    assert "[decode] past_key_values.0.key: min [1, " in out
    assert "2 engine(s) would be built, 4 refused" in out
    rc = main(["build-trt", "--artifacts", str(recipes["fp16"]), "--out", "unused", "--dry-run", "--target-trt",
               "11.4"])
    out = capsys.readouterr().out
    assert rc == 1 and "REFUSED for every engine: --precision fp16 supports TensorRT 8.6 - 10.x" in out
    rc = main(["build-trt", "--artifacts", str(recipes["fp16"]), "--out", "unused", "--dry-run", "--target-trt",
               "11.4", "--precision", "typed"])
    assert rc == 0 and "6 engine(s) would be built, 0 refused" in capsys.readouterr().out


# ---- item 5: calibration cache headers ------------------------------------------------------------------


def test_calibration_cache_header_per_version(tmp_path):
    from maven_edge.calibration.tensorrt import calibration_cache_path, table_from_ranges, trt_version_tag

    assert trt_version_tag("8.6.1") == "8601" and trt_version_tag("8.6.2.3") == "8602"  # JetPack 6.0
    assert trt_version_tag("10.3.0.26") == "100300" and trt_version_tag("10.16.1.11") == "101601"
    with pytest.raises(InputError, match="no INT8 calibration"):
        trt_version_tag("11.0.0")
    assert table_from_ranges({"x": (-1.0, 1.0)}, "8.6.2").version == "8602"
    a = calibration_cache_path(tmp_path, "f" * 64, "vision_encoder", "e" * 64, "entropy", "8.6.2")
    b = calibration_cache_path(tmp_path, "f" * 64, "vision_encoder", "e" * 64, "entropy", "10.3.0")
    assert a != b and a.name.endswith("-trt8602.cache")


# ---- item 8: export for a TensorRT release ----------------------------------------------------------------


def test_export_target_trt_picks_the_opset(tmp_path):
    from maven_edge.export.onnx_export import ExportOptions, _trt_opset
    from maven_edge.export.trt_compat import max_opset

    assert max_opset("8.6.2") == 17 and max_opset("10.3") == 20 and max_opset("10.16") == 24
    assert _trt_opset(ExportOptions(out=tmp_path, target_trt="8.6"), 18) == 17
    assert _trt_opset(ExportOptions(out=tmp_path, target_trt="10.3"), 18) == 18
    with pytest.raises(ExportError, match="--opset 17"):
        _trt_opset(ExportOptions(out=tmp_path, target_trt="8.6", opset=18), 18)
    with pytest.raises(ExportError, match="--decoder torch"):
        _trt_opset(ExportOptions(out=tmp_path, target_trt="10.3", decoder="genai"), 18)


# ---- items 6 and 7: execution providers ------------------------------------------------------------------


@pytest.fixture
def gpu_ort(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


def test_tensorrt_provider_gets_explicit_profiles_per_component(manifest, artifacts, tmp_path, gpu_ort):
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.backends.providers import ORT_OPTION_NAMES, resolve_providers

    cfg = SessionConfig(trt_engine_cache_path=str(tmp_path), trt_profile_max_seq=256)
    dec = manifest.components["decoder"]
    (trt_name, opts), *rest = resolve_providers(["tensorrt"], cfg, artifacts, manifest, dec)
    assert trt_name == "TensorrtExecutionProvider" and [r[0] for r in rest] == ["CUDAExecutionProvider",
                                                                                "CPUExecutionProvider"]
    mins = dict(x.split(":") for x in opts["trt_profile_min_shapes"].split(","))
    maxs = dict(x.split(":") for x in opts["trt_profile_max_shapes"].split(","))
    cfg_llm = manifest.maven_config().llm
    kv = f"{cfg_llm.num_kv_heads}x{{}}x{cfg_llm.head_dim}"
    assert mins["past_key_values.0.key"] == "1x" + kv.format(0)  # the empty past of prefill / the h_eos pass
    assert maxs["past_key_values.0.key"].split("x")[2] == "255" and maxs["attention_mask"].endswith("x256")
    assert set(mins) == {t.name for t in dec.inputs if any(isinstance(d, str) for d in t.shape)}
    assert set(opts) <= ORT_OPTION_NAMES["tensorrt"]
    vis = resolve_providers(["tensorrt"], cfg, artifacts, manifest, manifest.components["vision_encoder"])[0][1]
    assert vis["trt_profile_max_shapes"].startswith("pixel_values:")
    for comp in manifest.components.values():  # every option set onnxruntime will see has names it parses
        for name, o in resolve_providers(["tensorrt"], cfg, artifacts, manifest, comp):
            assert set(o) <= ORT_OPTION_NAMES[{"TensorrtExecutionProvider": "tensorrt",
                                               "CUDAExecutionProvider": "cuda",
                                               "CPUExecutionProvider": "cpu"}[name]]


def test_provider_option_names_are_checked(artifacts, tmp_path, gpu_ort):
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.backends.providers import resolve_providers

    cfg = SessionConfig(trt_engine_cache_path=str(tmp_path), provider_options={"tensorrt": {"trt_fp16_enabled": 1}})
    with pytest.raises(InputError, match="trt_fp16_enabled .did you mean trt_fp16_enable"):
        resolve_providers(["tensorrt"], cfg, artifacts)
    with pytest.raises(InputError, match="gpu_memory_limit"):
        resolve_providers(["cuda"], SessionConfig(provider_options={"cuda": {"gpu_memory_limit": 1}}), artifacts)


def test_gpu_provider_problems_are_explained(manifest, artifacts, monkeypatch):
    import copy

    import onnxruntime

    from maven_edge.runtime.backends import providers
    from maven_edge.runtime.backends.ort_backend import SessionConfig, check_session_providers

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(providers, "ort_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(BackendError, match="both onnxruntime and onnxruntime-gpu are installed.*pip uninstall"):
        providers.resolve_providers(["cuda"], SessionConfig(), artifacts)
    with pytest.raises(BackendError, match="fell back silently"):
        check_session_providers("decoder", ["CPUExecutionProvider"], [("CUDAExecutionProvider", {})])
    check_session_providers("decoder", ["CUDAExecutionProvider", "CPUExecutionProvider"],
                            [("CUDAExecutionProvider", {})])
    genai = copy.deepcopy(manifest.components["decoder"])
    genai.extra["past_present_share_buffer"] = True
    with pytest.raises(BackendError, match="GroupQueryAttention.*--decoder torch"):
        providers.check_decoder_for("cuda", genai)
    providers.check_decoder_for("cpu", genai)
    genai.precision = "fp16"
    providers.check_decoder_for("tensorrt", genai)
    providers.check_decoder_for("cuda", manifest.components["decoder"])


def test_no_extra_installs_onnxruntime_gpu_beside_onnxruntime():
    """Item 7: the base dependency is onnxruntime; an extra adding onnxruntime-gpu puts two
    distributions of the same package side by side (the GPU providers can vanish)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("onnxruntime>") for d in project["dependencies"])
    for name, reqs in project["optional-dependencies"].items():
        assert not [r for r in reqs if r.startswith("onnxruntime-gpu")], name
    assert project["optional-dependencies"]["tensorrt"] == ["tensorrt>=10.3,<11"]
