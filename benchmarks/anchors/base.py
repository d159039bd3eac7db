"""The text-generation protocol every engine (ours and the anchors) is measured with.

One measurement = one greedy generation from a fixed random prompt of ``prompt_len`` token ids
with exactly ``new_tokens`` new tokens (end-of-sequence is ignored, so every engine produces the
same number of tokens), timed as:

- ``prefill_ms``: from handing over the prompt ids to having the first new token (prompt
  embedding, the full prompt forward pass and picking the first token);
- ``decode_tok_s``: ``(new_tokens - 1) / (time from the first to the last new token)``, i.e.
  the steady decode loop with the KV cache, one token per step.

Every engine is set to the same number of intra-op threads and reads the same weights (the
``edge-small`` decoder exported once to a Hugging Face checkpoint). The first run's generated
ids are kept, so reports can show that the fp32 engines agree token for token.

An engine is a subclass of :class:`Engine` in its own module; it imports its library only in
:meth:`Engine.load` / :meth:`Engine.prepare`, so listing engines imports nothing heavy.
"""

from __future__ import annotations

import abc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.core.errors import BackendError

#: Result states of one (engine, precision) measurement.
MEASURED, REFERENCE, SKIPPED, FAILED = "measured", "reference (not measured here)", "skipped", "failed"


@dataclass
class TextSpec:
    """What every engine is asked to do, identically."""

    prompt_len: int = 256
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 3
    threads: int = 2
    seed: int = 0
    id_high: int = 256  # prompt ids are drawn from [0, id_high): plain text tokens

    def prompt_ids(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, max(1, self.id_high), size=self.prompt_len, dtype=np.int64)

    @property
    def max_length(self) -> int:
        return self.prompt_len + self.new_tokens


@dataclass
class TextRun:
    """One timed generation."""

    prefill_ms: float
    decode_ms: float  # first to last new token
    tokens: list[int]
    #: decode steps timed in ``decode_ms`` when the engine reports no token ids (llama-bench draws its
    #: own); otherwise one fewer than the tokens
    decode_steps: int | None = None

    @property
    def steps(self) -> int:
        return self.decode_steps if self.decode_steps is not None else len(self.tokens) - 1

    @property
    def decode_tok_s(self) -> float:
        return self.steps / (self.decode_ms / 1e3) if self.steps > 0 and self.decode_ms > 0 else 0.0

    def record(self) -> dict[str, float]:
        return {"prefill_ms": self.prefill_ms, "decode_tok_s": self.decode_tok_s,
                "decode_ms_per_token": self.decode_ms / max(1, self.steps)}


@dataclass
class Prepared:
    """Files an engine runs from (built once, cached by the model fingerprint)."""

    path: str
    bytes: int
    seconds: float  # time spent building now (0 when reused from the cache)
    cached: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineContext:
    """Where everything lives for one benchmark run."""

    work_dir: Path  # cache for converted models, keyed by the model fingerprint
    hf_dir: Path | None  # HF-format checkpoint of the decoder (all anchors start from it)
    checkpoint: Path | None  # maven-edge checkpoint (torch engine)
    artifacts: dict[str, str] = field(default_factory=dict)  # precision -> our exported artifacts
    threads: int = 2
    log: Any = None  # callable(str) for build logs
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific (e.g. llama_cpp_bin: the built tools)

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)


class Engine(abc.ABC):
    """One way of running the decoder on text: ours (ort, torch) or an anchor."""

    name: str = "engine"  # short name used on the command line and in files
    label: str = "engine"  # for tables and plots
    precisions: tuple[str, ...] = ("fp32",)
    ours: bool = False

    def __init__(self, ctx: EngineContext, precision: str):
        if precision not in self.precisions:
            raise BackendError(f"{self.label} does not run precision {precision!r}; it runs {self.precisions}")
        self.ctx = ctx
        self.precision = precision

    def unavailable(self) -> str | None:
        """Why this engine cannot run here (missing package, missing files), or None."""
        return None

    def reference(self) -> dict[str, float] | None:
        """Published figures to report (marked 'not measured here') when the engine is unavailable."""
        return None

    @abc.abstractmethod
    def prepare(self) -> Prepared:
        """Build (or reuse) the files this engine runs from."""

    @abc.abstractmethod
    def load(self, prepared: Prepared) -> None:
        """Load the model for this precision with ``ctx.threads`` intra-op threads."""

    @abc.abstractmethod
    def generate(self, spec: TextSpec) -> TextRun:
        """One greedy generation of exactly ``spec.new_tokens`` tokens, timed as the module says."""

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "label": self.label, "precision": self.precision, "ours": self.ours}


# ---- helpers shared by the engines ----------------------------------------------------------


def dir_bytes(path: str | Path, pattern: str = "*") -> int:
    """Total size of the files under `path` matching `pattern` (a file: its size)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob(pattern) if f.is_file())


def stamp_ok(directory: Path, key: dict[str, Any]) -> bool:
    """True when `directory` holds a finished build made for exactly `key`."""
    stamp = directory / ".bench-stamp.json"
    try:
        return json.loads(stamp.read_text()) == key
    except (OSError, ValueError):
        return False


def write_stamp(directory: Path, key: dict[str, Any]) -> None:
    (directory / ".bench-stamp.json").write_text(json.dumps(key, sort_keys=True))


def argmax(logits: Any) -> int:
    return int(np.argmax(np.asarray(logits).reshape(-1)))


class StepClock:
    """Timestamps for a generation loop: ``start()``, ``first()``, then ``last()``."""

    def __init__(self) -> None:
        self.t0 = self.t1 = self.t2 = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def first(self) -> None:
        self.t1 = self.t2 = time.perf_counter()

    def last(self) -> None:
        self.t2 = time.perf_counter()

    def run(self, tokens: list[int]) -> TextRun:
        return TextRun(prefill_ms=(self.t1 - self.t0) * 1e3, decode_ms=(self.t2 - self.t1) * 1e3, tokens=tokens)


def hf_recorder(clock: StepClock):
    """A transformers StoppingCriteria that timestamps every generated token (never stops)."""
    import torch
    from transformers import StoppingCriteria

    class _Recorder(StoppingCriteria):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if self.calls == 0:
                clock.first()
            else:
                clock.last()
            self.calls += 1
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return _Recorder()


def hf_generate_run(model: Any, spec: TextSpec) -> TextRun:
    """Greedy `generate()` of exactly `spec.new_tokens` tokens on a transformers-style model."""
    import torch
    from transformers import StoppingCriteriaList

    ids = torch.from_numpy(spec.prompt_ids())[None]
    mask = torch.ones_like(ids)
    clock = StepClock()
    recorder = hf_recorder(clock)
    clock.start()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens,
            do_sample=False, use_cache=True, num_beams=1, stopping_criteria=StoppingCriteriaList([recorder]),
            pad_token_id=0, eos_token_id=None,
        )
    tokens = [int(t) for t in out[0, spec.prompt_len:]]
    return clock.run(tokens)


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
