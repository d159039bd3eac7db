"""Follow-up questions about an already drawn image set (multi-turn instruction samples).

A generated sample (:mod:`maven_edge.model_src.data.tasks`) draws its scenes *for* its question. Stage 4
additionally asks further questions about the same scenes, so one pass over the visual tokens
supervises several answers (LLaVA's instruction data is multi-turn for the same reason). The
follow-ups use the question templates and answer formats of :mod:`maven_edge.model_src.data.tasks` and keep
its rule that every referring expression names a unique object:

* one image: ``color`` (a shape that occurs once), ``shape`` (a colour that occurs once),
  ``count`` (all shapes, or a colour / shape that occurs), ``position`` (two objects with unique
  colour-shape pairs; left/right only when their centres are ``min_offset`` px apart in x);
* several images: ``which_image`` (a colour-shape pair that occurs exactly once in the set),
  ``count_across`` (a colour or shape that occurs), ``same`` (a shape / colour that occurs exactly
  once in image 1 and once in image 2), and ``in_image``: the single-image colour / shape / count
  questions about one labelled image (``"what color is the circle in image 2?"``), a template the
  evaluation does not ask; it trains the label -> image lookup the multi-image tasks need.
  ``count_across`` totals above ``TaskConfig.max_count_total`` (8) are not asked. With
  ``image_counts`` a fifth task, ``count_in_image``: how many objects of a colour or shape that
  occurs in the set are in one labelled image (``"how many red shapes are there in image 3?"``,
  0-2): the per-image count each term of a worked ``count_across`` tally writes, asked on its own;
* a video's frames (``video=True``): what happened to each object (``nothing`` for a static one),
  the first frame of each colour-shape pair, how many frames show each shape and colour
  (:func:`maven_edge.model_src.data.videos.video_followups`), and ``in_frame`` questions
  (``"what color is the circle in frame 2?"``).

Answers are computed from the scenes' ground truth. Each follow-up picks a task uniformly among
those with a valid question, then a question uniformly, never repeating a question.

With ``reverse_change``, two images that are one edit apart (a ``changed`` sample's) are first
asked the edit backwards, ``"what changed between image 2 and image 1?"`` (``the square turned
red`` for a square that turned blue, ``a red circle was added`` for one that was removed): a
second answer from the same comparison, which the evaluation's forward question needs, without
drawing fewer samples of the other tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from maven_edge.model_src.data.shapes import COLORS, SHAPES, Scene
from maven_edge.model_src.data.tasks import (
    DEFAULT_TASKS,
    REVERSE_CHANGE_QUESTION,
    TaskConfig,
    describe_change,
    plural,
    with_article,
)
from maven_edge.model_src.data.tasks import question as _q
from maven_edge.model_src.data.videos import video_followups

QA = tuple[str, str]  # (question line, answer)


def _color(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    (s,) = scenes
    return [(_q(f"what color is the {shape}?"), found[0].color)
            for shape in SHAPES if len(found := s.find(shape=shape)) == 1]


def _shape(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    (s,) = scenes
    return [(_q(f"what shape is the {color} object?"), found[0].shape)
            for color in COLORS if len(found := s.find(color=color)) == 1]


def _count(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    (s,) = scenes
    out = [(_q("how many shapes are there?"), str(len(s.objects)))]
    out += [(_q(f"how many {c} shapes are there?"), str(n)) for c in COLORS if (n := len(s.find(color=c)))]
    out += [(_q(f"how many {plural(sh)} are there?"), str(n)) for sh in SHAPES if (n := len(s.find(shape=sh)))]
    return out


def _position(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    (s,) = scenes
    unique = [o for o in s.objects if len(s.find(*o.pair)) == 1]
    min_dx = cfg.min_offset * s.image_size / 64
    out = []
    for a in unique:
        for b in unique:
            if a is b:
                continue
            dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
            names = f"{a.color} {a.shape}", f"{b.color} {b.shape}"
            out.append((_q(f"is the {names[0]} above or below the {names[1]}?"), "above" if dy < 0 else "below"))
            if abs(dx) >= min_dx:
                out.append((_q(f"is the {names[0]} left or right of the {names[1]}?"), "left" if dx < 0 else "right"))
    return out


def _which_image(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    where: dict[tuple[str, str], list[int]] = {}
    for k, s in enumerate(scenes):
        for o in s.objects:
            where.setdefault(o.pair, []).append(k)
    return [(_q(f"which image has {with_article(' '.join(p))}?"), f"image {ks[0] + 1}")
            for p, ks in sorted(where.items()) if len(ks) == 1]


def _count_across(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    """Totals up to ``cfg.max_count_total`` only (the answers the generator gives: one digit)."""
    out = []
    for c in COLORS:
        if 0 < (n := sum(len(s.find(color=c)) for s in scenes)) <= cfg.max_count_total:
            out.append((_q(f"how many {c} shapes are there in all the images?"), str(n)))
    for sh in SHAPES:
        if 0 < (n := sum(len(s.find(shape=sh)) for s in scenes)) <= cfg.max_count_total:
            out.append((_q(f"how many {plural(sh)} are there in all the images?"), str(n)))
    return out


def _same(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    a, b = scenes[0], scenes[1]
    out = []
    for sh in SHAPES:
        if len(x := a.find(shape=sh)) == 1 and len(y := b.find(shape=sh)) == 1:
            text = f"is the {sh} in image 1 the same color as the {sh} in image 2?"
            out.append((_q(text), "yes" if x[0].color == y[0].color else "no"))
    for c in COLORS:
        if len(x := a.find(color=c)) == 1 and len(y := b.find(color=c)) == 1:
            text = f"is the {c} object in image 1 the same shape as the {c} object in image 2?"
            out.append((_q(text), "yes" if x[0].shape == y[0].shape else "no"))
    return out


def _in_image(scenes: Sequence[Scene], cfg: TaskConfig, label: str = "image") -> list[QA]:
    """Single-image questions about one labelled image of the set ("... in image 2?"; for a video
    "... in frame 2?"): they exercise the label -> image-block lookup that which_image, same and
    changed rely on."""
    out = []
    for k, s in enumerate(scenes, 1):
        qas = [(_q("how many shapes are there?"), str(len(s.objects)))] + _color([s], cfg) + _shape([s], cfg)
        out += [(q.removesuffix("?") + f" in {label} {k}?", a) for q, a in qas]
    return out


def _count_in_image(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    """Per labelled image, the count of each colour and each shape that occurs anywhere in the set
    (so a 0 is asked where the kind is in another image): the terms of a ``count_across`` tally."""
    colors = [c for c in COLORS if any(s.find(color=c) for s in scenes)]
    shapes = [sh for sh in SHAPES if any(s.find(shape=sh) for s in scenes)]
    out = []
    for k, s in enumerate(scenes, 1):
        out += [(_q(f"how many {c} shapes are there in image {k}?"), str(len(s.find(color=c)))) for c in colors]
        out += [(_q(f"how many {plural(sh)} are there in image {k}?"), str(len(s.find(shape=sh)))) for sh in shapes]
    return out


def _video_task(task: str) -> Callable[[Sequence[Scene], TaskConfig], list[QA]]:
    def make(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
        return [(_q(q), a) for q, a in video_followups(scenes)[task]]
    return make


def _in_frame(scenes: Sequence[Scene], cfg: TaskConfig) -> list[QA]:
    return _in_image(scenes, cfg, "frame")


_Pool = dict[str, Callable[[Sequence[Scene], TaskConfig], list[QA]]]
SINGLE_POOL: _Pool = {"color": _color, "shape": _shape, "count": _count, "position": _position}
MULTI_POOL: _Pool = {"which_image": _which_image, "count_across": _count_across, "same": _same,
                     "in_image": _in_image}
IMAGE_COUNT_TASK = "count_in_image"  # the multi-image pool's fifth task with ``image_counts``
VIDEO_POOL: _Pool = {"event": _video_task("event"), "first_frame": _video_task("first_frame"),
                     "frame_count": _video_task("frame_count"), "in_frame": _in_frame}


def followup_questions(
    scenes: Sequence[Scene],
    rng: np.random.Generator,
    n: int,
    skip: Sequence[str] = (),
    config: TaskConfig = DEFAULT_TASKS,
    reverse_change: bool = False,
    video: bool = False,
    image_counts: bool = False,
) -> list[QA]:
    """Up to ``n`` (question line, answer) pairs about ``scenes`` (the frames of a video with
    ``video``), none of whose question lines is in ``skip`` (e.g. the sample's own question); with
    ``reverse_change`` an edit pair's first one is the backwards change question, with
    ``image_counts`` several images also draw ``count_in_image`` questions (module docstring)."""
    if not scenes or n <= 0:
        return []
    pool = VIDEO_POOL if video else SINGLE_POOL if len(scenes) == 1 else MULTI_POOL
    if image_counts and pool is MULTI_POOL:
        pool = {**MULTI_POOL, IMAGE_COUNT_TASK: _count_in_image}
    seen = set(skip)
    candidates = {task: [qa for qa in make(scenes, config) if qa[0] not in seen] for task, make in pool.items()}
    out: list[QA] = []
    if reverse_change and len(scenes) == 2 and _q(REVERSE_CHANGE_QUESTION) not in seen:
        if (answer := describe_change(scenes[1], scenes[0])) is not None:
            out.append((_q(REVERSE_CHANGE_QUESTION), answer))
    while len(out) < n:
        tasks = [t for t, qas in candidates.items() if qas]
        if not tasks:
            break
        qas = candidates[tasks[int(rng.integers(len(tasks)))]]
        out.append(qas.pop(int(rng.integers(len(qas)))))
    return out
