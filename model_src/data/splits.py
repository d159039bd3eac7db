"""Fixed, seeded train / val / test splits of the shapes world.

* Sample ``index`` of ``split`` is generated from ``np.random.default_rng([base_seed, split_id,
  index])`` (``split_id`` = position in :data:`SPLITS`), so it is identical on every call and
  machine, and any index can be generated on its own (the trainer generates on the fly).
* The task of sample ``index`` is ``schedule[index % len(schedule)]`` (all nine tasks in turn by
  default): every run of 9 consecutive indices holds each task once, and filtering by family or
  task costs no generation.
* Held-out compositions: the (color, shape) pairs in ``DataConfig.heldout_pairs`` (default
  :data:`HELDOUT_PAIRS`: red cross, green circle, blue triangle, yellow diamond) never appear in
  a train or val scene; test scenes draw objects from all 30 pairs, so about 4 in 30 test objects
  are held-out compositions. ``Sample.meta["heldout"]`` says whether a sample shows one,
  ``meta["heldout_named"]`` whether its text names one (a caption names every object).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from maven_edge.model_src.data.labels import scene_patch_labels
from maven_edge.model_src.data.shapes import ALL_PAIRS, Pair
from maven_edge.model_src.data.tasks import (
    DEFAULT_TASKS,
    FAMILIES,
    TASK_FAMILY,
    TASKS,
    Draft,
    Sample,
    TaskConfig,
    draft_sample,
    finish_sample,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
HELDOUT_PAIRS: tuple[Pair, ...] = (
    ("red", "cross"),
    ("green", "circle"),
    ("blue", "triangle"),
    ("yellow", "diamond"),
)
DEMO_STREAM = 99  # the rng stream of the bundled demo (not a split id)


@dataclass(frozen=True)
class DataConfig:
    """Seeds, split sizes, held-out pairs and the task schedule of the dataset."""

    base_seed: int = 20_240_611
    train_size: int = 1_000_000
    val_size: int = 500
    test_size: int = 1000
    heldout_pairs: tuple[Pair, ...] = HELDOUT_PAIRS
    schedule: tuple[str, ...] = TASKS
    tasks: TaskConfig = DEFAULT_TASKS


DEFAULT_DATA = DataConfig()


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def num_samples(split: str, config: DataConfig = DEFAULT_DATA) -> int:
    """The fixed number of samples of ``split`` (valid indices are ``0 .. n - 1``)."""
    return (config.train_size, config.val_size, config.test_size)[_split_id(split)]


def split_pairs(split: str, config: DataConfig = DEFAULT_DATA) -> tuple[Pair, ...]:
    """The (color, shape) pairs objects of ``split`` are drawn from (test: all; else no held-out)."""
    if _split_id(split) == SPLITS.index("test"):
        return ALL_PAIRS
    return tuple(p for p in ALL_PAIRS if p not in config.heldout_pairs)


def task_of(split: str, index: int, config: DataConfig = DEFAULT_DATA) -> str:
    """The task of sample ``index`` of ``split``, without generating it."""
    n = num_samples(split, config)
    if not 0 <= index < n:
        raise IndexError(f"{split} index {index} out of range 0..{n - 1}")
    return config.schedule[index % len(config.schedule)]


def _draft(split: str, index: int, image_size: int, config: DataConfig) -> Draft:
    task = task_of(split, index, config)
    rng = np.random.default_rng([config.base_seed, _split_id(split), index])
    draft = draft_sample(
        task, rng, pairs=split_pairs(split, config), image_size=image_size, config=config.tasks
    )
    heldout = set(config.heldout_pairs)
    shown = {o.pair for s in draft.scenes for o in s.objects}
    named = {
        o.pair
        for s, objs in zip(draft.scenes, draft.named, strict=True)
        for o in (s.objects if objs is None else objs)
    }
    draft.meta.update(
        split=split, index=index, heldout=bool(shown & heldout), heldout_named=bool(named & heldout)
    )
    return draft


def get_sample(
    split: str, index: int, image_size: int = 64, patch_size: int = 8, config: DataConfig = DEFAULT_DATA
) -> Sample:
    """Sample ``index`` of ``split``: the same pixels, text and labels on every call."""
    return finish_sample(_draft(split, index, image_size, config), patch_size)


def _check_filters(families: Sequence[str] | None, tasks: Sequence[str] | None) -> None:
    for fam in families or ():
        if fam not in FAMILIES:
            raise ValueError(f"unknown family {fam!r}; expected one of {FAMILIES}")
    for task in tasks or ():
        if task not in TASK_FAMILY:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def iter_samples(
    split: str,
    n: int,
    families: Sequence[str] | None = None,
    start: int = 0,
    *,
    tasks: Sequence[str] | None = None,
    image_size: int = 64,
    patch_size: int = 8,
    config: DataConfig = DEFAULT_DATA,
) -> Iterator[Sample]:
    """Up to ``n`` samples of ``split`` from index ``start`` on, keeping only the given families
    and/or tasks (``None``: all). Stops early at the end of the split."""
    _check_filters(families, tasks)

    def keep(index: int) -> bool:
        task = config.schedule[index % len(config.schedule)]
        return (families is None or TASK_FAMILY[task] in families) and (tasks is None or task in tasks)

    indices = (i for i in range(start, num_samples(split, config)) if keep(i))
    return (get_sample(split, i, image_size, patch_size, config) for i in islice(indices, n))


def text_corpus(n: int, split: str = "train", config: DataConfig = DEFAULT_DATA) -> list[str]:
    """The texts (``prompt + " " + answer``, placeholders included) of the first ``n`` samples."""
    out = []
    for index in range(min(n, num_samples(split, config))):
        d = _draft(split, index, 64, config)
        out.append(f"{d.prompt} {d.answer}")
    return out


def summary(split: str, n: int | None = None, config: DataConfig = DEFAULT_DATA) -> dict[str, Any]:
    """Counts over the first ``n`` samples of ``split`` (default: all of val/test, 1000 of train):
    per family, per task, samples showing / naming a held-out pair, mean images per sample and the mean
    fraction of patches labelled positive (8 px patches of 64 px images)."""
    n = min(n if n is not None else 1000, num_samples(split, config))
    families: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    heldout = heldout_named = images = 0
    positive = []
    for index in range(n):
        d = _draft(split, index, 64, config)
        families[d.family] += 1
        tasks[d.task] += 1
        heldout += d.meta["heldout"]
        heldout_named += d.meta["heldout_named"]
        images += len(d.scenes)
        positive.extend(
            float(scene_patch_labels(s, o, 8).mean()) for s, o in zip(d.scenes, d.named, strict=True)
        )
    return {
        "split": split,
        "n": n,
        "family": dict(families),
        "task": dict(tasks),
        "heldout": heldout,
        "heldout_named": heldout_named,
        "images_per_sample": images / max(n, 1),
        "positive_patch_fraction": float(np.mean(positive)) if positive else 0.0,
    }


FIXED_COUNT_STREAM = 98  # the rng stream of fixed_count_samples (not a split id)


def fixed_count_samples(
    num_images: int,
    n: int,
    tasks: Sequence[str] = ("which_image", "count_across"),
    image_size: int = 64,
    patch_size: int = 8,
    config: DataConfig = DEFAULT_DATA,
) -> list[Sample]:
    """``n`` test-like questions with exactly ``num_images`` images (the visual-token budget curves):
    the ``tasks`` in turn (tasks whose image count varies), objects from the test split's pairs
    (held-out pairs included), sample ``i`` from ``default_rng([base_seed, 98, num_images, i])``."""
    tc = replace(config.tasks, multi_images=(num_images, num_images))
    out = []
    for i in range(n):
        rng = np.random.default_rng([config.base_seed, FIXED_COUNT_STREAM, num_images, i])
        draft = draft_sample(tasks[i % len(tasks)], rng, pairs=split_pairs("test", config),
                             image_size=image_size, config=tc)
        draft.meta.update(split="test-like", index=i)
        out.append(finish_sample(draft, patch_size))
    return out


def write_demo_samples(out_dir: str | Path, config: DataConfig = DEFAULT_DATA) -> dict[str, Any]:
    """Write the bundled demo (``model_src/samples``): a 3-image "which image has X" question.

    Writes ``demo_1.png`` .. ``demo_3.png`` (64 px) and ``demo.json`` with ``images``, ``prompt``,
    ``answer`` and ``task``; returns the JSON content. Uses only train pairs and a fixed seed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([config.base_seed, DEMO_STREAM])
    tasks = replace(config.tasks, multi_images=(3, 3))
    draft = draft_sample("which_image", rng, pairs=split_pairs("train", config), config=tasks)
    sample = finish_sample(draft)
    names = []
    for i, img in enumerate(sample.images, 1):
        names.append(f"demo_{i}.png")
        img.save(out / names[-1])
    demo = {"images": names, "prompt": sample.prompt, "answer": sample.answer, "task": sample.task}
    (out / "demo.json").write_text(json.dumps(demo, indent=2) + "\n")
    return demo


