"""The TensorRT backend (``--backend trt``): the engines ``maven-edge build-trt`` writes.

    pipe = MavenPipeline.from_artifacts("artifacts/tiny-trt", backend="trt")

The directory holds ``engines.json`` (the source manifest, the limits the engines were built
for, the TensorRT version and GPU they were built on) and one ``<component>.engine`` per
component (see :mod:`maven_edge.calibration.tensorrt`). Each stage runs its engine with
``IExecutionContext.execute_async_v3`` on one CUDA stream; device memory comes from
cuda-python's runtime API (``cuda.bindings.runtime`` / ``cuda.cudart``).

The decoder engine has two optimisation profiles, one execution context each: ``prefill``
(any prompt length, empty past) and ``decode`` (one new token, past up to max_seq - 1). The KV
cache never leaves the GPU: a request owns two sets of per-layer buffers sized for its
capacity; each step reads ``past_key_values.*`` from one set and writes ``present.*`` into the
other (contiguous ``[1, kv_heads, length, head_dim]`` tensors), then the roles swap. The new
token's embedding goes from the embed_tokens engine to the decoder without a host copy, and
only the last position's logits come back to the host.

torch-free: ``tensorrt`` and cuda-python are imported when the backend is created. On a
machine without them (or without a GPU) creating it raises a BackendError that says what to
do instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maven_edge.calibration.trt_runtime import (
    ENGINES_FORMAT,
    ENGINES_JSON,
    MIN_ALLOC,
    Cuda,
    import_tensorrt,
)
from maven_edge.core.errors import ArtifactError, BackendError, InputError
from maven_edge.core.manifest import FileEntry, Manifest, resolve_inside, sha256_file
from maven_edge.core.tokenizer import TextTokenizer
from maven_edge.runtime.backends.base import Backend, DecodeState, SelectorOutput

if TYPE_CHECKING:
    from maven_edge.runtime.options import PipelineOptions

# ---- engines.json -----------------------------------------------------------------------------------


def load_engine_index(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check ``engines.json``; with `verify`, every engine's sha256 too."""
    directory = Path(directory)
    path = directory / ENGINES_JSON
    if not path.is_file():
        hint = (" It holds ONNX artifacts: build engines from them with `maven-edge build-trt --artifacts "
                f"{directory} --out DIR` and run DIR with --backend trt (or run these with --backend ort)"
                if (directory / "manifest.json").is_file() else "")
        raise ArtifactError(f"{directory} has no {ENGINES_JSON}: it is not a TensorRT engine directory.{hint}")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or index.get("format_version") != ENGINES_FORMAT:
        raise ArtifactError(f"{path} is not a maven-edge engine index (format {ENGINES_FORMAT})")
    entries = [FileEntry(**index["tokenizer"])] + [FileEntry(**e["file"]) for e in index["engines"].values()]
    for entry in entries:
        target = resolve_inside(directory, entry.path)
        if not target.is_file():
            raise ArtifactError(f"{entry.path} listed in {ENGINES_JSON} is missing from {directory}")
        if verify and sha256_file(target) != entry.sha256:
            raise ArtifactError(f"{entry.path} does not match the sha256 in {ENGINES_JSON}; rebuild the engines")
    return index


def check_engine_compat(index: dict[str, Any], trt_version: str, device: dict[str, Any] | None) -> None:
    """Engines run only on the TensorRT version and GPU model they were built with."""
    built = index.get("tensorrt")
    if built != trt_version:
        raise BackendError(
            f"these engines were built with TensorRT {built}, this machine has {trt_version}; TensorRT engines "
            "are not portable across versions: rebuild them here with `maven-edge build-trt`"
        )
    want = (index.get("device") or {}).get("name")
    if device is not None and want and device.get("name") != want:
        raise BackendError(
            f"these engines were built on {want}, this GPU is {device.get('name')}; engines are tuned for one GPU "
            "model: rebuild them here with `maven-edge build-trt`"
        )


# ---- one engine ---------------------------------------------------------------------------------------


