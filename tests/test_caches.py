"""Caches and continuous batching, piece by piece: byte bounds, immutability, prefix matching,
and the ONNX Runtime primitives (prefix reuse, batched decode) against plain batch-1 decoding."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from maven_edge.runtime.backends.base import DecodeBatch, DecodeState
from maven_edge.runtime.batching import BatchScheduler, DecodeRow
from maven_edge.runtime.caches import (
    ByteLRU,
    KVSnapshot,
    PrefixCache,
    VisualCache,
    pixel_digest,
    position_keys,
)


def test_byte_lru_never_exceeds_its_bound_and_evicts_least_recent():
    cache: ByteLRU[int] = ByteLRU(100)
    for i in range(10):
        assert cache.put(i, i, 30)
        assert cache.stats.bytes <= 100
    assert cache.values() == [7, 8, 9] and cache.stats.evictions == 7
    assert cache.get(7) == 7  # now most recent
    cache.put(10, 10, 30)
    assert cache.values() == [9, 7, 10]
    assert not cache.put("big", 0, 101) and cache.get("big") is None
    assert cache.stats.hits == 1 and cache.stats.misses == 1


def test_byte_lru_is_thread_safe_under_contention():
    cache: ByteLRU[int] = ByteLRU(1000)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(2000):
            k = int(rng.integers(0, 200))
            if cache.get(k) is None:
                cache.put(k, k, int(rng.integers(1, 50)))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.stats.bytes <= 1000
    assert cache.stats.entries == len(cache.values())


def test_visual_entries_are_read_only_copies():
    cache = VisualCache(1 << 20)
    embeds = np.ones((5, 4), np.float32)
    key = cache.key("fp", "hybrid", 0.25, pixel_digest(np.zeros((3, 8, 8), np.float32)))
    entry = cache.add(key, embeds, np.arange(3), np.arange(2), np.zeros(4, np.float32))
    embeds[:] = 7  # the caller's array may change; the entry does not
    assert cache.get(key).embeds[0, 0] == 1.0
    with pytest.raises(ValueError):
        entry.embeds[0, 0] = 3.0
    assert pixel_digest(np.zeros((3, 8, 8), np.float32)) != pixel_digest(np.zeros((3, 8, 8), np.float64))


def _kv(length: int, value: float = 0.0) -> KVSnapshot:
    return KVSnapshot(length, (np.full((2, length, 4), value, np.float32), np.full((2, length, 4), value, np.float32)))


def test_position_keys_identify_text_and_images():
    a = position_keys([5, 9, 6, 9], image_id=9, image_digests=["x", "y"], tokens_per_image=3)
    b = position_keys([5, 9, 6, 9], image_id=9, image_digests=["x", "z"], tokens_per_image=3)
    assert len(a) == 4 - 2 + 2 * 5 and a[0] == 5 and a[6] == 6
    assert (a[:7] == b[:7]).all() and (a[7:] != b[7:]).all() and (a[1:6] < 0).all()
    slots = position_keys([9, 9], 9, ["x", "x"], 1, image_slots=True)
    assert (slots[:3] != slots[3:]).all()  # the same image in another place is another position with slots


def test_prefix_cache_finds_the_longest_shared_prefix_and_keeps_a_position_to_prefill():
    cache = PrefixCache(1 << 20, min_tokens=2)
    keys = np.arange(20, dtype=np.int64)
    cache.add("fp", keys[:10], _kv(10, 1.0))
    cache.add("fp", keys[:16], _kv(16, 2.0))
    hit = cache.lookup("fp", np.concatenate([keys[:12], [99, 98]]))
    assert hit.length == 12 and hit.kv is not None and hit.kv.tensors[0][0, 0, 0] == 2.0
    assert cache.lookup("fp", keys[:16]).length == 15  # the last position is always prefilled
    assert cache.lookup("other-model", keys).length == 0
    assert cache.lookup("fp", np.array([7, 7, 7])).length == 0


def test_prefix_cache_bound_in_bytes():
    one = _kv(10).nbytes + 10 * 8
    cache = PrefixCache(3 * one, min_tokens=1)
    for i in range(10):
        cache.add("fp", np.arange(10, dtype=np.int64) + 100 * i, _kv(10))
        assert cache.stats.bytes <= 3 * one
    assert cache.stats.entries == 3 and cache.stats.evictions == 7


# ---- the ONNX Runtime primitives on the shipped model's shared-buffer decoder ---------------------


@pytest.fixture(scope="module")
def genai_backend(pytestconfig):
    from maven_edge.export.genai_decoder import builder_unavailable

    if builder_unavailable() is not None:
        pytest.skip(str(builder_unavailable()))
    from maven_edge.runtime.backends.ort_backend import OrtBackend
    from tools.soak import cached_genai_artifacts

    artifacts = cached_genai_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"))
    return OrtBackend(artifacts, session_options={"intra_op_num_threads": 1})


def _reference(be, x: np.ndarray, tokens: list[int]) -> np.ndarray:
    logits, state = be.prefill(x, 64)
    out = [logits]
    for t in tokens:
        out.append(be.decode(state, t))
    return np.stack(out)


def test_prefix_reuse_and_batched_decode_equal_batch_one(genai_backend):
    be = genai_backend
    rng = np.random.default_rng(0)
    d = be.config.llm.hidden_size
    xa = rng.standard_normal((1, 12, d)).astype(np.float32) * 0.05
    xb = rng.standard_normal((1, 7, d)).astype(np.float32) * 0.05
    ta, tb = [5, 17, 33, 2], [9, 9, 40, 7]
    ra, rb = _reference(be, xa, ta), _reference(be, xb, tb)
    # prefix reuse: the first 8 positions from a snapshot, the rest prefilled after them
    _, first = be.prefill(xa[:, :8], 64)
    logits, _ = be.prefill(xa[:, 8:], 64, prefix=be.snapshot(first, 8))
    assert np.array_equal(logits, ra[0])
    # continuous batching: two requests of different lengths, one leaves after two steps
    batch = be.open_batch(4, 64)
    _, sa = be.prefill(xa, 64)
    _, sb = be.prefill(xb, 64)
    slot_a, slot_b = batch.join(sa), batch.join(sb)
    assert (slot_a, slot_b) == (0, 1) and batch.free_slots() == 2
    # b steps alone twice while a waits (a's cache must survive the throw-away token a is fed),
    # then both step together, then a leaves and b goes on
    schedule = [[slot_b], [slot_b], [slot_a, slot_b], [slot_a], [slot_a]]
    steps = {slot_a: 0, slot_b: 0}
    want = {slot_a: (ta, ra), slot_b: (tb, rb)}
    for rows in schedule:
        out = batch.step([(r, want[r][0][steps[r]]) for r in rows])
        for r, logits in zip(rows, out, strict=True):
            steps[r] += 1
            assert np.array_equal(logits, want[r][1][steps[r]]), (rows, r)
    batch.leave(slot_a)
    assert batch.length(slot_b) == 7 + 3 and batch.free_slots() == 3


# ---- the scheduler's prefill-first rule, on a batch that only records its steps -----------------
class _State(DecodeState):
    def __init__(self, length: int):
        self.length, self.capacity = length, 100


class _RecordingBatch(DecodeBatch):
    """Slots without a model: each step returns zero logits and records when it ran and for whom."""

    capacity = 100

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.slots: set[int] = set()
        self.steps: list[tuple[float, list[int]]] = []

    def join(self, state: DecodeState) -> int:
        slot = min(set(range(self.max_batch)) - self.slots)
        self.slots.add(slot)
        return slot

    def step(self, rows: list[tuple[int, int]]) -> np.ndarray:
        self.steps.append((time.perf_counter(), [slot for slot, _ in rows]))
        time.sleep(0.002)
        return np.zeros((len(rows), 3), dtype=np.float32)

    def leave(self, slot: int) -> None:
        self.slots.discard(slot)

    def free_slots(self) -> int:
        return self.max_batch - len(self.slots)


def _row(tokens: int) -> DecodeRow:
    left = [tokens]

    def on_logits(_: np.ndarray) -> tuple[int | None, bool]:
        left[0] -= 1
        return (1 if left[0] > 0 else None), False

    return DecodeRow(_State(5), 1, on_logits)


@pytest.mark.parametrize("prefill_first", [True, False])
def test_decode_steps_wait_for_a_prefill_only_with_prefill_first(prefill_first):
    batch = _RecordingBatch(max_batch=4)
    sched = BatchScheduler(batch, prefill_first=prefill_first)
    hold = sched.prefilling()  # another request encodes and prefills
    row = _row(tokens=20)
    sched.submit(row)
    time.sleep(0.3)
    released = time.perf_counter()
    hold.release()
    hold.release()  # a second release changes nothing
    assert row.done.wait(5) and row.error is None and row.steps == 20
    before = [t for t, _ in batch.steps if t < released]
    if prefill_first:
        assert not before and sched.stats.held_s > 0.2, sched.stats
    else:
        assert len(before) == 20 and sched.stats.held_s == 0.0  # it decoded beside the prefill
    assert sched.stats.prefills == 0 and sched.stats.to_dict()["batch_prefills"] == 0


def test_a_stream_of_prefills_cannot_starve_the_rows_that_decode():
    batch = _RecordingBatch(max_batch=2)
    sched = BatchScheduler(batch)
    row = _row(tokens=3)
    sched.submit(row)
    assert row.done.wait(5)  # nothing prefills: it decodes at once
    holds = [sched.prefilling()]
    row = _row(tokens=3)
    sched.submit(row)
    time.sleep(0.2)
    assert row.steps == 0  # held by the one prefill
    holds += [sched.prefilling() for _ in range(2)]  # three have begun while it waits: more than max_batch
    time.sleep(0.2)
    assert row.steps >= 1  # a step ran beside them; then it waits again
    steps = row.steps
    time.sleep(0.2)
    assert row.steps == steps < 3
    for h in holds:
        with h:
            pass
    assert row.done.wait(5) and row.steps == 3
