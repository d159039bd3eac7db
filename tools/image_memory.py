"""Peak memory of one request per image: the check behind the per-image limits (docs/reliability.md).

    python -m tools.image_memory --artifacts DIR --make-cases CASES_DIR     # write the worst cases
    python -m tools.image_memory --artifacts DIR CASES_DIR/*.png photo.jpg   # measure each file

One process loads the pipeline (onnxruntime, one thread) and answers a warm-up request with a
small image; then, for every image, a child process is forked from that steady state, resets
the kernel's peak-RSS mark (``/proc/self/clear_refs``), answers one request with the image
and reports how far its peak resident set size (``VmHWM``) rose above the RSS it started with.
Each case runs in its own process, so no case can reuse memory another one freed. Linux only.

``--make-cases`` writes files at the edges of the default :class:`ImageLimits` (largest pixel
count at the widest and tallest aspect ratio, every PNG colour type and bit depth, baseline,
progressive and CMYK JPEG, EXIF-rotated JPEG, WebP, GIF, BMP, compressed TIFF in 16-bit, 32-bit
float and integer), most of them about 100 KB of zeros that decode to tens of megapixels.
Prints one JSON object per image: growth_mib, seconds, and the error for refused images.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from maven_edge.core.preprocess import ImageLimits

PROMPT = "<image>\nQuestion: what color is the circle?\nAnswer:"

# ---- case files --------------------------------------------------------------------------------


def zeros_zlib(n: int) -> bytes:
    """A zlib stream of `n` zero bytes, built without compressing them all: one flushed block
    of 1 MiB of zeros is repeated (each such block stands alone), then a final block."""
    unit = 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(unit)) + c.flush(zlib.Z_FULL_FLUSH)
    k, rest = divmod(n, unit)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = c.compress(bytes(rest)) + c.flush()
    adler = ((n % 65521) << 16) | 1  # adler32 of n zeros: a = 1, b = n
    return b"\x78\xda" + block * k + tail + struct.pack(">I", adler)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_zeros(width: int, height: int, color_type: int, bit_depth: int, extra: bytes = b"") -> bytes:
    """A PNG whose samples (and row filter bytes) are all zero."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = 1 + (width * channels * bit_depth + 7) // 8
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", zeros_zlib(row * height))
            + _chunk(b"IEND", b""))


def tiff_zeros(width: int, height: int, bits: int, sample_format: int, rows_per_strip: int) -> bytes:
    """A one-sample (grey) TIFF of zeros, deflate-compressed, strips of `rows_per_strip` rows."""
    row = (width * bits + 7) // 8
    strips = [zeros_zlib(row * min(rows_per_strip, height - y)) for y in range(0, height, rows_per_strip)]
    data_offset = 8
    offsets, pos = [], data_offset
    for s in strips:
        offsets.append(pos)
        pos += len(s)
    arrays_at = pos
    tags: list[tuple[int, int, int, Any]] = []
    extra = b""

    def array(values: list[int]) -> int:
        nonlocal extra
        at = arrays_at + len(extra)
        extra += struct.pack(f"<{len(values)}I", *values)
        return at

    n = len(strips)
    tags = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, bits), (259, 3, 1, 8), (262, 3, 1, 1),
        (273, 4, n, offsets[0] if n == 1 else array(offsets)), (277, 3, 1, 1), (278, 4, 1, rows_per_strip),
        (279, 4, n, len(strips[0]) if n == 1 else array([len(s) for s in strips])), (339, 3, 1, sample_format),
    ]
    ifd_at = arrays_at + len(extra)
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        ifd += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                        else struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_at) + b"".join(strips) + extra + ifd


