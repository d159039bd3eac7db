"""What each stage trains (docs/design.md §6, issue 4), and the driver that chains them.

Stage 0 (pretraining what MaVEn takes pretrained), three phases:
  0-vision  the ViT, with a linear head on every patch feature predicting the colour, shape and size of
            the object covering the patch, whether the object's centre is in it, and the patch's row
            and column (dense attribute
            objective on the synthetic scenes; the head is training-only). With
            ``gray_consistency`` (the recipe) every image also gets a random-grey copy: shape is
            learnt on the copies only and colour images are pulled to their copy's shape
            prediction, so colour never predicts shape (held-out colour-shape pairs).
  0-vq      the discrete tokenizer (Q-Former queries + VQ codebook) on the frozen ViT features: a
            training-only head must predict the scene summary (which colour-shape pairs are present,
            how many objects) from the set of 32 code vectors -- the image's global meaning, which is
            what the decoder reads the codes for. The first quarter of the steps trains unquantized,
            then the codebook is seeded from encoder outputs (avoids an input-independent collapse
            that a dense reconstruction target fell into); VQ codebook + commitment loss; dead codes
            (unused for 20 steps) are restarted from random query outputs of the batch. Logs
            perplexity and codebook usage.
  0-text    the decoder as a text-only LM on the sample texts (image placeholders dropped).
Stage 1: the patch selector only, binary cross-entropy against the pseudo-labels of caption samples
  (patches overlapping the objects the caption names: every object). Logs precision/recall of the
  kept top-k patches.
Stage 2: vocabulary expansion + discrete path: the visual-code rows of embed_tokens/lm_head are
  re-initialised with `expand_vocab`'s rule (mean text row + small noise; mean head row), then the
  whole decoder learns captioning from `<img_start> codes <img_end>` (discrete mode).
Stage 3: the projector only, captioning in hybrid mode (codes + kept continuous patches).
Stage 4: instruction tuning on the QA mix (captions, single- and multi-image QA), hybrid mode: the
  decoder and the projector train; vision encoder and selector are frozen. (The discrete tokenizer
  reaches the decoder only through argmax code ids, so it receives no gradient either.)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maven_edge.core.config import MavenConfig, get_config
from maven_edge.core.errors import CheckpointError, TrainingError
from maven_edge.model_src.checkpoint import build_model, load_checkpoint, save_checkpoint
from maven_edge.model_src.data.followups import QA, followup_questions
from maven_edge.model_src.data.tasks import Sample, question_line
from maven_edge.model_src.modeling.decoder import record_attention
from maven_edge.model_src.modeling.maven import MavenModel
from maven_edge.model_src.modeling.selector import select_patches
from maven_edge.model_src.train import batches as B
from maven_edge.model_src.train.attention_targets import (
    AttentionSupervision,
    answer_turns,
    attention_loss,
    build_targets,
    term_weights,
    worked_count,
)
from maven_edge.model_src.train.common import (
    answer_loss,
    set_threads,
    tokens_per_image,
    visual_embeds,
    visual_features,
)

# the final evaluation's code is loaded when a run starts, not after hours of training, so the run
# ends with the code it started with even if the package is updated meanwhile
from maven_edge.model_src.train.evaluate import TEST_PREDICTIONS, evaluate, write_predictions
from maven_edge.model_src.train.loop import Phase, plot_losses, read_jsonl, run_phase
from maven_edge.model_src.train.recipe import STAGE_PHASES, PhaseConfig, for_model, get_recipe, parse_stages

DEAD_CODE_WINDOW = 20


def dense_target_loss(logits: torch.Tensor, targets: torch.Tensor, grid: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the per-target cross-entropies (`B.dense_targets(grid)`, -1 = no target); accuracies
    on the object patches that have the target (colour/shape/size), centre patches (center) or
    every patch (row/col)."""
    total = logits.new_zeros(())
    metrics = {}
    obj = targets[..., 2] > 0  # object patches (every object has a size, grey or not)
    for k, (name, lg) in enumerate(B.split_dense_logits(logits, grid).items()):
        tgt = targets[..., k]
        if (tgt >= 0).any():  # -1: no target (e.g. the colour of a grey-scale image)
            total = total + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=-1)
        pred = lg.argmax(-1)
        mask = {"center": tgt > 0, "row": torch.ones_like(obj), "col": torch.ones_like(obj)}.get(name, obj & (tgt >= 0))
        metrics[f"acc_{name}"] = float((pred[mask] == tgt[mask]).float().mean()) if mask.any() else 1.0
    return total, metrics


