"""Count questions read back from their text, against the scenes behind the images.

``how many {shapes | red shapes | circles} are there[ in image k | in all the images]?`` (and
``in frame k`` for a video's frames): which objects such a question counts, in which image, and
per image for a count across images. Stage 4's attention targets, the evaluator's tally report
and ``tools.count_probe`` all read counts this way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from maven_edge.model_src.data.shapes import COLORS, SHAPES, Scene, ShapeObject
from maven_edge.model_src.data.tasks import plural

COUNT_QUESTION = re.compile(r"how many (.+) are there(?: in (?:image|frame) (\d)| (in all the images))?\?")
_SHAPE_OF_PLURAL = {plural(s): s for s in SHAPES}

Counted = list[tuple[int, ShapeObject]]  # (image index, object)


def _match(question: str) -> re.Match[str] | None:
    """A count question's parts, from its line or the text after ``"Question: "``; None otherwise."""
    return COUNT_QUESTION.fullmatch(question.removeprefix("Question: "))


def matching_objects(scenes: Sequence[Scene], images: Sequence[int], color: str | None, shape: str | None) -> Counted:
    """The (image index, object) pairs of ``images`` matching ``color`` / ``shape`` (None: any)."""
    return [(k, o) for k in images if k < len(scenes) for o in scenes[k].find(color=color, shape=shape)]


def counted_objects(question: str, scenes: Sequence[Scene]) -> list[Counted] | None:
    """A count question (its line, or the text after ``"Question: "``): ``[objects]`` with every
    object it counts (all images for "in all the images", image k for "in image k", else the only
    image), ``[]`` when it counts nothing, None when ``question`` is not a count question."""
    m = _match(question)
    if not m:
        return None
    noun = m.group(1)
    if noun == "shapes":
        color = shape = None
    elif noun.endswith(" shapes") and noun.removesuffix(" shapes") in COLORS:
        color, shape = noun.removesuffix(" shapes"), None
    elif noun in _SHAPE_OF_PLURAL:
        color, shape = None, _SHAPE_OF_PLURAL[noun]
    else:
        return []
    if m.group(2):
        images = [int(m.group(2)) - 1]
    elif m.group(3) or len(scenes) == 1:
        images = list(range(len(scenes)))
    else:
        return []
    found = matching_objects(scenes, images, color, shape)
    return [found] if found else []


def counts_across(question: str) -> bool:
    """Whether a question line counts across all the images ("... in all the images?")."""
    m = _match(question)
    return bool(m and m.group(3))


def counted_image(question: str) -> int | None:
    """The image index a count question line asks about (``"Question: how many red shapes are
    there in image 3?"``: 2); None for any other question."""
    m = _match(question)
    return int(m.group(2)) - 1 if m and m.group(2) else None


def per_image_counts(question: str, scenes: Sequence[Scene]) -> list[int] | None:
    """How many objects a count question line over all the images (``"Question: how many red
    shapes are there in all the images?"``) counts in each image; None for any other question."""
    if not counts_across(question):
        return None
    counts = [0] * len(scenes)
    for k, _ in (counted_objects(question, scenes) or [[]])[0]:
        counts[k] += 1
    return counts
