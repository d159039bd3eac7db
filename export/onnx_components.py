"""Every component of an artifact directory in onnxruntime, read from its manifest only.

:class:`OnnxComponents` is the export side's reference runner: ``maven-edge validate`` compares
it with torch, and calibration computes each component's fp32 inputs with it. It is deliberately
plain (one InferenceSession per file on the CPU, numpy in and out, a simple KV-cache loop); the
runtime's optimised backend is :class:`maven_edge.runtime.backends.ort_backend.OrtBackend`.
torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maven_edge.core.config import VISUAL_MODES
from maven_edge.core.manifest import Manifest, load_manifest, resolve_inside
from maven_edge.core.prompt import plan_prompt, splice
from maven_edge.core.sampling import GenerationConfig, Sampler, StopChecker
from maven_edge.core.tokenizer import TextTokenizer
from maven_edge.export import graph_tools


class OnnxComponents:
    """onnxruntime sessions for every component of an artifact directory, from its manifest only."""

    def __init__(self, directory: str | Path, manifest: Manifest | None = None, providers: list[str] | None = None,
                 threads: int = 0):
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = manifest or load_manifest(self.directory)
        self.sessions = {}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        for name, comp in self.manifest.components.items():
            path = resolve_inside(self.directory, comp.file.path)
            graph_tools.check_external_data(path, self.directory, {e.path for e in comp.external_data})
            self.sessions[name] = ort.InferenceSession(
                str(path), opts, providers=providers or ["CPUExecutionProvider"])
        layout = self.manifest.vocab_layout()
        self.tokenizer = TextTokenizer.from_file(
            resolve_inside(self.directory, self.manifest.tokenizer.path), layout.text_vocab_size, layout.codebook_size)
        self.decoder_info = self.manifest.components["decoder"].extra

    def run(self, name: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        sess = self.sessions[name]
        takes = {i.name for i in sess.get_inputs()}
        outs = sess.run(None, {k: v for k, v in feeds.items() if k in takes})  # position_ids is optional
        return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.run("embed_tokens", input_ids=np.asarray(ids, dtype=np.int64))["inputs_embeds"]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        info = self.decoder_info
        z = np.zeros((batch, info["num_kv_heads"], 0, info["head_dim"]), dtype=np.float32)
        return {f"past_key_values.{i}.{kv}": z for i in range(info["num_layers"]) for kv in ("key", "value")}

    def decode(self, embeds: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
        """One decoder call; returns (logits, hidden_states, next past)."""
        seq = embeds.shape[1]
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -seq:].astype(np.int64)
        out = self.run("decoder", inputs_embeds=embeds.astype(np.float32), attention_mask=mask.astype(np.int64),
                       position_ids=positions, **past)
        nxt = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k.startswith("present.")}
        return out["logits"], out["hidden_states"], nxt

    def encode_images(self, pixel_values: np.ndarray, mode: str | None = None) -> np.ndarray:
        """Visual sequences [n, T_img, D]: <img_start> codes / patches <img_end> (docs/design.md §3)."""
        mode = mode or self.manifest.mode
        ids = self.manifest.vocab["special_ids"]
        n = pixel_values.shape[0]
        feats = self.run("vision_encoder", pixel_values=pixel_values.astype(np.float32))["patch_features"]
        codes = self.run("discrete_tokenizer", patch_features=feats)["visual_codes"]
        spec = VISUAL_MODES.get(mode)
        parts = [self.embed(np.full((n, 1), ids["<img_start>"]))]
        if spec.codes:
            parts.append(self.embed(codes))
        if spec.patches == "selected":
            seq = np.concatenate([codes, np.full((n, 1), ids["<eos_vis>"])], axis=1)
            _, hidden, _ = self.decode(self.embed(seq), np.ones(seq.shape, np.int64), self.empty_past(n))
            parts.append(self.run("patch_selector", patch_features=feats, h_eos=hidden[:, -1])["selected_embeds"])
        elif spec.patches == "all":
            parts.append(self.run(self.manifest.extra.get("continuous_component", "projector"),
                                  patch_features=feats)["projected_embeds"])
        parts.append(self.embed(np.full((n, 1), ids["<img_end>"])))
        return np.concatenate(parts, axis=1)

    def generate(self, pixel_values: np.ndarray, prompt: str, gen: GenerationConfig | None = None) -> list[int]:
        """Greedy (or seeded sampled) tokens, the same algorithm as MavenModel.stream_tokens."""
        gen = (gen or GenerationConfig()).validate()
        tok = self.tokenizer
        ids = tok.encode_prompt(prompt)
        n_img = pixel_values.shape[0]
        text = self.embed(np.asarray([ids]))[0]
        visual = self.encode_images(pixel_values) if n_img else np.zeros((0, 2, text.shape[1]), np.float32)
        if n_img and self.manifest.config.get("image_slots", False):  # slot k's vector on the k-th image
            visual = visual + self.embed(np.asarray([tok.layout.image_slot_ids(n_img)]))[0][:, None, :]
        plan = plan_prompt(ids, tok.image_id, pixel_values.shape[0], visual.shape[1] - 2)
        embeds = splice(plan, text, visual, np.concatenate)[None]
        mask = np.ones((1, embeds.shape[1]), np.int64)
        logits, _, past = self.decode(embeds, mask, self.empty_past(1))
        sampler = Sampler(gen, tok.layout.tokenizer_size)
        stop = StopChecker(gen, tok.eos_id)
        out: list[int] = []
        for step in range(gen.max_new_tokens):
            token = sampler(logits[0, -1])
            if stop.is_stop_token(token):
                break
            out.append(token)
            if step == gen.max_new_tokens - 1:
                break
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, _, past = self.decode(self.embed(np.asarray([[token]])), mask, past)
        return out
