"""Opt-in soak run of one pipeline: threads, mixed good and bad requests, cancellations, memory.

    python -m tools.soak --artifacts DIR --threads 4 --requests 50 --sequential 500
    python -m tools.soak --artifacts artifacts/soak-tiny --export-missing ...   # export a test model first

Three phases over one :class:`~maven_edge.runtime.pipeline.MavenPipeline` (onnxruntime, CPU):

1. **reference**: every distinct request of a deterministic mix (see :func:`mixed_requests`) is
   run once, single-threaded; its *signature* (token ids, text, finish reason, kept patches, or
   the error's class and message, or the pieces a stream gave before it was closed) is kept.
2. **concurrent**: ``--threads`` threads each run ``--requests`` requests of the mix on the same
   pipeline at once, each thread starting at a different place in the mix. Every answer must equal
   the reference answer of the same request (no cross-talk), nothing may raise anything but a
   :class:`~maven_edge.core.errors.MavenError` (no crash) and no thread may hang.
3. **sequential**: ``--sequential`` requests of the mix one after another; each answer must still
   equal its reference, and the resident set size (RSS) is sampled after every request: its growth
   after a warm-up is reported. Some requests are cancelled from another thread at a random moment
   (``cancel_race``): each must either finish with the reference answer or stop with
   ``GenerationCancelled`` holding a prefix of it, and the pipeline must stay usable.

Prints a JSON summary (``--out`` also writes it) and exits with status 1 when any check failed.
The default test suite runs the same functions with small counts (tests/test_reliability_load.py);
``MAVEN_SOAK=1 pytest tests/test_reliability_load.py`` runs them at the soak counts.

Torch-free unless ``--export-missing`` has to export the test model.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maven_edge.core.errors import GenerationCancelled, MavenError
from maven_edge.model_src.resources import samples_dir

REPO = Path(__file__).resolve().parent.parent
SAMPLES = samples_dir()

#: The small seeded random model the tests and the soak export (tiny geometry, fewer layers).
TEST_PRESET = "tiny"
TEST_OVERRIDES = ("vision.num_layers=1", "discrete.num_layers=1", "llm.num_layers=2")
TEST_SEED = 0

Signature = tuple[Any, ...]


# ---- memory ------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Resident set size of this process in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # minimal device install: Linux /proc
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- artifacts -----------------------------------------------------------------------------------


def build_test_model() -> Any:
    """The seeded random test model (imports torch)."""
    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import build_model

    return build_model(get_config(TEST_PRESET, list(TEST_OVERRIDES)), seed=TEST_SEED)


def cached_test_artifacts(cache_root: str | Path, model: Any = None, decoder: str = "torch") -> Path:
    """Export `model` (default: :func:`build_test_model`) under `cache_root` once and reuse it.

    The directory name is the model's fingerprint, the decoder kind ("torch": torch.onnx;
    "genai": onnxruntime-genai's builder with the shared KV buffer) and a hash of the exporter and
    the manifest sections it writes (host contract, schema), so one export serves every test
    module and a changed exporter re-exports. Imports torch.
    """
    from maven_edge.core.manifest import MANIFEST, load_manifest
    from maven_edge.export.onnx_export import ExportOptions, export_model, model_fingerprint

    model = model if model is not None else build_test_model()
    # what decides the files and the manifest: the exporter, and the manifest sections it writes
    writers = ("export/onnx_export.py", "core/host_contract.py", "core/manifest_schema.py")
    digest = hashlib.sha256(b"".join((REPO / w).read_bytes() for w in writers)).hexdigest()
    key = model_fingerprint(model)[:16] + digest[:8]
    out = Path(cache_root) / (key if decoder == "torch" else f"{key}-{decoder}")
    if (out / MANIFEST).is_file():
        try:
            load_manifest(out, verify=True)
            return out
        except MavenError:
            pass
    export_model(model, ExportOptions(out=out, force=True, progress=False, check_load=False, decoder=decoder))
    return out


def cached_genai_artifacts(cache_root: str | Path, model: Any = None) -> Path:
    """:func:`cached_test_artifacts` with the shared-KV-buffer decoder (continuous batching needs it)."""
    return cached_test_artifacts(cache_root, model, decoder="genai")


def export_if_missing(directory: Path) -> None:
    """Export the seeded random test model into `directory` unless it already holds a manifest."""
    from maven_edge.core.manifest import MANIFEST

    if (directory / MANIFEST).is_file():
        return
    from maven_edge.export.onnx_export import ExportOptions, export_model

    print(f"exporting the seeded random test model to {directory} ...", file=sys.stderr, flush=True)
    export_model(build_test_model(), ExportOptions(out=directory, force=True, progress=False, check_load=False))


def load_pipeline(artifacts: str | Path, intra_op_threads: int = 1) -> Any:
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.pipeline import MavenPipeline

    return MavenPipeline.from_artifacts(
        artifacts, providers=["cpu"], session_options=SessionConfig(intra_op_num_threads=intra_op_threads)
    )


# ---- the request mix -----------------------------------------------------------------------------


def _png(im: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)


def image_pool() -> dict[str, Any]:
    """Named image sources: encoded bytes, paths and read-only arrays (safe to share between threads)."""
    from maven_edge.model_src.data import get_sample

    pool: dict[str, Any] = {}
    names = json.loads((SAMPLES / "demo.json").read_text())["images"]
    for i, n in enumerate(names):
        pool[f"demo{i}"] = str(SAMPLES / n)
    for i in range(6):
        pool[f"scene{i}"] = _png(get_sample("test", i).images[0])
    arr = np.asarray(_noise(40, 30, 3))
    arr.setflags(write=False)
    pool["array"] = arr
    pool["one_pixel"] = _png(Image.new("RGB", (1, 1), (200, 10, 10)))
    pool["gray_jpeg"] = _png(_noise(50, 50, 4, "L"), "JPEG", quality=85)
    pool["rgba"] = _png(_noise(33, 47, 5, "RGBA"))
    pool["palette_gif"] = _png(
        _noise(20, 20, 6, "P"), "GIF", save_all=True, append_images=[_noise(20, 20, 7, "P")]
    )
    pool["wide"] = _png(_noise(400, 10, 8))  # 40:1, inside the default aspect limit
    pool["i16"] = _png(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16))
    # bad ones
    pool["truncated"] = _png(_noise(64, 64, 9))[:200]
    pool["empty"] = b""
    pool["text"] = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
    pool["too_wide"] = _png(_noise(600, 5, 10))  # 120:1, over the aspect limit
    pool["bomb"] = bomb_png(10000, 10000)  # 100 MP in a 69-byte file
    return pool


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's signature)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@dataclass(frozen=True)
class SoakRequest:
    """One request of the mix. `action` says how it is consumed:

    generate: ``pipe.generate``; stream_close: take `stop_after` pieces, then close the stream;
    stream_cancel: take `stop_after` pieces, then set the stop event and drain; precancelled: the
    stop event is set before the call.
    """

    name: str
    images: tuple[str, ...]  # keys of image_pool()
    prompt: str | bytes
    options: tuple[tuple[str, Any], ...] = ()
    action: str = "generate"
    stop_after: int = 1
    expect_error: str | None = None  # the MavenError subclass the request must raise, if any


Q = "\nQuestion: {}\nAnswer:"


def _templates(seed: int) -> list[SoakRequest]:
    """One request of each kind; `seed` varies sampling seeds and which images are used."""
    s = seed
    scene = [f"scene{(s + i) % 6}" for i in range(4)]
    sample = (("temperature", 0.9), ("seed", s))
    return [
        SoakRequest(
            "demo_greedy",
            ("demo0", "demo1", "demo2"),
            "<image><image><image>" + Q.format("which image has a red square?"),
        ),
        SoakRequest(
            "one_image_sampled", (scene[0],), "<image>" + Q.format("what color is the circle?"), sample
        ),
        SoakRequest(
            "two_images_top_k",
            (scene[1], scene[2]),
            "<image> and <image>" + Q.format("what changed?"),
            (("top_k", 20), ("seed", s)),
        ),
        SoakRequest(
            "text_only_top_p",
            (),
            "Describe a red square.\x00\x1b[1m\u202e\r\n" + Q.format("why?"),
            (("top_p", 0.9), ("temperature", 1.0), ("seed", s)),
        ),
        SoakRequest(
            "discrete_mode",
            (scene[3], scene[0]),
            "<image><image>" + Q.format("same or different?"),
            (("mode", "discrete"),),
        ),
        SoakRequest(
            "continuous_mode",
            (scene[2],),
            "<image>" + Q.format("how many shapes?"),
            (("mode", "continuous"), *sample),
        ),
        SoakRequest(
            "keep_ratio_half", (scene[1],), "<image>" + Q.format("where is the star?"), (("keep_ratio", 0.5),)
        ),
        SoakRequest(
            "stop_strings", (scene[0],), "<image>" + Q.format("describe it"), (("stop", ("e", " ")), *sample)
        ),
        SoakRequest(
            "literal_specials", (), "<eos><img_start><eos_vis><img_end><pad><bos> typed by a user", sample
        ),
        SoakRequest(
            "odd_images",
            ("one_pixel", "gray_jpeg", "rgba", "palette_gif"),
            "<image>" * 4 + Q.format("which one is gray?"),
            sample,
        ),
        SoakRequest("more_odd_images", ("wide", "i16", "array"), "<image><image><image>" + Q.format("odd?")),
        SoakRequest(
            "stream_close",
            (scene[2],),
            "<image>" + Q.format("what shape?"),
            sample,
            "stream_close",
            stop_after=1 + s % 3,
        ),
        SoakRequest(
            "stream_cancel",
            (scene[3],),
            "<image>" + Q.format("what shape?"),
            sample,
            "stream_cancel",
            stop_after=1 + s % 2,
        ),
        SoakRequest("precancelled", (scene[0],), "<image>" + Q.format("what shape?"), (), "precancelled"),
        # refused requests: the same error every time, before or while reading the input
        SoakRequest(
            "placeholder_mismatch",
            (scene[0], scene[1]),
            "<image>" + Q.format("which?"),
            expect_error="PromptError",
        ),
        SoakRequest("context_overflow", (scene[0],), "<image>" + " word" * 2000, expect_error="PromptError"),
        SoakRequest("too_many_images", tuple(scene * 3), "<image>" * 12, expect_error="InputError"),
        SoakRequest("truncated_image", (scene[0], "truncated"), "<image><image>", expect_error="ImageError"),
        SoakRequest("empty_image", ("empty",), "<image>", expect_error="ImageError"),
        SoakRequest("not_an_image", ("text",), "<image>", expect_error="ImageError"),
        SoakRequest("bomb_image", ("bomb",), "<image>", expect_error="ImageError"),
        SoakRequest("aspect_image", ("too_wide",), "<image>", expect_error="ImageError"),
        SoakRequest("invalid_utf8", (), b"caf\xc3 \xff\xfe", expect_error="PromptError"),
        SoakRequest("lone_surrogate", (), "abc\ud800def", expect_error="PromptError"),
        SoakRequest("bad_option", (), "hello", (("seed", -1),), expect_error="InputError"),
    ]


TEMPLATE_NAMES = tuple(r.name for r in _templates(0))


def mixed_requests(n: int) -> list[SoakRequest]:
    """`n` distinct requests cycling through every kind, with varying seeds and images."""
    k = len(TEMPLATE_NAMES)
    return [_templates(i // k)[i % k] for i in range(n)]


# ---- running one request -------------------------------------------------------------------------


def run_one(pipe: Any, req: SoakRequest, pool: dict[str, Any], max_new_tokens: int = 8) -> Signature:
    """Run one request and reduce its outcome to a comparable signature. A MavenError becomes
    ``("error", class, message)``; any other exception propagates (it is a crash)."""
    images = [pool[k] for k in req.images]
    opts = dict(req.options)
    opts.setdefault("max_new_tokens", max_new_tokens)
    if "stop" in opts:
        opts["stop"] = list(opts["stop"])
    try:
        if req.action == "generate":
            return _result_signature(pipe.generate(images, req.prompt, **opts))
        if req.action == "precancelled":
            ev = threading.Event()
            ev.set()
            pipe.generate(images, req.prompt, cancel=ev, **opts)
            return ("not cancelled",)
        ev = threading.Event()
        stream = pipe.stream(images, req.prompt, cancel=ev, **opts)
        pieces: list[str] = []
        try:
            for piece in stream:
                pieces.append(piece)
                if len(pieces) >= req.stop_after:
                    if req.action == "stream_close":
                        stream.close()
                        return ("closed", tuple(pieces))
                    ev.set()
            assert stream.result is not None
            return ("finished", tuple(pieces), *_result_signature(stream.result))
        finally:
            stream.close()
    except GenerationCancelled as exc:
        res = getattr(exc, "result", None)
        return (
            "cancelled",
            tuple(res.token_ids) if res is not None else None,
            res.finish_reason if res is not None else None,
        )
    except MavenError as exc:
        return ("error", type(exc).__name__, str(exc))


def _result_signature(res: Any) -> Signature:
    sel = tuple(tuple(r) for r in res.selected_indices) if res.selected_indices is not None else None
    return ("ok", tuple(res.token_ids), res.text, res.finish_reason, sel, tuple(res.visual_tokens_per_image))


def check_expectation(req: SoakRequest, sig: Signature) -> str | None:
    """A problem with a reference answer (a refused request that was served, or the reverse)."""
    if req.expect_error is not None:
        if sig[0] != "error" or sig[1] != req.expect_error:
            return f"{req.name}: expected {req.expect_error}, got {sig[:2]}"
    elif sig[0] == "error":
        return f"{req.name}: unexpected {sig[1]}: {sig[2]}"
    elif req.action == "precancelled" and sig[0] != "cancelled":
        return f"{req.name}: a pre-set stop event did not cancel the request"
    return None


def reference_answers(
    pipe: Any, reqs: Sequence[SoakRequest], pool: dict[str, Any], max_new_tokens: int = 8
) -> list[Signature]:
    return [run_one(pipe, r, pool, max_new_tokens) for r in reqs]


# ---- phases --------------------------------------------------------------------------------------


@dataclass
class PhaseReport:
    runs: int = 0
    outcomes: Counter = field(default_factory=Counter)  # ok / error / cancelled / closed / finished
    mismatches: list[str] = field(default_factory=list)  # answer != single-threaded answer
    crashes: list[str] = field(default_factory=list)  # exceptions that are not MavenError
    hung_threads: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return len(self.mismatches) + len(self.crashes) + self.hung_threads

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "outcomes": dict(self.outcomes),
            "failures": self.failures,
            "mismatches": len(self.mismatches),
            "crashes": len(self.crashes),
            "hung_threads": self.hung_threads,
            "examples": (self.mismatches + self.crashes)[:5],
            "seconds": round(self.seconds, 2),
            **self.extra,
        }


def _record(
    rep: PhaseReport, lock: threading.Lock, req: SoakRequest, fn: Callable[[], Signature], want: Signature
) -> None:
    try:
        got = fn()
    except Exception as exc:  # noqa: BLE001 - anything but a MavenError is a crash: record it
        with lock:
            rep.runs += 1
            rep.crashes.append(f"{req.name}: {type(exc).__name__}: {exc}")
        return
    with lock:
        rep.runs += 1
        rep.outcomes[got[0]] += 1
        if got != want:
            rep.mismatches.append(f"{req.name}: got {got!r:.200} want {want!r:.200}")


def run_concurrent(
    pipe: Any,
    reqs: Sequence[SoakRequest],
    reference: Sequence[Signature],
    pool: dict[str, Any],
    threads: int = 4,
    per_thread: int = 8,
    max_new_tokens: int = 8,
    timeout_s: float = 600.0,
) -> PhaseReport:
    """`threads` threads x `per_thread` requests on one pipeline, started together; every answer is
    compared with the single-threaded reference of the same request."""
    rep, lock = PhaseReport(), threading.Lock()
    start = threading.Barrier(threads)
    stride = max(1, len(reqs) // threads)

    def worker(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            j = (t * stride + i) % len(reqs)
            _record(
                rep, lock, reqs[j], lambda j=j: run_one(pipe, reqs[j], pool, max_new_tokens), reference[j]
            )

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(t,), daemon=True, name=f"soak-{t}") for t in range(threads)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()))
    rep.hung_threads = sum(t.is_alive() for t in ts)
    rep.seconds = time.perf_counter() - t0
    rep.extra.update(threads=threads, per_thread=per_thread, distinct_requests=len(reqs))
    return rep


def cancel_race(
    pipe: Any,
    req: SoakRequest,
    want: Signature,
    pool: dict[str, Any],
    delay_s: float,
    max_new_tokens: int = 8,
    stats: Counter | None = None,
) -> Signature:
    """Run `req` while another thread sets its stop event after `delay_s`. The outcome must be the
    reference answer, or a cancellation whose tokens are a prefix of the reference tokens."""
    ev = threading.Event()
    timer = threading.Timer(delay_s, ev.set)
    opts = dict(req.options)
    opts.setdefault("max_new_tokens", max_new_tokens)
    timer.start()
    try:
        res = pipe.generate([pool[k] for k in req.images], req.prompt, cancel=ev, **opts)
        got = _result_signature(res)
        if stats is not None:
            stats["race_finished"] += 1
        return got if got == want else ("race mismatch", got)
    except GenerationCancelled as exc:
        tokens = tuple(exc.result.token_ids)  # type: ignore[attr-defined]
        if stats is not None:
            stats["race_cancelled"] += 1
        if tokens != want[1][: len(tokens)]:
            return ("race mismatch", "cancelled", tokens)
        return want  # a clean prefix: as good as the reference
    finally:
        timer.cancel()


def run_sequential(
    pipe: Any,
    reqs: Sequence[SoakRequest],
    reference: Sequence[Signature],
    pool: dict[str, Any],
    n: int = 60,
    warmup: int = 20,
    max_new_tokens: int = 8,
    race_every: int = 10,
    seed: int = 0,
) -> PhaseReport:
    """`n` generations one after another (cycling through the mix), RSS sampled after each one.
    The mix's refused requests run in between (they do not count towards `n`). Every
    `race_every`-th generation is cancelled from another thread at a random moment instead."""
    if all(r.expect_error is not None for r in reqs):
        raise ValueError("the mix has no request that generates")
    rep, lock = PhaseReport(), threading.Lock()
    rng = random.Random(seed)
    racers = sorted(i for i, r in enumerate(reqs) if r.action == "generate" and r.expect_error is None)
    rss: list[float] = []
    races: Counter = Counter()
    took: list[float] = []  # durations of complete generations, to time the cancellations
    refusals = 0
    gc.collect()
    rss_before = rss_mb()
    t0 = time.perf_counter()
    cursor = 0
    for i in range(n):
        while reqs[cursor % len(reqs)].expect_error is not None:  # refusals in between
            j = cursor % len(reqs)
            _record(
                rep, lock, reqs[j], lambda j=j: run_one(pipe, reqs[j], pool, max_new_tokens), reference[j]
            )
            refusals += 1
            cursor += 1
        if race_every and i % race_every == race_every - 1 and racers:
            j = racers[(i // race_every) % len(racers)]
            mean = sum(took) / len(took) if took else 0.05
            delay = rng.uniform(0.0, 1.2 * mean)  # somewhere within a request's time
            _record(
                rep,
                lock,
                reqs[j],
                lambda j=j, d=delay: cancel_race(pipe, reqs[j], reference[j], pool, d, max_new_tokens, races),
                reference[j],
            )
        else:
            j = cursor % len(reqs)
            cursor += 1
            t1 = time.perf_counter()
            _record(
                rep, lock, reqs[j], lambda j=j: run_one(pipe, reqs[j], pool, max_new_tokens), reference[j]
            )
            if reqs[j].action == "generate":
                took.append(time.perf_counter() - t1)
        rss.append(rss_mb())
    rep.seconds = time.perf_counter() - t0
    gc.collect()
    w = min(warmup, max(0, n - 1))
    after_warmup = rss[w - 1] if w else rss_before
    half = rss[(n + w) // 2 - 1] if n > w + 1 else after_warmup
    rep.extra.update(
        generations=n,
        refusals_in_between=refusals,
        warmup=w,
        cancel_races=dict(races),
        rss_before_mb=round(rss_before, 1),
        rss_after_warmup_mb=round(after_warmup, 1),
        rss_end_mb=round(rss[-1], 1),
        rss_max_mb=round(max(rss), 1),
        rss_growth_after_warmup_mb=round(rss[-1] - after_warmup, 2),
        rss_growth_second_half_mb=round(rss[-1] - half, 2),
    )
    return rep


# ---- the CLI ---------------------------------------------------------------------------------------


def soak(
    artifacts: Path,
    threads: int,
    requests: int,
    sequential: int,
    distinct: int,
    max_new_tokens: int,
    intra_op_threads: int,
    warmup: int,
) -> dict[str, Any]:
    import onnxruntime

    t0 = time.perf_counter()
    pipe = load_pipeline(artifacts, intra_op_threads)
    pool = image_pool()
    reqs = mixed_requests(distinct)
    reference = reference_answers(pipe, reqs, pool, max_new_tokens)
    expectation_problems = [p for r, s in zip(reqs, reference, strict=True) if (p := check_expectation(r, s))]
    # determinism: the mix again, single-threaded, must give the same answers
    again = reference_answers(pipe, reqs, pool, max_new_tokens)
    nondeterministic = [r.name for r, a, b in zip(reqs, reference, again, strict=True) if a != b]
    conc = run_concurrent(pipe, reqs, reference, pool, threads, requests, max_new_tokens)
    seq = run_sequential(pipe, reqs, reference, pool, sequential, warmup, max_new_tokens)
    failures = conc.failures + seq.failures + len(expectation_problems) + len(nondeterministic)
    return {
        "ok": failures == 0,
        "failures": failures,
        "artifacts": str(artifacts),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "onnxruntime": onnxruntime.__version__,
            "intra_op_threads": intra_op_threads,
        },
        "distinct_requests": len(reqs),
        "request_kinds": len(TEMPLATE_NAMES),
        "expected_refusals": sum(r.expect_error is not None for r in reqs),
        "reference_problems": expectation_problems[:5],
        "nondeterministic": nondeterministic[:5],
        "concurrent": conc.to_dict(),
        "sequential": seq.to_dict(),
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, required=True, help="exported artifact directory")
    p.add_argument(
        "--export-missing",
        action="store_true",
        help="export the seeded random test model into --artifacts first if it has no manifest.json",
    )
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--requests", type=int, default=50, help="requests per thread in the concurrent phase")
    p.add_argument("--sequential", type=int, default=500, help="requests in the sequential (memory) phase")
    p.add_argument(
        "--distinct",
        type=int,
        default=None,
        help="distinct requests in the mix (default: max(--requests, 2 x request kinds))",
    )
    p.add_argument("--warmup", type=int, default=50, help="sequential requests before the RSS baseline")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    p.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = p.parse_args(argv)
    for name in ("threads", "requests", "sequential", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        if args.export_missing:
            export_if_missing(args.artifacts)
        distinct = args.distinct or max(args.requests, 2 * len(TEMPLATE_NAMES))
        summary = soak(
            args.artifacts,
            args.threads,
            args.requests,
            args.sequential,
            distinct,
            args.max_new_tokens,
            args.intra_op_threads,
            min(args.warmup, args.sequential - 1),
        )
    except MavenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
