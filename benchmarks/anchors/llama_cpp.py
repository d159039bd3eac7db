"""Anchor: llama.cpp through ``llama-cpp-python``, on a GGUF converted from the same checkpoint.

Conversion (:func:`convert_hf_to_gguf`, needs only the pure-Python ``gguf`` package) writes the
HF-format checkpoint of our decoder as a GGUF file in ``f32``, ``q8_0`` or ``q4_0``: llama.cpp's
tensor names, the ``llama`` architecture (q/k rows permuted to llama.cpp's rotary layout, as its
own converter does) or ``qwen2`` (q/k/v biases, NeoX rotary, no permutation), hyper-parameters,
and the byte-level BPE tokenizer padded to the unified vocabulary (unused rows and visual codes
get placeholder tokens). Norms and biases stay f32; every 2-D weight is quantized.

Measurement (:class:`LlamaCppEngine`) uses the ``Llama`` object's own ``eval``: the prompt in one
call (batched prompt processing), then one ``eval`` per new token, greedy on the last logits,
``n_threads`` = the benchmark's thread count.

``llama-cpp-python`` compiles llama.cpp from source at install time, so it is an optional extra
(``maven-edge[llamacpp]``). Where it is not importable, the engine reports the reference figures
the issue gives for this kind of machine, marked "reference (not measured here)".
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.benchmarks.anchors.base import (
    Engine,
    Prepared,
    StepClock,
    TextRun,
    TextSpec,
    argmax,
    stamp_ok,
    write_stamp,
)
from maven_edge.core.errors import BackendError

PRECISIONS = ("fp32", "q8_0", "q4_0")

#: llama-bench figures for a decoder with edge-small's geometry (0.43B, vocab 40192), 2 threads,
#: as given in issue 9: decode tokens/s and prompt-processing tokens/s (None = not given).
REFERENCE = {
    "fp32": {"decode_tok_s": 38.0, "prompt_tok_s": 352.0},
    "q8_0": {"decode_tok_s": 82.0, "prompt_tok_s": None},
    "q4_0": {"decode_tok_s": 128.0, "prompt_tok_s": 690.0},
}
#: The decoder geometry those figures were measured on (edge-small's LLM).
REFERENCE_GEOMETRY = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                      "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 40192}
REFERENCE_SOURCE = ("issue 9 reference figures: llama-bench, 2 threads, edge-small LLM geometry, 0.43B params, "
                    "vocab 40192, random weights (not measured here)")


# ---- GGUF conversion ----------------------------------------------------------------------------


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved rotary layout (llama arch only)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_tables(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for a byte-level BPE tokenizer.json, padded to `vocab_size`."""
    import gguf

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    special = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = int(added["id"])
        if added.get("special", False):
            special.add(int(added["id"]))
    tokens = [f"<unused_{i}>" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        if i < vocab_size:
            tokens[i] = text
            types[i] = int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    top = max(vocab.values()) + 1
    for i in range(top, vocab_size):  # padding rows and visual codes: unique, never produced by text
        tokens[i] = f"<maven_{i}>"
        types[i] = int(gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    return tokens, types, merges


def convert_hf_to_gguf(hf_dir: str | Path, out: str | Path, precision: str = "fp32") -> Path:
    """Write the HF Llama/Qwen2 checkpoint in `hf_dir` as a GGUF file (f32, q8_0 or q4_0)."""
    import gguf
    from safetensors.numpy import load_file

    if precision not in PRECISIONS:
        raise BackendError(f"unknown GGUF precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise BackendError(f"GGUF conversion supports llama and qwen2 checkpoints, not {model_type!r}")
    arch = "qwen2" if model_type == "qwen2" else "llama"
    n_layer, n_embd = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    vocab = int(cfg["vocab_size"])
    qtype = {"fp32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[precision]
    ftype = {"fp32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[precision]

    state: dict[str, np.ndarray] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if "lm_head.weight" not in state:  # tied embeddings
        state["lm_head.weight"] = state["model.embed_tokens.weight"]

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"maven-edge decoder ({hf_dir.name})")
    writer.add_file_type(int(ftype))
    writer.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    if precision != "fp32":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = _tokenizer_tables(hf_dir, vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                        ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(cfg.get(key), int):
            setter(int(cfg[key]))
    writer.add_add_bos_token(False)

    def put(name: str, w: np.ndarray) -> None:
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and w.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, w)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(n_layer):
        p = f"model.layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _permute_rope(q, n_head), _permute_rope(k, n_kv)
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", q)
        put(f"blk.{i}.attn_k.weight", k)
        put(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        if arch == "qwen2":
            for n in ("q", "k", "v"):
                put(f"blk.{i}.attn_{n}.bias", state[p + f"self_attn.{n}_proj.bias"])
        put(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    put("output.weight", state["lm_head.weight"])

    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ---- the engine ---------------------------------------------------------------------------------


class LlamaCppEngine(Engine):
    name = "llamacpp"
    label = "llama.cpp (llama-cpp-python)"
    precisions = PRECISIONS

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("llama_cpp") is None:
            return ("llama-cpp-python is not installed here (it compiles llama.cpp from source: "
                    "pip install 'maven-edge[llamacpp]')")
        if importlib.util.find_spec("gguf") is None:
            return "the gguf package is not installed (needed to convert the checkpoint)"
        if self.ctx.hf_dir is None:
            return "no HF-format checkpoint of the decoder (needs the source model)"
        return None

    def reference(self) -> dict[str, float] | None:
        """The issue's figures, only for a decoder of edge-small's LLM geometry (they mean nothing for
        another model)."""
        if not self._reference_geometry():
            return None
        ref = REFERENCE[self.precision]
        out = {"decode_tok_s": ref["decode_tok_s"]}
        if ref["prompt_tok_s"]:
            out["prompt_tok_s"] = ref["prompt_tok_s"]
            out["prefill_ms_256"] = 256 / ref["prompt_tok_s"] * 1e3
        return out

    def _reference_geometry(self) -> bool:
        try:
            cfg = json.loads((Path(self.ctx.hf_dir) / "config.json").read_text())  # type: ignore[arg-type]
        except (OSError, TypeError, ValueError):
            return False
        return all(cfg.get(k) == v for k, v in REFERENCE_GEOMETRY.items())

    def prepare(self) -> Prepared:
        assert self.ctx.hf_dir is not None
        out = self.ctx.work_dir / f"gguf-{self.precision}"
        path = out / f"model-{self.precision}.gguf"
        key = {"engine": self.name, "precision": self.precision, "hf": str(self.ctx.hf_dir)}
        seconds, cached = 0.0, stamp_ok(out, key) and path.is_file()
        if not cached:
            out.mkdir(parents=True, exist_ok=True)
            self.ctx.say(f"converting to GGUF {self.precision}: {path}")
            t0 = time.perf_counter()
            convert_hf_to_gguf(self.ctx.hf_dir, path, self.precision)
            seconds = time.perf_counter() - t0
            write_stamp(out, key)
        return Prepared(path=str(path), bytes=path.stat().st_size, seconds=seconds, cached=cached)

    def load(self, prepared: Prepared) -> None:
        from llama_cpp import Llama

        self.path = prepared.path
        self.llm: Any = None
        self._llama = Llama

    def _ensure(self, n_ctx: int) -> Any:
        if self.llm is None or self.llm.n_ctx() < n_ctx:
            self.llm = self._llama(model_path=self.path, n_ctx=max(512, n_ctx), n_batch=512,
                                   n_threads=self.ctx.threads, n_threads_batch=self.ctx.threads,
                                   logits_all=False, verbose=False, seed=0)
        return self.llm

    def generate(self, spec: TextSpec) -> TextRun:
        llm = self._ensure(spec.max_length + 8)
        llm.reset()
        ids = [int(t) for t in spec.prompt_ids()]
        clock = StepClock()
        tokens: list[int] = []
        clock.start()
        llm.eval(ids)
        tokens.append(argmax(_last_logits(llm)))
        clock.first()
        while len(tokens) < spec.new_tokens:
            llm.eval([tokens[-1]])
            tokens.append(argmax(_last_logits(llm)))
        clock.last()
        return clock.run(tokens)


def _last_logits(llm: Any) -> np.ndarray:
    """Logits of the last evaluated position. Recent llama-cpp-python no longer copies them into
    ``Llama.scores`` unless ``logits_all=True``, so read llama.cpp's output buffer: with only the
    last position requesting logits, its first row is that position."""
    ctx = getattr(llm, "_ctx", None)
    if ctx is not None and hasattr(ctx, "get_logits"):
        return np.ctypeslib.as_array(ctx.get_logits(), shape=(llm.n_vocab(),))
    return np.asarray(llm.scores[llm.n_tokens - 1])
