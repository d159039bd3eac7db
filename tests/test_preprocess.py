"""Tests for maven_edge.core.preprocess: every input kind and mode, limits, hostile files, fuzzing."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from maven_edge.core.config import CLIP_MEAN, CLIP_STD, PreprocessConfig
from maven_edge.core.errors import ConfigError, ImageError, InputError, MavenError
from maven_edge.core.preprocess import (
    DEFAULT_FORMATS,
    ImageLimits,
    check_pixel_values,
    fit_to_square,
    load_image,
    pad_to_square,
    preprocess_image,
    preprocess_images,
    resample_filter,
)

# Examples per fuzz test; docs/usage/images.md records the total the default suite runs.
FUZZ_EXAMPLES = 200
CFG = PreprocessConfig(image_size=16)
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ---- helpers -----------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def pixel(im: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(np.asarray(im)[xy[1], xy[0]].tolist())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat or zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def left_right(w: int = 40, h: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", (w, h), RED)
    im.paste(BLUE, (w // 2, 0, w, h))
    return im


# ---- input kinds -------------------------------------------------------------------------


@pytest.fixture
def red_png(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (6, 4), RED).save(path)
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: str(p), id="str"),
        pytest.param(lambda p: p, id="pathlib"),
        pytest.param(lambda p: p.read_bytes(), id="bytes"),
        pytest.param(lambda p: bytearray(p.read_bytes()), id="bytearray"),
        pytest.param(lambda p: memoryview(p.read_bytes()), id="memoryview"),
        pytest.param(lambda p: io.BytesIO(p.read_bytes()), id="BytesIO"),
        pytest.param(lambda p: Image.open(p), id="PIL-lazy"),
        pytest.param(lambda p: Image.new("RGB", (6, 4), RED), id="PIL"),
        pytest.param(lambda p: np.full((4, 6, 3), RED, dtype=np.uint8), id="array-HWC-uint8"),
        pytest.param(lambda p: np.tile(np.array([1.0, 0, 0], np.float32), (4, 6, 1)), id="array-HWC-float32"),
        pytest.param(lambda p: np.dstack([np.full((4, 6, 3), RED, np.uint8), np.full((4, 6), 255, np.uint8)]),
                     id="array-HWC4"),
    ],
)
def test_every_input_kind_gives_rgb(red_png: Path, make) -> None:
    im = load_image(make(red_png))
    assert im.mode == "RGB" and im.size == (6, 4)
    assert pixel(im) == RED


def test_open_binary_file_object(red_png: Path) -> None:
    with open(red_png, "rb") as fh:
        assert pixel(load_image(fh)) == RED


def test_text_mode_file_object_refused(red_png: Path) -> None:
    with open(red_png, encoding="latin-1") as fh, pytest.raises(ImageError, match="'rb'"):
        load_image(fh)


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.full((3, 5), 7, np.uint8), (7, 7, 7)),
        (np.full((3, 5, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((3, 5), 0.5, np.float64), (128, 128, 128)),
        (np.full((3, 5, 3), 1.0, np.float16), WHITE),
        (np.dstack([np.zeros((3, 5, 3), np.uint8), np.zeros((3, 5), np.uint8)]), WHITE),  # transparent
        (np.asfortranarray(np.full((3, 5, 3), 3, np.uint8)), (3, 3, 3)),
    ],
)
def test_array_inputs(arr: np.ndarray, expected: tuple[int, int, int]) -> None:
    im = load_image(arr)
    assert im.mode == "RGB" and im.size == (5, 3) and pixel(im) == expected


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((4, 4), np.int64), "dtype int64"),
        (np.zeros((4, 4), bool), "dtype bool"),
        (np.zeros((4, 4), np.uint16), "dtype uint16"),
        (np.full((4, 4), 2.0), r"\[0, 1\]"),
        (np.full((4, 4), -0.1), r"\[0, 1\]"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.full((4, 4), np.inf, np.float32), "NaN or infinity"),
        (np.zeros((3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((1, 8, 8, 3), np.uint8), "list"),
        (np.zeros((8, 8, 2), np.uint8), "HxW"),
        (np.zeros((8,), np.uint8), "HxW"),
        (np.zeros((0, 8, 3), np.uint8), "too small"),
        (np.zeros((4, 4), object), "dtype object"),
    ],
)
def test_bad_arrays_refused(arr: np.ndarray, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        load_image(arr)


@pytest.mark.parametrize("source", [3, None, 1.5, ["a.png"], object()])
def test_unsupported_source_types_refused(source) -> None:
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(source)


def test_pil_input_not_modified_and_result_is_new() -> None:
    src = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    out = load_image(src)
    assert out is not src and src.mode == "RGBA" and pixel(src) == (10, 20, 30, 0)
    rgb = Image.new("RGB", (3, 3), RED)
    assert load_image(rgb) is not rgb


# ---- pixel modes -------------------------------------------------------------------------


def _mode_image(mode: str, value, size: tuple[int, int] = (4, 3), **info) -> Image.Image:
    im = Image.new(mode, size, value)
    im.info.update(info)
    return im


def _palette_image(transparency=None, mode: str = "P", alpha: int | None = None) -> Image.Image:
    im = Image.new(mode, (4, 3), 0 if alpha is None else (0, alpha))
    im.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


MODE_CASES = [
    ("1", lambda: _mode_image("1", 1), WHITE),
    ("1-black", lambda: _mode_image("1", 0), (0, 0, 0)),
    ("L", lambda: _mode_image("L", 100), (100, 100, 100)),
    ("L-trns", lambda: _mode_image("L", 100, transparency=100), WHITE),
    ("LA-opaque", lambda: _mode_image("LA", (100, 255)), (100, 100, 100)),
    ("LA-clear", lambda: _mode_image("LA", (100, 0)), WHITE),
    ("LA-half", lambda: _mode_image("LA", (0, 128)), (127, 127, 127)),
    ("La", lambda: _mode_image("La", (50, 128)), (177, 177, 177)),
    ("P", lambda: _palette_image(), (10, 20, 30)),
    ("P-trns-index", lambda: _palette_image(transparency=0), WHITE),
    ("P-trns-other", lambda: _palette_image(transparency=1), (10, 20, 30)),
    ("P-trns-bytes", lambda: _palette_image(transparency=bytes([0, 255])), WHITE),
    ("PA", lambda: _palette_image(mode="PA", alpha=0), WHITE),
    ("PA-opaque", lambda: _palette_image(mode="PA", alpha=255), (10, 20, 30)),
    ("RGB", lambda: _mode_image("RGB", (1, 2, 3)), (1, 2, 3)),
    ("RGB-trns", lambda: _mode_image("RGB", (1, 2, 3), transparency=(1, 2, 3)), WHITE),
    ("RGBA-opaque", lambda: _mode_image("RGBA", (1, 2, 3, 255)), (1, 2, 3)),
    ("RGBA-clear", lambda: _mode_image("RGBA", (1, 2, 3, 0)), WHITE),
    ("RGBA-half", lambda: _mode_image("RGBA", (255, 0, 0, 128)), (255, 127, 127)),
    ("RGBa", lambda: _mode_image("RGBa", (50, 0, 100, 128)), (177, 127, 227)),
    ("RGBX", lambda: _mode_image("RGBX", (1, 2, 3, 0)), (1, 2, 3)),
    ("CMYK-white", lambda: _mode_image("CMYK", (0, 0, 0, 0)), WHITE),
    ("CMYK-cyan", lambda: _mode_image("CMYK", (255, 0, 0, 0)), (0, 255, 255)),
    ("CMYK-black", lambda: _mode_image("CMYK", (0, 0, 0, 255)), (0, 0, 0)),
    ("YCbCr", lambda: _mode_image("YCbCr", (255, 128, 128)), WHITE),
    ("HSV", lambda: _mode_image("HSV", (0, 255, 255)), RED),
    ("I-const-pos", lambda: _mode_image("I", 70000), WHITE),
    ("I-const-zero", lambda: _mode_image("I", 0), (0, 0, 0)),
    ("I;16-const", lambda: _mode_image("I;16", 300), WHITE),
    ("F-const-neg", lambda: _mode_image("F", -2.5), (0, 0, 0)),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in MODE_CASES], ids=[c[0] for c in MODE_CASES])
def test_every_mode_converts_to_rgb(make, expected: tuple[int, int, int]) -> None:
    im = load_image(make())
    assert im.mode == "RGB" and im.size == (4, 3)
    assert pixel(im) == expected


def test_lab_converts() -> None:
    im = load_image(_mode_image("LAB", (255, 128, 128)))
    assert im.mode == "RGB" and min(pixel(im)) > 240


def _ramp(mode: str, lo: float, hi: float) -> Image.Image:
    values = np.linspace(lo, hi, 6).reshape(2, 3)
    dtype = {"I": np.int32, "I;16": np.uint16, "I;16B": ">u2", "F": np.float32}[mode]
    arr = values.astype(dtype)
    if mode == "F":
        return Image.fromarray(arr, mode="F")
    if mode == "I":
        return Image.fromarray(arr, mode="I")
    im = Image.new(mode, (3, 2))
    im.frombytes(arr.tobytes())
    return im


@pytest.mark.parametrize(
    "mode, lo, hi",
    [("I", -1000, 3000), ("I", 0, 2**31 - 1), ("I;16", 1000, 5000), ("I;16B", 0, 65535), ("F", -1.0, 1.0),
     ("F", 0.0, 1e30)],
)
def test_high_bit_depth_stretched_by_actual_range(mode: str, lo: float, hi: float) -> None:
    im = load_image(_ramp(mode, lo, hi))
    gray = np.asarray(im)[..., 0].ravel()
    assert gray[0] == 0 and gray[-1] == 255  # full range used, not clipped at 255
    assert np.all(np.diff(gray.astype(int)) > 0)  # monotone, no saturation
    assert np.array_equal(np.asarray(im)[..., 0], np.asarray(im)[..., 2])


def test_float_image_nan_and_inf_handled() -> None:
    arr = np.array([[np.nan, 0.0, 1.0], [np.inf, -np.inf, 0.5]], np.float32)
    gray = np.asarray(load_image(Image.fromarray(arr, mode="F")))[..., 0]
    assert gray.tolist() == [[0, 0, 255], [255, 0, 128]]
    assert pixel(load_image(Image.fromarray(np.full((2, 2), np.nan, np.float32), mode="F"))) == (0, 0, 0)


def test_16bit_transparency_index_is_white() -> None:
    im = _ramp("I;16", 1000, 5000)
    im.info["transparency"] = 5000
    gray = np.asarray(load_image(im))[..., 0].ravel()
    assert gray[0] == 0 and gray[-1] == 255 and gray[1] < 255


ROUND_TRIPS = [
    ("I;16-png", lambda: _ramp("I;16", 1000, 5000), "PNG"),
    ("I-tiff", lambda: _ramp("I", -1000, 3000), "TIFF"),
    ("F-tiff", lambda: _ramp("F", -1.0, 1.0), "TIFF"),
    ("1-png", lambda: _mode_image("1", 1), "PNG"),
    ("LA-png", lambda: _mode_image("LA", (100, 0)), "PNG"),
    ("RGBA-png", lambda: _mode_image("RGBA", (1, 2, 3, 0)), "PNG"),
    ("P-trns-png", lambda: _palette_image(transparency=0), "PNG"),
    ("CMYK-jpeg", lambda: _mode_image("CMYK", (0, 0, 0, 0)), "JPEG"),
    ("CMYK-tiff", lambda: _mode_image("CMYK", (255, 0, 0, 0)), "TIFF"),
    ("RGBA-webp", lambda: _mode_image("RGBA", (1, 2, 3, 0)), "WEBP"),
    ("RGB-bmp", lambda: _mode_image("RGB", (1, 2, 3)), "BMP"),
    ("L-ppm", lambda: _mode_image("L", 100), "PPM"),
    ("RGBA-tiff", lambda: _mode_image("RGBA", (1, 2, 3, 0)), "TIFF"),
]


@pytest.mark.parametrize("make, fmt", [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_encoded_modes_match_in_memory_conversion(make, fmt: str) -> None:
    src = make()
    decoded = load_image(encode(src, fmt))
    expected = load_image(src)
    assert decoded.mode == "RGB" and decoded.size == src.size
    tol = 3 if fmt == "JPEG" else 0
    assert np.abs(np.asarray(decoded, int) - np.asarray(expected, int)).max() <= tol


# ---- EXIF orientation --------------------------------------------------------------------


def _with_orientation(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_applied(fmt: str) -> None:
    src = left_right(40, 20)
    # 6 = rotate 90 degrees clockwise for display: the left (red) half ends up on top.
    im = load_image(_with_orientation(src, fmt, 6))
    assert im.size == (20, 40)
    top, bottom = np.asarray(im, int)[5, 10], np.asarray(im, int)[34, 10]
    assert np.abs(top - RED).max() < 10 and np.abs(bottom - BLUE).max() < 10
    # 3 = rotate 180: red moves to the right.
    im = load_image(_with_orientation(src, fmt, 3))
    assert im.size == (40, 20) and np.abs(np.asarray(im, int)[10, 35] - RED).max() < 10


def test_exif_orientation_applied_to_pil_input() -> None:
    im = Image.open(io.BytesIO(_with_orientation(left_right(), "PNG", 8)))
    assert load_image(im).size == (20, 40)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_corrupt_exif_is_ignored() -> None:
    data = encode(left_right(), "PNG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    assert load_image(data).size == (40, 20)


# ---- sizes and limits --------------------------------------------------------------------


def test_one_pixel_image() -> None:
    im = load_image(encode(Image.new("RGB", (1, 1), RED), "PNG"))
    assert im.size == (1, 1) and pixel(im) == RED
    x = preprocess_image(im, CFG)
    expected = ((np.array(RED) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x[:, 8, 8], expected, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 51), (5100, 100), (200, 2)])
def test_extreme_aspect_ratio_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(encode(Image.new("L", size), "PNG"))
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(np.zeros(size[::-1], np.uint8))


def test_aspect_ratio_at_limit_accepted_and_configurable() -> None:
    assert load_image(Image.new("L", (50, 1))).size == (50, 1)
    assert load_image(Image.new("L", (200, 2)), ImageLimits(max_aspect_ratio=100)).size == (200, 2)
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(Image.new("L", (10, 4)), ImageLimits(max_aspect_ratio=2))


def test_min_side() -> None:
    with pytest.raises(ImageError, match="too small"):
        load_image(Image.new("RGB", (4, 4)), ImageLimits(min_side=8))


def test_max_pixels_on_every_source() -> None:
    limits = ImageLimits(max_pixels=99)
    im = Image.new("RGB", (10, 10))
    for source in (im, encode(im, "PNG"), np.zeros((10, 10), np.uint8)):
        with pytest.raises(ImageError, match="megapixels"):
            load_image(source, limits)
    assert load_image(Image.new("RGB", (9, 11)), limits).size == (9, 11)


def test_decompression_bomb_refused_quickly_before_decoding() -> None:
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 200
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)
    assert time.perf_counter() - start < 1.0


def test_header_size_checked_before_pixel_data() -> None:
    # 49 MP is over our 40 MP default but under Pillow's own guard; the IDAT is garbage, so a
    # decode attempt would report corruption instead of the size.
    bomb = png_claiming(7000, 7000, idat=b"not zlib at all")
    with pytest.raises(ImageError, match=r"7000x7000 = 49\.0 megapixels"):
        load_image(bomb)
    with pytest.raises(ImageError, match="corrupt"):
        load_image(bomb, ImageLimits(max_pixels=10**8))


def test_pillow_bomb_guard_handled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    data = encode(Image.new("RGB", (8, 8)), "PNG")  # 64 px: Pillow warns (> 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # even with warnings as errors, our limits decide
        assert load_image(data).size == (8, 8)
    with pytest.raises(ImageError, match="too large"):
        load_image(encode(Image.new("RGB", (20, 20)), "PNG"))  # > 2 * 50: Pillow's error


def test_global_pillow_state_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    load_image(png_claiming(3, 3, idat=zlib.compress(b"\0" * 30)))
    with pytest.raises(ImageError):
        load_image(png_claiming(100_000, 100_000))
    assert Image.MAX_IMAGE_PIXELS == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_max_bytes(tmp_path: Path) -> None:
    data = encode(noise(64, 64), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    for source in (data, path, io.BytesIO(data)):
        with pytest.raises(ImageError, match="MiB"):
            load_image(source, limits)
    assert load_image(data, ImageLimits(max_bytes=len(data))).size == (64, 64)


def test_endless_stream_stops_at_max_bytes() -> None:
    class Endless(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buf) -> int:
            buf[:] = b"\0" * len(buf)
            return len(buf)

    with pytest.raises(ImageError, match="too large"):
        load_image(Endless(), ImageLimits(max_bytes=3 * 2**20))


@pytest.mark.parametrize(
    "kwargs", [{"max_pixels": 0}, {"max_bytes": -1}, {"min_side": 1.5}, {"max_aspect_ratio": 0.5},
               {"formats": ("NOPE",)}, {"formats": ()}, {"max_pixels": True}],
)
def test_bad_limits_refused(kwargs: dict) -> None:
    with pytest.raises(InputError, match="invalid ImageLimits"):
        ImageLimits(**kwargs)


def test_formats_allowlist() -> None:
    tga = encode(Image.new("RGB", (4, 4), RED), "TGA")
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(tga)
    assert pixel(load_image(tga, ImageLimits(formats=("TGA",)))) == RED
    with pytest.raises(ImageError, match="do not allow"):
        load_image(encode(Image.new("RGB", (4, 4)), "PNG"), ImageLimits(formats=("JPEG",)))


# ---- hostile and broken files ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP"])
def test_truncated_files_refused(fmt: str) -> None:
    data = encode(noise(64, 64, seed=1), fmt)
    for cut in (len(data) // 2, 30):
        with pytest.raises(ImageError, match="truncated or corrupt"):
            load_image(data[:cut], name="image #3")


def test_truncated_message_names_path(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(encode(noise(64, 64), "JPEG")[:500])
    with pytest.raises(ImageError, match=r"cut\.jpg.*truncated or corrupt.*re-download"):
        load_image(path)


def test_zero_byte_inputs(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    for source in (path, b"", io.BytesIO()):
        with pytest.raises(ImageError, match="empty"):
            load_image(source)


def test_random_bytes_and_text_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageError, match=r"notes\.txt.*not a supported image.*PNG or JPEG"):
        load_image(text)


@pytest.mark.parametrize(
    "data, hint",
    [(b"%PDF-1.7\n...", "PDF"), (b"<svg xmlns='x'></svg>", "SVG"), (b"\0\0\0\x18ftypheic" + b"\0" * 40, "HEIC")],
)
def test_unsupported_format_hints(data: bytes, hint: str) -> None:
    with pytest.raises(ImageError, match=hint):
        load_image(data)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="URLs are not fetched"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageError, match="check the path"):
        load_image("bad\0name.png")


def test_lazy_pil_image_of_truncated_file() -> None:
    im = Image.open(io.BytesIO(encode(noise(64, 64), "PNG")[:300]))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(im)


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (8, 6), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert pixel(load_image(data)) == RED
    with pytest.raises(ImageError, match="several frames"):
        load_image(data, ImageLimits(allow_multiframe=False))


def test_multipage_tiff_first_page() -> None:
    pages = [Image.new("RGB", (8, 6), c) for c in (GREEN, RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert pixel(load_image(data)) == GREEN
    with pytest.raises(ImageError, match="several frames"):
        load_image(data, ImageLimits(allow_multiframe=False))


# ---- preprocessing -----------------------------------------------------------------------


def test_preprocess_images_shape_dtype_and_determinism(red_png: Path) -> None:
    sources = [red_png, noise(30, 17), np.zeros((9, 9), np.uint8)]
    a = preprocess_images(sources, CFG)
    b = preprocess_images(sources, CFG)
    assert a.shape == (3, 3, 16, 16) and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(a[1], preprocess_image(noise(30, 17), CFG))
    check_pixel_values(a, CFG)


def test_preprocess_matches_reference_arithmetic() -> None:
    im = noise(16, 16, seed=3)
    x = preprocess_image(im, CFG)
    ref = (np.asarray(im, np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x, ref.transpose(2, 0, 1), atol=1e-5)


def test_pad_to_square_centred_with_mean_colour() -> None:
    cfg = PreprocessConfig(image_size=8, resample="nearest")
    x = preprocess_image(Image.new("RGB", (8, 4), WHITE), cfg)  # pads 2 rows above and below
    fill = np.array([int(m * 255) for m in CLIP_MEAN]) / 255
    pad_value = ((fill - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)
    white_value = ((1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)
    for row, expected in ((0, pad_value), (1, pad_value), (2, white_value), (5, white_value), (6, pad_value)):
        np.testing.assert_allclose(x[:, row, :], np.repeat(expected[:, None], 8, axis=1), atol=1e-6)
    # Tall image: columns padded on the left and right.
    padded = pad_to_square(Image.new("RGB", (2, 6), RED), (0, 0, 255))
    assert padded.size == (6, 6) and pixel(padded, (0, 0)) == BLUE and pixel(padded, (2, 3)) == RED
    assert pixel(padded, (4, 3)) == BLUE


def test_no_padding_stretches() -> None:
    cfg = PreprocessConfig(image_size=8, resample="nearest", pad_to_square=False)
    x = preprocess_image(Image.new("RGB", (8, 4), WHITE), cfg)
    white_value = ((1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)
    np.testing.assert_allclose(x, np.broadcast_to(white_value[:, None, None], x.shape), atol=1e-6)


@pytest.mark.parametrize("name", ["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos", "BICUBIC"])
def test_resample_names(name: str) -> None:
    assert resample_filter(name) is not None
    assert preprocess_image(noise(20, 12), PreprocessConfig(image_size=8, resample=name)).shape == (3, 8, 8)


@pytest.mark.parametrize(
    "cfg", [PreprocessConfig(resample="cubic-ish"), PreprocessConfig(image_size=0),
            PreprocessConfig(std=(0.0, 1.0, 1.0)), PreprocessConfig(mean=(0.5, 0.5))],
)
def test_bad_preprocess_config(cfg: PreprocessConfig) -> None:
    with pytest.raises(ConfigError):
        preprocess_images([noise(4, 4)], cfg)


def test_preprocess_images_names_the_bad_image() -> None:
    with pytest.raises(ImageError, match=r"^image 2 is not a supported image"):
        preprocess_images([noise(4, 4), b"garbage"], CFG)


def test_preprocess_images_wants_a_list(red_png: Path) -> None:
    for bad in (str(red_png), red_png, noise(4, 4), np.zeros((2, 4, 4, 3), np.uint8), b"x", 7):
        with pytest.raises(InputError, match="list of images"):
            preprocess_images(bad, CFG)
    assert preprocess_images([], CFG).shape == (0, 3, 16, 16)
    assert preprocess_images((noise(4, 4),), CFG).shape == (1, 3, 16, 16)


# ---- check_pixel_values ------------------------------------------------------------------


class _FakeDtype:
    is_floating_point = True

    def __str__(self) -> str:
        return "torch.float32"


class _FakeTensor:
    """Duck-typed stand-in for a torch tensor (the module must not import torch)."""

    def __init__(self, shape: tuple[int, ...], floating: bool = True) -> None:
        self.shape = shape
        self.dtype = _FakeDtype() if floating else type("D", (), {"is_floating_point": False})()


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((3, 16, 16), np.float32), "arr\\[None\\]"),
        (np.zeros((1, 16, 16, 3), np.float32), "channels-last"),
        (np.zeros((1, 1, 16, 16), np.float32), "3 channels"),
        (np.zeros((1, 3, 32, 32), np.float32), "16x16"),
        (np.zeros((1, 3, 16, 16), np.uint8), "floating-point"),
        ([[1.0]], "array of shape"),
        (_FakeTensor((2, 3, 8, 8)), "16x16"),
        (_FakeTensor((2, 3, 16, 16), floating=False), "floating-point"),
    ],
)
def test_check_pixel_values_refuses(arr, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        check_pixel_values(arr, CFG)


def test_check_pixel_values_accepts() -> None:
    check_pixel_values(np.zeros((2, 3, 16, 16), np.float32), CFG)
    check_pixel_values(np.zeros((1, 3, 16, 16), np.float16), CFG)
    check_pixel_values(_FakeTensor((4, 3, 16, 16)), CFG)


# ---- fuzzing -----------------------------------------------------------------------------


def _seed_files() -> list[bytes]:
    im = noise(12, 9, seed=7)
    frames = [noise(12, 9, seed=s).convert("P") for s in (8, 9)]
    rgba = im.convert("RGBA")
    return [
        encode(im, "PNG"),
        encode(rgba, "PNG"),
        encode(im, "JPEG", quality=80),
        encode(im, "JPEG", progressive=True),
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encode(im, "TIFF"),
        encode(im, "BMP"),
        encode(rgba, "WEBP"),
    ]


SEEDS = _seed_files()
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _assert_only_maven_errors(data: bytes) -> None:
    try:
        im = load_image(data)
    except MavenError:
        return
    assert isinstance(im, Image.Image) and im.mode == "RGB" and min(im.size) >= 1
    assert preprocess_image(im, PreprocessConfig(image_size=8)).shape == (3, 8, 8)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged files
@FUZZ_SETTINGS
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    _assert_only_maven_errors(data)


_MUTATION = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]),
    st.integers(min_value=0, max_value=2**16),
    st.binary(min_size=1, max_size=8),
)


def _mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, pos, blob in ops:
        if not buf:
            break
        i = pos % len(buf)
        if op == "flip":
            buf[i] ^= blob[0] or 0xFF
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = blob
        elif op == "delete":
            del buf[i:i + len(blob)]
        else:
            buf[i:i + len(blob)] = blob
    return bytes(buf)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged files
@FUZZ_SETTINGS
@given(st.sampled_from(range(len(SEEDS))), st.lists(_MUTATION, min_size=1, max_size=4))
def test_fuzz_mutated_valid_files(seed: int, ops: list[tuple[str, int, bytes]]) -> None:
    _assert_only_maven_errors(_mutate(SEEDS[seed], ops))


def test_seed_files_are_valid() -> None:
    for data in SEEDS:
        assert load_image(data).size == (12, 9)
    assert set(DEFAULT_FORMATS) >= {"PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP"}


# ---- bounded memory: fit to the square a strip of rows at a time (issue 31) --------------------------


def _old_pixel_values(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The preprocessing before issue 31: pad to a square of the long side, then Pillow's resize."""
    fill = tuple(min(255, max(0, int(m * 255))) for m in cfg.mean)
    if cfg.pad_to_square:
        im = pad_to_square(im, fill)
    im = im.resize((cfg.image_size, cfg.image_size), resample=resample_filter(cfg.resample))
    arr = (np.asarray(im, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _strip_reference(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """What the strip pipeline must equal: the whole RGB image, fit_to_square, normalised."""
    from maven_edge.core.preprocess import _normalise, resize_separable

    im = load_image(data)
    f = resample_filter(cfg.resample)
    fill = tuple(min(255, max(0, int(m * 255))) for m in cfg.mean)
    square = (fit_to_square(im, cfg.image_size, fill, f) if cfg.pad_to_square
              else resize_separable(im, (cfg.image_size, cfg.image_size), f))
    return _normalise(square, cfg)


def _random_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    if mode == "F":
        values = rng.random((h, w), dtype=np.float32) * 1000
        values[0, 0] = np.nan
        return Image.fromarray(values)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("strip_bytes", [64, 1 << 20])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "CMYK", "I;16", "F"])
def test_strips_are_bit_identical_to_the_whole_image(monkeypatch, mode: str, strip_bytes: int) -> None:
    """The strip pipeline (decoded file -> oriented RGB rows -> two resize passes) gives exactly
    the pixels of converting the whole image and calling fit_to_square on it, for every mode,
    EXIF orientation, filter and aspect ratio, with strips of one row and of many."""
    import maven_edge.core.preprocess as pre

    monkeypatch.setattr(pre, "STRIP_BYTES", strip_bytes)
    fmt = "TIFF" if mode in ("F", "I;16", "CMYK", "LA") else "PNG"
    cases = 0
    for i, ((w, h), orientation, resample, pad) in enumerate([
        ((37, 23), 1, "bicubic", True), ((23, 37), 6, "bicubic", True), ((100, 3), 8, "lanczos", True),
        ((3, 100), 3, "nearest", True), ((64, 64), 5, "bilinear", True), ((130, 200), 7, "bicubic", False),
        ((41, 17), 2, "box", True), ((17, 41), 4, "hamming", False),
    ]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(_random_image(mode, w, h, i), fmt, exif=exif.tobytes())
        cfg = PreprocessConfig(image_size=16, resample=resample, pad_to_square=pad)
        np.testing.assert_array_equal(preprocess_image(data, cfg), _strip_reference(data, cfg))
        cases += 1
    assert cases == 8


@pytest.mark.parametrize("side", [1, 7, 16, 33, 64, 100, 225])
@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_square_images_give_the_same_pixel_values_as_before(side: int, resample: str) -> None:
    """Padding a square image is a no-op, and for a square resized to a square Pillow runs its
    passes in the order preprocessing fixes: square images (every image of the synthetic splits)
    preprocess bit for bit as before issue 31, so greedy answers on the test split cannot change."""
    cfg = PreprocessConfig(image_size=16, resample=resample)
    im = noise(side, side, seed=side)
    np.testing.assert_array_equal(preprocess_image(encode(im, "PNG"), cfg), _old_pixel_values(im, cfg))


def test_test_split_images_preprocess_as_before() -> None:
    from maven_edge.model_src.data.splits import iter_samples

    cfg = PreprocessConfig(image_size=64)
    images = [im for s in iter_samples("test", 30) for im in s.images]
    assert len(images) >= 30
    new = preprocess_images([encode(im, "PNG") for im in images], cfg)
    old = np.stack([_old_pixel_values(im.convert("RGB"), cfg) for im in images])
    np.testing.assert_array_equal(new, old)


def test_non_square_image_is_fitted_then_padded() -> None:
    """A wide image is resized to image_size x (image_size * h / w), then centred on the mean colour."""
    from maven_edge.core.preprocess import fitted_size

    assert fitted_size(44721, 895, 64) == (64, 1) and fitted_size(895, 44721, 64) == (1, 64)
    assert fitted_size(30, 20, 16) == (16, 11) and fitted_size(20, 30, 16) == (11, 16)
    cfg = PreprocessConfig(image_size=8, resample="nearest")
    x = preprocess_image(Image.new("RGB", (16, 8), WHITE), cfg)
    white = ((1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)
    pad = ((np.array([int(m * 255) for m in CLIP_MEAN]) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD))
    np.testing.assert_allclose(x[:, 2:6, :], np.broadcast_to(white[:, None, None], (3, 4, 8)), atol=1e-6)
    np.testing.assert_allclose(x[:, :2, :], np.broadcast_to(pad.astype(np.float32)[:, None, None], (3, 2, 8)),
                               atol=1e-6)


def test_decode_memory_budget_refuses_before_decoding() -> None:
    """A progressive JPEG keeps every DCT coefficient while it decodes: its header says how much
    memory that takes, and an image over ImageLimits.max_decode_bytes is refused from the header."""
    from maven_edge.core.preprocess import decode_bytes

    im = noise(400, 300)
    progressive = encode(im, "JPEG", progressive=True, subsampling=0)
    baseline = encode(im, "JPEG")
    with Image.open(io.BytesIO(progressive)) as opened:
        need, why = decode_bytes(opened)
    assert need == 400 * 300 * 4 + 3 * 400 * 304 * 2 and "progressive" in why
    with Image.open(io.BytesIO(baseline)) as opened:
        assert decode_bytes(opened) == (400 * 300 * 4, "")
    limits = ImageLimits(max_decode_bytes=1_000_000)
    with pytest.raises(ImageError, match=r"needs about 1 MiB to decode \(a progressive JPEG .*max_decode_bytes"):
        load_image(progressive, limits)
    assert load_image(baseline, limits).size == (400, 300)
    with pytest.raises(ImageError, match="needs about"):
        preprocess_images([progressive], CFG, limits)


def test_request_pixel_budget_counts_every_image_before_decoding_it() -> None:
    big = encode(noise(40, 30), "PNG")  # 1200 px each
    assert preprocess_images([big, big], CFG, max_total_pixels=2400).shape[0] == 2
    with pytest.raises(ImageError, match=r"^image 3 \(40x30\) brings the request to 0.0 megapixels, over the limit"):
        preprocess_images([big, big, big], CFG, max_total_pixels=2400)


def test_regular_files_are_decoded_from_disk(tmp_path: Path, monkeypatch) -> None:
    """A path is handed to the decoder as an open file, not read into memory first."""
    import maven_edge.core.preprocess as pre

    path = tmp_path / "a.png"
    noise(20, 10).save(path)
    monkeypatch.setattr(pre, "_read_bounded", lambda *a: pytest.fail("a regular file was read into memory"))
    assert preprocess_image(path, CFG).shape == (3, 16, 16)
