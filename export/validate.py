"""`maven-edge validate`: exported ONNX components in onnxruntime vs the torch reference.

    report = validate_artifacts(ValidateOptions("artifacts/tiny-onnx", questions=4))
    print(report.format_table()); sys.exit(0 if report.ok else 1)

Two kinds of checks, both on real inputs (images and questions from the data package's test
split when it is installed, else seeded random images and fixed questions):

* per component and output: max abs difference between onnxruntime (CPUExecutionProvider) and
  torch, each component fed the *torch* values of its inputs so that errors do not compound;
  integer outputs (codes, indices) must match exactly, float outputs within `atol`;
* end to end: greedy tokens for N questions through the ONNX components only (a small reference
  loop over the ONNX decoder with its KV cache, reading nothing but the manifest and the files it
  lists) vs torch `MavenModel.generate`; they must be identical.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.core.config import MavenConfig
from maven_edge.core.errors import ArtifactError
from maven_edge.core.manifest import Manifest, load_manifest
from maven_edge.core.preprocess import preprocess_images
from maven_edge.core.sampling import GenerationConfig
from maven_edge.export.onnx_components import OnnxComponents

FALLBACK_QUESTIONS = (
    ("<image> What color is the circle?", 1),
    ("<image> <image> Which image has a red square?", 2),
    ("<image> How many shapes are there?", 1),
    ("<image> <image> What changed between image 1 and image 2?", 2),
    ("<image> Describe the image.", 1),
    ("<image> <image> <image> Count the shapes across the images.", 3),
)


@dataclass
class ValidateOptions:
    artifacts: str | Path
    checkpoint: str | Path | None = None  # default: the source recorded in the manifest
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)
    seed: int | None = None
    atol: float = 1e-4
    questions: int = 4
    max_new_tokens: int = 16
    split: str = "test"


@dataclass
class OutputCheck:
    component: str
    case: str
    output: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)


@dataclass
class QuestionCheck:
    index: int
    prompt: str
    num_images: int
    torch_tokens: list[int]
    onnx_tokens: list[int]
    torch_text: str
    onnx_text: str

    @property
    def ok(self) -> bool:
        return self.torch_tokens == self.onnx_tokens


@dataclass
class ValidationReport:
    artifacts: str
    inputs: str  # where the images and questions came from
    atol: float
    outputs: list[OutputCheck]
    questions: list[QuestionCheck]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.outputs) and all(q.ok for q in self.questions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifacts": self.artifacts, "inputs": self.inputs, "atol": self.atol, "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "outputs": [{**asdict(c), "ok": c.ok} for c in self.outputs],
            "questions": [{**asdict(q), "ok": q.ok} for q in self.questions],
            "identical_tokens": f"{sum(q.ok for q in self.questions)}/{len(self.questions)}",
        }

    def format_table(self) -> str:
        lines = [f"validate {self.artifacts} (inputs: {self.inputs}; onnxruntime CPUExecutionProvider vs torch)",
                 f"{'component':<20} {'case':<26} {'output':<18} {'max abs diff':>13} {'tol':>8}  ok"]
        for c in _group_layers(self.outputs):
            lines.append(f"{c.component:<20} {c.case:<26} {c.output:<18} {c.max_abs_diff:>13.3e} "
                         f"{c.tolerance:>8.1e}  {'ok' if c.ok else 'FAIL'}")
        if self.questions:
            lines.append("")
            lines.append(f"end to end, greedy: {sum(q.ok for q in self.questions)}/{len(self.questions)} "
                         "questions with identical tokens")
            for q in self.questions:
                mark = "ok" if q.ok else "DIFFER"
                lines.append(f"  [{mark}] #{q.index} ({q.num_images} img) {q.prompt!r} -> {q.onnx_text!r}"
                             + ("" if q.ok else f" (torch: {q.torch_text!r})"))
        lines.append("")
        lines.append(f"{'PASS' if self.ok else 'FAIL'} in {self.seconds:.1f} s")
        return "\n".join(lines)


def _group_layers(checks: list[OutputCheck]) -> list[OutputCheck]:
    """One row per (case, present.*.key|value) with the worst layer, for the text table."""
    rows: dict[tuple[str, str, str], OutputCheck] = {}
    for c in checks:
        name = c.output
        if name.startswith("present."):
            name = "present.*." + name.rsplit(".", 1)[1]
        key = (c.component, c.case, name)
        if key not in rows or c.max_abs_diff > rows[key].max_abs_diff:
            rows[key] = OutputCheck(c.component, c.case, name, c.max_abs_diff, c.tolerance)
    return list(rows.values())


# ---- inputs ----------------------------------------------------------------------------------------


def load_questions(cfg: Any, n: int, split: str = "test") -> tuple[list[tuple[np.ndarray, str]], str]:
    """`n` (pixel_values, prompt) pairs and a description of where they came from."""
    try:
        from maven_edge.model_src.data import get_sample

        out = []
        for i in range(n):
            sample = get_sample(split, i)
            out.append((preprocess_images(sample.images, cfg.preprocess), sample.prompt))
        return out, f"maven_edge.model_src.data {split} split, samples 0..{n - 1}"
    except (ImportError, AttributeError, TypeError):
        pass
    rng = np.random.default_rng(1234)
    out = []
    for i in range(n):
        prompt, k = FALLBACK_QUESTIONS[i % len(FALLBACK_QUESTIONS)]
        images = rng.integers(0, 256, size=(k, cfg.preprocess.image_size, cfg.preprocess.image_size, 3), dtype=np.uint8)
        out.append((_preprocess(images, cfg), prompt))
    return out, "seeded random images (maven_edge.model_src.data not available) and fixed questions"


def _preprocess(images: np.ndarray, cfg: Any) -> np.ndarray:
    try:
        from PIL import Image


        return preprocess_images([Image.fromarray(im) for im in images], cfg.preprocess)
    except ImportError:
        mean = np.asarray(cfg.preprocess.mean, np.float32)[None, :, None, None]
        std = np.asarray(cfg.preprocess.std, np.float32)[None, :, None, None]
        return ((images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0) - mean) / std


# ---- the validation --------------------------------------------------------------------------------


def reference_model(manifest: Manifest, options: ValidateOptions) -> Any:
    """The torch model to compare with: --checkpoint / --preset, else the manifest's recorded source."""
    from maven_edge.model_src.checkpoint import build_model, load_model

    if options.checkpoint is not None or options.preset is not None:
        return load_model(options.checkpoint, options.preset, options.overrides or None, options.seed)
    source = manifest.extra.get("source", {})
    path = source.get("path") or source.get("checkpoint")
    if path and Path(path).is_dir():
        return load_model(path, None, source.get("overrides") or None)
    if source.get("kind") == "preset":
        return build_model(MavenConfig.from_dict(manifest.config), seed=source.get("seed"))
    raise ArtifactError(
        "the manifest does not say which weights were exported; give --checkpoint DIR or --preset NAME"
    )


