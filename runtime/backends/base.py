"""The backend protocol: the stage primitives the pipeline orchestrates (docs/design.md §5).

A backend owns the model (torch modules, ONNX Runtime sessions or TensorRT engines) and
exposes one method per stage. Everything that crosses a stage boundary is a numpy array, so
orchestration, prompt assembly, sampling and detokenization live once, in
:mod:`maven_edge.runtime.pipeline`, and every backend produces the same tokens for the same logits.
The exception is the KV cache, which stays inside the backend in a :class:`DecodeState`
(on the device, for GPU providers) for the whole decode loop.

This module is torch-free.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from maven_edge.core.config import MavenConfig
from maven_edge.core.errors import BackendError, InputError
from maven_edge.core.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from maven_edge.runtime.caches import KVSnapshot
    from maven_edge.runtime.options import PipelineOptions


@dataclass
class SelectorOutput:
    """What the patch selector (+ projector) returns for a batch of images."""

    scores: np.ndarray  # [n, N] float32 (pre-sigmoid logits or probabilities: ranking only)
    embeds: np.ndarray  # [n, k, D] float32: the kept patches, projected, in raster order
    indices: np.ndarray  # [n, k] int64, ascending (raster order)


class DecodeState(abc.ABC):
    """One request's KV cache and decode position; owned by the backend that made it."""

    length: int  # tokens in the cache
    capacity: int  # tokens the cache may hold (prompt + max_new_tokens)

    def release(self) -> None:  # noqa: B027 - optional hook
        """Free the cache now (it is also freed when the state is garbage collected)."""


class DecodeBatch(abc.ABC):
    """Continuous batching: `max_batch` slots in one batched KV buffer. A request prefills on its
    own (:meth:`Backend.prefill`), then :meth:`join` copies its cache into a free slot; each
    :meth:`step` appends one token to every slot it is given and returns their logits. Slots
    are independent rows: each has its own length, and rows join and leave between steps."""

    max_batch: int
    capacity: int

    @abc.abstractmethod
    def join(self, state: DecodeState) -> int:
        """Copy `state`'s cache into a free slot; returns the slot (the caller checks one is free)."""

    @abc.abstractmethod
    def step(self, rows: list[tuple[int, int]]) -> np.ndarray:
        """Feed token ``token_id`` to slot ``slot`` for each (slot, token_id); logits [len(rows), V]."""

    @abc.abstractmethod
    def leave(self, slot: int) -> None:
        """Free a slot."""

    @abc.abstractmethod
    def free_slots(self) -> int:
        """How many slots are free."""

    def length(self, slot: int) -> int:
        """Positions in the slot's cache."""
        raise NotImplementedError

    def snapshot(self, slot: int, length: int) -> KVSnapshot:
        """A host copy of the first `length` positions of a slot's cache."""
        raise NotImplementedError


