"""h_eos read in a separate pass (the paper's two passes) against h_eos read in context, on a split.

    python -m tools.h_eos_compare                                    # shipped tiny model, test split
    python -m tools.h_eos_compare --limit 100 --torch 40             # + torch == ORT on 40 questions
    python -m tools.h_eos_compare --checkpoint runs/R/final --out docs/usage/h_eos/tiny.json

Exports the checkpoint with the shared-buffer decoder (``export --decoder genai``) into the user
cache once (or takes ``--artifacts``), then answers every question greedily on the ONNX Runtime
pipeline twice, ``h_eos="separate"`` and ``h_eos="context"`` (caches off), and reports accuracy
per family, per image-count bucket and per video variant for both, how often the two give the same
tokens, how much of the kept patches they share, and their median time to first token. With
``--torch N`` the first N questions also run ``h_eos="context"`` on the torch backend: its token
ids and kept patches must equal onnxruntime's (the parity the issue asks for).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from maven_edge.core.paths import cache_dir
from maven_edge.model_src.resources import shipped_checkpoint
from maven_edge.runtime.commands import ensure_demo_artifacts
from tools import emit_report

WAYS = ("separate", "context")


def _keys(sample: Any) -> list[str]:
    from maven_edge.model_src.train.evaluate import image_bucket

    keys = ["overall", f"family/{sample.family}", f"task/{sample.task}"]
    if sample.family == "multi":
        keys.append(f"bucket/{image_bucket(len(sample.images))}/{sample.task}")
        keys.append(f"bucket/{image_bucket(len(sample.images))}/multi")
    if sample.family == "video":
        keys.append(f"video/{sample.meta.get('variant', 'all')}")
    return keys


def run(checkpoint: Path, artifacts: Path | None, split: str, limit: int | None, max_new_tokens: int,
        threads: int, torch_questions: int) -> dict[str, Any]:
    from tqdm import tqdm

    from maven_edge.model_src.data.splits import iter_samples, num_samples
    from maven_edge.model_src.data.tasks import normalize_answer
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.options import NO_CACHING
    from maven_edge.runtime.pipeline import MavenPipeline

    if artifacts is None:
        key = "tiny-genai" if checkpoint == shipped_checkpoint() else f"h_eos-{checkpoint.resolve().parent.name}"
        artifacts = ensure_demo_artifacts(cache_dir("demo", key), checkpoint, decoder="genai",
                                          log=lambda m: print(m, file=sys.stderr))
    pipe = MavenPipeline.from_artifacts(artifacts, session_options=SessionConfig(intra_op_num_threads=threads),
                                        caching=NO_CACHING)
    ref = MavenPipeline.from_checkpoint(checkpoint, caching=NO_CACHING) if torch_questions else None
    n = num_samples(split) if limit is None else min(limit, num_samples(split))
    cfg = pipe.config
    hits: dict[str, dict[str, list[int]]] = {w: defaultdict(list) for w in WAYS}
    ttft: dict[str, list[float]] = {w: [] for w in WAYS}
    same_tokens = compared_images = 0
    overlap: list[float] = []
    torch_same = torch_sel_same = 0
    samples = iter_samples(split, n, image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size)
    for i, s in enumerate(tqdm(samples, total=n, desc=f"h_eos {split}", mininterval=5.0, file=sys.stderr)):
        res = {}
        for w in (WAYS if i % 2 == 0 else WAYS[::-1]):  # alternate which runs first (warm caches)
            res[w] = pipe.generate(s.images, s.prompt, max_new_tokens=max_new_tokens, greedy=True, h_eos=w)
            ok = int(normalize_answer(res[w].text) == normalize_answer(s.answer))
            for k in _keys(s):
                hits[w][k].append(ok)
            ttft[w].append(res[w].timings.ttft_ms)
        same_tokens += res["separate"].token_ids == res["context"].token_ids
        for a, b in zip(res["separate"].selected_indices or [], res["context"].selected_indices or [], strict=True):
            overlap.append(len(set(a) & set(b)) / max(1, len(a)))
            compared_images += 1
        if ref is not None and i < torch_questions:
            t = ref.generate(s.images, s.prompt, max_new_tokens=max_new_tokens, greedy=True, h_eos="context")
            torch_same += t.token_ids == res["context"].token_ids
            torch_sel_same += t.selected_indices == res["context"].selected_indices

    def table(h: dict[str, list[int]]) -> dict[str, Any]:
        return {k: {"accuracy": 100.0 * sum(v) / len(v), "questions": len(v)} for k, v in sorted(h.items())}

    report: dict[str, Any] = {
        "command": " ".join(["python -m tools.h_eos_compare", *sys.argv[1:]]),
        "checkpoint": str(checkpoint), "artifacts": str(artifacts), "split": split, "questions": n,
        "max_new_tokens": max_new_tokens, "threads": threads,
        "kept_patches": cfg.num_kept_patches(cfg.selector.keep_ratio),
        "accuracy": {w: table(hits[w]) for w in WAYS},
        "delta_points": {k: 100.0 * (sum(hits["context"][k]) - sum(hits["separate"][k])) / len(hits["separate"][k])
                         for k in sorted(hits["separate"])},
        "same_tokens": same_tokens / n,
        "kept_patch_overlap_mean": statistics.fmean(overlap) if overlap else None,
        "images_compared": compared_images,
        "median_ttft_ms": {w: statistics.median(ttft[w]) for w in WAYS},
    }
    if ref is not None:
        m = min(n, torch_questions)
        report["torch_vs_ort_context"] = {"questions": m, "same_tokens": torch_same, "same_kept_patches": torch_sel_same}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.h_eos_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="trained checkpoint (default: the shipped tiny)")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="its export with the shared-buffer decoder (default: exported into the user cache)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="first N questions (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch", type=int, default=0, metavar="N",
                    help="also run the first N questions in context on the torch backend (parity)")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args(argv)
    checkpoint = args.checkpoint or shipped_checkpoint()
    report = run(checkpoint, args.artifacts, args.split, args.limit, args.max_new_tokens, args.threads, args.torch)
    emit_report(report, args.out)
    parity = report.get("torch_vs_ort_context")
    return 0 if parity is None or parity["same_tokens"] == parity["questions"] == parity["same_kept_patches"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
