"""`maven-edge bench --sections caches`: what the caches and continuous batching buy (issue #33).

Measured on one artifact set (ort backend, the shared-buffer decoder), every request with fresh
synthetic images unless the point is to reuse them:

* **follow-up TTFT**: a question about N images, then a follow-up in the same conversation
  (the first prompt, its answer, a new question): the follow-up reuses the conversation's KV
  prefix and every image's visual features. Ratio = first TTFT / follow-up TTFT (median of repeats).
* **seen image**: a new question (not a continuation) about the same images: the visual stages
  are skipped (their timings are reported; they should be 0 ms).
* **concurrent decode**: K streams started together with continuous batching, against one
  stream alone: aggregate decode tokens/s (tokens after each stream's first, over the time from
  the first first-token to the last token of any stream), and each stream's p95 time between its
  consecutive tokens (when each was sampled, `Timings.token_ms`: per token, however the text
  splits into the pieces a reader receives), against the single stream's p95; once with each scheduler policy
  (decode steps wait for prefills, the default, or go on beside them), the two taking turns.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: the issue's targets
TARGETS = {"followup_ttft_speedup": 10.0, "aggregate_decode_ratio": 2.5, "p95_token_latency_ratio": 2.0}


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def _prompt(n: int, question: str = "what is in the images?") -> str:
    return "".join(f"Image {i + 1}: <image>\n" for i in range(n)) + f"Question: {question}\nAnswer:"


def _timed_stream(pipe: Any, images: list[np.ndarray], prompt: str, new_tokens: int,
                  start: threading.Barrier | None = None) -> dict[str, Any]:
    """One streamed request: when each token was sampled (perf_counter seconds), and the result."""
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    stream = pipe.stream(images, prompt, max_new_tokens=new_tokens, stop_token_ids=[])
    for _ in stream:
        pass
    res = stream.result
    # the request's clock starts when the stream is first read, microseconds after t0
    token_at = [t0 + ms / 1e3 for ms in res.timings.token_ms]
    return {"token_at": token_at, "tokens": len(res.token_ids),
            "ttft_ms": res.timings.ttft_ms, "batched": res.cache.batched, "occupancy": res.cache.batch_occupancy}


def _gaps_ms(token_at: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(token_at, token_at[1:], strict=False)]


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


def _steady(res: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate rate and per-stream p95 gap over the window where every stream decodes (after the
    last first token, before the first last token): no stream's prefill shares the cores there."""
    lo = max(x["token_at"][0] for x in res)
    hi = min(x["token_at"][-1] for x in res)
    tokens = sum(sum(1 for t in x["token_at"] if lo < t <= hi) for x in res)
    gaps = [_gaps_ms([t for t in x["token_at"] if lo <= t <= hi]) for x in res]
    return {"window_s": hi - lo, "aggregate_tok_s": tokens / (hi - lo) if hi > lo else float("nan"),
            "p95_gap_ms": [_p95(g) for g in gaps]}


