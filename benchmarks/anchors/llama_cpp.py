"""Anchor: llama.cpp built from source, on GGUF files converted from the same checkpoint.

Conversion needs only the pure-Python ``gguf`` package:

- :func:`convert_hf_to_gguf` writes the HF-format checkpoint of our decoder as a GGUF file in
  ``f32``, ``q8_0`` or ``q4_0``: llama.cpp's tensor names, the ``llama`` architecture (q/k rows
  permuted to llama.cpp's rotary layout, as its own converter does) or ``qwen2`` (q/k/v biases,
  NeoX rotary, no permutation), hyper-parameters, and the byte-level BPE tokenizer padded to the
  unified vocabulary (unused rows and visual codes get placeholder tokens). Norms and biases stay
  f32; every 2-D weight is quantized.
- :func:`convert_mmproj_to_gguf` writes our ViT and LLaVA projector as an ``mmproj`` file for
  libmtmd (a LLaVA-1.5-style model of the same size: 196 patch tokens per image on ViT-B/16).

The tools come from :mod:`maven_edge.benchmarks.anchors.llama_cpp_build` (a CMake build of the
llama.cpp that ``llama-cpp-python``'s sdist vendors, or of a source tree the user names).
Text (:class:`LlamaCppEngine`) is measured with ``llama-bench`` (prompt processing, then decode
at the prompt's depth); multimodal time to first token with ``llama-mtmd-cli`` (:func:`run_mtmd`:
the image encode that libmtmd reports plus the prompt evaluation that llama's perf counters
report, ``--perf`` and a verbose log level). Where the tools cannot be built the engine is
unavailable and the report shows the issue's reference figures for edge-small's geometry,
labelled "reference (not measured here)"; a measured row always replaces them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.benchmarks.anchors.base import (
    Engine,
    Prepared,
    TextRun,
    TextSpec,
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

    return _write_gguf(writer, out)


def _write_gguf(writer: Any, out: Path) -> Path:
    """Write a filled ``gguf.GGUFWriter`` to ``out`` (header, key-values, tensors) and close it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ---- mmproj: our ViT + projector as a LLaVA-style CLIP vision tower ------------------------------


