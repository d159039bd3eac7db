"""Samples of the shapes world: captions, single-image QA and multi-image QA.

Prompt format: the ``<image>`` placeholders first, then a newline, the text line and
``"\\nAnswer:"``. With several images each placeholder sits on its own line after an
``Image k:`` label (as multi-image chat models such as LLaVA-Interleave do), so the model can
refer to "image 2" without counting image blocks::

    <image>\\nDescribe the image.\\nAnswer:
    <image>\\nQuestion: what color is the circle?\\nAnswer:
    Image 1: <image>\\nImage 2: <image>\\nImage 3: <image>\\nQuestion: which image has a red square?\\nAnswer:

The training text is ``prompt + " " + answer`` (:attr:`Sample.text`). Answers are lower-case,
without a final period, and checked by exact string match (task: question -> answer):

* ``caption``: "Describe the image." -> ``a large red circle, a small blue square``
* ``color``: "what color is the {shape}?" -> a colour word (``red``)
* ``shape``: "what shape is the {color} object?" -> a shape word (``circle``)
* ``count``: "how many shapes are there?" / "how many {color} shapes are there?" /
  "how many {shape}s are there?" -> a digit, ``1``-``4``
* ``position``: "is the {color} {shape} left or right of the {color} {shape}?" -> ``left`` /
  ``right``; "... above or below the ...?" -> ``above`` / ``below``
* ``which_image``: "which image has a {color} {shape}?" -> ``image 2`` ("an orange ...")
* ``changed``: "what changed between image 1 and image 2?" -> ``the square turned blue`` /
  ``the red circle was removed`` / ``a green cross was added`` (``an orange ...``)
* ``count_across``: "how many {color} shapes are there in all the images?" / "how many
  {shape}s are there in all the images?" -> a digit, ``1``-``8`` (at most 2 per image)
* ``same``: "is the {shape} in image 1 the same color as the {shape} in image 2?" / "is the
  {color} object in image 1 the same shape as the {color} object in image 2?" -> ``yes`` / ``no``

* ``video``: "what happened to the {color} {shape}?" -> ``it moved left`` / ``it turned blue`` /
  ``it appeared`` / ``it disappeared``; "in which frame does the {color} {shape} first appear?" ->
  ``frame 3``; "how many frames show a {shape}?" / "... a {color} shape?" -> a digit. The frames are
  labelled ``Frame k: <image>`` (:mod:`maven_edge.model_src.data.videos`).

Families: ``caption``; ``single`` (color, shape, count, position); ``multi`` (which_image, changed,
count_across, same); ``video``.

Captions list every object as ``a {size} {color} {shape}``, joined by ``", "``, in raster order
(top to bottom by centre; see :mod:`maven_edge.model_src.data.shapes`). Every referring expression in a
question names a unique object, which is how the scenes are sampled: e.g. for "what color is the
circle?" the other objects are never circles; "which image has X" has exactly one answer image.
Multi-image questions use 2-8 images (``which_image``, ``count_across``: uniform) or exactly 2;
a ``count_across`` total is uniform on 1..8 (at most 2 per image) whatever the number of images.
Videos have 4-8 frames.

Selector labels (``Sample.patch_labels``, one per image) mark the patches of the objects the
text names in that image: the object asked about, the objects counted, both objects compared.
Where the text names nothing in an image (captions, "how many shapes", images of "which image"
that lack the object, images of "count_across" with none counted) all objects are marked. For
``changed`` both images mark the edited object's place, also the image where it is absent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from maven_edge.core.prompt import image_block, make_prompt  # noqa: F401 - the layout lives in core
from maven_edge.model_src.data.labels import scene_patch_labels
from maven_edge.model_src.data.shapes import (
    ALL_PAIRS,
    DEFAULT_SCENE,
    Pair,
    Scene,
    SceneConfig,
    ShapeObject,
    render_scene,
    sample_scene,
)
from maven_edge.model_src.data.videos import video_question

FAMILIES: tuple[str, ...] = ("caption", "single", "multi", "video")
TASK_FAMILY: dict[str, str] = {
    "caption": "caption",
    "color": "single",
    "shape": "single",
    "count": "single",
    "position": "single",
    "which_image": "multi",
    "changed": "multi",
    "count_across": "multi",
    "same": "multi",
    "video": "video",
}
TASKS: tuple[str, ...] = tuple(TASK_FAMILY)
CAPTION_TEXT = "Describe the image."
CHANGE_QUESTION = "what changed between image 1 and image 2?"
# training-only follow-up on a `changed` sample's images (the same edit read backwards); never evaluated
REVERSE_CHANGE_QUESTION = "what changed between image 2 and image 1?"


def with_article(phrase: str) -> str:
    """``"red circle"`` -> ``"a red circle"``, ``"orange cross"`` -> ``"an orange cross"``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def edited_objects(before: Scene, after: Scene) -> tuple[list[ShapeObject], list[ShapeObject]]:
    """(objects of ``before`` that ``after`` lacks, objects of ``after`` that ``before`` lacks), by
    identity: an edited scene keeps its other objects, so for an edit pair this is the edit."""
    gone = [o for o in before.objects if not any(o is p for p in after.objects)]
    new = [o for o in after.objects if not any(o is p for p in before.objects)]
    return gone, new


