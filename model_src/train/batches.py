"""From shapes-world samples to training tensors (token ids, pixel values, dense targets).

Every batch is a pure function of (seed, phase, step): indices are drawn with
``np.random.default_rng([seed, phase_id, step])`` from the train split (1M samples, each
generated on the fly from its index), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from maven_edge.core.config import MavenConfig
from maven_edge.core.preprocess import preprocess_images
from maven_edge.core.tokenizer import TextTokenizer
from maven_edge.model_src.data import ALL_PAIRS, COLORS, SHAPES, SIZES, Sample, get_sample
from maven_edge.model_src.data.followups import QA
from maven_edge.model_src.data.labels import patch_pixel_counts
from maven_edge.model_src.data.splits import DEFAULT_DATA, num_samples
from maven_edge.model_src.data.tasks import TASK_FAMILY

COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}  # 0 = no object
SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
SIZE_IDS = {s: i + 1 for i, s in enumerate(SIZES)}
# Dense per-patch object targets: (name, number of classes). `dense_targets` adds the patch's row
# and column (grid-size classes each), so the features say where they are after selection.
TARGETS = (("color", len(COLORS) + 1), ("shape", len(SHAPES) + 1), ("size", len(SIZES) + 1), ("center", 2))
PAIR_IDS = {p: i for i, p in enumerate(ALL_PAIRS)}
MAX_OBJECTS = 8  # count classes of the scene-summary target: 0 .. MAX_OBJECTS - 1


def dense_targets(grid: int) -> tuple[tuple[str, int], ...]:
    """TARGETS plus ("row", grid) and ("col", grid): the columns of `vision_targets`."""
    return TARGETS + (("row", grid), ("col", grid))


def split_dense_logits(logits: torch.Tensor, grid: int) -> dict[str, torch.Tensor]:
    """The 0-vision head's logits (last dim: every `dense_targets(grid)` class) by target name."""
    spec = dense_targets(grid)
    return dict(zip([name for name, _ in spec], torch.split(logits, [n for _, n in spec], dim=-1), strict=True))


def rng_for(seed: int, phase: str, step: int) -> np.random.Generator:
    phase_id = sum((i + 1) * ord(ch) for i, ch in enumerate(phase))
    return np.random.default_rng([seed, phase_id, step])


def train_indices(
    rng: np.random.Generator, n: int, families: Sequence[str] = (), task_weights: Sequence[tuple[str, float]] = ()
) -> list[int]:
    """n random train-split indices whose task is in `families` (all families if empty), the task
    drawn uniformly or, with `task_weights` ((task, weight) pairs, others 1), with those weights."""
    schedule = DEFAULT_DATA.schedule
    slots = [i for i, t in enumerate(schedule) if not families or TASK_FAMILY[t] in families]
    blocks = num_samples("train") // len(schedule)
    b = rng.integers(0, blocks, size=n)
    if task_weights:
        w = dict(task_weights)
        p = np.array([w.get(schedule[i], 1.0) for i in slots], dtype=np.float64)
        s = rng.choice(len(slots), size=n, p=p / p.sum())
    else:
        s = rng.integers(0, len(slots), size=n)
    return [int(bi) * len(schedule) + slots[int(si)] for bi, si in zip(b, s, strict=True)]


def samples_for(split: str, indices: Sequence[int], cfg: MavenConfig) -> list[Sample]:
    return [get_sample(split, i, cfg.vision.image_size, cfg.vision.patch_size) for i in indices]


def pixel_tensor(samples: Sequence[Sample], cfg: MavenConfig) -> torch.Tensor:
    """All images of all samples, in order, as one [n_images, 3, H, W] tensor."""
    images = [im for s in samples for im in s.images]
    if not images:
        return torch.zeros(0, 3, cfg.vision.image_size, cfg.vision.image_size)
    return torch.from_numpy(preprocess_images(images, cfg.preprocess))


