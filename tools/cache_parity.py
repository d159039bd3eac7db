"""Caches and continuous batching change no answer: every test question, with and without each.

    python -m tools.cache_parity                       # shipped tiny model, every test question
    python -m tools.cache_parity --limit 60 --out docs/usage/runtime_perf/cache_parity_tiny.json

Exports the checkpoint with the shared-buffer decoder (`export --decoder genai`, what continuous
batching runs on) into the user cache once, then answers every question of the split (greedy,
32 new tokens) on five pipelines over the same backend and compares the token ids with the first:

1. ``off``: no caches, no batching (the reference);
2. ``visual``: the visual-feature cache only, every question asked twice (the second is a hit);
3. ``prefix``: the prefix KV cache only, every question asked twice (the second reuses all but
   its last position) and then as a follow-up turn of itself;
4. ``batched``: continuous batching only, four threads asking interleaved questions;
5. ``all``: every feature together, four threads, each question twice.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

from maven_edge.core.paths import cache_dir
from maven_edge.model_src.resources import shipped_checkpoint
from maven_edge.runtime.commands import ensure_demo_artifacts
from tools import emit_report


def _threads(fn: Any, n_items: int, threads: int) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(t, n_items, threads):
                fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def run(checkpoint: Path, artifacts: Path | None, split: str, limit: int | None, max_new_tokens: int,
        threads: int) -> dict[str, Any]:
    from maven_edge.model_src.data.splits import iter_samples, num_samples
    from maven_edge.runtime.backends.ort_backend import OrtBackend
    from maven_edge.runtime.options import CachingOptions
    from maven_edge.runtime.pipeline import MavenPipeline

    if artifacts is None:
        artifacts = ensure_demo_artifacts(cache_dir("demo", "tiny-genai"), checkpoint, decoder="genai",
                                          log=lambda m: print(m, file=sys.stderr))
    backend = OrtBackend(artifacts, session_options={"intra_op_num_threads": threads})
    n = num_samples(split) if limit is None else min(limit, num_samples(split))
    cfg = backend.config
    samples = list(iter_samples(split, n, image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size))

    def pipe(visual: int, prefix: int, batch: int) -> MavenPipeline:
        return MavenPipeline(backend, caching=CachingOptions(visual_cache_mb=visual, prefix_cache_mb=prefix,
                                                             max_batch=batch))

    def answer(p: MavenPipeline, i: int, prompt: str | None = None) -> list[int]:
        s = samples[i]
        return p.generate(s.images, prompt or s.prompt, max_new_tokens=max_new_tokens).token_ids

    t0 = time.time()
    ref = [answer(pipe(0, 0, 1), i) for i in range(n)]
    print(f"  reference: {n} questions in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "artifacts": str(artifacts), "split": split,
                           "questions": n, "max_new_tokens": max_new_tokens, "variants": {}}

    def record(name: str, got: list[list[int] | None], p: MavenPipeline, extra: dict[str, Any] | None = None) -> None:
        same = sum(g == r for g, r in zip(got, ref, strict=True))
        out["variants"][name] = {"identical": same, "compared": len(got), **(extra or {}), **p.cache_stats()}
        print(f"  {name}: identical {same}/{len(got)}", file=sys.stderr, flush=True)

    def twice(p: MavenPipeline, i: int) -> tuple[list[int], list[int]]:
        """The question, then at once the same question again: the second is a cache hit whatever
        the cache's size (asking all n first would let a bounded LRU evict them before the repeat)."""
        return answer(p, i), answer(p, i)

    def each_twice(p: MavenPipeline) -> tuple[list[list[int]], list[list[int]]]:
        """Every question asked twice in a row: (first answers, repeated answers)."""
        pairs = [twice(p, i) for i in range(n)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    p = pipe(64, 0, 1)
    first, again = each_twice(p)
    record("visual", first, p, {"second_pass_identical": sum(a == r for a, r in zip(again, ref, strict=True))})

    p = pipe(0, 256, 1)
    first, again = each_twice(p)
    ref_follow, follow = [], []
    plain = pipe(0, 0, 1)
    for i in range(min(n, 100)):  # a follow-up turn: the question, its answer, the question again
        text = p.tokenizer.decode(first[i])
        prompt = samples[i].prompt + text + "\n" + samples[i].prompt.split("\n")[-2] + "\nAnswer:"
        follow.append(answer(p, i, prompt))
        ref_follow.append(answer(plain, i, prompt))
    record("prefix", first, p, {"second_pass_identical": sum(a == r for a, r in zip(again, ref, strict=True)),
                                "followups_identical": sum(a == b for a, b in zip(follow, ref_follow, strict=True)),
                                "followups": len(follow)})

    p = pipe(0, 0, 4)
    got: list[list[int] | None] = [None] * n
    _threads(lambda i: got.__setitem__(i, answer(p, i)), n, 4)
    record("batched", got, p)

    p = pipe(64, 256, 4)
    got = [None] * n
    got2: list[list[int] | None] = [None] * n

    def both(i: int) -> None:
        got[i], got2[i] = twice(p, i)

    _threads(both, n, 4)
    record("all", got, p, {"second_pass_identical": sum(a == r for a, r in zip(got2, ref, strict=True))})
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.cache_parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(shipped_checkpoint()))
    ap.add_argument("--artifacts", help="an export of --checkpoint with the shared-buffer decoder (default: made once "
                    "in the user cache)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)
    report = run(Path(args.checkpoint), Path(args.artifacts) if args.artifacts else None, args.split, args.limit,
                 args.max_new_tokens, args.threads)
    emit_report(report, args.out)
    ok = all(v["identical"] == v["compared"] for v in report["variants"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