def validate_artifacts(options: ValidateOptions, model: Any = None) -> ValidationReport:
    """Compare every component and N end-to-end greedy generations with torch."""
    import torch

    from maven_edge.export.onnx_export import model_fingerprint

    t0 = time.perf_counter()
    directory = Path(options.artifacts)
    manifest = load_manifest(directory)
    onnx = OnnxComponents(directory, manifest)
    model = (model if model is not None else reference_model(manifest, options)).eval()
    recorded = manifest.extra.get("model_fingerprint")
    if recorded and model_fingerprint(model) != recorded:
        raise ArtifactError(
            f"the torch model given for comparison is not the one exported into {directory} "
            "(different config or weights); pass the --checkpoint / --preset it was exported from"
        )
    questions, source = load_questions(model.config, max(options.questions, 2), options.split)
    checks: list[OutputCheck] = []

    def add(component: str, case: str, got: dict[str, np.ndarray], want: dict[str, Any]) -> None:
        for name, ref in want.items():
            ref = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
            tol = 0.0 if ref.dtype.kind in "iub" else options.atol
            checks.append(OutputCheck(component, case, name, _diff(got[name], ref), tol))

    with torch.no_grad():
        pixel_values = np.concatenate([questions[0][0], questions[1][0]])[: model.config.max_images]
        for label, pv in ((f"{pixel_values.shape[0]} images", pixel_values), ("1 image", pixel_values[:1])):
            pv_t = torch.from_numpy(pv)
            feats = model.vision(pv_t)
            add("vision_encoder", label, onnx.run("vision_encoder", pixel_values=pv), {"patch_features": feats})
            f = feats.numpy()
            codes = model.discrete(feats)
            add("discrete_tokenizer", label, onnx.run("discrete_tokenizer", patch_features=f), {"visual_codes": codes})
            h_eos = model.compute_h_eos(codes)
            logits = model.selector(feats, h_eos)
            from maven_edge.model_src.modeling.selector import gather_patches, select_patches

            idx = select_patches(logits, model.config.num_kept_patches())
            add("patch_selector", label, onnx.run("patch_selector", patch_features=f, h_eos=h_eos.numpy()),
                {"scores": torch.sigmoid(logits), "selected_embeds": model.projector(gather_patches(feats, idx)),
                 "selected_indices": idx})
            if "projector" in onnx.sessions:
                add("projector", label, onnx.run("projector", patch_features=f),
                    {"projected_embeds": model.projector(feats)})
            # h_eos through the ONNX decoder (batch = images, empty past)
            seq = torch.cat([codes, torch.full_like(codes[:, :1], model.tokenizer.eos_vis_id)], dim=1)
            _, hidden, _ = onnx.decode(model.embed_ids(seq).numpy(), np.ones(tuple(seq.shape), np.int64),
                                       onnx.empty_past(seq.shape[0]))
            add("decoder", f"h_eos, {label}", {"h_eos": hidden[:, -1]}, {"h_eos": h_eos})
        ids = model.tokenizer.encode_prompt("Describe the image. What color is the circle?")
        ids_t = torch.tensor([ids, ids[::-1]])
        add("embed_tokens", f"batch 2 x seq {len(ids)}", onnx.run("embed_tokens", input_ids=ids_t.numpy()),
            {"inputs_embeds": model.embed_ids(ids_t)})
        # decoder: prefill with an empty past, then one step with the returned past
        pv0, prompt0 = questions[0]
        visual = model.encode_images(torch.from_numpy(pv0))
        batch = model.assemble_batch([model.tokenizer.encode_prompt(prompt0)], [visual.embeds])
        emb, mask = batch.inputs_embeds, batch.attention_mask

        def decoder_case(case: str, x: torch.Tensor, mask: torch.Tensor, past: list | None):
            logits, hidden, present = model.llm(x, mask, None, past)
            past_np = onnx.empty_past(1) if past is None else {
                f"past_key_values.{i}.{kv}": past[i][j].numpy()
                for i in range(len(past)) for j, kv in enumerate(("key", "value"))}
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1]:]
            outs = onnx.run("decoder", inputs_embeds=x.numpy(), attention_mask=mask.numpy(),
                            position_ids=positions.numpy(), **past_np)
            want = {"logits": logits, "hidden_states": hidden}
            for i, (k, v) in enumerate(present):
                want[f"present.{i}.key"], want[f"present.{i}.value"] = k, v
            add("decoder", f"{case} ({x.shape[1]} tok)", outs, want)
            return logits, present

        logits, present = decoder_case("prefill, past 0", emb, mask, None)
        step = model.embed_ids(torch.tensor([[int(logits[0, -1].argmax())]]))
        decoder_case(f"step, past {mask.shape[1]}", step,
                     torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1), present)

        results = []
        gen = GenerationConfig(max_new_tokens=options.max_new_tokens)
        for i, (pv, prompt) in enumerate(questions[: options.questions]):
            t_tokens, t_text = model.generate(torch.from_numpy(pv), prompt, gen)
            o_tokens = onnx.generate(pv, prompt, gen)
            results.append(QuestionCheck(i, prompt, int(pv.shape[0]), [int(t) for t in t_tokens], o_tokens, t_text,
                                         onnx.tokenizer.decode(o_tokens)))
    return ValidationReport(str(directory), source, options.atol, checks, results, time.perf_counter() - t0)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def report_json(report: ValidationReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


__all__ = ["ValidateOptions", "ValidationReport", "validate_artifacts"]
