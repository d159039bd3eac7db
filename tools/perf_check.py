"""Measured runtime checks for docs/usage/runtime.md (issue 6): decode speed, KV-cache cost, memory.

    python -m tools.perf_check                      # everything below, edge-small + tiny
    python -m tools.perf_check --only decode        # edge-small only
    python -m tools.perf_check --only rss --rss-runs 500

1. ``edge-small`` (random seeded weights, exported once to ``artifacts/perf/``): one request with
   4 images and 32 new tokens through the ORT backend and through our torch eager backend; per-stage
   timings, TTFT, decode tokens/s, and the ratio of their mean decode-step times.
2. KV cache: the decode-step time at past length 64 vs 512 on the ORT backend (IOBinding, the
   cache stays in OrtValues), next to a naive loop that round-trips the whole cache through numpy
   every step, the torch eager backend, and the time one full-cache copy takes at that length.
   All loops (both past lengths x three kinds) advance one step in turn, so load from other
   processes, and its drift over time, hits them alike.
3. Memory: resident set size over N consecutive generations in one process (``tiny`` geometry,
   random weights unless ``--rss-artifacts`` names an export), growth after a warm-up.

Writes a JSON report (``--out``, default ``artifacts/perf/runtime_perf.json``) and prints a summary.
Imports torch (for the export and the torch baseline); the runtime itself does not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.model_src.resources import samples_dir
from tools.soak import rss_mb

REPO = Path(__file__).resolve().parent.parent
SAMPLES = samples_dir()


def export_random(preset: str, root: Path, seed: int = 0, overrides: list[str] | None = None) -> tuple[Any, Path]:
    """A seeded random model of `preset` and its export under `root` (reused when the weights match)."""
    from maven_edge.core.config import get_config
    from maven_edge.core.manifest import MANIFEST, load_manifest
    from maven_edge.export.onnx_export import ExportOptions, export_model, model_fingerprint
    from maven_edge.model_src.checkpoint import build_model

    model = build_model(get_config(preset, overrides), seed=seed)
    fp = model_fingerprint(model)
    out = root / f"{preset}-{fp[:12]}"
    if (out / MANIFEST).is_file():
        try:
            if load_manifest(out, verify=False).extra.get("model_fingerprint") == fp:
                return model, out
        except Exception:  # broken export: redo it
            pass
    t0 = time.perf_counter()
    print(f"exporting {preset} (random, seed {seed}) to {out} ...", flush=True)
    export_model(model, ExportOptions(out=out, force=True, progress=True, check_load=False))
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return model, out


def demo_images(n: int) -> list[str]:
    names = json.loads((SAMPLES / "demo.json").read_text())["images"]
    return [str(SAMPLES / names[i % len(names)]) for i in range(n)]


def question(n: int) -> str:
    return "<image>" * n + "\nQuestion: which image has a red square?\nAnswer:"


# ---- 1. end to end + decode-step ratio ----------------------------------------------------------


def end_to_end(pipe: Any, n_images: int, new_tokens: int) -> dict[str, Any]:
    """One request; EOS is made impossible (stop only at the length) so every run decodes new_tokens."""
    images, prompt = demo_images(n_images), question(n_images)
    pipe.generate(images, prompt, max_new_tokens=2)  # warm-up: allocations, first-run graph work
    res = _generate_no_eos(pipe, images, prompt, new_tokens)
    t = res.timings
    steps = t.decode_step_ms
    return {
        "backend": pipe.backend.name,
        "generated_tokens": len(res.token_ids),
        "prompt_tokens": res.prompt_tokens,
        "visual_tokens_per_image": res.visual_tokens_per_image,
        "stages_ms": {k: round(v, 1) for k, v in t.stages().items()},
        "total_ms": round(t.total_ms, 1),
        "stages_sum_ms": round(t.stages_sum_ms, 1),
        "ttft_ms": round(t.ttft_ms, 1),
        "decode_tokens_per_s": round(t.decode_tokens_per_s, 2),
        "decode_step_mean_ms": round(float(np.mean(steps)), 2) if steps else None,
        "decode_step_median_ms": round(float(np.median(steps)), 2) if steps else None,
    }


def _generate_no_eos(pipe: Any, images: list[str], prompt: str, new_tokens: int) -> Any:
    """Greedy, but with <eos> masked so random weights cannot stop early (benchmark only)."""
    be = pipe.backend
    eos = pipe.tokenizer.eos_id

    class NoEos:
        def __getattr__(self, name: str) -> Any:
            return getattr(be, name)

        def prefill(self, *a: Any) -> Any:
            logits, state = be.prefill(*a)
            logits[eos] = -np.inf
            return logits, state

        def decode(self, *a: Any) -> Any:
            logits = be.decode(*a)
            logits[eos] = -np.inf
            return logits

    from maven_edge.runtime.pipeline import MavenPipeline

    return MavenPipeline(NoEos(), pipe.limits).generate(images, prompt, max_new_tokens=new_tokens)  # type: ignore[arg-type]


# ---- 2. KV cache cost ------------------------------------------------------------------------------


def _random_embeds(backend: Any, length: int, seed: int = 0) -> np.ndarray:
    d = backend.config.llm.hidden_size
    return (np.random.default_rng(seed).standard_normal((1, length, d)) * 0.02).astype(np.float32)


def pipeline_stepper(backend: Any, past: int, steps: int) -> Any:
    """A function that runs one more decode step of `backend` (after a prefill of `past` positions)."""
    _, state = backend.prefill(_random_embeds(backend, past), past + steps + 1)
    counter = iter(range(100, 100 + steps + 1))
    return lambda: backend.decode(state, next(counter))


def naive_stepper(backend: Any, past: int) -> Any:
    """The loop to avoid: session.run with numpy feeds, so the whole cache goes out of the session
    into host arrays and back in every step."""
    sess = backend.dec.sess
    c = backend.config.llm
    rng = np.random.default_rng(0)
    names = backend.past_names
    cache = {n: (rng.standard_normal((1, c.num_kv_heads, past, c.head_dim)) * 0.1).astype(np.float32)
             for n in names}
    length = [past]

    def step() -> None:
        nonlocal cache
        length[0] += 1
        feeds = {"inputs_embeds": (rng.standard_normal((1, 1, c.hidden_size)) * 0.02).astype(np.float32),
                 "attention_mask": np.ones((1, length[0]), np.int64), **cache}
        if backend.uses_position_ids:
            feeds["position_ids"] = np.array([[length[0] - 1]], np.int64)
        outs = sess.run(["logits", *backend.present_names], feeds)
        cache = {n: np.array(o) for n, o in zip(names, outs[1:], strict=True)}  # host copy of the cache

    return step


def cache_copy_ms(cfg: Any, length: int, repeats: int = 5) -> tuple[float, float]:
    """(MB of KV cache at `length`, ms to copy all of it once in host memory)."""
    c = cfg.llm
    arrays = [np.ones((1, c.num_kv_heads, length, c.head_dim), np.float32) for _ in range(2 * c.num_layers)]
    mb = sum(a.nbytes for a in arrays) / 2**20
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ = [a.copy() for a in arrays]
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return mb, best


def kv_report(ort_backend: Any, torch_backend: Any | None, pasts: tuple[int, ...], steps: int) -> dict[str, Any]:
    """Decode-step medians at each past length. All loops (every past length x ort, naive, torch)
    advance one step in turn, round after round, so load from other processes and its drift over
    time hit all of them alike."""
    pipeline_stepper(ort_backend, 8, 2)()  # warm-up
    steppers: dict[tuple[int, str], Any] = {}
    for past in pasts:
        steppers[past, "ort_iobinding"] = pipeline_stepper(ort_backend, past, steps)
        steppers[past, "ort_naive_numpy"] = naive_stepper(ort_backend, past)
        if torch_backend is not None:
            steppers[past, "torch_eager"] = pipeline_stepper(torch_backend, past, steps)
    times: dict[tuple[int, str], list[float]] = {k: [] for k in steppers}
    for _ in range(steps):
        for key, step in steppers.items():
            t0 = time.perf_counter()
            step()
            times[key].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {}
    for past in pasts:
        row: dict[str, Any] = {f"{kind}_median_ms": round(statistics.median(v), 2)
                               for (p, kind), v in times.items() if p == past}
        if torch_backend is not None:
            row["torch_over_ort"] = round(row["torch_eager_median_ms"] / row["ort_iobinding_median_ms"], 2)
        mb, ms = cache_copy_ms(ort_backend.config, past)
        row["kv_cache_mb"] = round(mb, 2)
        row["one_full_cache_copy_ms"] = round(ms, 2)
        out[str(past)] = row
        print(f"  past {past}: {row}", flush=True)
    if len(pasts) >= 2:
        lo, hi = str(min(pasts)), str(max(pasts))
        out["ort_step_ratio_longest_over_shortest"] = round(
            out[hi]["ort_iobinding_median_ms"] / out[lo]["ort_iobinding_median_ms"], 3)
    return out


# ---- 3. memory ---------------------------------------------------------------------------------------


def rss_growth(pipe: Any, images: list[str], prompt: str, n: int = 200, max_new_tokens: int = 8,
               warmup: int = 10, every: int = 25) -> dict[str, Any]:
    """RSS over `n` consecutive generations (after `warmup` more), sampled every `every` calls."""
    for i in range(warmup):
        pipe.generate(images, prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=i)
    gc.collect()
    start = rss_mb()
    samples = [(0, round(start, 1))]
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        pipe.generate(images, prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=i)
        if i % every == 0 or i == n:
            samples.append((i, round(rss_mb(), 1)))
    gc.collect()
    end = rss_mb()
    return {"generations": n, "warmup": warmup, "max_new_tokens": max_new_tokens,
            "rss_start_mb": round(start, 1), "rss_end_mb": round(end, 1),
            "growth_after_warmup_mb": round(end - start, 1), "samples": samples,
            "seconds": round(time.perf_counter() - t0, 1)}


# ---- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.perf_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="edge-small")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per past length")
    ap.add_argument("--pasts", default="64,512")
    ap.add_argument("--rss-runs", type=int, default=200)
    ap.add_argument("--rss-artifacts", help="artifacts for the memory run (default: random tiny export)")
    ap.add_argument("--only", choices=("decode", "kv", "rss"),
                    help="run one part: decode = end to end + KV cache, kv = KV cache only, rss = memory")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch eager baseline")
    ap.add_argument("--threads", type=int, default=0,
                    help="onnxruntime intra-op threads and torch threads (0 = their defaults)")
    ap.add_argument("--root", default=str(REPO / "artifacts" / "perf"))
    ap.add_argument("--out", default=str(REPO / "artifacts" / "perf" / "runtime_perf.json"))
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.options import NO_CACHING
    from maven_edge.runtime.pipeline import MavenPipeline

    root = Path(args.root)
    report: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "onnxruntime": ort.__version__,
                    "python": platform.python_version(),
                    "load_average_at_start": [round(x, 1) for x in os.getloadavg()]},
        "command": "python -m tools.perf_check " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    so = SessionConfig(intra_op_num_threads=args.threads)
    if args.only in (None, "decode", "kv"):
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        report["machine"]["torch"] = torch.__version__
        report["machine"]["torch_threads"] = torch.get_num_threads()
        model, art = export_random(args.preset, root)
        ort_pipe = MavenPipeline.from_artifacts(art, session_options=so, verify=False, caching=NO_CACHING)
        torch_pipe = None if args.no_torch else MavenPipeline.from_model(model, caching=NO_CACHING)
        if args.only != "kv":
            print(f"{args.preset}: {args.images} images, {args.new_tokens} new tokens", flush=True)
            e2e = {"ort": end_to_end(ort_pipe, args.images, args.new_tokens)}
            print(f"  ort:   {e2e['ort']}", flush=True)
            if torch_pipe is not None:
                e2e["torch"] = end_to_end(torch_pipe, args.images, args.new_tokens)
                print(f"  torch: {e2e['torch']}", flush=True)
                e2e["torch_over_ort_decode_step"] = round(
                    e2e["torch"]["decode_step_mean_ms"] / e2e["ort"]["decode_step_mean_ms"], 2)
            report["end_to_end"] = {"preset": args.preset, "images": args.images, "new_tokens": args.new_tokens,
                                    **e2e}
        print("KV cache: decode-step time vs past length", flush=True)
        pasts = tuple(int(p) for p in args.pasts.split(","))
        report["kv_cache"] = kv_report(ort_pipe.backend, None if torch_pipe is None else torch_pipe.backend, pasts,
                                       args.steps)
        del ort_pipe, torch_pipe, model
        gc.collect()
    if args.only in (None, "rss"):
        if args.rss_artifacts:
            art = Path(args.rss_artifacts)
        else:
            _, art = export_random("tiny", root)
        pipe = MavenPipeline.from_artifacts(art, session_options=so, verify=False, caching=NO_CACHING)
        images = demo_images(3)
        print(f"memory: {args.rss_runs} generations on {art}", flush=True)
        report["rss"] = {"artifacts": str(art), **rss_growth(pipe, images, question(3), n=args.rss_runs)}
        print(f"  {report['rss']}", flush=True)
    report["machine"]["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
