"""Node host vs Python ORT runtime: greedy token ids on every question of a split, the bundled demo,
and (with ``--resized``) preprocessed pixels and tokens for JPEG/PNG copies at other sizes.

    python -m tools.node_parity                          # shipped tiny model, every test question + demo
    python -m tools.node_parity --limit 50 --resized 20  # a quick run, plus 20 questions re-encoded
    python -m tools.node_parity --artifacts DIR          # any export (a quantized one, a genai decoder)

Writes every question's images as PNG files and its prompt into a work folder, answers them with
the Python ORT pipeline (CPU, greedy, 64 new tokens: `maven-edge eval`'s default) and with the Node host
(``hosts/node/tools/batch.js``, one process), and compares the token ids. ``--resized N`` also
re-encodes the images of the first N questions at other sizes (non-square PNG and JPEG, larger
and smaller than the model's input) and compares the preprocessed float32 tensors (max abs
difference) and the tokens. Prints a JSON report; exits 1 when any token ids differ.
Needs ``npm ci`` in hosts/node first. Without ``--artifacts`` the shipped checkpoint is exported
into the demo's cache folder like ``maven-edge demo`` does (once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS
from tools import emit_report

REPO = Path(__file__).resolve().parent.parent
NODE_HOST = REPO / "hosts" / "node"
#: (width, height, format) of the re-encoded copies: non-square both ways, up- and downscaled.
RESIZED = ((97, 131, "PNG"), (200, 150, "JPEG"), (333, 333, "JPEG"), (48, 80, "PNG"))


def default_artifacts() -> Path:
    from maven_edge.core.host_contract import add_host_section
    from maven_edge.model_src.resources import shipped_checkpoint
    from maven_edge.runtime.commands import demo_artifacts_dir, ensure_demo_artifacts

    out = ensure_demo_artifacts(demo_artifacts_dir(), shipped_checkpoint(), log=lambda m: print(m, file=sys.stderr))
    add_host_section(out)  # an export cached before the host section existed
    return out


def run_node(artifacts: Path, requests: list[dict[str, Any]], work: Path, threads: int) -> dict[str, dict[str, Any]]:
    """Answer `requests` with the Node host; returns answers by id."""
    if not (NODE_HOST / "node_modules").is_dir():
        raise SystemExit(f"the Node host's dependencies are not installed: run `npm ci` in {NODE_HOST}")
    req_file, out_file = work / "requests.jsonl", work / "node_answers.jsonl"
    req_file.write_text("".join(json.dumps(r) + "\n" for r in requests))
    subprocess.run(["node", str(NODE_HOST / "tools" / "batch.js"), "--artifacts", str(artifacts), "--requests",
                    str(req_file), "--out", str(out_file), "--threads", str(threads)], check=True)
    answers = [json.loads(line) for line in out_file.read_text().splitlines() if line.strip()]
    return {a["id"]: a for a in answers}


def run(artifacts: Path, split: str, limit: int | None, resized: int, threads: int, work: Path,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict[str, Any]:
    from PIL import Image

    from maven_edge.core.preprocess import preprocess_images
    from maven_edge.model_src.data.splits import iter_samples, num_samples
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.pipeline import MavenPipeline

    pipe = MavenPipeline.from_artifacts(artifacts, session_options=SessionConfig(intra_op_num_threads=threads))
    cfg = pipe.config
    n = num_samples(split) if limit is None else min(limit, num_samples(split))
    requests: list[dict[str, Any]] = []
    pixel_checks: list[tuple[str, list[str]]] = []
    for i, s in enumerate(iter_samples(split, n, image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size)):
        paths = []
        for k, im in enumerate(s.images):
            p = work / f"{split}_{i}_{k}.png"
            im.save(p)
            paths.append(str(p))
        requests.append({"id": f"{split}/{i}", "images": paths, "prompt": s.prompt, "max_new_tokens": max_new_tokens})
        if i < resized:
            for w, h, fmt in RESIZED:
                rpaths = []
                for k, im in enumerate(s.images):
                    p = work / f"{split}_{i}_{k}_{w}x{h}.{'jpg' if fmt == 'JPEG' else 'png'}"
                    im.resize((w, h), Image.Resampling.BILINEAR).save(p, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                    rpaths.append(str(p))
                rid = f"{split}/{i}@{w}x{h}.{fmt.lower()}"
                pixels = work / (rid.replace("/", "_") + ".f32")
                requests.append({"id": rid, "images": rpaths, "prompt": s.prompt, "max_new_tokens": max_new_tokens,
                                 "pixels_out": str(pixels)})
                pixel_checks.append((rid, rpaths))
    demo_dir = REPO / "model_src" / "samples"
    demo = json.loads((demo_dir / "demo.json").read_text())
    requests.append({"id": "demo", "images": [str(demo_dir / name) for name in demo["images"]], "prompt": demo["prompt"],
                     "max_new_tokens": max_new_tokens})

    t0 = time.time()
    python = {r["id"]: pipe.generate(r["images"], r["prompt"], max_new_tokens=r["max_new_tokens"]).token_ids
              for r in requests}
    t_python = time.time() - t0
    t0 = time.time()
    node = run_node(artifacts, requests, work, threads)
    t_node = time.time() - t0

    def same(rid: str) -> bool:
        return node.get(rid, {}).get("token_ids") == python[rid]

    base = [r["id"] for r in requests if "@" not in r["id"] and r["id"] != "demo"]
    mismatches = [{"id": rid, "python": python[rid], "node": node.get(rid)} for rid in python if not same(rid)]
    report: dict[str, Any] = {
        "artifacts": str(artifacts), "split": split, "questions": len(base), "max_new_tokens": max_new_tokens,
        "identical_token_ids": sum(same(rid) for rid in base), "demo_identical": same("demo"),
        "demo_text": node.get("demo", {}).get("text"), "seconds": {"python": round(t_python, 1), "node": round(t_node, 1)},
    }
    if pixel_checks:
        diffs = []
        for rid, paths in pixel_checks:
            ref = preprocess_images(paths, cfg.preprocess)
            got = np.fromfile(work / (rid.replace("/", "_") + ".f32"), dtype=np.float32).reshape(ref.shape)
            diffs.append(float(np.max(np.abs(got.astype(np.float64) - ref))))
        report["resized"] = {
            "requests": len(pixel_checks), "sizes": [f"{w}x{h} {f}" for w, h, f in RESIZED],
            "pixel_max_abs_diff": max(diffs), "pixel_identical": sum(d == 0.0 for d in diffs),
            "identical_token_ids": sum(same(rid) for rid, _ in pixel_checks),
        }
    report["mismatches"] = mismatches[:20]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, help="an export (default: the shipped tiny checkpoint's, in the cache)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="first N questions of the split (default: all)")
    ap.add_argument("--resized", type=int, default=0, metavar="N",
                    help="also re-encode the first N questions' images at other sizes (PNG and JPEG)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, help="folder for the images and answers (default: a temporary one)")
    ap.add_argument("--json-out", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    artifacts = args.artifacts or default_artifacts()
    with tempfile.TemporaryDirectory(prefix="maven-node-parity-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(artifacts, args.split, args.limit, args.resized, args.threads, work)
    emit_report(report, args.json_out)
    ok = report["identical_token_ids"] == report["questions"] and report["demo_identical"]
    ok = ok and report.get("resized", {}).get("identical_token_ids", 0) == report.get("resized", {}).get("requests", 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
