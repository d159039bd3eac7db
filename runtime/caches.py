"""Caches across requests: what a pipeline keeps so a later request does less work.

* :class:`VisualCache` — per image, everything the visual stages produce that a later request
  needs: the image's whole visual sequence in the prompt (``<img_start>`` + code embeddings +
  projected kept patches + ``<img_end>``, [T_img, D]), its codes, the kept patch indices and the
  selector's scores. Keyed by the sha256 of the preprocessed pixels plus the manifest fingerprint,
  the mode and the keep ratio: everything those stages read. MaVEn's selector is driven by
  ``h_eos``, which the LLM computes from the image's own codes, so the selection — and therefore
  the whole sequence — depends on the image alone. A hit skips vision, discrete, h_eos and
  selector. Why the embeddings and not only codes + indices: the kept patches' projections need
  the ViT's patch features, which is exactly the work a hit must skip; the sequence is small
  (tiny: 50 x 192 floats, 38 KB; edge-small: 83 x 896 floats, 297 KB). With h_eos read in
  context (``GenerateOptions.h_eos="context"``) the selection depends on the prompt before the
  image, so an entry holds only what depends on the image alone: ``<img_start>`` + code
  embeddings + ``<img_end>``, the codes and the ViT patch features the prefill selects from (its
  own key: the mode is ``hybrid:h_eos-in-context``); a hit skips vision and discrete.
* :class:`PrefixCache` — KV-cache prefixes. Each entry is the KV of a sequence of prompt
  positions and the identity of every position (a text token id, or an image's hash and the
  offset inside its visual sequence). A request reuses the longest prefix that any entry shares
  with its own assembled prompt and prefills only the rest; it always prefills at least its last
  position (the first token's logits come from there). Entries are stored after each request
  (prompt plus the generated tokens fed back), so in multi-turn chat the conversation so far is a
  cached prefix and only the new turn is prefilled. Lookup is a scan over entries comparing
  position keys with numpy (entries are few and bounded in bytes; a trie would save nothing
  measurable at this size). With h_eos read in context, an entry also notes the kept patches of
  each image it covers (they were chosen during its prefill), so a request that reuses them can
  report them; a prefix that ends inside an image's kept patches is cut back to their start,
  where the image's h_eos is read again.

Both are bounded in bytes with least-recently-used eviction, thread-safe (one lock per cache,
held only for dictionary work), and their entries are immutable (arrays are read-only): a
request that got an entry keeps a consistent view while another request evicts it. The
manifest fingerprint is part of every key, so caches never mix artifacts.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

V = TypeVar("V")

#: default bounds (MB); ``--visual-cache-mb`` / ``--prefix-cache-mb`` (0 disables a cache)
DEFAULT_VISUAL_CACHE_MB = 64
DEFAULT_PREFIX_CACHE_MB = 256


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.flags.writeable:
        a = a.copy()
        a.flags.writeable = False
    return a


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ByteLRU(Generic[V]):
    """A thread-safe mapping bounded in bytes, evicting the least recently used entries."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._data: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats(max_bytes=self.max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.stats.misses += 1
                return None
            self._data.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> bool:
        """Store `value`; False when it alone is larger than the bound (then nothing is stored)."""
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.stats.bytes -= old[1]
            self._data[key] = (value, nbytes)
            self.stats.bytes += nbytes
            while self.stats.bytes > self.max_bytes:
                _, (_, size) = self._data.popitem(last=False)
                self.stats.bytes -= size
                self.stats.evictions += 1
            self.stats.entries = len(self._data)
            return True

    def values(self) -> list[V]:
        """A snapshot of the entries, most recently used last."""
        with self._lock:
            return [v for v, _ in self._data.values()]

    def touch(self, key: Hashable) -> None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.stats.bytes = self.stats.entries = 0


# ---- the visual-feature cache --------------------------------------------------------------------


@dataclass(frozen=True)
class VisualEntry:
    """One image's visual-stage results (read-only arrays)."""

    embeds: np.ndarray  # [T_img, D]: <img_start> + codes + kept patches + <img_end> (in context: no patches)
    codes: np.ndarray | None  # [Q] unified-vocabulary ids (hybrid, discrete)
    indices: np.ndarray | None  # [k] kept patch indices, raster order (hybrid)
    scores: np.ndarray | None  # [N] selector scores (hybrid)
    patch_features: np.ndarray | None = None  # [N, Dv] ViT features (hybrid, h_eos in context)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.embeds, self.codes, self.indices, self.scores, self.patch_features)
                   if a is not None)


def pixel_digest(pixel_values: np.ndarray) -> str:
    """sha256 of one image's preprocessed pixels (shape and dtype included)."""
    a = np.ascontiguousarray(pixel_values)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


