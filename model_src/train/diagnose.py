"""Where a trained model gets its answers from (docs/training.md, "Diagnosis").

Four measurements on the evaluation split, all for hybrid mode:

* **patch ablation**: exact-match accuracy per task with each image's own kept patches, and with
  every image given the kept patches of the previous image in its evaluation batch (its codes stay).
  A task whose accuracy collapses reads the continuous patches; one that does not move is answered
  from the codes and the text (or is at chance either way).
* **answer attention**: for the prompt's last position (the one that predicts the first answer
  token), the attention mass per layer (mean over heads) on the visual codes, on the kept patches
  of the objects the question names (the selector's pseudo-label mask), on the other kept patches,
  and on the text. Answering "is the A left of the B?" needs A and B retrieved separately.
* **embedding scale**: RMS of the projected kept patches, of the code embeddings and of the text
  embeddings (the decoder reads each token through RMSNorm; something added to a patch token at
  the input, such as an image slot, is lost if it is much smaller than the patch).
* **residual stream**: on the same forwards as the attention, per layer the RMS of the residual
  stream and of what the layer adds to it, for code, kept-patch and text tokens (how much the
  layers can change a patch token compared with its size).

    python -m maven_edge.model_src.train.diagnose --checkpoint model_src/checkpoints/tiny --split val
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from maven_edge.core.errors import InputError, MavenError
from maven_edge.model_src.data import Sample
from maven_edge.model_src.data.splits import SPLITS, iter_samples
from maven_edge.model_src.data.tasks import TASKS
from maven_edge.model_src.modeling.decoder import record_attention
from maven_edge.model_src.modeling.maven import MavenModel
from maven_edge.model_src.train import batches as B
from maven_edge.model_src.train.common import (
    VisualFeatures,
    grid_patches,
    set_threads,
    visual_embeds,
    visual_features,
)
from maven_edge.model_src.train.evaluate import evaluate

ATTENTION_PARTS = ("codes", "named_patches", "other_patches", "text")
RESIDUAL_KINDS = ("codes", "patches", "text")
AttentionMass = dict[str, list[dict[str, float]]]  # task -> per layer: part -> attention mass
Residuals = dict[str, dict[str, dict[str, float]]]  # "stream" | "update" -> layer -> kind -> RMS


def roll_patches(vf: VisualFeatures) -> VisualFeatures:
    """Give every image the kept patches (features and indices) of the previous image in the batch."""
    if vf.indices is None:
        raise InputError("patch ablation needs hybrid mode (kept patches)")
    return dataclasses.replace(vf, feats=vf.feats.roll(1, 0), indices=vf.indices.roll(1, 0))


def roll_codes(vf: VisualFeatures) -> VisualFeatures:
    """Give every image the discrete codes of the previous image in the batch (its own patches and
    its own selection, made from its own codes, stay)."""
    return dataclasses.replace(vf, codes=vf.codes.roll(1, 0))


def grid_selection(vf: VisualFeatures) -> VisualFeatures:
    """Replace the selector's choice by the same number of evenly spread patches (a fixed,
    content-blind subset: :func:`grid_patches`), the same for every image."""
    if vf.indices is None:
        raise InputError("a grid selection replaces the selector's kept patches: it needs hybrid mode")
    grid = grid_patches(vf.feats.shape[1], vf.indices.shape[1]).expand_as(vf.indices)
    return dataclasses.replace(vf, indices=grid.clone())


def patch_ablation(model: MavenModel, samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """Per task: accuracy with the images' own kept patches and with another image's."""
    own = evaluate(model, samples=samples, quiet=True)
    rolled = evaluate(model, samples=samples, quiet=True, features_hook=roll_patches)
    return {task: {"own_patches": own["task_accuracy"][task], "other_image_patches": rolled["task_accuracy"][task]}
            for task in own["task_accuracy"]}


#: what `code_content` probes: (name, what it is)
CONTENT_INPUTS = (("vit", "the ViT's patch features (what the patches come from)"),
                  ("z", "the tokenizer's query outputs before quantization"),
                  ("codes", "the quantized code vectors (what a code id stands for)"))


def code_content(model: MavenModel, steps: int = 300, batch: int = 32, held_out: int = 256,
                 seed: int = 0, pool: str = "max", kinds: Sequence[str] | None = None) -> dict[str, Any]:
    """What the discrete codes can carry about an image's content: for each of
    :data:`CONTENT_INPUTS`, a fresh scene-summary head (stage 0-vq's training-only ``SceneHead``:
    which colour-shape pairs are present, how many objects) trained `steps` steps on that frozen
    input of single-image train questions, scored on `held_out` validation images. Pair loss at
    the base rate (predicting each pair's frequency, whatever the image) means the input tells
    nothing about which objects an image holds. `pool`: how the head pools its per-vector
    features ("max", a presence detector, is the stronger probe: 0.06 pair loss on the shipped
    model's ViT features after 300 steps, where stage 0-vq's own "mean" reaches 0.20). `kinds`: which
    of :data:`CONTENT_INPUTS` to probe (default: all)."""
    import torch.nn.functional as F

    from maven_edge.model_src.train.stages import SceneHead

    if steps < 1 or batch < 1 or held_out < 1:
        raise InputError("code_content needs steps, batch and held_out >= 1")
    n_pairs = len(B.PAIR_IDS)
    size, patch = model.config.vision.image_size, model.config.vision.patch_size
    families = ("caption", "single")

    def targets(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tg = [B.scene_targets(s) for s in samples]
        return (B.pixel_tensor(samples, model.config), torch.from_numpy(np.concatenate([t[0] for t in tg])),
                torch.from_numpy(np.concatenate([t[1] for t in tg])))

    @torch.no_grad()
    def frozen(px: torch.Tensor, kind: str) -> torch.Tensor:
        feats = model.vision(px)
        if kind == "vit":
            return feats
        z = model.discrete.encode(feats)
        return z if kind == "z" else model.discrete.quantize(z).z_q

    model.eval()
    held = targets(list(iter_samples("val", held_out, families=list(families), image_size=size, patch_size=patch)))
    freq = held[1].mean(0)
    base = float(F.binary_cross_entropy(freq.expand_as(held[1]), held[1]))
    out: dict[str, Any] = {"steps": steps, "batch": batch, "held_out_images": len(held[1]), "seed": seed, "pool": pool,
                           "pair_bce_base_rate": base, "pairs_per_image": float(held[1].sum(1).mean()), "inputs": {}}
    for kind, _ in CONTENT_INPUTS:
        if kinds is not None and kind not in kinds:
            continue
        x_held = frozen(held[0], kind)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = SceneHead(x_held.shape[-1], 128, n_pairs, B.MAX_OBJECTS, pool=pool)
        opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
        for step in range(steps):
            rng = B.rng_for(seed, "code-content", step)
            px, pairs, counts = targets(B.samples_for("train", B.train_indices(rng, batch, families), model.config))
            pair_logits, count_logits = head(frozen(px, kind))
            loss = F.binary_cross_entropy_with_logits(pair_logits, pairs) * n_pairs / 4 + F.cross_entropy(
                count_logits, counts)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pair_logits, count_logits = head(x_held)
        pred, tgt = (pair_logits > 0).float(), held[1]
        out["inputs"][kind] = {
            "pair_bce": float(F.binary_cross_entropy_with_logits(pair_logits, tgt)),
            "pair_f1": float(2 * (pred * tgt).sum() / max(1.0, float(pred.sum() + tgt.sum()))),
            "count_accuracy": float((count_logits.argmax(-1) == held[2]).float().mean()),
        }
    return out


@contextmanager
def record_residuals(model: MavenModel) -> Iterator[list[torch.Tensor]]:
    """Collect the residual stream after every decoder layer (one tensor per layer per forward)."""
    store: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: store.append(out[0].detach()))
             for layer in model.llm.layers]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def _rms(x: torch.Tensor) -> float:
    """Mean over tokens of each token's RMS (x: [..., D]); NaN for no tokens."""
    return float(x.pow(2).mean(-1).sqrt().mean()) if x.numel() else float("nan")


@torch.no_grad()
def attention_and_residuals(model: MavenModel, samples: Sequence[Sample]) -> tuple[AttentionMass, Residuals]:
    """Per task, per layer: mean attention mass of the answer position on each part of the prompt
    (`ATTENTION_PARTS`), over the given samples (one forward each, hybrid mode); and, from the
    same forwards, per layer the residual stream's RMS (`input` and after each layer) and the RMS of
    each layer's update, for code, kept-patch and text tokens (`RESIDUAL_KINDS`), averaged over tokens
    and samples."""
    model.eval()
    tok = model.tokenizer
    q = model.config.discrete.num_codes
    t_img = model.config.visual_tokens_per_image("hybrid") + 2  # <img_start> codes patches <img_end>
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)
    resid: dict[tuple[str, str, str], list[float]] = defaultdict(list)  # (stream|update, layer, kind)
    for s in samples:
        vf = visual_features(model, B.pixel_tensor([s], model.config), "hybrid")
        ids = tok.encode_prompt(s.prompt)
        asm = model.assemble_batch([ids], [visual_embeds(model, vf, "hybrid")])
        with record_attention(model.llm) as maps, record_residuals(model) as stream:
            model.llm(asm.inputs_embeds, asm.attention_mask)
        part = np.full(asm.inputs_embeds.shape[1], 3)  # text unless marked below
        markers = np.zeros(asm.inputs_embeds.shape[1], dtype=bool)
        for k, pos in enumerate(i for i, t in enumerate(ids) if t == tok.image_id):
            start = pos + k * (t_img - 1)
            markers[[start, start + t_img - 1]] = True
            part[start + 1 : start + 1 + q] = 0
            named = s.patch_labels[k][vf.indices[k].numpy()] > 0
            part[start + 1 + q : start + t_img - 1] = np.where(named, 1, 2)
        onehot = np.eye(len(ATTENTION_PARTS))[part]  # [T, parts]
        mass = np.stack([m[0, :, -1].mean(0).float().numpy() @ onehot for m in maps])  # [layers, parts]
        sums[s.task] = sums.get(s.task, 0) + mass
        counts[s.task] += 1
        kinds = dict(zip(RESIDUAL_KINDS, (part == 0, (part == 1) | (part == 2), (part == 3) & ~markers), strict=True))
        xs = [asm.inputs_embeds[0]] + [x[0] for x in stream]
        for li, x in enumerate(xs):
            delta = x - xs[li - 1] if li else None
            for kind, where in kinds.items():
                rows = torch.from_numpy(where)
                resid[("stream", "input" if li == 0 else f"after_layer_{li - 1}", kind)].append(_rms(x[rows]))
                if delta is not None:
                    resid[("update", f"layer_{li - 1}", kind)].append(_rms(delta[rows]))
    attention = {task: [dict(zip(ATTENTION_PARTS, (round(float(x), 4) for x in row), strict=True))
                        for row in sums[task] / counts[task]] for task in sums}
    residuals: Residuals = {"stream": {}, "update": {}}
    for (what, layer, kind), values in resid.items():
        residuals[what].setdefault(layer, {})[kind] = round(float(np.nanmean(values)), 4)
    return attention, residuals


@torch.no_grad()
def embedding_scale(model: MavenModel, samples: Sequence[Sample]) -> dict[str, float]:
    """RMS per token of the projected kept patches, the code embeddings and the text embeddings."""
    vf = visual_features(model, B.pixel_tensor(samples, model.config), "hybrid")
    seq = visual_embeds(model, vf, "hybrid")  # <img_start> codes patches <img_end>
    q = model.config.discrete.num_codes
    return {"projected_patches": _rms(seq[:, 1 + q : -1]), "visual_codes": _rms(seq[:, 1 : 1 + q]),
            "text": _rms(model.llm.embed_tokens.weight[: model.tokenizer.layout.tokenizer_size])}


def diagnose(model: MavenModel, split: str = "val", per_task: int = 40, tasks: Sequence[str] = TASKS,
             attention_per_task: int = 20) -> dict[str, Any]:
    """The four measurements on `per_task` questions of each task of `split`."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise InputError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if per_task < 1 or attention_per_task < 1:
        raise InputError("--per-task and --attention-per-task must be >= 1")
    set_threads()
    size, patch = model.config.vision.image_size, model.config.vision.patch_size
    samples = [s for t in tasks for s in iter_samples(split, per_task, tasks=[t], image_size=size, patch_size=patch)]
    few = [s for t in tasks for s in [x for x in samples if x.task == t][:attention_per_task]]
    attention, residuals = attention_and_residuals(model, few)
    return {"split": split, "questions_per_task": per_task, "attention_questions_per_task": attention_per_task,
            "patch_ablation": patch_ablation(model, samples),
            "answer_attention": attention,
            "residual_rms": residuals,
            "embedding_rms": embedding_scale(model, [s for s in samples if s.family != "multi"][:64])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory to diagnose")
    ap.add_argument("--split", default="val", choices=SPLITS)
    ap.add_argument("--per-task", type=int, default=40, help="questions per task for the patch ablation")
    ap.add_argument("--attention-per-task", type=int, default=20, help="questions per task for the attention")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), help=f"subset of: {' '.join(TASKS)}")
    args = ap.parse_args(argv)
    from maven_edge.model_src.checkpoint import load_checkpoint

    try:
        report = diagnose(load_checkpoint(args.checkpoint), args.split, args.per_task, args.tasks,
                          args.attention_per_task)
    except MavenError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
