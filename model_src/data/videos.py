"""Shapes-world videos: scenes that change over frames, and the questions asked about them.

A video is a list of frames (:class:`~maven_edge.model_src.data.shapes.Scene`, one per frame, 4-8
frames by default) of one scene: a few *static* objects and one *actor* to which one event
happens:

* ``moved``: the actor slides left, right, up or down, the same step every frame (at least
  16 px in all, so it crosses two 8 px patches), from frame 1 to the last frame;
* ``recolor``: from frame ``t`` on (``2 <= t <= n``) the actor has another colour;
* ``appeared``: the actor is missing from the frames before ``t`` and shows from ``t`` on;
* ``disappeared``: the actor shows in the frames before ``t`` and is gone from ``t`` on.

Every frame keeps the background, but its clutter (tiny grey dots and lines, never named) is drawn
anew, as sensor noise would be, so no two frames are identical and a decoder that drops identical
consecutive frames (:mod:`maven_edge.core.video`) keeps every frame of a rendered video.
Objects carry a ``track``: the same object has the same track in every frame (a moved object is a
new :class:`ShapeObject` per frame).

Uniqueness: static objects never share the actor's shape or any of its colours, and no two static
objects share a colour-shape pair, so "the red circle" names one object of the whole video and
"how many frames show a circle?" counts the actor's frames only.

Questions (``Question: ...``) and answers:

* ``event``: "what happened to the {color} {shape}?" (the colour it has when it first shows) ->
  ``it moved left`` / ``right`` / ``up`` / ``down``, ``it turned blue``, ``it appeared``, ``it
  disappeared``; ``nothing`` for a static object (follow-ups only);
* ``first_frame``: "in which frame does the {color} {shape} first appear?" -> ``frame 3``;
* ``frame_count``: "how many frames show a {shape}?" / "how many frames show a {color} shape?" ->
  a digit, the number of frames in which at least one such object shows.

The prompt labels the frames ``Frame 1: <image>`` ... (:func:`frame_block`), like the ``Image k:``
labels of multi-image prompts, also for a one-frame video.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maven_edge.model_src.data.shapes import (
    COLORS,
    SHAPES,
    Pair,
    Scene,
    SceneConfig,
    ShapeObject,
    _place,
    _px,
    _sample_clutter,
    make_object,
)

EVENTS: tuple[str, ...] = ("moved", "recolor", "appeared", "disappeared")
VARIANTS: tuple[str, ...] = ("event", "first_frame", "frame_count")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MIN_TRAVEL = 16  # px at 64 px: a moved object crosses at least two 8 px patches

EVENT_QUESTION = re.compile(r"what happened to the (\w+) (\w+)\?")
FIRST_QUESTION = re.compile(r"in which frame does the (\w+) (\w+) first appear\?")
# "how many frames show a red shape?" (group 1: colour) / "... show a circle?" (group 2: shape)
COUNT_QUESTION = re.compile(r"how many frames show an? (?:(\w+) shape|(\w+))\?")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def event_question(color: str, shape: str) -> str:
    return f"what happened to the {color} {shape}?"


def first_question(color: str, shape: str) -> str:
    return f"in which frame does the {color} {shape} first appear?"


def count_question(color: str | None = None, shape: str | None = None) -> str:
    if shape is not None:
        return f"how many frames show {_article(shape)} {shape}?"
    assert color is not None
    return f"how many frames show {_article(color)} {color} shape?"


# ---- ground truth from the frames ------------------------------------------------------------------
def tracks(frames: Sequence[Scene]) -> dict[int, list[tuple[int, ShapeObject]]]:
    """track -> [(frame index, object)] over the frames it shows in, in frame order."""
    out: dict[int, list[tuple[int, ShapeObject]]] = {}
    for k, s in enumerate(frames):
        for o in s.objects:
            if o.track is not None:
                out.setdefault(o.track, []).append((k, o))
    return out


def find_track(frames: Sequence[Scene], color: str, shape: str) -> list[tuple[int, ShapeObject]] | None:
    """The track of the object that is a ``color`` ``shape`` when it first shows (None if no object,
    or more than one, is)."""
    found = [t for t in tracks(frames).values() if t[0][1].pair == (color, shape)]
    return found[0] if len(found) == 1 else None


def what_happened(track: Sequence[tuple[int, ShapeObject]], num_frames: int) -> str:
    """The ``event`` answer for an object's track (``nothing`` for a static object)."""
    (k0, first), (k1, last) = track[0], track[-1]
    if k0 > 0:
        return "it appeared"
    if k1 < num_frames - 1:
        return "it disappeared"
    if last.color != first.color:
        return f"it turned {last.color}"
    dx, dy = last.center[0] - first.center[0], last.center[1] - first.center[1]
    if max(abs(dx), abs(dy)) < 1:
        return "nothing"
    if abs(dx) >= abs(dy):
        return "it moved right" if dx > 0 else "it moved left"
    return "it moved down" if dy > 0 else "it moved up"