def write_demo_video(out_dir: str | Path, config: DataConfig = DEFAULT_DATA) -> dict[str, Any]:
    """Write the bundled video demo (``model_src/samples``): ``demo_video.mp4`` (H.264) and
    ``demo_video.webm`` (VP9) of a "what happened to ...?" video (train pairs, a fixed seed, each
    frame shown 1 s at 4 frames per second, 256 px) and ``demo_video.json`` (files, question,
    answer, frames). Needs PyAV."""
    from maven_edge.model_src.data.videos import write_video_sample

    for i in range(100):  # the first sample of the demo stream that asks what happened
        rng = np.random.default_rng([config.base_seed, DEMO_STREAM, 1, i])
        draft = draft_sample("video", rng, pairs=split_pairs("train", config), config=config.tasks)
        if draft.meta["variant"] == "event" and draft.meta["event"] in ("moved", "appeared"):
            break
    return write_video_sample(finish_sample(draft), out_dir, stem="demo_video")


def write_preview(split: str, n: int, out_dir: str | Path, start: int = 0, scale: int = 4) -> Path:
    """Write samples ``start .. start + n - 1`` of ``split`` (64 px, 8 px patches) for viewing: one
    PNG strip per sample (its images side by side, enlarged ``scale`` times, patches labelled for
    the selector outlined in black) and ``samples.jsonl`` with each strip's task, prompt and
    answer. Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patch, size = 8 * scale, 64 * scale
    lines = []
    for index in range(start, min(start + n, num_samples(split))):
        sample = get_sample(split, index)
        strip = Image.new("RGB", (len(sample.images) * (size + 4) - 4, size), "black")
        for k, (img, labels) in enumerate(zip(sample.images, sample.patch_labels, strict=True)):
            big = img.resize((size, size), Image.NEAREST)
            draw = ImageDraw.Draw(big)
            for i in np.flatnonzero(labels):
                r, c = divmod(int(i), 8)
                draw.rectangle(
                    (c * patch, r * patch, (c + 1) * patch - 1, (r + 1) * patch - 1), outline=(0, 0, 0)
                )
            strip.paste(big, (k * (size + 4), 0))
        name = f"{split}_{index:06d}.png"
        strip.save(out / name)
        lines.append(
            json.dumps({"file": name, "task": sample.task, "prompt": sample.prompt, "answer": sample.answer})
        )
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return out