def convert_mmproj_to_gguf(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """Write the vision encoder and the LLaVA ``mlp2x_gelu`` projector of a maven-edge checkpoint as
    an ``mmproj`` GGUF that libmtmd's CLIP loader reads (``clip.projector_type = mlp``), all f32.

    The layout is the one llama.cpp's legacy ``convert_image_encoder_to_gguf.py`` writes for a
    LLaVA-1.5 CLIP tower: ``v.*`` vision tensors (patch embedding f16, as that converter stores
    it), ``mm.0`` / ``mm.2`` for the projector's two linears. libmtmd runs ``block_count - 1``
    layers for an MLP projector (LLaVA's penultimate layer); the block count written is therefore
    the number of layers our encoder runs plus one, padded with a copy of the last layer when the
    feature layer is the last one (that extra layer is loaded, never run). A projector
    ``output_scale`` other than 1 is folded into ``mm.2``. Every patch feeds the projector (196
    tokens per image on a ViT-B/16-224), as in LLaVA-1.5's continuous mode.
    """
    import gguf
    from safetensors.numpy import load_file

    ckpt, out = Path(checkpoint_dir), Path(out)
    cfg = json.loads((ckpt / "config.json").read_text())
    v, pre = cfg["vision"], cfg.get("preprocess", {})
    scale = float((cfg.get("projector") or {}).get("output_scale", 1.0))
    state = load_file(str(ckpt / "model.safetensors"))
    n_layers = int(v["num_layers"])
    used = n_layers + 1 + int(v.get("feature_layer", -1))
    if not 1 <= used <= n_layers:
        raise BackendError(f"vision.feature_layer {v.get('feature_layer')} leaves no layer to run")
    if v.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise BackendError(f"libmtmd's CLIP runs quick_gelu or gelu, not {v['hidden_act']!r}")
    llm_width = state["projector.linear_2.weight"].shape[0]

    writer = gguf.GGUFWriter(str(out), "clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_name(f"maven-edge vision tower + projector ({cfg.get('name', ckpt.name)})")
    writer.add_description("image encoder for LLaVA")
    writer.add_uint32("clip.vision.image_size", int(v["image_size"]))
    writer.add_uint32("clip.vision.patch_size", int(v["patch_size"]))
    writer.add_uint32("clip.vision.embedding_length", int(v["hidden_size"]))
    writer.add_uint32("clip.vision.feed_forward_length", int(v["intermediate_size"]))
    writer.add_uint32("clip.vision.projection_dim", int(llm_width))
    writer.add_uint32("clip.vision.attention.head_count", int(v["num_heads"]))
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(v.get("layer_norm_eps", 1e-5)))
    writer.add_uint32("clip.vision.block_count", used + 1)
    writer.add_array("clip.vision.image_mean", [float(x) for x in pre.get("mean", (0.48145466, 0.4578275, 0.40821073))])
    writer.add_array("clip.vision.image_std", [float(x) for x in pre.get("std", (0.26862954, 0.26130258, 0.27577711))])
    writer.add_bool("clip.use_gelu", v.get("hidden_act") == "gelu")

    def put(name: str, w: np.ndarray, dtype: Any = np.float32) -> None:
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=dtype))

    p = "vision."
    put("v.class_embd", state[p + "embeddings.class_embedding"])
    put("v.patch_embd.weight", state[p + "embeddings.patch_embedding.weight"], np.float16)
    put("v.position_embd.weight", state[p + "embeddings.position_embedding.weight"])
    for n in ("weight", "bias"):
        put(f"v.pre_ln.{n}", state[p + f"pre_layrnorm.{n}"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             # the legacy converter's (swapped) names; libmtmd detects and swaps them back
             "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"}
    for i in range(used + 1):
        src = min(i, n_layers - 1)
        for ours, theirs in names.items():
            for n in ("weight", "bias"):
                put(f"v.blk.{i}.{theirs}.{n}", state[p + f"encoder.layers.{src}.{ours}.{n}"])
    put("mm.0.weight", state["projector.linear_1.weight"])
    put("mm.0.bias", state["projector.linear_1.bias"])
    put("mm.2.weight", state["projector.linear_2.weight"] * scale)
    put("mm.2.bias", state["projector.linear_2.bias"] * scale)

    return _write_gguf(writer, out)


# ---- running the built tools ----------------------------------------------------------------------

_PERF = re.compile(r"(prompt eval|eval) time\s*=\s*([\d.]+) ms\s*/\s*(\d+) (?:tokens|runs)")
_ENCODE = re.compile(r"mtmd batch encoding done in (\d+) ms")
_SLICE = re.compile(r"image slice encoded in (\d+) ms")
_LOAD = re.compile(r"load time\s*=\s*([\d.]+) ms")


@dataclass
class MtmdRun:
    """One ``llama-mtmd-cli`` request, from its own log (``--perf``, verbose)."""

    encode_ms: float  # libmtmd: every image through the ViT + projector
    prompt_eval_ms: float  # llama_decode of the whole prompt (text + image embeddings)
    prompt_tokens: int
    eval_ms: float  # the decode loop after the first token
    eval_runs: int
    wall_ms: float  # the whole process (model load included)

    @property
    def ttft_ms(self) -> float:
        return self.encode_ms + self.prompt_eval_ms

    @property
    def decode_tok_s(self) -> float:
        return self.eval_runs / (self.eval_ms / 1e3) if self.eval_runs and self.eval_ms > 0 else float("nan")

    def record(self) -> dict[str, float]:
        return {"ttft_ms": self.ttft_ms, "vision_ms": self.encode_ms, "prefill_ms": self.prompt_eval_ms,
                "decode_tok_s": self.decode_tok_s, "wall_ms": self.wall_ms}


def parse_mtmd_log(text: str, wall_ms: float = float("nan")) -> MtmdRun:
    """The timings of one llama-mtmd-cli run (raises BackendError when its log has none)."""
    perf = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in _PERF.finditer(text)}
    if "prompt eval" not in perf:
        raise BackendError("llama-mtmd-cli printed no timings (needs --perf and a verbose log level); log tail: "
                           + text[-800:])
    encode = sum(float(x) for x in _ENCODE.findall(text)) or sum(float(x) for x in _SLICE.findall(text))
    ev = perf.get("eval", (float("nan"), 0))
    return MtmdRun(encode_ms=encode, prompt_eval_ms=perf["prompt eval"][0], prompt_tokens=perf["prompt eval"][1],
                   eval_ms=ev[0], eval_runs=ev[1], wall_ms=wall_ms)


