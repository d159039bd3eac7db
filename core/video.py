"""Torch-free video decoding for video questions: sampled, de-duplicated frames with bounded memory.

    vf = frames_from_video("clip.mp4", fps=1.0, max_frames=8)
    vf.frames          # list of PIL RGB images, in time order
    vf.timestamps      # seconds of each kept frame
    prompt = video_prompt(len(vf.frames), "what happened to the red circle?")
    # 'Frame 1: <image>\\nFrame 2: <image>\\n...\\nQuestion: what happened to the red circle?\\nAnswer:'

Decoding uses PyAV (``pip install av``, or ``maven-edge[video]``; its wheels bundle FFmpeg), imported
only when a video is decoded. The video is decoded **frame by frame**: only the frames that are
kept are converted and held (and, with ``max_side``, downscaled at once), so memory does not grow
with the video's length.

Sampling: one frame per ``1 / fps`` seconds, the first decoded frame at or after each target
time ``(j + 1/2) / fps`` (the middle of each interval). When the video is long enough to give more
than ``max_frames`` frames at that rate and its duration is known, the rate is lowered so that
``max_frames`` frames spread over the whole video; when its duration is unknown, decoding stops
after ``max_frames`` frames (``VideoFrames.truncated``).

De-duplication: a kept frame identical to the previous kept one is dropped. Frames are compared as
thumbnails of ``dedup_size`` px (box-filtered; the tiny model's input size), and count as identical
when no thumbnail pixel differs by more than ``dedup_tolerance`` levels. Not an exact hash: a
lossy codec decodes repeats of one still picture a little differently (measured on H.264 and VP9
files of the shapes videos: repeats differ by at most 3 levels in the 64 px thumbnail, two
different pictures by 105 or more), so a hash would keep most duplicates; ``dedup_tolerance=0`` is
the exact comparison.

Every bad input raises a one-line :class:`~maven_edge.core.errors.VideoError` that names the video
and says what to do: not a video (or no video stream), truncated or corrupt, zero frames, absurd
dimensions, duration or frame counts (:class:`VideoLimits`), more frames than the context holds
(:func:`check_frames_fit`), PyAV missing. No PyAV, FFmpeg or OS exception escapes.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from maven_edge.core.errors import MavenError, VideoError
from maven_edge.core.prompt import frame_block as prompt_frame_block
from maven_edge.core.prompt import make_prompt

__all__ = [
    "VideoFrames",
    "VideoLimits",
    "VideoSource",
    "check_frames_fit",
    "frame_block",
    "frames_from_video",
    "frames_that_fit",
    "video_prompt",
]

#: Anything :func:`frames_from_video` accepts: a path, the encoded bytes, or a binary file object.
VideoSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True)
class VideoLimits:
    """What a video may be before it is refused (checked from the header where it says, and again
    while decoding, so a lying header does not get past)."""

    max_bytes: int = 2 << 30  # encoded size (paths and bytes)
    max_side: int = 8192  # width and height, pixels
    max_pixels: int = 8192 * 4320  # width x height (8K)
    max_duration_s: float = 4 * 3600.0
    max_decoded_frames: int = 1_000_000  # frames decoded before giving up (absurd frame counts)
    max_frames: int = 64  # frames kept, whatever max_frames a caller asks for

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_side", "max_pixels", "max_decoded_frames", "max_frames"):
            if int(getattr(self, name)) < 1:
                raise VideoError(f"VideoLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_duration_s > 0:
            raise VideoError(f"VideoLimits.max_duration_s must be > 0, got {self.max_duration_s}")


DEFAULT_LIMITS = VideoLimits()


@dataclass
class VideoFrames:
    """The frames kept from a video, in time order, and what decoding saw."""

    frames: list[Image.Image]  # RGB
    timestamps: list[float]  # seconds, one per frame
    width: int  # the video's frame size
    height: int
    codec: str
    duration_s: float | None  # None when the container does not say
    source_fps: float | None  # the stream's average frame rate, None when unknown
    fps: float  # the sampling rate used (lower than asked when max_frames spread over the video)
    decoded: int  # frames decoded
    sampled: int  # frames the sampler picked, before de-duplication
    duplicates: int  # picked frames dropped as identical to the previous kept one
    truncated: bool = False  # unknown duration: stopped after max_frames frames
    meta: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Everything but the frames, JSON-ready (for result records and logs)."""
        return {"frames": len(self.frames), "timestamps": [round(t, 3) for t in self.timestamps],
                "width": self.width, "height": self.height, "codec": self.codec,
                "duration_s": self.duration_s, "source_fps": self.source_fps, "fps": self.fps,
                "decoded": self.decoded, "sampled": self.sampled, "duplicates": self.duplicates,
                "truncated": self.truncated, **self.meta}


def frame_block(num_frames: int) -> str:
    """The frames of a video prompt: one ``Frame k: <image>`` line per frame (k from 1), the layout
    the tiny model's video questions are trained on."""
    if num_frames < 1:
        raise VideoError("a video prompt needs at least one frame")
    return prompt_frame_block(num_frames)


