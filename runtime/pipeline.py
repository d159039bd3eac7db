"""MavenPipeline: multi-image question answering over any backend (docs/design.md §5).

    from maven_edge.runtime.pipeline import MavenPipeline
    pipe = MavenPipeline.from_artifacts("artifacts/tiny")            # onnxruntime, CPU
    res = pipe.generate(["a.png", "b.png"], "Image 1: <image>\\nImage 2: <image>\\nQuestion: what changed?\\nAnswer:")
    res.text, res.token_ids, res.timings.ttft_ms, res.visual_tokens_per_image
    for piece in pipe.stream(images, prompt, max_new_tokens=16):
        print(piece, end="", flush=True)

The flow of one request: validate (placeholder count, image count, context length — before
anything runs) -> preprocess -> vision encoder (all images in one batch) -> discrete tokenizer
-> one batched decoder pass over ``[codes, <eos_vis>]`` per image (h_eos) -> patch selector +
projector (batched) -> prompt assembly (embeddings of the text ids, each ``<image>`` replaced by
``<img_start> codes patches <img_end>``, plus image slot k's vector on the k-th image's tokens when
the model has ``image_slots``) -> prefill -> decode loop on the backend's KV cache ->
incremental detokenization. Every stage is timed.

Sampling and stopping use :mod:`maven_edge.core.sampling` for every backend, so greedy output is
identical across backends whenever their logits agree on the argmax, and seeded sampling is
identical when the logits agree closely.

Threads: a pipeline may be shared by several threads; their calls run concurrently. All
per-request state (the KV cache, sampler, detokenizer) belongs to the call; the backends'
sessions are shared read-only (ONNX Runtime's ``run`` and torch inference under ``no_grad``
are thread-safe). A backend that declares ``thread_safe = False`` has its stage calls
serialised by a lock (one stage call at a time, requests interleave between calls), so an
abandoned stream can never hold a lock.

This module is torch-free: the torch backend is imported only when asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.random  # noqa: F401 - numpy imports it lazily (~0.2 s); do it at load, not in the first request
from PIL import Image

from maven_edge.core.budget import select_under_budget
from maven_edge.core.config import H_EOS_MODES, VISUAL_MODES, MavenConfig
from maven_edge.core.errors import GenerationCancelled, InputError, PromptError
from maven_edge.core.preprocess import preprocess_images
from maven_edge.core.prompt import PromptPlan, check_context, plan_prompt, splice
from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, Sampler, StopChecker
from maven_edge.core.tokenizer import TextTokenizer
from maven_edge.runtime.backends import load_backend
from maven_edge.runtime.backends.base import Backend, DecodeState
from maven_edge.runtime.batching import BatchScheduler, DecodeRow
from maven_edge.runtime.caches import (
    KVSnapshot,
    PrefixCache,
    PrefixHit,
    RequestCacheStats,
    VisualCache,
    VisualEntry,
    pixel_digest,
    position_keys,
)
from maven_edge.runtime.options import CachingOptions, PipelineLimits, PipelineOptions

#: Stage names in the order they run; their times add up to the end-to-end time.
STAGES = ("preprocess", "vision", "discrete", "h_eos", "selector", "assemble", "prefill", "decode")

_SINGLE_IMAGE_TYPES = (str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray)


# ---- options and results -----------------------------------------------------------------


@dataclass
class GenerateOptions:
    """Per-request options. Sampling is on when ``greedy`` is False, or when it is left None and
    a temperature > 0, top_k or top_p is given; otherwise decoding is greedy."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    greedy: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: Sequence[str] = ()  # stop strings: the text is cut before the first one
    stop_token_ids: Sequence[int] = ()  # generation ends at these ids (and always at <eos>)
    mode: str | None = None  # hybrid | discrete | continuous; None = the model's mode
    keep_ratio: float | None = None  # hybrid only; None = the model's keep ratio
    # hybrid only: rank patches across the request's images so codes + kept patches fit this many
    # visual tokens (core/budget.py), at least `min_patches` per image; None = one keep ratio per image
    visual_token_budget: int | None = None
    min_patches: int = 1
    # hybrid only: where h_eos is read (core/config.py H_EOS_MODES): "separate" (the paper's extra
    # pass per image; the default) or "context" (inside the prefill, no extra pass)
    h_eos: str | None = None
    cancel: threading.Event | None = None  # set it from another thread to stop the request

    def sampling(self) -> GenerationConfig:
        if self.greedy is not None and not isinstance(self.greedy, (bool, np.bool_)):
            raise InputError(f"greedy must be True, False or None, got {self.greedy!r}")
        try:  # numbers first: comparing a str option below would raise a bare TypeError
            temperature = None if self.temperature is None else float(self.temperature)
            top_k = None if self.top_k is None else int(self.top_k)
            top_p = None if self.top_p is None else float(self.top_p)
        except (TypeError, ValueError, OverflowError) as exc:  # int(inf) overflows
            raise InputError(
                f"bad generation option: temperature, top_k and top_p must be numbers ({exc})"
            ) from None
        if temperature is not None and not temperature > 0:  # also NaN
            raise InputError(
                f"temperature must be > 0, got {self.temperature!r}; for greedy decoding (the default) leave "
                "temperature unset or pass greedy=True"
            )
        if self.greedy is None:
            do_sample = (
                (temperature is not None and temperature > 0)
                or bool(top_k)
                or (top_p is not None and top_p < 1.0)
            )
        else:
            do_sample = not self.greedy
        if isinstance(self.stop, str):
            raise InputError("stop must be a list of strings, not a single string; wrap it in a list")
        try:
            return GenerationConfig(
                max_new_tokens=self.max_new_tokens,
                do_sample=do_sample,
                temperature=1.0 if temperature is None else temperature,
                top_k=0 if top_k is None else top_k,
                top_p=1.0 if top_p is None else top_p,
                seed=int(self.seed),
                stop_token_ids=tuple(int(t) for t in self.stop_token_ids),
                stop_strings=tuple(str(s) for s in self.stop if s),
            ).validate()
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"bad generation option: {exc}") from exc


