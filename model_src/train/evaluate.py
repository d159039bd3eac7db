"""Exact-match evaluation with batched greedy decoding.

The batch decoder left-pads the assembled prompts (positions are counted over real tokens only, so
each row sees exactly the positions it would see alone), prefills once and decodes with the KV
cache, taking the arg-max over the tokenizer's ids like `Sampler` does: its answers are those of
`MavenModel.generate` with the default greedy `GenerationConfig` (the tests check this).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from maven_edge.core.config import check_mode
from maven_edge.core.errors import InputError
from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS
from maven_edge.model_src.data import Sample
from maven_edge.model_src.data.counts import per_image_counts
from maven_edge.model_src.data.splits import SPLITS, iter_samples, num_samples
from maven_edge.model_src.data.tasks import normalize_answer, question_line, tally_terms
from maven_edge.model_src.modeling.maven import MavenModel
from maven_edge.model_src.train import batches as B
from maven_edge.model_src.train.common import (
    VisualFeatures,
    budget_indices,
    embeds_for_indices,
    set_threads,
    tokens_per_image,
    visual_embeds,
    visual_features,
)
from maven_edge.model_src.train.loop import atomic_write_text

#: a trained checkpoint's test-split answers, one JSON line per question, beside its eval_report.json
TEST_PREDICTIONS = "test_predictions.jsonl"


@torch.no_grad()
def greedy_batch(
    model: MavenModel,
    samples: Sequence[Sample],
    mode: str,
    keep_ratio: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    features_hook: Callable[[VisualFeatures], VisualFeatures] | None = None,
    visual_token_budget: int | None = None,
    min_patches: int = 1,
    patch_subset: int = 0,
) -> tuple[list[str], list[int], list[Any]]:
    """(decoded answers, prefill lengths, selected patch indices per sample) for a batch.
    `features_hook` (diagnostics) may replace the batch's visual features before they are embedded.
    With `visual_token_budget` (hybrid) each sample's images share that many visual tokens, patches
    ranked across its images (core/budget.py); the indices per sample are then a list per image.
    `patch_subset` > 0 (continuous): every image shows the same evenly spread subset of that many patches."""
    tok = model.tokenizer
    ids = [tok.encode_prompt(s.prompt) for s in samples]
    counts = [len(s.images) for s in samples]
    if visual_token_budget is None:
        for i, c in zip(ids, counts, strict=True):
            model.plan_prompt(i, c, tokens_per_image(model.config, mode, keep_ratio, patch_subset))  # PromptError
    px = B.pixel_tensor(samples, model.config)
    vf = visual_features(model, px, mode, keep_ratio, patch_subset)
    if features_hook is not None:
        vf = features_hook(vf)
    per: list[Any] = []
    sel: list[Any] = []
    j = 0
    if visual_token_budget is not None:
        indices = budget_indices(vf, counts, visual_token_budget, min_patches)
        emb_list = embeds_for_indices(model, vf, indices)
        for c in counts:
            per.append(emb_list[j : j + c])
            sel.append(indices[j : j + c])
            j += c
    else:
        emb = visual_embeds(model, vf, mode)
        for c in counts:
            per.append(emb[j : j + c])
            sel.append(vf.indices[j : j + c] if vf.indices is not None else None)
            j += c
    asm = model.assemble_batch(ids, per, pad_left=True)
    mask = asm.attention_mask
    prefill = [int(x) for x in mask.sum(1)]
    logits, _, past = model.llm(asm.inputs_embeds, mask)
    allowed = tok.layout.tokenizer_size
    out: list[list[int]] = [[] for _ in samples]
    done = [False] * len(samples)
    for step in range(max_new_tokens):
        nxt = logits[:, -1, :allowed].float().argmax(-1)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t == tok.eos_id:
                done[b] = True
            else:
                out[b].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(len(samples), 1, dtype=mask.dtype)], dim=1)
        logits, _, past = model.llm(model.embed_ids(nxt[:, None]), mask, None, past)
    return [tok.decode(o) for o in out], prefill, sel


IMAGE_BUCKETS: tuple[tuple[int, int], ...] = ((2, 4), (5, 8))  # multi-image questions, reported apart


def image_bucket(num_images: int) -> str:
    """``"2-4"`` / ``"5-8"`` (:data:`IMAGE_BUCKETS`), else the count itself."""
    for lo, hi in IMAGE_BUCKETS:
        if lo <= num_images <= hi:
            return f"{lo}-{hi}"
    return str(num_images)


def _nested(hits: dict[str, list[int]], prefix: str, value: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for k in sorted(hits):
        if k.startswith(prefix):
            outer, inner = k[len(prefix):].split("/", 1)
            out.setdefault(outer, {})[inner] = value(k)
    return out


def named_patches_kept(sample: Sample, kept: Sequence[Any]) -> tuple[float, float]:
    """(patches of the objects the question names that were kept, all such patches) over the
    sample's images (`Sample.patch_labels`: every object's patches when it names none)."""
    hit = total = 0.0
    for labels, idx in zip(sample.patch_labels, kept, strict=True):
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        lab = torch.as_tensor(labels)
        hit += float(lab[idx].sum())
        total += float(lab.sum())
    return hit, total


def evaluate(
    model: MavenModel,
    split: str = "test",
    mode: str = "hybrid",
    keep_ratio: float | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    quiet: bool = False,
    samples: Sequence[Sample] | None = None,
    return_predictions: bool = False,
    features_hook: Callable[[VisualFeatures], VisualFeatures] | None = None,
    visual_token_budget: int | None = None,
    min_patches: int = 1,
    patch_subset: int = 0,
) -> dict[str, Any]:
    """Exact-match accuracy per family, per task and overall on `split` (or given samples), the
    multi-image tasks per image-count bucket (:data:`IMAGE_BUCKETS`) and the video questions per
    variant; `features_hook` is passed to :func:`greedy_batch` (diagnostics). With
    `visual_token_budget` each question's images share that many visual tokens (hybrid; patches
    ranked across its images, at least `min_patches` per image) instead of a keep ratio each;
    `patch_subset` > 0 (continuous): a fixed evenly spread subset of that many patches per image."""
    check_mode(mode)
    if visual_token_budget is not None and mode != "hybrid":
        raise InputError("--visual-token-budget ranks the selector's patches, so it needs --mode hybrid")
    if patch_subset and (mode != "continuous" or not 1 <= patch_subset <= model.config.num_patches):
        raise InputError(f"a fixed patch subset needs --mode continuous and 1..{model.config.num_patches} patches, "
                         f"got {patch_subset} with mode {mode}")
    if visual_token_budget is not None and visual_token_budget < 1:
        raise InputError(f"--visual-token-budget must be >= 1, got {visual_token_budget}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
        raise InputError(f"--keep-ratio must be in (0, 1], got {keep_ratio}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    set_threads()
    model.eval()
    if samples is None:
        n = num_samples(split) if limit is None else min(limit, num_samples(split))
        samples = list(iter_samples(split, n, image_size=model.config.vision.image_size,
                                    patch_size=model.config.vision.patch_size))
    order = sorted(range(len(samples)), key=lambda i: (samples[i].family == "caption", len(samples[i].images), i))
    preds: dict[int, str] = {}
    prefill: dict[int, int] = {}
    patches: dict[int, int] = {}
    named: dict[int, tuple[float, float]] = {}  # hybrid: (named-object patches kept, named-object patches)
    t0 = time.time()
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc=f"eval {split} {mode}", disable=quiet, mininterval=3.0):
        answers, lens, sel = greedy_batch(model, [samples[i] for i in chunk], mode, keep_ratio,
                                          features_hook=features_hook, visual_token_budget=visual_token_budget,
                                          min_patches=min_patches, patch_subset=patch_subset)
        for i, a, n, kept in zip(chunk, answers, lens, sel, strict=True):
            preds[i], prefill[i] = a, n
            if kept is not None:
                patches[i] = sum(len(k) for k in kept)
                if mode == "hybrid":
                    named[i] = named_patches_kept(samples[i], kept)
    hits: dict[str, list[int]] = defaultdict(list)
    records = []
    for i, s in enumerate(samples):
        ok = int(normalize_answer(preds[i]) == normalize_answer(s.answer))
        for key in ("overall", f"family/{s.family}", f"task/{s.task}"):
            hits[key].append(ok)
        if s.meta.get("heldout"):
            hits[f"heldout/{s.family}"].append(ok)
        if s.family == "multi":
            bucket = image_bucket(len(s.images))
            hits[f"bucket/{bucket}/multi"].append(ok)
            hits[f"bucket/{bucket}/{s.task}"].append(ok)
        if s.family == "video":
            hits[f"video/{s.meta.get('variant', 'all')}"].append(ok)
        records.append({"index": s.meta.get("index", i), "task": s.task, "family": s.family, "images": len(s.images), "prompt": s.prompt,
                        "answer": s.answer, "prediction": preds[i], "correct": bool(ok)})

    def acc(key: str) -> float:
        return sum(hits[key]) / len(hits[key])

    cfg = model.config
    report: dict[str, Any] = {
        "split": split,
        "mode": mode,
        "keep_ratio": cfg.selector.keep_ratio if keep_ratio is None else keep_ratio,
        "kept_patches": cfg.num_kept_patches(keep_ratio) if mode == "hybrid" else None,
        "num_questions": len(samples),
        "accuracy": acc("overall"),
        "family_accuracy": {k.split("/", 1)[1]: acc(k) for k in sorted(hits) if k.startswith("family/")},
        "task_accuracy": {k.split("/", 1)[1]: acc(k) for k in sorted(hits) if k.startswith("task/")},
        "heldout_pair_accuracy": {k.split("/", 1)[1]: acc(k) for k in sorted(hits) if k.startswith("heldout/")},
        "family_counts": {k.split("/", 1)[1]: len(hits[k]) for k in sorted(hits) if k.startswith("family/")},
        # multi-image questions by number of images ("2-4", "5-8"): family "multi" and each task
        "image_bucket_accuracy": _nested(hits, "bucket/", acc),
        "image_bucket_counts": _nested(hits, "bucket/", lambda k: len(hits[k])),
        "video_accuracy": {k.split("/", 1)[1]: acc(k) for k in sorted(hits) if k.startswith("video/")},
        "video_counts": {k.split("/", 1)[1]: len(hits[k]) for k in sorted(hits) if k.startswith("video/")},
        "visual_token_budget": visual_token_budget,
        "min_patches": min_patches if visual_token_budget is not None else None,
        "patch_subset": patch_subset or None,
        "visual_tokens_per_image": None if visual_token_budget is not None else tokens_per_image(
            cfg, mode, keep_ratio, patch_subset),
        "mean_visual_tokens": sum(len(s.images) * (cfg.discrete.num_codes if mode != "continuous" else 0)
                                  + patches.get(i, 0 if mode != "continuous" else len(s.images) * cfg.num_patches)
                                  for i, s in enumerate(samples)) / len(samples),
        "mean_images_per_question": sum(len(s.images) for s in samples) / len(samples),
        "mean_prefill_tokens": sum(prefill.values()) / len(prefill),
        "eval_time_s": round(time.time() - t0, 1),
    }
    if named:  # the selector's recall of the patches the question is about, per task
        by_task: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for i, (kept_n, total_n) in named.items():
            for key in (samples[i].task, "overall"):
                by_task[key][0] += kept_n
                by_task[key][1] += total_n
        report["named_patch_recall"] = {t: kept_n / total_n for t, (kept_n, total_n) in sorted(by_task.items())
                                        if total_n}
    tallies = tally_report(samples, [preds[i] for i in range(len(samples))])
    if tallies:
        report["count_across_tallies"] = tallies
    if return_predictions:
        report["predictions"] = records
    return report


def tally_report(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any] | None:
    """How the answers to counts across images that are worked counts (``"2+0=2+1=3"``) went:
    the questions answered as a tally with one term per image, those whose running totals add
    up, and the per-image terms right against the scene (``term_accuracy``: the share of all such
    terms; ``terms_by_count``: per true per-image count, right / all). None when no answer is a tally."""
    asked = answered = adds_up = whole = 0
    by_count: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for s, pred in zip(samples, predictions, strict=True):
        counts = per_image_counts(question_line(s), s.scenes)
        if counts is None:
            continue
        asked += 1
        parsed = tally_terms(pred)
        if parsed is None or len(parsed[0]) != len(counts):
            continue
        terms, consistent = parsed
        answered += 1
        adds_up += consistent
        whole += terms == counts
        for true, said in zip(counts, terms, strict=True):
            by_count[true][0] += true == said
            by_count[true][1] += 1
    if not answered:
        return None
    right, total = (sum(v[i] for v in by_count.values()) for i in (0, 1))
    return {"questions": asked, "tallies": answered, "adds_up": adds_up, "whole_tally_right": whole,
            "terms": total, "term_accuracy": right / total,
            "terms_by_count": {str(c): f"{r}/{n}" for c, (r, n) in sorted(by_count.items())}}


def write_predictions(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Write :func:`evaluate`'s per-question records (``return_predictions=True``) as JSON lines:
    index, task, family, images, prompt, answer, prediction, correct — one question per line."""
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"split {report['split']}  mode {report['mode']}  keep_ratio {report['keep_ratio']}  "
        f"questions {report['num_questions']}",
        f"overall exact match: {100 * report['accuracy']:.1f}%",
    ]
    for fam, a in report["family_accuracy"].items():
        lines.append(f"  {fam:<8} {100 * a:5.1f}%  (n={report['family_counts'][fam]})")
    for task, a in report["task_accuracy"].items():
        lines.append(f"    {task:<13} {100 * a:5.1f}%")
    if report["heldout_pair_accuracy"]:
        ho = ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["heldout_pair_accuracy"].items())
        lines.append(f"  held-out colour/shape pairs: {ho}")
    for bucket, accs in report.get("image_bucket_accuracy", {}).items():
        counts = report["image_bucket_counts"][bucket]
        parts = ", ".join(f"{t} {100 * a:.1f}% (n={counts[t]})" for t, a in accs.items())
        lines.append(f"  multi-image, {bucket} images: {parts}")
    if report.get("video_accuracy"):
        parts = ", ".join(f"{v} {100 * a:.1f}% (n={report['video_counts'][v]})" for v, a in report["video_accuracy"].items())
        lines.append(f"  video: {parts}")
    if report.get("named_patch_recall"):
        r = report["named_patch_recall"]
        parts = ", ".join(f"{t} {100 * v:.0f}%" for t, v in r.items() if t != "overall")
        lines.append(f"  selector: kept {100 * r['overall']:.1f}% of the named objects' patches ({parts})")
    if report.get("count_across_tallies"):
        t = report["count_across_tallies"]
        lines.append(f"  count_across tallies: {t['tallies']} of {t['questions']} (add up {t['adds_up']}, all terms "
                     f"right {t['whole_tally_right']}); per-image terms right {100 * t['term_accuracy']:.1f}% of "
                     f"{t['terms']} (by true count: {', '.join(f'{c}: {v}' for c, v in t['terms_by_count'].items())})")
    if report.get("visual_token_budget") is not None:
        lines.append(f"visual-token budget: {report['visual_token_budget']} per question (min {report['min_patches']} "
                     f"patch(es) per image)  mean visual tokens: {report['mean_visual_tokens']:.1f}  "
                     f"mean prefill tokens: {report['mean_prefill_tokens']:.1f}")
    else:
        lines.append(f"visual tokens per image: {report['visual_tokens_per_image']}  "
                     f"mean prefill tokens per question: {report['mean_prefill_tokens']:.1f}")
    return "\n".join(lines)
