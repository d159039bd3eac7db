"""Torch-free image loading and preprocessing, hardened against hostile input.

Used by training, by the torch reference backend and by the ONNX Runtime backend, so it
imports only numpy and Pillow (never torch).

    im = load_image("photo.jpg")                       # PIL RGB image, EXIF-rotated
    pixel_values = preprocess_images([im, b"..."], cfg.preprocess)   # float32 [n, 3, H, W]
    check_pixel_values(pixel_values, cfg.preprocess)   # clear ImageError on a bad array

Every failure is raised as a :class:`~maven_edge.core.errors.MavenError` subclass (almost always
:class:`~maven_edge.core.errors.ImageError`) whose message names the image (its path, or
``image i`` for the i-th image of a batch, counting from 1 as prompts do) and says what to do. No Pillow,
numpy or OS exception escapes. Policies (limits, alpha, 16-bit, animation) are documented
in ``docs/usage/images.md``.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from maven_edge.core.config import PreprocessConfig
from maven_edge.core.errors import ConfigError, ImageError, InputError, MavenError

__all__ = [
    "DEFAULT_FORMATS",
    "ImageLimits",
    "ImageSource",
    "check_pixel_values",
    "decode_bytes",
    "load_image",
    "fit_to_square",
    "fitted_size",
    "pad_fill",
    "pad_to_square",
    "resize_separable",
    "preprocess_image",
    "preprocess_images",
    "resample_filter",
]

#: Pillow decoders an encoded image may use. Formats without a magic number (TGA, ...) and
#: formats that run external programs or parse vector/page data (EPS, PDF, ...) are left out.
#: "JPEG" includes multi-picture (MPO) JPEGs from phones and cameras.
DEFAULT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

#: Anything `load_image` accepts.
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray

_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_STRAIGHT_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})
_PREMULTIPLIED_MODES = frozenset({"La", "RGBa"})
_READ_CHUNK = 1 << 20

# Leading bytes of accepted formats: a file that starts like one but does not open is corrupt.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# Leading bytes of common unsupported files, for a more helpful message.
_FORMAT_HINTS: tuple[tuple[bytes, str], ...] = (
    (b"%pdf", "a PDF document"),
    (b"%!ps", "a PostScript/EPS file"),
    (b"<svg", "an SVG drawing"),
    (b"<?xml", "an XML/SVG file"),
)


# ---- limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    """What `load_image` accepts; everything outside is refused with an `ImageError`.

    max_pixels: width * height, checked on the size in the file header *before* any pixel
        data is decoded (Pillow's own decompression-bomb guard is caught as well).
    max_bytes: size of an encoded image (path, bytes or file object); files are read at most
        this far. Not applied to PIL images or numpy arrays, which are already in memory.
    max_decode_bytes: memory decoding one encoded image may take, estimated from its header
        before any pixel is decoded (:func:`decode_bytes`: the image in Pillow's layout, 1-4
        bytes per pixel, plus a progressive JPEG's coefficients, a compressed TIFF strip or
        WebP's buffer). The default, 192 MiB, admits a 40 MP RGB/RGBA image; preprocessing
        itself adds only strips of a few MiB (docs/reliability.md has the measured peaks).
    min_side: smallest allowed width and height, in pixels.
    max_aspect_ratio: largest allowed long side / short side. Padding to a square would
        turn a more extreme image into a thin line the vision encoder cannot see.
    allow_multiframe: True takes the first frame of an animated GIF/WebP or multi-page
        TIFF; False refuses such files.
    formats: Pillow decoder names an encoded image may use.
    """

    max_pixels: int = 40_000_000
    max_bytes: int = 64 * 1024 * 1024
    max_decode_bytes: int = 192 * 1024 * 1024
    min_side: int = 1
    max_aspect_ratio: float = 50.0
    allow_multiframe: bool = True
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        problems = []
        for field_name in ("max_pixels", "max_bytes", "max_decode_bytes", "min_side"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{field_name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_aspect_ratio, (int, float)) or not self.max_aspect_ratio >= 1.0:
            problems.append(f"max_aspect_ratio must be a number >= 1, got {self.max_aspect_ratio!r}")
        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if not self.formats or unknown:
            problems.append(f"formats must name Pillow decoders; unknown: {unknown or 'empty list'}")
        if problems:
            raise InputError("invalid ImageLimits: " + "; ".join(problems))


DEFAULT_LIMITS = ImageLimits()


# ---- loading -----------------------------------------------------------------------------


def load_image(source: ImageSource, limits: ImageLimits | None = None, *, name: str | None = None) -> Image.Image:
    """Load one image from any supported source as a new PIL image in mode ``RGB``.

    ``source`` may be a path (``str`` / ``os.PathLike``), encoded bytes (``bytes``,
    ``bytearray``, ``memoryview``), a binary file object, a ``PIL.Image.Image`` (used at its
    current frame) or a numpy array (HxW, HxWx1, HxWx3 or HxWx4; uint8, or float in [0, 1]).
    EXIF orientation is applied, alpha is composited over white and 16-bit/float images are
    stretched to 8 bits by their actual range. ``name`` labels the image in error messages.

    Raises:
        ImageError: for anything that is not a readable image within ``limits``.
    """
    limits = DEFAULT_LIMITS if limits is None else limits
    label = _label(source, name)
    try:
        if isinstance(source, Image.Image):
            return _from_pil(source, label, limits)
        if isinstance(source, np.ndarray):
            return _from_array(source, label, limits)
        with _open_source(source, label, limits) as fh:
            im = _decode(fh, label, limits)
        return _to_rgb(_exif_transpose(im), label)
    except MavenError:
        raise
    except Exception as exc:  # last-resort guard: never let a library exception escape
        raise ImageError(
            f"{label} could not be read ({type(exc).__name__}: {exc}); "
            "check that it is a valid PNG/JPEG image"
        ) from exc


def _label(source: object, name: str | None) -> str:
    """How error messages name an image: the caller's name, plus the path when there is one."""
    path = _path_of(source)
    if name and path is not None:
        return f"{name} ({path!r})"
    if name:
        return name
    if path is not None:
        return f"image {path!r}"
    if isinstance(source, np.ndarray):
        return f"image array (shape {source.shape}, dtype {source.dtype})"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} bytes)"
    return f"image ({type(source).__name__})"