class Backend(abc.ABC):
    """Stage primitives over one model. Arrays in and out are numpy (float32 / int64)."""

    #: short name: "torch", "ort", "trt"
    name: str = "base"
    #: True when several threads may call the stage methods at the same time. The pipeline
    #: serialises the calls of a backend that says False (one stage call at a time).
    thread_safe: bool = True
    #: True when `prefill` can start from a KVSnapshot and `snapshot` copies a cache out (prefix reuse)
    supports_kv_snapshots: bool = False
    #: True when `start` / `extend` / `rewind` work: a prompt prefilled in chunks, each chunk's last
    #: hidden state read (h_eos read in context, docs/design.md §5.2)
    supports_chunked_prefill: bool = False

    def __init__(self, config: MavenConfig, tokenizer: TextTokenizer):
        self.config = config
        self.tokenizer = tokenizer

    @classmethod
    @abc.abstractmethod
    def from_options(cls, options: PipelineOptions) -> Backend:
        """The backend `options` describe (its artifacts or checkpoint, providers, threads, ...)."""

    # ---- capabilities ------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Identifies the model this backend runs (part of every cache key)."""
        return f"{self.name}:{id(self)}"

    @property
    def device(self) -> str:
        """Where the model runs, in words (for reports)."""
        return "cpu"

    @property
    def default_keep_ratio(self) -> float:
        return self.config.selector.keep_ratio

    def check_keep_ratio(self, keep_ratio: float) -> int:
        """k for this keep ratio, or an InputError if the backend cannot serve it."""
        if not isinstance(keep_ratio, (int, float)) or isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0:
            raise InputError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
        return self.config.num_kept_patches(float(keep_ratio))

    def check_mode(self, mode: str) -> None:  # noqa: B027 - optional hook
        """Raise an InputError/BackendError if this backend cannot run `mode`."""

    # ---- stages -----------------------------------------------------------------------
    @abc.abstractmethod
    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [n, 3, H, W] -> patch_features [n, N, Dv]."""

    @abc.abstractmethod
    def discrete(self, patch_features: np.ndarray) -> np.ndarray:
        """patch_features [n, N, Dv] -> visual codes [n, Q] int64, already unified-vocab ids."""

    @abc.abstractmethod
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [b, s] int64 -> inputs_embeds [b, s, D]."""

    @abc.abstractmethod
    def hidden_states(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One decoder pass without cache -> last-layer hidden states [b, s, D] (after the norm)."""

    @abc.abstractmethod
    def select(self, patch_features: np.ndarray, h_eos: np.ndarray, k: int) -> SelectorOutput:
        """Score patches against h_eos, keep the top k in raster order, project them."""

    @abc.abstractmethod
    def project(self, patch_features: np.ndarray) -> np.ndarray:
        """All patches projected into the LLM space [n, N, D] (continuous mode)."""

    @abc.abstractmethod
    def prefill(self, inputs_embeds: np.ndarray, capacity: int, prefix: KVSnapshot | None = None
                ) -> tuple[np.ndarray, DecodeState]:
        """Run the prompt [1, T, D]; return the last position's logits [V] and the cache state.

        `capacity` is the most tokens the cache will hold (prefix + T + max_new_tokens), so a
        backend may preallocate it once. With `prefix` (only where ``supports_kv_snapshots``),
        the cache starts with those positions and `inputs_embeds` are the positions after them.
        """

    def start(self, capacity: int, prefix: KVSnapshot | None = None) -> DecodeState:
        """An empty cache for at most `capacity` positions, or one holding `prefix`; fill it with
        :meth:`extend` (``supports_chunked_prefill``)."""
        raise BackendError(f"the {self.name} backend cannot prefill a prompt in chunks; use h_eos='separate'")

    def extend(self, state: DecodeState, inputs_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append the positions `inputs_embeds` [1, T, D] to the cache; return the last one's logits
        [V] and last-layer hidden state [D] (``supports_chunked_prefill``)."""
        raise BackendError(f"the {self.name} backend cannot prefill a prompt in chunks; use h_eos='separate'")

    def rewind(self, state: DecodeState, length: int) -> None:
        """Forget the positions after the first `length` (``supports_chunked_prefill``)."""
        raise BackendError(f"the {self.name} backend cannot prefill a prompt in chunks; use h_eos='separate'")

    def snapshot(self, state: DecodeState, length: int) -> KVSnapshot:
        """A host copy of the first `length` positions of `state`'s cache (``supports_kv_snapshots``)."""
        raise BackendError(f"the {self.name} backend cannot copy its KV cache out (no prefix reuse)")

    def open_batch(self, max_batch: int, capacity: int) -> DecodeBatch | None:
        """A batched decoder for continuous batching, or None when this backend decodes one request
        at a time (see :class:`DecodeBatch`)."""
        return None

    @abc.abstractmethod
    def decode(self, state: DecodeState, token_id: int) -> np.ndarray:
        """Append one token to the cache; return its logits [V]."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions / engines."""

    def describe(self) -> dict[str, object]:
        """Facts about this backend for reports and `--json` output."""
        return {"backend": self.name, "device": self.device}


def unavailable(what: str, fix: str) -> BackendError:
    return BackendError(f"{what} is not available on this machine; {fix}")
