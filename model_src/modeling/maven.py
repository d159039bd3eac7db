"""MavenModel: multi-granularity hybrid visual encoding around a Llama-style decoder.

Per image (docs/design.md §3):

    pixel_values -> vision -> patch_features [N, Dv]
                 -> discrete tokenizer -> codes [32] (unified-vocab ids)
    LLM([codes, <eos_vis>]) -> h_eos (last-layer hidden state at <eos_vis>)
    selector(patch_features, h_eos) -> top-k patches in raster order -> projector
    visual sequence = <img_start> embed(codes) projected_patches <img_end>

With `config.image_slots`, the k-th image's visual sequence in a prompt also gets image slot k's
learned vector added to every token (which image a token came from, without extra tokens).

Modes: `hybrid` (codes + kept patches), `discrete` (codes only), `continuous` (all N patches,
LLaVA-1.5 style). Each `<image>` in the prompt is replaced by one image's visual sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from maven_edge.core.budget import select_under_budget
from maven_edge.core.config import VISUAL_MODES, MavenConfig, check_mode
from maven_edge.core.errors import ImageError, InputError, PromptError
from maven_edge.core.prompt import PromptPlan, check_context, plan_prompt, splice
from maven_edge.core.sampling import GenerationConfig, Sampler, StopChecker
from maven_edge.core.tokenizer import TextTokenizer
from maven_edge.model_src.modeling.decoder import LlamaDecoder
from maven_edge.model_src.modeling.discrete import DiscreteTokenizer
from maven_edge.model_src.modeling.selector import PatchSelector, Projector, gather_patches, select_patches
from maven_edge.model_src.modeling.vision import VisionEncoder


@dataclass
class VisualEncoding:
    """Everything the visual side produced for a batch of images. With a visual-token budget the
    images keep different numbers of patches: `embeds` and `selected_indices` are then lists with
    one [T_i, D] / [k_i] tensor per image."""

    embeds: torch.Tensor | list[torch.Tensor]  # [n, T_img, D]: <img_start> ... <img_end> per image
    codes: torch.Tensor  # [n, Q] unified-vocab ids
    patch_features: torch.Tensor  # [n, N, Dv]
    h_eos: torch.Tensor | None  # [n, D] (hybrid only)
    selector_logits: torch.Tensor | None  # [n, N] (hybrid only)
    selected_indices: torch.Tensor | list[torch.Tensor] | None  # [n, k] raster order (hybrid only)

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens per image, excluding <img_start>/<img_end> (with a budget: the most)."""
        return max(self.image_tokens, default=0)

    @property
    def image_tokens(self) -> list[int]:
        """Visual tokens of each image, excluding <img_start>/<img_end>."""
        return [int(e.shape[0]) - 2 for e in self.embeds]


@dataclass
class Assembled:
    inputs_embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    labels: torch.Tensor  # [B, T] target id at answer positions, -100 elsewhere