@dataclass
class Timings:
    """Milliseconds per stage (they add up to ``total_ms`` up to a little glue), plus
    time to first token and decode speed (tokens after the first / time after the first)."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    discrete_ms: float = 0.0
    h_eos_ms: float = 0.0
    selector_ms: float = 0.0
    assemble_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    decode_step_ms: list[float] = field(default_factory=list, repr=False)  # each backend.decode call
    # when each generated token was sampled, ms from the request's start (batched or not): the
    # inter-token latency a reader sees, token by token, however the text splits into pieces
    token_ms: list[float] = field(default_factory=list, repr=False)

    def stages(self) -> dict[str, float]:
        return {s: getattr(self, f"{s}_ms") for s in STAGES}

    @property
    def stages_sum_ms(self) -> float:
        return sum(self.stages().values())

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        steps = d.pop("decode_step_ms")
        d["decode_steps"] = len(steps)
        d["decode_step_mean_ms"] = float(np.mean(steps)) if steps else 0.0
        gaps = np.diff(d.pop("token_ms"))
        d["inter_token_p50_ms"] = float(np.percentile(gaps, 50)) if gaps.size else 0.0
        d["inter_token_p95_ms"] = float(np.percentile(gaps, 95)) if gaps.size else 0.0
        return d


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop_token" | "stop_string" | "length" | "cancelled"
    timings: Timings
    visual_tokens_per_image: list[int]  # excluding <img_start>/<img_end>
    selected_indices: list[list[int]] | None  # hybrid: kept patch indices per image (raster order)
    mode: str
    keep_ratio: float | None
    prompt_tokens: int  # positions in the assembled prompt (text + visual)
    backend: str
    selector_scores: np.ndarray | None = field(default=None, repr=False)  # [n, N], hybrid only
    cache: RequestCacheStats = field(default_factory=RequestCacheStats)  # what caches and batching did
    h_eos: str | None = None  # hybrid: where h_eos was read ("separate" | "context")

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": self.cache.to_dict(),
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "timings": self.timings.to_dict(),
            "visual_tokens_per_image": self.visual_tokens_per_image,
            "selected_indices": self.selected_indices,
            "mode": self.mode,
            "keep_ratio": self.keep_ratio,
            "h_eos": self.h_eos,
            "prompt_tokens": self.prompt_tokens,
            "backend": self.backend,
        }


@dataclass
class VideoInput:
    """A decoded video question (:meth:`MavenPipeline.load_video`): pass ``frames`` and ``prompt``."""

    frames: list[Any]  # RGB PIL images, in time order
    prompt: str  # "Frame 1: <image>" ... "Question: ...\nAnswer:"
    metadata: dict[str, Any]  # timestamps, codec, size, frames decoded / sampled / dropped as duplicates


@dataclass
class PatchSelection:
    """The hybrid selector's choice per image (see :meth:`MavenPipeline.select_patches`)."""

    selected_indices: list[list[int]]  # per image, raster order (row-major over the patch grid)
    scores: np.ndarray  # [n, N] selector scores
    grid: int  # patches per side: index i is row i // grid, column i % grid
    keep_ratio: float
    timings: Timings


# ---- helpers -----------------------------------------------------------------------------


class _Clock:
    """Accumulates wall time per stage."""

    def __init__(self, timings: Timings):
        self.t = timings
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            attr = f"{name}_ms"
            setattr(self.t, attr, getattr(self.t, attr) + (time.perf_counter() - t0) * 1e3)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1e3


class _Detokenizer:
    """Incremental detokenization that only emits complete characters and never emits text a
    stop string may still claim. The pieces it emits join to exactly the final text.

    Leading whitespace of the answer is not emitted: the models are trained on "prompt answer"
    (a space before the answer, part of its first token), so the raw text of an answer starts
    with a space. ``token_ids`` are untouched; ``tokenizer.decode(token_ids)`` is the raw text."""

    def __init__(self, tokenizer: TextTokenizer, stop: StopChecker):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids).lstrip()
        text, hit = self.stop.trim(full)
        if hit:
            self.stopped = True
            return self._emit(text)
        end = len(text)
        while end > len(self.emitted) and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            end -= 1
        end -= self._holdback(text[:end])
        return self._emit(text[:max(end, len(self.emitted))])

    def finish(self) -> str:
        text, _ = self.stop.trim(self.tokenizer.decode(self.ids).lstrip())
        return self._emit(text)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted):  # cannot happen with byte-level BPE; never re-emit
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece


def _as_image_list(images: Any, limit: int | None = None) -> list[Any]:
    """The images of a request as a list. An iterable without a length (a generator, possibly
    endless) is read up to `limit` items only, so it cannot hang or fill memory."""
    if images is None:
        return []
    if isinstance(images, _SINGLE_IMAGE_TYPES):
        return [images]
    try:
        if limit is not None and not hasattr(images, "__len__"):
            return list(itertools.islice(images, limit))
        return list(images)
    except TypeError:
        raise InputError(
            f"images must be a list of image paths, bytes, PIL images or arrays, got {type(images).__name__}"
        ) from None


# ---- the pipeline ------------------------------------------------------------------------


@dataclass
class _Request:
    images: list[Any]
    prompt_ids: list[int]
    plan: PromptPlan  # where the images go, and the assembled length
    gen: GenerationConfig
    mode: str
    keep_ratio: float | None
    k: int | None
    cancel: threading.Event | None
    budget: int | None = None  # visual-token budget (hybrid), else None
    min_patches: int = 1
    h_eos: str = "separate"  # hybrid: "context" reads h_eos inside the prefill (H_EOS_MODES)
    validate_ms: float = 0.0  # tokenization and checks, counted in the preprocess stage

    @property
    def prompt_tokens(self) -> int:
        return self.plan.total_tokens


@dataclass
class _Visual:
    embeds: np.ndarray | None = None  # [n, T_img, D] incl. <img_start> / <img_end>
    indices: np.ndarray | None = None  # [n, k] hybrid only
    scores: np.ndarray | None = None  # [n, N] hybrid only
    digests: list[str] = field(default_factory=list)  # per image: sha256 of its pixels (when caching)
    hits: int = 0  # images served by the visual cache
    # h_eos in context: each image's patch features [N, Dv]; `embeds` then hold zeros where the kept
    # patches go (the prefill selects them)
    patch_features: list[np.ndarray] | None = None


