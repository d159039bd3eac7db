"""Ask each image's count of a count-across question directly, in the same prompt.

    python -m tools.count_probe --checkpoint artifacts/runs/R36P/final            # 5-8-image questions
    python -m tools.count_probe --checkpoint DIR --min-images 2 --max-images 4 --out probe.json

For every `count_across` question of the split with ``--min-images``..``--max-images`` images
("how many red shapes are there in all the images?") the prompt is asked once per image with the
question "how many red shapes are there in image k?" (the `count_in_image` follow-up of
`PhaseConfig.image_count_followups`), greedy, with the evaluator's batch decoder, and each answer
is compared with that image's true count (0-2). The report gives the accuracy per true count: a
worked count's tally is right only when each of its terms is, so this says which per-image counts a
model gets wrong outside a tally (docs/training.md, "Issue 36", run R36P). Meaningful for a
checkpoint trained with those follow-ups; another one may answer with a total or a tally. Imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from maven_edge.model_src.resources import shipped_checkpoint
from tools import emit_report


def per_image_questions(split: str, min_images: int, max_images: int) -> tuple[list[Any], list[int]]:
    """The per-image count questions (samples with one question line replaced) and their true counts."""
    from maven_edge.model_src.data.counts import per_image_counts
    from maven_edge.model_src.data.splits import iter_samples, num_samples
    from maven_edge.model_src.data.tasks import question_line

    questions, truth = [], []
    for s in iter_samples(split, num_samples(split), tasks=("count_across",)):
        if not min_images <= len(s.images) <= max_images:
            continue
        line = question_line(s)
        counts = per_image_counts(line, s.scenes)
        asked = line.removesuffix(" in all the images?")
        for k, count in enumerate(counts, 1):
            prompt = s.prompt.replace(line, f"{asked} in image {k}?")
            questions.append(dataclasses.replace(s, prompt=prompt, answer=str(count)))
            truth.append(count)
    return questions, truth


def run(checkpoint: Path, split: str, min_images: int, max_images: int, batch: int = 16) -> dict[str, Any]:
    import torch

    from maven_edge.model_src.checkpoint import load_checkpoint
    from maven_edge.model_src.data.tasks import normalize_answer
    from maven_edge.model_src.train.evaluate import greedy_batch

    model = load_checkpoint(checkpoint).eval()
    questions, truth = per_image_questions(split, min_images, max_images)
    t0 = time.time()
    answers: list[str] = []
    with torch.no_grad():
        for i in range(0, len(questions), batch):
            answers += greedy_batch(model, questions[i:i + batch], "hybrid", max_new_tokens=4)[0]
    by_count: dict[str, list[int]] = {}
    for answer, count in zip(answers, truth, strict=True):
        hits = by_count.setdefault(str(count), [0, 0])
        hits[0] += normalize_answer(answer) == str(count)
        hits[1] += 1
    right = sum(h[0] for h in by_count.values())
    return {"checkpoint": str(checkpoint), "split": split, "images": [min_images, max_images],
            "questions": len(questions), "right": right, "accuracy": right / max(1, len(questions)),
            "by_true_count": {c: f"{h[0]}/{h[1]}" for c, h in sorted(by_count.items())},
            "examples": [{"prompt": q.prompt, "answer": q.answer, "prediction": a}
                         for q, a in list(zip(questions, answers, strict=True))[:5]],
            "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.count_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(shipped_checkpoint()))
    ap.add_argument("--split", default="test")
    ap.add_argument("--min-images", type=int, default=5)
    ap.add_argument("--max-images", type=int, default=8)
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)
    report = run(Path(args.checkpoint), args.split, args.min_images, args.max_images)
    emit_report(report, args.out)
    print(f"per-image counts asked directly: {report['right']}/{report['questions']} right; by true count "
          + ", ".join(f"{c}: {v}" for c, v in report["by_true_count"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