def measure(artifacts: str, threads: int, images: int = 4, new_tokens: int = 32, streams: int = 4,
            repeats: int = 3, progress: Callable[[int, int, str], None] | None = None,
            answer_tokens: int = 16) -> dict[str, Any]:
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.options import CachingOptions, PipelineLimits
    from maven_edge.runtime.pipeline import MavenPipeline

    progress = progress or (lambda done, total, label: None)
    so = SessionConfig(intra_op_num_threads=threads, inter_op_num_threads=1)
    pipe = MavenPipeline.from_artifacts(artifacts, session_options=so,
                                        caching=CachingOptions(max_batch=streams))
    pipe.limits = PipelineLimits(max_images=max(images, pipe.limits.max_images))
    size = pipe.config.preprocess.image_size
    policies = [True, False] if pipe.scheduler is not None else [None]  # scheduler policies (POLICIES)
    total, done = 3 * repeats + 2 * len(policies), 0
    out: dict[str, Any] = {"images": images, "new_tokens": new_tokens, "answer_tokens": answer_tokens,
                           "streams": streams, "repeats": repeats,
                           "describe": pipe.backend.describe(), "batching": pipe.scheduler is not None}
    pipe.generate(_images(1, size, 10_000), _prompt(1), max_new_tokens=4)  # warm-up (arenas, thread pools)

    # -- follow-up questions and seen images ----------------------------------------------------------
    first, follow, seen, seen_stages, follow_stages = [], [], [], [], []
    for r in range(repeats):
        imgs = _images(images, size, 100 + r)
        progress(done, total, f"first question, run {r + 1}/{repeats}")
        a = pipe.generate(imgs, _prompt(images), max_new_tokens=answer_tokens)
        done += 1
        progress(done, total, f"follow-up, run {r + 1}/{repeats}")
        b = pipe.generate(imgs, _prompt(images) + a.text + "\nQuestion: and which image is the brightest?\nAnswer:",
                          max_new_tokens=answer_tokens)
        done += 1
        c = pipe.generate(imgs, _prompt(images, "how many shapes are there?"), max_new_tokens=answer_tokens)
        first.append(a.timings.ttft_ms)
        follow.append(b.timings.ttft_ms)
        seen.append(c.timings.ttft_ms)
        follow_stages.append(b.timings.stages() | {"reused": b.cache.prefix_tokens_reused,
                                                   "computed": b.cache.prefix_tokens_computed})
        seen_stages.append(c.timings.stages() | {"visual_hits": c.cache.visual_hits})
    f_med, u_med = statistics.median(first), statistics.median(follow)
    out["followup"] = {
        "first_ttft_ms": first, "followup_ttft_ms": follow, "first_ttft_median_ms": f_med,
        "followup_ttft_median_ms": u_med, "speedup": f_med / u_med if u_med else float("nan"),
        "followup_stages": follow_stages, "target": TARGETS["followup_ttft_speedup"],
    }
    out["seen_image"] = {"ttft_ms": seen, "stages": seen_stages,
                         "visual_stage_ms_max": max(max(s[k] for k in ("vision", "discrete", "h_eos", "selector"))
                                                    for s in seen_stages)}

    # -- one stream, then K streams together --------------------------------------------------------
    single = []
    for r in range(repeats):
        progress(done, total, f"one stream, run {r + 1}/{repeats}")
        single.append(_timed_stream(pipe, _images(images, size, 500 + r), _prompt(images), new_tokens))
        done += 1
    single_rate = statistics.median((s["tokens"] - 1) / (s["token_at"][-1] - s["token_at"][0]) for s in single)
    single_p95 = statistics.median(_p95(_gaps_ms(s["token_at"])) for s in single)
    configured = pipe.scheduler.prefill_first if pipe.scheduler is not None else None
    out["concurrent_policies"] = {}
    runs_of: dict[Any, list[dict[str, Any]]] = {p: [] for p in policies}
    for r in range(2):  # the policies take turns, so a slow stretch of the machine falls on both
        for j, prefill_first in enumerate(policies):
            progress(done, total, f"{streams} streams together ({POLICIES[prefill_first]}), run {r + 1}/2")
            if pipe.scheduler is not None:
                pipe.scheduler.prefill_first = prefill_first
            runs_of[prefill_first].append(_together(pipe, streams, images, size, new_tokens,
                                                    seed=900 + 100 * j + 10 * r))  # fresh images every run
            done += 1
    for prefill_first, runs in runs_of.items():
        name = POLICIES[prefill_first]
        best = max(runs, key=lambda x: x["aggregate_tok_s"])
        out["concurrent_policies"][name] = {
            "single_tok_s": single_rate, "single_p95_gap_ms": single_p95, "runs": runs,
            "aggregate_tok_s": best["aggregate_tok_s"], "aggregate_ratio": best["aggregate_tok_s"] / single_rate,
            "worst_p95_gap_ms": max(best["p95_gap_ms"]), "p95_ratio": max(best["p95_gap_ms"]) / single_p95,
            "worst_ttft_ms": max(best["ttft_ms"]),
            "steady_aggregate_ratio": best["steady"]["aggregate_tok_s"] / single_rate,
            "steady_worst_p95_gap_ms": max(best["steady"]["p95_gap_ms"]),
            "steady_p95_ratio": max(best["steady"]["p95_gap_ms"]) / single_p95,
            "targets": {"aggregate_ratio": TARGETS["aggregate_decode_ratio"],
                        "p95_ratio": TARGETS["p95_token_latency_ratio"]},
        }
    if pipe.scheduler is not None:
        pipe.scheduler.prefill_first = configured
    out["concurrent"] = out["concurrent_policies"][POLICIES[policies[0]]]  # the default policy
    out["batched_step"] = batched_step_rates(pipe.backend, streams, prompt_len=400)
    out["cache_stats"] = pipe.cache_stats()
    progress(total, total, "done")
    return out


#: the scheduler's two ways to treat a prefill (runtime/batching.py), by `prefill_first`
POLICIES = {True: "prefill first", False: "decode during prefill", None: "no batching"}


def _together(pipe: Any, streams: int, images: int, size: int, new_tokens: int, seed: int) -> dict[str, Any]:
    """`streams` streams started together (a barrier), each with its own fresh images."""
    start = threading.Barrier(streams)
    res: list[dict[str, Any]] = [{}] * streams

    def worker(i: int) -> None:
        res[i] = _timed_stream(pipe, _images(images, size, seed + i), _prompt(images), new_tokens, start)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    begin = min(x["token_at"][0] for x in res)
    end = max(x["token_at"][-1] for x in res)
    return {"aggregate_tok_s": sum(x["tokens"] - 1 for x in res) / (end - begin),
            "p95_gap_ms": [_p95(_gaps_ms(x["token_at"])) for x in res],
            "ttft_ms": [x["ttft_ms"] for x in res],
            "occupancy": [x["occupancy"] for x in res], "batched": all(x["batched"] for x in res),
            "steady": _steady(res)}