class VisualCache(ByteLRU[VisualEntry]):
    def key(self, fingerprint: str, mode: str, keep_ratio: float | None, digest: str) -> tuple:
        return (fingerprint, mode, None if keep_ratio is None else round(float(keep_ratio), 9), digest)

    def add(self, key: tuple, embeds: np.ndarray, codes: np.ndarray | None, indices: np.ndarray | None,
            scores: np.ndarray | None, patch_features: np.ndarray | None = None) -> VisualEntry:
        entry = VisualEntry(_frozen(embeds), *(None if a is None else _frozen(a)
                                               for a in (codes, indices, scores, patch_features)))
        self.put(key, entry, entry.nbytes)
        return entry


# ---- the prefix KV cache ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KVSnapshot:
    """A host copy of the first `length` positions of one request's KV cache (read-only arrays,
    one per past tensor of the decoder, each [kv_heads, length, head_dim])."""

    length: int
    tensors: tuple[np.ndarray, ...]
    # h_eos in context: (position of an image's first kept patch, kept indices [k], scores [N]) for
    # each image whose kept patches lie inside these positions
    selections: tuple[tuple[int, np.ndarray, np.ndarray], ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + sum(i.nbytes + s.nbytes for _, i, s in self.selections)

    def prefix(self, n: int) -> KVSnapshot:
        """The first `n` positions (views, no copy)."""
        return KVSnapshot(n, tuple(t[:, :n] for t in self.tensors),
                          tuple(sel for sel in self.selections if sel[0] + len(sel[1]) <= n))


def position_keys(prompt_ids: Sequence[int], image_id: int, image_digests: Sequence[str],
                  tokens_per_image: int | Sequence[int], image_slots: bool = False) -> np.ndarray:
    """One int64 per assembled prompt position: a text token's id (>= 0), or for a visual position
    a negative number from the image's identity and the offset in its sequence (with image slots,
    the image's place in the prompt too: its vectors depend on it). An image's identity must
    name everything its visual sequence depends on: its pixels, and the mode and number of kept
    patches it was encoded with."""
    out: list[int] = []
    img = 0
    for t in prompt_ids:
        if t != image_id:
            out.append(int(t))
            continue
        base = hashlib.sha256(f"{image_digests[img]}:{img if image_slots else ''}".encode()).digest()
        seed = int.from_bytes(base[:7], "little")
        count = tokens_per_image if isinstance(tokens_per_image, int) else tokens_per_image[img]
        out.extend(-1 - ((seed + j) & ((1 << 62) - 1)) for j in range(count + 2))
        img += 1
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class PrefixEntry:
    keys: np.ndarray  # [L] position keys (read-only)
    kv: KVSnapshot  # the KV of those L positions


@dataclass
class PrefixHit:
    length: int  # positions reused
    kv: KVSnapshot | None


class PrefixCache(ByteLRU[PrefixEntry]):
    def __init__(self, max_bytes: int, min_tokens: int = 8):
        super().__init__(max_bytes)
        self.min_tokens = min_tokens  # shorter shared prefixes are not worth a copy
        self.reused_tokens = 0

    def lookup(self, fingerprint: str, keys: np.ndarray) -> PrefixHit:
        """The longest cached prefix of `keys` (at most len(keys) - 1 positions), or a miss."""
        best_len, best = 0, None
        limit = len(keys) - 1
        for entry_key, entry in self._items(fingerprint):
            n = min(len(entry.keys), limit)
            if n <= best_len:
                continue
            diff = np.flatnonzero(entry.keys[:n] != keys[:n])
            common = int(diff[0]) if diff.size else n
            if common > best_len:
                best_len, best = common, (entry_key, entry)
        with self._lock:
            if best is None or best_len < self.min_tokens:
                self.stats.misses += 1
                return PrefixHit(0, None)
            self.stats.hits += 1
            self.reused_tokens += best_len
            if best[0] in self._data:
                self._data.move_to_end(best[0])
        return PrefixHit(best_len, best[1].kv.prefix(best_len))

    def _items(self, fingerprint: str) -> list[tuple[Hashable, PrefixEntry]]:
        with self._lock:
            return [(k, v) for k, (v, _) in self._data.items() if k[0] == fingerprint]

    def add(self, fingerprint: str, keys: np.ndarray, kv: KVSnapshot) -> None:
        if kv.length < self.min_tokens:
            return
        keys = _frozen(keys[: kv.length])
        entry = PrefixEntry(keys, kv)
        self.put((fingerprint, hashlib.sha256(keys.tobytes()).hexdigest()), entry, kv.nbytes + keys.nbytes)

    def to_stats(self) -> dict[str, int]:
        return self.stats.to_dict() | {"reused_tokens": self.reused_tokens}


@dataclass
class RequestCacheStats:
    """What the caches did for one request (in GenerationResult.cache and --json)."""

    visual_hits: int = 0
    visual_misses: int = 0
    prefix_tokens_reused: int = 0
    prefix_tokens_computed: int = 0
    batched: bool = False
    batch_occupancy: float = 0.0  # mean number of rows in the batched decode steps this request took part in
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("extra")
        return d | self.extra
