"""Region-pooled discrete tokenizer, stage 0-vq's region targets and the `tokenizer` ablation."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from maven_edge.core.config import get_config, region_grid  # noqa: E402
from maven_edge.core.errors import ConfigError, TrainingError  # noqa: E402
from maven_edge.model_src.checkpoint import build_model  # noqa: E402

NARROW = ["vision.hidden_size=32", "vision.num_heads=2", "vision.num_layers=1", "vision.intermediate_size=32",
          "discrete.hidden_size=32", "discrete.num_heads=2", "discrete.num_layers=1",
          "discrete.intermediate_size=32", "discrete.codebook_size=64", "discrete.code_dim=16",
          "llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.num_kv_heads=1",
          "llm.intermediate_size=32", "selector.hidden_size=32"]


def test_region_grid_and_pooling_cover_every_patch_once():
    from maven_edge.model_src.modeling.discrete import region_pooling

    assert region_grid(32) == (4, 8) and region_grid(7) == (1, 7) and region_grid(64) == (8, 8)
    for grid, codes in ((8, 32), (14, 32), (16, 32), (8, 8)):
        pool = region_pooling(grid, codes)
        assert pool.shape == (codes, grid * grid)
        member = pool > 0
        assert (member.sum(0) == 1).all()  # each patch in exactly one region
        assert torch.allclose(pool.sum(1), torch.ones(codes))  # each row a mean
    # tiny geometry: region k = rows 2r, 2r+1 of column c (raster order of regions)
    owner = (region_pooling(8, 32) > 0).float().argmax(0).reshape(8, 8)
    assert owner[0, 3] == owner[1, 3] == 3 and owner[2, 0] == 8 and owner[7, 7] == 31


def test_pooling_is_validated_with_a_clear_error():
    assert get_config("tiny", ["discrete.pooling=regions"]).discrete.pooling == "regions"
    assert get_config("tiny").discrete.pooling == "queries"
    with pytest.raises(ConfigError, match="discrete.pooling must be one of"):
        get_config("tiny", ["discrete.pooling=slots"])
    with pytest.raises(ConfigError, match="10x10 regions for 100 codes"):
        get_config("tiny", ["discrete.pooling=regions", "discrete.num_codes=100"])


def test_a_regions_tokenizer_starts_each_query_from_its_region_and_exports_to_onnx(tmp_path):
    """Code k changes when only region k's patches change (one layer of cross-attention mixes in the
    rest, so others may move too, but k's own query start does); the regions matrix is derived from
    the config, not saved with the weights; the ONNX tokenizer gives the same codes as torch."""
    import onnx_ir as ir
    import onnxruntime as ort

    from maven_edge.export.onnx_export import _export_one, component_specs

    model = build_model(get_config("tiny", [*NARROW, "discrete.pooling=regions"]), seed=0).eval()
    tok = model.discrete
    assert tok.regions is not None and not any("regions" in k for k in model.state_dict())
    feats = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = tok.encode(feats)
        start = tok.regions @ tok.input_norm(tok.input_proj(feats))
    assert z.shape == (3, 32, 16)
    assert torch.allclose(start[:, 0], tok.input_norm(tok.input_proj(feats))[:, [0, 8]].mean(1), atol=1e-6)
    spec = next(s for s in component_specs(model) if s.name == "discrete_tokenizer")
    path = tmp_path / "discrete_tokenizer.onnx"
    ir.save(_export_one(spec, 18), str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (codes,) = sess.run(None, {"patch_features": feats.numpy()})
    with torch.no_grad():
        assert (codes == tok(feats).numpy()).all()


def test_region_targets_train_in_stage_0_vq_and_need_a_regions_tokenizer(tmp_path):
    from maven_edge.model_src.train.loop import read_jsonl, run_phase
    from maven_edge.model_src.train.recipe import get_recipe
    from maven_edge.model_src.train.stages import phase_vq

    cfg = get_recipe("tiny", 0.004, max_batch=4)["0-vq"]
    import dataclasses

    cfg = dataclasses.replace(cfg, region_targets=1.0)
    queries = build_model(get_config("tiny", NARROW), seed=0)
    with pytest.raises(TrainingError, match="needs a tokenizer with discrete.pooling 'regions'"):
        phase_vq(queries, cfg, 0)
    with pytest.raises(TrainingError, match="region_targets must be >= 0"):
        dataclasses.replace(cfg, region_targets=-1.0)
    model = build_model(get_config("tiny", [*NARROW, "discrete.pooling=regions"]), seed=0)
    before = model.discrete.queries.detach().clone()
    run_phase(phase_vq(model, cfg, 0), tmp_path / "0-vq", resume=False, quiet=True)
    log = read_jsonl(tmp_path / "0-vq" / "log.jsonl")
    assert {"region_loss", "region_acc_color", "region_acc_shape"} <= set(log[-1])
    assert not any(k.endswith(("_row", "_col")) for k in log[-1])
    assert log[-1]["region_loss"] > 0 and not torch.equal(before, model.discrete.queries)


def test_tokenizer_ablation_retrains_every_variant_and_renders(tmp_path, monkeypatch):
    """A smoke run (2 steps of 0-vq, 3 probe steps) on the shipped model: every variant is trained
    from scratch on the frozen ViT (the shipped weights stay as they were) and its row is rendered."""
    from maven_edge.model_src.train import ablations as A
    from maven_edge.model_src.train.code_objectives import TOKENIZER_VARIANTS

    monkeypatch.setattr(A, "CONTENT_STEPS", 3)
    monkeypatch.setattr(A, "CONTENT_HELD_OUT", 16)
    out = A.run_ablations(None, None, str(tmp_path), ["tokenizer"], 0.001, None, True)["tokenizer"]
    assert list(out["rows"]) == ["checkpoint", *TOKENIZER_VARIANTS]
    assert all(out["rows"][k]["steps"] == 2 for k in TOKENIZER_VARIANTS)
    assert all("region_loss" in out["rows"][k]["last_log"] for k in TOKENIZER_VARIANTS if "targets" in k)
    assert "region_loss" not in out["rows"]["regions"]["last_log"]
    assert out["probe"]["pool"] == "max" and out["probe"]["steps"] == 3
    md = (tmp_path / "ablations.md").read_text()
    assert "## Which tokenizer objective makes codes describe the image" in md
    for name in out["rows"]:
        assert f"| {name} |" in md



def test_retraining_a_tokenizer_leaves_the_source_model_alone():
    from maven_edge.model_src.train.code_objectives import TOKENIZER_VARIANTS, retrain_tokenizer

    model = build_model(get_config("tiny", NARROW), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, summary = retrain_tokenizer(model, TOKENIZER_VARIANTS["regions+targets(1)"], 0.001)
    assert summary["steps"] == 2 and trained.config.discrete.pooling == "regions"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.discrete.pooling == "queries"
    vision = model.vision.state_dict()
    assert all(torch.equal(vision[k], v) for k, v in trained.vision.state_dict().items())


def test_a_regions_model_trains_its_tokenizer_with_region_targets():
    from maven_edge.model_src.train.recipe import REGION_TARGETS, for_model, get_recipe

    recipe = get_recipe("tiny")
    assert recipe["0-vq"].region_targets == 0 and for_model(recipe, "queries") is recipe
    regions = for_model(recipe, "regions")
    assert regions["0-vq"].region_targets == REGION_TARGETS > 0
    assert {k: v for k, v in regions.items() if k != "0-vq"} == {k: v for k, v in recipe.items() if k != "0-vq"}