def batched_step_rates(backend: Any, rows: int, prompt_len: int = 400, steps: int = 15) -> dict[str, Any] | None:
    """Tokens/s of one batched decode step with 1, 2, ... `rows` rows at `prompt_len` positions of
    cache each (the same prefilled prompt joined to every slot): what continuous batching can give
    at most once every stream decodes, without the prefills and readers of a real run. None for a
    backend that cannot batch."""
    capacity = prompt_len + 2 * steps + 8  # the prompt, the warm-up and timed steps, a margin
    batch = backend.open_batch(rows, capacity)
    if batch is None:
        return None
    ids = np.random.default_rng(0).integers(10, 1000, size=(1, prompt_len))
    counts = sorted({1, *[2 ** i for i in range(1, rows.bit_length())], rows})
    tok_s: dict[int, float] = {}
    for n in counts:
        slots = []
        for _ in range(n):
            _, state = backend.prefill(backend.embed(ids), capacity)
            slots.append(batch.join(state))
            state.release()  # its cache now lives in the slot
        feed = [(slot, 5) for slot in slots]
        times = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            batch.step(feed)
            if i >= 3:  # warm-up steps
                times.append(time.perf_counter() - t0)
        tok_s[n] = n / statistics.median(times)
        for slot in slots:
            batch.leave(slot)
    return {"prompt_len": prompt_len, "tok_s": tok_s, "ratio": tok_s[rows] / tok_s[1]}


def _steps_cell(b: dict[str, Any] | None) -> str:
    if not b:
        return "– (no batching)"
    rates = ", ".join(f"{n}: {v:.1f}" for n, v in sorted((int(k), v) for k, v in b["tok_s"].items()))
    return f"{rates} ({b['ratio']:.2f}×)"


def render(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines for the report: one row per precision."""
    if not results:
        return []
    lines = ["## Caches and continuous batching (`--sections caches`)", "",
             "| precision | first TTFT ms | follow-up TTFT ms | speed-up (target ≥ 10×) | seen image: visual stages ms "
             "| 1 stream tok/s | aggregate tok/s | ratio (target ≥ 2.5×) | worst p95 gap / single p95 (target ≤ 2×) "
             "| while all decode: ratio / p95 ratio | one batched step: rows → tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for precision, r in results.items():
        if r.get("status") != "measured":
            lines.append(f"| {precision} | {r.get('status')}: {r.get('reason', '')} | | | | | | | | | |")
            continue
        f, s = r["followup"], r["seen_image"]
        policies = r.get("concurrent_policies") or {"": r["concurrent"]}
        for i, (policy, c) in enumerate(policies.items()):
            label = f"{precision}, {policy}" if policy else precision
            head = (f"{f['first_ttft_median_ms']:.0f} | {f['followup_ttft_median_ms']:.0f} | {f['speedup']:.1f}× | "
                    f"{s['visual_stage_ms_max']:.1f}" if i == 0 else "〃 | 〃 | 〃 | 〃")
            lines.append(
                f"| {label} | {head} | {c['single_tok_s']:.1f} | "
                f"{c['aggregate_tok_s']:.1f} | {c['aggregate_ratio']:.2f}× | "
                f"{c['worst_p95_gap_ms']:.0f} / {c['single_p95_gap_ms']:.0f} ms = {c['p95_ratio']:.2f}× | "
                f"{c.get('steady_aggregate_ratio', float('nan')):.2f}× / {c.get('steady_p95_ratio', float('nan')):.2f}× | "
                f"{_steps_cell(r.get('batched_step')) if i == 0 else '〃'} |")
    any_r = next(iter(r for r in results.values() if r.get("status") == "measured"), None)
    if any_r:
        lines += ["", f"{any_r['images']} images per question; first question and follow-up answer with at most "
                  f"{any_r.get('answer_tokens', any_r['new_tokens'])} tokens, follow-up = the first prompt + its answer "
                  f"+ a new question (prefix KV and visual features reused); concurrency: {any_r['streams']} streams "
                  f"of {any_r['new_tokens']} tokens started together against one alone, median of {any_r['repeats']} "
                  "repeats. The p95 gap is the time between a stream's consecutive tokens (each timed when it is sampled, "
                  "`Timings.token_ms`, so per token however the text splits into pieces), over the whole "
                  "stream (other streams' prefills share the cores) and over the window where every stream decodes. "
                  "Each precision runs both scheduler policies in turn (runtime/batching.py): `prefill first` "
                  "(default: decode steps wait while a request encodes and prefills) and `decode during prefill`. "
                  "The last column times one batched decode step alone (each row a 400-position cache)."]
    return lines + [""]
