"""Evaluation: refusals on bad checkpoints, batched greedy == generate(), the shipped tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from maven_edge.core.config import get_config  # noqa: E402
from maven_edge.core.errors import CheckpointError, InputError  # noqa: E402
from maven_edge.core.preprocess import preprocess_images  # noqa: E402
from maven_edge.core.sampling import GenerationConfig  # noqa: E402
from maven_edge.model_src.checkpoint import SHIPPED_TINY, build_model, save_checkpoint  # noqa: E402
from maven_edge.model_src.data import iter_samples  # noqa: E402
from maven_edge.model_src.train.evaluate import TEST_PREDICTIONS, evaluate, greedy_batch  # noqa: E402

SMALL = [
    "vision.hidden_size=32", "vision.num_heads=2", "vision.num_layers=1", "vision.intermediate_size=32",
    "discrete.hidden_size=32", "discrete.num_heads=2", "discrete.num_layers=1",
    "discrete.intermediate_size=32", "discrete.codebook_size=64", "discrete.code_dim=16",
    "llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.num_kv_heads=1",
    "llm.intermediate_size=32", "selector.hidden_size=32",
]
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "model_src" / "samples"
needs_shipped = pytest.mark.skipif(
    not (SHIPPED_TINY / "model.safetensors").is_file(), reason="shipped tiny checkpoint not trained yet"
)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(build_model(get_config("tiny", SMALL), seed=3), d)
    return d


def _cli(*args):
    from maven_edge.cli import main

    return main(["eval", *args])


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert _cli("--checkpoint", str(tmp_path / "nope"), "--limit", "2") == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_corrupt_weights_are_a_clear_error(tmp_path, small_ckpt, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (d / f).write_bytes((small_ckpt / f).read_bytes())
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    assert _cli("--checkpoint", str(d), "--limit", "2") == 2
    assert "corrupt" in capsys.readouterr().err


def test_config_not_matching_weights_is_a_clear_error(tmp_path, small_ckpt, capsys):
    d = tmp_path / "mismatch"
    d.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        (d / f).write_bytes((small_ckpt / f).read_bytes())
    cfg = json.loads((small_ckpt / "config.json").read_text())
    cfg["llm"]["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    assert _cli("--checkpoint", str(d), "--limit", "2") == 2
    assert "does not match its config" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        from maven_edge.model_src.checkpoint import load_checkpoint

        load_checkpoint(d)


def test_bad_options_are_clear_errors(small_ckpt):
    from maven_edge.model_src.checkpoint import load_checkpoint

    model = load_checkpoint(small_ckpt)
    with pytest.raises(InputError, match="unknown split"):
        evaluate(model, split="dev", limit=1, quiet=True)
    with pytest.raises(InputError, match="keep-ratio"):
        evaluate(model, keep_ratio=1.5, limit=1, quiet=True)


def test_eval_report_shape(small_ckpt, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    assert _cli("--checkpoint", str(small_ckpt), "--limit", "9", "--json", "--quiet", "--predictions", str(answers)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_questions"] == 9 and "predictions" not in report
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(9))
    assert set(lines[0]) == {"index", "task", "family", "images", "prompt", "answer", "prediction", "correct"}
    assert sum(r["correct"] for r in lines) / 9 == pytest.approx(report["accuracy"])
    assert set(report["family_accuracy"]) == {"caption", "single", "multi"}
    assert report["visual_tokens_per_image"] == 48
    assert report["mean_prefill_tokens"] > 48


def test_named_patch_recall_and_fixed_patch_subset(small_ckpt):
    """Hybrid reports the share of the named objects' patches its selector kept, per task; a
    continuous evaluation with a fixed patch subset shows that many patches per image."""
    import numpy as np

    from maven_edge.model_src.checkpoint import load_checkpoint
    from maven_edge.model_src.train.evaluate import named_patches_kept

    model = load_checkpoint(small_ckpt)
    samples = list(iter_samples("test", 6))
    rep = evaluate(model, samples=samples, quiet=True)
    recall = rep["named_patch_recall"]
    assert set(recall) == {s.task for s in samples} | {"overall"} and all(0 <= v <= 1 for v in recall.values())
    s = samples[0]
    labelled = [np.flatnonzero(lab) for lab in s.patch_labels]
    assert named_patches_kept(s, labelled) == (sum(len(x) for x in labelled),) * 2
    assert named_patches_kept(s, [np.flatnonzero(lab == 0) for lab in s.patch_labels])[0] == 0
    grid = evaluate(model, samples=samples, mode="continuous", patch_subset=20, quiet=True)
    assert grid["visual_tokens_per_image"] == 20 and "named_patch_recall" not in grid
    assert grid["mean_visual_tokens"] == pytest.approx(20 * rep["mean_images_per_question"])
    assert grid["mean_prefill_tokens"] < evaluate(model, samples=samples, mode="continuous", quiet=True)[
        "mean_prefill_tokens"]
    with pytest.raises(InputError, match="fixed patch subset needs --mode continuous"):
        evaluate(model, samples=samples, mode="hybrid", patch_subset=20, quiet=True)


def _generate_answers(model, samples, mode="hybrid", keep_ratio=None):
    out = []
    for s in samples:
        px = torch.from_numpy(preprocess_images(s.images, model.config.preprocess))
        out.append(model.generate(px, s.prompt, GenerationConfig(), mode, keep_ratio)[1])
    return out


def test_batched_greedy_matches_generate_random_model(small_ckpt):
    from maven_edge.model_src.checkpoint import load_checkpoint

    model = load_checkpoint(small_ckpt)
    samples = list(iter_samples("test", 6))
    for mode in ("hybrid", "discrete"):
        batched, _, _ = greedy_batch(model, samples, mode)
        assert batched == _generate_answers(model, samples, mode)


@needs_shipped
def test_shipped_checkpoint_answers_and_matches_generate():
    from maven_edge.model_src.checkpoint import load_checkpoint

    model = load_checkpoint(SHIPPED_TINY)
    samples = list(iter_samples("test", 18, families=["single", "multi"]))
    batched, _, _ = greedy_batch(model, samples, "hybrid")
    assert batched == _generate_answers(model, samples)


SUBSET_STRIDE = 9  # every 9th test question: 112 questions, every task, 1 to 8 images


def _shipped_predictions() -> list[dict]:
    lines = (SHIPPED_TINY / TEST_PREDICTIONS).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _test_split(cfg) -> list:
    from maven_edge.model_src.data.splits import num_samples

    return list(iter_samples("test", num_samples("test"), image_size=cfg.vision.image_size,
                             patch_size=cfg.vision.patch_size))


@needs_shipped
def test_shipped_predictions_belong_to_the_test_split_and_score_to_the_eval_report():
    """The stored answers (test_predictions.jsonl, written by `maven-edge eval --predictions`) are for
    today's test split, each marked correct by the evaluator's rule, and averaged per family, task,
    image bucket and video variant they give exactly the accuracies of eval_report.json."""
    from collections import defaultdict

    from maven_edge.model_src.checkpoint import load_config
    from maven_edge.model_src.data.tasks import normalize_answer
    from maven_edge.model_src.train.evaluate import image_bucket

    report = json.loads((SHIPPED_TINY / "eval_report.json").read_text())
    preds = _shipped_predictions()
    samples = _test_split(load_config(SHIPPED_TINY))
    assert len(preds) == len(samples) == report["num_questions"]
    hits: dict[str, list[bool]] = defaultdict(list)
    for p, s in zip(preds, samples, strict=True):
        assert (p["index"], p["prompt"], p["answer"], p["task"], p["images"]) == (
            s.meta["index"], s.prompt, s.answer, s.task, len(s.images))
        assert p["correct"] == (normalize_answer(p["prediction"]) == normalize_answer(s.answer))
        hits["overall"].append(p["correct"])
        hits[f"family/{s.family}"].append(p["correct"])
        hits[f"task/{s.task}"].append(p["correct"])
        if s.family == "multi":
            hits[f"bucket/{image_bucket(len(s.images))}"].append(p["correct"])
        if s.family == "video":
            hits[f"video/{s.meta['variant']}"].append(p["correct"])

    def acc(key: str) -> float:
        return sum(hits[key]) / len(hits[key])

    assert acc("overall") == pytest.approx(report["accuracy"], abs=1e-9)
    for key, table in (("family", "family_accuracy"), ("task", "task_accuracy"), ("video", "video_accuracy")):
        assert {k: acc(f"{key}/{k}") for k in report[table]} == pytest.approx(report[table], abs=1e-9)
    buckets = {b: acc(f"bucket/{b}") for b in report["image_bucket_accuracy"]}
    assert buckets == pytest.approx({b: v["multi"] for b, v in report["image_bucket_accuracy"].items()}, abs=1e-9)


@needs_shipped
def test_shipped_checkpoint_gives_its_stored_answers():
    """Regression guard, in the default suite: the shipped weights answer every 9th test question
    (112: every task, 1 to 8 images) exactly as stored in test_predictions.jsonl (greedy decoding
    is deterministic). The whole split is the --runslow test below."""
    from maven_edge.model_src.checkpoint import load_checkpoint

    model = load_checkpoint(SHIPPED_TINY)
    samples = _test_split(model.config)[::SUBSET_STRIDE]
    stored = _shipped_predictions()[::SUBSET_STRIDE]
    got = evaluate(model, samples=samples, quiet=True, return_predictions=True)["predictions"]
    assert [(g["index"], g["prediction"]) for g in got] == [(p["index"], p["prediction"]) for p in stored]


@needs_shipped
@pytest.mark.slow
def test_shipped_checkpoint_reproduces_its_eval_report():
    """Evaluating the shipped weights on the whole test split gives exactly the accuracies in its
    eval_report.json and the answers in test_predictions.jsonl (about 2 minutes; --runslow)."""
    from maven_edge.model_src.checkpoint import load_checkpoint

    report = json.loads((SHIPPED_TINY / "eval_report.json").read_text())
    got = evaluate(load_checkpoint(SHIPPED_TINY), split="test", mode="hybrid", quiet=True, return_predictions=True)
    assert got["num_questions"] == report["num_questions"]
    assert got["family_accuracy"] == pytest.approx(report["family_accuracy"], abs=1e-9)
    assert got["task_accuracy"] == pytest.approx(report["task_accuracy"], abs=1e-9)
    assert [g["prediction"] for g in got["predictions"]] == [p["prediction"] for p in _shipped_predictions()]


@needs_shipped
def test_shipped_eval_report_exists_and_is_consistent():
    report = json.loads((SHIPPED_TINY / "eval_report.json").read_text())
    assert report["mode"] == "hybrid" and report["keep_ratio"] == 0.25
    assert report["num_questions"] == 1000  # the test split since issue 36
    assert set(report["family_accuracy"]) == {"caption", "single", "multi", "video"}
    assert set(report["image_bucket_accuracy"]) == {"2-4", "5-8"}
    assert set(report["image_bucket_accuracy"]["5-8"]) == {"multi", "which_image", "count_across"}
    assert set(report["video_accuracy"]) == {"event", "first_frame", "frame_count"}


@needs_shipped
@pytest.mark.skipif(not (SAMPLES_DIR / "demo.json").is_file(), reason="demo sample not written yet")
def test_readme_demo_question_is_answered_correctly():
    from maven_edge.model_src.checkpoint import load_checkpoint

    demo = json.loads((SAMPLES_DIR / "demo.json").read_text())
    model = load_checkpoint(SHIPPED_TINY)
    px = torch.from_numpy(preprocess_images([str(SAMPLES_DIR / f) for f in demo["images"]], model.config.preprocess))
    _, text = model.generate(px, demo["prompt"])
    assert text.strip() == demo["answer"]


@needs_shipped
def test_diagnose_shows_the_shipped_model_reads_colour_and_count_from_the_patches():
    """maven_edge.model_src.train.diagnose on the shipped weights: giving each image another image's kept
    patches breaks colour answers and costs counts (the count attention targets made counting
    read the counted objects' patches; before them counts came from the codes alone); the answer
    position's attention is a distribution over the prompt, and for colour questions its last
    layer looks at the named object's patches more than at the other kept patches; the residual
    stream is reported per layer and token kind."""
    from maven_edge.model_src.checkpoint import load_checkpoint
    from maven_edge.model_src.train.diagnose import diagnose

    model = load_checkpoint(SHIPPED_TINY)
    report = diagnose(model, "val", per_task=20, tasks=["color", "count"], attention_per_task=6)
    abl = report["patch_ablation"]
    assert abl["color"]["own_patches"] >= 0.9 and abl["color"]["other_image_patches"] <= 0.5
    assert abl["count"]["own_patches"] >= 0.7 and abl["count"]["other_image_patches"] < abl["count"]["own_patches"]
    for layers in report["answer_attention"].values():
        assert len(layers) == model.config.llm.num_layers
        assert all(sum(row.values()) == pytest.approx(1.0, abs=1e-3) for row in layers)
    last = report["answer_attention"]["color"][-1]
    assert last["named_patches"] > last["other_patches"]
    rms = report["embedding_rms"]
    assert rms["projected_patches"] > 10 * rms["text"] > 0
    res = report["residual_rms"]
    n = model.config.llm.num_layers
    assert list(res["stream"]) == ["input"] + [f"after_layer_{i}" for i in range(n)]
    assert list(res["update"]) == [f"layer_{i}" for i in range(n)]
    assert res["stream"]["input"]["patches"] == pytest.approx(rms["projected_patches"], rel=0.3)
    # the first layer writes updates far larger than the text embeddings, and changes patch tokens too
    assert res["update"]["layer_0"]["text"] > 10 * res["stream"]["input"]["text"]
    assert all(res["update"][f"layer_{i}"]["patches"] > 0 for i in range(n))
    assert all(layer.self_attn.record is None for layer in model.llm.layers)  # recording switched off
    assert all(not layer._forward_hooks for layer in model.llm.layers)  # residual hooks removed


def test_diagnose_refuses_bad_options(small_ckpt):
    from maven_edge.core.errors import InputError
    from maven_edge.model_src.checkpoint import load_checkpoint
    from maven_edge.model_src.train.diagnose import diagnose, main

    model = load_checkpoint(small_ckpt)
    with pytest.raises(InputError, match="unknown task"):
        diagnose(model, "val", tasks=["colour"])
    with pytest.raises(InputError, match="unknown split"):
        diagnose(model, "dev")
    with pytest.raises(SystemExit, match="--per-task"):
        main(["--checkpoint", str(small_ckpt), "--per-task", "0"])