def video_prompt(num_frames: int, question: str) -> str:
    """``Frame 1: <image>`` ... lines, ``Question: {question}`` and ``Answer:``, one per line (the
    training layout of the shipped model's video questions)."""
    if num_frames < 1:
        raise VideoError("a video prompt needs at least one frame")
    return make_prompt(num_frames, f"Question: {question.strip()}", video=True)


def frames_that_fit(tokens_per_frame: int, text_tokens: int, max_new_tokens: int, context: int) -> int:
    """How many frames of ``tokens_per_frame`` visual tokens (markers excluded) fit in ``context``
    positions beside ``text_tokens`` prompt tokens (the ``Frame k:`` labels included) and
    ``max_new_tokens``."""
    room = context - text_tokens - max_new_tokens
    return max(0, room // (tokens_per_frame + 2))


def check_frames_fit(num_frames: int, tokens_per_frame: int, text_tokens: int, max_new_tokens: int,
                     context: int) -> None:
    """A VideoError unless ``num_frames`` frames fit (:func:`frames_that_fit`); say it before decoding
    with ``max_frames`` to refuse a request early."""
    fit = frames_that_fit(tokens_per_frame, text_tokens, max_new_tokens, context)
    if num_frames > fit:
        raise VideoError(
            f"{num_frames} frames x {tokens_per_frame + 2} visual tokens + {text_tokens} text + {max_new_tokens} "
            f"new tokens exceed the context of {context} positions (at most {fit} frames fit); lower "
            "--max-frames or --fps, or use a visual-token budget"
        )


def _label(source: object, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return f"video {os.fspath(source)!r}"
    return "the video"


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise VideoError("video input needs PyAV: pip install av (or maven-edge[video])") from exc
    return av


def _open_source(source: object, label: str, limits: VideoLimits) -> BinaryIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise VideoError(f"{label} is {len(data)} bytes, over the limit of {limits.max_bytes}")
        if not data:
            raise VideoError(f"{label} is empty (0 bytes); send the video file's content")
        return io.BytesIO(data)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            size = os.path.getsize(path)
            if not os.path.isfile(path):
                raise VideoError(f"{label} is not a file")
        except OSError as exc:
            raise VideoError(f"cannot read {label}: {exc.strerror or exc}; check the path") from exc
        if size == 0:
            raise VideoError(f"{label} is empty (0 bytes)")
        if size > limits.max_bytes:
            raise VideoError(f"{label} is {size} bytes, over the limit of {limits.max_bytes}")
        try:
            return open(path, "rb")  # noqa: SIM115 (closed by frames_from_video)
        except OSError as exc:
            raise VideoError(f"cannot read {label}: {exc.strerror or exc}; check the path") from exc
    if hasattr(source, "read"):
        return source  # type: ignore[return-value]
    raise VideoError(f"{label}: expected a path, bytes or a binary file object, got {type(source).__name__}")


def _check_size(width: int, height: int, label: str, limits: VideoLimits) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(f"{label} has frames of {width}x{height} pixels; it is broken or not a video")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise VideoError(
            f"{label} is {width}x{height} pixels, over the limit of {limits.max_side} px a side / "
            f"{limits.max_pixels} pixels; downscale it first"
        )


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        d = float(stream.duration * stream.time_base)
        if d > 0:
            return d
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _thumbnail(im: Image.Image, size: int) -> np.ndarray:
    """int16 [size, size, 3]: the frame box-filtered to ``size`` px (what de-duplication compares)."""
    return np.asarray(im.resize((size, size), Image.Resampling.BOX), dtype=np.int16)


def _downscale(im: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(im.size) <= max_side:
        return im
    scale = max_side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _decoded(container: Any, stream: Any, av: Any, label: str, count: list[int]) -> Iterator[Any]:
    """The stream's frames one by one; decoding errors become VideoErrors."""
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                count[0] += 1
                yield frame
    except av.FFmpegError as exc:
        if count[0] == 0:
            raise VideoError(f"{label} cannot be decoded ({_first_line(exc)}); it is corrupt or not a video") from exc
        raise VideoError(f"{label} is truncated or corrupt after {count[0]} frame(s) ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    line = re.sub(r"^\[Errno -?\d+\] ", "", line)  # PyAV's "[Errno 1094995529] Invalid data ...: '<none>'"
    return re.sub(r": '<none>'$", "", line)


def frames_from_video(
    source: VideoSource,
    fps: float = 1.0,
    max_frames: int = 8,
    limits: VideoLimits | None = None,
    *,
    max_side: int | None = None,
    dedup: bool = True,
    dedup_size: int = 64,
    dedup_tolerance: int = 8,
    name: str | None = None,
) -> VideoFrames:
    """Decode ``source`` frame by frame and keep frames sampled at ``fps`` (module docstring), at
    most ``max_frames`` (spread over the whole video when it would give more), identical
    consecutive frames dropped (``dedup``). Kept frames are RGB PIL images at the video's size, or
    downscaled so their longer side is at most ``max_side``. Raises :class:`VideoError`."""
    limits = limits or DEFAULT_LIMITS
    label = _label(source, name)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise VideoError(f"--fps must be a positive number, got {fps!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise VideoError(f"--max-frames must be a positive integer, got {max_frames!r}")
    if max_frames > limits.max_frames:
        raise VideoError(f"--max-frames {max_frames} is over the limit of {limits.max_frames} frames per video")
    if not 0 <= dedup_tolerance <= 255 or dedup_size < 1:
        raise VideoError(f"dedup_tolerance must be 0..255 and dedup_size >= 1, got {dedup_tolerance} and {dedup_size}")
    if max_side is not None and max_side < 1:
        raise VideoError(f"max_side must be >= 1, got {max_side}")
    av = _import_av()
    fh = _open_source(source, label, limits)
    owns = fh is not source
    try:
        try:
            container = av.open(fh, mode="r", metadata_errors="ignore")
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise VideoError(f"{label} is not a video PyAV can read, or is truncated ({_first_line(exc)})") from exc
        try:
            return _read(container, av, label, fps, max_frames, limits, max_side, dedup, dedup_size, dedup_tolerance)
        finally:
            container.close()
    except MavenError:
        raise
    except Exception as exc:  # anything else PyAV/FFmpeg/Pillow raise on hostile input
        raise VideoError(f"{label} could not be decoded ({type(exc).__name__}: {_first_line(exc)})") from exc
    finally:
        if owns:
            fh.close()


def _read(container: Any, av: Any, label: str, fps: float, max_frames: int, limits: VideoLimits,
          max_side: int | None, dedup: bool, dedup_size: int, dedup_tolerance: int) -> VideoFrames:
    if not container.streams.video:
        raise VideoError(f"{label} has no video stream (is it an audio file?)")
    fmt = container.format.name or ""
    if fmt.endswith("_pipe") or fmt == "image2":
        raise VideoError(f"{label} is a still image ({fmt.removesuffix('_pipe')}), not a video; send it as an image")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    cc = stream.codec_context
    width, height = int(cc.width or 0), int(cc.height or 0)
    if width or height:
        _check_size(width, height, label, limits)
    duration = _duration(container, stream)
    # the time the video stream should reach (the container's duration only when it holds nothing else)
    expected_end = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                    else duration if len(container.streams) == 1 else None)
    if duration is not None and duration > limits.max_duration_s:
        raise VideoError(f"{label} lasts {duration:.0f} s, over the limit of {limits.max_duration_s:.0f} s; cut it first")
    header_frames = int(stream.frames or 0)
    if header_frames > limits.max_decoded_frames:
        raise VideoError(f"{label} says it has {header_frames} frames, over the limit of {limits.max_decoded_frames}")
    rate = stream.average_rate
    source_fps = float(rate) if rate else None
    interval = 1.0 / fps
    if duration is not None and duration * fps > max_frames:
        interval = duration / max_frames  # spread max_frames over the whole video
    frames: list[Image.Image] = []
    stamps: list[float] = []
    sampled = duplicates = 0
    last_thumb: np.ndarray | None = None
    target = interval / 2
    count = [0]
    truncated = False
    last: Any = None  # the last decoded frame (a reference, not converted)
    last_t = 0.0
    for frame in _decoded(container, stream, av, label, count):
        if count[0] > limits.max_decoded_frames:
            raise VideoError(f"{label} has more than {limits.max_decoded_frames} frames; cut it first")
        if frame.width != width or frame.height != height:
            _check_size(frame.width, frame.height, label, limits)
            width, height = frame.width, frame.height
        t = frame.time
        if t is None:
            t = (count[0] - 1) / source_fps if source_fps else float(count[0] - 1)
        if t > limits.max_duration_s:
            raise VideoError(f"{label} runs past {limits.max_duration_s:.0f} s, the limit; cut it first")
        last, last_t = frame, float(t)
        if t + 1e-6 < target:
            continue
        while target <= t + 1e-6:  # one frame per target interval, however long the gap
            target += interval
        if len(frames) >= max_frames:
            if duration is None:
                truncated = True
            break
        sampled += 1
        im = frame.to_image()  # RGB at the video's size: only kept frames are converted
        if dedup:
            thumb = _thumbnail(im, dedup_size)
            if last_thumb is not None and int(np.abs(thumb - last_thumb).max()) <= dedup_tolerance:
                duplicates += 1
                continue
            last_thumb = thumb
        frames.append(_downscale(im, max_side))
        stamps.append(float(t))
    if count[0] == 0:
        raise VideoError(f"{label} has no frames (empty or truncated before its first frame)")
    if not truncated and len(frames) < max_frames and expected_end is not None:
        step = 1.0 / source_fps if source_fps else 0.0
        if last_t + step < expected_end - max(1.0, 3 * step, 0.02 * expected_end):
            raise VideoError(f"{label} is truncated: its frames stop at {last_t + step:.1f} s of {expected_end:.1f} s")
    if not frames:  # shorter than the first sampling time (e.g. one frame): its last frame
        sampled = 1
        frames.append(_downscale(last.to_image(), max_side))
        stamps.append(last_t)
    return VideoFrames(frames, stamps, width, height, cc.name or "unknown", duration, source_fps,
                       1.0 / interval, count[0], sampled, duplicates, truncated)
