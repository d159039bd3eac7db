"""The shapes-world data package: determinism, splits, prompts, labels, masks and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maven_edge.core.tokenizer import IMAGE_TOKEN, count_image_placeholders
from maven_edge.core.video import frame_block
from maven_edge.model_src.data import (
    ALL_PAIRS,
    COLORS,
    FAMILIES,
    HELDOUT_PAIRS,
    SHAPES,
    SPLITS,
    TASK_FAMILY,
    TASKS,
    get_sample,
    iter_samples,
    make_sample,
    num_samples,
    patch_labels,
    render_scene,
    sample_scene,
    split_pairs,
    summary,
    task_of,
    text_corpus,
    write_demo_samples,
)
from maven_edge.model_src.data.shapes import make_object
from maven_edge.model_src.data.tasks import image_block

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "model_src" / "samples"


@pytest.fixture(scope="module")
def samples() -> dict[str, list]:
    """A few hundred samples of each split (every task many times)."""
    return {split: [get_sample(split, i) for i in range(180)] for split in SPLITS}


def _pixels(sample) -> list[np.ndarray]:
    return [np.asarray(img) for img in sample.images]


def test_same_split_and_index_give_identical_samples() -> None:
    for split in SPLITS:
        for index in (0, 5, 123):
            a, b = get_sample(split, index), get_sample(split, index)
            assert (a.prompt, a.answer, a.task, a.meta) == (b.prompt, b.answer, b.task, b.meta)
            for pa, pb in zip(_pixels(a), _pixels(b), strict=True):
                assert np.array_equal(pa, pb)
            for la, lb in zip(a.patch_labels, b.patch_labels, strict=True):
                assert np.array_equal(la, lb)
    # Different splits (or indices) with the same task give different samples.
    assert not np.array_equal(_pixels(get_sample("train", 0))[0], _pixels(get_sample("val", 0))[0])
    assert not np.array_equal(_pixels(get_sample("train", 0))[0], _pixels(get_sample("train", 9))[0])


def test_split_sizes_and_index_bounds() -> None:
    assert SPLITS == ("train", "val", "test")
    assert num_samples("val") == 500 and num_samples("test") == 1000 and num_samples("train") >= 200_000
    with pytest.raises(IndexError):
        get_sample("val", 500)
    with pytest.raises(ValueError):
        get_sample("dev", 0)


def test_heldout_pairs_only_in_test(samples) -> None:
    heldout = set(HELDOUT_PAIRS)
    assert len(heldout) == 4 and heldout <= set(ALL_PAIRS)
    assert not heldout & set(split_pairs("train")) and not heldout & set(split_pairs("val"))
    assert set(split_pairs("test")) == set(ALL_PAIRS)
    for split in ("train", "val"):
        for s in samples[split]:
            assert not {o.pair for sc in s.scenes for o in sc.objects} & heldout, (split, s.meta)
            assert not s.meta["heldout"]
    shown = [s for s in samples["test"] if {o.pair for sc in s.scenes for o in sc.objects} & heldout]
    assert shown and all(s.meta["heldout"] for s in shown)
    assert any(s.meta["heldout_named"] for s in samples["test"])


def test_prompt_format_and_placeholder_count(samples) -> None:
    for s in (s for split in SPLITS for s in samples[split]):
        assert count_image_placeholders(s.prompt) == len(s.images) == len(s.patch_labels) == len(s.scenes)
        block = frame_block(len(s.images)) if s.family == "video" else image_block(len(s.images))
        assert s.prompt.startswith(block + "\n") and s.prompt.endswith("\nAnswer:")
        if s.family == "video":
            assert s.prompt.startswith(f"Frame 1: {IMAGE_TOKEN}\nFrame 2: {IMAGE_TOKEN}\n")
        elif len(s.images) > 1:
            assert s.prompt.startswith(f"Image 1: {IMAGE_TOKEN}\nImage 2: {IMAGE_TOKEN}\n")
        assert s.family == TASK_FAMILY[s.task]
        if s.family == "caption":
            assert s.prompt == f"{IMAGE_TOKEN}\nDescribe the image.\nAnswer:"
        else:
            assert "\nQuestion: " in s.prompt and s.prompt.endswith("?\nAnswer:")
        assert (len(s.images) == 1) == (s.family not in ("multi", "video"))
        assert len(s.images) <= 8
        assert all(img.mode == "RGB" and img.size == (64, 64) for img in s.images)
        assert s.text == f"{s.prompt} {s.answer}"


def test_every_task_and_family_appears(samples) -> None:
    assert {s.task for s in samples["test"]} == set(TASKS)
    assert {s.family for s in samples["test"]} == set(FAMILIES)
    assert [task_of("train", i) for i in range(len(TASKS))] == list(TASKS)
    counts = summary("val")
    assert counts["n"] == 500 and sum(counts["task"].values()) == 500
    assert set(counts["task"]) == set(TASKS) and max(counts["task"].values()) - min(counts["task"].values()) <= 1
    assert counts["heldout"] == 0 and summary("test", 90)["heldout"] > 0


def test_answers_are_short_and_exact(samples) -> None:
    colors, shapes = set(COLORS), set(SHAPES)
    for s in (s for split in SPLITS for s in samples[split]):
        a = s.answer
        assert a == a.strip().lower() and not a.endswith(".") and "\n" not in a
        if s.task == "caption":
            parts = a.split(", ")
            assert len(parts) == len(s.scenes[0].objects) and len(a) <= 110
            assert all(p.split()[0] == "a" and p.split()[1] in ("small", "large") for p in parts)
        else:
            assert len(a.split()) <= 5, a
        if s.task == "color":
            assert a in colors
        elif s.task == "shape":
            assert a in shapes
        elif s.task in ("count", "count_across"):
            assert a.isdigit() and 1 <= int(a) <= (4 if s.task == "count" else 8)
        elif s.task == "position":
            assert a in ("left", "right", "above", "below")
        elif s.task == "which_image":
            assert a in [f"image {i + 1}" for i in range(len(s.images))]
        elif s.task == "same":
            assert a in ("yes", "no")
        elif s.task == "video":
            assert a in VIDEO_ANSWERS or a.isdigit() and 1 <= int(a) <= len(s.images) or \
                a in [f"frame {i + 1}" for i in range(len(s.images))], a


VIDEO_ANSWERS = {"it appeared", "it disappeared", *(f"it moved {d}" for d in ("left", "right", "up", "down")),
                 *(f"it turned {c}" for c in COLORS)}


def test_answers_match_the_scenes(samples) -> None:
    for s in samples["test"]:
        scenes = s.scenes
        if s.task == "caption":
            assert s.answer == ", ".join(o.describe() for o in scenes[0].objects)
        elif s.task == "count" and s.meta["variant"] == "all":
            assert s.answer == str(len(scenes[0].objects))
        elif s.task == "which_image":
            color, shape = s.prompt.split("has a")[-1].split("?")[0].split()[-2:]
            having = [i + 1 for i, sc in enumerate(scenes) if sc.find(color, shape)]
            assert having == [int(s.answer.split()[1])]
        elif s.task == "changed":
            first, second = ({(o.pair, o.bbox) for o in sc.objects} for sc in scenes)
            assert len(first ^ second) == (2 if s.meta["edit"] == "recolor" else 1)
            assert scenes[0].clutter == scenes[1].clutter and scenes[0].background == scenes[1].background
        elif s.task == "color":
            shape = s.prompt.split("the ")[-1].split("?")[0]
            (obj,) = scenes[0].find(shape=shape)
            assert s.answer == obj.color
        elif s.task == "position":
            words = s.prompt.split("Question: is the ")[1].split("?")[0].split()
            (a,) = scenes[0].find(*words[:2])
            (b,) = scenes[0].find(*words[-2:])
            axis = 0 if "left or right" in s.prompt else 1
            assert s.answer == ("left", "above")[axis] if a.center[axis] < b.center[axis] else ("right", "below")[axis]
        elif s.task == "same":
            key = s.prompt.split("is the ")[1].split(" ")[0]
            if s.meta["variant"] == "color":
                (a,), (b,) = (sc.find(shape=key) for sc in scenes)
                assert (s.answer == "yes") == (a.color == b.color)
            else:
                (a,), (b,) = (sc.find(color=key) for sc in scenes)
                assert (s.answer == "yes") == (a.shape == b.shape)
    for scene in (sc for s in samples["test"] for sc in s.scenes):
        ys = [o.center[1] for o in scene.objects]
        assert ys == sorted(ys) and all(np.diff(ys) >= 8)  # raster order, no ties


def test_patch_labels_hand_checked() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[9, 17] = True  # row 1, column 2 -> patch 1 * 8 + 2
    labels = patch_labels([mask], 64, 8)
    assert labels.dtype == np.float32 and labels.shape == (64,)
    assert np.flatnonzero(labels).tolist() == [10]
    block = np.zeros((64, 64), dtype=bool)
    block[6:10, 60:64] = True  # rows 0-1, column 7
    assert np.flatnonzero(patch_labels([mask, block], 64, 8)).tolist() == [7, 10, 15]
    assert not patch_labels([], 64, 8).any()
    assert patch_labels([block], 64, 16).shape == (16,)
    with pytest.raises(ValueError):
        patch_labels([mask], 64, 7)


def test_sample_labels_cover_named_objects(samples) -> None:
    for s in samples["train"]:
        for labels, scene in zip(s.patch_labels, s.scenes, strict=True):
            assert labels.shape == (64,) and labels.dtype == np.float32
            assert set(np.unique(labels)) <= {0.0, 1.0} and labels.any()
            every = patch_labels(scene.masks(), 64, 8)
            if s.task != "changed":  # changed marks the edited object's place, maybe absent here
                assert np.all(labels <= every)
        if s.task in ("caption",) or (s.task == "count" and s.meta["variant"] == "all"):
            assert np.array_equal(s.patch_labels[0], patch_labels(s.scenes[0].masks(), 64, 8))
        if s.task == "color":
            shape = s.prompt.split("the ")[-1].split("?")[0]
            (obj,) = s.scenes[0].find(shape=shape)
            assert np.array_equal(s.patch_labels[0], patch_labels([obj.mask], 64, 8))


def test_masks_align_with_rendered_pixels(samples) -> None:
    object_colors = np.array(list(COLORS.values()))
    for s in samples["val"][:60]:
        for img, scene in zip(s.images, s.scenes, strict=True):
            px = np.asarray(img)
            union = np.zeros((64, 64), dtype=bool)
            for o in scene.objects:
                assert o.mask.any() and not (union & o.mask).any()  # no overlap
                assert np.all(px[o.mask] == COLORS[o.color])
                ys, xs = np.nonzero(o.mask)
                x0, y0, x1, y1 = o.bbox
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
                assert o.size == ("large" if x1 - x0 >= 18 else "small")
                union |= o.mask
            rest = px[~union]
            assert not (rest[:, None, :] == object_colors[None]).all(-1).any()  # clutter is never coloured


def test_scene_sampling_and_rendering_api() -> None:
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, 64, (3, 3), required=[("red", "circle")])
    assert len(scene.objects) == 3 and scene.find("red", "circle")
    img = render_scene(scene, 64)
    assert img.size == (64, 64) and img.mode == "RGB"
    with pytest.raises(ValueError):
        render_scene(scene, 128)
    big = sample_scene(np.random.default_rng(1), 128, 4)
    assert big.objects[0].mask.shape == (128, 128)
    obj = make_object("square", "blue", "small", 12, 4, 8, 64)
    assert obj.bbox == (4, 8, 16, 20) and obj.center == (9.5, 13.5)
    sample = make_sample("which_image", np.random.default_rng(2), image_size=128, patch_size=16)
    assert all(lab.shape == (64,) for lab in sample.patch_labels)
    assert all(img.size == (128, 128) for img in sample.images)


def test_iter_samples_filters_and_text_corpus() -> None:
    multi = list(iter_samples("test", 12, families=["multi"], start=3))
    assert len(multi) == 12 and all(s.family == "multi" and s.meta["index"] >= 3 for s in multi)
    only = list(iter_samples("val", 3, tasks=["same"]))
    assert [s.meta["index"] for s in only] == [8, 18, 28]
    assert len(list(iter_samples("val", 1000, families=["caption"]))) == 50  # stops at the split's end
    with pytest.raises(ValueError):
        iter_samples("val", 1, families=["nope"])
    corpus = text_corpus(20)
    assert len(corpus) == 20 and corpus[1] == get_sample("train", 1).text


def test_bundled_demo_matches_generator(tmp_path: Path) -> None:
    demo = write_demo_samples(tmp_path)
    bundled = json.loads((SAMPLES_DIR / "demo.json").read_text())
    assert bundled["images"] == demo["images"] and bundled["prompt"] == demo["prompt"]
    assert bundled["answer"] == demo["answer"]
    assert count_image_placeholders(bundled["prompt"]) == len(bundled["images"]) >= 3
    for name in bundled["images"]:
        ours = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        shipped = np.asarray(Image.open(SAMPLES_DIR / name).convert("RGB"))
        assert shipped.shape == (64, 64, 3) and np.array_equal(ours, shipped)


def _check_followup(scenes, question: str, answer: str) -> str:
    """Re-derive the answer of a follow-up question from the scenes; returns the task it asks."""
    import re

    def one(scene, **kw):
        (obj,) = scene.find(**kw)  # the referring expression names a unique object
        return obj

    q = question.removeprefix("Question: ")
    by_plural = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        assert answer == one(scenes[0], shape=m[1]).color
        return "color"
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        assert answer == one(scenes[0], color=m[1]).shape
        return "shape"
    if m := re.fullmatch(r"how many (\w+)(?: shapes)? are there( in all the images)?\?", q):
        word = m[1]
        def n_in(sc):
            if word == "shapes":
                return len(sc.objects)
            return len(sc.find(color=word)) if word in COLORS else len(sc.find(shape=by_plural[word]))
        assert answer == str(sum(n_in(sc) for sc in scenes)) and answer != "0"
        return "count_across" if m[2] else "count"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)\?", q):
        a, b = one(scenes[0], color=m[1], shape=m[2]), one(scenes[0], color=m[4], shape=m[5])
        axis = 0 if m[3].startswith("left") else 1
        if axis == 0:
            assert abs(a.center[0] - b.center[0]) >= 8
        assert answer == (("left", "above") if a.center[axis] < b.center[axis] else ("right", "below"))[axis]
        return "position"
    if m := re.fullmatch(r"which image has an? (\w+) (\w+)\?", q):
        having = [i + 1 for i, sc in enumerate(scenes) for _ in sc.find(m[1], m[2])]
        assert having == [int(answer.removeprefix("image "))]
        return "which_image"
    if m := re.fullmatch(r"is the (\w+) in image 1 the same color as the \1 in image 2\?", q):
        a, b = (one(sc, shape=m[1]) for sc in scenes[:2])
        assert answer == ("yes" if a.color == b.color else "no")
        return "same"
    if m := re.fullmatch(r"is the (\w+) object in image 1 the same shape as the \1 object in image 2\?", q):
        a, b = (one(sc, color=m[1]) for sc in scenes[:2])
        assert answer == ("yes" if a.shape == b.shape else "no")
        return "same"
    if q == "what changed between image 2 and image 1?":
        # attribute-level difference (not the generator's object identity): what image 1 has that
        # image 2 lacks was added going backwards, and the reverse was removed
        key = lambda o: (o.color, o.shape, o.bbox)  # noqa: E731
        only2 = [o for o in scenes[1].objects if key(o) not in {key(p) for p in scenes[0].objects}]
        only1 = [o for o in scenes[0].objects if key(o) not in {key(p) for p in scenes[1].objects}]
        if only1 and only2:
            (b,), (a,) = only2, only1
            assert (a.shape, a.bbox) == (b.shape, b.bbox) and answer == f"the {a.shape} turned {a.color}"
        elif only1:
            (a,) = only1
            assert answer == f"{'an' if a.color[0] in 'aeiou' else 'a'} {a.color} {a.shape} was added"
        else:
            (b,) = only2
            assert answer == f"the {b.color} {b.shape} was removed"
        return "reverse_change"
    if m := re.fullmatch(r"(what .*|how many shapes are there) in image (\d)\?", q):
        k = int(m[2])
        assert _check_followup([scenes[k - 1]], f"Question: {m[1]}?", answer) in ("color", "shape", "count")
        return "in_image"
    raise AssertionError(f"unexpected follow-up question {question!r}")


def test_followups_are_valid_questions_about_the_same_images(samples) -> None:
    from maven_edge.model_src.data.followups import MULTI_POOL, SINGLE_POOL, followup_questions
    from maven_edge.model_src.data.tasks import question_line

    rng = np.random.default_rng(0)
    asked: dict[str, set[str]] = {"single": set(), "multi": set()}
    for s in samples["train"]:
        if s.family == "video":  # tests/test_video_data.py
            continue
        own = question_line(s)
        assert own in s.prompt.split("\n")
        qas = followup_questions(s.scenes, rng, 3, skip=[own])
        questions = [q for q, _ in qas]
        assert own not in questions and len(set(questions)) == len(questions)
        assert 1 <= len(qas) <= 3  # every scene has at least "how many shapes" / one which-image pair
        kind = "single" if len(s.scenes) == 1 else "multi"
        for q, a in qas:
            asked[kind].add(_check_followup(s.scenes, q, a))
    assert asked == {"single": set(SINGLE_POOL), "multi": set(MULTI_POOL)}
    scenes = samples["train"][0].scenes
    again = [followup_questions(scenes, np.random.default_rng(5), 4) for _ in range(2)]
    assert again[0] == again[1]  # seeded
    assert followup_questions(scenes, rng, 0) == [] and followup_questions([], rng, 3) == []


def test_reverse_change_followup_asks_a_changed_samples_edit_backwards(samples) -> None:
    """With ``reverse_change`` every ``changed`` sample (and only those) gets the backwards change
    question first, answered from the scenes; the forward answer is ``describe_change``'s."""
    from maven_edge.model_src.data.followups import followup_questions
    from maven_edge.model_src.data.tasks import describe_change, question_line

    rng = np.random.default_rng(1)
    edits = set()
    for s in samples["train"] + samples["test"]:
        qas = followup_questions(s.scenes, rng, 4, skip=[question_line(s)], reverse_change=True)
        backwards = [k for k, (q, _) in enumerate(qas) if "between image 2 and image 1" in q]
        if s.task == "changed":
            assert backwards == [0] and len(qas) == 4
            assert _check_followup(s.scenes, *qas[0]) == "reverse_change"
            assert describe_change(*s.scenes) == s.answer
            edits.add(s.meta["edit"])
        else:
            assert backwards == []
            if len(s.scenes) >= 2:  # independently drawn images are not an edit pair
                assert describe_change(s.scenes[0], s.scenes[1]) is None
        plain = followup_questions(s.scenes, np.random.default_rng(2), 4, skip=[question_line(s)])
        assert not any("between image 2 and image 1" in q for q, _ in plain)  # off by default
    assert edits == {"recolor", "removed", "added"}
    first = next(s for s in samples["train"] if s.task == "changed").scenes[0]
    assert describe_change(first, first) is None  # no edit
