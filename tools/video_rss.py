"""Peak memory of decoding a long, large video with maven_edge.core.video (issue 36).

    python -m tools.video_rss --seconds 60 --size 1920x1080 --fps 1 --max-frames 60

writes a synthetic H.264 MP4 (moving coloured boxes, 30 frames per second, libx264 ultrafast) into
a temporary directory with PyAV, then decodes it in a fresh Python process with
``frames_from_video(path, fps, max_frames)`` and prints one JSON line: the decode's wall time, the
frames kept, and the process's peak RSS growth (``ru_maxrss`` after decoding minus the RSS just
before it, imports done). ``tests/test_video.py`` runs it with ``MAVEN_SLOW=1``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import av  # loaded before the baseline: the decode's growth, not the FFmpeg libraries'
import psutil
from maven_edge.core.video import frames_from_video
path, fps, max_frames, max_side = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
before = psutil.Process().memory_info().rss
t0 = time.perf_counter()
vf = frames_from_video(path, fps=fps, max_frames=max_frames, max_side=None if max_side == "none" else int(max_side))
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
print(json.dumps({"decode_s": round(wall, 2), "frames": len(vf.frames), "decoded": vf.decoded,
                  "duplicates": vf.duplicates, "fps": vf.fps, "width": vf.width, "height": vf.height,
                  "rss_before_mb": round(before / 2**20, 1), "peak_rss_mb": round(peak / 2**20, 1),
                  "peak_growth_mb": round((peak - before) / 2**20, 1)}))
"""


def make_video(path: Path, seconds: float, size: tuple[int, int], rate: int = 30) -> Path:
    """A synthetic H.264 MP4: a grey gradient with three coloured boxes moving across it."""
    import av

    w, h = size
    base = np.tile(np.linspace(40, 200, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    boxes = [((255, 40, 40), 0.11), ((40, 200, 60), 0.07), ((50, 90, 230), 0.05)]
    side = max(8, h // 6)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        for i in range(int(seconds * rate)):
            arr = base.copy()
            for k, (color, speed) in enumerate(boxes):
                x = int((i * speed * w / rate) % (w - side))
                y = (k + 1) * h // 4 - side // 2
                arr[y : y + side, x : x + side] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def measure(path: Path, fps: float, max_frames: int, max_side: int | None = None) -> dict:
    """Decode `path` in a fresh process; its JSON line as a dict."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(fps), str(max_frames),
                          "none" if max_side is None else str(max_side)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--size", default="1920x1080")
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--max-frames", type=int, default=60)
    p.add_argument("--max-side", type=int, default=None)
    p.add_argument("--video", type=Path, default=None, help="write the video here and keep it (reused if it exists)")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = args.video or Path(tmp) / "long.mp4"
        if not path.is_file():
            make_video(path, args.seconds, (w, h))
        made = time.perf_counter() - t0
        result = measure(path, args.fps, args.max_frames, args.max_side)
        result.update(seconds=args.seconds, size=args.size, file_mb=round(path.stat().st_size / 2**20, 1),
                      encode_s=round(made, 1), requested_fps=args.fps, max_frames=args.max_frames,
                      max_side=args.max_side)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