def first_frame(frames: Sequence[Scene], color: str, shape: str) -> int | None:
    """1-based number of the first frame showing a ``color`` ``shape`` (None if none does)."""
    for k, s in enumerate(frames):
        if s.find(color, shape):
            return k + 1
    return None


def frames_showing(frames: Sequence[Scene], color: str | None = None, shape: str | None = None) -> int:
    """How many frames show at least one object of that colour and/or shape."""
    return sum(1 for s in frames if s.find(color=color, shape=shape))


# ---- sampling ---------------------------------------------------------------------------------------
def _place_static(
    rng: np.random.Generator, pairs: Sequence[Pair], avoid: Sequence[tuple[int, int, int, int]],
    image_size: int, cfg: SceneConfig,
) -> list[ShapeObject] | None:
    """Sizes and positions for ``pairs`` clear of the ``avoid`` boxes (the actor's places in every
    frame), so every frame keeps the scenes' raster-order rule; None when one does not fit."""
    return _place(rng, pairs, image_size, cfg, avoid=avoid)


def _actor_path(
    rng: np.random.Generator, pair: Pair, n: int, moved: str | None, image_size: int, cfg: SceneConfig
) -> list[ShapeObject]:
    """The actor in each of ``n`` frames: one place, or (``moved``: a direction) a straight slide
    of at least ``MIN_TRAVEL`` px in equal steps."""
    scale = image_size / 64
    border = _px(cfg.border, scale)
    size = "large" if rng.random() < cfg.p_large else "small"
    lo, hi = cfg.large_px if size == "large" else cfg.small_px
    side = int(rng.integers(_px(lo, scale), _px(hi, scale) + 1))
    top = image_size - border - side  # largest corner coordinate
    x0, y0 = (int(v) for v in rng.integers(border, top + 1, size=2))
    if moved is None:
        return [make_object(pair[1], pair[0], size, side, x0, y0, image_size)] * n
    ux, uy = DIRECTIONS[moved]
    travel_min = _px(MIN_TRAVEL, scale)
    travel = int(rng.integers(travel_min, top - border + 1))
    # a start from which `travel` px in the direction stays inside the image
    start = [x0, y0]
    for axis, u in ((0, ux), (1, uy)):
        if u > 0:
            start[axis] = int(rng.integers(border, top - travel + 1))
        elif u < 0:
            start[axis] = int(rng.integers(border + travel, top + 1))
    out = []
    for k in range(n):
        f = k / (n - 1)
        x, y = round(start[0] + ux * travel * f), round(start[1] + uy * travel * f)
        out.append(make_object(pair[1], pair[0], size, side, x, y, image_size))
    return out