def _path_of(source: object) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        try:
            return os.fsdecode(source)
        except Exception:  # a PathLike with a broken __fspath__
            return repr(source)
    name = getattr(source, "name", None) if hasattr(source, "read") else None
    return name if isinstance(name, str) else None


def _open_source(source: object, label: str, limits: ImageLimits) -> BinaryIO:
    """A seekable binary stream of the encoded image (the caller closes it), at most
    ``limits.max_bytes`` long. A regular file is read by the decoder straight from disk, so
    its bytes are never all held in memory; other sources are buffered up to the limit."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise _too_many_bytes(label, len(data), limits)
        if not data:
            raise _empty(label)
        return io.BytesIO(data)
    if isinstance(source, (str, os.PathLike)):
        return _open_path(source, label, limits)
    if callable(getattr(source, "read", None)):
        return _read_bounded(source, label, limits)
    raise ImageError(
        f"{label}: unsupported image type {type(source).__name__}; pass a path, bytes, a binary "
        "file object, a PIL.Image.Image or a numpy array"
    )


def _empty(label: str) -> ImageError:
    return ImageError(f"{label} is empty (0 bytes); pass a non-empty image file")


def _open_path(source: str | os.PathLike, label: str, limits: ImageLimits) -> BinaryIO:
    path = os.fspath(source)
    if isinstance(path, str) and path.lower().startswith(("http://", "https://", "ftp://")):
        raise ImageError(f"{label}: URLs are not fetched; download the image and pass the local path")
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise ImageError(f"{label}: file not found; check the path") from exc
    except PermissionError as exc:
        raise ImageError(f"{label}: permission denied; make the file readable") from exc
    except (OSError, ValueError) as exc:
        raise ImageError(f"{label}: cannot access the file ({exc}); check the path") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{label} is a directory, not an image file; pass the path of an image file")
    if stat.S_ISREG(info.st_mode) and info.st_size > limits.max_bytes:
        raise _too_many_bytes(label, info.st_size, limits)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except OSError as exc:
        raise ImageError(f"{label}: cannot read the file ({exc}); check the path and permissions") from exc
    try:
        opened = os.fstat(fh.fileno())
        if stat.S_ISREG(opened.st_mode):  # the file itself (not whatever the path pointed at before)
            if opened.st_size > limits.max_bytes:
                raise _too_many_bytes(label, opened.st_size, limits)
            if opened.st_size == 0:
                raise _empty(label)
            return fh
        with fh:  # a FIFO, a device, ...: read it, at most max_bytes
            return _read_bounded(fh, label, limits)
    except BaseException:
        fh.close()
        raise


def _read_bounded(fh: Any, label: str, limits: ImageLimits) -> io.BytesIO:
    """Read a file object to its end into memory, refusing it once it exceeds ``limits.max_bytes``."""
    buf = io.BytesIO()
    total = 0
    while total <= limits.max_bytes:
        try:
            chunk = fh.read(min(_READ_CHUNK, limits.max_bytes + 1 - total))
        except MavenError:
            raise
        except Exception as exc:
            raise ImageError(f"{label}: reading the file object failed ({exc})") from exc
        if not chunk:
            break
        if isinstance(chunk, str):
            raise ImageError(f"{label}: the file object is in text mode; open the image with mode 'rb'")
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise ImageError(f"{label}: the file object's read() returned {type(chunk).__name__}, not bytes")
        total += buf.write(chunk)
    if total > limits.max_bytes:
        raise _too_many_bytes(label, None, limits)
    if not total:
        raise _empty(label)
    buf.seek(0)
    return buf


def _too_many_bytes(label: str, size: int | None, limits: ImageLimits) -> ImageError:
    got = f"{size / 2**20:.1f} MiB" if size is not None else "more than the limit"
    return ImageError(
        f"{label} is too large ({got}; the limit is {limits.max_bytes / 2**20:.1f} MiB); "
        "re-encode or downscale it, or raise ImageLimits.max_bytes"
    )


def _decode(fh: BinaryIO, label: str, limits: ImageLimits,
            on_header: Callable[[tuple[int, int]], None] | None = None) -> Image.Image:
    """Decode an encoded image after checking, on its header, its size, frames, format and
    the memory decoding it takes; the image is returned loaded, in the file's own mode (EXIF
    orientation not applied yet).

    ``on_header`` is called with the header size after the checks and before any pixel data is
    decoded (the per-request pixel budget of :func:`preprocess_images` uses it)."""
    # Our own header check decides; Pillow's warning (above Image.MAX_IMAGE_PIXELS) is silenced
    # so it can never surface as an exception under -W error, and its error is caught below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(fh, formats=list(limits.formats)) as im:
                _check_size(im.size, label, limits)  # header size: before any pixel is decoded
                _check_frames(im, label, limits)
                _check_decode_bytes(im, label, limits)
                if on_header is not None:
                    on_header(im.size)
                im.load()
                _check_size(im.size, label, limits)
                return im
        except MavenError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(
                f"{label} is too large to decode safely ({exc}); downscale it first"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(_unidentified_message(_head(fh), label, limits)) from exc
        except MemoryError as exc:
            raise ImageError(
                f"{label} could not be decoded: out of memory; downscale it, or lower ImageLimits.max_decode_bytes"
            ) from exc
        except Exception as exc:
            raise ImageError(
                f"{label} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                "re-download or re-save the image and try again"
            ) from exc


def _head(fh: BinaryIO, n: int = 64) -> bytes:
    try:
        fh.seek(0)
        return fh.read(n)
    except Exception:
        return b""


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel in Pillow's memory layout (RGB, LA, CMYK, I, F, ... take 4)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_bytes(im: Image.Image) -> tuple[int, str]:
    """Estimated peak memory, in bytes, that Pillow takes to decode ``im`` (opened, not yet
    loaded), read from its header: the image in Pillow's layout, plus the decoder's own buffer
    where the format needs one (a progressive JPEG's DCT coefficients, a compressed TIFF
    strip or tile, WebP's decoding buffers); and a note naming that buffer ("" when none)."""
    w, h = im.size
    total = w * h * _pixel_bytes(im.mode)
    fmt = im.format
    if fmt in ("JPEG", "MPO") and im.info.get("progressive"):
        layers = [layer for layer in getattr(im, "layer", []) if len(layer) >= 3]
        hmax = max((int(layer[1]) for layer in layers), default=1) or 1
        vmax = max((int(layer[2]) for layer in layers), default=1) or 1

        def blocks(n: int, samp: int, most: int) -> int:
            samples = math.ceil(n * samp / most)
            return math.ceil(samples / 8) * 8  # whole 8x8 blocks

        coefficients = sum(blocks(w, int(layer[1]), hmax) * blocks(h, int(layer[2]), vmax) * 2 for layer in layers)
        return total + coefficients, "a progressive JPEG holds all its DCT coefficients while it decodes"
    if fmt == "WEBP":  # libwebp's canvas and previous canvas, then a copy as bytes (measured: 16 bytes/pixel)
        return total + w * h * 12, "the WebP decoder works in buffers of its own"
    if fmt == "TIFF" and any(getattr(t, "codec_name", "") == "libtiff" for t in getattr(im, "tile", [])):
        tags = getattr(im, "tag_v2", {})
        bits = tags.get(258, (8,))
        row_bits = w * (sum(bits) if isinstance(bits, tuple) else int(bits) * int(tags.get(277, 1)))
        if 322 in tags and 323 in tags:  # tiled
            tile = -(-int(tags[322]) * row_bits // w // 8) * int(tags[323])
            return total + tile, "a compressed TIFF is decoded a whole tile at a time"
        rows = min(h, int(tags.get(278, h)) or h)
        return total + -(-row_bits // 8) * rows, "a compressed TIFF is decoded a whole strip at a time"
    return total, ""


def _check_decode_bytes(im: Image.Image, label: str, limits: ImageLimits) -> None:
    try:
        need, why = decode_bytes(im)
    except Exception:  # odd header values: the other checks and the decoder decide
        return
    if need > limits.max_decode_bytes:
        w, h = im.size
        reason = f" ({why})" if why else ""
        raise ImageError(
            f"{label} ({w}x{h}, {im.format} {im.mode}) needs about {need / 2**20:.0f} MiB to decode{reason}, "
            f"over the limit of {limits.max_decode_bytes / 2**20:.0f} MiB; downscale it or re-save it as a "
            "baseline JPEG or PNG, or raise ImageLimits.max_decode_bytes"
        )


def _unidentified_message(data: bytes, label: str, limits: ImageLimits) -> str:
    """Why Pillow could not identify ``data``: a damaged known format, or not an image at all."""
    known = next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        known = "WEBP"
    if known is not None and known in limits.formats:
        return (
            f"{label} starts like a {known} file but its header is truncated or corrupt; "
            "re-download or re-save the image and try again"
        )
    head = data[:64].lstrip().lower()
    what = next((desc for magic, desc in _FORMAT_HINTS if head.startswith(magic)), None)
    if what is None and data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        what = "a HEIC/AVIF image"
    if what is None and known is not None:
        what = f"a {known} image, which these limits do not allow"
    found = f" (it looks like {what})" if what else ""
    return (
        f"{label} is not a supported image{found}; accepted formats are {', '.join(limits.formats)}. "
        "Convert it to PNG or JPEG"
    )


def _check_size(size: tuple[int, int], label: str, limits: ImageLimits) -> None:
    """Refuse images that are too small, too large or too elongated."""
    w, h = size
    if min(w, h) < limits.min_side:
        raise ImageError(
            f"{label} is too small ({w}x{h}); each side must be at least {limits.min_side} px"
        )
    if w * h > limits.max_pixels:
        raise ImageError(
            f"{label} is too large ({w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
            f"{limits.max_pixels / 1e6:.1f}); downscale it, or raise ImageLimits.max_pixels"
        )
    ratio = max(w, h) / min(w, h)
    if ratio > limits.max_aspect_ratio:
        raise ImageError(
            f"{label} has an extreme aspect ratio ({w}x{h}, {ratio:.1f}:1; the limit is "
            f"{limits.max_aspect_ratio:g}:1); crop it, or raise ImageLimits.max_aspect_ratio"
        )


def _check_frames(im: Image.Image, label: str, limits: ImageLimits) -> None:
    """Refuse multi-frame files when the limits say so; otherwise frame 0 is decoded."""
    if not limits.allow_multiframe and getattr(im, "is_animated", False):
        raise ImageError(
            f"{label} has several frames (animated or multi-page); pass a single-frame image, "
            "or set ImageLimits.allow_multiframe=True to use the first frame"
        )


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; unreadable EXIF data leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im.copy()


def _from_pil(im: Image.Image, label: str, limits: ImageLimits) -> Image.Image:
    _check_size(im.size, label, limits)
    try:
        im.load()
    except Exception as exc:
        raise ImageError(
            f"{label} (a PIL image) cannot be decoded ({type(exc).__name__}: {exc}); the file behind "
            "it is truncated or corrupt"
        ) from exc
    return _to_rgb(_exif_transpose(im), label)


# ---- numpy arrays ------------------------------------------------------------------------


def _from_array(arr: np.ndarray, label: str, limits: ImageLimits) -> Image.Image:
    """An HxW / HxWx{1,3,4} uint8 or [0, 1] float array as an RGB image."""
    arr = _array_layout(arr, label)
    _check_size((arr.shape[1], arr.shape[0]), label, limits)
    arr8 = _array_to_uint8(arr, label)
    channels = arr8.shape[2]
    if channels == 1:
        return Image.fromarray(np.repeat(arr8, 3, axis=2), mode="RGB")
    if channels == 3:
        return Image.fromarray(arr8, mode="RGB")
    return Image.fromarray(_composite_straight(arr8), mode="RGB")


def _array_layout(arr: np.ndarray, label: str) -> np.ndarray:
    """Check the rank and channel count; return a contiguous HxWxC view."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        hint = ""
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
            hint = " It looks channels-first (CxHxW): pass arr.transpose(1, 2, 0)."
        elif arr.ndim == 4:
            hint = " For a batch, pass a list of HxWxC arrays."
        raise ImageError(
            f"{label}: expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}.{hint}"
        )
    return np.ascontiguousarray(arr)


def _array_to_uint8(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ImageError(
            f"{label}: unsupported array dtype {arr.dtype}; use uint8 (0-255) or float in [0, 1] "
            "(e.g. arr.astype(np.uint8) or arr / 255.0)"
        )
    if arr.size and not np.isfinite(arr).all():
        raise ImageError(f"{label}: the float array contains NaN or infinity; pass finite values in [0, 1]")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise ImageError(
            f"{label}: float arrays must lie in [0, 1], got values in [{lo:g}, {hi:g}]; "
            "divide 0-255 data by 255 or pass it as uint8"
        )
    return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)


# ---- mode conversion ---------------------------------------------------------------------


def _to_rgb(im: Image.Image, label: str, numeric_range: _Range | None = None) -> Image.Image:
    """Convert any Pillow mode to a new RGB image (alpha over white, 16-bit/float stretched).

    ``numeric_range`` is the stretch range of a 16-bit/float image when ``im`` is one strip of
    it (see :func:`_numeric_range`); by default the range of ``im`` itself is used."""
    mode = im.mode
    try:
        if _is_numeric(mode):
            return _numeric_to_rgb(im, numeric_range)
        if mode in _PREMULTIPLIED_MODES:
            return Image.fromarray(_composite_premultiplied(np.asarray(im)), mode="RGB")
        if _has_alpha(im):
            return Image.fromarray(_composite_straight(np.asarray(im.convert("RGBA"))), mode="RGB")
        return im.convert("RGB")
    except MavenError:
        raise
    except Exception as exc:
        raise ImageError(
            f"{label}: cannot convert pixel mode {mode!r} to RGB ({exc}); re-save it as an RGB PNG or JPEG"
        ) from exc


def _is_numeric(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;")


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in _STRAIGHT_ALPHA_MODES or "transparency" in im.info:
        return True
    palette = im.palette if im.mode == "P" else None
    return palette is not None and palette.mode == "RGBA"


def _composite_straight(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA (uint8) over white, rounded: (c * a + 255 * (255 - a)) / 255.

    Computed in uint16: c * a + 255 * (255 - a) + 127 <= 255 * 255 + 127 < 2**16."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb *= alpha
    rgb += 255 * (255 - alpha) + 127
    rgb //= 255
    return rgb.astype(np.uint8)


def _composite_premultiplied(arr: np.ndarray) -> np.ndarray:
    """Premultiplied ``La`` / ``RGBa`` over white: c + (255 - a), exact with no rounding."""
    colour = arr[..., :-1].astype(np.int32)
    alpha = arr[..., -1:].astype(np.int32)
    out = np.clip(colour + (255 - alpha), 0, 255).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


#: (lowest finite value, highest finite value), or None when no value is finite.
_Range = tuple[float, float] | None


def _numeric_range(im: Image.Image, rows_per_strip: int) -> _Range:
    """The finite [min, max] of a 16-bit/float image, read a strip of rows at a time so no
    full-size float64 copy is made."""
    lo, hi = np.inf, -np.inf
    w, h = im.size
    for y0 in range(0, h, rows_per_strip):
        values = np.asarray(im.crop((0, y0, w, min(h, y0 + rows_per_strip)))).astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return None if lo > hi else (lo, hi)


def _numeric_to_rgb(im: Image.Image, numeric_range: _Range | None = None) -> Image.Image:
    """``I``, ``I;16*`` and ``F`` images, stretched from their actual range to 0-255."""
    raw = np.asarray(im)
    values = raw.astype(np.float64)
    if numeric_range is None:
        finite = values[np.isfinite(values)]
        numeric_range = (float(finite.min()), float(finite.max())) if finite.size else None
    gray = _stretch_to_uint8(values, numeric_range)
    transparency = im.info.get("transparency")
    if isinstance(transparency, (int, float)) and not isinstance(transparency, bool):
        gray = np.where(raw == transparency, np.uint8(255), gray)  # transparent -> white
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")


def _stretch_to_uint8(values: np.ndarray, value_range: _Range) -> np.ndarray:
    """Map ``value_range`` = [min, max] of the finite values to [0, 255]; NaN -> min,
    +-inf -> max/min; no finite value at all -> black.

    A constant image has no range: it becomes black when its value is <= 0, else white.
    """
    if value_range is None:
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = value_range
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    if hi == lo:
        return np.full(values.shape, 255 if lo > 0 else 0, dtype=np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ---- preprocessing -----------------------------------------------------------------------


def resample_filter(name: str) -> Image.Resampling:
    """The PIL resampling filter for a config name (nearest, box, bilinear, hamming, bicubic, lanczos)."""
    key = name.lower().strip() if isinstance(name, str) else name
    if key not in _RESAMPLE:
        raise ConfigError(
            f"unknown resample filter {name!r} in preprocess.resample; choose one of {', '.join(_RESAMPLE)}"
        )
    return _RESAMPLE[key]


def pad_to_square(im: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``im`` on a square canvas of its long side filled with ``fill`` (LLaVA-1.5's
    ``expand2square``). Not used by preprocessing any more (see :func:`fit_to_square`): the
    canvas costs memory in the square of the long side."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    canvas = Image.new(im.mode, (side, side), fill)
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    return canvas


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` image scaled so its long side is ``size`` (aspect
    ratio kept, each side rounded half up, at least 1 pixel)."""
    long = max(width, height)
    return (max(1, (2 * width * size + long) // (2 * long)), max(1, (2 * height * size + long) // (2 * long)))


def resize_separable(im: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """``im`` resized to ``size``: Pillow's horizontal pass, then its vertical pass.

    Pillow's own ``resize`` runs the same two passes but picks their order by cost, so its
    result depends on the shape; fixing the order makes the result the same whether the
    image is resized whole or a strip of rows at a time (the horizontal pass treats every row
    on its own). For a square image resized to a square, the order Pillow picks is this one."""
    w, h = im.size
    return im.resize((size[0], h), resample=resample).resize(size, resample=resample)


def fit_to_square(im: Image.Image, size: int, fill: tuple[int, int, int],
                  resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize ``im`` so its long side is ``size``, then centre it on a ``size`` x ``size`` canvas
    of ``fill``: the picture of padding to a square first and resizing after (LLaVA-1.5), with
    memory and time in proportion to the image instead of to the square of its long side.
    Preprocessing computes exactly this (bit for bit), a strip of rows at a time."""
    w, h = fitted_size(*im.size, size)
    out = resize_separable(im, (w, h), resample)
    if (w, h) == (size, size):
        return out
    canvas = Image.new(out.mode, (size, size), fill)
    canvas.paste(out, ((size - w) // 2, (size - h) // 2))
    return canvas


def pad_fill(cfg: PreprocessConfig) -> tuple[int, int, int]:
    """The padding colour: the normalisation mean in 0-255, truncated like LLaVA-1.5."""
    r, g, b = (min(255, max(0, int(m * 255))) for m in cfg.mean)
    return r, g, b


def _check_config(cfg: PreprocessConfig) -> None:
    problems = []
    size = cfg.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        problems.append(f"image_size must be a positive integer, got {size!r}")
    if len(cfg.mean) != 3 or len(cfg.std) != 3:
        problems.append("mean and std must have 3 values (R, G, B)")
    elif any(not s > 0 for s in cfg.std):
        problems.append(f"std values must be > 0, got {tuple(cfg.std)}")
    if problems:
        raise ConfigError("invalid preprocess config: " + "; ".join(problems))
    resample_filter(cfg.resample)


# ---- bounded-memory path: native pixels -> pixel_values, a strip of rows at a time ----------

#: Largest strip of rows (in Pillow's 4 bytes per RGB pixel) converted and resized at a time.
STRIP_BYTES = 1 << 20

_ORIENTATIONS: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270,
                         Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90})


def _orientation(im: Image.Image) -> Image.Transpose | None:
    """The transpose its EXIF orientation tag asks for (as ``ImageOps.exif_transpose``); None
    when there is none or the EXIF data cannot be read."""
    try:
        return _ORIENTATIONS.get(im.getexif().get(0x0112, 1))
    except Exception:
        return None


class _Rows:
    """An image as its EXIF orientation shows it, in RGB, handed out a strip of rows at a time.

    Only the decoded image itself is held at full size; each strip is cropped from it,
    transposed and converted on its own (16-bit/float images use the range of the whole image),
    so the RGB image is never materialised."""

    def __init__(self, im: Image.Image, label: str, method: Image.Transpose | None = None):
        self.im, self.label, self.method = im, label, method
        w, h = im.size
        self.size = (h, w) if method in _SWAPS_AXES else (w, h)
        self.strip_rows = max(1, STRIP_BYTES // (4 * self.size[0]))
        self.numeric: _Range = None
        if _is_numeric(im.mode):
            try:
                self.numeric = _numeric_range(im, max(1, STRIP_BYTES // (8 * w)))
            except Exception as exc:
                raise ImageError(
                    f"{label}: cannot read pixel mode {im.mode!r} ({exc}); re-save it as an RGB PNG or JPEG"
                ) from exc

    def rows(self, r0: int, r1: int) -> Image.Image:
        """Rows [r0, r1) of the oriented image, as a new RGB image."""
        w, h = self.im.size
        m = self.method
        if m in (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_TOP_BOTTOM):
            box = (0, h - r1, w, h - r0)
        elif m in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270):
            box = (r0, 0, r1, h)
        elif m in (Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90):
            box = (w - r1, 0, w - r0, h)
        else:  # None, FLIP_LEFT_RIGHT
            box = (0, r0, w, r1)
        strip = self.im.crop(box)
        if m is not None:
            strip = strip.transpose(m)
        return _to_rgb(strip, self.label, self.numeric)


def _resize_rows(src: _Rows, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """``src`` resized to ``size``, bit-identical to :func:`resize_separable` of the whole RGB
    image: the horizontal pass a strip of rows at a time into a ``size[0]`` x height image, then
    the vertical pass on that."""
    w, h = src.size
    if h <= src.strip_rows:
        return resize_separable(src.rows(0, h), size, resample)
    narrow = Image.new("RGB", (size[0], h))
    for y0 in range(0, h, src.strip_rows):
        y1 = min(h, y0 + src.strip_rows)
        narrow.paste(src.rows(y0, y1).resize((size[0], y1 - y0), resample=resample), (0, y0))
    return narrow.resize(size, resample=resample)


def _square(src: _Rows, cfg: PreprocessConfig) -> Image.Image:
    """The ``image_size`` square the model sees: fitted and padded (``fit_to_square``), or
    stretched when ``cfg.pad_to_square`` is off."""
    size = cfg.image_size
    resample = resample_filter(cfg.resample)
    if not cfg.pad_to_square:
        return _resize_rows(src, (size, size), resample)
    w, h = fitted_size(*src.size, size)
    out = _resize_rows(src, (w, h), resample)
    if (w, h) == (size, size):
        return out
    canvas = Image.new("RGB", (size, size), pad_fill(cfg))
    canvas.paste(out, ((size - w) // 2, (size - h) // 2))
    return canvas


def _normalise(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB ``image_size`` square -> float32 [3, S, S]: rescale by 1/255, normalise (CLIP arithmetic)."""
    arr = (np.asarray(im, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _pixel_values(source: ImageSource, cfg: PreprocessConfig, limits: ImageLimits, name: str | None,
                  on_header: Callable[[tuple[int, int]], None] | None = None) -> np.ndarray:
    """One image -> float32 [3, S, S], holding at full size only the decoded file (in its own
    mode) and never an RGB copy, a transposed copy or a padded canvas of it."""
    label = _label(source, name)
    try:
        if isinstance(source, (Image.Image, np.ndarray)):  # already in memory: load_image's path
            im = load_image(source, limits, name=name)
            if on_header is not None:
                on_header(im.size)
            return _normalise(_square(_Rows(im, label), cfg), cfg)
        with _open_source(source, label, limits) as fh:
            native = _decode(fh, label, limits, on_header)
        rows = _Rows(native, label, _orientation(native))
        return _normalise(_square(rows, cfg), cfg)
    except MavenError:
        raise
    except MemoryError as exc:
        raise ImageError(f"{label} could not be preprocessed: out of memory; downscale it") from exc
    except Exception as exc:  # last-resort guard: never let a library exception escape
        raise ImageError(
            f"{label} could not be read ({type(exc).__name__}: {exc}); check that it is a valid PNG/JPEG image"
        ) from exc


def preprocess_image(
    image: ImageSource, cfg: PreprocessConfig, limits: ImageLimits | None = None, *, name: str | None = None
) -> np.ndarray:
    """One image as float32 ``pixel_values`` of shape [3, S, S] (S = ``cfg.image_size``)."""
    _check_config(cfg)
    return _pixel_values(image, cfg, DEFAULT_LIMITS if limits is None else limits, name)


def preprocess_images(
    images: Sequence[ImageSource], cfg: PreprocessConfig, limits: ImageLimits | None = None,
    *, max_total_pixels: int | None = None,
) -> np.ndarray:
    """A list of images as float32 ``pixel_values`` of shape [n, 3, S, S].

    Each image is loaded as `load_image` would (same checks and conversions), resized so its
    long side is ``cfg.image_size`` and centred on a square of the mean colour (when
    ``cfg.pad_to_square``; else stretched to the square) with the ``cfg.resample`` filter,
    scaled to [0, 1] and normalised with ``cfg.mean`` / ``cfg.std``. Images are decoded one
    at a time and converted a strip of rows at a time, so memory is bounded by the largest
    decoded file (see docs/usage/images.md). The result is deterministic (bit-identical
    between calls). Errors name the image as ``image i`` (counting from 1, as prompts do).

    max_total_pixels: the most pixels all images of the call may have together (the
        per-request budget); checked on each file's header before it is decoded.
    """
    _check_config(cfg)
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, np.ndarray)) or not (
        isinstance(images, Sequence)
    ):
        raise InputError(
            f"preprocess_images expects a list of images, got {type(images).__name__}; "
            "wrap a single image in a list or call preprocess_image"
        )
    limits = DEFAULT_LIMITS if limits is None else limits
    size = cfg.image_size
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    total = 0

    def budget(i: int) -> Callable[[tuple[int, int]], None]:
        def check(wh: tuple[int, int]) -> None:
            nonlocal total
            total += wh[0] * wh[1]
            if max_total_pixels is not None and total > max_total_pixels:
                raise ImageError(
                    f"image {i + 1} ({wh[0]}x{wh[1]}) brings the request to {total / 1e6:.1f} megapixels, over "
                    f"the limit of {max_total_pixels / 1e6:.1f} per request; send fewer or smaller images, or "
                    "raise PipelineLimits.max_request_pixels"
                )
        return check

    for i, image in enumerate(images):
        out[i] = _pixel_values(image, cfg, limits, f"image {i + 1}", budget(i))
    return out


def check_pixel_values(arr: Any, cfg: PreprocessConfig, *, name: str = "pixel_values") -> None:
    """Raise `ImageError` unless ``arr`` is a floating [n, 3, S, S] array (numpy or torch).

    Only ``.shape`` and ``.dtype`` are read, so torch tensors work without importing torch.
    """
    shape, dtype = getattr(arr, "shape", None), getattr(arr, "dtype", None)
    if shape is None or dtype is None:
        raise ImageError(
            f"{name} must be an array of shape [n, 3, H, W], got {type(arr).__name__}; "
            "build it with preprocess_images"
        )
    shape = tuple(int(d) for d in shape)
    size = cfg.image_size
    expected = f"[n, 3, {size}, {size}]"
    if len(shape) != 4:
        hint = " Add a batch axis (arr[None])." if len(shape) == 3 else ""
        raise ImageError(f"{name} must have 4 dimensions {expected}, got shape {shape}.{hint}")
    if shape[1] != 3:
        hint = " It looks channels-last: transpose(0, 3, 1, 2)." if shape[3] == 3 else ""
        raise ImageError(f"{name} must have 3 channels in axis 1 {expected}, got shape {shape}.{hint}")
    if shape[2:] != (size, size):
        raise ImageError(
            f"{name} must be {size}x{size} pixels for this model {expected}, got shape {shape}; "
            "preprocess the images with this model's preprocess config"
        )
    if not _is_floating(dtype):
        raise ImageError(f"{name} must be a floating-point array, got dtype {dtype}; use preprocess_images")


def _is_floating(dtype: Any) -> bool:
    """True for numpy floating dtypes and torch floating dtypes (duck-typed)."""
    flag = getattr(dtype, "is_floating_point", None)
    if isinstance(flag, bool):
        return flag
    try:
        return bool(np.issubdtype(np.dtype(dtype), np.floating))
    except TypeError:
        return False
