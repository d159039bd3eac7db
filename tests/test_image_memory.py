"""Peak memory of one request per image, at the edges of the documented limits (issue 31).

Every case runs in its own process (tools/image_memory.py: one process loads the pipeline and
warms it up, then forks a child per image, which resets the kernel's peak-RSS mark and answers
one request). Growth over that steady state must stay under 300 MB for every image the default
limits accept: ~100 KB files of zeros that decode to 40 megapixels at a 50:1 aspect ratio, every
PNG colour type and bit depth, EXIF-rotated and progressive (CMYK) JPEG, WebP and a TIFF decoded
as one strip. Before issue 31 the first case took about 8 GB. Linux only (/proc).

The default run measures DEFAULT_CASES; MAVEN_SOAK=1 measures every case tools/image_memory.py
makes. docs/reliability.md records the measured numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOUND_MB = 300
DEFAULT_CASES = (
    "png_rgb8_wide.png",  # 119 KB of zeros -> 44,700 x 894 RGB: the 8 GB case
    "png_rgb8_tall.png",
    "png_rgba16.png",  # 16-bit with alpha: the most expensive conversion
    "jpeg_exif_rotated_wide.jpg",  # rotated a strip at a time
    "jpeg_cmyk_progressive.jpg",  # decoder working set at the decode-memory limit
    "webp_lossless.webp",  # likewise
    "tiff_int16_one_strip.tif",  # one strip as large as the image
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@pytest.fixture(scope="module")
def artifacts(pytestconfig) -> Path:
    from tools.soak import cached_test_artifacts

    return cached_test_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"))


@pytest.fixture(scope="module")
def cases(pytestconfig) -> list[Path]:
    """The case files, made once per machine (in a child process, so this one stays small)."""
    names = None if os.environ.get("MAVEN_SOAK") else list(DEFAULT_CASES)
    key = hashlib.sha256((ROOT / "tools" / "image_memory.py").read_bytes()
                         + (ROOT / "core" / "preprocess.py").read_bytes()).hexdigest()[:12]
    out = pytestconfig.cache.mkdir("maven-image-cases") / key
    code = ("import json, sys; from pathlib import Path; from tools.image_memory import make_cases; "
            "print(json.dumps([str(p) for p in make_cases(Path(sys.argv[1]), names=json.loads(sys.argv[2]))]))")
    done = subprocess.run([sys.executable, "-c", code, str(out), json.dumps(names)], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=600)
    return [Path(p) for p in json.loads(done.stdout)]


def test_one_request_per_image_stays_under_the_memory_bound(artifacts, cases):
    done = subprocess.run(
        [sys.executable, "-m", "tools.image_memory", "--artifacts", str(artifacts), "--jobs", "2",
         *map(str, cases)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["image"] for r in results) == sorted(p.name for p in cases), done.stderr[-3000:]
    report = "\n".join(json.dumps(r) for r in results)
    for r in results:
        assert "crash" not in r, report
        assert r["error"] is None, f"an image inside the documented limits was refused:\n{report}"
        assert r["growth_mib"] * 2**20 / 1e6 < BOUND_MB, report
    wide = next(r for r in results if r["image"] == "png_rgb8_wide.png")
    assert wide["bytes"] < 150_000  # a ~100 KB file ...
    assert wide["growth_mib"] < 200  # ... that used to take about 8 GB (a 44,700-pixel square canvas)
