"""ORT vs torch on every test question: token-for-token greedy parity and exact-match accuracy.

    python -m tools.parity_check                               # shipped tiny model, every test question
    python -m tools.parity_check --checkpoint DIR --artifacts DIR --limit 100

Runs each question of the split through the ORT pipeline (CPU) and the torch reference pipeline
with the default greedy options (64 new tokens), compares the token ids, and scores both answers
with the training evaluator's exact-match rule. When the checkpoint has an ``eval_report.json``
its overall accuracy is printed beside ours. Without ``--artifacts`` the checkpoint is exported
into the demo's cache folder like ``maven-edge demo`` does (once). Imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS
from maven_edge.model_src.resources import shipped_checkpoint
from maven_edge.runtime.commands import demo_artifacts_dir, ensure_demo_artifacts
from tools import emit_report


def run(checkpoint: Path, artifacts: Path | None, split: str, limit: int | None, max_new_tokens: int,
        threads: int) -> dict[str, Any]:
    from maven_edge.model_src.data.splits import iter_samples, num_samples
    from maven_edge.model_src.data.tasks import normalize_answer
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.pipeline import MavenPipeline

    if artifacts is None:
        artifacts = ensure_demo_artifacts(demo_artifacts_dir(), checkpoint, log=lambda m: print(m, file=sys.stderr))
    ort_pipe = MavenPipeline.from_artifacts(artifacts, session_options=SessionConfig(intra_op_num_threads=threads))
    torch_pipe = MavenPipeline.from_checkpoint(checkpoint)
    cfg = torch_pipe.config
    n = num_samples(split) if limit is None else min(limit, num_samples(split))
    samples = iter_samples(split, n, image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size)
    same, hits_ort, hits_torch = 0, 0, 0
    by_family: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # same, ort hits, count
    mismatches = []
    t0 = time.time()
    for i, s in enumerate(samples):
        a = ort_pipe.generate(s.images, s.prompt, max_new_tokens=max_new_tokens)
        b = torch_pipe.generate(s.images, s.prompt, max_new_tokens=max_new_tokens)
        eq = a.token_ids == b.token_ids
        ok_a = normalize_answer(a.text) == normalize_answer(s.answer)
        same += eq
        hits_ort += ok_a
        hits_torch += normalize_answer(b.text) == normalize_answer(s.answer)
        fam = by_family[s.family]
        fam[0] += eq
        fam[1] += ok_a
        fam[2] += 1
        if not eq and len(mismatches) < 20:
            mismatches.append({"index": i, "prompt": s.prompt, "ort": a.text, "torch": b.text})
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{n}: identical {same}/{i + 1}", file=sys.stderr, flush=True)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint), "artifacts": str(artifacts), "split": split, "questions": n,
        "max_new_tokens": max_new_tokens, "identical_token_ids": same,
        "ort_accuracy": hits_ort / n, "torch_accuracy": hits_torch / n,
        "family": {k: {"identical": v[0], "ort_accuracy": v[1] / v[2], "n": v[2]} for k, v in sorted(by_family.items())},
        "mismatches": mismatches, "seconds": round(time.time() - t0, 1),
    }
    eval_report = checkpoint / "eval_report.json"
    if eval_report.is_file():
        try:
            ev = json.loads(eval_report.read_text())
            report["eval_report_accuracy"] = ev.get("accuracy", ev.get("test", {}).get("accuracy"))
        except (json.JSONDecodeError, AttributeError):
            pass
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.parity_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(shipped_checkpoint()))
    ap.add_argument("--artifacts", help="an export of --checkpoint (default: the demo's export in the user cache, made if needed)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)
    report = run(Path(args.checkpoint), Path(args.artifacts) if args.artifacts else None, args.split, args.limit,
                 args.max_new_tokens, args.threads)
    emit_report(report, args.out)
    print(f"identical greedy token ids: {report['identical_token_ids']}/{report['questions']}; exact match: "
          f"ort {100 * report['ort_accuracy']:.1f}%, torch {100 * report['torch_accuracy']:.1f}%"
          + (f", eval_report {100 * report['eval_report_accuracy']:.1f}%"
             if isinstance(report.get("eval_report_accuracy"), (int, float)) else ""))
    return 0 if report["identical_token_ids"] == report["questions"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