SCENE_POOLS = ("mean", "max")


class SceneHead(nn.Module):
    """Training-only: predicts the scene summary (which colour-shape pairs are present, how many
    objects) from the set of quantized code vectors (per-code MLP, pooled over codes, MLP).
    ``pool="mean"`` is stage 0-vq's head; ``"max"`` (a presence detector: one code showing a pair
    is enough) is the stronger probe `diagnose.code_content` uses."""

    def __init__(self, code_dim: int, width: int, n_pairs: int, n_counts: int, pool: str = "mean"):
        super().__init__()
        if pool not in SCENE_POOLS:
            raise TrainingError(f"scene head pool must be one of {SCENE_POOLS}, got {pool!r}")
        self.per_code = nn.Sequential(nn.Linear(code_dim, width), nn.GELU(), nn.Linear(width, width))
        self.out = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, n_pairs + n_counts))
        self.n_pairs = n_pairs
        self.pool = pool

    def forward(self, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.per_code(z_q)
        h = self.out(h.amax(1) if self.pool == "max" else h.mean(1))
        return h[:, : self.n_pairs], h[:, self.n_pairs :]


def _seeded(seed: int, fn):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def _named(prefix: str, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(f"{prefix}.{n}", p) for n, p in module.named_parameters() if p.requires_grad]


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _trainable(model: MavenModel, *parts: str) -> list[tuple[str, nn.Parameter]]:
    _freeze_all(model)
    out = []
    for part in parts:
        module = getattr(model, part)
        for p in module.parameters():
            p.requires_grad_(True)
        out += _named(f"model.{part}", module)
    return out


def _samples(model: MavenModel, cfg: PhaseConfig, seed: int, phase: str, step: int, n: int | None = None):
    rng = B.rng_for(seed, phase, step)
    idx = B.train_indices(rng, n or cfg.batch_size, cfg.families, cfg.task_weights)
    return B.samples_for("train", idx, model.config)


# ---- stage 0 -------------------------------------------------------------------------------------
def phase_vision(model: MavenModel, cfg: PhaseConfig, seed: int) -> Phase:
    grid = model.config.vision.grid_size
    n_classes = sum(n for _, n in B.dense_targets(grid))
    head = _seeded(seed + 1, lambda: nn.Linear(model.config.vision.hidden_size, n_classes))
    params = _trainable(model, "vision") + _named("vit_head", head)
    fam = ("caption", "single")  # one image per sample

    def targets(samples: list) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([B.vision_targets(s, model.config.vision.patch_size) for s in samples]))

    def step_fn(step: int) -> dict[str, float]:
        rng = B.rng_for(seed, "0-vision", step)
        samples = B.samples_for("train", B.train_indices(rng, cfg.batch_size, fam), model.config)
        gray = B.gray_images(B.rng_for(seed, "0-vision-gray", step), len(samples), cfg.gray_share)
        levels = B.rng_for(seed, "0-vision-gray-levels", step) if cfg.gray_levels == "random" else None
        if cfg.gray_consistency > 0:
            return paired_step(samples, gray, levels)
        samples = [B.in_gray(s, levels) if g else s for s, g in zip(samples, gray, strict=True)]
        tgt = targets(samples)
        tgt[torch.from_numpy(gray), :, 0] = -1  # no colour target in a grey-scale image
        loss, metrics = dense_target_loss(head(model.vision(B.pixel_tensor(samples, model.config))), tgt, grid)
        loss.backward()
        return {"loss": float(loss.detach()), **metrics}

    def paired_step(samples: list, gray: np.ndarray, levels: np.random.Generator | None) -> dict[str, float]:
        """Colour images (those not drawn grey) first, then a grey copy of every sample. Shape is
        supervised on the copies only, where colour cannot predict it (held-out pairs never occur
        in training, so on colour images a shape head also learns which shapes a colour never
        has); the colour images' shape distributions are pulled to their copies' (KL, copies
        detached), so the ViT's shape features of a colour image become those of its outline."""
        colour = [s for s, g in zip(samples, gray, strict=True) if not g]
        copies = [B.in_gray(s, levels) for s in samples]
        tgt = targets(colour + copies)
        tgt[: len(colour), :, 1] = -1  # no shape target on a colour image
        tgt[len(colour) :, :, 0] = -1  # no colour target on a grey copy
        logits = head(model.vision(B.pixel_tensor(colour + copies, model.config)))
        loss, metrics = dense_target_loss(logits, tgt, grid)
        if colour:
            pair = len(colour) + torch.from_numpy(np.flatnonzero(~gray))  # each colour image's copy
            obj = tgt[: len(colour), :, 2] > 0  # object patches (size target > 0)
            shape = B.split_dense_logits(logits, grid)["shape"]
            kl = F.kl_div(F.log_softmax(shape[: len(colour)][obj], -1),
                          F.softmax(shape[pair][obj].detach(), -1), reduction="batchmean")
            loss = loss + cfg.gray_consistency * kl
            metrics["shape_kl"] = float(kl.detach())
        loss.backward()
        return {"loss": float(loss.detach()), **metrics}

    return Phase("0-vision", cfg, {"model": model, "vit_head": head}, params, step_fn, seed=seed)