def vision_targets(sample: Sample, patch_size: int) -> np.ndarray:
    """int64 [n_images, N, 6]: per patch the colour, shape, size of the object covering most of
    it (0 = background), whether the object's centre lies in it, and the patch's row and column."""
    out = []
    for scene in sample.scenes:
        size = scene.image_size
        g = size // patch_size
        best = np.zeros((g * g,), dtype=np.int64) - 1
        best_px = np.zeros((g * g,), dtype=np.int64)
        tgt = np.zeros((g * g, 6), dtype=np.int64)
        tgt[:, 4], tgt[:, 5] = np.divmod(np.arange(g * g), g)
        for k, obj in enumerate(scene.objects):
            px = patch_pixel_counts(obj.mask, patch_size)
            take = px > best_px
            best[take], best_px[take] = k, px[take]
        for p in range(g * g):
            if best[p] >= 0:
                o = scene.objects[best[p]]
                tgt[p, :3] = COLOR_IDS[o.color], SHAPE_IDS[o.shape], SIZE_IDS[o.size]
        for obj in scene.objects:
            cx, cy = obj.center
            p = min(g - 1, int(cy // patch_size)) * g + min(g - 1, int(cx // patch_size))
            tgt[p, 3] = 1
        out.append(tgt)
    return np.stack(out)


def gray_images(rng: np.random.Generator, n: int, share: float) -> np.ndarray:
    """bool [n]: which of n single-image samples to show in grey scale (none when share is 0,
    without drawing from rng, so a run without grey images is unchanged)."""
    if share <= 0:
        return np.zeros(n, dtype=bool)
    return rng.random(n) < share


RANDOM_GRAY_RANGE = (0, 190)  # object grey levels of gray_levels="random" (backgrounds are ~240)


def in_gray(sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    """The sample with its images converted to grey scale (kept as 3-channel RGB).

    Without ``rng`` each pixel keeps its luminance, so an object's grey level still tells its
    colour (red, blue and purple are all ~92-99, yellow ~190). With ``rng`` every object is
    repainted on its mask with its own random grey level from ``RANDOM_GRAY_RANGE``, so nothing
    in a grey image says which colour an object had: its shape has to be read from its outline.
    """
    images = []
    for im, scene in zip(sample.images, sample.scenes, strict=True):
        gray = np.array(im.convert("L"))
        if rng is not None:
            for obj in scene.objects:
                gray[obj.mask] = rng.integers(RANDOM_GRAY_RANGE[0], RANDOM_GRAY_RANGE[1] + 1)
        images.append(Image.fromarray(gray, "L").convert("RGB"))
    return replace(sample, images=images)


def scene_targets(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Per image the scene summary the discrete codes must carry: float32 [n_images, 30] multi-hot
    of the (colour, shape) pairs present, and int64 [n_images] object count (capped)."""
    pairs = np.zeros((len(sample.scenes), len(ALL_PAIRS)), dtype=np.float32)
    counts = np.zeros((len(sample.scenes),), dtype=np.int64)
    for i, scene in enumerate(sample.scenes):
        for obj in scene.objects:
            pairs[i, PAIR_IDS[(obj.color, obj.shape)]] = 1.0
        counts[i] = min(len(scene.objects), MAX_OBJECTS - 1)
    return pairs, counts


def answer_ids(tokenizer: TextTokenizer, answer: str) -> list[int]:
    """The answer as the model should generate it after the prompt: " answer" then <eos>."""
    return tokenizer.encode(" " + answer) + [tokenizer.eos_id]


@dataclass
class TextBatch:
    """Token sequences with, per token, whether it is a training target (answer tokens and the
    `<eos>` after each answer; the prompt, questions and image placeholders are not)."""

    sequences: list[list[int]]
    targets: list[list[bool]]
    image_counts: list[int]


def text_batch(
    samples: Sequence[Sample], tokenizer: TextTokenizer, followups: Sequence[Sequence[QA]] | None = None
) -> TextBatch:
    """One sequence per sample: its prompt and answer, then each follow-up turn as
    ``"\n" + question line + "\nAnswer:"`` and its answer (multi-turn, as in LLaVA's data)."""
    seqs, targets = [], []
    for k, s in enumerate(samples):
        ids = tokenizer.encode_prompt(s.prompt)
        tgt = [False] * len(ids)
        turns = [(None, s.answer)] + list(followups[k] if followups is not None else ())
        for question, answer in turns:
            if question is not None:
                q = tokenizer.encode(f"\n{question}\nAnswer:")
                ids += q
                tgt += [False] * len(q)
            a = answer_ids(tokenizer, answer)
            ids += a
            tgt += [True] * len(a)
        seqs.append(ids)
        targets.append(tgt)
    return TextBatch(seqs, targets, [len(s.images) for s in samples])


def micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sample positions, sorted by length, into micro-batches of at most `max_tokens`
    padded tokens (at least one sample each); deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and lengths[i] * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups
