"""`maven-edge ablations` report rendering (the analyses themselves are long CLI runs)."""

from __future__ import annotations

from maven_edge.model_src.train.ablations import render_markdown


def _row(families: dict[str, float], tokens: int) -> dict:
    return {"accuracy": sum(families.values()) / len(families), "family_accuracy": families,
            "family_counts": {k: 100 for k in families}, "visual_tokens_per_image": tokens}


def test_short_table4_renders_as_a_labelled_appendix_with_verdict_and_role_layers():
    rows = {"discrete": _row({"single": 0.3, "multi": 0.2}, 32),
            "continuous": _row({"single": 0.5, "multi": 0.3}, 64),
            "hybrid": _row({"single": 0.5, "multi": 0.4}, 48)}
    md = render_markdown({"table4": {"steps": 210, "steps_scale": 0.15, "role_layers": [2, 3], "rows": rows}})
    assert "role heads in decoder layer(s) 2, 3." in md
    assert "hybrid (40.0 %) beats both single-granularity variants" in md
    assert "## Appendix: the short-budget Table 4 (superseded)" in md


def test_table4_without_multi_image_questions_renders_without_a_verdict():
    """`--limit` can leave a variant with no multi-image question: the table says nan, no verdict."""
    rows = {m: _row({"single": 0.5, "caption": 0.0}, t) for m, t in (("discrete", 32), ("continuous", 64),
                                                                     ("hybrid", 48))}
    md = render_markdown({"table4": {"steps": 3, "steps_scale": 0.002, "rows": rows}})
    assert "| hybrid | 48 | 50.0 | nan | 0.0 | 25.0 |" in md
    assert "On multi-image questions" not in md and "role heads" not in md


def test_sections_merge_into_the_report_as_it_is_when_written(tmp_path, monkeypatch):
    """A section is written into ablations.json as the file is at the end of the run, so a long
    run (table4) does not overwrite sections another run wrote meanwhile."""
    import json

    from maven_edge.model_src.train import ablations as A

    table4 = {"run": str(tmp_path), "steps_scale": 1.0, "streams": 2, "rows": {}}
    old_t4 = {**table4, "streams": 1}
    other = {"images": 280, "codebook_usage": 1.0, "code_perplexity": 200.0, "codes": []}
    report = tmp_path / "ablations.json"
    report.write_text(json.dumps({"table4": old_t4}))

    def slow_table4(*args, **kwargs):  # meanwhile another run writes its section
        report.write_text(json.dumps({"table4": old_t4, "codes": other}))
        return table4

    monkeypatch.setattr(A.T4, "table4_full", slow_table4)
    A.run_ablations(None, str(tmp_path), str(tmp_path), ["table4"], None, None, True)
    merged = json.loads(report.read_text())
    assert merged == {"table4": A.T4.compact(table4), "codes": other}
    assert "**0 of 8 runs done**" in (tmp_path / "ablations.md").read_text()
    assert (tmp_path / "ablations.md").read_text() == A.render_markdown(merged)


def _cell(mode, images, tokens, prompt, **stages):
    stats = {f"{k}_ms": {"median": v} for k, v in stages.items()}
    return {"mode": mode, "images": images, "status": "measured", "prompt_tokens": prompt,
            "visual_tokens_per_image": tokens, "stats": stats}


