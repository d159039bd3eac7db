"""Calibration readers, quantization recipes and their refusals (issue 7).

The end-to-end tests quantize the small exported test model that the runtime tests share
(cached under .pytest_cache); unit tests use hand-built ONNX graphs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_runtime import export_test_artifacts

from maven_edge.core.errors import ArtifactError, CalibrationError, InputError


@pytest.fixture(scope="module")
def artifacts(pytestconfig) -> Path:
    return export_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")))


@pytest.fixture(scope="module")
def manifest(artifacts):
    from maven_edge.core.manifest import load_manifest

    return load_manifest(artifacts)


@pytest.fixture(scope="module")
def quantized(artifacts, tmp_path_factory):
    """recipe -> QuantizeResult, made once per module (a few seconds each)."""
    from maven_edge.calibration.quantize import QuantizeOptions, quantize_artifacts

    root = tmp_path_factory.mktemp("quant")
    out = {}
    for recipe in ("int8-static", "int4-weight", "int8-dynamic", "fp16"):
        out[recipe] = quantize_artifacts(artifacts, root / recipe,
                                         QuantizeOptions(recipe=recipe, calib_samples=6, progress=False))
    return out


# ---- recipes ---------------------------------------------------------------------------------------


COMPONENTS = ["vision_encoder", "discrete_tokenizer", "embed_tokens", "patch_selector", "projector", "decoder"]


def test_recipe_plans():
    from maven_edge.calibration.quantize import QUANT_RECIPES, recipe_plan

    plans = {r: recipe_plan(r, COMPONENTS) for r in QUANT_RECIPES}
    assert plans["int8-static"] == {"vision_encoder": "int8-static", "discrete_tokenizer": "int8-static",
                                    "embed_tokens": "fp32", "patch_selector": "int8-static",
                                    "projector": "int8-static", "decoder": "fp32"}
    assert plans["int4-weight"]["decoder"] == "int4-weight" and plans["int4-weight"]["vision_encoder"] == "fp32"
    assert plans["int8-dynamic"]["decoder"] == "int8-dynamic"
    assert plans["int8-int4"]["decoder"] == "int4-weight" and plans["int8-int4"]["patch_selector"] == "int8-static"
    assert set(plans["fp16"].values()) == {"fp16"}
    assert plans["int8-weight"] == {c: "int8-weight" if c == "decoder" else "fp32" for c in COMPONENTS}
    for name, dec in (("vision-int8", "fp32"), ("latency-int8", "int8-dynamic"), ("latency-int4", "int4-weight")):
        assert plans[name] == {"vision_encoder": "int8-fused-dynamic", "discrete_tokenizer": "int8-fused-dynamic",
                               "embed_tokens": "fp32", "patch_selector": "fp32", "projector": "fp32", "decoder": dec}
    mixed = recipe_plan("int4-weight", COMPONENTS, {"vision_encoder": "fp16", "projector": "int8-dynamic"})
    assert mixed["vision_encoder"] == "fp16" and mixed["projector"] == "int8-dynamic" and mixed["decoder"] == "int4-weight"
    with pytest.raises(InputError, match="unknown quantization recipe"):
        recipe_plan("int3", COMPONENTS)
    with pytest.raises(InputError, match="no component"):
        recipe_plan("fp16", COMPONENTS, {"lm": "fp16"})
    with pytest.raises(InputError, match="Gather"):
        recipe_plan("fp16", COMPONENTS, {"embed_tokens": "int4-weight"})


def test_cli_choices_match_the_library():
    from maven_edge.calibration import commands, quantize, tensorrt
    from maven_edge.cli import build_parser

    assert commands.QUANT_RECIPES is quantize.QUANT_RECIPES
    assert commands.TRT_PRECISIONS is tensorrt.PRECISIONS
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert tuple(next(a for a in sub.choices["quantize"]._actions if a.dest == "recipe").choices) == \
        quantize.QUANT_RECIPES.names()


def _graph(nodes, inputs, outputs, inits=()):
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what onnxruntime 1.18+ loads (onnx's newest IR may be newer)
    return model


def test_discrete_sensitive_nodes_and_lm_head():
    from onnx import TensorProto, helper, numpy_helper

    from maven_edge.calibration.quantize import discrete_sensitive_nodes, lm_head_nodes

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="proj"),  # -> MatMul: not sensitive
        helper.make_node("Relu", ["a"], ["b"], name="act"),
        helper.make_node("MatMul", ["b", "w"], ["c"], name="codebook"),  # -> Div -> ArgMax: sensitive
        helper.make_node("Div", ["c", "c"], ["d"], name="norm"),
        helper.make_node("ArgMax", ["d"], ["codes"], name="argmax", axis=-1),
        helper.make_node("MatMul", ["b", "w"], ["logits"], name="head"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    outs = [helper.make_tensor_value_info("codes", TensorProto.INT64, [2, 1]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4])]
    model = _graph(nodes, [x], outs, [w])
    assert discrete_sensitive_nodes(model) == ["codebook"]
    assert lm_head_nodes(model) == ["head"]


def test_dedupe_nodes_removes_repeated_casts():
    from onnx import TensorProto, checker, helper

    from maven_edge.calibration.quantize import dedupe_nodes

    cast = helper.make_node("Cast", ["x"], ["x32"], to=1, name="x_cast")
    nodes = [cast, helper.make_node("Cast", ["x"], ["x32"], to=1, name="x_cast"),
             helper.make_node("Relu", ["x32"], ["y"], name="r"), helper.make_node("Relu", ["x32"], ["z"], name="r")]
    model = _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                    helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    assert dedupe_nodes(model) == 1
    assert [n.name for n in model.graph.node] == ["x_cast", "r", "r_1"]
    checker.check_model(model, full_check=True)


def test_fit_target_caps_a_newer_ir_version(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from maven_edge.calibration.quantize import fit_target

    model = _graph([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model.ir_version = 11  # newer than onnxruntime 1.18 loads
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    release, notes = fit_target(path, "1.18")
    assert release == "1.18" and notes == []
    assert onnx.load(path).ir_version == 10


# ---- calibration sets and refusals -------------------------------------------------------------------


def test_external_data_is_never_shared_by_hard_links(tmp_path):
    """onnx refuses external data read through a file with several hard links: an unchanged
    component's weights are copied into a recipe's output (never linked), and a source whose weights
    an older version linked is given its own copy before loading."""
    import os

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from maven_edge.calibration.quantize import _link_or_copy, _load

    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(helper.make_model(graph), str(src / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    data = src / "m.onnx.data"
    linked = tmp_path / "other.data"
    os.link(data, linked)  # what an older version's recipe output did
    with pytest.raises(Exception, match="hard link"):
        onnx.load(str(src / "m.onnx"))
    model = _load(src / "m.onnx")  # works, and unshares the file (same bytes)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), numpy_helper.to_array(w))
    assert data.stat().st_nlink == 1 and data.read_bytes() == linked.read_bytes()
    out = tmp_path / "out.data"
    _link_or_copy(data, out, external_data=True)
    assert data.stat().st_nlink == 1 and out.stat().st_nlink == 1 and out.read_bytes() == data.read_bytes()


def test_synthetic_set_matches_runtime_preprocessing(manifest, tmp_path):
    from maven_edge.calibration.readers import CalibrationSet, resolve_calibration_set
    from maven_edge.core.preprocess import preprocess_images
    from maven_edge.model_src.data import get_sample

    cs = resolve_calibration_set(None, manifest, 3)
    assert cs.num_samples == 3 and cs.source == "synthetic:val" and cs.preset == manifest.preset
    s = get_sample("val", 0, image_size=64, patch_size=8)
    np.testing.assert_array_equal(cs.pixel_values[0], preprocess_images(s.images, manifest.maven_config().preprocess))
    assert cs.prompts[0] == s.prompt
    cs.save(tmp_path / "set")
    back = CalibrationSet.load(tmp_path / "set")
    assert back.digest() == cs.digest() and back.prompts == cs.prompts
    # a modified saved set is refused
    meta = json.loads((tmp_path / "set" / "calibration.json").read_text())
    meta["digest"] = "0" * 64
    (tmp_path / "set" / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(CalibrationError, match="modified"):
        CalibrationSet.load(tmp_path / "set")


def test_folder_set_and_refusals(manifest, tmp_path):
    from PIL import Image

    from maven_edge.calibration.readers import (
        arrays_calibration_set,
        check_calibration_set,
        resolve_calibration_set,
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(CalibrationError, match="empty"):
        resolve_calibration_set(empty, manifest, 4)
    with pytest.raises(CalibrationError, match="empty"):
        resolve_calibration_set(None, manifest, 0)

    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(small / "a.png")
    with pytest.raises(CalibrationError, match=r"32x24, smaller than the model input 64x64"):
        resolve_calibration_set(small, manifest, 4)
    assert resolve_calibration_set(small, manifest, 4, allow_upscale=True).num_images == 1

    good = tmp_path / "good"
    good.mkdir()
    for i in range(5):
        Image.new("RGB", (96, 80), (40 * i, 90, 10)).save(good / f"{i}.jpg")
    cs = resolve_calibration_set(good, manifest, 2, images_per_sample=2)
    assert cs.num_samples == 2 and [p.shape[0] for p in cs.pixel_values] == [2, 2]

    # wrong image size: pixel_values prepared for another model (224 px) refused
    wrong = arrays_calibration_set(np.zeros((2, 3, 224, 224), np.float32), manifest.preprocess)
    with pytest.raises(CalibrationError, match="224x224 pixels.*take 64x64"):
        check_calibration_set(wrong, manifest)
    np.save(tmp_path / "px.npy", np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationError, match="32x32"):
        resolve_calibration_set(tmp_path / "px.npy", manifest, 4)

    # not matching the artifacts: other preprocessing, another preset, too many images
    other = resolve_calibration_set(good, manifest, 1)
    other.preprocess = dict(other.preprocess, mean=[0.5, 0.5, 0.5])
    with pytest.raises(CalibrationError, match="does not match the artifacts.*mean"):
        check_calibration_set(other, manifest)
    other = resolve_calibration_set(good, manifest, 1)
    other.preset = "edge-small"
    with pytest.raises(CalibrationError, match="preset 'edge-small'"):
        check_calibration_set(other, manifest)
    many = arrays_calibration_set([np.zeros((9, 3, 64, 64), np.float32)], manifest.preprocess)
    with pytest.raises(CalibrationError, match="9 images"):
        check_calibration_set(many, manifest)


def test_quantize_refuses_bad_calibration_through_the_cli(artifacts, tmp_path, capsys):
    from maven_edge.cli import main

    empty = tmp_path / "imgs"
    empty.mkdir()
    rc = main(["quantize", "--artifacts", str(artifacts), "--out", str(tmp_path / "q"), "--recipe", "int8-static",
               "--calib-images", str(empty), "--quiet"])
    assert rc == 2
    assert "calibration set is empty" in capsys.readouterr().err
    assert not (tmp_path / "q" / "manifest.json").exists()


def test_quantize_refuses_bad_directories(artifacts, quantized, tmp_path):
    from maven_edge.calibration.quantize import QuantizeOptions, quantize_artifacts

    with pytest.raises(InputError, match="new directory"):
        quantize_artifacts(artifacts, artifacts, QuantizeOptions(recipe="int4-weight", progress=False))
    with pytest.raises(ArtifactError, match="already holds quantized"):
        quantize_artifacts(quantized["int4-weight"].out, tmp_path / "x", QuantizeOptions(recipe="fp16", progress=False))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        quantize_artifacts(artifacts, busy, QuantizeOptions(recipe="int4-weight", progress=False))
    with pytest.raises(InputError, match="block-size"):
        QuantizeOptions(block_size=24).validate()


# ---- quantized artifacts ---------------------------------------------------------------------------------


def _ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_int8_static_artifacts(quantized):
    from maven_edge.core.manifest import load_manifest

    res = quantized["int8-static"]
    m = load_manifest(res.out)  # every sha256 checks
    assert m.recipe == "int8-static"
    prec = {k: c.precision for k, c in m.components.items()}
    assert prec == {"vision_encoder": "int8", "discrete_tokenizer": "int8", "embed_tokens": "fp32",
                    "patch_selector": "int8", "projector": "int8", "decoder": "fp32"}
    q = m.extra["quantization"]
    assert q["calibration"]["samples"] == 6 and q["calibration"]["source"] == "synthetic:val"
    assert q["source"]["model_fingerprint"] and q["plan"]["decoder"] == "fp32"
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(res.out / "vision_encoder.onnx")
    disc = m.components["discrete_tokenizer"].extra["quantization"]
    assert disc["kept_fp32"], "the VQ codebook lookup must stay fp32"
    for r in res.components:
        if r.method == "int8-static":
            assert r.ratio < 0.5, (r.name, r.ratio)
    assert m.target_ort == "1.18"


def test_int4_and_int8_dynamic_decoders(quantized):
    from maven_edge.core.manifest import load_manifest

    m4 = load_manifest(quantized["int4-weight"].out)
    dec = m4.components["decoder"]
    assert dec.precision == "int4" and dec.opsets.get("com.microsoft") == 1
    info = dec.extra["quantization"]
    assert info["block_size"] == 32 and info["accuracy_level"] == 4 and info["quantized_matmuls"] >= 14
    assert "MatMulNBits" in _ops(quantized["int4-weight"].out / "decoder.onnx")
    r4 = next(r for r in quantized["int4-weight"].components if r.name == "decoder")
    assert r4.ratio < 0.35
    assert info["parity"]["logits.rel_l2"] < 0.25
    m8 = load_manifest(quantized["int8-dynamic"].out)
    assert m8.components["decoder"].precision == "int8"
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & _ops(quantized["int8-dynamic"].out / "decoder.onnx") or (
        "DynamicQuantizeMatMul" in _ops(quantized["int8-dynamic"].out / "decoder.onnx"))


def test_fp16_keeps_float32_io_and_norms(quantized):
    import onnx

    from maven_edge.core.manifest import load_manifest

    res = quantized["fp16"]
    m = load_manifest(res.out)
    assert {c.precision for c in m.components.values()} == {"fp16"}
    for c in m.components.values():  # the runtime feeds float32 and int64, as before
        assert {t.dtype for t in c.inputs} <= {"float32", "int64"}
    dec = onnx.load(str(res.out / "decoder.onnx"))
    fp16_inits = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in dec.graph.initializer)
    assert fp16_inits > 10
    # the RMSNorm chain runs in fp32: every Pow reads a Cast-to-float tensor
    producers = {o: n for n in dec.graph.node for o in n.output}
    pows = [n for n in dec.graph.node if n.op_type == "Pow"]
    assert pows and all(producers[n.input[0]].op_type == "Cast" for n in pows)
    for r in res.components:
        assert 0.4 < r.ratio < 0.65, (r.name, r.ratio)
        for k, v in r.details["parity"].items():
            assert v < 0.01, (r.name, k, v)


def test_quantized_artifacts_run_in_the_pipeline(artifacts, quantized):
    from maven_edge.model_src.data import get_sample
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.pipeline import MavenPipeline

    s = get_sample("test", 1, image_size=64, patch_size=8)
    so = SessionConfig(intra_op_num_threads=1)
    ref = MavenPipeline.from_artifacts(artifacts, session_options=so).generate(s.images, s.prompt, max_new_tokens=6)
    for recipe in ("int8-static", "int4-weight", "fp16"):
        pipe = MavenPipeline.from_artifacts(quantized[recipe].out, session_options=so)
        res = pipe.generate(s.images, s.prompt, max_new_tokens=6)
        assert res.token_ids and len(res.token_ids) <= 6
        assert pipe.backend.describe()["recipe"] == recipe
        if recipe == "fp16":
            assert res.token_ids == ref.token_ids


# ---- the report ------------------------------------------------------------------------------------------


def test_report_metrics_and_markdown(tmp_path, capsys):
    from maven_edge.benchmarks.quantize_report import TARGETS, agreement, checks, render_markdown, summarize

    assert agreement([5, 6, 7], [5, 6, 7], "eos", "eos") == (4, 4)
    assert agreement([5, 6, 7], [5, 9, 7], "eos", "eos") == (1, 4)
    assert agreement([5, 6], [5, 6, 8], "eos", "length") == (2, 3)  # kept talking past fp32's end

    def rec(family, correct, tokens, ms):
        return {"family": family, "task": "t", "correct": correct, "tokens": tokens, "finish": "eos",
                "total_ms": ms, "visual_ms": ms / 2, "prefill_ms": 1.0, "decode_step_ms": [ms / 10] * 3}

    records = {
        "fp32": [rec("single", True, [1, 2], 10), rec("multi", True, [3], 10), rec("multi", False, [4], 10)],
        "int4-weight": [rec("single", True, [1, 2], 5), rec("multi", False, [9], 5), rec("multi", False, [4], 5)],
    }
    s = summarize(records)
    assert s["fp32"]["accuracy"] == pytest.approx(200 / 3)
    assert s["int4-weight"]["accuracy_delta"] == pytest.approx(-100 / 3)
    assert s["int4-weight"]["family_delta"] == {"multi": -50.0, "single": 0.0}
    assert s["int4-weight"]["sequence_agreement"] == pytest.approx(2 / 3)
    assert s["int4-weight"]["token_agreement"] == pytest.approx(5 / 7)
    assert s["int4-weight"]["decode_step_latency_ratio"] == pytest.approx(0.5)
    report = {
        "command": "maven-edge quantize-report --artifacts a", "date": "today",
        "machine": {"cpu": "cpu", "cores": 2, "onnxruntime": "1.31.1"}, "threads": 2, "max_new_tokens": 32,
        "model": {"preset": "tiny", "source": "trained checkpoint x"}, "split": "test",
        "plans": {"fp32": None, "int4-weight": {"decoder": "int4-weight", "vision_encoder": "fp32"}},
        "sizes": {"fp32": {"vision_encoder": 4_000_000, "decoder": 10_000_000},
                  "int4-weight": {"vision_encoder": 4_000_000, "decoder": 2_000_000}},
        "summary": s, "targets": TARGETS, "seconds": 3.0,
    }
    report["checks"] = checks(report)
    assert report["checks"] == [{"check": "int4-weight accuracy drop vs fp32 (points, tiny)",
                                 "value": pytest.approx(33.33, abs=0.01), "target": "<= 5.0", "ok": False}]
    md = render_markdown(report)
    assert "| int4-weight | 33.3 |" in md and "**int4-weight**: decoder=int4-weight." in md
    assert "| int4-weight | 4.00 | 2.00 | 6.00 | 0.43 |" in md and "| no |" in md
    assert "0.50x" in md
    # --render-only re-writes the page from the JSON, without measuring anything
    from maven_edge.cli import main

    (tmp_path / "quantization.json").write_text(json.dumps(report))
    assert main(["quantize-report", "--render-only", str(tmp_path / "quantization.json")]) == 0
    assert (tmp_path / "quantization.md").read_text() == md
    # the edge-small section says when and by what command it was measured (it is kept across updates)
    step = {"median_ms": 10.0, "p90_ms": 12.0, "steps": 24}
    report["edge"] = {
        "preset": "edge-small", "source": "random seeded weights (preset edge-small)", "past": 128, "rounds": 3,
        "steps_per_round": 24, "llm": {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2},
        "sizes": {"fp32": {"decoder": 8_000_000}, "int4-weight": {"decoder": 1_000_000}},
        "decoder_ratio": {"fp32": 1.0, "int4-weight": 0.125},
        "decode_step": {"fp32": {**step, "speedup_vs_fp32": 1.0}, "int4-weight": {**step, "speedup_vs_fp32": 2.0}},
        "date": "2026-11-26 11:24 UTC", "command": "maven-edge quantize-report --edge-artifacts e",
    }
    report["checks"] = checks(report)
    md = render_markdown(report)
    assert "Measured on 2026-11-26 11:24 UTC by `maven-edge quantize-report --edge-artifacts e`." in md
    assert "| int4-weight | 1.00 | 0.125 |" in md


def test_report_update_for_some_recipes_keeps_the_other_rows(artifacts, tmp_path, monkeypatch):
    """`quantize-report --sections accuracy --recipes R` on an existing report re-measures R and keeps the
    other recipes' rows (same model, split and settings), each row dated; other settings are refused."""
    from maven_edge.benchmarks import quantize_report as qr

    monkeypatch.setattr(qr, "calib_section", lambda *a: {})  # measured elsewhere (slow)
    base = {"artifacts": artifacts, "out": tmp_path, "work": tmp_path / "work", "limit": 3, "threads": 1,
            "progress": False}
    qr.run_report(qr.ReportOptions(recipes=("fp16", "int8-weight"), **base))
    first = json.loads((tmp_path / "quantization.json").read_text())
    qr.run_report(qr.ReportOptions(recipes=("int8-weight",), sections=("accuracy",), **base))
    second = json.loads((tmp_path / "quantization.json").read_text())
    assert second["recipes"] == ["fp16", "int8-weight"] and list(second["summary"]) == ["fp32", "fp16", "int8-weight"]
    assert second["summary"]["fp16"] == first["summary"]["fp16"] and second["sizes"]["fp16"] == first["sizes"]["fp16"]
    # the table's header and fp32 row stay those of the run that made it; the update is listed
    assert second["command"] == first["command"] and second["summary"]["fp32"] == first["summary"]["fp32"]
    assert "--recipes int8-weight --split test" in second["updates"][-1]["command"]
    for key in ("accuracy", "family_accuracy", "sequence_agreement"):  # deterministic: the same when re-measured
        assert second["summary"]["int8-weight"][key] == first["summary"]["int8-weight"][key]
    assert second["row_dates"] == {"fp16": first["date"], "int8-weight": second["updates"][-1]["date"]}
    md = (tmp_path / "quantization.md").read_text()
    assert "| fp16 |" in md and "| int8-weight |" in md and "Section(s) accuracy re-measured" in md
    with pytest.raises(InputError, match="other settings"):
        qr.run_report(qr.ReportOptions(recipes=("int8-weight",), sections=("accuracy",), **{**base, "limit": 2}))
    with pytest.raises(InputError, match="max new tokens 64 != 16"):
        qr.run_report(qr.ReportOptions(recipes=("int8-weight",), sections=("accuracy",), max_new_tokens=16, **base))
    # every recipe re-measured (a new model, say): a whole new table, so the older rows' dates and the
    # update lines it supersedes go; the page states this command's run time, not a sum over updates
    qr.run_report(qr.ReportOptions(recipes=("fp16", "int8-weight"), sections=("accuracy",), **base))
    third = json.loads((tmp_path / "quantization.json").read_text())
    assert "row_dates" not in third and [u["sections"] for u in third["updates"]] == [["accuracy"]]
    assert third["updates"][0]["date"] == third["date"]
    md = (tmp_path / "quantization.md").read_text()
    assert "Rows measured in separate runs" not in md and md.count("re-measured on") == 1
    assert f"Run time of the last command that updated this page: {third['seconds']:.0f} s." in md