class _Engine:
    """A deserialized engine with one execution context per optimisation profile."""

    def __init__(self, trt: Any, runtime: Any, cuda: Cuda, name: str, path: Path):
        self.trt, self.cuda, self.name = trt, cuda, name
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot deserialize {path.name}; rebuild the engines with `maven-edge build-trt`")
        n = self.engine.num_io_tensors
        names = [self.engine.get_tensor_name(i) for i in range(n)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [t for t in names if self.engine.get_tensor_mode(t) == mode]
        self.outputs = [t for t in names if self.engine.get_tensor_mode(t) != mode]
        self.dtypes = {t: np.dtype(trt.nptype(self.engine.get_tensor_dtype(t))) for t in names}
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise BackendError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)")
            if p or self.engine.num_optimization_profiles > 1:
                ctx.set_optimization_profile_async(p, cuda.stream)
            self.contexts.append(ctx)
        cuda.sync()
        self._buffers: dict[tuple[int, str], tuple[int, int]] = {}

    def buffer(self, profile: int, tensor: str, nbytes: int) -> int:
        """A grow-only device buffer per (profile, tensor); never a null pointer, also for empty
        tensors (the empty ``past_key_values.*`` of the h_eos pass): TensorRT needs a non-null
        address for every I/O tensor before ``execute_async_v3``."""
        ptr, size = self._buffers.get((profile, tensor), (0, 0))
        if not ptr or nbytes > size:
            self.cuda.free(ptr)
            size = max(nbytes, MIN_ALLOC)
            ptr = self.cuda.malloc(size)
            self._buffers[(profile, tensor)] = (ptr, size)
        return ptr

    def run(
        self, feeds: dict[str, np.ndarray], profile: int = 0, fetch: Sequence[str] | None = None,
        device_inputs: dict[str, tuple[int, tuple[int, ...]]] | None = None,
        device_outputs: dict[str, int] | None = None, last_row: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Run once. Host feeds are copied in; `device_inputs` are (pointer, shape) already on the GPU;
        `device_outputs` are written to given pointers; `fetch` outputs are copied back (for names
        in `last_row`, only the last position of axis 1)."""
        ctx = self.contexts[profile]
        device_inputs = device_inputs or {}
        device_outputs = device_outputs or {}
        for t in self.inputs:
            if t in device_inputs:
                ptr, shape = device_inputs[t]
            elif t in feeds:
                arr = np.ascontiguousarray(feeds[t], dtype=self.dtypes[t])
                ptr, shape = self.buffer(profile, t, arr.nbytes), arr.shape
                self.cuda.htod(ptr, arr)
            else:
                raise InputError(f"{self.name} engine: input {t} was not given")
            if not ctx.set_input_shape(t, tuple(int(d) for d in shape)):
                raise InputError(f"{self.name} engine: input {t} shape {tuple(shape)} is outside the engine's "
                                 "optimisation profile; rebuild with larger --max-images / --max-seq")
            if not ptr:
                raise BackendError(f"{self.name} engine: input {t} has a null device address")
            ctx.set_tensor_address(t, int(ptr))
        shapes: dict[str, tuple[int, ...]] = {}
        for t in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(t))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.name} engine: output {t} has unresolved shape {shape}")
            nbytes = math.prod(shape) * self.dtypes[t].itemsize
            ptr = device_outputs.get(t) or self.buffer(profile, t, nbytes)
            ctx.set_tensor_address(t, int(ptr))
            shapes[t] = shape
        if not ctx.execute_async_v3(self.cuda.stream):
            raise BackendError(f"TensorRT failed to run the {self.name} engine")
        self.cuda.sync()
        out = {}
        for t in fetch or ():
            ptr = device_outputs.get(t) or self._buffers[(profile, t)][0]
            shape = shapes[t]
            if t in last_row and len(shape) >= 2:
                row = (shape[0], 1, *shape[2:])
                stride = math.prod(shape[2:]) * self.dtypes[t].itemsize
                host = np.empty(row, self.dtypes[t])
                if shape[0] == 1:
                    self.cuda.dtoh(host, ptr, (shape[1] - 1) * stride)
                else:
                    full = self.cuda.dtoh(np.empty(shape, self.dtypes[t]), ptr)
                    host = full[:, -1:]
                out[t] = host
            else:
                out[t] = self.cuda.dtoh(np.empty(shape, self.dtypes[t]), ptr)
        return out

    def output_shape(self, profile: int, tensor: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.contexts[profile].get_tensor_shape(tensor))

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
        self.contexts.clear()
        self.engine = None


# ---- the backend ----------------------------------------------------------------------------------------


class TrtDecodeState(DecodeState):
    """Two sets of per-layer KV buffers on the GPU (read one, write the other, swap)."""

    def __init__(self, cuda: Cuda, names: list[str], nbytes: int, capacity: int):
        self.cuda = cuda
        self.sets: list[list[int]] | None = [[cuda.malloc(nbytes) for _ in names] for _ in range(2)]
        self.current = 0  # index of the set holding the cache
        self.length = 0
        self.capacity = capacity

    def release(self) -> None:
        if self.sets is not None:
            for s in self.sets:
                for ptr in s:
                    self.cuda.free(ptr)
            self.sets = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


class TrtBackend(Backend):
    name = "trt"
    thread_safe = False  # one execution context per engine/profile: the pipeline serialises stage calls

    def __init__(self, directory: str | Path, verify: bool = True, device_id: int = 0):
        trt = import_tensorrt()
        self.directory = Path(directory)
        index = load_engine_index(self.directory, verify=verify)
        self.cuda = Cuda(device_id)
        self.device_props = self.cuda.properties()
        check_engine_compat(index, str(trt.__version__), self.device_props)
        self.index = index
        self.manifest = Manifest.from_dict(index["manifest"])
        cfg = self.manifest.maven_config()
        layout = self.manifest.vocab_layout()
        tok = TextTokenizer.from_file(resolve_inside(self.directory, index["tokenizer"]["path"]),
                                      layout.text_vocab_size, layout.codebook_size)
        super().__init__(cfg, tok)
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.runtime = trt.Runtime(self.logger)
        self.engines: dict[str, _Engine] = {}
        for comp, entry in index["engines"].items():
            self.engines[comp] = _Engine(trt, self.runtime, self.cuda, comp, resolve_inside(self.directory,
                                                                                            entry["file"]["path"]))
        missing = [c for c in ("vision_encoder", "discrete_tokenizer", "embed_tokens", "patch_selector", "decoder")
                   if c not in self.engines]
        if missing:
            raise ArtifactError(f"{self.directory} lacks engines for {missing}; rebuild with `maven-edge build-trt`")
        dec = self.engines["decoder"]
        self.profiles = {p["name"]: i for i, p in enumerate(index["engines"]["decoder"]["profiles"])}
        if set(self.profiles) != {"prefill", "decode"}:
            raise ArtifactError("the decoder engine must have a prefill and a decode profile; rebuild it")
        self.num_layers = cfg.llm.num_layers
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.kv_dtype = dec.dtypes[self.past_names[0]]
        self.uses_position_ids = "position_ids" in dec.inputs
        self.max_seq = int(index["limits"]["max_seq"])
        self.max_images = int(index["limits"]["max_images"])
        self.k = int(self.manifest.num_kept_patches)
        self.keep_ratio = float(self.manifest.keep_ratio)
        self._embeds_on_device = (self.engines["embed_tokens"].dtypes["inputs_embeds"]
                                  == dec.dtypes["inputs_embeds"])

    @classmethod
    def from_options(cls, options: PipelineOptions) -> TrtBackend:
        assert options.artifacts is not None
        return cls(options.artifacts, verify=options.verify, device_id=options.device_id, **options.extra)

    @property
    def device(self) -> str:
        return f"cuda:{self.cuda.device_id} ({self.device_props['name']})"

    @property
    def default_keep_ratio(self) -> float:
        return self.keep_ratio

    def check_keep_ratio(self, keep_ratio: float) -> int:
        k = super().check_keep_ratio(keep_ratio)
        if k != self.k and "projector" not in self.engines:
            raise InputError(f"these engines keep k={self.k} patches (keep_ratio {self.keep_ratio}); keep_ratio "
                             f"{keep_ratio} needs k={k} and a projector engine. Re-export and rebuild")
        return k

    def check_mode(self, mode: str) -> None:
        if mode == "continuous" and "projector" not in self.engines:
            raise InputError("continuous mode needs a projector engine; rebuild with the projector component")

    # ---- visual stages ----------------------------------------------------------------------------
    def _check_images(self, n: int) -> None:
        if n > self.max_images:
            raise InputError(f"{n} images in one request; these engines were built for at most {self.max_images} "
                             "(build-trt --max-images)")

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        self._check_images(pixel_values.shape[0])
        return self.engines["vision_encoder"].run({"pixel_values": pixel_values}, fetch=["patch_features"])[
            "patch_features"].astype(np.float32, copy=False)

    def discrete(self, patch_features: np.ndarray) -> np.ndarray:
        eng = self.engines["discrete_tokenizer"]
        name = eng.inputs[0]
        return eng.run({name: patch_features}, fetch=["visual_codes"])["visual_codes"].astype(np.int64)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        out = self.engines["embed_tokens"].run({"input_ids": input_ids}, fetch=["inputs_embeds"])["inputs_embeds"]
        return out.astype(np.float32, copy=False)

    def select(self, patch_features: np.ndarray, h_eos: np.ndarray, k: int) -> SelectorOutput:
        out = self.engines["patch_selector"].run({"patch_features": patch_features, "h_eos": h_eos},
                                                 fetch=["scores", "selected_embeds", "selected_indices"])
        scores = out["scores"].astype(np.float32, copy=False)
        if k == self.k:
            return SelectorOutput(scores, out["selected_embeds"].astype(np.float32, copy=False),
                                  out["selected_indices"].astype(np.int64))
        idx = np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :k], axis=-1).astype(np.int64)
        kept = np.take_along_axis(self.project(patch_features), idx[..., None], axis=1)
        return SelectorOutput(scores, np.ascontiguousarray(kept), idx)

    def project(self, patch_features: np.ndarray) -> np.ndarray:
        eng = self.engines["projector"]
        return eng.run({eng.inputs[0]: patch_features}, fetch=[eng.outputs[0]])[eng.outputs[0]].astype(np.float32)

    # ---- decoder ------------------------------------------------------------------------------------
    def _kv_shape(self, batch: int, length: int) -> tuple[int, ...]:
        c = self.config.llm
        return (batch, c.num_kv_heads, length, c.head_dim)

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return dict.fromkeys(self.past_names, np.zeros(self._kv_shape(batch, 0), self.kv_dtype))

    def hidden_states(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        b, t = attention_mask.shape
        if t > self.max_seq:
            raise InputError(f"{t} positions exceed the engines' --max-seq {self.max_seq}")
        feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, **self._empty_past(b)}
        if self.uses_position_ids:
            feeds["position_ids"] = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int64)
        out = self.engines["decoder"].run(feeds, self.profiles["prefill"], fetch=["hidden_states"])
        return out["hidden_states"].astype(np.float32, copy=False)

    def _step(self, state: TrtDecodeState, profile: str, seq: int, embeds: dict[str, np.ndarray],
              device_embeds: tuple[int, tuple[int, ...]] | None) -> np.ndarray:
        assert state.sets is not None
        past_len, total = state.length, state.length + seq
        read, write = state.sets[state.current], state.sets[1 - state.current]
        dev_in = {n: (p, self._kv_shape(1, past_len)) for n, p in zip(self.past_names, read, strict=True)}
        if device_embeds is not None:
            dev_in["inputs_embeds"] = device_embeds
        feeds = dict(embeds)
        feeds["attention_mask"] = np.ones((1, total), np.int64)
        if self.uses_position_ids:
            feeds["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None]
        dev_out = dict(zip(self.present_names, write, strict=True))
        out = self.engines["decoder"].run(feeds, self.profiles[profile], fetch=["logits"], device_inputs=dev_in,
                                          device_outputs=dev_out, last_row=["logits"])
        state.current = 1 - state.current
        state.length = total
        return out["logits"][0, -1].astype(np.float32)

    def prefill(self, inputs_embeds: np.ndarray, capacity: int, prefix: Any = None) -> tuple[np.ndarray, TrtDecodeState]:
        if prefix is not None:
            raise BackendError("the trt backend starts every request from an empty cache (no prefix reuse)")
        t = inputs_embeds.shape[1]
        if capacity > self.max_seq or t > self.max_seq:
            raise InputError(f"this request needs {max(capacity, t)} positions; the engines were built for "
                             f"--max-seq {self.max_seq} (rebuild with a larger --max-seq)")
        nbytes = math.prod(self._kv_shape(1, capacity)) * self.kv_dtype.itemsize
        state = TrtDecodeState(self.cuda, self.past_names, nbytes, capacity)
        logits = self._step(state, "prefill", t, {"inputs_embeds": inputs_embeds}, None)
        return logits, state

    def decode(self, state: DecodeState, token_id: int) -> np.ndarray:
        assert isinstance(state, TrtDecodeState)
        if state.length >= state.capacity:
            raise InputError(f"the KV cache is full ({state.capacity} tokens)")
        emb = self.engines["embed_tokens"]
        ids = np.array([[token_id]], np.int64)
        if not self._embeds_on_device:  # dtypes differ: go through the host once
            return self._step(state, "decode", 1, {"inputs_embeds": self.embed(ids)}, None)
        emb.run({"input_ids": ids}, 0)
        ptr = emb.buffer(0, "inputs_embeds", 0)  # the output stays on the GPU
        return self._step(state, "decode", 1, {}, (ptr, emb.output_shape(0, "inputs_embeds")))

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        self.engines.clear()
        self.cuda.close()

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": self.device, "tensorrt": self.index.get("tensorrt"),
                "precision": self.index.get("precision"), "engines": str(self.directory),
                "limits": self.index.get("limits"), "kv_cache": "GPU ping-pong buffers (no host copies)"}