def sample_video(
    rng: np.random.Generator,
    pairs: Sequence[Pair],
    image_size: int = 64,
    frames: tuple[int, int] = (4, 8),
    statics: tuple[int, int] = (1, 3),
    event: str | None = None,
    config: SceneConfig | None = None,
) -> tuple[list[Scene], str, int]:
    """(frames, event, change frame ``t``, 1-based; 1 for ``moved``): a video of one actor and
    1-3 static objects, all of colour-shape pairs from ``pairs`` (module docstring)."""
    from maven_edge.model_src.data.shapes import DEFAULT_SCENE

    cfg = config or DEFAULT_SCENE
    n = int(rng.integers(frames[0], frames[1] + 1))
    event = event or EVENTS[int(rng.integers(len(EVENTS)))]
    recolorable = [p for p in pairs if any(q[1] == p[1] and q[0] != p[0] for q in pairs)]
    candidates = recolorable if event == "recolor" else list(pairs)
    actor = candidates[int(rng.integers(len(candidates)))]
    new_color = None
    if event == "recolor":
        options = [q[0] for q in pairs if q[1] == actor[1] and q[0] != actor[0]]
        new_color = options[int(rng.integers(len(options)))]
    colors = {actor[0], new_color}
    pool = [p for p in pairs if p[1] != actor[1] and p[0] not in colors]
    m = min(int(rng.integers(statics[0], statics[1] + 1)), len(pool))
    t = int(rng.integers(2, n + 1)) if event != "moved" else 1
    moved = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))] if event == "moved" else None
    for attempt in range(cfg.max_tries):
        path = _actor_path(rng, actor, n, moved, image_size, cfg)
        k = max(0, m - attempt // 40)  # a long vertical slide may leave no room: fewer statics
        chosen = [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)] if k else []
        placed = _place_static(rng, chosen, sorted({o.bbox for o in path}), image_size, cfg)
        if placed is not None:
            break
    else:
        raise RuntimeError(f"could not lay out a {event} video of {actor} in {cfg.max_tries} tries")
    statics_t = [replace(o, track=i) for i, o in enumerate(placed)]
    actor_track = len(statics_t)
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    scenes = []
    for k in range(n):
        objs = list(statics_t)
        shows = not ((event == "appeared" and k + 1 < t) or (event == "disappeared" and k + 1 >= t))
        if shows:
            a = path[k]
            color = new_color if event == "recolor" and k + 1 >= t else a.color
            objs.append(replace(a, color=color, track=actor_track))
        objs.sort(key=lambda o: o.center[1])
        clutter = _sample_clutter(rng, [*statics_t, *path], image_size, cfg)
        scenes.append(Scene(objs, background, clutter, image_size))
    return scenes, event, t


def video_question(
    rng: np.random.Generator, pairs: Sequence[Pair], image_size: int = 64,
    frames: tuple[int, int] = (4, 8), statics: tuple[int, int] = (1, 3), config: SceneConfig | None = None,
) -> tuple[list[Scene], str, str, list[list[ShapeObject]], dict]:
    """(frames, question text, answer, named objects per frame, meta) of a ``video`` sample: the
    variant (``event``, ``first_frame``, ``frame_count``) is uniform; ``event`` asks about the actor;
    ``first_frame`` about an actor that appears (3 in 4) or an object shown from frame 1;
    ``frame_count`` about the actor's shape or colour (appeared / disappeared: either; recolor: its
    first or its new colour), or (1 in 5) a static object's, which every frame shows."""
    variant = VARIANTS[int(rng.integers(len(VARIANTS)))]
    if variant == "event":
        event = None
    elif variant == "first_frame":
        event = "appeared" if rng.random() < 0.75 else None
    else:
        event = ("appeared", "disappeared", "recolor")[int(rng.integers(3))]
    scenes, event, t = sample_video(rng, pairs, image_size, frames, statics, event, config)
    n = len(scenes)
    all_tracks = tracks(scenes)
    actor = all_tracks[max(all_tracks)]
    statics_ = [all_tracks[k] for k in sorted(all_tracks) if k != max(all_tracks)]
    meta = {"variant": variant, "event": event, "change_frame": t, "num_frames": n}
    if variant == "event":
        color, shape = actor[0][1].pair
        named = _track_per_frame(actor, n)
        return scenes, event_question(color, shape), what_happened(actor, n), named, meta
    if variant == "first_frame":
        if event == "appeared":
            track = actor
        else:
            candidates = [tr for tr in [actor, *statics_] if tr[0][0] == 0]
            track = candidates[int(rng.integers(len(candidates)))]
        color, shape = track[0][1].pair
        answer = first_frame(scenes, color, shape)
        assert answer is not None
        named = [s.find(color, shape) for s in scenes]
        return scenes, first_question(color, shape), f"frame {answer}", named, meta
    # frame_count
    if statics_ and rng.random() < 0.2:
        obj = statics_[int(rng.integers(len(statics_)))][0][1]
        by_shape = bool(rng.random() < 0.5)
        color, shape = (None, obj.shape) if by_shape else (obj.color, None)
    elif event == "recolor":
        color, shape = (actor[0][1].color if rng.random() < 0.5 else actor[-1][1].color), None
    elif rng.random() < 0.5:
        color, shape = None, actor[0][1].shape
    else:
        color, shape = actor[0][1].color, None
    meta["counted"] = "shape" if shape else "color"
    named = [s.find(color=color, shape=shape) for s in scenes]
    answer = str(frames_showing(scenes, color, shape))
    return scenes, count_question(color, shape), answer, named, meta