def describe_change(before: Scene, after: Scene) -> str | None:
    """The ``changed`` answer for going from ``before`` to ``after`` when ``after`` is ``before``
    with one edit (:meth:`Scene.recolored`, :meth:`Scene.without`, or the reverse of the latter:
    same background and clutter, every other object the same object), else ``None``."""
    if before.background != after.background or before.clutter != after.clutter:
        return None
    gone, new = edited_objects(before, after)
    if len(gone) == 1 and len(new) == 1:
        a, b = gone[0], new[0]
        if a.shape == b.shape and a.bbox == b.bbox and a.color != b.color:
            return f"the {a.shape} turned {b.color}"
    elif len(gone) == 1 and not new:
        return f"the {gone[0].color} {gone[0].shape} was removed"
    elif len(new) == 1 and not gone:
        return f"{with_article(f'{new[0].color} {new[0].shape}')} was added"
    return None


def count_chain(counts: Sequence[int], labelled: bool = False) -> str:
    """A worked count across images, as a running tally: per-image counts ``[2, 0, 1, 1]`` ->
    ``"2+0=2+1=3+1=4"`` (each ``+c=t`` adds image k's count to the total so far; one image:
    just its count). ``labelled``: each term names its image as the prompt labels it
    (``Image 2:``), ``"1:2+ 2:0=2+ 3:1=3+ 4:1=4"``. The training target of ``count_across`` with
    ``PhaseConfig.worked_counts`` (``labelled``: ``PhaseConfig.labelled_tally``); scored by its
    result (:func:`answer_result`)."""
    if not counts:
        raise ValueError("count_chain needs at least one count")
    labelled = labelled and len(counts) > 1
    first = f"1:{int(counts[0])}" if labelled else str(int(counts[0]))
    text, total = first, int(counts[0])
    for k, c in enumerate(counts[1:], start=2):
        total += int(c)
        text += f"+ {k}:{int(c)}={total}" if labelled else f"+{int(c)}={total}"
    return text


# a tally, plain (2+0=2+1=3) or labelled (1:2+ 2:0=2+ 3:1=3); one image alone is never a tally
_CHAIN = re.compile(r"\d+(?:\+\d+=\d+)+|1:\d+(?:\+ \d+:\d+=\d+)+")


def answer_result(text: str) -> str:
    """The answer to score: a worked count (``"2+0=2+1=3"`` or ``"1:2+ 2:0=2+ 3:1=3"``,
    :func:`count_chain`) is reduced to its result (``"3"``, after the last ``=``); every other
    answer is returned unchanged. Only the result is checked, as for a chain of thought: a tally
    with a wrong step but the right total counts as right."""
    stripped = text.strip()
    return stripped.rsplit("=", 1)[1] if _CHAIN.fullmatch(stripped) else text


def tally_terms(text: str) -> tuple[list[int], bool] | None:
    """A worked count's per-image terms and whether each running total adds up:
    ``"2+0=2+1=3"`` or ``"1:2+ 2:0=2+ 3:1=3"`` -> ``([2, 0, 1], True)``, ``"2+0=2+1=4"`` ->
    ``([2, 0, 1], False)``; None when ``text`` is not a tally (a plain total, anything else, or a
    labelled tally whose labels are not 1, 2, 3, ... in order: its terms belong to no image)."""
    stripped = text.strip()
    if not _CHAIN.fullmatch(stripped):
        return None
    first, *steps = stripped.split("+")
    items = [first] + [step.split("=")[0].strip() for step in steps]
    if ":" in first:
        labels = [int(item.split(":")[0]) for item in items]
        if labels != list(range(1, len(items) + 1)):
            return None
        items = [item.split(":")[1] for item in items]
    terms = [int(item) for item in items]
    totals = [int(step.split("=")[1]) for step in steps]
    return terms, all(t == sum(terms[: i + 2]) for i, t in enumerate(totals))


