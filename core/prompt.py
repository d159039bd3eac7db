"""Prompt assembly: where each image's visual sequence goes, and whether the request fits.

The one implementation of the splice and of the context-length check, shared by the torch
reference (:class:`maven_edge.model_src.modeling.maven.MavenModel`), the runtime pipeline and
the export-time ONNX reference loop. torch-free and array-library agnostic: :func:`splice` works
on numpy arrays and torch tensors alike (it only slices and concatenates).

A prompt's token ids hold one ``<image>`` placeholder per image. Each placeholder is replaced
by that image's visual sequence ``<img_start> ... <img_end>`` (``tokens_per_image`` visual
tokens between the markers), so the assembled prompt has
``len(prompt_ids) - n + n * (tokens_per_image + 2)`` positions::

    ids:       [t0 t1 <image> t3 <image> t5]
    segments:  (0, 2, image 0) (3, 4, image 1) (5, 6, None)
    assembled: t0 t1 | <img_start> v.. <img_end> | t3 | <img_start> v.. <img_end> | t5
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from maven_edge.core.errors import PromptError
from maven_edge.core.tokenizer import IMAGE_TOKEN

#: The prompt layout the shipped models are trained on (every training sample is built with
#: :func:`make_prompt`). Written into the manifest (``host.prompt``) so hosts in other languages
#: build the same prompts. ``{k}`` counts images from 1; ``{text}`` is the question line
#: ("Question: ..." or an instruction such as "Describe the image.").
PROMPT_TEMPLATE: dict[str, str] = {
    "single_image": IMAGE_TOKEN,
    "image_line": "Image {k}: " + IMAGE_TOKEN,
    "image_line_join": "\n",
    "frame_line": "Frame {k}: " + IMAGE_TOKEN,  # video frames, one line each (a single frame too)
    "prompt": "{images}\n{text}\nAnswer:",
}


def image_block(num_images: int) -> str:
    """The image part of a prompt: ``<image>`` for one image, else one ``Image k: <image>`` line per image."""
    if num_images == 1:
        return PROMPT_TEMPLATE["single_image"]
    return PROMPT_TEMPLATE["image_line_join"].join(
        PROMPT_TEMPLATE["image_line"].format(k=k + 1) for k in range(num_images))


def frame_block(num_frames: int) -> str:
    """The frames of a video prompt: one ``Frame k: <image>`` line per frame (k from 1)."""
    return PROMPT_TEMPLATE["image_line_join"].join(
        PROMPT_TEMPLATE["frame_line"].format(k=k + 1) for k in range(num_frames))


def make_prompt(num_images: int, text: str, video: bool = False) -> str:
    """The image block (:func:`image_block`, or :func:`frame_block` for a video's frames), then
    `text` and the answer cue on their own lines."""
    block = frame_block(num_images) if video else image_block(num_images)
    return PROMPT_TEMPLATE["prompt"].format(images=block, text=text)


@dataclass(frozen=True)
class PromptPlan:
    """Where the images go in one prompt (see the module docstring)."""

    num_text_ids: int  # len(prompt_ids), placeholders included
    image_positions: tuple[int, ...]  # index in prompt_ids of each <image>, in order
    tokens_per_image: int  # visual tokens per image, excluding <img_start> / <img_end> (image_tokens: the most)
    # per image, when images differ (a visual-token budget, core/budget.py); None: tokens_per_image each
    image_tokens: tuple[int, ...] | None = None

    @property
    def num_images(self) -> int:
        return len(self.image_positions)

    def tokens_of(self, image: int) -> int:
        """Visual tokens of image number ``image`` (from 0), markers excluded."""
        return self.tokens_per_image if self.image_tokens is None else self.image_tokens[image]

    @property
    def visual_tokens(self) -> int:
        """Positions the images take, their markers included."""
        if self.image_tokens is None:
            return self.num_images * (self.tokens_per_image + 2)
        return sum(t + 2 for t in self.image_tokens)

    @property
    def total_tokens(self) -> int:
        """Positions of the assembled prompt."""
        return self.num_text_ids - self.num_images + self.visual_tokens

    def segments(self) -> Iterator[tuple[int, int, int | None]]:
        """(start, end, image): the text ids ``[start:end)``, then image number `image` (None at the end)."""
        prev = 0
        for k, pos in enumerate(self.image_positions):
            yield prev, pos, k
            prev = pos + 1
        yield prev, self.num_text_ids, None


def plan_prompt(
    prompt_ids: Sequence[int], image_id: int, num_images: int, tokens_per_image: int | Sequence[int]
) -> PromptPlan:
    """The plan for `prompt_ids`; a PromptError when its placeholders do not match `num_images`.
    `tokens_per_image`: one count for every image, or one per image (a visual-token budget keeps
    different numbers of patches per image)."""
    positions = tuple(i for i, t in enumerate(prompt_ids) if t == image_id)
    if len(positions) != num_images:
        raise PromptError(
            f"the prompt has {len(positions)} <image> placeholder(s) but {num_images} image(s) were given; "
            "put exactly one <image> in the prompt for each image, in order"
        )
    if isinstance(tokens_per_image, Sequence):
        per = tuple(int(t) for t in tokens_per_image)
        if len(per) != num_images:
            raise PromptError(f"{len(per)} visual-token counts for {num_images} image(s)")
        return PromptPlan(len(prompt_ids), positions, max(per, default=0), per)
    return PromptPlan(len(prompt_ids), positions, int(tokens_per_image))


def check_context(plan: PromptPlan, max_new_tokens: int, limit: int) -> None:
    """PromptError unless the assembled prompt plus `max_new_tokens` fits in `limit` positions."""
    need = plan.total_tokens + max_new_tokens
    if need > limit:
        n = plan.num_images
        visual = (f"{n} image(s) x {plan.tokens_per_image + 2} visual" if plan.image_tokens is None
                  else f"{n} image(s), {plan.visual_tokens} visual")
        raise PromptError(
            f"the request needs {plan.total_tokens} prompt tokens ({plan.num_text_ids - n} text, {visual}) + "
            f"{max_new_tokens} new tokens = {need}, over the context limit of {limit}; use fewer images, a "
            "shorter prompt, a smaller keep_ratio or visual-token budget, or fewer new tokens"
        )


def splice(plan: PromptPlan, text: Any, visual: Any, concat: Callable[[list[Any]], Any]) -> Any:
    """The assembled prompt: `text` rows [len(prompt_ids), D] with row ``image_positions[k]`` replaced
    by `visual[k]` [plan.tokens_of(k) + 2, D] (an array [n, T, D] or a list of per-image arrays);
    `concat` joins the pieces (``np.concatenate``, ``torch.cat``)."""
    pieces = []
    for start, end, image in plan.segments():
        pieces.append(text[start:end])
        if image is not None:
            pieces.append(visual[image])
    return concat(pieces)
