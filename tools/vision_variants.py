"""Which int8 variant and thread setting make the vision side fastest (issue 35, docs/benchmarks.md).

    python -m tools.vision_variants ARTIFACTS [--images 4] [--threads 2] [--runs 5] [--out DIR]

For the vision encoder and the discrete tokenizer of an fp32 export (edge-small for the numbers in
the docs), writes five variants with the project's own quantizer functions: fp32, fp32 with
onnxruntime's transformer fusions (:func:`maven_edge.calibration.quantize.fuse_transformer`),
int8 dynamic, fused + int8 dynamic (the ``latency-*`` recipes) and fused + int8 static (QDQ,
calibrated on the synthetic validation split), and times each on a batch of ``--images`` images
with ``--threads`` intra-op threads, spin-waiting on and off (``session.intra_op.allow_spinning``).
The variants of one component run one after another, so load from other processes hits them
alike; on a shared machine compare within a column, not with another run. Writes
``vision_variants.json`` into ``--out`` (default artifacts/vision_variants) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from maven_edge.calibration.quantize import (
        CalibrationInput,
        QuantizeOptions,
        _attention_geometry,
        _int8_dynamic,
        _int8_fused_dynamic,
        _int8_fused_static,
        fuse_transformer,
    )
    from maven_edge.calibration.readers import ComponentFeeds, make_ort_reader, resolve_calibration_set
    from maven_edge.core.manifest import load_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", help="fp32 artifacts (maven-edge export)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--components", default="vision_encoder,discrete_tokenizer")
    ap.add_argument("--out", default="artifacts/vision_variants")
    a = ap.parse_args(argv)

    art, out = Path(a.artifacts), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = QuantizeOptions(calib_samples=a.calib_samples)
    manifest = load_manifest(art)
    feeds = ComponentFeeds(art, resolve_calibration_set(None, manifest, a.calib_samples, "val", False), manifest)
    results: dict[str, dict[str, float]] = {}
    try:
        for name in [c.strip() for c in a.components.split(",") if c.strip()]:
            src = art / manifest.components[name].file.path
            variants = {"fp32": src}
            variants["fused"] = out / f"{name}.fused.onnx"
            fuse_transformer(src, variants["fused"], *_attention_geometry(src))
            variants["int8-dynamic"] = out / f"{name}.int8-dynamic.onnx"
            _int8_dynamic(src, variants["int8-dynamic"], opts, None)
            variants["fused+int8-dynamic"] = out / f"{name}.fused-int8-dynamic.onnx"
            _int8_fused_dynamic(src, variants["fused+int8-dynamic"], opts, None)
            variants["fused+int8-static"] = out / f"{name}.fused-int8-static.onnx"
            _int8_fused_static(src, variants["fused+int8-static"], opts,
                               CalibrationInput(make_ort_reader(feeds.feeds(name), name)))
            feed = {k: np.repeat(v[:1], a.images, axis=0) if v.ndim > 1 else v for k, v in feeds.feeds(name)[0].items()}
            for label, path in variants.items():
                for spin in (1, 0):
                    so = ort.SessionOptions()
                    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
                    so.add_session_config_entry("session.intra_op.allow_spinning", str(spin))
                    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                    sess.run(None, feed)
                    times = []
                    for _ in range(a.runs):
                        t0 = time.perf_counter()
                        sess.run(None, feed)
                        times.append((time.perf_counter() - t0) * 1e3)
                    key = f"{label} spin={spin}"
                    results.setdefault(name, {})[key] = statistics.median(times)
                    print(f"{name:20s} {key:28s} {statistics.median(times):9.1f} ms median of {a.runs} "
                          f"({a.images} images, {a.threads} threads)", flush=True)
    finally:
        feeds.close()
    report = {"artifacts": str(art), "images": a.images, "threads": a.threads, "runs": a.runs, "median_ms": results}
    (out / "vision_variants.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