def normalize_answer(text: str) -> str:
    """What exact match compares (``maven-edge eval``, the quantize report, the parity tools):
    the result of a worked count (:func:`answer_result`), lower case, single spaces."""
    return " ".join(answer_result(text).strip().lower().split())


def plural(shape: str) -> str:
    """``"circle"`` -> ``"circles"``, ``"cross"`` -> ``"crosses"``."""
    return shape + ("es" if shape.endswith("s") else "s")


@dataclass(frozen=True)
class TaskConfig:
    """Knobs of the sample generator. ``min_offset`` is in pixels at a 64 px image size."""

    scene: SceneConfig = DEFAULT_SCENE
    num_objects: tuple[int, int] = (1, 4)  # objects per scene, inclusive range
    multi_images: tuple[int, int] = (2, 8)  # images of which_image / count_across, inclusive
    max_count_per_image: int = 2  # count_across: 0..this matching objects per image
    # count_across: the total is uniform on 1..min(this, max_count_per_image * images), spread over
    # the images at random (so the answer is a digit however many images there are)
    max_count_total: int = 8
    video_frames: tuple[int, int] = (4, 8)  # frames of a video sample, inclusive
    video_statics: tuple[int, int] = (1, 3)  # static objects of a video besides the actor
    min_offset: int = 8  # left/right is only asked when the centres are this far apart in x
    p_distractor: float = 0.5  # which_image: chance a wrong image holds a same-colour/shape object


DEFAULT_TASKS = TaskConfig()


@dataclass
class Draft:
    """A sample before rendering: its scenes, text and the objects the text names per image."""

    task: str
    family: str
    scenes: list[Scene]
    prompt: str
    answer: str
    # Per image: the objects the text names; None when it names every object (captions, "how many
    # shapes"); an empty list when it names none that occur there (labels then mark all objects).
    named: list[list[ShapeObject] | None]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One training/evaluation example. ``prompt`` holds exactly ``len(images)`` ``<image>``."""

    images: list[Image.Image]
    prompt: str
    answer: str
    family: str  # "caption" | "single" | "multi"
    task: str  # one of TASKS
    patch_labels: list[np.ndarray]  # float32 [num_patches] per image, raster order
    meta: dict[str, Any] = field(default_factory=dict)
    scenes: list[Scene] = field(default_factory=list)  # ground truth behind the images

    @property
    def text(self) -> str:
        """The full training text: prompt, a space, the answer."""
        return f"{self.prompt} {self.answer}"


def question_line(sample: Sample) -> str:
    """The text line of a sample's prompt (``"Question: ..."`` or the caption instruction): the
    inverse of :func:`make_prompt`'s ``text``."""
    return sample.prompt.split("\n")[-2]


class _Gen:
    """Random helpers bound to one generator, pair pool, image size and config."""

    def __init__(self, rng: np.random.Generator, pairs: Sequence[Pair], image_size: int, cfg: TaskConfig):
        self.rng, self.pairs, self.image_size, self.cfg = rng, tuple(pairs), image_size, cfg

    def pick(self, items: Sequence[Any]) -> Any:
        return items[int(self.rng.integers(len(items)))]

    def pair_by(self, axis: int) -> Pair:
        """A pair whose ``axis`` value (0: colour, 1: shape) is uniform over the values in the pool."""
        value = self.pick(sorted({p[axis] for p in self.pairs}))
        return self.pick([p for p in self.pairs if p[axis] == value])

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def scene(
        self,
        required: Sequence[Pair] = (),
        exclude: Callable[[Pair], bool] | None = None,
        min_objects: int = 1,
    ) -> Scene:
        """A scene with ``required`` objects; the other objects avoid pairs where ``exclude`` holds."""
        pool = [p for p in self.pairs if not (exclude and exclude(p))]
        lo = max(self.cfg.num_objects[0], min_objects, len(required))
        return sample_scene(
            self.rng,
            self.image_size,
            (lo, max(lo, self.cfg.num_objects[1])),
            pairs=pool,
            required=required,
            config=self.cfg.scene,
        )

    def num_images(self) -> int:
        lo, hi = self.cfg.multi_images
        return int(self.rng.integers(lo, hi + 1))


# Each generator returns (scenes, text line, answer, named objects per image, meta).
_Out = tuple[list[Scene], str, str, list[list[ShapeObject] | None], dict[str, Any]]


