"""TensorRT engine planning, caches and the trt backend (issue 7).

Everything that does not need a GPU is tested here: optimisation profiles from the manifest's
symbolic shapes, precision plans, the calibration cache format (also from real onnxruntime
calibration ranges), engine-cache keys, the builder configuration (against a recording fake of
the TensorRT API) and the clear errors on a machine without TensorRT. Building and running real
engines needs an NVIDIA GPU with TensorRT and cuda-python; that test is skipped otherwise.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest
from test_runtime import export_test_artifacts

from maven_edge.core.errors import ArtifactError, BackendError, CalibrationError, InputError


def _have_trt_gpu() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False, "TensorRT is not installed (no NVIDIA GPU on this machine)"
    try:
        from maven_edge.calibration.trt_runtime import Cuda

        Cuda(0)
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable GPU
        return False, f"no usable CUDA GPU / cuda-python: {exc}"
    return True, ""


HAVE_GPU, NO_GPU_REASON = _have_trt_gpu()


@pytest.fixture(scope="module")
def artifacts(pytestconfig) -> Path:
    return export_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")))


@pytest.fixture(scope="module")
def manifest(artifacts):
    from maven_edge.core.manifest import load_manifest

    return load_manifest(artifacts)


def _opts(artifacts, **kw):
    from maven_edge.calibration.tensorrt import TrtBuildOptions

    return TrtBuildOptions(artifacts=artifacts, out="unused", **kw)


# ---- profiles --------------------------------------------------------------------------------------


def test_profiles_from_manifest_shapes(manifest, artifacts):
    from maven_edge.calibration.tensorrt import component_profiles, resolve_limits

    cfg = manifest.maven_config()
    lim = resolve_limits(manifest, _opts(artifacts, max_images=4, max_seq=512))
    tpi = cfg.discrete.num_codes + cfg.num_kept_patches() + 2
    assert (lim.max_images, lim.max_seq, lim.opt_images, lim.tokens_per_image) == (4, 512, 2, tpi)
    assert lim.opt_seq == 2 * tpi + 32

    vis = component_profiles(manifest.components["vision_encoder"], lim)
    assert [p.name for p in vis] == ["default"]
    s = cfg.vision.image_size
    assert vis[0].shapes["pixel_values"] == ((1, 3, s, s), (2, 3, s, s), (4, 3, s, s))

    sel = component_profiles(manifest.components["patch_selector"], lim)[0].shapes
    n, dv, d = cfg.num_patches, cfg.vision.hidden_size, cfg.llm.hidden_size
    assert sel["patch_features"] == ((1, n, dv), (2, n, dv), (4, n, dv))
    assert sel["h_eos"] == ((1, d), (2, d), (4, d))

    emb = component_profiles(manifest.components["embed_tokens"], lim)[0].shapes["input_ids"]
    assert emb == ((1, 1), (1, lim.opt_seq), (4, 512))  # batch up to max_images for the h_eos pass

    dec = component_profiles(manifest.components["decoder"], lim)
    assert [p.name for p in dec] == ["prefill", "decode"]
    pre, step = dec[0].shapes, dec[1].shapes
    kvh, hd = cfg.llm.num_kv_heads, cfg.llm.head_dim
    assert pre["inputs_embeds"] == ((1, 1, d), (1, lim.opt_seq, d), (4, 512, d))
    assert pre["past_key_values.0.key"] == ((1, kvh, 0, hd), (1, kvh, 0, hd), (4, kvh, 0, hd))
    assert pre["attention_mask"] == ((1, 1), (1, lim.opt_seq), (4, 512))
    assert step["inputs_embeds"] == ((1, 1, d), (1, 1, d), (1, 1, d))
    assert step["past_key_values.1.value"][0] == (1, kvh, 1, hd)
    assert step["past_key_values.1.value"][2] == (1, kvh, 511, hd)
    assert step["attention_mask"][2] == (1, 512) and step["position_ids"] == ((1, 1), (1, 1), (1, 1))
    # every decoder input has a shape in both profiles, and min <= opt <= max everywhere
    names = {t.name for t in manifest.components["decoder"].inputs}
    for p in dec:
        assert set(p.shapes) == names
        for lo, opt, hi in p.shapes.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True))


def test_limits_are_checked(manifest, artifacts):
    from maven_edge.calibration.tensorrt import component_profiles, resolve_limits

    with pytest.raises(InputError, match="cannot hold --max-images 8"):
        resolve_limits(manifest, _opts(artifacts, max_images=8, max_seq=200))
    with pytest.raises(InputError, match="max_position_embeddings"):
        resolve_limits(manifest, _opts(artifacts, max_seq=10**6))
    with pytest.raises(InputError, match="precision"):
        _opts(artifacts, precision="int4").validate()
    comp = copy.deepcopy(manifest.components["vision_encoder"])
    comp.inputs[0].shape[0] = "frames"
    with pytest.raises(ArtifactError, match="frames"):
        component_profiles(comp, resolve_limits(manifest, _opts(artifacts)))


# ---- precision plans ------------------------------------------------------------------------------------


def test_engine_plans_per_precision(manifest, artifacts):
    from maven_edge.calibration.tensorrt import keep_fp32_layer, plan_engines, plan_summary

    fp16 = {p.component: p for p in plan_engines(manifest, _opts(artifacts))}
    assert set(fp16) == set(manifest.components)
    assert all(p.flags == ["FP16"] and p.scales == "none" and p.calibration is None for p in fp16.values())
    assert fp16["decoder"].workspace_bytes == 2 << 30

    int8 = {p.component: p for p in plan_engines(manifest, _opts(artifacts, precision="int8", max_images=3))}
    for name in ("vision_encoder", "discrete_tokenizer", "patch_selector", "projector"):
        assert int8[name].flags == ["INT8", "FP16"] and int8[name].scales == "calibrate"
        cal = int8[name].calibration
        assert cal is not None and all(lo == opt == hi and lo[0] == 1 for lo, opt, hi in cal.shapes.values())
    assert int8["decoder"].flags == ["FP16"] and int8["embed_tokens"].flags == ["FP16"]

    fp8 = {p.component: p for p in plan_engines(manifest, _opts(artifacts, precision="fp8"))}
    assert fp8["vision_encoder"].flags == ["FP8", "FP16"] and fp8["vision_encoder"].scales == "fp8-qdq"
    assert fp8["decoder"].flags == ["FP16"]

    sub = plan_engines(manifest, _opts(artifacts, components=("decoder",)))
    assert [p.component for p in sub] == ["decoder"]
    assert "[decode] past_key_values.0.key" in plan_summary(sub)
    with pytest.raises(InputError, match="not in the artifacts"):
        plan_engines(manifest, _opts(artifacts, components=("lm",)))

    assert keep_fp32_layer("NORMALIZATION") and keep_fp32_layer("SOFTMAX") and keep_fp32_layer("REDUCE")
    from maven_edge.calibration.tensorrt import discrete_head_layers

    graph = [("MATRIX_MULTIPLY", ["x", "w1"], ["a"]), ("ELEMENTWISE", ["a"], ["b"]), ("CONSTANT", [], ["cb"]),
             ("MATRIX_MULTIPLY", ["b", "cb"], ["sim"]), ("ELEMENTWISE", ["sim"], ["neg"]), ("TOPK", ["neg"], ["idx"]),
             ("MATRIX_MULTIPLY", ["b", "w2"], ["proj"])]
    assert discrete_head_layers(graph) == {3, 4}  # codebook MatMul + the op before TopK; not the encoder
    assert keep_fp32_layer("ELEMENTWISE", "POW") and keep_fp32_layer("UNARY", "SQRT")
    assert not keep_fp32_layer("ELEMENTWISE", "SUM") and not keep_fp32_layer("MATRIX_MULTIPLY")


def test_plans_for_quantized_artifacts(artifacts, tmp_path):
    from maven_edge.calibration.quantize import QuantizeOptions, quantize_artifacts
    from maven_edge.calibration.tensorrt import plan_engines

    res = quantize_artifacts(artifacts, tmp_path / "q", QuantizeOptions(recipe="int8-int4", calib_samples=2,
                                                                         progress=False, check_samples=0))
    opts = _opts(res.out, precision="int8", components=("vision_encoder", "patch_selector"))
    plans = plan_engines(res.manifest, opts, res.out, "10.3")
    assert all(p.scales == "explicit" and p.flags == ["INT8", "FP16"] and p.calibration is None for p in plans)
    assert all("non-zero zero points" in p.refused for p in plans)  # asymmetric int8-static: TensorRT refuses it
    (dec,) = plan_engines(res.manifest, _opts(res.out, components=("decoder",)), res.out, "10.3")
    assert "MatMulNBits" in dec.refused


# ---- caches ----------------------------------------------------------------------------------------------


def test_engine_cache_key(manifest, artifacts):
    from maven_edge.calibration.tensorrt import engine_cache_key, plan_engines, timing_cache_name

    gpu = {"name": "Orin (nvgpu)", "compute_capability": "8.7"}
    plan = plan_engines(manifest, _opts(artifacts, components=("decoder",)))[0]
    key = engine_cache_key("a" * 64, plan, gpu, "10.3.0")
    assert key == engine_cache_key("a" * 64, copy.deepcopy(plan), dict(gpu), "10.3.0")  # deterministic
    assert len(key) == 64 and int(key, 16) >= 0
    others = {
        engine_cache_key("b" * 64, plan, gpu, "10.3.0"),  # another export
        engine_cache_key("a" * 64, plan, {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, "10.3.0"),
        engine_cache_key("a" * 64, plan, gpu, "8.6.2"),  # another TensorRT
        engine_cache_key("a" * 64, plan_engines(manifest, _opts(artifacts, components=("decoder",), max_seq=512))[0],
                         gpu, "10.3.0"),
        engine_cache_key("a" * 64, plan, gpu, "10.3.0", calibration_digest="c" * 64),
    }
    assert key not in others and len(others) == 5
    assert timing_cache_name(gpu, "10.3.0.26") == "timing-orin-nvgpu-sm8-7-trt10-3-0-26.cache"


def test_calibration_cache_format(tmp_path):
    from maven_edge.calibration.tensorrt import (
        CalibrationTable,
        calibration_cache_path,
        format_calibration_cache,
        parse_calibration_cache,
        table_from_ranges,
        trt_version_tag,
    )

    assert trt_version_tag("10.3.0.26") == "100300" and trt_version_tag("8.6.1") == "8601"
    table = table_from_ranges({"patch_features": (-2.0, 6.35), "/blocks.0/Add_output_0": (0.0, 0.0)}, "10.3.0")
    data = format_calibration_cache(table)
    lines = data.decode().splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    # 6.35 / 127 = 0.05 -> float32 bits 0x3d4ccccd, big-endian hex, as TensorRT writes it
    assert lines[1] == "patch_features: 3d4ccccd"
    back = parse_calibration_cache(data)
    assert back.version == "100300" and back.algorithm == "EntropyCalibration2"
    assert back.dynamic_range("patch_features") == pytest.approx(6.35, rel=1e-6)
    assert back.scales["/blocks.0/Add_output_0"] == pytest.approx(1 / 127)
    for bad in (b"", b"garbage\n", b"TRT-100300-EntropyCalibration2\nx: zz\n", b"\xff\xfe"):
        with pytest.raises(CalibrationError):
            parse_calibration_cache(bad)
    with pytest.raises(CalibrationError):
        format_calibration_cache(CalibrationTable("1", "MinMaxCalibration", {"a\nb": 1.0}))
    p = calibration_cache_path(tmp_path, "f" * 64, "vision_encoder", "e" * 64, "entropy", "10.3.0")
    assert p.name == "calib-vision_encoder-ffffffffffff-eeeeeeeeeeee-entropy-trt100300.cache"


def test_calibration_cache_from_onnxruntime_ranges(artifacts, manifest):
    """The INT8 cache computed on the CPU from the calibration readers names real network tensors."""
    import onnx

    from maven_edge.calibration.readers import ComponentFeeds, FeedReader, resolve_calibration_set
    from maven_edge.calibration.tensorrt import (
        format_calibration_cache,
        ort_calibration_table,
        parse_calibration_cache,
    )

    cs = resolve_calibration_set(None, manifest, 2)
    feeds = ComponentFeeds(artifacts, cs, manifest)
    rows = list(FeedReader(feeds.feeds("patch_selector"), single_images=True))
    path = artifacts / manifest.components["patch_selector"].file.path
    table = ort_calibration_table(path, rows, "10.3.0", "minmax")
    back = parse_calibration_cache(format_calibration_cache(table))
    model = onnx.load(str(path))
    tensors = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    assert back.algorithm == "MinMaxCalibration" and "patch_features" in back.scales
    assert set(back.scales) <= tensors and len(back.scales) > 5
    assert all(np.isfinite(v) and v > 0 for v in back.scales.values())
    amax = max(abs(float(np.min(r["patch_features"]))) for r in rows)
    amax = max(amax, *(abs(float(np.max(r["patch_features"]))) for r in rows))
    assert back.dynamic_range("patch_features") == pytest.approx(amax, rel=1e-5)


def test_fp8_qdq_onnx_is_made_on_the_cpu(artifacts, manifest, tmp_path):
    import onnx

    from maven_edge.calibration.readers import ComponentFeeds, FeedReader, resolve_calibration_set
    from maven_edge.calibration.tensorrt import _fp8_onnx, plan_engines

    plan = plan_engines(manifest, _opts(artifacts, precision="fp8", components=("projector",)))[0]
    cs = resolve_calibration_set(None, manifest, 2)
    rows = list(FeedReader(ComponentFeeds(artifacts, cs, manifest).feeds("projector"), single_images=True))
    model = onnx.load(str(_fp8_onnx(plan, rows, tmp_path)))
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    zero_points = [t for t in model.graph.initializer if t.data_type == fp8]
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node) and zero_points


# ---- the builder configuration, against a recording fake of the TensorRT API -------------------------------


class _Rec:
    def __init__(self):
        self.calls = []


def _fake_trt(rec: _Rec, layers):
    trt = types.SimpleNamespace(__version__="10.3.0")
    trt.float32, trt.float16 = "float32", "float16"
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", FP8="FP8",
                                            PREFER_PRECISION_CONSTRAINTS="PREFER_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)

    class Out:
        dtype = "float16"

    class Layer:
        def __init__(self, ltype, op=None, ins=(), outs=None):
            self.type = types.SimpleNamespace(name=ltype)
            self.op = types.SimpleNamespace(name=op) if op else None
            self.ins, self.outs = list(ins), list(outs or [f"{ltype}:{op}:{id(self)}"])
            self.num_inputs, self.num_outputs = len(self.ins), len(self.outs)
            self.precision = None

        def get_input(self, i):
            return types.SimpleNamespace(name=self.ins[i])

        def get_output(self, i):
            out = Out()
            out.name = self.outs[i]
            return out

        def set_output_type(self, i, dtype):
            rec.calls.append(("output_type", self.type.name, dtype))

    class IElementWiseLayer(Layer):  # the API's layer subclasses: reached by assigning __class__
        pass

    class IUnaryLayer(Layer):
        pass

    trt.IElementWiseLayer, trt.IUnaryLayer = IElementWiseLayer, IUnaryLayer

    built = [Layer(*spec) for spec in layers]

    class Network:
        num_layers = len(layers)

        def get_layer(self, i):
            lay = built[i]
            lay.__class__ = Layer
            return lay

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Cache:
        def serialize(self):
            return b"timing-bytes"

    class Config:
        builder_optimization_level = 3  # TensorRT >= 8.6

        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("workspace", pool, size))

        def set_flag(self, flag):
            rec.calls.append(("flag", flag))

        def add_optimization_profile(self, p):
            rec.calls.append(("profile", p.shapes))

        def set_calibration_profile(self, p):
            rec.calls.append(("calibration_profile", p.shapes))

        def create_timing_cache(self, data):
            rec.calls.append(("timing_in", data))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.calls.append(("timing_set", ignore_mismatch))

        def __setattr__(self, k, v):
            rec.calls.append(("set", k, v if k != "int8_calibrator" else "calibrator"))
            object.__setattr__(self, k, v)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.calls.append(("network_flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine-bytes"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec.calls.append(("parse", Path(path).name))
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


def test_builder_configuration_from_the_plan(manifest, artifacts):
    from maven_edge.calibration.tensorrt import _build_one, plan_engines

    plan = plan_engines(manifest, _opts(artifacts, precision="int8", components=("patch_selector",),
                                        workspace_gb=1.5, builder_optimization_level=4))[0]
    rec = _Rec()
    layers = [("MATRIX_MULTIPLY", None), ("NORMALIZATION", None), ("ELEMENTWISE", "POW"), ("ELEMENTWISE", "SUM"),
              ("UNARY", "SQRT"), ("SOFTMAX", None),
              ("MATRIX_MULTIPLY", None, ["h"], ["sim"]), ("TOPK", None, ["sim"], ["code"])]
    trt = _fake_trt(rec, layers)
    engine, timing = _build_one(trt, None, None, plan, plan.onnx, b"old-timing", calibrator=object())
    assert engine == b"engine-bytes" and timing == b"timing-bytes"
    calls = rec.calls
    assert ("parse", "patch_selector.onnx") in calls and ("network_flags", 0) in calls
    assert ("workspace", "WORKSPACE", int(1.5 * (1 << 30))) in calls
    assert ("set", "builder_optimization_level", 4) in calls
    assert [c[1] for c in calls if c[0] == "flag"] == ["INT8", "FP16", "PREFER_PRECISION_CONSTRAINTS"]
    pinned = [c[1] for c in calls if c[0] == "output_type"]
    assert pinned == ["NORMALIZATION", "ELEMENTWISE", "UNARY", "SOFTMAX", "MATRIX_MULTIPLY"]  # + the codebook MatMul
    profiles = [c[1] for c in calls if c[0] == "profile"]
    assert profiles == [plan.profiles[0].shapes]
    assert [c[1] for c in calls if c[0] == "calibration_profile"] == [plan.calibration.shapes]
    assert ("set", "int8_calibrator", "calibrator") in calls
    assert ("timing_in", b"old-timing") in calls and ("timing_set", False) in calls

    rec2 = _Rec()
    dec = plan_engines(manifest, _opts(artifacts, components=("decoder",)))[0]
    _build_one(_fake_trt(rec2, []), None, None, dec, dec.onnx, b"", calibrator=None)
    assert [c[1] for c in rec2.calls if c[0] == "flag"] == ["FP16"]
    assert len([c for c in rec2.calls if c[0] == "profile"]) == 2
    assert not [c for c in rec2.calls if c[0] == "calibration_profile"]


# ---- no TensorRT here ---------------------------------------------------------------------------------------


@pytest.mark.skipif(HAVE_GPU, reason="TensorRT and a GPU are available: the refusal path is not reachable")
def test_build_and_backend_refuse_clearly_without_tensorrt(artifacts, tmp_path, capsys):
    from maven_edge.calibration.tensorrt import TrtBuildOptions, build_engines
    from maven_edge.cli import main
    from maven_edge.runtime.backends.trt_backend import TrtBackend, load_engine_index

    with pytest.raises(BackendError, match="TensorRT|cuda|GPU"):
        build_engines(TrtBuildOptions(artifacts, tmp_path / "e"))
    assert not (tmp_path / "e").exists()
    rc = main(["build-trt", "--artifacts", str(artifacts), "--out", str(tmp_path / "e"), "--precision", "int8"])
    assert rc == 2 and ("TensorRT" in capsys.readouterr().err)
    with pytest.raises(BackendError, match="TensorRT"):
        TrtBackend(artifacts)
    with pytest.raises(ArtifactError, match="build-trt"):
        load_engine_index(artifacts)


def test_dry_run_prints_the_plan_without_tensorrt(artifacts, capsys):
    from maven_edge.cli import main

    rc = main(["build-trt", "--artifacts", str(artifacts), "--out", "unused", "--dry-run", "--max-images", "2",
               "--max-seq", "256"])
    out = capsys.readouterr().out
    assert rc == 0 and "[prefill] inputs_embeds" in out and "[decode] past_key_values.0.key" in out


def test_engine_index_checks(tmp_path):
    from maven_edge.core.manifest import sha256_file
    from maven_edge.runtime.backends.trt_backend import ENGINES_JSON, check_engine_compat, load_engine_index

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "decoder.engine").write_bytes(b"x")
    entry = {"path": "decoder.engine", "sha256": sha256_file(tmp_path / "decoder.engine"), "size_bytes": 1}
    index = {"format_version": 1, "tensorrt": "10.3.0", "device": {"name": "Orin"},
             "tokenizer": {"path": "tokenizer.json", "sha256": sha256_file(tmp_path / "tokenizer.json"),
                           "size_bytes": 2},
             "engines": {"decoder": {"file": entry}}}
    (tmp_path / ENGINES_JSON).write_text(json.dumps(index))
    assert load_engine_index(tmp_path)["tensorrt"] == "10.3.0"
    (tmp_path / "decoder.engine").write_bytes(b"y")
    with pytest.raises(ArtifactError, match="sha256"):
        load_engine_index(tmp_path)
    index["engines"]["decoder"]["file"]["path"] = "../escape.engine"
    (tmp_path / ENGINES_JSON).write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="outside"):
        load_engine_index(tmp_path)
    check_engine_compat(index, "10.3.0", {"name": "Orin"})
    with pytest.raises(BackendError, match="not portable"):
        check_engine_compat(index, "10.7.0", {"name": "Orin"})
    with pytest.raises(BackendError, match="built on Orin"):
        check_engine_compat(index, "10.3.0", {"name": "NVIDIA H100"})


# ---- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU_REASON)
def test_fp16_engines_generate_like_ort(artifacts, tmp_path):
    from maven_edge.calibration.tensorrt import TrtBuildOptions, build_engines
    from maven_edge.model_src.data import get_sample
    from maven_edge.runtime.pipeline import MavenPipeline

    out = tmp_path / "engines"
    res = build_engines(TrtBuildOptions(artifacts, out, precision="fp16", max_images=4, max_seq=512, progress=False))
    assert {e.component for e in res.engines} == set(json.loads((out / "engines.json").read_text())["engines"])
    again = build_engines(TrtBuildOptions(artifacts, out, precision="fp16", max_images=4, max_seq=512,
                                          progress=False))
    assert all(e.cache_hit for e in again.engines)
    trt_pipe = MavenPipeline.from_artifacts(out, backend="trt")
    ort_pipe = MavenPipeline.from_artifacts(artifacts)
    same = 0
    for i in range(4):
        s = get_sample("test", i, image_size=64, patch_size=8)
        a = trt_pipe.generate(s.images, s.prompt, max_new_tokens=8)
        b = ort_pipe.generate(s.images, s.prompt, max_new_tokens=8)
        same += a.token_ids == b.token_ids
    assert same >= 3  # fp16 may flip a near-tie argmax of the random test model
