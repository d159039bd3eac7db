"""Token selection shared by every backend (numpy only, torch-free).

The torch reference and the ONNX Runtime backends both hand last-position logits to the same
:class:`Sampler`, so greedy output is identical across backends whenever their logits agree
on the argmax, and seeded sampling is identical when their logits agree closely.
Generation only ever picks text tokens: ids at or above `allowed_vocab` (padding rows and
visual codes) are excluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from maven_edge.core.errors import InputError

# new tokens when a caller gives no limit (CLI, Python API, server, evaluator, parity tools): room for
# the longest answer the recipe trains, an 8-image worked count (32 tokens; 54 as a labelled tally,
# `PhaseConfig.labelled_tally`); other answers stop at <eos> long before
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class GenerationConfig:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False  # False = greedy
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> GenerationConfig:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(str(s) for s in self.stop_strings)
        return self


class Sampler:
    """Picks the next token id from a logits vector; seeded, one instance per generation."""

    def __init__(self, cfg: GenerationConfig, allowed_vocab: int):
        self.cfg = cfg.validate()
        self.allowed_vocab = allowed_vocab
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        x = np.asarray(logits, dtype=np.float32).reshape(-1)[: self.allowed_vocab]
        if not self.cfg.do_sample:
            return int(np.argmax(x))
        x = x.astype(np.float64) / self.cfg.temperature
        if 0 < self.cfg.top_k < x.size:
            kth = np.partition(x, -self.cfg.top_k)[-self.cfg.top_k]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if self.cfg.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, self.cfg.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


class StopChecker:
    """Decides when generation ends: a stop token id, or a stop string in the decoded text."""

    def __init__(self, cfg: GenerationConfig, eos_id: int):
        self.stop_ids = {eos_id, *cfg.stop_token_ids}
        self.stop_strings = cfg.stop_strings

    def is_stop_token(self, token_id: int) -> bool:
        return token_id in self.stop_ids

    def trim(self, text: str) -> tuple[str, bool]:
        """(text cut before the first stop string, whether one was found)."""
        cut = min((i for s in self.stop_strings if (i := text.find(s)) >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)