def write_images(directory: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """`n` random RGB PNGs of `size`x`size` (the same noise the pipeline section feeds ours)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = directory / f"img-{seed}-{i}.png"
        if not p.is_file():
            Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def run_mtmd(binary: Path, model: Path, mmproj: Path, images: list[Path], threads: int, new_tokens: int,
             prompt: str = "Question: what is in the images?\nAnswer:", timeout_s: float = 900) -> MtmdRun:
    """One single-turn request through ``llama-mtmd-cli`` (greedy, `new_tokens` tokens at most)."""
    cmd = [str(binary), "-m", str(model), "--mmproj", str(mmproj), "-p", prompt, "-n", str(new_tokens),
           "-t", str(threads), "-tb", str(threads), "--temp", "0", "-c", "4096", "-b", "2048", "--seed", "0",
           "--chat-template", "chatml", "--no-warmup", "--perf", "-lv", "4"]
    for img in images:
        cmd += ["--image", str(img)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    wall = (time.perf_counter() - t0) * 1e3
    text = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        raise BackendError(f"llama-mtmd-cli exited {proc.returncode}: {text[-800:]}")
    return parse_mtmd_log(text, wall)


def run_llama_bench(binary: Path, model: Path, threads: int, prompt_len: int, new_tokens: int,
                    timeout_s: float = 900) -> tuple[float, float]:
    """(prompt tok/s over `prompt_len` tokens, decode tok/s of `new_tokens` tokens after that
    prompt) from one ``llama-bench`` call: ``-p P -n 0`` and ``-n N -d P`` (decode at the same depth
    as the text protocol's), one repetition each (the caller repeats)."""
    out = []
    for args in (["-p", str(prompt_len), "-n", "0"], ["-p", "0", "-n", str(new_tokens), "-d", str(prompt_len)]):
        cmd = [str(binary), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json", "-b", "2048", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise BackendError(f"llama-bench exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
        rows = json.loads(proc.stdout[proc.stdout.index("["):])
        out.append(float(rows[0]["avg_ts"]))
    return out[0], out[1]


# ---- the engine ---------------------------------------------------------------------------------


class LlamaCppEngine(Engine):
    """llama.cpp built from source (:mod:`.llama_cpp_build`), measured with its own ``llama-bench``.

    Per generation: prompt processing of ``prompt_len`` tokens, then ``new_tokens`` decode steps at
    that depth (``-d``), each timed by llama-bench itself (model load excluded). llama-bench draws
    its own token ids, so no greedy tokens are compared for this engine.
    """

    name = "llamacpp"
    label = "llama.cpp"
    precisions = PRECISIONS

    def _bin(self) -> Path | None:
        b = self.ctx.extra.get("llama_cpp_bin")
        return Path(b) if b else None

    def unavailable(self) -> str | None:
        if self._bin() is None:
            why = self.ctx.extra.get("llama_cpp_error") or "llama.cpp was not built (the bench builds it when the "
            "llamacpp anchor is selected)"
            return f"llama.cpp is not available here: {why}"
        if importlib.util.find_spec("gguf") is None:
            return "the gguf package is not installed (needed to convert the checkpoint)"
        if self.ctx.hf_dir is None:
            return "no HF-format checkpoint of the decoder (needs the source model)"
        return None

    def reference(self) -> dict[str, float] | None:
        """The issue's figures, only for a decoder of edge-small's LLM geometry (they mean nothing for
        another model), and only reported when llama.cpp could not be measured here."""
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
        path, seconds, cached = ensure_text_gguf(self.ctx.work_dir, self.ctx.hf_dir, self.precision, self.ctx.say)
        return Prepared(path=str(path), bytes=path.stat().st_size, seconds=seconds, cached=cached,
                        details={"llama_cpp": self.ctx.extra.get("llama_cpp_build", {})})

    def load(self, prepared: Prepared) -> None:
        self.path = Path(prepared.path)
        bin_dir = self._bin()
        assert bin_dir is not None
        self.bench = bin_dir / "llama-bench"

    def generate(self, spec: TextSpec) -> TextRun:
        pp_ts, tg_ts = run_llama_bench(self.bench, self.path, self.ctx.threads, spec.prompt_len, spec.new_tokens)
        steps = max(1, spec.new_tokens - 1)
        return TextRun(prefill_ms=spec.prompt_len / pp_ts * 1e3, decode_ms=steps / tg_ts * 1e3, tokens=[],
                       decode_steps=steps)


def ensure_text_gguf(work_dir: Path, hf_dir: Path, precision: str,
                     say: Any = None) -> tuple[Path, float, bool]:
    """(path, seconds spent converting now, reused) of the cached text GGUF at `precision`."""
    out = work_dir / f"gguf-{precision}"
    path = out / f"model-{precision}.gguf"
    key = {"engine": "llamacpp", "precision": precision, "hf": str(hf_dir)}
    if stamp_ok(out, key) and path.is_file():
        return path, 0.0, True
    out.mkdir(parents=True, exist_ok=True)
    if say:
        say(f"converting to GGUF {precision}: {path}")
    t0 = time.perf_counter()
    convert_hf_to_gguf(hf_dir, path, precision)
    write_stamp(out, key)
    return path, time.perf_counter() - t0, False


def ensure_mmproj_gguf(work_dir: Path, checkpoint: Path, say: Any = None) -> tuple[Path, float, bool]:
    """(path, seconds spent converting now, reused) of the cached f32 mmproj GGUF."""
    out = work_dir / "gguf-mmproj"
    path = out / "mmproj-f32.gguf"
    key = {"engine": "llamacpp-mmproj", "checkpoint": str(checkpoint)}
    if stamp_ok(out, key) and path.is_file():
        return path, 0.0, True
    out.mkdir(parents=True, exist_ok=True)
    if say:
        say(f"converting the vision tower + projector to an mmproj GGUF: {path}")
    t0 = time.perf_counter()
    convert_mmproj_to_gguf(checkpoint, path)
    write_stamp(out, key)
    return path, time.perf_counter() - t0, False
