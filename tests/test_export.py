"""Per-component ONNX export, manifest, target-ort capping, refusals, optimization and validate.

The tiny preset (random weights, reduced depth to keep CI fast) is exported once per module
through the CLI; every other test reads those files. Long checks (paper preset beyond 2 GB,
edge-small) are opt-in: MAVEN_SLOW=1.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from maven_edge.cli import main as cli
from maven_edge.core.config import get_config
from maven_edge.core.errors import ArtifactError, ExportError
from maven_edge.core.manifest import COMPONENTS, load_manifest, sha256_file
from maven_edge.export import graph_tools, ort_compat
from maven_edge.export.onnx_components import OnnxComponents
from maven_edge.export.onnx_export import (
    ExportOptions,
    decoder_input_names,
    decoder_output_names,
    export_model,
    optimize_artifact,
    prepare_output_dir,
)
from maven_edge.export.validate import ValidateOptions, validate_artifacts
from maven_edge.model_src.checkpoint import build_model, save_checkpoint

# Same preset geometry and widths, fewer layers: the export cost is per layer.
FAST = ["llm.num_layers=2", "vision.num_layers=2", "discrete.num_layers=1"]
SLOW = pytest.mark.skipif(not os.environ.get("MAVEN_SLOW"), reason="opt-in: MAVEN_SLOW=1")

EXPECTED_IO = {
    "vision_encoder": (["pixel_values"], ["patch_features"]),
    "discrete_tokenizer": (["patch_features"], ["visual_codes"]),
    "embed_tokens": (["input_ids"], ["inputs_embeds"]),
    "patch_selector": (["patch_features", "h_eos"], ["scores", "selected_embeds", "selected_indices"]),
    "projector": (["patch_features"], ["projected_embeds"]),
}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model():
    return build_model(get_config("tiny", FAST))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    # 1 MB threshold: the larger files (decoder, vision, discrete) take the external-data path.
    argv = ["export", "--preset", "tiny", "--out", str(out), "--external-data-threshold-mb", "1", "--genai",
            "--no-progress"]
    for o in FAST:
        argv += ["--set", o]
    assert cli(argv) == 0
    return out


# ---- files and manifest ------------------------------------------------------------------------------


def test_files_and_manifest(artifacts: Path, model) -> None:
    m = load_manifest(artifacts)  # verifies every sha256 and path
    cfg = model.config
    assert set(m.components) == set(COMPONENTS) | {"projector"}
    assert m.preset == "tiny" and m.maven_config().to_dict() == cfg.to_dict() and m.mode == "hybrid"
    assert m.vocab["visual_offset"] == cfg.visual_offset and m.vocab["special_ids"]["<eos_vis>"] >= 0
    assert m.preprocess["image_size"] == cfg.preprocess.image_size and m.preprocess["resample"]
    assert m.num_patches == cfg.num_patches and m.num_kept_patches == cfg.num_kept_patches()
    assert m.keep_ratio == cfg.selector.keep_ratio
    assert m.target_ort == ort_compat.DEFAULT_TARGET
    assert {"torch", "onnx", "onnxruntime"} <= set(m.exporter)
    assert m.extra["source"]["kind"] == "preset" and m.extra["continuous_component"] == "projector"
    assert (artifacts / "tokenizer.json").is_file() and m.tokenizer.path == "tokenizer.json"
    for name, comp in m.components.items():
        assert comp.file.path == f"{name}.onnx" and comp.precision == "fp32"
        assert comp.file.sha256 == sha256_file(artifacts / comp.file.path)
        assert comp.opsets[""] >= 17
        for e in comp.external_data:
            assert e.sha256 == sha256_file(artifacts / e.path) and e.size_bytes > 0
    # the 1 MB threshold sent the decoder's weights to external data, and not the tiny projector's
    assert [e.path for e in m.components["decoder"].external_data] == ["decoder.onnx.data"]
    assert m.components["projector"].external_data == []
    dec = m.components["decoder"].extra
    assert dec["num_layers"] == 2 and dec["num_kv_heads"] == cfg.llm.num_kv_heads
    assert m.components["patch_selector"].extra["k"] == cfg.num_kept_patches()


def test_io_names_dtypes_and_axes(artifacts: Path, model) -> None:
    m = load_manifest(artifacts, verify=False)
    layers = model.config.llm.num_layers
    io = {**EXPECTED_IO, "decoder": (decoder_input_names(layers), decoder_output_names(layers))}
    for name, (ins, outs) in io.items():
        comp = m.components[name]
        sess = session(artifacts / comp.file.path)
        assert [i.name for i in sess.get_inputs()] == ins == [t.name for t in comp.inputs]
        assert [o.name for o in sess.get_outputs()] == outs == [t.name for t in comp.outputs]
        for got, spec in zip(sess.get_inputs() + sess.get_outputs(), comp.inputs + comp.outputs, strict=True):
            assert got.shape == spec.shape, (name, got.name)
            assert got.type == {"float32": "tensor(float)", "int64": "tensor(int64)"}[spec.dtype]
    dec = {t.name: t.shape for t in m.components["decoder"].inputs + m.components["decoder"].outputs}
    assert dec["attention_mask"] == ["batch", "total"] and dec["position_ids"] == ["batch", "seq"]
    assert dec["past_key_values.0.key"][2] == "past" and dec["present.1.value"][2] == "total"
    assert m.components["vision_encoder"].inputs[0].shape[0] == "images"


def test_graph_hygiene_and_report(artifacts: Path) -> None:
    for path in artifacts.glob("*.onnx"):
        graph_tools.check_graph(path)
        rep = graph_tools.report(path)
        assert rep.unused_initializers == [] and rep.node_count > 0 and sum(rep.op_histogram.values()) == rep.node_count
    dec = graph_tools.report(artifacts / "decoder.onnx")
    assert dec.external_data_bytes > dec.size_bytes and "MatMul" in dec.op_histogram


# ---- parity and dynamic axes ------------------------------------------------------------------------


def test_dynamic_image_counts_and_seq_lengths(artifacts: Path, model) -> None:
    cfg = model.config
    vis = session(artifacts / "vision_encoder.onnx")
    emb = session(artifacts / "embed_tokens.onnx")
    sel = session(artifacts / "patch_selector.onnx")
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for n in (1, 3):
            pv = rng.standard_normal((n, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
            (feats,) = vis.run(None, {"pixel_values": pv})
            ref = model.vision(torch.from_numpy(pv)).numpy()
            assert feats.shape == ref.shape and np.abs(feats - ref).max() <= 1e-4
            h = rng.standard_normal((n, cfg.llm.hidden_size)).astype(np.float32)
            scores, embeds, idx = sel.run(None, {"patch_features": ref, "h_eos": h})
            k = cfg.num_kept_patches()
            assert scores.shape == (n, cfg.num_patches) and embeds.shape == (n, k, cfg.llm.hidden_size)
            assert idx.dtype == np.int64 and (np.diff(idx, axis=1) > 0).all()  # raster order
        for b, s in ((1, 1), (2, 7)):
            ids = rng.integers(0, cfg.vocab_size, (b, s))
            (out,) = emb.run(None, {"input_ids": ids})
            assert np.abs(out - model.embed_ids(torch.from_numpy(ids)).numpy()).max() == 0


def test_decoder_empty_past_then_cached_steps(artifacts: Path, model) -> None:
    cfg = model.config.llm
    sess = session(artifacts / "decoder.onnx")
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(1)
    b, s = 2, 5
    x = rng.standard_normal((b, s, cfg.hidden_size)).astype(np.float32)
    mask = np.ones((b, s), np.int64)
    mask[1, :2] = 0  # left padding in the second row
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    empty = np.zeros((b, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    feeds = {"inputs_embeds": x, "attention_mask": mask, "position_ids": pos,
             **{n: empty for n in decoder_input_names(cfg.num_layers)[3:]}}
    out = dict(zip(names, sess.run(None, feeds), strict=True))
    with torch.no_grad():
        logits, hidden, present = model.llm(torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(pos))
        assert np.abs(out["logits"] - logits.numpy()).max() <= 1e-4
        assert np.abs(out["hidden_states"] - hidden.numpy()).max() <= 1e-4
        assert out["present.0.key"].shape == (b, cfg.num_kv_heads, s, cfg.head_dim)
        # two more steps on the returned cache, 1 token each
        for _ in range(2):
            x1 = rng.standard_normal((b, 1, cfg.hidden_size)).astype(np.float32)
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
            p1 = (np.cumsum(mask, 1) - 1)[:, -1:]
            feeds = {"inputs_embeds": x1, "attention_mask": mask, "position_ids": p1}
            feeds.update({k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")})
            out = dict(zip(names, sess.run(None, feeds), strict=True))
            logits, hidden, present = model.llm(torch.from_numpy(x1), torch.from_numpy(mask), torch.from_numpy(p1),
                                                present)
            assert np.abs(out["logits"] - logits.numpy()).max() <= 1e-4
            for i, (k, v) in enumerate(present):
                assert np.abs(out[f"present.{i}.key"] - k.numpy()).max() <= 1e-4
                assert np.abs(out[f"present.{i}.value"] - v.numpy()).max() <= 1e-4
        assert out["present.1.value"].shape[2] == s + 2


def test_validate_parity_and_tokens(artifacts: Path, model) -> None:
    report = validate_artifacts(ValidateOptions(artifacts, questions=3, max_new_tokens=8), model=model)
    assert report.ok, report.format_table()
    worst = {c.component for c in report.outputs}
    assert worst == {"vision_encoder", "discrete_tokenizer", "embed_tokens", "patch_selector", "projector", "decoder"}
    assert all(c.max_abs_diff <= 1e-4 for c in report.outputs)
    assert len(report.questions) == 3 and all(q.torch_tokens == q.onnx_tokens for q in report.questions)
    assert any(c.case.startswith("prefill, past 0") for c in report.outputs)


def test_validate_cli_exit_codes(artifacts: Path, capsys) -> None:
    assert cli(["validate", str(artifacts), "--questions", "1", "--max-new-tokens", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["identical_tokens"] == "1/1"
    # a tolerance nothing can meet: every float output now "fails"
    assert cli(["validate", str(artifacts), "--questions", "1", "--max-new-tokens", "3", "--atol", "-1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_onnx_modes_match_torch(artifacts: Path, model) -> None:
    """The ONNX reference loop also serves discrete and continuous modes (projector.onnx)."""
    comps = OnnxComponents(artifacts)
    pv = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        for mode in ("discrete", "continuous", "hybrid"):
            ref = model.encode_images(torch.from_numpy(pv), mode=mode).embeds.numpy()
            got = comps.encode_images(pv, mode)
            assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4, mode


# ---- target onnxruntime -----------------------------------------------------------------------------


def test_target_ort_fields_and_loading(artifacts: Path) -> None:
    target = ort_compat.get_target("1.18")
    m = load_manifest(artifacts, verify=False)
    assert m.extra["target"]["release"] == "1.18"
    for comp in m.components.values():
        proto = onnx.load(str(artifacts / comp.file.path), load_external_data=False)
        assert proto.ir_version == comp.ir_version <= target.max_ir_version
        assert all(op.version <= target.max_domain_version(op.domain) for op in proto.opset_import)
        assert ort_compat.compat_problems(proto, target) == []
        session(artifacts / comp.file.path)  # loads in the installed onnxruntime
    # re-stamping for an older release works when the ops allow it
    proto = onnx.load(str(artifacts / "projector.onnx"))
    ort_compat.cap_model(proto, ort_compat.get_target("1.14"))
    assert proto.ir_version == 8
    session_bytes = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session_bytes.get_outputs()[0].name == "projected_embeds"


def test_target_ort_refusals() -> None:
    from onnx import TensorProto, helper

    with pytest.raises(ExportError, match="unknown --target-ort"):
        ort_compat.get_target("0.9")
    with pytest.raises(ExportError, match="unknown --target-ort"):
        ort_compat.get_target("latest")
    with pytest.raises(ExportError, match="too old"):
        ort_compat.resolve_opset(16, ort_compat.get_target("1.18"))
    with pytest.raises(ExportError, match="newer than onnxruntime 1.18"):
        ort_compat.resolve_opset(22, ort_compat.get_target("1.18"))
    assert ort_compat.resolve_opset(None, ort_compat.get_target("1.14")) == 18
    assert ort_compat.installed_target().max_ir_version >= 10
    # an op that only exists from opset 23 cannot be re-stamped for onnxruntime 1.18
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="rms")
    graph = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    with pytest.raises(ExportError, match="RMSNormalization.*needs ai.onnx opset 23 > 21"):
        ort_compat.cap_model(model, ort_compat.get_target("1.18"))
    assert "| 1.18 | 1.16 | 21 |" in ort_compat.table_markdown()


# ---- refusals -------------------------------------------------------------------------------------------


def test_refuses_overwriting_another_model(artifacts: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(artifacts / "manifest.json", other / "manifest.json")
    argv = ["export", "--preset", "tiny", "--set", "llm.num_layers=1", "--out", str(other), "--no-progress"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "different model" in err and "--force" in err
    # the same model's export may be refreshed; --force overrides the refusal
    fp = load_manifest(artifacts, verify=False).extra["model_fingerprint"]
    assert "decoder.onnx" in prepare_output_dir(artifacts, fp, force=False)
    assert prepare_output_dir(other, "not-the-same", force=True)
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "x.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match="no manifest.json"):
        prepare_output_dir(tmp_path / "loose", fp, force=False)


def test_refuses_bad_opset_target_and_mismatched_checkpoint(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    assert cli(["export", "--preset", "tiny", "--out", out, "--opset", "16", "--no-progress"]) == 2
    assert "too old" in capsys.readouterr().err
    assert cli(["export", "--preset", "tiny", "--out", out, "--target-ort", "2.99", "--no-progress"]) == 2
    assert "unknown --target-ort" in capsys.readouterr().err
    ckpt = save_checkpoint(build_model(get_config("tiny", ["llm.num_layers=1"])), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["llm"]["num_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert cli(["export", "--checkpoint", str(ckpt), "--out", out, "--no-progress"]) == 2
    assert "does not match its config" in capsys.readouterr().err
    assert not Path(out).exists() or not any(Path(out).iterdir())
    with pytest.raises(ExportError, match="unknown optimizer"):
        export_model(build_model(get_config("tiny", ["llm.num_layers=1"])), ExportOptions(out=out, optimize="magic"))


def test_opset_17_for_tensorrt_86(model) -> None:
    """opset 17 (TensorRT 8.6 / JetPack 6.0): the exporter's own converter cannot move the discrete
    tokenizer's ReduceL2 (F.normalize) axes back from an input to an attribute; onnx's version
    converter does, and the result is checked and kept at opset 17 (issue 34, item 8)."""
    import onnx_ir as ir

    from maven_edge.export.onnx_export import _export_one, component_specs
    from maven_edge.export.trt_compat import graph_problems

    spec = next(s for s in component_specs(model) if s.name == "discrete_tokenizer")
    out = _export_one(spec, 17)
    assert out.opset_imports[""] == 17
    (red,) = [n for n in out.graph.all_nodes() if n.op_type == "ReduceL2"]
    assert list(red.attributes["axes"].value) == [-1] and len(red.inputs) == 1
    assert "noop_with_empty_axes" not in red.attributes
    assert graph_problems(ir.to_proto(out), "8.6.2") == []


def test_external_data_escaping_the_artifact_dir_is_refused(artifacts: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(artifacts, bad)
    proto = onnx.load(str(bad / "decoder.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../decoder.onnx.data"
    onnx.save(proto, str(bad / "decoder.onnx"))
    shutil.copy(bad / "decoder.onnx.data", tmp_path / "decoder.onnx.data")
    with pytest.raises(ArtifactError, match="modified or (truncated|corrupted)"):  # the manifest size/hash catch it first
        OnnxComponents(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["components"]["decoder"]["file"]["sha256"] = sha256_file(bad / "decoder.onnx")
    manifest["components"]["decoder"]["file"]["size_bytes"] = (bad / "decoder.onnx").stat().st_size
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact directory"):  # ... and the graph check next
        OnnxComponents(bad)


# ---- optimization -----------------------------------------------------------------------------------------


def test_optimize_is_validated_against_the_plain_export(artifacts: Path, model, tmp_path: Path) -> None:
    out = tmp_path / "opt"
    m = optimize_artifact(artifacts, out, "onnxscript")
    assert m.extra["optimized"] == "onnxscript" and load_manifest(out).extra["optimized"] == "onnxscript"
    for comp in m.components.values():
        graph_tools.check_graph(out / comp.file.path)
        assert graph_tools.report(out / comp.file.path).unused_initializers == []
    report = validate_artifacts(ValidateOptions(out, questions=1, max_new_tokens=4), model=model)
    assert report.ok, report.format_table()
    assert load_manifest(artifacts).extra["optimized"] is None  # the source export is untouched


def test_optimize_rejects_a_changed_result(artifacts: Path, tmp_path: Path, monkeypatch) -> None:
    """An optimizer that changes the numbers is refused, and the plain file is kept."""
    import onnx_ir as ir

    def breaking(ir_model, tool):
        for value in ir_model.graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT:
                value.const_value = ir.tensor(value.const_value.numpy() + 1.0)
                break
        return ir_model

    monkeypatch.setattr(graph_tools, "optimize_model", breaking)
    with pytest.raises(ExportError, match="changed output"):
        optimize_artifact(artifacts, tmp_path / "broken", "onnxscript")


# ---- onnxruntime-genai ---------------------------------------------------------------------------------


def test_genai_config_runs_text_generation(artifacts: Path, model) -> None:
    """`--genai`: onnxruntime-genai runs embed_tokens + decoder; greedy tokens equal torch's."""
    m = load_manifest(artifacts, verify=False)
    assert [e["path"] for e in m.extra["genai"]] == ["genai_config.json", "tokenizer_config.json"]
    for e in m.extra["genai"]:
        assert sha256_file(artifacts / e["path"]) == e["sha256"]
    og = pytest.importorskip("onnxruntime_genai", reason="pip install onnxruntime-genai (extra: genai)")
    gm = og.Model(str(artifacts))
    ids = model.tokenizer.encode_prompt("What color is the circle?")
    assert [int(t) for t in og.Tokenizer(gm).encode("What color is the circle?")] == ids[1:]
    params = og.GeneratorParams(gm)
    params.set_search_options(max_length=len(ids) + 10, do_sample=False)
    gen = og.Generator(gm, params)
    gen.append_tokens(np.asarray([ids], dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    want, mask = [], torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():  # greedy over the whole unified vocabulary, as onnxruntime-genai does
        logits, _, past = model.llm(model.embed_ids(torch.tensor([ids])), mask)
        while len(want) < len(got):
            want.append(int(logits[0, -1].argmax()))
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            logits, _, past = model.llm(model.embed_ids(torch.tensor([want[-1:]])), mask, None, past)
    assert got == want and len(got) >= 1


# ---- opt-in long checks -------------------------------------------------------------------------------------


@SLOW
def test_paper_width_export_crosses_2gb_with_external_data(tmp_path: Path) -> None:
    """`paper` at full width, 2 decoder layers: decoder weights ~2.3 GB -> decoder.onnx.data."""
    overrides = ["llm.num_layers=2", "vision.num_layers=1", "vision.feature_layer=-1"]
    out = tmp_path / "paper"
    t0 = time.perf_counter()
    argv = ["export", "--preset", "paper", "--out", str(out), "--no-progress"]
    for o in overrides:
        argv += ["--set", o]
    assert cli(argv) == 0
    seconds = time.perf_counter() - t0
    m = load_manifest(out)
    dec = m.components["decoder"]
    assert dec.external_data and dec.external_data[0].size_bytes > 2 * 1024**3
    assert (out / "decoder.onnx").stat().st_size < 10 * 1024**2
    graph_tools.check_graph(out / "decoder.onnx")
    report = validate_artifacts(ValidateOptions(out, questions=1, max_new_tokens=2))
    print(f"paper export {seconds:.0f} s, decoder data {dec.external_data[0].size_bytes / 1e9:.2f} GB")
    assert report.ok, report.format_table()


@SLOW
def test_edge_small_exports_and_validates(tmp_path: Path) -> None:
    """`edge-small` (random weights): the full-depth export validates (numbers in docs/usage/export.md)."""
    out = tmp_path / "edge-small"
    assert cli(["export", "--preset", "edge-small", "--out", str(out), "--no-progress"]) == 0
    assert cli(["validate", str(out), "--questions", "2", "--max-new-tokens", "8"]) == 0


@SLOW
def test_shipped_tiny_checkpoint_validates(tmp_path: Path) -> None:
    """The shipped, trained tiny model: every component within 1e-4 and identical greedy tokens."""
    from maven_edge.model_src.checkpoint import SHIPPED_TINY

    if not (SHIPPED_TINY / "model.safetensors").is_file():
        pytest.skip("model_src/checkpoints/tiny is not there yet")
    out = tmp_path / "shipped"
    assert cli(["export", "--checkpoint", str(SHIPPED_TINY), "--out", str(out), "--no-progress"]) == 0
    assert cli(["validate", str(out), "--questions", "8"]) == 0