def _track_per_frame(track: Sequence[tuple[int, ShapeObject]], n: int) -> list[list[ShapeObject]]:
    per: list[list[ShapeObject]] = [[] for _ in range(n)]
    for k, o in track:
        per[k].append(o)
    return per


# ---- follow-up questions --------------------------------------------------------------------------
def video_followups(frames: Sequence[Scene]) -> dict[str, list[tuple[str, str]]]:
    """task -> (question text, answer) pairs about a video's frames, from its ground truth: what
    happened to each object, the first frame of each colour-shape pair, and how many frames show
    each shape and colour that shows."""
    n = len(frames)
    out: dict[str, list[tuple[str, str]]] = {"event": [], "first_frame": [], "frame_count": []}
    for track in tracks(frames).values():
        color, shape = track[0][1].pair
        if find_track(frames, color, shape) is not None:
            out["event"].append((event_question(color, shape), what_happened(track, n)))
    seen = sorted({o.pair for s in frames for o in s.objects})
    for color, shape in seen:
        if sum(1 for tr in tracks(frames).values() if any(o.pair == (color, shape) for _, o in tr)) == 1:
            k = first_frame(frames, color, shape)
            out["first_frame"].append((first_question(color, shape), f"frame {k}"))
    for shape in SHAPES:
        if c := frames_showing(frames, shape=shape):
            out["frame_count"].append((count_question(shape=shape), str(c)))
    for color in COLORS:
        if c := frames_showing(frames, color=color):
            out["frame_count"].append((count_question(color=color), str(c)))
    return out


# ---- real video files (tests and the demo) --------------------------------------------------------
VIDEO_CODECS: dict[str, tuple[str, str]] = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm")}


def write_video(
    frames: Sequence[Image.Image],
    path: str | Path,
    codec: str = "h264",
    seconds_per_frame: float = 1.0,
    rate: int = 4,
    scale: int = 4,
) -> Path:
    """Encode ``frames`` (PIL images) as a real video file with PyAV: H.264 in MP4 (``"h264"``) or
    VP9 in WebM (``"vp9"``), ``rate`` frames per second, each picture shown for
    ``seconds_per_frame`` seconds (so decoding at 1 fps gives one frame per picture, and a higher
    rate repeats pictures the decoder's de-duplication drops), enlarged ``scale`` times (nearest
    neighbour, so a 64 px scene stays sharp under 4:2:0 chroma subsampling). Needs PyAV."""
    import av

    if codec not in VIDEO_CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {tuple(VIDEO_CODECS)}")
    repeats = max(1, round(seconds_per_frame * rate))
    w, h = frames[0].size
    size = (w * scale + (w * scale) % 2, h * scale + (h * scale) % 2)  # 4:2:0 needs even sides
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(VIDEO_CODECS[codec][0], rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"} if codec == "h264" else {"crf": "10", "b": "0", "deadline": "good"}
        for im in frames:
            frame = av.VideoFrame.from_image(im.convert("RGB").resize(size, Image.Resampling.NEAREST))
            for _ in range(repeats):
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video_sample(sample: Any, out_dir: str | Path, stem: str = "video", codecs: Sequence[str] = ("h264", "vp9"),
                       **kwargs: Any) -> dict[str, Any]:
    """Write a ``video`` sample's frames as ``{stem}.mp4`` / ``{stem}.webm`` (:func:`write_video`) and
    ``{stem}.json`` (the files, question, answer, task and frame count); returns the JSON content."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_video(sample.images, out / f"{stem}{VIDEO_CODECS[c][1]}", c, **kwargs).name for c in codecs]
    text = sample.prompt.split("\n")[-2].removeprefix("Question: ")
    info = {"videos": files, "question": text, "answer": sample.answer, "task": sample.task,
            "variant": sample.meta.get("variant"), "frames": len(sample.images),
            "seconds_per_frame": kwargs.get("seconds_per_frame", 1.0)}
    (out / f"{stem}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