def test_ttft_per_variant_from_a_bench_run(tmp_path):
    """The measured modes' TTFT is read as is; the fixed-subset variant is composed from continuous's
    visual stages and hybrid's prefill (same prompt length) and marked so."""
    import json

    import pytest

    from maven_edge.core.errors import TrainingError
    from maven_edge.model_src.train import ablations as A

    st = {"preprocess": 1.0, "vision": 100.0, "selector": 10.0, "assemble": 1.0}
    cells = [_cell("hybrid", 4, 81, 351, ttft=900.0, prefill=500.0, **st),
             _cell("discrete", 4, 32, 155, ttft=400.0, prefill=200.0, **st),
             _cell("continuous", 4, 196, 811, ttft=1400.0, prefill=1200.0, **st)]
    bench = tmp_path / "bench"
    bench.mkdir()
    res = {"options": {"preset": "edge-small", "threads": 2}, "machine": {"cpu": "AMD EPYC"},
           "pipeline": {"ort": {"cells": cells}}}
    (bench / "results.json").write_text(json.dumps(res))
    out = A.run_ablations(None, None, str(tmp_path / "docs"), ["ttft"], None, None, True, bench=str(bench))
    rows = out["ttft"]["rows"]
    assert rows["hybrid"]["4"]["ttft_ms"] == 900.0 and rows["discrete"]["4"]["visual_tokens_per_image"] == 32
    grid = rows["continuous-grid"]["4"]
    assert grid == {"ttft_ms": 112.0 + 500.0, "prompt_tokens": 351, "visual_tokens_per_image": 81, "composed": True}
    md = (tmp_path / "docs" / "ablations.md").read_text()
    assert "| continuous-grid | 612 (81) ᶜ |" in md and "| hybrid | 900 (81) |" in md
    res["pipeline"]["ort"]["cells"] = cells[:1]
    (bench / "results.json").write_text(json.dumps(res))
    with pytest.raises(TrainingError, match="no measured ort pipeline cells for mode"):
        A.run_ablations(None, None, str(tmp_path / "docs"), ["ttft"], None, None, True, bench=str(bench))
    with pytest.raises(TrainingError, match="pass --bench DIR"):
        A.run_ablations(None, None, str(tmp_path / "docs"), ["ttft"], None, None, True)


def test_the_cli_offers_every_analysis():
    from maven_edge.model_src.train import ablations as A
    from maven_edge.model_src.train.commands import ABLATIONS

    assert ABLATIONS == A.ANALYSES


def test_source_probes_change_only_what_they_name():
    import torch

    from maven_edge.model_src.train.common import VisualFeatures
    from maven_edge.model_src.train.diagnose import grid_selection, roll_codes, roll_patches

    feats = torch.arange(3 * 16 * 2, dtype=torch.float32).view(3, 16, 2)
    codes = torch.tensor([[1, 2], [3, 4], [5, 6]])
    indices = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4], [7, 8, 10, 11]])
    vf = VisualFeatures(feats, codes, None, None, indices)
    c = roll_codes(vf)
    assert c.codes.tolist() == [[5, 6], [1, 2], [3, 4]] and c.feats is feats and c.indices is indices
    p = roll_patches(vf)
    assert p.codes is codes and p.indices[0].tolist() == [7, 8, 10, 11] and torch.equal(p.feats[0], feats[2])
    g = grid_selection(vf)
    assert g.codes is codes and g.feats is feats
    assert g.indices.tolist() == [[0, 5, 10, 15]] * 3  # as many patches, evenly spread, the same for every image


def test_sources_on_the_shipped_model_keeps_its_own_answers(tmp_path, monkeypatch):
    """`--only sources`: the unchanged probe reproduces the shipped model's stored test answers; each
    probe's row and its paired difference from own are in the report, and the code-content probe's
    rows (the ViT features carry which pairs an image holds even after a few steps)."""
    import json

    from maven_edge.model_src.checkpoint import SHIPPED_TINY
    from maven_edge.model_src.train import ablations as A
    from maven_edge.model_src.train.evaluate import TEST_PREDICTIONS

    monkeypatch.setattr(A, "CONTENT_STEPS", 40)
    monkeypatch.setattr(A, "CONTENT_HELD_OUT", 96)
    out = A.run_ablations(None, None, str(tmp_path), ["sources"], None, 24, True)
    src = out["sources"]
    stored = [json.loads(x) for x in (SHIPPED_TINY / TEST_PREDICTIONS).read_text().splitlines()[:24]]
    assert src["probes"]["own"]["correct"] == "".join("1" if r["correct"] else "0" for r in stored)
    assert set(src["probes"]) == set(A.SOURCE_PROBES) and src["num_questions"] == 24
    md = (tmp_path / "ablations.md").read_text()
    assert "## Where a hybrid model's answers come from" in md
    own = 100 * src["probes"]["own"]["accuracy"]
    assert f"| own | {A.SOURCE_PROBES['own']} |" in md and f"{own:.1f} |" in md
    for name in ("other_codes", "other_patches", "grid_patches"):
        diff = 100 * (src["probes"][name]["accuracy"] - src["probes"]["own"]["accuracy"])
        assert f"{name} {diff:+.1f} points overall" in md
    content = src["code_content"]
    assert content["steps"] == 40 and set(content["inputs"]) == {"vit", "z", "codes"}
    assert content["inputs"]["vit"]["pair_bce"] < content["pair_bce_base_rate"]
    assert f"| {content['inputs']['codes']['pair_bce']:.3f} |" in md