class MavenModel(nn.Module):
    def __init__(self, cfg: MavenConfig, tokenizer: TextTokenizer):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tokenizer = tokenizer
        if tokenizer.layout.text_vocab_size != cfg.llm.text_vocab_size:
            raise PromptError("tokenizer layout and config disagree on the text vocabulary size")
        dv, d = cfg.vision.hidden_size, cfg.llm.hidden_size
        self.vision = VisionEncoder(cfg.vision)
        self.discrete = DiscreteTokenizer(cfg.discrete, dv, cfg.visual_offset, cfg.vision.grid_size)
        self.llm = LlamaDecoder(cfg.llm, cfg.vocab_size)
        self.selector = PatchSelector(cfg.selector, dv, d)
        self.projector = Projector(dv, d, cfg.projector.output_scale)
        if cfg.image_slots:
            tokenizer.layout.image_slot_ids(cfg.max_images)  # ConfigError if the vocabulary has no room

    # ---- visual side ---------------------------------------------------------------------
    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        v = self.config.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ImageError(
                f"pixel_values must have shape [images, {want[0]}, {want[1]}, {want[2]}], got {got}; "
                "preprocess images with maven_edge.core.preprocess.preprocess_images"
            )
        if pixel_values.shape[0] > self.config.max_images:
            raise ImageError(
                f"{pixel_values.shape[0]} images exceed the limit of {self.config.max_images} per request"
            )

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.embed_tokens(ids)

    def compute_h_eos(self, codes: torch.Tensor) -> torch.Tensor:
        """The LLM reads [codes, <eos_vis>] per image; h_eos is its last hidden state at <eos_vis>."""
        eos = torch.full_like(codes[:, :1], self.tokenizer.eos_vis_id)
        ids = torch.cat([codes, eos], dim=1)
        _, hidden, _ = self.llm(self.embed_ids(ids), torch.ones_like(ids))
        return hidden[:, -1]

    def encode_images(
        self, pixel_values: torch.Tensor, mode: str | None = None, keep_ratio: float | None = None,
        visual_token_budget: int | None = None, min_patches: int = 1,
    ) -> VisualEncoding:
        """The visual sequences of one request's images. With `visual_token_budget` (hybrid only) the
        selector's scores of all the images are ranked together and the best patches kept so codes
        plus patches fit the budget, at least `min_patches` per image (core/budget.py); `keep_ratio`
        is then unused."""
        mode = check_mode(mode or self.config.mode)
        self.check_pixel_values(pixel_values)
        if visual_token_budget is not None:
            return self._encode_with_budget(pixel_values, mode, visual_token_budget, min_patches)
        n = pixel_values.shape[0]
        patch_features = self.vision(pixel_values)
        codes = self.discrete(patch_features)
        h_eos = logits = indices = None
        spec = VISUAL_MODES.get(mode)
        parts = [self.embed_ids(torch.full((n, 1), self.tokenizer.img_start_id, dtype=torch.long))]
        if spec.codes:
            parts.append(self.embed_ids(codes))
        if spec.patches == "selected":
            h_eos = self.compute_h_eos(codes)
            logits = self.selector(patch_features, h_eos)
            indices = select_patches(logits, self.config.num_kept_patches(keep_ratio))
            parts.append(self.projector(gather_patches(patch_features, indices)))
        elif spec.patches == "all":
            parts.append(self.projector(patch_features))
        parts.append(self.embed_ids(torch.full((n, 1), self.tokenizer.img_end_id, dtype=torch.long)))
        return VisualEncoding(torch.cat(parts, dim=1), codes, patch_features, h_eos, logits, indices)

    def _encode_with_budget(
        self, pixel_values: torch.Tensor, mode: str, budget: int, min_patches: int
    ) -> VisualEncoding:
        if VISUAL_MODES.get(mode).patches != "selected":
            raise InputError(f"a visual-token budget selects patches, which only hybrid mode does (got {mode!r})")
        patch_features = self.vision(pixel_values)
        codes = self.discrete(patch_features)
        h_eos = self.compute_h_eos(codes)
        logits = self.selector(patch_features, h_eos)
        kept = select_under_budget(logits.float().numpy(), budget, codes.shape[1], min_patches)
        indices = [torch.from_numpy(k) for k in kept]
        start = self.embed_ids(torch.tensor([self.tokenizer.img_start_id]))
        end = self.embed_ids(torch.tensor([self.tokenizer.img_end_id]))
        embeds = [torch.cat([start, self.embed_ids(codes[i]), self.projector(patch_features[i, idx]), end])
                  for i, idx in enumerate(indices)]
        return VisualEncoding(embeds, codes, patch_features, h_eos, logits, indices)

    # ---- prompt assembly -------------------------------------------------------------------
    def image_slot_embeds(self, n: int) -> torch.Tensor | None:
        """[n, D]: the vectors added to the 1st..n-th image's visual tokens (None without image slots)."""
        if not self.config.image_slots:
            return None
        if n > self.config.max_images:
            raise ImageError(f"{n} images exceed the limit of {self.config.max_images} per request")
        return self.embed_ids(torch.tensor(self.tokenizer.layout.image_slot_ids(n), dtype=torch.long))

    def plan_prompt(self, prompt_ids: list[int], num_images: int, tokens_per_image: int | list[int]) -> PromptPlan:
        """Where the images go in `prompt_ids` (PromptError when the placeholders do not match)."""
        return plan_prompt(prompt_ids, self.tokenizer.image_id, num_images, tokens_per_image)

    def assemble_batch(
        self,
        sequences: list[list[int]],
        visual: list[torch.Tensor] | list[list[torch.Tensor]],
        targets: list[list[bool]] | None = None,
        pad_left: bool = False,
    ) -> Assembled:
        """Splice each sample's visual embeddings [n_i, T_img, D] (or a list of [T_ij, D], one per
        image, when a visual-token budget gave the images different lengths) into its token ids at
        <image> (plus the image-slot vectors, with `config.image_slots`).

        `targets[b][i]` says whether token `sequences[b][i]` is a training target (its label is the
        token id); every other position, visual tokens included, is labelled -100. Without
        `targets` nothing is labelled.
        """
        rows, label_rows = [], []
        for b, ids in enumerate(sequences):
            per_image = list(visual[b])
            plan = self.plan_prompt(ids, len(per_image), [int(v.shape[0]) - 2 for v in per_image])
            is_target = torch.tensor(targets[b] if targets is not None else [False] * len(ids), dtype=torch.bool)
            if is_target.shape[0] != len(ids):
                raise ValueError(f"targets[{b}] has {is_target.shape[0]} flags for {len(ids)} token ids")
            ids_t = torch.tensor(ids, dtype=torch.long)
            slots = self.image_slot_embeds(len(per_image))
            images = per_image if slots is None else [v + slots[k] for k, v in enumerate(per_image)]
            rows.append(splice(plan, self.embed_ids(ids_t), images, torch.cat))
            text_labels = torch.where(is_target, ids_t, -100)
            no_labels = [torch.full((v.shape[0],), -100, dtype=torch.long) for v in per_image]
            label_rows.append(splice(plan, text_labels, no_labels, torch.cat))
        width = max(r.shape[0] for r in rows)
        d = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), width, d)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for b, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
            sl = slice(width - r.shape[0], width) if pad_left else slice(0, r.shape[0])
            embeds[b, sl], mask[b, sl], labels[b, sl] = r, 1, lab
        return Assembled(embeds, mask, labels)

    # ---- reference generation ------------------------------------------------------------
    @torch.no_grad()
    def stream_tokens(
        self,
        pixel_values: torch.Tensor,
        prompt: str | list[int],
        gen: GenerationConfig | None = None,
        mode: str | None = None,
        keep_ratio: float | None = None,
        visual_token_budget: int | None = None,
        min_patches: int = 1,
    ) -> Iterator[int]:
        """Yield generated token ids one by one (greedy or sampled), using the KV cache. With a
        `visual_token_budget` the patches are ranked across the images (`encode_images`)."""
        gen = (gen or GenerationConfig()).validate()
        self.check_pixel_values(pixel_values)
        ids = self.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        mode = check_mode(mode or self.config.mode)
        n = pixel_values.shape[0]
        if visual_token_budget is not None and n:
            cfg = self.config
            # validates the budget (InputError) before the encoders run
            select_under_budget(np.zeros((n, cfg.num_patches), np.float32), visual_token_budget,
                                cfg.discrete.num_codes, min_patches)
            total = min(visual_token_budget, n * (cfg.discrete.num_codes + cfg.num_patches))
            per = [total // n + (1 if k < total % n else 0) for k in range(n)]  # same total as the real split
        else:
            per = self.config.visual_tokens_per_image(mode, keep_ratio)
        plan = self.plan_prompt(ids, n, per)
        check_context(plan, gen.max_new_tokens, self.config.llm.max_position_embeddings)
        visual = self.encode_images(pixel_values, mode, keep_ratio, visual_token_budget, min_patches) if n else None
        vis = [visual.embeds if visual is not None else torch.zeros(0, 0, self.config.llm.hidden_size)]
        batch = self.assemble_batch([ids], vis)
        mask = batch.attention_mask
        logits, _, past = self.llm(batch.inputs_embeds, mask)
        sampler = Sampler(gen, self.tokenizer.layout.tokenizer_size)
        stop = StopChecker(gen, self.tokenizer.eos_id)
        for step in range(gen.max_new_tokens):
            token = sampler(logits[0, -1].float().numpy())
            if stop.is_stop_token(token):
                return
            yield token
            if step == gen.max_new_tokens - 1:
                return
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            logits, _, past = self.llm(self.embed_ids(torch.tensor([[token]])), mask, None, past)

    def generate(
        self,
        pixel_values: torch.Tensor,
        prompt: str | list[int],
        gen: GenerationConfig | None = None,
        mode: str | None = None,
        keep_ratio: float | None = None,
        on_token: Callable[[int], None] | None = None,
        visual_token_budget: int | None = None,
        min_patches: int = 1,
    ) -> tuple[list[int], str]:
        """(generated token ids, decoded text) with stop strings applied."""
        gen = (gen or GenerationConfig()).validate()
        stop = StopChecker(gen, self.tokenizer.eos_id)
        out: list[int] = []
        for token in self.stream_tokens(pixel_values, prompt, gen, mode, keep_ratio, visual_token_budget, min_patches):
            out.append(token)
            if on_token is not None:
                on_token(token)
            if stop.stop_strings:
                _, hit = stop.trim(self.tokenizer.decode(out))
                if hit:
                    break
        text, _ = stop.trim(self.tokenizer.decode(out))
        return out, text