def phase_vq(model: MavenModel, cfg: PhaseConfig, seed: int) -> Phase:
    """The first quarter of the steps trains the query encoder unquantized (the head reads z), then
    the codebook is re-seeded from encoder outputs and training continues through the quantizer."""
    dc = model.config.discrete
    n_pairs = len(B.PAIR_IDS)
    head = _seeded(seed + 2, lambda: SceneHead(dc.code_dim, dc.hidden_size, n_pairs, B.MAX_OBJECTS))
    params = _trainable(model, "discrete") + _named("scene_head", head)
    modules: dict[str, nn.Module] = {"model": model, "scene_head": head}
    region_loss = None
    if cfg.region_targets > 0:
        region_loss = _RegionTargets(model, seed)
        params += _named("region_head", region_loss.head)
        modules["region_head"] = region_loss.head
    usage = torch.zeros(dc.codebook_size)
    last_z: dict[str, torch.Tensor] = {}
    fam = ("caption", "single")
    warm = max(1, cfg.steps // 4)

    def step_fn(step: int) -> dict[str, float]:
        rng = B.rng_for(seed, "0-vq", step)
        samples = B.samples_for("train", B.train_indices(rng, cfg.batch_size, fam), model.config)
        px = B.pixel_tensor(samples, model.config)
        tg = [B.scene_targets(s) for s in samples]
        pairs = torch.from_numpy(np.concatenate([t[0] for t in tg]))
        counts = torch.from_numpy(np.concatenate([t[1] for t in tg]))
        with torch.no_grad():
            feats = model.vision(px)
        z = model.discrete.encode(feats)
        q = model.discrete.quantize(z)
        pair_logits, count_logits = head(z if step < warm else q.z_q)
        rec = F.binary_cross_entropy_with_logits(pair_logits, pairs) * n_pairs / 4 + F.cross_entropy(count_logits, counts)
        loss = rec + (q.loss if step >= warm else 0.0)
        region_metrics: dict[str, float] = {}
        if region_loss is not None:
            region, region_metrics = region_loss(z if step < warm else q.z_q, samples)
            loss = loss + cfg.region_targets * region
            region_metrics["region_loss"] = float(region.detach())
        loss.backward()
        if step >= warm:
            usage.add_(torch.bincount(q.codes.flatten(), minlength=dc.codebook_size).float())
        last_z["z"] = z.detach().reshape(-1, z.shape[-1])
        exact = ((pair_logits.detach() > 0).float() == pairs).all(-1).float().mean()
        return {"loss": float(loss.detach()), "rec_loss": float(rec.detach()), "vq_loss": float(q.loss.detach()),
                "perplexity": float(q.perplexity), "acc_pairs_exact": float(exact),
                "acc_count": float((count_logits.argmax(-1) == counts).float().mean()), **region_metrics}

    @torch.no_grad()
    def reseed(idx: torch.Tensor, step: int) -> None:
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        z = last_z["z"]
        pick = torch.randint(0, z.shape[0], (len(idx),), generator=gen)
        model.discrete.codebook.weight[idx] = z[pick] + torch.randn(len(idx), z.shape[1], generator=gen) * 0.01

    @torch.no_grad()
    def after_step(step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if step + 1 == warm and "z" in last_z:
            reseed(torch.arange(dc.codebook_size), step)
        elif step >= warm and (step + 1 - warm) % DEAD_CODE_WINDOW == 0:
            dead = (usage == 0).nonzero().flatten()
            out["codebook_usage"] = float((usage > 0).float().mean())
            out["dead_restarts"] = float(len(dead))
            if len(dead) and "z" in last_z:
                reseed(dead, step)
            usage.zero_()
        return out

    def finish() -> dict[str, Any]:
        return _codebook_report(model, seed)

    return Phase("0-vq", cfg, modules, params, step_fn, after_step, {"usage": usage}, finish, seed=seed)


class _RegionTargets:
    """Stage 0-vq's per-region object targets for a "regions" tokenizer: a linear head reads each
    code and predicts the 0-vision dense targets (colour, shape, size, centre; not row/column) of
    every patch of its region (both patches of a 2-patch region get the same prediction)."""

    def __init__(self, model: MavenModel, seed: int):
        regions = model.discrete.regions
        if regions is None:
            raise TrainingError("region_targets needs a tokenizer with discrete.pooling 'regions' (this config's is "
                                f"{model.config.discrete.pooling!r}): set it, or region_targets 0")
        self.grid = model.config.vision.grid_size
        self.patch_size = model.config.vision.patch_size
        self.owner = (regions > 0).float().t()  # [patches, codes]: 1 where a patch is in a code's region
        n_classes = sum(n for _, n in B.dense_targets(self.grid))
        self.head = _seeded(seed + 3, lambda: nn.Linear(model.config.discrete.code_dim, n_classes))

    def __call__(self, z: torch.Tensor, samples: list) -> tuple[torch.Tensor, dict[str, float]]:
        tgt = torch.from_numpy(np.concatenate([B.vision_targets(s, self.patch_size) for s in samples]))
        tgt[..., len(B.TARGETS):] = -1  # no row/column target: a code need not know where it is
        loss, metrics = dense_target_loss(self.owner @ self.head(z), tgt, self.grid)
        return loss, {f"region_{k}": v for k, v in metrics.items() if not k.endswith(("_row", "_col"))}


@torch.no_grad()
def _codebook_report(model: MavenModel, seed: int, n: int = 256) -> dict[str, Any]:
    samples = B.samples_for("val", range(n), model.config)
    px = B.pixel_tensor(samples, model.config)
    codes = model.discrete(model.vision(px)) - model.config.visual_offset
    counts = torch.bincount(codes.flatten(), minlength=model.config.discrete.codebook_size).float()
    p = counts / counts.sum()
    ppl = float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
    return {"val_codebook_usage": float((counts > 0).float().mean()), "val_code_perplexity": ppl,
            "val_images": int(px.shape[0])}


def phase_text(model: MavenModel, cfg: PhaseConfig, seed: int) -> Phase:
    params = _trainable(model, "llm")
    tok = model.tokenizer

    def step_fn(step: int) -> dict[str, float]:
        samples = _samples(model, cfg, seed, "0-text", step)
        seqs = [[t for t in tok.encode_prompt(s.prompt) if t != tok.image_id] + B.answer_ids(tok, s.answer)
                for s in samples]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits, _, _ = model.llm(model.embed_ids(ids), mask)
        labels = ids.masked_fill(mask == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        return {"loss": float(loss.detach())}

    return Phase("0-text", cfg, {"model": model}, params, step_fn, seed=seed)


# ---- stage 1 -------------------------------------------------------------------------------------
def selector_metrics(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, float]:
    """Precision and recall of the top-k patches against the 0/1 labels (micro-averaged)."""
    idx = select_patches(logits, k)
    kept = torch.zeros_like(labels).scatter_(1, idx, 1.0)
    hit = float((kept * labels).sum())
    return hit / max(1.0, float(kept.sum())), hit / max(1.0, float(labels.sum()))


def phase_selector(model: MavenModel, cfg: PhaseConfig, seed: int) -> Phase:
    params = _trainable(model, "selector")
    k = model.config.num_kept_patches()

    def step_fn(step: int) -> dict[str, float]:
        samples = _samples(model, cfg, seed, "1-selector", step)
        px = B.pixel_tensor(samples, model.config)
        labels = torch.from_numpy(np.stack([lab for s in samples for lab in s.patch_labels]))
        with torch.no_grad():
            feats = model.vision(px)
            h_eos = model.compute_h_eos(model.discrete(feats))
        logits = model.selector(feats, h_eos)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        prec, rec = selector_metrics(logits.detach(), labels, k)
        return {"loss": float(loss.detach()), "precision": prec, "recall": rec}

    def finish() -> dict[str, Any]:
        return selector_report(model, n=200)

    return Phase("1-selector", cfg, {"model": model}, params, step_fn, finish=finish, seed=seed)


@torch.no_grad()
def selector_report(model: MavenModel, n: int = 200, split: str = "val", keep_ratio: float | None = None) -> dict:
    """Precision/recall of the kept patches vs the pseudo-label masks of caption samples (all
    objects) of `split`, and the fraction of object-centre patches kept."""
    from maven_edge.model_src.data.splits import iter_samples

    samples = list(iter_samples(split, n, families=["caption"]))
    px = B.pixel_tensor(samples, model.config)
    labels = torch.from_numpy(np.stack([lab for s in samples for lab in s.patch_labels]))
    vf = visual_features(model, px, "hybrid", keep_ratio)
    k = model.config.num_kept_patches(keep_ratio)
    prec, rec = selector_metrics(vf.logits, labels, k)
    centers = torch.from_numpy(
        np.concatenate([B.vision_targets(s, model.config.vision.patch_size)[..., 3] for s in samples])
    ).float()
    kept = torch.zeros_like(labels).scatter_(1, vf.indices, 1.0)
    return {"selector_precision": prec, "selector_recall": rec, "selector_k": k,
            "center_patch_recall": float((kept * centers).sum() / centers.sum()),
            "selector_eval_images": int(px.shape[0]), "selector_eval_split": split}


# ---- stages 2-4 ----------------------------------------------------------------------------------
def reinit_visual_rows(model: MavenModel, seed: int) -> None:
    """`expand_vocab`'s rule applied to the visual-code rows of the unified vocabulary."""
    llm, text = model.llm, model.tokenizer.layout.tokenizer_size
    off = model.config.visual_offset
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = llm.embed_tokens.weight
        n_new = emb.shape[0] - off
        noise = torch.randn(n_new, emb.shape[1], generator=gen) * emb[:text].std(0, keepdim=True) * 0.1
        emb[off:] = emb[:text].mean(0, keepdim=True) + noise
        if not model.config.llm.tie_word_embeddings:
            head = llm.lm_head.weight
            head[off:] = head[:text].mean(0, keepdim=True)


def enable_image_slots(model: MavenModel) -> None:
    """Turn on `config.image_slots` with zero slot vectors, so the model starts out unchanged."""
    ids = model.tokenizer.layout.image_slot_ids(model.config.max_images)
    model.config.image_slots = True
    with torch.no_grad():
        model.llm.embed_tokens.weight[ids] = 0.0


def _worked(samples: list[Sample], extra: list[list[QA]] | None,
            labelled: bool = False) -> tuple[list[Sample], list[list[QA]] | None]:
    """`PhaseConfig.worked_counts`: every count across images, a sample's own question or a
    follow-up, answered as a running tally (attention_targets.worked_count; `labelled`: each term
    after its image's label, `PhaseConfig.labelled_tally`)."""
    out = [dataclasses.replace(s, answer=worked_count(question_line(s), s.scenes, s.answer, labelled))
           for s in samples]
    if extra is not None:
        extra = [[(q, worked_count(q, s.scenes, a, labelled)) for q, a in turns]
                 for s, turns in zip(samples, extra, strict=True)]
    return out, extra


def phase_llm(model: MavenModel, cfg: PhaseConfig, seed: int, name: str, parts: tuple[str, ...],
              grad: tuple[str, ...]) -> Phase:
    if cfg.image_slots:  # before a resume restores the trained rows
        enable_image_slots(model)
    params = _trainable(model, *parts)
    tok = model.tokenizer
    t_img = tokens_per_image(model.config, cfg.mode, patch_subset=cfg.patch_subset) + 2
    sup = AttentionSupervision.for_decoder(model.config.llm, cfg.attention_targets, cfg.count_head)
    colon_id = tok.encode(":")[0]
    plus_id = tok.encode("+")[0]
    patch_offset = model.config.discrete.num_codes if cfg.mode == "hybrid" else 0

    def step_fn(step: int) -> dict[str, float]:
        samples = _samples(model, cfg, seed, name, step)
        extra = None
        if cfg.followups:
            rng = B.rng_for(seed, f"{name}-followups", step)
            extra = [followup_questions(s.scenes, rng, cfg.followups, skip=[question_line(s)],
                                        reverse_change=cfg.reverse_change, video=s.family == "video",
                                        image_counts=cfg.image_count_followups)
                     for s in samples]
        if cfg.worked_counts:
            samples, extra = _worked(samples, extra, cfg.labelled_tally)
        tb = B.text_batch(samples, tok, extra)
        px = B.pixel_tensor(samples, model.config)
        vf = visual_features(model, px, cfg.mode, patch_subset=cfg.patch_subset)
        offsets = np.concatenate([[0], np.cumsum(tb.image_counts)])
        lengths = [len(s) + c * (t_img - 1) for s, c in zip(tb.sequences, tb.image_counts, strict=True)]
        total = att_total = 0.0

        def patches_in(lo: int, hi: int) -> np.ndarray | None:
            """Raster indices of the patches in images lo..hi-1's sequences (None: no patches)."""
            if vf.indices is not None:  # hybrid's selection, or continuous mode's fixed subset
                return vf.indices[lo:hi].numpy()
            if cfg.mode == "continuous":
                return np.tile(np.arange(vf.feats.shape[1]), (hi - lo, 1))
            return None

        for group in B.micro_batches(lengths, cfg.max_tokens_per_micro):
            rows = [r for i in group for r in range(offsets[i], offsets[i + 1])]
            emb = visual_embeds(model, vf, cfg.mode, rows)
            per, j = [], 0
            for i in group:
                per.append(emb[j : j + tb.image_counts[i]])
                j += tb.image_counts[i]
            seqs = [tb.sequences[i] for i in group]
            asm = model.assemble_batch(seqs, per, [tb.targets[i] for i in group])
            with record_attention(model.llm, sup.layers if sup.weight > 0 else (), grad=True) as maps:
                logits, _, _ = model.llm(asm.inputs_embeds, asm.attention_mask)
            turns = ([answer_turns(samples[i], extra[i] if extra else [], tb.targets[i]) for i in group]
                     if sup.weight > 0 or cfg.term_loss_weight != 1.0 else [])
            weights = None
            if cfg.term_loss_weight != 1.0:
                weights = term_weights(seqs, turns, [tb.image_counts[i] for i in group], tok.image_id, t_img,
                                       plus_id, colon_id, asm.labels.shape[1], cfg.term_loss_weight)
            loss_sum, _ = answer_loss(logits, asm.labels, weights)
            loss = loss_sum / len(samples)
            if sup.weight > 0:
                targets = build_targets(
                    sup, seqs, turns,
                    [samples[i].scenes for i in group], [patches_in(offsets[i], offsets[i + 1]) for i in group],
                    tok.image_id, t_img, patch_offset, model.config.vision.patch_size, colon_id,
                    plus_id if cfg.worked_counts else None)
                att = attention_loss(dict(zip(sup.layers, maps, strict=True)), targets)
                if att is not None:
                    loss = loss + sup.weight * att * len(group) / len(samples)
                    att_total += float(att.detach()) * len(group)
            loss.backward()
            total += float(loss_sum.detach())
        out = {"loss": total / len(samples)}
        if sup.weight > 0:
            out["attention_loss"] = att_total / len(samples)
        return out

    return Phase(name, cfg, {"model": model}, params, step_fn, seed=seed)


# ---- driver --------------------------------------------------------------------------------------
def stage_dir(out: Path, stage: str) -> Path:
    return out / f"stage{stage}"


def _load_previous(out: Path, stage: str) -> MavenModel:
    prev = stage_dir(out, str(int(stage) - 1))
    marker = prev / "stage.json"
    if not marker.is_file():
        raise TrainingError(
            f"stage {stage} needs stage {int(stage) - 1}'s output, but {marker} is missing; run "
            f"`maven-edge train --stage {int(stage) - 1} --out {out}` first (or --stage all)"
        )
    try:
        return load_checkpoint(prev)
    except CheckpointError as exc:
        raise TrainingError(f"stage {int(stage) - 1}'s checkpoint in {prev} is unusable: {exc}") from exc


def build_phases(model: MavenModel, stage: str, recipe: dict[str, PhaseConfig], seed: int) -> list:
    """(phase name, factory) for a stage; factories run lazily, right before their phase. Each phase
    gets its config and the run's seed plus its own `seed_offset`."""
    makers = {
        "0-vision": phase_vision,
        "0-vq": phase_vq,
        "0-text": phase_text,
        "1-selector": phase_selector,
        "2-discrete": lambda m, c, s: phase_llm(m, c, s, "2-discrete", ("llm",), ("embed",)),
        "3-projector": lambda m, c, s: phase_llm(m, c, s, "3-projector", ("projector",), ("projector",)),
        "4-instruct": lambda m, c, s: phase_llm(m, c, s, "4-instruct", ("llm", "projector"), ("embed", "projector")),
        "4-count": lambda m, c, s: phase_llm(m, c, s, "4-count", ("llm", "projector"), ("embed", "projector")),
    }
    return [(name, partial(makers[name], model, recipe[name], seed + recipe[name].seed_offset))
            for name in STAGE_PHASES[stage]]


def train(
    preset: str = "tiny",
    stage: str = "all",
    out: str | Path = "artifacts/runs/tiny",
    steps_scale: float = 1.0,
    resume: bool = False,
    seed: int = 0,
    overrides: list[str] | None = None,
    quiet: bool = False,
    final_eval: bool = True,
    max_batch: int | None = None,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Run the requested stages; returns {stage: summary}. Writes `out/stageK/` per stage and, after
    stage 4, `out/final/` (checkpoint, training_log.jsonl, loss.png, eval_report.json,
    test_predictions.jsonl).

    `init`: a trained checkpoint the (single, not 0) requested stage starts from instead of the
    previous stage's output in `out` (e.g. stage 4 continued from the shipped model)."""
    set_threads()
    stages = parse_stages(stage)
    cfg: MavenConfig = get_config(preset, overrides)
    cfg.seed = seed
    recipe = for_model(get_recipe(preset, steps_scale, max_batch), cfg.discrete.pooling)
    if init is not None and (len(stages) != 1 or stages[0] == "0"):
        raise TrainingError("--init starts one stage (1-4) from a checkpoint; pass --stage 1, 2, 3 or 4")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    model: MavenModel | None = None
    for st in stages:
        t0 = time.time()
        sdir = stage_dir(out, st)
        if not resume and sdir.exists():
            shutil.rmtree(sdir)
        if st == "0":
            model = build_model(cfg, seed=seed)
        elif init is not None:
            try:
                model = load_checkpoint(init)
            except CheckpointError as exc:
                raise TrainingError(f"--init {init}: {exc}") from exc
        elif model is None or not (stage_dir(out, str(int(st) - 1)) / "stage.json").is_file():
            model = _load_previous(out, st)
        if st == "2" and not (resume and (sdir / "2-discrete" / "resume" / "progress.json").is_file()):
            reinit_visual_rows(model, seed)
        model.train()
        summaries = []
        for name, make in build_phases(model, st, recipe, seed):
            phase = make()
            summaries.append(run_phase(phase, sdir / name, resume, quiet))
        _freeze_all(model)
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        save_checkpoint(model, sdir)
        records = [r for name, _ in build_phases(model, st, recipe, seed) for r in read_jsonl(sdir / name / "log.jsonl")]
        (sdir / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        plot_losses(records, sdir / "loss.png", f"stage {st}")
        summary = {"stage": st, "preset": preset, "seed": seed, "steps_scale": steps_scale,
                   "phases": summaries, "wall_time_s": round(time.time() - t0, 1),
                   "init": None if init is None else str(init),
                   "recipe": {n: asdict(recipe[n]) for n in STAGE_PHASES[st]}}
        (sdir / "stage.json").write_text(json.dumps(summary, indent=2) + "\n")
        results[st] = summary
    if "4" in stages and model is not None:
        results["final"] = write_final(model, out, final_eval, quiet)
    return results


def write_final(model: MavenModel, out: Path, final_eval: bool, quiet: bool) -> dict[str, Any]:
    final = out / "final"
    save_checkpoint(model, final)
    records = []
    for st in ("0", "1", "2", "3", "4"):
        records += read_jsonl(stage_dir(out, st) / "training_log.jsonl")
    (final / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_losses(records, final / "loss.png", "MaVEn tiny recipe")
    stages = {}
    for st in ("0", "1", "2", "3", "4"):
        p = stage_dir(out, st) / "stage.json"
        if p.is_file():
            stages[st] = json.loads(p.read_text())
    (final / "recipe_summary.json").write_text(json.dumps(stages, indent=2) + "\n")
    report: dict[str, Any] = {"checkpoint": str(final)}
    if final_eval:
        report = evaluate(model, split="test", mode="hybrid", quiet=quiet, return_predictions=True)
        write_predictions(final / TEST_PREDICTIONS, report.pop("predictions"))
        report.update(selector_report(model, n=200, split="test"))
        (final / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