def question(text: str) -> str:
    """The text line of a question: ``"Question: " + text``."""
    return f"Question: {text}"


def _caption(g: _Gen) -> _Out:
    s = g.scene()
    return [s], CAPTION_TEXT, ", ".join(o.describe() for o in s.objects), [None], {}


def _color(g: _Gen) -> _Out:
    color, shape = g.pair_by(0)
    s = g.scene([(color, shape)], exclude=lambda p: p[1] == shape)
    return [s], question(f"what color is the {shape}?"), color, [s.find(shape=shape)], {}


def _shape(g: _Gen) -> _Out:
    color, shape = g.pair_by(1)
    s = g.scene([(color, shape)], exclude=lambda p: p[0] == color)
    return [s], question(f"what shape is the {color} object?"), shape, [s.find(color=color)], {}


def _count(g: _Gen) -> _Out:
    variant = g.pick(("all", "color", "shape"))
    if variant == "all":
        s = g.scene()
        return [s], question("how many shapes are there?"), str(len(s.objects)), [None], {"variant": variant}
    axis = 0 if variant == "color" else 1
    value = g.pair_by(axis)[axis]
    matching = [p for p in g.pairs if p[axis] == value]
    k = int(g.rng.integers(1, min(3, g.cfg.num_objects[1]) + 1))
    s = g.scene([g.pick(matching) for _ in range(k)], exclude=lambda p: p[axis] == value)
    named = s.find(color=value) if axis == 0 else s.find(shape=value)
    noun = f"{value} shapes" if axis == 0 else plural(value)
    return [s], question(f"how many {noun} are there?"), str(k), [named], {"variant": variant}


def _position(g: _Gen) -> _Out:
    i, j = (int(v) for v in g.rng.choice(len(g.pairs), size=2, replace=False))
    a, b = g.pairs[i], g.pairs[j]
    horizontal = g.chance(0.5)
    min_dx = g.cfg.min_offset * g.image_size / 64
    for _ in range(50):
        s = g.scene([a, b], exclude=lambda p: p in (a, b), min_objects=2)
        oa, ob = s.find(*a)[0], s.find(*b)[0]
        dx, dy = oa.center[0] - ob.center[0], oa.center[1] - ob.center[1]
        if not horizontal or abs(dx) >= min_dx:
            break
    else:
        horizontal = False  # rows always differ by >= min_row_gap, so above/below stays safe
    if horizontal:
        text, answer = (
            f"is the {a[0]} {a[1]} left or right of the {b[0]} {b[1]}?",
            "left" if dx < 0 else "right",
        )
    else:
        text, answer = (
            f"is the {a[0]} {a[1]} above or below the {b[0]} {b[1]}?",
            "above" if dy < 0 else "below",
        )
    return [s], question(text), answer, [[oa, ob]], {"axis": "x" if horizontal else "y"}


def _which_image(g: _Gen) -> _Out:
    n = g.num_images()
    target = g.pick(g.pairs)
    t = int(g.rng.integers(n))
    near = [p for p in g.pairs if p != target and (p[0] == target[0] or p[1] == target[1])]
    scenes, named = [], []
    for i in range(n):
        if i == t:
            required = [target]
        elif near and g.chance(g.cfg.p_distractor):
            required = [g.pick(near)]
        else:
            required = []
        s = g.scene(required, exclude=lambda p: p == target)
        scenes.append(s)
        named.append(s.find(*target))
    text = f"which image has {with_article(' '.join(target))}?"
    return scenes, question(text), f"image {t + 1}", named, {"target_image": t + 1}


def _changed(g: _Gen) -> _Out:
    edit = g.pick(("recolor", "removed", "added"))
    if edit == "recolor":
        recolorable = [p for p in g.pairs if any(q[1] == p[1] and q[0] != p[0] for q in g.pairs)]
        color, shape = g.pick(recolorable)
        new_color = g.pick([q[0] for q in g.pairs if q[1] == shape and q[0] != color])
        first = g.scene([(color, shape)], exclude=lambda p: p[1] == shape)
        obj = first.find(shape=shape)[0]
        second = first.recolored(obj, new_color)
        named = [[obj], second.find(shape=shape)]
    else:
        color, shape = g.pick(g.pairs)
        full = g.scene([(color, shape)], exclude=lambda p: p == (color, shape), min_objects=2)
        obj = full.find(color, shape)[0]
        first, second = (full, full.without(obj)) if edit == "removed" else (full.without(obj), full)
        named = [[obj], [obj]]
    answer = describe_change(first, second)
    assert answer is not None  # one edit by construction
    return [first, second], question(CHANGE_QUESTION), answer, named, {"edit": edit}


