"""Training recipe: a smoke run of every stage on a narrow model, resume, determinism, errors."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from maven_edge.core.errors import TrainingError  # noqa: E402
from maven_edge.model_src.train.recipe import PhaseConfig, get_recipe, parse_stages  # noqa: E402

# tiny geometry (64 px, 8 px patches, 32 codes) with narrow one-layer networks (four decoder heads: two
# role heads and room for the optional count head)
SMALL = [
    "vision.hidden_size=32", "vision.num_heads=2", "vision.num_layers=1", "vision.intermediate_size=32",
    "discrete.hidden_size=32", "discrete.num_heads=2", "discrete.num_layers=1",
    "discrete.intermediate_size=32", "discrete.codebook_size=64", "discrete.code_dim=16",
    "llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=4", "llm.num_kv_heads=2",
    "llm.intermediate_size=32", "selector.hidden_size=32",
]
SCALE = 0.001  # every phase runs 2 steps


def _train(out, stage="all", **kw):
    from maven_edge.model_src.train.stages import train

    args = dict(preset="tiny", stage=stage, out=out, steps_scale=SCALE, seed=0, overrides=SMALL, quiet=True,
                final_eval=False, max_batch=2)
    args.update(kw)
    return train(**args)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, _train(out)


def test_every_stage_runs_and_writes_outputs(smoke_run):
    out, results = smoke_run
    assert set(results) == {"0", "1", "2", "3", "4", "final"}
    for st in "01234":
        d = out / f"stage{st}"
        for name in ("model.safetensors", "config.json", "tokenizer.json", "stage.json", "training_log.jsonl",
                     "loss.png"):
            assert (d / name).is_file(), (st, name)
        summary = json.loads((d / "stage.json").read_text())
        assert all(ph["final_loss"] is not None for ph in summary["phases"])
    vq = next(ph for ph in results["0"]["phases"] if ph["phase"] == "0-vq")
    assert 0 < vq["val_codebook_usage"] <= 1 and vq["val_code_perplexity"] >= 1
    sel = results["1"]["phases"][0]
    assert 0 <= sel["selector_precision"] <= 1 and 0 <= sel["selector_recall"] <= 1
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_log.jsonl"):
        assert (out / "final" / name).is_file()
    from maven_edge.model_src.checkpoint import load_checkpoint

    model = load_checkpoint(out / "final")
    assert model.config.llm.hidden_size == 32
    assert not model.config.image_slots  # the recipe's default


def _stage4_with(tmp_path, smoke_run, monkeypatch, max_batch=2, **changes):
    """Stage 4 again from the smoke run's stages 0-3 with the 4-instruct config changed."""
    import dataclasses
    import shutil

    from maven_edge.model_src.train import stages

    out, _ = smoke_run
    for st in "0123":
        shutil.copytree(out / f"stage{st}", tmp_path / f"stage{st}")
    real = stages.get_recipe

    def changed(*args, **kw):
        recipe = real(*args, **kw)
        recipe["4-instruct"] = dataclasses.replace(recipe["4-instruct"], **changes)
        return recipe

    monkeypatch.setattr(stages, "get_recipe", changed)
    _train(tmp_path, stage="4", max_batch=max_batch)


def test_image_slots_phase_turns_them_on_and_trains_them(tmp_path, smoke_run, monkeypatch):
    from maven_edge.model_src.checkpoint import load_checkpoint

    _stage4_with(tmp_path, smoke_run, monkeypatch, image_slots=True)
    model = load_checkpoint(tmp_path / "final")
    assert model.config.image_slots and not load_checkpoint(tmp_path / "stage3").config.image_slots
    assert model.image_slot_embeds(model.config.max_images).abs().sum() > 0  # trained from zero