def test_report_answers_as_long_as_eval_and_names_other_lengths():
    """The report answers with `maven-edge eval`'s default length (an 8-image labelled tally is 54
    tokens; the old 32 cut it), and its recorded command names any other length so it re-makes the page."""
    from maven_edge.benchmarks import quantize_report as qr
    from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS

    opts = qr.ReportOptions(artifacts="a", out="docs")
    assert opts.max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 64
    assert "--max-new-tokens" not in qr._command(opts)
    assert "--max-new-tokens 16" in qr._command(qr.ReportOptions(artifacts="a", max_new_tokens=16))
    with pytest.raises(InputError, match="--max-new-tokens must be >= 1"):
        qr.ReportOptions(artifacts="a", max_new_tokens=0).validate()


def test_calibration_methods_give_different_ranges(artifacts, manifest, tmp_path):
    """onnxruntime's quantize_static default (128 histogram bins) makes entropy equal MinMax; ours do not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from maven_edge.calibration.quantize import calibrate_ranges
    from maven_edge.calibration.readers import ComponentFeeds, make_ort_reader, resolve_calibration_set

    def width(r, n):
        lo, hi = r[n].range_value
        return float(np.max(hi) - np.min(lo))

    # entropy (2048 bins: slow in pure Python) on a one-MatMul graph with heavy-tailed activations
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    model = _graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w])
    onnx.save(model, tmp_path / "mm.onnx")
    rng = np.random.default_rng(0)
    rows = [{"x": rng.standard_t(2, (64, 8)).astype(np.float32)} for _ in range(4)]
    mm = {m: calibrate_ranges(tmp_path / "mm.onnx", make_ort_reader(rows, single_images=False), m)
          for m in ("minmax", "entropy")}
    assert width(mm["entropy"], "x") < 0.8 * width(mm["minmax"], "x")

    # percentile on the real vision encoder
    cs = resolve_calibration_set(None, manifest, 3)
    feeds = ComponentFeeds(artifacts, cs, manifest).feeds("vision_encoder")
    path = artifacts / "vision_encoder.onnx"
    ranges = {m: calibrate_ranges(path, make_ort_reader(feeds), m) for m in ("minmax", "percentile")}
    names = list(ranges["minmax"].keys())
    assert names and set(names) == set(ranges["percentile"].keys())
    assert all(width(ranges["percentile"], n) <= width(ranges["minmax"], n) + 1e-5 for n in names)
    assert any(width(ranges["percentile"], n) < width(ranges["minmax"], n) - 1e-5 for n in names)


# ---- the latency recipes (issue 35) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def latency(artifacts, tmp_path_factory):
    from maven_edge.calibration.quantize import QuantizeOptions, quantize_artifacts

    return quantize_artifacts(artifacts, tmp_path_factory.mktemp("latency") / "latency-int8",
                              QuantizeOptions(recipe="latency-int8", progress=False))


def test_latency_int8_fuses_the_vit_and_quantizes_the_decoder_to_int8_dynamic(latency, artifacts):
    from maven_edge.core.manifest import load_manifest

    m = load_manifest(latency.out)
    prec = {k: c.precision for k, c in m.components.items()}
    assert prec == {"vision_encoder": "int8", "discrete_tokenizer": "int8", "embed_tokens": "fp32",
                    "patch_selector": "fp32", "projector": "fp32", "decoder": "int8"}
    vit = m.components["vision_encoder"].extra["quantization"]
    # the test model's ViT runs one block, whose attention follows the pre-LayerNorm and keeps its MatMuls
    # (deeper ViTs fuse every later block's attention: 3 of 4 on tiny, 10 of 11 on edge-small)
    assert vit["fusion"]["fused_ops"].get("SkipLayerNormalization", 0) >= 1 and vit["fusion"]["num_heads"] > 0
    assert vit["fusion"]["nodes"][1] < vit["fusion"]["nodes"][0]
    assert vit["parity"]["patch_features.rel_l2"] < 0.1
    disc = m.components["discrete_tokenizer"].extra["quantization"]
    assert disc["kept_fp32"], "the VQ codebook lookup must stay fp32"
    dec = m.components["decoder"].extra["quantization"]
    # int8 weights per output channel, activations quantized at run time (an integer GEMM: the fastest
    # prefill on AVX2, docs/benchmarks.md), the LM head included
    assert dec["weights"] == "int8 per-channel" and dec["kept_fp32"] == [] and dec["parity"]["logits.rel_l2"] < 0.05
    ops = _ops(latency.out / "decoder.onnx")
    assert "DynamicQuantizeLinear" in ops and "MatMulNBits" not in ops
    r = next(r for r in latency.components if r.name == "decoder")
    assert 0.2 < r.ratio < 0.5  # 8 bits per weight: about a quarter of fp32


def test_latency_artifacts_answer_like_fp32(latency, artifacts):
    from maven_edge.runtime.pipeline import MavenPipeline

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(2)]
    prompt = "<image><image>\nQuestion: what is in the images?\nAnswer:"
    ref = MavenPipeline.from_artifacts(artifacts).generate(images, prompt, max_new_tokens=6)
    got = MavenPipeline.from_artifacts(latency.out).generate(images, prompt, max_new_tokens=6)
    assert got.visual_tokens_per_image == ref.visual_tokens_per_image
    assert len(got.token_ids) >= 1


@pytest.mark.parametrize("batches", [7, 8, 16, 17])
def test_minmax_ranges_cover_every_calibration_batch(tmp_path, batches):
    """onnxruntime's max_intermediate_outputs drops each full group of batches unmerged (and fails when
    the count divides exactly); our chunked reading must see every batch, whatever the count."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from maven_edge.calibration.quantize import calibrate_ranges
    from maven_edge.calibration.readers import make_ort_reader

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    model = _graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    feeds = [{"x": np.full((1, 4), float(i + 1), np.float32)} for i in range(batches)]
    feeds[0]["x"][0, 0] = -50.0  # the extremes sit in the first and the last batch
    feeds[-1]["x"][0, 1] = 90.0
    ranges = calibrate_ranges(path, make_ort_reader(feeds, "mm"), "minmax")
    lo, hi = ranges["x"].range_value
    assert float(np.min(lo)) == -50.0 and float(np.max(hi)) == 90.0


