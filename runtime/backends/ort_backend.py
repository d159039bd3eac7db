"""The ONNX Runtime backend: the five exported components (docs/design.md §4), torch-free.

    be = OrtBackend("artifacts/tiny", providers=["cpu"], session_options=SessionConfig(intra_op_num_threads=2))

Sessions are created once, from the files the manifest lists (after their sha256 is checked),
with the given :class:`SessionConfig`, and reused by every request. Execution providers are
chosen by short name: ``cpu``, ``cuda`` (CUDAExecutionProvider) and ``tensorrt``
(TensorrtExecutionProvider with an engine cache; CUDA and CPU stay behind it as fallbacks for
nodes TensorRT does not take).

The decode loop keeps the KV cache where ONNX Runtime put it (host memory for CPU, device
memory for CUDA/TensorRT) using IOBinding, so no cache tensor goes through numpy. Two decoder kinds:

* ``torch.onnx`` export (default): the graph appends with a Concat, present = past + new; each
  step binds the previous step's ``present.*`` OrtValues as the next ``past_key_values.*``.
* ``past_present_share_buffer`` in the manifest (``maven-edge export --decoder genai``: the
  onnxruntime-genai builder's GroupQueryAttention): one ``[1, kv_heads, capacity, head_dim]``
  buffer per layer is allocated at prefill and bound as both past and present, so a step writes
  only the new token and allocates nothing for the cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from maven_edge.core.errors import ArtifactError, BackendError, InputError, MavenError
from maven_edge.core.manifest import (
    MANIFEST,
    Manifest,
    TensorSpec,
    check_graph_io,
    load_manifest,
    resolve_inside,
    sha256_file,
)
from maven_edge.core.manifest_schema import ORT_TYPES
from maven_edge.core.tokenizer import TextTokenizer
from maven_edge.runtime.backends.base import Backend, DecodeBatch, DecodeState, SelectorOutput
from maven_edge.runtime.backends.providers import PROVIDERS, check_decoder_for, resolve_providers
from maven_edge.runtime.caches import KVSnapshot

if TYPE_CHECKING:
    from maven_edge.runtime.options import PipelineOptions

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bfloat16)": np.float32}


@dataclass
class SessionConfig:
    """How the ONNX Runtime sessions are built (once, at load)."""

    graph_optimization_level: str = "all"  # disable | basic | extended | all
    intra_op_num_threads: int = 0  # 0 = onnxruntime's default (one per physical core)
    inter_op_num_threads: int = 0  # only used with execution_mode="parallel"
    execution_mode: str = "sequential"  # sequential | parallel
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True
    log_severity_level: int = 3  # 0 verbose .. 4 fatal
    optimized_model_dir: str | None = None  # write each optimized graph here (for inspection)
    device_id: int = 0  # GPU for cuda / tensorrt
    # TensorRT execution provider
    trt_engine_cache_path: str | None = None  # default: <artifacts>/trt_cache
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_max_workspace_size: int | None = None  # bytes
    trt_profile_max_seq: int = 0  # context the TensorRT provider's explicit profiles cover (0: 1024, capped by the model)
    extra_config: dict[str, str] = field(default_factory=dict)  # SessionOptions.add_session_config_entry
    # Extra options per provider short name, merged over the defaults above, e.g.
    # {"tensorrt": {"trt_profile_min_shapes": "...", ...}, "cuda": {"gpu_mem_limit": 8 << 30}}
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: SessionConfig | dict[str, Any] | None) -> SessionConfig:
        """A SessionConfig from itself, a dict of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as exc:
                raise InputError(f"bad session option: {exc}; see maven_edge.runtime.backends.ort_backend.SessionConfig") from None
        raise InputError(
            f"session_options must be a SessionConfig or a dict of its fields, got {type(value).__name__}"
        )

    def build(self) -> ort.SessionOptions:
        if self.graph_optimization_level not in _OPT_LEVELS:
            raise InputError(
                f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, "
                f"got {self.graph_optimization_level!r}"
            )
        if self.execution_mode not in ("sequential", "parallel"):
            raise InputError(f"execution_mode must be sequential or parallel, got {self.execution_mode!r}")
        for name in ("intra_op_num_threads", "inter_op_num_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an integer >= 0 (0 = onnxruntime's default), got {v!r}")
        so = ort.SessionOptions()
        so.graph_optimization_level = _OPT_LEVELS[self.graph_optimization_level]
        so.intra_op_num_threads = self.intra_op_num_threads
        so.inter_op_num_threads = self.inter_op_num_threads
        so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if self.execution_mode == "parallel"
                             else ort.ExecutionMode.ORT_SEQUENTIAL)
        so.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        so.enable_mem_pattern = self.enable_mem_pattern
        so.log_severity_level = self.log_severity_level
        for k, v in self.extra_config.items():
            so.add_session_config_entry(str(k), str(v))
        return so


