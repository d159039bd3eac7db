"""The caches and continuous batching inside the pipeline: same answers with and without each,
hits visible in the timings, byte bounds, and correctness under concurrent mixed load."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from maven_edge.export.genai_decoder import builder_unavailable
from maven_edge.runtime.options import CachingOptions
from maven_edge.runtime.pipeline import MavenPipeline

pytestmark = pytest.mark.skipif(builder_unavailable() is not None, reason=str(builder_unavailable()))

OFF = CachingOptions(visual_cache_mb=0, prefix_cache_mb=0, max_batch=1)


@pytest.fixture(scope="module")
def backend(pytestconfig):
    """The seeded test model with the shared-KV-buffer decoder (the one continuous batching needs)."""
    from maven_edge.runtime.backends.ort_backend import OrtBackend
    from tools.soak import cached_genai_artifacts

    artifacts = cached_genai_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"))
    return OrtBackend(artifacts, session_options={"intra_op_num_threads": 1})


@pytest.fixture(scope="module")
def questions():
    from maven_edge.model_src.data import iter_samples

    return [(s.images, s.prompt) for s in iter_samples("test", 24)]


def _pipe(backend, **kw) -> MavenPipeline:
    return MavenPipeline(backend, caching=CachingOptions(**({"visual_cache_mb": 0, "prefix_cache_mb": 0,
                                                             "max_batch": 1} | kw)))


def test_visual_cache_hit_skips_the_visual_stages_and_changes_nothing(backend, questions):
    plain, cached = MavenPipeline(backend, caching=OFF), _pipe(backend, visual_cache_mb=16)
    for images, prompt in questions[:6]:
        want = plain.generate(images, prompt, max_new_tokens=12)
        first = cached.generate(images, prompt, max_new_tokens=12)
        again = cached.generate(images, prompt.replace("Question:", "Question: please,"), max_new_tokens=12)
        assert first.token_ids == want.token_ids and first.selected_indices == want.selected_indices
        assert first.cache.visual_misses == len(images) and first.cache.visual_hits == 0
        assert again.cache.visual_hits == len(images) and again.cache.visual_misses == 0
        for stage in ("vision", "discrete", "h_eos", "selector"):
            assert again.timings.stages()[stage] == 0.0, stage
        assert again.selected_indices == want.selected_indices
    assert cached.visual_cache.stats.hits == sum(len(q[0]) for q in questions[:6])


def test_prefix_reuse_gives_the_same_tokens_and_prefills_only_the_new_turn(backend, questions):
    plain, cached = MavenPipeline(backend, caching=OFF), _pipe(backend, visual_cache_mb=16, prefix_cache_mb=16)
    for images, prompt in questions[:6]:
        first = cached.generate(images, prompt, max_new_tokens=12)
        assert first.token_ids == plain.generate(images, prompt, max_new_tokens=12).token_ids
        follow = prompt + first.text + "\nQuestion: and what else?\nAnswer:"
        got = cached.generate(images, follow, max_new_tokens=12)
        want = plain.generate(images, follow, max_new_tokens=12)
        assert got.token_ids == want.token_ids
        assert got.cache.prefix_tokens_reused >= first.prompt_tokens - 1
        assert got.cache.prefix_tokens_computed == got.prompt_tokens - got.cache.prefix_tokens_reused
        new_turn = cached.tokenizer.encode_prompt(first.text + "\nQuestion: and what else?\nAnswer:")
        assert got.cache.prefix_tokens_computed <= len(new_turn) + 1


def test_caches_stay_inside_small_byte_bounds(backend, questions):
    pipe = _pipe(backend, visual_cache_mb=1, prefix_cache_mb=1)
    pipe.visual_cache.max_bytes = pipe.visual_cache.stats.max_bytes = 4 * 50 * 192 * 4  # about four images
    pipe.prefix_cache.max_bytes = pipe.prefix_cache.stats.max_bytes = 300_000
    for images, prompt in questions:
        pipe.generate(images, prompt, max_new_tokens=4)
        assert pipe.visual_cache.stats.bytes <= pipe.visual_cache.max_bytes
        assert pipe.prefix_cache.stats.bytes <= pipe.prefix_cache.max_bytes
    assert pipe.visual_cache.stats.evictions > 0 and pipe.prefix_cache.stats.evictions > 0


def test_concurrent_requests_decode_in_one_batch_with_the_same_tokens(backend, questions):
    plain = MavenPipeline(backend, caching=OFF)
    batched = _pipe(backend, max_batch=4)
    assert batched.scheduler is not None
    want = [plain.generate(i, p, max_new_tokens=16).token_ids for i, p in questions[:8]]
    got: list = [None] * 8
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        start.wait()
        for j in (t, t + 4):
            got[j] = batched.generate(*questions[j], max_new_tokens=16)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [r.token_ids for r in got] == want
    assert all(r.cache.batched for r in got)
    # tokens sampled by the scheduler's thread are timed per request, one time per token
    assert all(len(r.timings.token_ms) == len(r.token_ids) and r.timings.token_ms == sorted(r.timings.token_ms)
               for r in got)
    stats = batched.scheduler.stats
    assert stats.steps > 0 and stats.rows / stats.steps > 1.0, stats  # rows really shared steps
    assert max(r.cache.batch_occupancy for r in got) > 1.0


def test_streams_cancelled_in_a_batch_stop_early_and_free_their_slots(backend, questions):
    batched = _pipe(backend, max_batch=2)
    images, prompt = questions[0]
    full = batched.generate(images, prompt, max_new_tokens=24, greedy=True, stop_token_ids=[]).token_ids
    ev = threading.Event()
    stream = batched.stream(images, prompt, max_new_tokens=24, cancel=ev)
    pieces = []
    from maven_edge.core.errors import GenerationCancelled

    with pytest.raises(GenerationCancelled) as info:
        for piece in stream:
            pieces.append(piece)
            ev.set()
    partial = info.value.result
    assert partial.finish_reason == "cancelled" and partial.token_ids == full[: len(partial.token_ids)]
    # a stream closed mid-way leaves its slot too; the pipeline keeps answering correctly
    s2 = batched.stream(images, prompt, max_new_tokens=24)
    next(iter(s2))
    s2.close()
    for _ in range(3):
        assert batched.generate(images, prompt, max_new_tokens=24).token_ids == full
    deadline = threading.Event()
    for _ in range(100):
        if batched.scheduler.batch.free_slots() == 2:
            break
        deadline.wait(0.05)
    assert batched.scheduler.batch.free_slots() == 2


@pytest.mark.parametrize("prefill_first", [True, False])
def test_mixed_concurrent_load_matches_answers_run_alone_with_caches_off(backend, prefill_first):
    """8 threads x 50 requests: repeated and new images, shared and distinct prefixes, cancellations,
    closed streams and stop strings, through every cache and the batch (whether decode steps wait for
    prefills or not); each answer equals the same request run alone on a pipeline with caches and
    batching off, and no request's prefill hold outlives it."""
    from tools.soak import image_pool, mixed_requests, reference_answers, run_concurrent

    pool = image_pool()
    reqs = mixed_requests(64)
    ref = reference_answers(MavenPipeline(backend, caching=OFF), reqs, pool)
    pipe = _pipe(backend, visual_cache_mb=2, prefix_cache_mb=4, max_batch=4, prefill_first=prefill_first)
    rep = run_concurrent(pipe, reqs, ref, pool, threads=8, per_thread=50, timeout_s=900)
    assert rep.runs == 400 and rep.failures == 0, rep.to_dict()
    assert {"cancelled", "closed"} <= set(rep.outcomes), rep.outcomes
    stats = pipe.cache_stats()
    assert stats["visual_cache"]["hits"] > 0 and stats["prefix_cache"]["hits"] > 0, stats
    assert stats["batching"]["batch_steps"] > 0, stats
    assert np.isfinite(stats["batching"]["batch_occupancy"])
    assert stats["batching"]["batch_prefills"] == 0, stats  # every hold released, cancelled or not
    assert (stats["batching"]["batch_held_s"] > 0) == prefill_first, stats