def _count_across(g: _Gen) -> _Out:
    n = g.num_images()
    axis = int(g.rng.integers(2))  # 0: colour, 1: shape
    value = g.pair_by(axis)[axis]
    matching = [p for p in g.pairs if p[axis] == value]
    cap = g.cfg.max_count_per_image
    total = int(g.rng.integers(1, min(g.cfg.max_count_total, cap * n) + 1))
    slots = g.rng.choice(cap * n, size=total, replace=False)  # `cap` slots per image
    ks = np.bincount(slots // cap, minlength=n)
    scenes, named = [], []
    for k in ks:
        s = g.scene([g.pick(matching) for _ in range(int(k))], exclude=lambda p: p[axis] == value)
        scenes.append(s)
        named.append(s.find(color=value) if axis == 0 else s.find(shape=value))
    noun = f"{value} shapes" if axis == 0 else plural(value)
    text = f"how many {noun} are there in all the images?"
    return scenes, question(text), str(int(ks.sum())), named, {"variant": ("color", "shape")[axis]}


def _same(g: _Gen) -> _Out:
    axis = int(g.rng.integers(2))  # 0: same colour of a shape, 1: same shape of a colour
    first = g.pick(g.pairs)
    key, attr = first[1 - axis], first[axis]  # key identifies the object, attr is compared
    others = [p[axis] for p in g.pairs if p[1 - axis] == key and p[axis] != attr]
    same = not others or g.chance(0.5)
    second_attr = attr if same else g.pick(others)
    second = (second_attr, key) if axis == 0 else (key, second_attr)
    scenes = [g.scene([pair], exclude=lambda p: p[1 - axis] == key) for pair in (first, second)]
    if axis == 0:
        text = f"is the {key} in image 1 the same color as the {key} in image 2?"
        named = [s.find(shape=key) for s in scenes]
    else:
        text = f"is the {key} object in image 1 the same shape as the {key} object in image 2?"
        named = [s.find(color=key) for s in scenes]
    return scenes, question(text), "yes" if same else "no", named, {"variant": ("color", "shape")[axis]}


def _video(g: _Gen) -> _Out:
    scenes, text, answer, named, meta = video_question(
        g.rng, g.pairs, g.image_size, g.cfg.video_frames, g.cfg.video_statics, g.cfg.scene)
    return scenes, question(text), answer, list(named), meta


_GENERATORS: dict[str, Callable[[_Gen], _Out]] = {
    "caption": _caption,
    "color": _color,
    "shape": _shape,
    "count": _count,
    "position": _position,
    "which_image": _which_image,
    "changed": _changed,
    "count_across": _count_across,
    "same": _same,
    "video": _video,
}


def draft_sample(
    task: str,
    rng: np.random.Generator,
    *,
    pairs: Sequence[Pair] = ALL_PAIRS,
    image_size: int = 64,
    config: TaskConfig = DEFAULT_TASKS,
) -> Draft:
    """Sample the scenes and text of a ``task`` sample; every object's (color, shape) is in ``pairs``."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    scenes, text, answer, named, meta = _GENERATORS[task](_Gen(rng, pairs, image_size, config))
    meta["num_objects"] = [len(s.objects) for s in scenes]
    prompt = make_prompt(len(scenes), text, video=TASK_FAMILY[task] == "video")
    return Draft(task, TASK_FAMILY[task], scenes, prompt, answer, named, meta)


def finish_sample(draft: Draft, patch_size: int = 8) -> Sample:
    """Render a draft's images and compute its selector labels for ``patch_size`` px patches."""
    return Sample(
        images=[render_scene(s) for s in draft.scenes],
        prompt=draft.prompt,
        answer=draft.answer,
        family=draft.family,
        task=draft.task,
        patch_labels=[
            scene_patch_labels(s, n, patch_size) for s, n in zip(draft.scenes, draft.named, strict=True)
        ],
        meta=draft.meta,
        scenes=draft.scenes,
    )


def make_sample(
    task: str,
    rng: np.random.Generator,
    *,
    pairs: Sequence[Pair] = ALL_PAIRS,
    image_size: int = 64,
    patch_size: int = 8,
    config: TaskConfig = DEFAULT_TASKS,
) -> Sample:
    """:func:`draft_sample` then :func:`finish_sample`."""
    return finish_sample(
        draft_sample(task, rng, pairs=pairs, image_size=image_size, config=config), patch_size
    )
