"""Model-side helpers shared by training and evaluation.

`encode_visual` is `MavenModel.encode_images` for any number of images (training batches hold
far more than `config.max_images`); its output equals `encode_images` (checked by the tests).
Training runs the gradient-free part (`visual_features`: ViT, codes, h_eos, selection) once for
all images of a batch and the differentiable part (`visual_embeds`) per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maven_edge.core.config import MavenConfig, check_mode
from maven_edge.model_src.modeling.maven import MavenModel, VisualEncoding
from maven_edge.model_src.modeling.selector import gather_patches, select_patches


@dataclass
class VisualFeatures:
    """The gradient-free part of the visual side for a batch of images."""

    feats: torch.Tensor  # [n, N, Dv]
    codes: torch.Tensor  # [n, Q] unified-vocab ids
    h_eos: torch.Tensor | None
    logits: torch.Tensor | None
    indices: torch.Tensor | None


@torch.no_grad()
def visual_features(
    model: MavenModel, pixel_values: torch.Tensor, mode: str, keep_ratio: float | None = None,
    patch_subset: int = 0,
) -> VisualFeatures:
    """Vision encoder, discrete codes and (hybrid) selection for all images in one batch.
    `patch_subset` > 0 (continuous mode only; the ablation's equal-token row): every image keeps the
    same :func:`grid_patches` subset of that many patches instead of all of them."""
    mode = check_mode(mode)
    feats = model.vision(pixel_values)
    codes = model.discrete(feats)
    h_eos = logits = indices = None
    if mode == "hybrid":
        h_eos = model.compute_h_eos(codes)
        logits = model.selector(feats, h_eos)
        indices = select_patches(logits, model.config.num_kept_patches(keep_ratio))
    elif patch_subset:
        if mode != "continuous":
            raise ValueError(f"a fixed patch subset is a continuous-mode variant, not {mode!r}")
        indices = grid_patches(feats.shape[1], patch_subset).expand(feats.shape[0], -1)
    return VisualFeatures(feats, codes, h_eos, logits, indices)


def tokens_per_image(config: MavenConfig, mode: str, keep_ratio: float | None = None, patch_subset: int = 0) -> int:
    """Visual tokens per image between the two markers: the mode's, or the fixed patch subset's."""
    return patch_subset or config.visual_tokens_per_image(mode, keep_ratio)


def grid_patches(num_patches: int, n: int) -> torch.Tensor:
    """`n` raster indices spread evenly over an image's `num_patches` patches (first and last
    included): a fixed, content-blind subset, the same for every image."""
    if not 1 <= n <= num_patches:
        raise ValueError(f"a patch subset needs 1..{num_patches} patches, got {n}")
    return torch.linspace(0, num_patches - 1, n, dtype=torch.float64).round().long()


def visual_embeds(model: MavenModel, vf: VisualFeatures, mode: str, rows: Sequence[int] | None = None) -> torch.Tensor:
    """[n, T_img, D] visual sequences (<img_start> codes patches <img_end>) for images `rows`
    (all if None); gradients flow into the embeddings and the projector."""
    tok = model.tokenizer
    sel = slice(None) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    feats, codes = vf.feats[sel], vf.codes[sel]
    n = feats.shape[0]
    parts = [model.embed_ids(torch.full((n, 1), tok.img_start_id, dtype=torch.long))]
    if mode in ("hybrid", "discrete"):
        parts.append(model.embed_ids(codes))
    if mode == "hybrid":
        parts.append(model.projector(gather_patches(feats, vf.indices[sel])))
    elif mode == "continuous":
        parts.append(model.projector(feats if vf.indices is None else gather_patches(feats, vf.indices[sel])))
    parts.append(model.embed_ids(torch.full((n, 1), tok.img_end_id, dtype=torch.long)))
    return torch.cat(parts, dim=1)


def budget_indices(
    vf: VisualFeatures, counts: Sequence[int], budget: int, min_patches: int = 1
) -> list[torch.Tensor]:
    """Per image (all samples in order), the raster indices of the patches kept when each sample's
    images share `budget` visual tokens (`core.budget.select_under_budget` on that sample's
    selector scores; `counts`: images per sample)."""
    from maven_edge.core.budget import select_under_budget

    if vf.logits is None:
        raise ValueError("a visual-token budget needs hybrid mode (selector scores)")
    out, j = [], 0
    for c in counts:
        kept = select_under_budget(vf.logits[j : j + c].float().numpy(), budget, vf.codes.shape[1], min_patches)
        out += [torch.from_numpy(k) for k in kept]
        j += c
    return out


def embeds_for_indices(model: MavenModel, vf: VisualFeatures, indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One [T_i, D] visual sequence (<img_start> codes kept-patches <img_end>) per image, image i
    keeping the patches `indices[i]` (a visual-token budget keeps different numbers per image)."""
    tok = model.tokenizer
    start = model.embed_ids(torch.tensor([tok.img_start_id]))
    end = model.embed_ids(torch.tensor([tok.img_end_id]))
    return [torch.cat([start, model.embed_ids(vf.codes[i]), model.projector(vf.feats[i, idx]), end])
            for i, idx in enumerate(indices)]


def encode_visual(
    model: MavenModel, pixel_values: torch.Tensor, mode: str, keep_ratio: float | None = None
) -> VisualEncoding:
    """`MavenModel.encode_images` without the per-request image limit."""
    vf = visual_features(model, pixel_values, mode, keep_ratio)
    embeds = visual_embeds(model, vf, mode)
    return VisualEncoding(embeds, vf.codes, vf.feats, vf.h_eos, vf.logits, vf.indices)


def set_threads() -> int:
    """Intra-op threads for training/eval: MAVEN_TRAIN_THREADS, default 1. On the shared 2-core
    machine two OpenMP threads were 7-15x slower than one whenever other processes used the
    cores (spinning workers wait for a descheduled peer); one thread is never that slow."""
    import os

    n = int(os.environ.get("MAVEN_TRAIN_THREADS", "1"))
    torch.set_num_threads(n)
    return n


def split_per_sample(embeds: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    out, i = [], 0
    for c in counts:
        out.append(embeds[i : i + c])
        i += c
    return out


def answer_loss(logits: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Sum over samples of each sample's mean next-token loss on its labelled tokens, and the
    number of samples with labels (callers divide by the batch size). ``weights`` (the shape of
    ``labels``, >= 0): a weighted mean instead, each labelled token counting its weight (None: 1)."""
    lg = logits[:, :-1].float()
    tg = labels[:, 1:]
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100, reduction="none")
    tok = tok.view(tg.shape)
    valid = (tg != -100).float()
    if weights is not None:
        valid = valid * weights[:, 1:].to(valid.dtype)
    per = (tok * valid).sum(1) / valid.sum(1).clamp(min=1)
    has = valid.sum(1) > 0
    return per[has].sum(), int(has.sum())
