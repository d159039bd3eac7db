"""`maven-edge export --decoder genai|genai-int4`: the decoder from onnxruntime-genai's model builder
(fused GroupQueryAttention, shared past/present KV buffer) under our manifest contract, checked
against torch and driven by the ORT runtime's shared-buffer loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from maven_edge.cli import main as cli
from maven_edge.core.config import get_config
from maven_edge.core.errors import ExportError
from maven_edge.core.manifest import load_manifest
from maven_edge.core.sampling import GenerationConfig
from maven_edge.export.genai_decoder import builder_unavailable, rename_onnx
from maven_edge.export.validate import ValidateOptions, validate_artifacts
from maven_edge.model_src.checkpoint import build_model

pytestmark = pytest.mark.skipif(builder_unavailable() is not None, reason=str(builder_unavailable()))

FAST = ["llm.num_layers=2", "vision.num_layers=2", "discrete.num_layers=1"]


def _export(out: Path, decoder: str) -> Path:
    argv = ["export", "--preset", "tiny", "--out", str(out), "--decoder", decoder, "--no-progress"]
    for o in FAST:
        argv += ["--set", o]
    assert cli(argv) == 0
    return out


@pytest.fixture(scope="module")
def model():
    return build_model(get_config("tiny", FAST))


@pytest.fixture(scope="module")
def genai_artifacts(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("genai") / "tiny", "genai")


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_manifest_contract_and_fused_ops(genai_artifacts: Path) -> None:
    m = load_manifest(genai_artifacts)  # verifies every sha256, incl. the renamed external data
    dec = m.components["decoder"]
    assert dec.file.path == "decoder.onnx" and [e.path for e in dec.external_data] in ([], ["decoder.onnx.data"])
    assert dec.extra["past_present_share_buffer"] is True and dec.extra["needs_position_ids"] is False
    assert dec.extra["builder"].startswith("onnxruntime-genai ")
    assert "position_ids" not in [t.name for t in dec.inputs]
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= _ops(genai_artifacts / "decoder.onnx")
    assert dec.precision == "fp32"


def test_validate_passes_against_torch(genai_artifacts: Path, model) -> None:
    report = validate_artifacts(ValidateOptions(genai_artifacts, questions=3, max_new_tokens=8), model=model)
    assert report.ok, report.format_table()
    assert all(q.torch_tokens == q.onnx_tokens for q in report.questions)


def test_runtime_shared_buffer_loop_matches_torch(genai_artifacts: Path, model) -> None:
    from maven_edge.core.preprocess import preprocess_images
    from maven_edge.model_src.data.splits import iter_samples
    from maven_edge.runtime.pipeline import MavenPipeline

    pipe = MavenPipeline.from_artifacts(genai_artifacts)
    assert pipe.backend.shared_kv
    assert "shared" in pipe.backend.describe()["kv_cache"]
    for s in iter_samples("test", 6):
        res = pipe.generate(s.images, s.prompt, max_new_tokens=10)
        px = torch.from_numpy(preprocess_images(s.images, model.config.preprocess))
        want, _ = model.generate(px, s.prompt, GenerationConfig(max_new_tokens=10))
        assert res.token_ids == [int(t) for t in want], s.prompt


def test_decode_steps_match_the_concat_path(genai_artifacts: Path) -> None:
    """Shared buffer vs the same graph driven with a growing (Concat-style) past: same logits."""
    from maven_edge.runtime.backends.ort_backend import OrtBackend

    be = OrtBackend(genai_artifacts)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 7, be.config.llm.hidden_size)).astype(np.float32)
    shared, state = be.prefill(x, capacity=12)
    be.shared_kv = False
    plain, state2 = be.prefill(x, capacity=12)
    np.testing.assert_allclose(shared, plain, atol=1e-5)
    for tok in (5, 9, 11):
        be.shared_kv = True
        a = be.decode(state, tok)
        be.shared_kv = False
        b = be.decode(state2, tok)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_int4_builder_decoder_runs(tmp_path: Path) -> None:
    out = _export(tmp_path / "int4", "genai-int4")
    m = load_manifest(out)
    assert m.components["decoder"].precision == "int4"
    assert "MatMulNBits" in _ops(out / "decoder.onnx")
    from maven_edge.model_src.data.splits import iter_samples
    from maven_edge.runtime.pipeline import MavenPipeline

    s = next(iter(iter_samples("test", 1)))
    res = MavenPipeline.from_artifacts(out).generate(s.images, s.prompt, max_new_tokens=4)
    assert 1 <= len(res.token_ids) <= 4


def test_rename_onnx_rewrites_external_data(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    src = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(src), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    assert rename_onnx(src, tmp_path / "decoder.onnx") == ["decoder.onnx.data"]
    assert not (tmp_path / "model.onnx.data").exists()
    loaded = onnx.load(str(tmp_path / "decoder.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(w))


def test_unknown_builder_kind_is_refused(tmp_path: Path) -> None:
    from maven_edge.export.genai_decoder import run_builder

    with pytest.raises(ExportError, match="unknown decoder builder"):
        run_builder(tmp_path, tmp_path / "out", "genai-fp8")


def test_missing_builder_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    from maven_edge.export import genai_decoder

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))
    assert "onnxruntime-genai is not installed" in str(genai_decoder.builder_unavailable())
    with pytest.raises(ExportError, match="--decoder torch"):
        genai_decoder.run_builder(tmp_path, tmp_path / "out", "genai")
