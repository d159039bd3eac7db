"""The decoder built by onnxruntime-genai's model builder instead of `torch.onnx` (`--decoder genai`).

Why: the builder emits the fused CPU/GPU kernels onnxruntime ships for LLM decoding
(``GroupQueryAttention`` with rotary embedding inside, ``SkipSimplifiedLayerNormalization``,
``MatMulNBits`` for int4), which a plain dynamo export of our decoder does not get. Run with
``exclude_embeds=true include_hidden_states=true`` it produces exactly our decoder contract
(docs/design.md §4): ``inputs_embeds``, ``attention_mask``, ``past_key_values.N.key/value`` in;
``logits``, ``hidden_states`` (after the final norm, as ours), ``present.N.key/value`` out, with no
``position_ids`` input (rotary positions come from the attention mask inside the graph).

Its attention supports a *shared* past/present buffer: the runtime preallocates one
``[1, kv_heads, capacity, head_dim]`` buffer per layer and binds it as both past and present, so a
decode step writes only the new token (``past_present_share_buffer`` in the manifest). Called
with an empty past (the batched ``h_eos`` pass), the same graph behaves like a Concat cache.

How: our decoder is written out as an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` checkpoint
(`maven_edge.model_src.hf_import.save_hf_llama`), the builder runs in a child process (it imports torch and
transformers), and its ``model.onnx`` (+ ``.data``) becomes ``decoder.onnx`` (+ ``decoder.onnx.data``)
with the external-data location rewritten. The exporter then checks it against torch like every
other component. Needs the ``genai`` extra (onnxruntime-genai, onnx-ir).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from maven_edge.core.errors import ExportError

#: `--decoder` choices: our torch.onnx export, or the builder at fp32 / int4 (MatMulNBits, block 32,
#: accuracy level 4: int8 activations, the builder's CPU default).
DECODER_CHOICES = ("torch", "genai", "genai-int4")
BUILDER_ARGS = {
    "genai": ["-p", "fp32"],
    "genai-int4": ["-p", "int4"],
}
BUILDER_EXTRA = {
    "genai": ["exclude_embeds=true", "include_hidden_states=true"],
    "genai-int4": ["exclude_embeds=true", "include_hidden_states=true", "int4_block_size=32",
                   "int4_accuracy_level=4"],
}
PRECISION = {"genai": "fp32", "genai-int4": "int4"}


def builder_unavailable() -> str | None:
    """Why the builder cannot run here (None when it can)."""
    for mod, pip in (("onnxruntime_genai", "onnxruntime-genai"), ("onnx_ir", "onnx-ir")):
        if importlib.util.find_spec(mod) is None:
            return f"{pip} is not installed; `pip install -c constraints.txt -e \".[genai]\"` (or use --decoder torch)"
    return None


def builder_version() -> str:
    import onnxruntime_genai

    return str(getattr(onnxruntime_genai, "__version__", "unknown"))


def write_hf_checkpoint(model: Any, directory: Path) -> Path:
    """Our decoder as an HF checkpoint the builder (and AutoTokenizer) can read."""
    from maven_edge.model_src.hf_import import save_hf_llama

    save_hf_llama(model.llm, directory, tokenizer=model.tokenizer)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.llm.max_position_embeddings,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
    }, indent=2))
    return directory


def run_builder(hf_dir: Path, out: Path, kind: str, timeout_s: float = 7200) -> None:
    """Run `python -m onnxruntime_genai.models.builder` for `kind`; its log goes to out/build.log."""
    if kind not in BUILDER_ARGS:
        raise ExportError(f"unknown decoder builder {kind!r}; choose one of {', '.join(DECODER_CHOICES)}")
    why = builder_unavailable()
    if why:
        raise ExportError(why)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-e", "cpu", "-c", str(out / "cache"), *BUILDER_ARGS[kind], "--extra_options", *BUILDER_EXTRA[kind]]
    with open(out / "build.log", "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ExportError(f"the onnxruntime-genai builder did not finish in {timeout_s:.0f} s") from exc
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        tail = (out / "build.log").read_text(errors="replace")[-1500:]
        raise ExportError(f"the onnxruntime-genai builder failed (exit {proc.returncode}); log tail:\n{tail}")


def rename_onnx(src: Path, dst: Path) -> list[str]:
    """Move `src` (+ its external data) to `dst` (+ `dst.name`.data); returns the data file names."""
    import onnx

    proto = onnx.load(str(src), load_external_data=False)
    old_locations: set[str] = set()
    new_location = dst.name + ".data"
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    old_locations.add(entry.value)
                    entry.value = new_location
    if len(old_locations) > 1:
        raise ExportError(f"{src.name} spreads its weights over several files {sorted(old_locations)}")
    onnx.save(proto, str(dst))
    if old_locations:
        os.replace(src.parent / old_locations.pop(), dst.parent / new_location)
        return [new_location]
    return []


def build_decoder(model: Any, staging: Path, kind: str) -> list[str]:
    """Build decoder.onnx (+ decoder.onnx.data) into `staging`; returns the data file names."""
    with tempfile.TemporaryDirectory(prefix="maven-genai-") as tmp:
        tmp_path = Path(tmp)
        hf = write_hf_checkpoint(model, tmp_path / "hf")
        built = tmp_path / "built"
        run_builder(hf, built, kind)
        return rename_onnx(built / "model.onnx", staging / "decoder.onnx")


def decoder_extra(kind: str, base: dict[str, Any]) -> dict[str, Any]:
    """The manifest's decoder `extra` for a builder decoder: ours, plus how to drive the shared buffer."""
    extra = dict(base)
    extra.update({
        "builder": f"onnxruntime-genai {builder_version()}",
        "builder_options": [*BUILDER_ARGS[kind], *BUILDER_EXTRA[kind]],
        "needs_position_ids": False,
        "past_present_share_buffer": True,
        "kv_buffer": "bind one [1, kv_heads, capacity, head_dim] buffer per layer as both past and present; "
                     "attention_mask length = tokens in the cache after this call; an empty past (length 0) "
                     "gives a Concat cache (present = new tokens)",
    })
    return extra


__all__ = ["DECODER_CHOICES", "build_decoder", "builder_unavailable", "decoder_extra", "rename_onnx", "run_builder"]