def bmp_rle8_zeros(width: int, height: int) -> bytes:
    """An 8-bit run-length-encoded BMP of palette index 0 (runs of 255 pixels)."""
    row = b"".join(bytes([min(255, width - x), 0]) for x in range(0, width, 255)) + b"\x00\x00"
    pixels = row * height + b"\x00\x01"
    palette = b"\x00\x00\x00\x00" * 256
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def _largest(limits: ImageLimits, aspect: float, bytes_per_pixel: float = 4.0) -> tuple[int, int]:
    """The largest width x height at this aspect ratio inside the pixel and decode-memory limits."""
    pixels = min(limits.max_pixels, int(0.99 * limits.max_decode_bytes / bytes_per_pixel))
    h = max(1, math.isqrt(int(pixels / aspect)))
    w = max(1, min(int(h * aspect), pixels // h))
    return w, h


def make_cases(out: Path, limits: ImageLimits | None = None, names: Sequence[str] | None = None) -> list[Path]:
    """Write the worst-case files for `limits` (default: ImageLimits()) into `out` (only `names`,
    when given; files already there are kept) and return their paths."""
    from PIL import Image, ImageDraw

    limits = limits or ImageLimits()
    out.mkdir(parents=True, exist_ok=True)
    a = limits.max_aspect_ratio
    wide = _largest(limits, a)
    square = _largest(limits, 1.0)
    files: dict[str, Callable[[], bytes]] = {
        "png_rgb8_wide.png": lambda: png_zeros(*wide, 2, 8),
        "png_rgb8_tall.png": lambda: png_zeros(*wide[::-1], 2, 8),
        "png_rgba8_wide.png": lambda: png_zeros(*wide, 6, 8),
        "png_rgba16.png": lambda: png_zeros(*square, 6, 16),
        "png_rgb16.png": lambda: png_zeros(*square, 2, 16),
        "png_gray16.png": lambda: png_zeros(*square, 0, 16),
        "png_gray_alpha8.png": lambda: png_zeros(*square, 4, 8),
        "png_palette_trns.png": lambda: png_zeros(*square, 3, 8, _chunk(b"PLTE", b"\0\0\0\xff\xff\xff")
                                                  + _chunk(b"tRNS", b"\0")),
        "png_1bit.png": lambda: png_zeros(*square, 0, 1),
        "bmp_rle8_wide.bmp": lambda: bmp_rle8_zeros(*wide),
        "tiff_float32.tif": lambda: tiff_zeros(*_largest(limits, 1.0, 4 + 4 / 64), 32, 3, 64),
        "tiff_int16_one_strip.tif": lambda: tiff_zeros(*_largest(limits, 1.0, 2 + 2), 16, 1, 1 << 30),
    }

    def photo(size: tuple[int, int], mode: str = "RGB") -> Any:
        im = Image.new("RGB", size, (40, 90, 160))
        ImageDraw.Draw(im).ellipse((size[0] // 8, size[1] // 8, size[0] * 7 // 8, size[1] * 7 // 8),
                                   fill=(200, 60, 40))
        return im.convert(mode)

    def save(size: tuple[int, int], fmt: str, mode: str = "RGB", **kw: Any) -> Callable[[], bytes]:
        def make() -> bytes:
            import io

            buf = io.BytesIO()
            photo(size, mode).save(buf, fmt, **kw)
            return buf.getvalue()
        return make

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    files.update({
        "jpeg_baseline.jpg": save(square, "JPEG", quality=90),
        "jpeg_exif_rotated_wide.jpg": save(wide, "JPEG", quality=90, exif=exif.tobytes()),
        "jpeg_progressive.jpg": save(_largest(limits, 1.0, 4 + 3), "JPEG", progressive=True, quality=90),
        "jpeg_cmyk_progressive.jpg": save(_largest(limits, 1.0, 4 + 8), "JPEG", "CMYK", progressive=True),
        "webp_lossless.webp": save(_largest(limits, min(a, 6.0), 16), "WEBP", lossless=True),
        "gif_wide.gif": save(wide, "GIF"),
    })
    unknown = sorted(set(names or ()) - set(files))
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known: {sorted(files)}")
    written = []
    for name, make in files.items():
        if names is not None and name not in names:
            continue
        path = out / name
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(make())
            tmp.replace(path)
        written.append(path)
    return written


# ---- measuring ----------------------------------------------------------------------------------


def _status() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _one(pipe: Any, image: str) -> dict[str, Any]:
    """Run in a forked child: the peak RSS growth of one request with `image`."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before, _ = _status()
    t0 = time.perf_counter()
    error = None
    try:
        pipe.generate([image], PROMPT, max_new_tokens=4)
    except Exception as exc:  # reported, not raised: the parent decides
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0
    _, peak = _status()
    return {"image": os.path.basename(image), "bytes": os.path.getsize(image), "rss_before_mib": round(before, 1),
            "growth_mib": round(peak - before, 1), "seconds": round(seconds, 2), "error": error}


def _fork_case(pipe: Any, image: str) -> tuple[int, int]:
    """Fork a child that measures `image` and writes its JSON result to a pipe: (pid, read fd)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, exit without running the parent's cleanup
        os.close(read)
        try:
            payload = json.dumps(_one(pipe, image)).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = json.dumps({"image": os.path.basename(image), "crash": repr(exc)}).encode()
        with os.fdopen(write, "wb") as w:
            w.write(payload)
        os._exit(0)
    os.close(write)
    return pid, read


def _collect(image: str, pid: int, read: int) -> dict[str, Any]:
    with os.fdopen(read, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)
    return {"image": os.path.basename(image), "crash": f"the child died (wait status {status})"}


def measure(artifacts: str | Path, images: list[str], warmup_image: str, jobs: int = 1) -> list[dict[str, Any]]:
    """Load a pipeline, warm it up, then measure each image in its own forked process, `jobs` at a time."""
    from tools.soak import load_pipeline

    pipe = load_pipeline(artifacts)
    for _ in range(2):
        pipe.generate([warmup_image], PROMPT, max_new_tokens=4)
    results: list[dict[str, Any]] = []
    running: list[tuple[str, int, int]] = []
    for image in [*images, *[None] * jobs]:
        if image is not None:
            running.append((image, *_fork_case(pipe, image)))
        if len(running) >= jobs or (image is None and running):
            result = _collect(*running.pop(0))
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    from maven_edge.model_src.resources import samples_dir

    ap = argparse.ArgumentParser(prog="python -m tools.image_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, help="exported artifacts to run the requests on")
    ap.add_argument("--make-cases", metavar="DIR", help="write the worst-case files into DIR and measure them")
    ap.add_argument("--cases", help="with --make-cases: comma-separated file names to write (default all)")
    ap.add_argument("--jobs", type=int, default=1, help="cases measured at once, each in its own process (default 1)")
    ap.add_argument("images", nargs="*", help="image files to measure")
    args = ap.parse_args(argv)
    images = list(args.images)
    if args.make_cases:
        names = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
        images += [str(p) for p in make_cases(Path(args.make_cases), names=names)]
    if not images:
        ap.error("give image files, or --make-cases DIR")
    measure(args.artifacts, images, str(samples_dir() / "demo_1.png"), jobs=max(1, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
