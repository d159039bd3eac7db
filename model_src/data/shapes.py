"""Seeded "shapes world" scenes: sampling, Pillow rendering and per-object masks.

Conventions
-----------
* Pixel coordinates are ``(x, y)`` with the origin at the top-left corner; arrays are indexed
  ``[y, x]``. Every length in :class:`SceneConfig` is given for a 64 px image and is scaled
  linearly to the requested ``image_size``.
* ``ShapeObject.bbox`` is ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive; ``center`` is the
  centre of that box. ``ShapeObject.mask`` is a bool array ``[image_size, image_size]``.
* ``Scene.objects`` are in *raster order*: top to bottom by centre row. The sampler keeps the
  centre rows of any two objects at least ``SceneConfig.min_row_gap`` px apart, so raster order,
  and "above"/"below", are never ambiguous.
* Objects never overlap (their boxes are at least ``min_gap`` px apart) and clutter keeps
  ``clutter_gap`` px away from every box, so an object's mask is exactly the set of pixels that
  :func:`render_scene` paints in its colour. Clutter (tiny grey dots and short thin lines) is
  never named, never counted and never part of a mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Pair = tuple[str, str]  # (color, shape)

# Six hues that stay distinct at 64 px and on every background tint.
COLORS: dict[str, RGB] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 90, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 65, 185),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
ALL_PAIRS: tuple[Pair, ...] = tuple((c, s) for c in COLORS for s in SHAPES)


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the scene sampler. Lengths are pixels at a 64 px image size."""

    small_px: tuple[int, int] = (11, 13)  # side of a small object's box, inclusive range
    large_px: tuple[int, int] = (18, 21)  # side of a large object's box, inclusive range
    p_large: float = 0.4
    border: int = 1  # min distance of a box from the image border
    min_gap: int = 2  # min distance between two boxes
    min_row_gap: int = 8  # min vertical distance between two object centres
    clutter: tuple[int, int] = (2, 5)  # number of clutter items, inclusive range
    clutter_gap: int = 2  # min distance between clutter and any box
    clutter_gray: tuple[int, int] = (130, 175)
    backgrounds: tuple[RGB, ...] = ((246, 246, 246), (236, 242, 250), (250, 246, 234), (238, 246, 238))
    # Reject layouts whose objects touch more than this fraction of the patches of a
    # ``coverage_patch`` px grid (the tiny model's 8 px ViT patches).
    max_coverage: float = 0.34
    coverage_patch: int = 8
    max_tries: int = 200  # layouts tried before giving up
    place_tries: int = 30  # positions tried per object or clutter item within one layout


DEFAULT_SCENE = SceneConfig()


@dataclass(eq=False)
class ShapeObject:
    """One named object of a scene. ``eq=False``: objects compare by identity."""

    shape: str
    color: str
    size: str  # "small" | "large"
    center: tuple[float, float]  # (x, y)
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
    mask: np.ndarray  # bool [H, W]
    track: int | None = None  # video frames: the same object in every frame has the same track

    @property
    def pair(self) -> Pair:
        return (self.color, self.shape)

    def describe(self) -> str:
        """The caption phrase, e.g. ``"a large red circle"``."""
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Clutter:
    """An unnamed distractor: a ``"dot"`` (filled box) or a thin ``"line"`` between two points."""

    kind: str
    xy: tuple[int, int, int, int]  # dot: (x0, y0, x1, y1) inclusive; line: (xa, ya, xb, yb)
    width: int
    gray: int


@dataclass
class Scene:
    """Objects in raster order, a plain background colour and clutter, at ``image_size`` px."""

    objects: list[ShapeObject]
    background: RGB
    clutter: list[Clutter] = field(default_factory=list)
    image_size: int = 64

    def find(self, color: str | None = None, shape: str | None = None) -> list[ShapeObject]:
        """Objects matching the given colour and/or shape (``None`` matches anything)."""
        return [
            o
            for o in self.objects
            if (color is None or o.color == color) and (shape is None or o.shape == shape)
        ]

    def masks(self) -> list[np.ndarray]:
        return [o.mask for o in self.objects]

    def without(self, obj: ShapeObject) -> Scene:
        """The same scene (background, clutter) with ``obj`` removed."""
        return replace(self, objects=[o for o in self.objects if o is not obj])

    def recolored(self, obj: ShapeObject, color: str) -> Scene:
        """The same scene with ``obj`` painted ``color`` (same shape, size, place and mask)."""
        objects = [replace(o, color=color) if o is obj else o for o in self.objects]
        return replace(self, objects=objects)


@cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """The read-only bool mask ``[side, side]`` of ``shape`` drawn to fill a ``side`` px box."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    e = side - 1
    mid = e / 2
    if shape == "circle":
        draw.ellipse((0, 0, e, e), fill=1)
    elif shape == "square":
        inset = round(side * 0.08)  # a full-box square would look bigger than the other shapes
        draw.rectangle((inset, inset, e - inset, e - inset), fill=1)
    elif shape == "triangle":
        draw.polygon([(mid, 0), (e, e), (0, e)], fill=1)
    elif shape == "diamond":
        draw.polygon([(mid, 0), (e, mid), (mid, e), (0, mid)], fill=1)
    elif shape == "cross":
        t = round(side / 3)
        draw.rectangle((0, t, e, e - t), fill=1)
        draw.rectangle((t, 0, e - t, e), fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = np.asarray(img, dtype=bool).copy()
    mask.setflags(write=False)
    return mask


def make_object(
    shape: str, color: str, size: str, side: int, x0: int, y0: int, image_size: int
) -> ShapeObject:
    """An object whose ``side`` px box has its top-left corner at ``(x0, y0)``."""
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {tuple(COLORS)}")
    if not (0 <= x0 and 0 <= y0 and x0 + side <= image_size and y0 + side <= image_size):
        raise ValueError(f"box at ({x0}, {y0}) of side {side} leaves the {image_size} px image")
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = shape_mask(shape, side)
    center = (x0 + (side - 1) / 2, y0 + (side - 1) / 2)
    return ShapeObject(shape, color, size, center, (x0, y0, x0 + side, y0 + side), mask)


def _px(value: int, scale: float) -> int:
    return max(1, round(value * scale))


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Whether two exclusive boxes are at least ``gap`` px apart along some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _coverage(objects: Sequence[ShapeObject], image_size: int, patch: int) -> float:
    grid = image_size // patch
    union = np.zeros((image_size, image_size), dtype=bool)
    for o in objects:
        union |= o.mask
    union = union[: grid * patch, : grid * patch]
    return float(union.reshape(grid, patch, grid, patch).any(axis=(1, 3)).mean())


def _place(
    rng: np.random.Generator, pairs: Sequence[Pair], image_size: int, cfg: SceneConfig,
    avoid: Sequence[tuple[int, int, int, int]] = (),
) -> list[ShapeObject] | None:
    """Sizes and positions for ``pairs`` that keep ``min_gap`` px from each other and from the
    ``avoid`` boxes, with centre rows ``min_row_gap`` px from each other's and the avoided boxes'
    (raster order of objects stays unambiguous); ``None`` when one does not fit."""
    scale = image_size / 64
    border, gap, row_gap = _px(cfg.border, scale), _px(cfg.min_gap, scale), _px(cfg.min_row_gap, scale)
    placed: list[ShapeObject] = []
    for color, shape in pairs:
        size = "large" if rng.random() < cfg.p_large else "small"
        lo, hi = cfg.large_px if size == "large" else cfg.small_px
        side = int(rng.integers(_px(lo, scale), _px(hi, scale) + 1))
        corners = rng.integers(border, image_size - border - side + 1, size=(cfg.place_tries, 2)).tolist()
        for x0, y0 in corners:
            box = (x0, y0, x0 + side, y0 + side)
            cy = y0 + (side - 1) / 2
            others = [*avoid, *(o.bbox for o in placed)]
            if all(_apart(box, b, gap) and abs(cy - (b[1] + b[3] - 1) / 2) >= row_gap for b in others):
                placed.append(make_object(shape, color, size, side, x0, y0, image_size))
                break
        else:
            return None
    return placed


def _sample_clutter(
    rng: np.random.Generator, objects: Sequence[ShapeObject], image_size: int, cfg: SceneConfig
) -> list[Clutter]:
    scale = image_size / 64
    gap = _px(cfg.clutter_gap, scale)
    dot, width = _px(2, scale) - 1, _px(1, scale)
    items: list[Clutter] = []
    for _ in range(int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))):
        gray = int(rng.integers(cfg.clutter_gray[0], cfg.clutter_gray[1] + 1))
        tries = cfg.place_tries
        starts = rng.integers(0, image_size, size=(tries, 2)).tolist()
        is_dot = (rng.random(tries) < 0.5).tolist()
        lengths = rng.integers(4, 8, size=tries).tolist()
        directions = rng.integers(4, size=tries).tolist()
        for (x, y), dotted, length, direction in zip(starts, is_dot, lengths, directions, strict=True):
            if dotted:
                kind, xy, w = "dot", (x, y, x + dot, y + dot), 1
            else:
                dx, dy = ((1, 0), (0, 1), (1, 1), (1, -1))[direction]
                n = _px(length, scale) - 1
                kind, xy, w = "line", (x, y, x + dx * n, y + dy * n), width
            box = (min(xy[0], xy[2]), min(xy[1], xy[3]), max(xy[0], xy[2]) + w, max(xy[1], xy[3]) + w)
            inside = box[0] >= 0 and box[1] >= 0 and box[2] <= image_size and box[3] <= image_size
            if inside and all(_apart(box, o.bbox, gap) for o in objects):
                items.append(Clutter(kind, xy, w, gray))
                break
    return items


def sample_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    num_objects: int | tuple[int, int] = (1, 4),
    *,
    pairs: Sequence[Pair] = ALL_PAIRS,
    required: Sequence[Pair] = (),
    config: SceneConfig = DEFAULT_SCENE,
) -> Scene:
    """Sample a scene: ``required`` (color, shape) objects plus random ones drawn from ``pairs``.

    ``num_objects`` is an exact count or an inclusive ``(lo, hi)`` range (uniform); the scene
    holds at least ``len(required)`` objects. Sizes are ``small`` or ``large``; layouts that
    overlap, break the row gap or cover too many patches are rejected and re-drawn.
    """
    lo, hi = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
    n = max(int(rng.integers(lo, hi + 1)), len(required))
    free = (
        [pairs[int(i)] for i in rng.integers(len(pairs), size=n - len(required))] if n > len(required) else []
    )
    chosen = list(required) + free
    patch = _px(config.coverage_patch, image_size / 64)
    for _ in range(config.max_tries):
        objects = _place(rng, chosen, image_size, config)
        if objects is not None and _coverage(objects, image_size, patch) <= config.max_coverage:
            break
    else:
        raise RuntimeError(f"could not lay out {chosen} in {config.max_tries} tries at {image_size} px")
    objects.sort(key=lambda o: o.center[1])
    background = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    return Scene(objects, background, _sample_clutter(rng, objects, image_size, config), image_size)


def render_scene(scene: Scene, image_size: int | None = None) -> Image.Image:
    """Render ``scene`` as an RGB image of ``scene.image_size`` px: background, clutter, objects.

    Objects are painted exactly on their masks (flat colour, no anti-aliasing). ``image_size``, if
    given, must equal ``scene.image_size``: masks exist at one size, so sample at the size you need.
    """
    if image_size is not None and image_size != scene.image_size:
        raise ValueError(f"scene was sampled at {scene.image_size} px, not {image_size}; sample it again")
    img = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for c in scene.clutter:
        fill = (c.gray, c.gray, c.gray)
        if c.kind == "dot":
            draw.rectangle(c.xy, fill=fill)
        else:
            draw.line(c.xy, fill=fill, width=c.width)
    pixels = np.array(img)
    for o in scene.objects:
        pixels[o.mask] = COLORS[o.color]
    return Image.fromarray(pixels, "RGB")