def test_bench_remakes_a_recipe_set_when_the_recipe_changes(artifacts, tmp_path, monkeypatch):
    """The bench's and quantize-report's quantized sets are reused while the fp32 export and what the
    recipe does are the same; a recipe whose methods changed (latency-int8's decoder did) is made again."""
    from maven_edge.benchmarks.quantize import quantize_recipe
    from maven_edge.calibration import quantize as q

    out = quantize_recipe(artifacts, tmp_path / "set", "int8-weight")
    made = (out / "decoder.onnx").stat().st_mtime_ns
    assert quantize_recipe(artifacts, out, "int8-weight") == out and (out / "decoder.onnx").stat().st_mtime_ns == made
    changed = q.Registry("quantization recipe")
    for name, recipe in q.QUANT_RECIPES.items():
        changed.add(name, q.QuantRecipe(recipe.help, decoder="int8-dynamic") if name == "int8-weight" else recipe)
    from maven_edge.benchmarks.quantize_report import ensure_quantized

    work = tmp_path / "report"
    assert ensure_quantized(artifacts, work, "int8-weight", True, 4, False)[1] > 0
    assert ensure_quantized(artifacts, work, "int8-weight", True, 4, False)[1] == 0.0  # reused
    assert ensure_quantized(artifacts, work, "int8-weight", True, 8, False)[1] > 0  # other options: made again
    src_sha = q.sha256_file(artifacts / "manifest.json")
    assert q.made_by(work / "int8-weight", "int8-weight", src_sha)
    assert not q.made_by(work / "int8-weight", "int4-weight", src_sha)  # another recipe
    assert not q.made_by(work / "int8-weight", "int8-weight", "0" * 64)  # another fp32 export
    assert not q.made_by(tmp_path / "nothing-here", "int8-weight", src_sha)
    monkeypatch.setattr(q, "QUANT_RECIPES", changed)
    quantize_recipe(artifacts, out, "int8-weight")
    assert "DynamicQuantizeLinear" in _ops(out / "decoder.onnx")
    assert ensure_quantized(artifacts, work, "int8-weight", True, 4, False)[1] > 0  # made again, not reused
    assert "DynamicQuantizeLinear" in _ops(work / "int8-weight" / "decoder.onnx")


def test_nbits_rows_times_one_two_and_four_rows():
    """tools.nbits_rows (the int4 batching bound of docs/benchmarks.md) builds a valid MatMulNBits
    graph and reports the 2- and 4-row costs against one row."""
    from tools.nbits_rows import main, measure

    (row,) = measure(layers=1, blocks=[32], levels=[4], threads=1, repeats=2)
    assert set(row["ms"]) == {1, 2, 4} and all(v > 0 for v in row["ms"].values())
    assert row["cost_4_rows"] == pytest.approx(row["ms"][4] / row["ms"][1])
    assert row["max_4_stream_aggregate"] == pytest.approx(4 / row["cost_4_rows"])
    with pytest.raises(SystemExit):
        main(["--block-sizes", "33"])