class GenerationStream:
    """Iterator of text pieces; ``result`` holds the GenerationResult once it is exhausted.

    Cancelling: ``cancel()`` or ``close()`` — from any thread, at any time — stops the generation
    within one decode step and never raises. When the consuming thread is inside ``next()`` (a
    decode step is running), the stream is marked and the generation ends at its next check: the
    consumer's loop ends normally and ``result`` is the partial answer with ``finish_reason``
    ``"cancelled"``. When nobody is iterating, the generation is closed at once (its KV cache is
    freed). Leaving a ``with`` block or dropping the iterator cancels too. ``partial`` is the
    result being built (token ids so far) while the stream runs."""

    def __init__(self, gen: Iterator[str], stop: threading.Event, partial: GenerationResult):
        self._gen = gen
        self._stop = stop
        self._lock = threading.Lock()  # held by the consumer for each step
        self.partial = partial
        self.result: GenerationResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        with self._lock:
            try:
                return next(self._gen)
            except StopIteration as stop:
                self.result = stop.value if stop.value is not None else self.partial
                raise

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        """Stop the generation (thread-safe, never raises, idempotent)."""
        self._stop.set()
        if self._lock.acquire(blocking=False):  # nobody is inside next(): close it now
            try:
                self._gen.close()  # runs the generator's cleanup: frees the KV cache
            except Exception:  # noqa: BLE001 - a canceller must never see an error
                pass
            finally:
                if self.result is None:
                    self.result = self.partial
                self._lock.release()

    close = cancel

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class MavenPipeline:
    """Images + prompt -> answer, over one backend. See the module docstring."""

    def __init__(self, backend: Backend, limits: PipelineLimits | None = None, caching: CachingOptions | None = None):
        self.backend = backend
        self.config: MavenConfig = backend.config
        self.tokenizer: TextTokenizer = backend.tokenizer
        self.limits = limits or PipelineLimits(max_images=self.config.max_images)
        self._lock = None if backend.thread_safe else threading.Lock()
        self.caching = caching or CachingOptions()
        self.fingerprint = backend.fingerprint()
        self.visual_cache = VisualCache(self.caching.visual_cache_mb << 20)
        self.prefix_cache = PrefixCache(self.caching.prefix_cache_mb << 20 if backend.supports_kv_snapshots else 0)
        self.scheduler: BatchScheduler | None = None
        if self.caching.max_batch > 1:
            capacity = self.caching.batch_capacity or self.config.llm.max_position_embeddings
            batch = backend.open_batch(self.caching.max_batch, capacity)
            if batch is not None:
                self.scheduler = BatchScheduler(batch, self._call, prefill_first=self.caching.prefill_first)

    def cache_stats(self) -> dict[str, Any]:
        """Counters of the caches and the batch scheduler (for reports and the server's /metrics)."""
        out: dict[str, Any] = {"visual_cache": self.visual_cache.stats.to_dict(),
                               "prefix_cache": self.prefix_cache.to_stats()}
        if self.scheduler is not None:
            out["batching"] = self.scheduler.stats.to_dict() | {"max_batch": self.scheduler.batch.max_batch}
        return out

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_artifacts(
        cls,
        directory: str | Path,
        backend: str = "ort",
        providers: Sequence[str] | None = None,
        session_options: Any = None,
        limits: PipelineLimits | None = None,
        verify: bool = True,
        caching: CachingOptions | None = None,
        **backend_kwargs: Any,
    ) -> MavenPipeline:
        """A pipeline over exported artifacts (``manifest.json`` + the files it lists).

        backend: "ort" (onnxruntime) or "trt" (TensorRT engines).
        providers: for "ort", any of "cpu", "cuda", "tensorrt" (first = preferred); default cpu.
        session_options: a :class:`maven_edge.runtime.backends.ort_backend.SessionConfig` (threads, graph
            optimisation level, TensorRT engine cache, ...).
        verify: check every file's sha256 against the manifest at load.
        A shortcut for :func:`maven_edge.open_pipeline` (which takes every option by name).
        """
        opts = PipelineOptions(artifacts=directory, backend=backend, providers=providers or ("cpu",),
                               session_options=session_options, verify=verify, extra=backend_kwargs)
        return cls(load_backend(opts), limits, caching)

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, device: str = "cpu", limits: PipelineLimits | None = None,
        caching: CachingOptions | None = None,
    ) -> MavenPipeline:
        """The torch reference backend over a checkpoint directory (imports torch)."""
        return cls(load_backend(PipelineOptions(checkpoint=directory, device=device)), limits, caching)

    @classmethod
    def from_model(cls, model: Any, limits: PipelineLimits | None = None,
                   caching: CachingOptions | None = None) -> MavenPipeline:
        """The torch reference backend over an in-memory MavenModel (imports torch)."""
        from maven_edge.runtime.backends.torch_backend import TorchBackend

        return cls(TorchBackend(model), limits, caching)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> MavenPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- public API ------------------------------------------------------------------------
    def generate(self, images: Any, prompt: str, options: GenerateOptions | None = None, **opts: Any
                 ) -> GenerationResult:
        """Answer `prompt` about `images` (one per ``<image>`` placeholder, in order).

        images: paths, encoded bytes, PIL images or HxWxC arrays (a single one is accepted too).
        Options (keywords, or a GenerateOptions): max_new_tokens, greedy, temperature, top_k,
        top_p, seed, stop, stop_token_ids, mode, keep_ratio, cancel.

        Raises MavenError subclasses for every bad request (PromptError for placeholder mismatch
        and context overflow, ImageError for unreadable or too large images, InputError for bad
        options) and GenerationCancelled (with ``.result``, the partial result) when ``cancel``
        is set during the request.
        """
        stream = self.stream(images, prompt, options, **opts)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(self, images: Any, prompt: str, options: GenerateOptions | None = None, **opts: Any
               ) -> GenerationStream:
        """Like :meth:`generate`, but yields text pieces as they are decoded (complete characters
        only); the pieces join to ``result.text``. The request is validated here, eagerly, so a
        bad request raises before the first ``next()``."""
        t0 = time.perf_counter()
        request = self._validate(images, prompt, self._options(options, opts))
        request.validate_ms = (time.perf_counter() - t0) * 1e3
        stop = threading.Event()
        partial = self._new_result(request)
        return GenerationStream(self._run(request, stop, partial), stop, partial)

    def select_patches(self, images: Any, keep_ratio: float | None = None) -> PatchSelection:
        """Run only the visual stages in hybrid mode: which patches each image keeps, and why
        (selector scores). No prompt and no decoding; used by ``maven-edge inspect``."""
        image_list = _as_image_list(images, limit=self.limits.max_images + 1)
        if not image_list:
            raise InputError("give at least one image")
        if len(image_list) > self.limits.max_images:
            raise InputError(f"{len(image_list)} images exceed the limit of {self.limits.max_images} per request")
        self.backend.check_mode("hybrid")
        keep_ratio = self.backend.default_keep_ratio if keep_ratio is None else keep_ratio
        k = self.backend.check_keep_ratio(keep_ratio)
        timings = Timings()
        vis = self._encode_visual(image_list, "hybrid", k, _Clock(timings), lambda: None)
        assert vis.indices is not None and vis.scores is not None
        grid = self.config.vision.grid_size
        return PatchSelection([[int(i) for i in row] for row in vis.indices], vis.scores, grid, float(keep_ratio),
                              timings)

    def load_video(self, source: Any, question: str, fps: float = 1.0, max_frames: int = 8,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, mode: str | None = None, keep_ratio: float | None = None) -> VideoInput:
        """A video question as images + prompt for :meth:`generate` / :meth:`stream`.

        The frames are decoded one at a time (PyAV, :mod:`maven_edge.core.video`), sampled at `fps`,
        at most `max_frames` (spread over the video), identical consecutive frames dropped, and
        downscaled on the way to the model's input size; the prompt labels them ``Frame k: <image>``.
        Whether `max_frames` frames fit the context is checked before anything is decoded.

            video = pipe.load_video("clip.mp4", "what happened to the red circle?")
            pipe.generate(video.frames, video.prompt)
        """
        from maven_edge.core.video import check_frames_fit, frames_from_video, video_prompt

        if not isinstance(question, str) or not question.strip():
            raise InputError("give the question about the video as text")
        mode = mode or self.config.mode
        spec = VISUAL_MODES.get(mode)
        ratio = (self.backend.default_keep_ratio if keep_ratio is None else keep_ratio) if spec.patches == "selected" \
            else None
        per_frame = self.config.visual_tokens_per_image(mode, ratio)
        one = self.tokenizer.encode_prompt(video_prompt(1, question))
        text = len(one) - 1 + len(self.tokenizer.encode("\nFrame 10: ")) * (max_frames - 1)  # labels, generously
        check_frames_fit(max_frames, per_frame, text, max_new_tokens, self.config.llm.max_position_embeddings)
        if max_frames > self.limits.max_images:
            raise InputError(f"--max-frames {max_frames} is over this pipeline's {self.limits.max_images} images per "
                             "request; lower --max-frames")
        video = frames_from_video(source, fps=fps, max_frames=max_frames,
                                  max_side=4 * self.config.preprocess.image_size)
        return VideoInput(video.frames, video_prompt(len(video.frames), question), video.metadata())

    def prepare_prompt(self, prompt: str, num_images: int, options: GenerateOptions | None = None,
                       **opts: Any) -> int:
        """Validate a prompt without running anything; return the assembled prompt length."""
        return self._validate([None] * num_images, prompt, self._options(options, opts)).prompt_tokens

    # ---- validation --------------------------------------------------------------------------
    @staticmethod
    def _options(options: GenerateOptions | None, opts: dict[str, Any]) -> GenerateOptions:
        if options is not None and opts:
            raise InputError("pass generation options either as a GenerateOptions or as keywords, not both")
        if options is not None:
            return options
        try:
            return GenerateOptions(**opts)
        except TypeError:
            known = ", ".join(f.name for f in GenerateOptions.__dataclass_fields__.values())
            unknown = ", ".join(sorted(set(opts) - set(GenerateOptions.__dataclass_fields__)))
            raise InputError(f"unknown generation option(s) {unknown}; known: {known}") from None

    def _validate(self, images: Any, prompt: Any, opt: GenerateOptions) -> _Request:
        gen = opt.sampling()
        if isinstance(prompt, (bytes, bytearray)):
            try:
                prompt = bytes(prompt).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptError(f"the prompt is not valid UTF-8 ({exc}); send text encoded as UTF-8") from None
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a str, got {type(prompt).__name__}")
        if len(prompt) > self.limits.max_prompt_chars:
            raise PromptError(
                f"the prompt has {len(prompt)} characters, over the limit of {self.limits.max_prompt_chars}; "
                "shorten it or raise PipelineLimits.max_prompt_chars"
            )
        image_list = _as_image_list(images, limit=self.limits.max_images + 1)
        n = len(image_list)
        if n > self.limits.max_images:
            count = n if hasattr(images, "__len__") else f"more than {self.limits.max_images}"
            raise InputError(
                f"{count} images exceed the limit of {self.limits.max_images} per request; send fewer images "
                "or raise PipelineLimits.max_images"
            )
        if self.config.image_slots and n > self.config.max_images:
            raise InputError(
                f"{n} images in one request, but this model has image slots for {self.config.max_images}; "
                "send fewer images"
            )
        mode = opt.mode or self.config.mode
        spec = VISUAL_MODES.get(mode)  # InputError for an unknown mode
        self.backend.check_mode(mode)
        keep_ratio = k = None
        if spec.patches == "selected":
            keep_ratio = self.backend.default_keep_ratio if opt.keep_ratio is None else opt.keep_ratio
            k = self.backend.check_keep_ratio(keep_ratio)
        try:
            prompt_ids = self.tokenizer.encode_prompt(prompt)
        except PromptError:
            raise
        except Exception as exc:  # tokenizers raises plain exceptions on e.g. lone surrogates
            raise PromptError(f"the prompt cannot be tokenized: {exc}") from None
        h_eos = "separate" if opt.h_eos is None else opt.h_eos
        if h_eos not in H_EOS_MODES:
            raise InputError(f"h_eos must be one of {', '.join(H_EOS_MODES)}, got {opt.h_eos!r}")
        if h_eos == "context" and spec.patches == "selected":
            if opt.visual_token_budget is not None:
                raise InputError("a visual-token budget ranks the patches of all images before the prefill; with "
                                 "h_eos='context' each image is selected during the prefill: use one or the other")
            if not self.backend.supports_chunked_prefill:
                raise InputError(f"the {self.backend.name} backend cannot read h_eos in context (it prefills a prompt "
                                 "in one call); use h_eos='separate'")
        budget = opt.visual_token_budget
        if budget is not None and n:
            per: int | list[int] = self._check_budget(budget, opt.min_patches, n, spec.patches)
        else:
            budget = None
            per = self.config.visual_tokens_per_image(mode, keep_ratio)
        plan = plan_prompt(prompt_ids, self.tokenizer.image_id, n, per)
        check_context(plan, gen.max_new_tokens, self.config.llm.max_position_embeddings)
        if opt.cancel is not None and not hasattr(opt.cancel, "is_set"):
            raise InputError("cancel must be a threading.Event (or have an is_set() method)")
        return _Request(image_list, prompt_ids, plan, gen, mode, keep_ratio, k, opt.cancel, budget, opt.min_patches,
                        h_eos if spec.patches == "selected" else "separate")

    def _check_budget(self, budget: Any, min_patches: Any, n: int, patches: str | None) -> list[int]:
        """Refuse an unusable visual-token budget before anything runs; the per-image token counts of
        the most the budget allows (the context check's bound; the real split comes from the scores)."""
        cfg = self.config
        if patches != "selected":
            raise InputError("a visual-token budget chooses patches, which only hybrid mode does")
        if isinstance(min_patches, bool) or not isinstance(min_patches, int):
            raise InputError(f"min_patches must be an integer, got {min_patches!r}")
        select_under_budget(np.zeros((n, cfg.num_patches), np.float32), budget, cfg.discrete.num_codes, min_patches)
        self.backend.check_mode("continuous")  # the patches of any subset are projected by projector.onnx
        total = min(int(budget), n * (cfg.discrete.num_codes + cfg.num_patches))
        return [total // n + (1 if i < total % n else 0) for i in range(n)]

    # ---- running -----------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._lock is None:
            return fn(*args)
        with self._lock:
            return fn(*args)

    def _encode_visual(self, images: list[Any], mode: str, k: int | None, clock: _Clock,
                       check_cancel: Callable[[], None], budget: int | None = None, min_patches: int = 1,
                       in_context: bool = False) -> _Visual:
        """preprocess -> (visual cache) -> vision -> discrete -> h_eos -> selector/projector -> per-image
        sequences. Images the visual cache holds skip every stage after preprocessing. `in_context`
        (hybrid, h_eos read in the prefill): only vision and discrete run here; the sequences hold
        zeros where the kept patches go."""
        n = len(images)
        out = _Visual()
        if not n:
            return out
        with clock.stage("preprocess"):
            pixel_values = preprocess_images(images, self.config.preprocess, self.limits.image,
                                             max_total_pixels=self.limits.max_request_pixels)
            if self.visual_cache.enabled or self.prefix_cache.enabled:
                out.digests = [pixel_digest(p) for p in pixel_values]
        check_cancel()
        if budget is not None:  # the selection depends on every image of the request: not cached per image
            entries = self._budget_stages(pixel_values, budget, min_patches, clock, check_cancel)
            out.embeds = [e.embeds for e in entries]
            out.indices = [e.indices for e in entries]
            out.scores = np.stack([e.scores for e in entries])
            return out
        cache_mode = f"{mode}:h_eos-in-context" if in_context else mode  # other entries: no selection in them
        keys = [self.visual_cache.key(self.fingerprint, cache_mode, k, d) for d in out.digests]
        entries: list[VisualEntry | None] = [None] * n
        if self.visual_cache.enabled:
            entries = [self.visual_cache.get(key) for key in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        out.hits = n - len(missing)
        if missing:
            computed = self._visual_stages(pixel_values[missing], mode, k, clock, check_cancel, in_context)
            for j, i in enumerate(missing):
                row = [None if a is None else a[j] for a in computed]
                if self.visual_cache.enabled:
                    entries[i] = self.visual_cache.add(keys[i], *row)
                else:
                    entries[i] = VisualEntry(*row)
        with clock.stage("assemble"):
            out.embeds = np.stack([e.embeds for e in entries])
            if in_context:
                out.patch_features = [e.patch_features for e in entries]
                m = out.embeds
                out.embeds = np.concatenate([m[:, :-1], np.zeros((n, k or 0, m.shape[2]), m.dtype), m[:, -1:]], axis=1)
            if entries[0].indices is not None:
                out.indices = np.stack([e.indices for e in entries])
                out.scores = np.stack([e.scores for e in entries])
        return out

    def _budget_stages(self, pixel_values: np.ndarray, budget: int, min_patches: int, clock: _Clock,
                       check_cancel: Callable[[], None]) -> list[VisualEntry]:
        """Hybrid with a visual-token budget: every image's selector scores, the patches ranked across
        the images (core/budget.py), the kept ones projected (projector.onnx serves any subset)."""
        be, tok, cfg = self.backend, self.tokenizer, self.config
        n = pixel_values.shape[0]
        with clock.stage("vision"):
            patch_features = self._call(be.vision, pixel_values)
        check_cancel()
        with clock.stage("discrete"):
            codes = np.asarray(self._call(be.discrete, patch_features), dtype=np.int64)
        check_cancel()
        with clock.stage("h_eos"):
            ids = np.concatenate([codes, np.full((n, 1), tok.eos_vis_id, np.int64)], axis=1)
            hidden = self._call(be.hidden_states, self._call(be.embed, ids), np.ones_like(ids))
            h_eos = np.ascontiguousarray(hidden[:, -1])
        check_cancel()
        with clock.stage("selector"):
            scores = self._call(be.select, patch_features, h_eos, be.check_keep_ratio(be.default_keep_ratio)).scores
            kept = select_under_budget(scores, budget, cfg.discrete.num_codes, min_patches)
            projected = self._call(be.project, patch_features)
        check_cancel()
        with clock.stage("assemble"):
            marker_ids = np.concatenate(
                [np.full((n, 1), tok.img_start_id, np.int64), codes, np.full((n, 1), tok.img_end_id, np.int64)], axis=1)
            markers = self._call(be.embed, marker_ids)
            return [VisualEntry(np.concatenate([markers[i, :-1], projected[i, kept[i]], markers[i, -1:]]), codes[i],
                                kept[i], scores[i]) for i in range(n)]

    def _visual_stages(self, pixel_values: np.ndarray, mode: str, k: int | None, clock: _Clock,
                       check_cancel: Callable[[], None], in_context: bool = False) -> tuple[np.ndarray | None, ...]:
        """The visual stages for a batch of preprocessed images: (embeds [n, T_img, D], codes [n, Q]
        or None, kept indices [n, k] or None, selector scores [n, N] or None, patch features
        [n, N, Dv] or None). `in_context`: no selection; embeds are ``<img_start> codes <img_end>``
        and the patch features are returned for the prefill to select from."""
        be, tok = self.backend, self.tokenizer
        n = pixel_values.shape[0]
        with clock.stage("vision"):
            patch_features = self._call(be.vision, pixel_values)
        check_cancel()
        spec = VISUAL_MODES.get(mode)
        codes = indices = scores = patches = None
        if spec.codes or spec.patches == "selected":  # the selector reads the LLM's reading of the codes
            with clock.stage("discrete"):
                codes = np.asarray(self._call(be.discrete, patch_features), dtype=np.int64)
            check_cancel()
        if spec.patches == "selected" and in_context:
            pass  # h_eos and the selection happen in the prefill (_prefill_in_context)
        elif spec.patches == "selected":
            assert codes is not None and k is not None
            with clock.stage("h_eos"):  # one batched pass over [codes, <eos_vis>] for all images
                ids = np.concatenate([codes, np.full((n, 1), tok.eos_vis_id, np.int64)], axis=1)
                hidden = self._call(be.hidden_states, self._call(be.embed, ids), np.ones_like(ids))
                h_eos = np.ascontiguousarray(hidden[:, -1])
            check_cancel()
            with clock.stage("selector"):
                sel = self._call(be.select, patch_features, h_eos, k)
            patches, indices, scores = sel.embeds, sel.indices, sel.scores
        elif spec.patches == "all":
            with clock.stage("selector"):
                patches = self._call(be.project, patch_features)
        check_cancel()
        with clock.stage("assemble"):
            rows = codes if spec.codes and codes is not None else np.zeros((n, 0), np.int64)
            marker_ids = np.concatenate(
                [np.full((n, 1), tok.img_start_id, np.int64), rows, np.full((n, 1), tok.img_end_id, np.int64)], axis=1)
            markers = self._call(be.embed, marker_ids)  # <img_start> codes <img_end>
            parts = [markers[:, :-1]] + ([patches] if patches is not None else []) + [markers[:, -1:]]
            embeds = np.concatenate(parts, axis=1)
        return embeds, (codes if spec.codes else None), indices, scores, (patch_features if in_context else None)

    def _prefill_in_context(self, req: _Request, embeds: np.ndarray, vis: _Visual, slots: np.ndarray | None,
                            prefix: PrefixHit, clock: _Clock, check_cancel: Callable[[], None]
                            ) -> tuple[np.ndarray, DecodeState, tuple[tuple[int, np.ndarray, np.ndarray], ...], int]:
        """h_eos read in context: the prompt is prefilled up to each image's codes with ``<eos_vis>``
        after them; the last hidden state there is the image's h_eos. That position is forgotten,
        the selector's kept patches are written into `embeds` where the zeros are, and the prefill
        goes on from there: no extra decoder pass, one decoder call per image plus one.

        A reused prefix (`prefix`) must cover whole images whose kept patches it noted; it is cut
        back to the first kept patch of an image it covers only in part, whose h_eos is read again.
        Returns the first token's logits, the cache, (first kept position, indices, scores) per
        image, and the positions reused."""
        be, plan, k = self.backend, req.plan, req.k
        assert k is not None and vis.patch_features is not None
        q = self.config.discrete.num_codes
        starts, pos = [], 0  # the position of each image's first kept patch
        for a, b, image in plan.segments():
            pos += b - a
            if image is not None:
                starts.append(pos + 1 + q)
                pos += plan.tokens_of(image) + 2
        kv = prefix.kv
        noted = {sel[0]: sel for sel in (kv.selections if kv is not None else ())}
        pos = prefix.length
        for s0 in starts:
            if s0 < pos and (pos < s0 + k or s0 not in noted):
                pos = s0
                break
        if kv is not None and pos < kv.length:
            kv = kv.prefix(pos) if pos else None
        reused = pos
        probe = self._call(be.embed, np.asarray([[self.tokenizer.eos_vis_id]], dtype=np.int64))[0]  # [1, D]
        state = self._call(be.start, req.prompt_tokens + req.gen.max_new_tokens, kv)
        selections = []
        try:
            for i, s0 in enumerate(starts):
                if s0 + k <= pos:  # inside the reused prefix: chosen when it was computed
                    selections.append(noted[s0])
                    continue
                check_cancel()
                with clock.stage("prefill"):
                    eos = probe if slots is None else probe + slots[i][None, :]
                    _, h_eos = self._call(be.extend, state, np.concatenate([embeds[0, pos:s0], eos])[None])
                    self._call(be.rewind, state, s0)
                with clock.stage("selector"):
                    sel = self._call(be.select, vis.patch_features[i][None], h_eos[None], k)
                    embeds[0, s0 : s0 + k] += sel.embeds[0]  # zeros (+ the image's slot vector) until now
                selections.append((s0, _frozen_copy(sel.indices[0]), _frozen_copy(sel.scores[0])))
                pos = s0
            check_cancel()
            with clock.stage("prefill"):
                logits, _ = self._call(be.extend, state, embeds[:, pos:])
        except BaseException:
            state.release()
            raise
        return logits, state, tuple(selections), reused

    def _new_result(self, req: _Request) -> GenerationResult:
        return GenerationResult(
            text="", token_ids=[], finish_reason="cancelled", timings=Timings(),  # set when it ends
            visual_tokens_per_image=[req.plan.tokens_per_image] * len(req.images), selected_indices=None,
            mode=req.mode, keep_ratio=req.keep_ratio, prompt_tokens=req.prompt_tokens, backend=self.backend.name,
            h_eos=req.h_eos if req.k is not None else None,
        )

    def _run(self, req: _Request, stop: threading.Event, result: GenerationResult) -> Iterator[str]:
        """Generator of text pieces; returns `result`, filled in. `stop` (the stream's cancel())
        ends it quietly with finish_reason "cancelled"; `req.cancel` raises GenerationCancelled."""
        timings = result.timings
        clock = _Clock(timings)
        clock.start -= req.validate_ms / 1e3  # the request's checks and tokenization came first
        timings.preprocess_ms = req.validate_ms
        be, tok = self.backend, self.tokenizer
        n = len(req.images)

        def check_cancel() -> None:
            if stop.is_set():
                raise _Stopped
            if req.cancel is not None and req.cancel.is_set():
                result.finish_reason = "cancelled"
                timings.total_ms = clock.elapsed_ms()
                err = GenerationCancelled("the generation was cancelled by its caller")
                err.result = result  # type: ignore[attr-defined]
                raise err

        decoding: _Decoding | None = None
        # until its first token this request encodes and prefills: batched decode steps wait for it
        # (the scheduler's prefill-first rule); released before the first piece is handed out
        hold = self.scheduler.prefilling() if self.scheduler is not None else None
        try:
            # -- visual side --------------------------------------------------------------------
            in_context = req.h_eos == "context" and n > 0
            vis = self._encode_visual(req.images, req.mode, req.k, clock, check_cancel, req.budget,
                                      req.min_patches, in_context)
            visual = vis.embeds
            if vis.indices is not None:
                result.selected_indices = [[int(i) for i in row] for row in vis.indices]
                result.selector_scores = vis.scores
            if req.budget is not None and n:  # the budget's real split between the images
                req.plan = plan_prompt(req.prompt_ids, tok.image_id, n, [len(e) - 2 for e in visual])
                result.visual_tokens_per_image = [len(e) - 2 for e in visual]
                result.prompt_tokens = req.prompt_tokens
            # -- prompt assembly --------------------------------------------------------------------
            with clock.stage("assemble"):
                # one embed call for the prompt ids and, with image slots, the n slot ids after them
                slot_ids = tok.layout.image_slot_ids(n) if self.config.image_slots and n else []
                rows = self._call(be.embed, np.asarray([list(req.prompt_ids) + slot_ids], dtype=np.int64))[0]
                text = rows[: len(req.prompt_ids)]
                slots = None
                if slot_ids:  # slot k's vector on every token of the k-th image
                    slots = rows[len(req.prompt_ids) :]
                    visual = [v + slots[i][None, :] for i, v in enumerate(visual)]
                embeds = splice(req.plan, text, visual, lambda p: np.concatenate(p, axis=0))
                embeds = np.ascontiguousarray(embeds[None], dtype=np.float32)
            if embeds.shape[1] != req.prompt_tokens:
                raise AssertionError(f"assembled {embeds.shape[1]} positions, expected {req.prompt_tokens}")
            check_cancel()
            # -- prefill (from the longest cached prefix) + the first token ----------------------------
            gen = req.gen
            cache = result.cache
            cache.visual_hits, cache.visual_misses = vis.hits, (n - vis.hits if vis.digests else 0)
            keys = None
            prefix = PrefixHit(0, None)
            if self.prefix_cache.enabled:
                # a visual position is its image's content as this request encodes it: pixels, mode, k
                if req.budget is None:  # (in context, the kept patches also follow from the positions before)
                    how = f"{req.mode}:h_eos-in-context" if in_context else req.mode
                    identities = [f"{how}:{req.k}:{d}" for d in vis.digests]
                else:  # the kept patches depend on the whole request: name them
                    identities = [f"{req.mode}:{','.join(map(str, idx))}:{d}"
                                  for idx, d in zip(result.selected_indices or [], vis.digests, strict=True)]
                keys = position_keys(req.prompt_ids, tok.image_id, identities,
                                     [req.plan.tokens_of(i) for i in range(n)], self.config.image_slots)
                prefix = self.prefix_cache.lookup(self.fingerprint, keys)
            decoding = _Decoding(self, req, result, clock, stop)
            state: DecodeState | None = None
            selections: tuple[tuple[int, np.ndarray, np.ndarray], ...] = ()
            try:
                if in_context:  # prefill in chunks, each image's h_eos read on the way
                    logits, state, selections, reused = self._prefill_in_context(
                        req, embeds, vis, slots, prefix, clock, check_cancel)
                    result.selected_indices = [[int(i) for i in sel[1]] for sel in selections]
                    result.selector_scores = np.stack([sel[2] for sel in selections])
                else:
                    reused = prefix.length
                    with clock.stage("prefill"):
                        prefill = be.prefill if prefix.kv is None else functools.partial(be.prefill, prefix=prefix.kv)
                        logits, state = self._call(prefill, embeds[:, reused:], req.prompt_tokens + gen.max_new_tokens)
                cache.prefix_tokens_reused, cache.prefix_tokens_computed = reused, req.prompt_tokens - reused

                def snapshot(snap: KVSnapshot) -> KVSnapshot:  # with the kept patches chosen in context
                    return dataclasses.replace(snap, selections=selections) if selections else snap

                if keys is not None:
                    self.prefix_cache.add(self.fingerprint, keys, snapshot(self._call(be.snapshot, state,
                                                                                      req.prompt_tokens)))
                check_cancel()
                piece, token = decoding.consume(logits)
                if hold is not None:
                    hold.release()
                if piece:
                    decoding.yielded += piece
                    yield piece
                # -- decode: batched with other requests, or on its own ----------------------------------
                def conversation_keys() -> np.ndarray | None:  # the prompt and the generated tokens fed back
                    if keys is None or result.finish_reason == "cancelled":
                        return None
                    fed = result.token_ids if result.finish_reason in ("eos", "stop_token") else result.token_ids[:-1]
                    return np.concatenate([keys, np.asarray(fed, dtype=np.int64)])

                def keep_conversation(batch: Any, slot: int) -> None:
                    full = conversation_keys()
                    if full is not None and len(full) == batch.length(slot):
                        self.prefix_cache.add(self.fingerprint, full, snapshot(batch.snapshot(slot, len(full))))

                if token is not None and self.scheduler is not None and self.scheduler.fits(state, gen.max_new_tokens):
                    yield from decoding.batched(self.scheduler, state, token, check_cancel, keep_conversation)
                    state = None  # the scheduler released it once its cache moved into a slot
                else:
                    while token is not None:
                        check_cancel()
                        with clock.stage("decode"):
                            t0 = time.perf_counter()
                            logits = self._call(be.decode, state, token)
                            timings.decode_step_ms.append((time.perf_counter() - t0) * 1e3)
                        check_cancel()  # a step that ran into a cancel: its logits are not used
                        piece, token = decoding.consume(logits)
                        if piece:
                            decoding.yielded += piece
                            yield piece
                    full = conversation_keys()
                    if full is not None and len(full) > req.prompt_tokens and len(full) == state.length:
                        # the conversation so far, answer included: a follow-up turn reuses all of it
                        self.prefix_cache.add(self.fingerprint, full, snapshot(self._call(be.snapshot, state, len(full))))
                with clock.stage("decode"):
                    rest = decoding.detok.finish()
                if rest:
                    decoding.yielded += rest
                    yield rest
            finally:
                if state is not None:
                    state.release()
        except _Stopped:  # cancel() / close() from any thread while a step ran: end quietly
            result.finish_reason = "cancelled"
        except GeneratorExit:  # closed while suspended at a yield (cancel() when idle, or dropped)
            result.finish_reason = "cancelled"
            raise
        finally:
            if hold is not None:
                hold.release()
            if decoding is not None:
                result.text = decoding.yielded  # the pieces always join to the text
            timings.total_ms = clock.elapsed_ms()
            after_first = len(result.token_ids) - 1
            decode_time_s = (timings.total_ms - timings.ttft_ms) / 1e3
            timings.decode_tokens_per_s = (after_first / decode_time_s
                                           if after_first > 0 and decode_time_s > 0 else 0.0)
        return result


def _frozen_copy(a: np.ndarray) -> np.ndarray:
    out = np.array(a)
    out.flags.writeable = False
    return out


class _Stopped(Exception):
    """The stream was cancelled (GenerationStream.cancel/close): unwind to the end of the generation."""


class _Decoding:
    """One request's token-by-token state: sampler, stop checks, detokenizer and result. `consume`
    takes a step's logits and returns the text piece to emit and the token to feed next (None
    when the request is finished); the same code runs on the request's own thread or, batched,
    on the scheduler's."""

    def __init__(self, pipe: MavenPipeline, req: _Request, result: GenerationResult, clock: _Clock,
                 stop: threading.Event | None = None):
        tok = pipe.tokenizer
        self.req, self.result, self.clock, self.eos_id = req, result, clock, tok.eos_id
        self.stop_event = stop
        self.yielded = ""  # the text handed to the reader so far: result.text, however the request ends
        self.sampler = Sampler(req.gen, tok.layout.tokenizer_size)
        self.stop = StopChecker(req.gen, tok.eos_id)
        self.detok = _Detokenizer(tok, self.stop)

    def consume(self, logits: np.ndarray) -> tuple[str, int | None]:
        res = self.result
        with self.clock.stage("decode"):
            token = self.sampler(logits)
            if not res.token_ids and not res.timings.ttft_ms:
                res.timings.ttft_ms = self.clock.elapsed_ms()
            if self.stop.is_stop_token(token):
                res.finish_reason = "eos" if token == self.eos_id else "stop_token"
                return "", None
            res.token_ids.append(token)
            res.timings.token_ms.append(self.clock.elapsed_ms())
            piece = self.detok.add(token)
        if self.detok.stopped:
            res.finish_reason = "stop_string"
            return piece, None
        if len(res.token_ids) >= self.req.gen.max_new_tokens:
            res.finish_reason = "length"
            return piece, None
        return piece, token

    def batched(self, scheduler: BatchScheduler, state: DecodeState, token: int,
                check_cancel: Callable[[], None],
                on_finish: Callable[[Any, int], None] | None = None) -> Iterator[str]:
        """Decode in the scheduler's batch: its thread steps and calls `consume`; this thread yields
        the pieces. Cancelling (the request's event, or closing the stream) leaves the batch at the
        next step."""
        pieces: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()  # (text, tokens so far)
        cancel = self.req.cancel
        cancelled = threading.Event()
        res = self.result

        def on_logits(logits: np.ndarray) -> tuple[int | None, bool]:
            if (cancel is not None and cancel.is_set()) or (self.stop_event is not None and self.stop_event.is_set()):
                cancelled.set()
                return None, False
            piece, nxt = self.consume(logits)
            if piece:
                pieces.put((piece, len(res.token_ids)))
            return nxt, bool(piece)

        row = DecodeRow(state, token, on_logits, on_finish=on_finish)
        res.cache.batched = True
        scheduler.submit(row)
        read_tokens = len(res.token_ids)  # the tokens of the pieces the reader has taken
        try:
            while True:
                with self.clock.stage("decode"):
                    try:
                        piece, upto = pieces.get(timeout=0.02)
                    except queue.Empty:
                        if row.done.is_set() and pieces.empty():
                            break
                        continue
                scheduler.took(row)
                if (cancel is not None and cancel.is_set()) or (self.stop_event is not None and self.stop_event.is_set()):
                    cancelled.set()
                    break
                read_tokens = upto
                self.yielded += piece
                yield piece
        finally:
            if not row.done.is_set():
                row.cancelled = True  # the reader went away or cancelled: the row leaves at the next step
        if cancelled.is_set():  # end where the reader stopped, as a request decoding alone does
            row.done.wait()
            del res.token_ids[read_tokens:]
        self.result.timings.decode_step_ms.extend(row.step_ms)
        self.result.cache.batch_occupancy = row.occupancy
        if row.error is not None:
            raise row.error
        if cancelled.is_set():
            check_cancel()  # raises _Stopped (the stream's cancel) or GenerationCancelled (the request's event)


def open_pipeline(options: PipelineOptions | None = None, **kwargs: Any) -> MavenPipeline:
    """A pipeline from a :class:`PipelineOptions` or from its fields as keywords (not both)."""
    if options is not None and kwargs:
        raise InputError("pass either a PipelineOptions or its fields as keywords, not both")
    if options is None:
        known = {f.name for f in dataclasses.fields(PipelineOptions)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InputError(f"unknown pipeline option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        options = PipelineOptions(**kwargs)
    backend = load_backend(options)
    return MavenPipeline(backend, options.limits(backend.config.max_images), options.caching())