class _Session:
    """One component's InferenceSession plus its input/output names and dtypes."""

    def __init__(self, name: str, path: Path, so: ort.SessionOptions, providers: list, cfg: SessionConfig):
        if cfg.optimized_model_dir:
            Path(cfg.optimized_model_dir).mkdir(parents=True, exist_ok=True)
            so.optimized_model_filepath = str(Path(cfg.optimized_model_dir) / f"{name}.optimized.onnx")
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=[p for p, _ in providers],
                                             provider_options=[o for _, o in providers])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {path.name}: {exc}") from exc
        self.name = name
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def dtype(self, input_name: str) -> type:
        return _ORT_TYPES.get(self.inputs[input_name].type, np.float32)

    def require(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        miss_in = [n for n in inputs if n not in self.inputs]
        miss_out = [n for n in outputs if n not in self.outputs]
        if miss_in or miss_out:
            raise ArtifactError(
                f"{self.name}.onnx does not follow the maven-edge contract (docs/design.md §4): missing inputs "
                f"{miss_in}, outputs {miss_out}; re-export it with `maven-edge export`"
            )

    def run(self, outputs: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {k: np.ascontiguousarray(v, dtype=self.dtype(k)) for k, v in feeds.items()}
        return self.sess.run(list(outputs) if outputs else None, feeds)


def check_session_providers(component: str, used: Sequence[str], asked: Sequence[tuple[str, Any]]) -> None:
    """Refuse a session onnxruntime created without the first provider asked for: when a GPU
    provider fails to initialise (missing CUDA / cuDNN / TensorRT libraries, no device) onnxruntime
    logs a warning and silently runs everything on the CPU."""
    want = asked[0][0]
    if want not in used:
        short = PROVIDERS.by_ort_name(want)
        raise BackendError(
            f"onnxruntime created the {component} session without {want} (it runs on {', '.join(used)}): the "
            f"{short} provider failed to initialise and onnxruntime fell back silently. Check the CUDA/cuDNN"
            f"{'/TensorRT' if short == 'tensorrt' else ''} libraries onnxruntime-gpu needs (set "
            "log_severity_level=0 to see its reason), or use --provider cpu")


class OrtDecodeState(DecodeState):
    def __init__(self, past: list[Any], length: int, capacity: int):
        self.past: list[Any] | None = past  # OrtValues, 2 per layer (key, value)
        self.length = length
        self.capacity = capacity

    def release(self) -> None:
        self.past = None


class OrtDecodeBatch(DecodeBatch):
    """Continuous batching over the shared-buffer decoder (``past_present_share_buffer``, the
    onnxruntime-genai builder's GroupQueryAttention), on the CPU.

    One host buffer per KV tensor, [max_batch, kv_heads, capacity, head_dim], bound as both past
    and present. A step runs rows 0 .. highest busy slot; each row's attention-mask row covers its
    own length (right-padded with zeros), which GroupQueryAttention turns into per-row sequence
    lengths, so rows of different lengths decode together and a row's logits equal a batch-1
    step's. A busy row that does not step is fed a throw-away token one position past its cache
    (its next step overwrites it); free rows write into their own position 0, which a join
    overwrites.
    """

    def __init__(self, backend: OrtBackend, max_batch: int, capacity: int):
        c = backend.config.llm
        self.be = backend
        self.max_batch, self.capacity = int(max_batch), int(capacity)
        self.kv = [np.zeros((self.max_batch, c.num_kv_heads, self.capacity, c.head_dim), dtype=backend.kv_dtype)
                   for _ in backend.past_names]
        self.lengths = [0] * self.max_batch
        self.busy = [False] * self.max_batch

    def free_slots(self) -> int:
        return self.busy.count(False)

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def join(self, state: DecodeState) -> int:
        assert isinstance(state, OrtDecodeState) and state.past is not None
        if state.length + 1 > self.capacity:
            raise InputError(f"a request of {state.length} positions does not fit the batch capacity {self.capacity}")
        slot = self.busy.index(False)
        for buf, value in zip(self.kv, state.past, strict=True):
            buf[slot, :, : state.length] = value.numpy()[0, :, : state.length]
        self.lengths[slot] = state.length
        self.busy[slot] = True
        return slot

    def snapshot(self, slot: int, length: int) -> KVSnapshot:
        return KVSnapshot(length, tuple(np.array(buf[slot, :, :length], dtype=np.float32) for buf in self.kv))

    def leave(self, slot: int) -> None:
        self.busy[slot] = False
        self.lengths[slot] = 0

    def step(self, rows: list[tuple[int, int]]) -> np.ndarray:
        be = self.be
        m = max(slot for slot, _ in rows) + 1
        ids = np.zeros((m, 1), dtype=np.int64)
        # A row that does not step this time still gets a token: it goes one past the row's cache
        # (overwritten by the row's next real step), never over a position it holds. Free rows
        # write their position 0, which a join overwrites.
        new_len = [self.lengths[r] + 1 if self.busy[r] else 1 for r in range(m)]
        for r in range(m):
            if new_len[r] > self.capacity:
                raise InputError(f"the batched KV cache is full ({self.capacity} tokens)")
        for slot, token in rows:
            ids[slot, 0] = token
            new_len[slot] = self.lengths[slot] + 1
        embeds = be.embed(ids).astype(be.embed_dtype, copy=False)
        mask = np.zeros((m, max(new_len)), dtype=be.mask_dtype)
        for r, n in enumerate(new_len):
            mask[r, :n] = 1
        binding = be.dec.sess.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        binding.bind_cpu_input("attention_mask", mask)
        values = [ort.OrtValue.ortvalue_from_numpy(buf[:m]) for buf in self.kv]  # views: no copy
        for name, value in zip(be.past_names, values, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for name, value in zip(be.present_names, values, strict=True):
            binding.bind_ortvalue_output(name, value)
        be.dec.sess.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        for slot, _ in rows:
            self.lengths[slot] += 1
        return np.stack([logits[slot, -1] for slot, _ in rows]).astype(np.float32)


class OrtBackend(Backend):
    name = "ort"
    thread_safe = True  # InferenceSession.run is thread-safe; IOBindings are per call
    supports_kv_snapshots = True
    supports_chunked_prefill = True

    def __init__(
        self,
        artifacts: str | Path,
        providers: Sequence[str] | str | None = None,
        session_options: SessionConfig | None = None,
        verify: bool = True,
        manifest: Manifest | None = None,
    ):
        self.artifacts = Path(artifacts)
        self.manifest = manifest or load_manifest(self.artifacts, verify=verify)
        cfg = self.manifest.maven_config()
        layout = self.manifest.vocab_layout()
        tok_path = resolve_inside(self.artifacts, self.manifest.tokenizer.path)
        try:
            tokenizer = TextTokenizer.from_file(tok_path, layout.text_vocab_size, layout.codebook_size)
        except MavenError as exc:
            raise ArtifactError(f"{self.manifest.tokenizer.path}: {exc}; re-export the artifacts") from None
        if tokenizer.layout.special_ids != layout.special_ids:
            raise ArtifactError(
                f"{tok_path.name} does not match vocab.special_ids in {MANIFEST}; re-export the artifacts"
            )
        if tokenizer.layout.tokenizer_size != layout.tokenizer_size:
            raise ArtifactError(
                f"{tok_path.name} has {tokenizer.layout.tokenizer_size} ids, but vocab.tokenizer_size in {MANIFEST} is "
                f"{layout.tokenizer_size}; re-export the artifacts"
            )
        super().__init__(cfg, tokenizer)
        self.session_config = SessionConfig.coerce(session_options)
        self.providers = resolve_providers(providers, self.session_config, self.artifacts)
        self.provider_names = [PROVIDERS.by_ort_name(p) for p, _ in self.providers]
        self.io_device = PROVIDERS.get(self.provider_names[0]).io_device
        self.device_id = self.session_config.device_id
        for comp in self.manifest.components.values():
            check_decoder_for(self.provider_names[0], comp)
        self.sessions: dict[str, _Session] = {}
        for comp_name, comp in self.manifest.components.items():
            path = resolve_inside(self.artifacts, comp.file.path)
            per_component = resolve_providers(providers, self.session_config, self.artifacts, self.manifest, comp)
            self.sessions[comp_name] = _Session(comp_name, path, self.session_config.build(), per_component,
                                                self.session_config)
            check_session_providers(comp_name, self.sessions[comp_name].sess.get_providers(), per_component)
        self._check_graphs()
        s = self.sessions
        s["vision_encoder"].require(["pixel_values"], ["patch_features"])
        s["embed_tokens"].require(["input_ids"], ["inputs_embeds"])
        s["patch_selector"].require(["patch_features", "h_eos"], ["scores", "selected_embeds", "selected_indices"])
        dt = s["discrete_tokenizer"]
        self._discrete_input = "patch_features" if "patch_features" in dt.inputs else "pixel_values"
        dt.require([self._discrete_input], ["visual_codes"])
        dec = self.dec = s["decoder"]
        self.num_layers = sum(1 for n in dec.inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        dec.require(["inputs_embeds", "attention_mask", *self.past_names],
                    ["logits", "hidden_states", *self.present_names])
        if self.num_layers != cfg.llm.num_layers:
            raise ArtifactError(
                f"decoder.onnx has {self.num_layers} layers of KV cache, the manifest config says "
                f"{cfg.llm.num_layers}; re-export the artifacts"
            )
        self.uses_position_ids = "position_ids" in dec.inputs
        dec_extra = self.manifest.components["decoder"].extra or {}
        # A decoder whose attention writes into a preallocated cache (onnxruntime-genai builder,
        # GroupQueryAttention): past and present are bound to one [1, kv, capacity, hd] buffer.
        self.shared_kv = bool(dec_extra.get("past_present_share_buffer"))
        self.mask_dtype = dec.dtype("attention_mask")
        self.kv_dtype = dec.dtype(self.past_names[0]) if self.past_names else np.float32
        self.embed_dtype = dec.dtype("inputs_embeds")
        self.k = int(self.manifest.num_kept_patches)
        self.keep_ratio = float(self.manifest.keep_ratio)
        self.projector = self._find_projector()
        self._probe()

    def _check_graphs(self) -> None:
        """Every component's manifest entry against its graph's real inputs and outputs, as
        onnxruntime loaded them (names, element types, fixed axes)."""
        def specs(args: list[Any]) -> list[TensorSpec]:
            return [TensorSpec(a.name, ORT_TYPES.get(a.type, a.type),
                               [d if isinstance(d, int) else (d or "?") for d in (a.shape or [])]) for a in args]

        for name, comp in self.manifest.components.items():
            sess = self.sessions[name].sess
            problems = check_graph_io(comp, specs(sess.get_inputs()), specs(sess.get_outputs()))
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise ArtifactError(
                    f"{comp.file.path} does not match {MANIFEST}: {problems[0]}{more}; re-export the artifacts"
                )

    def _probe(self) -> None:
        """Run the embedding over the vocabulary's first and last id, and the decoder's KV-cache
        loop the manifest declares (a 2-token prefill, then one step) on zeros, once at load: what
        a graph cannot say in its inputs and outputs (the embedding table's size, whether the
        attention writes into a shared past/present buffer) fails here, not in a request."""
        vocab = self.tokenizer.layout.vocab_size
        try:
            rows = self.embed(np.array([[0, vocab - 1]], dtype=np.int64))
        except Exception as exc:
            raise ArtifactError(
                f"{self.manifest.components['embed_tokens'].file.path} cannot embed ids 0..{vocab - 1}, the vocabulary "
                f"{MANIFEST} declares (vocab.text_vocab_size + vocab.codebook_size) ({exc}); re-export the artifacts"
            ) from None
        flag = "past_present_share_buffer" if self.shared_kv else "no past_present_share_buffer"
        try:
            logits, state = self.prefill(np.zeros((1, 2, rows.shape[-1]), dtype=np.float32), 4)
            logits = self.decode(state, 0)
            state.release()
        except Exception as exc:
            raise ArtifactError(
                f"{self.manifest.components['decoder'].file.path} cannot run the KV-cache loop {MANIFEST} declares "
                f"(components.decoder.extra: {flag}): {type(exc).__name__}: {str(exc)[:300]}; re-export the artifacts"
            ) from None
        if logits.shape != (vocab,):
            raise ArtifactError(
                f"{self.manifest.components['decoder'].file.path} gives {logits.shape[-1]} logits per position, "
                f"{MANIFEST} declares a vocabulary of {vocab}; re-export the artifacts"
            )

    @classmethod
    def from_options(cls, options: PipelineOptions) -> OrtBackend:
        if options.session_options is not None:
            so = SessionConfig.coerce(options.session_options)
        else:
            so = SessionConfig(graph_optimization_level=options.opt_level, intra_op_num_threads=options.threads,
                               trt_engine_cache_path=options.trt_cache, trt_fp16=options.trt_fp16)
        assert options.artifacts is not None
        return cls(options.artifacts, providers=list(options.providers), session_options=so, verify=options.verify,
                   **options.extra)

    # ---- capabilities -----------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of manifest.json: it lists every file's sha256, so other files give another value."""
        return sha256_file(self.artifacts / MANIFEST)

    @property
    def device(self) -> str:
        return self.io_device if self.io_device == "cpu" else f"{self.io_device}:{self.device_id}"

    @property
    def default_keep_ratio(self) -> float:
        return self.keep_ratio

    def _find_projector(self) -> _Session | None:
        """A standalone projector component, when the export wrote one (any keep ratio, continuous)."""
        for name in ("projector",):
            if name in self.sessions:
                return self.sessions[name]
        return None

    def check_keep_ratio(self, keep_ratio: float) -> int:
        k = super().check_keep_ratio(keep_ratio)
        if k != self.k and self.projector is None:
            raise InputError(
                f"these artifacts were exported with keep_ratio {self.keep_ratio} (k={self.k} of "
                f"{self.config.num_patches} patches); keep_ratio {keep_ratio} needs k={k}. Re-export with "
                f"`maven-edge export ... --keep-ratio {keep_ratio}` or use the torch backend"
            )
        return k

    def check_mode(self, mode: str) -> None:
        if mode == "continuous" and self.projector is None:
            raise InputError(
                "these artifacts cannot run continuous mode (no projector for all patches was exported); "
                "re-export them with continuous mode support or use the torch backend"
            )

    # ---- stages -----------------------------------------------------------------------------
    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sessions["vision_encoder"].run(["patch_features"], {"pixel_values": pixel_values})[0]

    def discrete(self, patch_features: np.ndarray) -> np.ndarray:
        return self.sessions["discrete_tokenizer"].run(["visual_codes"], {self._discrete_input: patch_features})[0]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        out = self.sessions["embed_tokens"].run(["inputs_embeds"], {"input_ids": input_ids})[0]
        return out.astype(np.float32, copy=False)

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        c = self.config.llm
        z = np.zeros((batch, c.num_kv_heads, 0, c.head_dim), dtype=self.kv_dtype)
        return dict.fromkeys(self.past_names, z)

    def _positions(self, mask: np.ndarray, seq: int) -> np.ndarray:
        return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -seq:].astype(np.int64)

    def hidden_states(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        b, t = attention_mask.shape
        feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, **self._empty_past(b)}
        if self.uses_position_ids:
            feeds["position_ids"] = self._positions(attention_mask, t)
        return self.dec.run(["hidden_states"], feeds)[0].astype(np.float32, copy=False)

    def select(self, patch_features: np.ndarray, h_eos: np.ndarray, k: int) -> SelectorOutput:
        scores, embeds, indices = self.sessions["patch_selector"].run(
            ["scores", "selected_embeds", "selected_indices"], {"patch_features": patch_features, "h_eos": h_eos})
        if k == self.k:
            return SelectorOutput(scores.astype(np.float32, copy=False), embeds.astype(np.float32, copy=False),
                                  indices.astype(np.int64, copy=False))
        assert self.projector is not None
        top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
        idx = np.sort(top, axis=-1).astype(np.int64)
        # projector.onnx has a fixed patch axis: project all N patches, then keep k of them.
        kept = np.take_along_axis(self.project(patch_features), idx[..., None], axis=1)
        return SelectorOutput(scores.astype(np.float32, copy=False), np.ascontiguousarray(kept), idx)

    def project(self, patch_features: np.ndarray) -> np.ndarray:
        assert self.projector is not None
        name = next(iter(self.projector.inputs))
        return self.projector.run(None, {name: patch_features})[0].astype(np.float32, copy=False)

    # ---- KV-cache loop (IOBinding) -----------------------------------------------------------
    def _ortvalue(self, arr: np.ndarray) -> Any:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), self.io_device, self.device_id)

    def _run_decoder(self, embeds: Any, length: int, seq: int, state: OrtDecodeState,
                     hidden: bool = False) -> Any:
        """One decoder call on `seq` new positions ending at `length`; updates state.past. Returns
        the last position's logits [V], and with `hidden` also its last-layer hidden state [D]."""
        assert state.past is not None
        binding = self.dec.sess.io_binding()
        binding.bind_ortvalue_input("inputs_embeds", embeds)
        mask = np.ones((1, length), dtype=self.mask_dtype)
        binding.bind_cpu_input("attention_mask", mask)
        if self.uses_position_ids:
            binding.bind_cpu_input("position_ids", np.arange(length - seq, length, dtype=np.int64)[None])
        for name, value in zip(self.past_names, state.past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.io_device, self.device_id)
        if hidden:
            binding.bind_output("hidden_states", self.io_device, self.device_id)
        if self.shared_kv:  # the attention writes the new positions into the same buffers
            for name, value in zip(self.present_names, state.past, strict=True):
                binding.bind_ortvalue_output(name, value)
        else:
            for name in self.present_names:  # allocated by onnxruntime where the provider works
                binding.bind_output(name, self.io_device, self.device_id)
        self.dec.sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        first_present = 2 if hidden else 1
        if not self.shared_kv:
            state.past = list(outs[first_present:])  # the next step's past: the same OrtValues, not copies
        logits = outs[0].numpy()[0, -1].astype(np.float32)
        if hidden:
            return logits, outs[1].numpy()[0, -1].astype(np.float32)
        return logits

    def start(self, capacity: int, prefix: KVSnapshot | None = None) -> OrtDecodeState:
        p = prefix.length if prefix is not None else 0
        c = self.config.llm
        if self.shared_kv:
            # One buffer per tensor for the whole generation, owned by onnxruntime on the
            # provider's device; the attention reads only the positions the mask covers.
            shape = [1, c.num_kv_heads, capacity, c.head_dim]
            if prefix is None:
                past = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.io_device, self.device_id)
                        for _ in self.past_names]
            else:  # the cached positions first, then prefill the rest after them (chunked prefill)
                past = []
                for tensor in prefix.tensors:
                    host = np.zeros(shape, dtype=self.kv_dtype)
                    host[0, :, :p] = tensor
                    past.append(self._ortvalue(host))
        elif prefix is None:
            shape = [1, c.num_kv_heads, 0, c.head_dim]
            past = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.io_device, self.device_id)
                    for _ in self.past_names]
        else:
            past = [self._ortvalue(tensor[None].astype(self.kv_dtype, copy=False)) for tensor in prefix.tensors]
        return OrtDecodeState(past, p, capacity)

    def _append(self, state: OrtDecodeState, inputs_embeds: np.ndarray, hidden: bool) -> Any:
        t = inputs_embeds.shape[1]
        if state.length + t > state.capacity:
            raise InputError(f"the KV cache is full ({state.capacity} tokens)")
        embeds = self._ortvalue(inputs_embeds.astype(self.embed_dtype, copy=False))
        state.length += t
        return self._run_decoder(embeds, state.length, t, state, hidden)

    def prefill(self, inputs_embeds: np.ndarray, capacity: int, prefix: KVSnapshot | None = None
                ) -> tuple[np.ndarray, OrtDecodeState]:
        state = self.start(capacity, prefix)
        return self._append(state, inputs_embeds, hidden=False), state

    def extend(self, state: DecodeState, inputs_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(state, OrtDecodeState)
        return self._append(state, inputs_embeds, hidden=True)

    def rewind(self, state: DecodeState, length: int) -> None:
        assert isinstance(state, OrtDecodeState) and state.past is not None and 0 <= length <= state.length
        if not self.shared_kv and length < state.length:  # present tensors hold exactly `length` positions
            state.past = [self._ortvalue(v.numpy()[:, :, :length]) for v in state.past]
        state.length = length  # the shared buffer: later positions are overwritten by the next call

    def snapshot(self, state: DecodeState, length: int) -> KVSnapshot:
        assert isinstance(state, OrtDecodeState) and state.past is not None
        return KVSnapshot(length, tuple(np.array(v.numpy()[0, :, :length], dtype=np.float32) for v in state.past))

    def open_batch(self, max_batch: int, capacity: int) -> OrtDecodeBatch | None:
        if not self.shared_kv or self.io_device != "cpu":
            return None
        return OrtDecodeBatch(self, max_batch, capacity)

    def _embed_on_device(self, token_id: int) -> Any:
        sess = self.sessions["embed_tokens"].sess
        binding = sess.io_binding()
        binding.bind_cpu_input("input_ids", np.array([[token_id]], dtype=np.int64))
        binding.bind_output("inputs_embeds", self.io_device, self.device_id)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def decode(self, state: DecodeState, token_id: int) -> np.ndarray:
        assert isinstance(state, OrtDecodeState)
        if state.length >= state.capacity:
            raise InputError(f"the KV cache is full ({state.capacity} tokens)")
        state.length += 1
        return self._run_decoder(self._embed_on_device(token_id), state.length, 1, state)

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "device": self.device,
            "onnxruntime": ort.__version__,
            "providers": self.dec.sess.get_providers(),
            "artifacts": os.fspath(self.artifacts),
            "recipe": self.manifest.recipe,
            "kv_cache": ("IOBinding: one preallocated buffer per layer bound as past and present (shared)"
                         if self.shared_kv else
                         "IOBinding: present OrtValues become the next past, on the provider's device"),
        }