@pytest.mark.parametrize("mode", ["hybrid", "continuous", "discrete"])
def test_attention_targets_phase_logs_its_loss(tmp_path, smoke_run, monkeypatch, mode):
    """Stage 4 with attention targets in every visual mode (the Table-4 ablation trains all three)."""
    _stage4_with(tmp_path, smoke_run, monkeypatch, max_batch=6, attention_targets=0.5, mode=mode)
    recs = [json.loads(x) for x in (tmp_path / "stage4" / "training_log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("phase") == "4-instruct" and "loss" in r]
    assert steps and all(r["attention_loss"] > 0 for r in steps)


def test_log_lines_are_json_with_loss(smoke_run):
    out, _ = smoke_run
    lines = (out / "final" / "training_log.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert {r["phase"] for r in recs} >= {"0-vision", "0-vq", "0-text", "1-selector", "2-discrete",
                                          "3-projector", "4-instruct", "4-count"}
    assert all("loss" in r and "step" in r for r in recs)


def test_stage_needs_previous_stage(tmp_path):
    with pytest.raises(TrainingError, match="stage 2 needs stage 1"):
        _train(tmp_path, stage="2")


def test_unknown_stage_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="unknown stage '7'"):
        parse_stages("7")
    with pytest.raises(TrainingError, match="steps-scale"):
        get_recipe("tiny", steps_scale=0)


def test_cli_reports_unknown_stage(tmp_path, capsys):
    from maven_edge.cli import main

    assert main(["train", "--stage", "5", "--out", str(tmp_path)]) == 2
    assert "unknown stage '5'" in capsys.readouterr().err


def _losses(d, phase):
    return [r["loss"] for r in map(json.loads, (d / phase / "log.jsonl").read_text().splitlines())]


def test_same_seed_same_losses_and_resume_matches(tmp_path, smoke_run):
    out, _ = smoke_run
    # determinism: a fresh run of stage 0 with the same seed logs the same losses
    _train(tmp_path / "a", stage="0", steps_scale=0.006)  # 0-vision runs 5 steps
    _train(tmp_path / "b", stage="0", steps_scale=0.006)
    la, lb = _losses(tmp_path / "a" / "stage0", "0-vision"), _losses(tmp_path / "b" / "stage0", "0-vision")
    assert la == lb and len(la) >= 2
    # resume: interrupt after the first checkpoint, resume, compare with the uninterrupted run
    c = tmp_path / "c"
    from maven_edge.model_src.train import loop

    calls = {"n": 0}
    real = loop.save_resume

    def stop_after_first(*args, **kw):
        real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    loop.save_resume = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(c, stage="0", steps_scale=0.006)
    finally:
        loop.save_resume = real
    _train(c, stage="0", steps_scale=0.006, resume=True)
    assert _losses(c / "stage0", "0-vision") == la
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "stage0" / "model.safetensors"))
    wc = load_file(str(c / "stage0" / "model.safetensors"))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_stage4_resumed_after_its_first_phase_trains_only_4_count_and_matches(tmp_path, smoke_run):
    """How run R36S was made: a stage 4 whose 4-instruct finished, resumed from the same stage-3 weights,
    trains only 4-count and ends with the uninterrupted run's weights."""
    import shutil

    from safetensors.torch import load_file

    out, _ = smoke_run
    assert [ph["phase"] for ph in json.loads((out / "stage4" / "stage.json").read_text())["phases"]] == [
        "4-instruct", "4-count"]
    run = tmp_path / "r"
    shutil.copytree(out / "stage4" / "4-instruct", run / "stage4" / "4-instruct")
    first = (run / "stage4" / "4-instruct" / "log.jsonl").read_text()
    _train(run, stage="4", init=out / "stage3", resume=True)
    assert (run / "stage4" / "4-instruct" / "log.jsonl").read_text() == first  # not trained again
    assert (run / "stage4" / "4-count" / "phase.json").is_file()
    want, got = load_file(str(out / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_resume_with_another_seed_is_refused(tmp_path, smoke_run, monkeypatch):
    """Batches are a pure function of (seed, phase, step): --resume with another --seed than the run's would
    mix two sample streams in one phase (or take a finished phase of one seed for another), so it is refused,
    for a finished phase and for one stopped half-way; the same seed resumes."""
    from maven_edge.model_src.train import loop

    out, _ = smoke_run
    _copy_stages(out, tmp_path, stages="0")
    _train(tmp_path, stage="1", seed=0)
    offset = get_recipe("tiny")["1-selector"].seed_offset
    assert json.loads((tmp_path / "stage1" / "1-selector" / "phase.json").read_text())["seed"] == offset
    with pytest.raises(TrainingError, match="phase seed 0, this run asks for 1"):
        _train(tmp_path, stage="1", seed=1, resume=True)
    _train(tmp_path, stage="1", seed=0, resume=True)  # the run's own seed: the finished phase is skipped

    real = loop.save_resume

    def stop_after_first(*args, **kw):
        real(*args, **kw)
        raise KeyboardInterrupt

    half = tmp_path / "half"
    _copy_stages(out, half, stages="0")
    monkeypatch.setattr(loop, "save_resume", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        _train(half, stage="1", seed=0)
    monkeypatch.setattr(loop, "save_resume", real)
    assert json.loads((half / "stage1" / "1-selector" / "resume" / "progress.json").read_text())["seed"] == offset
    with pytest.raises(TrainingError, match="phase seed"):
        _train(half, stage="1", seed=1, resume=True)
    _train(half, stage="1", seed=0, resume=True)
    assert (half / "stage1" / "1-selector" / "phase.json").is_file()


def test_encode_visual_matches_encode_images():
    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.train.common import encode_visual

    model = build_model(get_config("tiny", SMALL), seed=1)
    px = torch.randn(3, 3, 64, 64)
    for mode in ("hybrid", "discrete", "continuous"):
        ref = model.encode_images(px, mode)
        got = encode_visual(model, px, mode)
        assert torch.allclose(ref.embeds, got.embeds, atol=1e-6)


def test_dense_and_scene_targets_match_the_scene():
    """0-vision targets carry each patch's row/column; 0-vq targets the pairs present and the count."""
    import numpy as np

    from maven_edge.core.config import get_config
    from maven_edge.model_src.train import batches as B

    cfg = get_config("tiny")
    sample = B.samples_for("train", [0], cfg)[0]
    tgt = B.vision_targets(sample, cfg.vision.patch_size)
    grid = cfg.vision.grid_size
    assert tgt.shape == (1, grid * grid, len(B.dense_targets(grid)))
    assert (tgt[0, :, 4] == np.arange(grid * grid) // grid).all() and (tgt[0, :, 5] == np.arange(grid * grid) % grid).all()
    pairs, counts = B.scene_targets(sample)
    objs = sample.scenes[0].objects
    assert counts.tolist() == [len(objs)]
    assert pairs.shape == (1, len(B.PAIR_IDS)) and pairs.sum() == len({(o.color, o.shape) for o in objs})
    assert all(pairs[0, B.PAIR_IDS[(o.color, o.shape)]] == 1 for o in objs)


def test_multi_turn_batch_labels_exactly_the_answers():
    """Stage 4's follow-up turns: every answer (and its <eos>) is a target, no question token is."""
    import numpy as np

    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.data.followups import followup_questions
    from maven_edge.model_src.data.tasks import question_line
    from maven_edge.model_src.train import batches as B

    model = build_model(get_config("tiny", SMALL), seed=0)
    tok = model.tokenizer
    samples = B.samples_for("train", [3, 5], model.config)  # a single-image and a multi-image sample
    rng = np.random.default_rng(0)
    extra = [followup_questions(s.scenes, rng, 3, skip=[question_line(s)]) for s in samples]
    plain, multi = B.text_batch(samples, tok), B.text_batch(samples, tok, extra)
    for s, qas, p, seq, tgt in zip(samples, extra, plain.sequences, multi.sequences, multi.targets, strict=True):
        assert len(qas) == 3
        assert seq[: len(p)] == p  # the first turn is the sample itself
        answers = [s.answer] + [a for _, a in qas]
        assert tok.decode([t for t, g in zip(seq, tgt, strict=True) if g], skip_special=False) == "".join(
            f" {a}<eos>" for a in answers
        )
        text = tok.decode(seq, skip_special=False)
        assert all(f"\n{q}\nAnswer: {a}<eos>" in text for q, a in qas)
    with torch.no_grad():
        vis = model.encode_images(B.pixel_tensor(samples, model.config)).embeds
    asm = model.assemble_batch(multi.sequences, [vis[:1], vis[1:]], multi.targets)
    for b, tgt in enumerate(multi.targets):
        assert int((asm.labels[b] != -100).sum()) == sum(tgt)


def test_gray_share_drops_colour_targets_and_probe_reports_both_groups(tmp_path):
    """0-vision with grey-scale images: no colour target for them, nothing changes at share 0;
    the held-out probe reports seen and held-out object patches."""
    import numpy as np

    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.train import batches as B
    from maven_edge.model_src.train.probes import heldout_probe
    from maven_edge.model_src.train.stages import dense_target_loss

    assert not B.gray_images(np.random.default_rng(0), 8, 0.0).any()
    assert B.gray_images(np.random.default_rng(0), 400, 0.5).mean() == pytest.approx(0.5, abs=0.1)
    sample = B.samples_for("train", [1], get_config("tiny"))[0]
    gray = np.asarray(B.in_gray(sample).images[0])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.asarray(sample.images[0]).std(-1).max() > 0  # the original is untouched
    # gray_levels="random": each object gets its own seeded grey level on its mask, the rest is luma
    rand = np.asarray(B.in_gray(sample, np.random.default_rng(3)).images[0])[..., 0]
    again = np.asarray(B.in_gray(sample, np.random.default_rng(3)).images[0])[..., 0]
    assert (rand == again).all()
    objects = sample.scenes[0].objects
    for obj in objects:
        level = rand[obj.mask]
        assert (level == level[0]).all() and B.RANDOM_GRAY_RANGE[0] <= level[0] <= B.RANDOM_GRAY_RANGE[1]
    rest = ~np.any([o.mask for o in objects], axis=0)
    assert (rand[rest] == gray[..., 0][rest]).all()
    levels = [int(np.asarray(B.in_gray(sample, np.random.default_rng(k)).images[0])[objects[0].mask][0, 0])
              for k in range(8)]
    assert len(set(levels)) > 1  # the level does not follow the object's colour
    with pytest.raises(TrainingError, match="gray_levels"):
        PhaseConfig(steps=2, batch_size=2, lr=1e-3, gray_levels="hue")

    grid, spec = 8, B.dense_targets(8)
    logits = torch.randn(2, grid * grid, sum(n for _, n in spec))
    tgt = torch.from_numpy(np.concatenate([B.vision_targets(sample, 8)] * 2))
    full, _ = dense_target_loss(logits, tgt, grid)
    no_colour = tgt.clone()
    no_colour[..., 0] = -1
    partial, _ = dense_target_loss(logits, no_colour, grid)
    assert torch.isfinite(partial) and partial < full

    model = build_model(get_config("tiny", SMALL), seed=0)
    head = torch.nn.Linear(model.config.vision.hidden_size, logits.shape[-1])
    report = heldout_probe(model, head, n=30)
    assert report["seen"]["patches"] > 0 and report["heldout"]["patches"] > 0
    assert all(0.0 <= report[g][k] <= 1.0 for g in ("seen", "heldout") for k in ("color", "shape"))


def test_seed_offset_shifts_only_its_phase(tmp_path):
    """`PhaseConfig.seed_offset` gives that phase the batches of the run's seed + offset; the
    other phases keep the run's seed."""
    import dataclasses

    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.train.stages import build_phases

    def first_loss(stage: str, phase: str, seed: int, offset: int) -> float:
        """Step 0's loss of `phase` with 1-selector's seed_offset set to `offset`."""
        recipe = get_recipe("tiny", SCALE, max_batch=2)
        recipe["1-selector"] = dataclasses.replace(recipe["1-selector"], seed_offset=offset)
        model = build_model(get_config("tiny", SMALL), seed=0)  # same weights every time
        return dict(build_phases(model, stage, recipe, seed))[phase]().step_fn(0)["loss"]

    base, shifted, reseeded = (first_loss("1", "1-selector", s, o) for s, o in ((0, 0), (0, 1), (1, 0)))
    assert shifted == reseeded != base
    base, shifted, reseeded = (first_loss("0", "0-text", s, o) for s, o in ((0, 0), (0, 1), (1, 0)))
    assert shifted == base != reseeded


def test_gray_consistency_learns_shape_from_grey_copies_only(monkeypatch):
    """0-vision with `gray_consistency`: colour images come first without a shape target, then a
    grey copy of every sample without a colour target; the KL term is logged when there are
    colour images and the phase still learns (loss finite, gradients on the ViT)."""
    import dataclasses

    import numpy as np

    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.train import stages

    with pytest.raises(TrainingError, match="gray_consistency"):
        PhaseConfig(steps=2, batch_size=2, lr=1e-3, gray_consistency=-1.0)
    seen: list[torch.Tensor] = []
    real = stages.dense_target_loss
    monkeypatch.setattr(stages, "dense_target_loss", lambda lg, tgt, grid: (seen.append(tgt), real(lg, tgt, grid))[1])
    base = dataclasses.replace(get_recipe("tiny", SCALE)["0-vision"], batch_size=6, gray_levels="random",
                               gray_consistency=1.0)
    for share, n_colour in ((0.0, 6), (1.0, 0)):
        model = build_model(get_config("tiny", SMALL), seed=0)
        phase = stages.phase_vision(model, dataclasses.replace(base, gray_share=share), seed=0)
        metrics = phase.step_fn(0)
        tgt = seen.pop()
        assert tgt.shape[0] == 6 + n_colour  # the colour images, then a grey copy of each sample
        colour, copies = tgt[:n_colour], tgt[n_colour:]
        assert (colour[..., 1] == -1).all() and (colour[..., 0] >= 0).all()
        assert (copies[..., 0] == -1).all() and (copies[..., 1] > 0).any()
        if n_colour:
            assert np.array_equal(colour[..., 2:].numpy(), copies[..., 2:].numpy())  # same scenes, same order
        assert ("shape_kl" in metrics) == bool(n_colour) and np.isfinite(metrics["loss"])
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())


def test_task_weights_reweight_the_primary_tasks_and_default_to_the_uniform_stream():
    import numpy as np

    from maven_edge.model_src.data.splits import DEFAULT_DATA
    from maven_edge.model_src.train import batches as B

    schedule = DEFAULT_DATA.schedule
    uniform = B.train_indices(np.random.default_rng([0, 4, 7]), 64)
    # no weights: the stream every earlier run used (block, then slot, both uniform)
    rng = np.random.default_rng([0, 4, 7])
    blocks = rng.integers(0, B.num_samples("train") // len(schedule), size=64)
    slots = rng.integers(0, len(schedule), size=64)
    assert uniform == [int(b) * len(schedule) + int(s) for b, s in zip(blocks, slots, strict=True)]
    weights = (("changed", 50.0), ("caption", 0.01))
    drawn = B.train_indices(np.random.default_rng([0, 4, 7]), 400, (), weights)
    assert drawn == B.train_indices(np.random.default_rng([0, 4, 7]), 400, (), weights)  # seeded
    tasks = [schedule[i % len(schedule)] for i in drawn]
    assert tasks.count("changed") > 300 and tasks.count("caption") < 5
    with pytest.raises(TrainingError, match="unknown task 'nope'"):
        PhaseConfig(steps=2, batch_size=2, lr=1e-3, task_weights=(("nope", 1.0),))
    with pytest.raises(TrainingError, match="must be > 0"):
        PhaseConfig(steps=2, batch_size=2, lr=1e-3, task_weights=(("changed", 0.0),))
    with pytest.raises(TrainingError, match="never draws"):  # not silently ignored
        PhaseConfig(steps=2, batch_size=2, lr=1e-3, families=("single",), task_weights=(("changed", 2.0),))
    in_family = PhaseConfig(steps=2, batch_size=2, lr=1e-3, families=("multi",), task_weights=(("changed", 2.0),))
    assert in_family.task_weights == (("changed", 2.0),)
    assert PhaseConfig(steps=2, batch_size=2, lr=1e-3, task_weights=[["changed", 2]]).task_weights == (("changed", 2.0),)


def test_a_phase_config_saved_before_a_knob_existed_still_matches():
    from dataclasses import asdict

    from maven_edge.model_src.train.loop import same_config

    cfg = PhaseConfig(steps=2, batch_size=2, lr=1e-3)
    saved = json.loads(json.dumps(asdict(cfg)))
    assert same_config(saved, cfg)
    del saved["task_weights"]  # a run directory written before PhaseConfig.task_weights
    assert same_config(saved, cfg)
    assert not same_config(saved, PhaseConfig(steps=2, batch_size=2, lr=1e-3, task_weights=(("same", 2.0),)))
    assert not same_config({**saved, "steps": 3}, cfg) and not same_config(None, cfg)


def test_init_starts_one_stage_from_a_checkpoint_only(tmp_path):
    """`--init` (a stage continued from a trained checkpoint, docs/training.md "Issue 36") takes one
    stage 1-4; a missing checkpoint is a TrainingError naming it."""
    from maven_edge.core.errors import TrainingError
    from maven_edge.model_src.train.stages import train

    for stage in ("all", "0"):
        with pytest.raises(TrainingError, match="--init starts one stage"):
            train(stage=stage, out=tmp_path / "run", init=tmp_path, quiet=True)
    with pytest.raises(TrainingError, match="--init"):
        train(stage="4", out=tmp_path / "run", init=tmp_path / "missing", quiet=True, final_eval=False)


# ---- Table 4 at the full budget (table4.py): the machinery on a 2-step budget ------------------------
def _copy_stages(src, dst, stages="0123"):
    import shutil

    for st in stages:
        shutil.copytree(src / f"stage{st}", dst / f"stage{st}")


def test_grid_patches_spread_evenly_and_validate():
    from maven_edge.model_src.train.common import grid_patches

    idx = grid_patches(64, 48).tolist()
    assert len(set(idx)) == 48 and idx == sorted(idx) and idx[0] == 0 and idx[-1] == 63
    assert grid_patches(64, 64).tolist() == list(range(64))
    with pytest.raises(ValueError):
        grid_patches(64, 65)
    with pytest.raises(TrainingError, match="patch_subset needs mode continuous"):
        PhaseConfig(steps=2, batch_size=2, lr=1e-3, mode="hybrid", patch_subset=8)


def test_table4_trains_every_variant_and_stream_resumes_and_reuses_the_runs_stage4(tmp_path, smoke_run, capsys):
    """Every (variant, stream) trains stage 4 with the recipe's config (scaled), evaluates in its own
    mode and is cached: a second call trains nothing. Hybrid stream 0 reuses the run's own stage 4
    when that was trained with the same config; the fixed-subset row sees hybrid's token count."""
    import shutil

    from maven_edge.model_src.train import table4 as T4
    from maven_edge.model_src.train.ablations import render_markdown

    out, _ = smoke_run
    _copy_stages(out, tmp_path)
    _train(tmp_path, stage="4", max_batch=None)  # the recipe's stage 4 at this scale: hybrid stream 0
    meta = json.loads((tmp_path / "stage4" / "stage.json").read_text())
    # the recipe's stage 4 goes on after 4-instruct (4-count): its final weights are not a 4-instruct row
    cfg = T4.variant_config("hybrid", 0, SCALE, 48)
    seed = int(meta["seed"]) + cfg.seed_offset
    assert list(meta["recipe"]) == ["4-instruct", "4-count"] and T4._reusable_stage4(tmp_path, cfg, seed) is None
    del meta["recipe"]["4-count"]  # a run of the recipe before 4-count existed: its stage 4 is the row
    del meta["recipe"]["4-instruct"]["patch_subset"]  # as written before the knob existed
    (tmp_path / "stage4" / "stage.json").write_text(json.dumps(meta))
    assert T4._reusable_stage4(tmp_path, cfg, seed) is not None
    seen = []
    table = T4.table4_full(tmp_path, steps_scale=SCALE, streams=2, limit=12, quiet=True,
                           on_row=lambda t: seen.append(len(t["rows"])))
    assert seen == list(range(1, 9))
    rows = table["rows"]
    assert set(rows) == {f"{v}/s{k}" for v in T4.VARIANTS for k in (0, 1)}
    assert rows["hybrid/s0"]["reused_stage4"] == str(tmp_path / "stage4")
    assert rows["hybrid/s1"]["reused_stage4"] is None and rows["hybrid/s1"]["seed"] == rows["hybrid/s0"]["seed"] + 100
    hybrid_tokens = rows["hybrid/s0"]["visual_tokens_per_image"]
    assert rows["continuous-grid/s0"]["visual_tokens_per_image"] == hybrid_tokens == 32 + 16
    assert rows["continuous/s0"]["visual_tokens_per_image"] == 64 and rows["discrete/s0"]["visual_tokens_per_image"] == 32
    for key, r in rows.items():
        assert r["num_questions"] == 12 and len(r["correct"]) == 12, key
        if not r["reused_stage4"]:
            assert (tmp_path / "table4-x0.001" / key.replace("/", "-") / "final" / "model.safetensors").is_file()
    # finished rows are not trained again (no 4-instruct directory appears for the reused row either)
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "table4-x0.001").glob("*/result.json")}
    again = T4.table4_full(tmp_path, steps_scale=SCALE, streams=2, limit=12, quiet=True, variants=("discrete",))
    assert set(again["rows"]) == set(rows) and {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert not (tmp_path / "table4-x0.001" / "hybrid-s0" / "4-instruct").exists()
    assert {r["stage3_sha256"] for r in rows.values()} == {T4.stage3_fingerprint(tmp_path)}
    # a fresh clone has the report but not the row directories: the report's rows count as finished
    report = json.loads(json.dumps(T4.compact(table)))
    shutil.rmtree(tmp_path / "table4-x0.001")
    assert T4.restore_reported_rows(tmp_path, SCALE, report) == list(rows)
    assert T4.restore_reported_rows(tmp_path, SCALE, report) == []  # only rows whose directory is gone
    restored = T4.table4_full(tmp_path, steps_scale=SCALE, streams=2, limit=12, quiet=True, reported=report)
    assert not list((tmp_path / "table4-x0.001").glob("*/4-instruct"))
    assert {k: (T4._correct(r), r["families"], r["images"]) for k, r in restored["rows"].items()} == \
        {k: (T4._correct(r), r["families"], r["images"]) for k, r in rows.items()}
    # a row from other stage-3 weights (retrained on another CPU) is kept, and the report says so
    shutil.rmtree(tmp_path / "table4-x0.001")
    report["rows"]["discrete/s1"]["stage3_sha256"] = "0" * 64
    mixed = T4.table4_full(tmp_path, steps_scale=SCALE, streams=2, limit=12, quiet=True, reported=report)
    assert "other stage-3 weights" in capsys.readouterr().out
    assert "(**differ**: not one starting point)" in render_markdown({"table4": T4.compact(mixed)})
    md = render_markdown({"table4": T4.compact(table)})
    assert "**8 of 8 runs done**" in md and "| continuous-grid | 2 | 48 |" in md
    assert "8 of the 8 rows record the sha256" in md and "(all the same)." in md
    assert "stream 0 is the run's own stage 4" in md and "--variant continuous-grid`" in md
    assert "| hybrid against | hybrid only | other only | per task |" in md and "Time: stage 4 took" in md
    assert "**In plain words:** Against discrete, hybrid is " in md


def test_table4_paired_comparison_and_verdicts():
    from maven_edge.model_src.train import table4 as T4

    fam = ["single"] * 50 + ["multi"] * 50
    imgs = [1] * 50 + [3] * 25 + [6] * 25

    def row(correct):
        return {"correct": correct, "accuracy": sum(correct) / len(correct)}

    same = [row([1, 0] * 50), row([0, 1] * 50)]
    assert T4.verdict(T4.compare(same, same, fam, imgs, "multi")) == "tied"
    better = [row([1] * 100)] * 2
    c = T4.compare(better, same, fam, imgs, "multi 5-8")
    assert c["n"] == 25 and c["diff"] == pytest.approx(0.5) and T4.verdict(c) == "ahead"
    assert T4.verdict(T4.compare(same, better, fam, imgs, "overall")) == "behind"
    assert T4.compare(same, same, fam, imgs, "video") is None
    tasks = ["count"] * 50 + ["which_image"] * 50
    split = T4.disagreements(better, same, tasks)  # `same` is right on half of each task, per stream
    assert split == {"count": (25.0, 0.0), "which_image": (25.0, 0.0)}
    assert T4.disagreements(same[:1], same[1:], tasks) == {"count": (25.0, 25.0), "which_image": (25.0, 25.0)}
