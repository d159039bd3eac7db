"""Attention supervision for stage 4 (training only; nothing of it is exported).

The diagnosis (docs/training.md) found that the decoder retrieves the patches of the object a
question names, but (a) for a comparison it retrieves both objects with the same attention, so
their places are averaged instead of compared, and (b) a retrieved patch does not say which
labelled image it belongs to. Both are steps the selector's pseudo-labels already know the answer
to, so this module turns them into targets for a few attention heads:

* **role heads** (each layer of ``role_layers``): at every position that predicts an answer token, head
  ``role_heads[r]`` should put its attention on the kept patches of the ``r``-th object the
  question names ("is the *red circle* left of the *blue square*?": role 0 and role 1). The two
  heads use different key/value groups, so each object's features reach the answer separately.
  A count question has one role holding every object it counts, and "what changed" one role per
  image holding its edited object (see :func:`referents`).
* **count head** (optional: layer ``count_layer``, head ``count_head``; off when ``count_layer`` is
  None): at the positions answering a count question it should spread its attention *evenly* over
  one kept patch per counted object (the one holding most of the object) and the ``<bos>`` token,
  so the share left on ``<bos>`` is ``1 / (n + 1)`` and says the count ``n`` (the objects may lie in
  several images). Its loss is the cross-entropy against that uniform distribution.
* **worked counts** (``PhaseConfig.worked_counts``): a count across images answered as a running
  tally (``"2+0=2+1=3"``, or with ``PhaseConfig.labelled_tally`` ``"1:2+ 2:0=2+ 3:1=3"``, each term
  after its image's label: :func:`worked_count`) gets role-0 targets per term instead: the position
  that predicts image k's count attends to image k's counted objects (all of image k's kept patches
  when it has none), and with the count head, that position's count head spreads over ``<bos>`` and
  one kept patch per counted object of image k (image k's count alone, 0-2); the totals are left to
  the decoder (each is the previous total plus one term).
* **label head** (layer ``label_layer``, head ``label_head``): in a multi-image prompt, every
  visual token of image ``k`` should attend to the ``" k"`` token of its ``Image k:`` label, so a
  retrieved patch carries the label it must be answered with.

The loss for one (query, head) is ``-log`` of the attention mass on its target keys, averaged
over all such pairs of the micro-batch. The objects are read back from the question's template
and the scenes (:func:`referents`), so follow-up turns are covered as well as each sample's own
question.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maven_edge.core.config import LLMConfig
from maven_edge.core.errors import TrainingError
from maven_edge.model_src.data import videos as V
from maven_edge.model_src.data.counts import (
    Counted,
    counted_image,
    counted_objects,
    counts_across,
    matching_objects,
    per_image_counts,
)
from maven_edge.model_src.data.labels import patch_labels, patch_pixel_counts
from maven_edge.model_src.data.shapes import Scene
from maven_edge.model_src.data.tasks import (
    CHANGE_QUESTION,
    REVERSE_CHANGE_QUESTION,
    Sample,
    count_chain,
    edited_objects,
    question_line,
)

# (pattern, roles): each role is (image group index or None for "the only / any image",
# colour group or None, shape group or None). Patterns match the text after "Question: ".
_IMG = r"(?: in (?:image|frame) (\d))?"
_TEMPLATES: tuple[tuple[re.Pattern[str], tuple[tuple[int | None, int | None, int | None], ...]], ...] = (
    (re.compile(rf"what color is the (\w+){_IMG}\?"), ((2, None, 1),)),
    (re.compile(rf"what shape is the (\w+) object{_IMG}\?"), ((2, 1, None),)),
    (re.compile(r"is the (\w+) (\w+) (?:left or right of|above or below) the (\w+) (\w+)\?"),
     ((None, 1, 2), (None, 3, 4))),
    (re.compile(r"which image has an? (\w+) (\w+)\?"), ((None, 1, 2),)),
    (re.compile(r"is the (\w+) in image 1 the same color as the \1 in image 2\?"), ((-1, None, 1), (-2, None, 1))),
    (re.compile(r"is the (\w+) object in image 1 the same shape as the \1 object in image 2\?"),
     ((-1, 1, None), (-2, 1, None))),
)
Role = Counted  # the (image index, object) pairs one supervised head attends to


def _named(question: str, scenes: Sequence[Scene]) -> list[Role] | None:
    """Templates naming single objects: one role per object, or None if no template matches."""
    for pattern, roles in _TEMPLATES:
        m = pattern.fullmatch(question)
        if not m:
            continue
        out = []
        for img_group, color_group, shape_group in roles:
            color = m.group(color_group) if color_group else None
            shape = m.group(shape_group) if shape_group else None
            if img_group is not None and img_group < 0:  # fixed image 1 / image 2
                images = [-img_group - 1]
            elif img_group is not None and m.group(img_group):
                images = [int(m.group(img_group)) - 1]
            else:
                images = list(range(len(scenes)))
            found = matching_objects(scenes, images, color, shape)
            if len(found) != 1:
                return []
            out.append(found)
        return out
    return None


def worked_count(question: str, scenes: Sequence[Scene], answer: str, labelled: bool = False) -> str:
    """``answer`` as a running tally (``"2+0=2+1=3"``, or with ``labelled`` ``"1:2+ 2:0=2+ 3:1=3"``:
    :func:`~maven_edge.model_src.data.tasks.count_chain`) when ``question`` counts across several
    images, else ``answer`` unchanged. The tally's total is checked against ``answer``."""
    counts = per_image_counts(question, scenes)
    if counts is None or len(counts) < 2:
        return answer
    if str(sum(counts)) != answer.strip():
        raise TrainingError(f"worked count {counts} does not add up to the answer {answer!r} of {question!r}")
    return count_chain(counts, labelled)


def _changes(question: str, scenes: Sequence[Scene]) -> list[Role] | None:
    """"What changed between image 1 and image 2?": role 0 holds the objects of image 1 that
    image 2 does not have (recoloured or removed), role 1 those of image 2 that image 1 does not
    have (recoloured or added). Edited scenes keep the other objects (identity), so this is a
    plain difference. The backwards question ("... between image 2 and image 1?") swaps the
    images: role 0 in image 2, role 1 in image 1."""
    if question not in (CHANGE_QUESTION, REVERSE_CHANGE_QUESTION) or len(scenes) != 2:
        return None
    k, j = (0, 1) if question == CHANGE_QUESTION else (1, 0)
    gone, new = edited_objects(scenes[k], scenes[j])
    return [[(k, o) for o in gone], [(j, o) for o in new]]


def _video(question: str, scenes: Sequence[Scene]) -> list[Role] | None:
    """Video questions (:mod:`maven_edge.model_src.data.videos`): "what happened to the X?" gives
    role 0 the object in the first frame it shows in and role 1 in the last (what changed between
    them is the answer); "in which frame does the X first appear?" one role with the object in that
    frame; "how many frames show a ...?" one role with every matching object of every frame."""
    if m := V.EVENT_QUESTION.fullmatch(question):
        track = V.find_track(scenes, m.group(1), m.group(2))
        return [[track[0]], [track[-1]]] if track else []
    if m := V.FIRST_QUESTION.fullmatch(question):
        k = V.first_frame(scenes, m.group(1), m.group(2))
        return [matching_objects(scenes, [k - 1], m.group(1), m.group(2))] if k else []
    if m := V.COUNT_QUESTION.fullmatch(question):
        found = matching_objects(scenes, range(len(scenes)), m.group(1), m.group(2))
        return [found] if found else []
    return None


def referents(question: str, scenes: Sequence[Scene]) -> list[Role]:
    """The objects a question is about, one role per head: role r is the list of (image index,
    object) the r-th supervised head should attend to (an empty role gets no target).

    ``question`` is a question line (``"Question: ..."``). Questions naming objects give one role
    per named object, in the order they are named; count questions one role with every object
    counted; "what changed" one role per image with its edited object; video questions see
    :func:`_video`. Captions give ``[]``; so
    does a question whose referring expression does not pick exactly one object of ``scenes``
    (never the case for generated questions)."""
    text = question.removeprefix("Question: ")
    for parse in (_named, counted_objects, _changes, _video):
        roles = parse(text, scenes)
        if roles is not None:
            return roles
    return []


@dataclass(frozen=True)
class AttentionSupervision:
    """Which heads are supervised, and the loss weight (0 turns the whole thing off)."""

    weight: float = 0.0
    role_layers: tuple[int, ...] = (2, 3)  # the same role heads are supervised in each of these layers
    role_heads: tuple[int, ...] = (0, 3)  # one per named object, in different KV groups
    label_layer: int = 0
    label_head: int = 0
    count_layer: int | None = None  # None: no count head
    count_head: int = 1

    @classmethod
    def for_decoder(cls, cfg: LLMConfig, weight: float, count_head: bool = False) -> AttentionSupervision:
        """The heads for a decoder: role heads in the middle layer and the last one (layers 2 and
        3 of 4; the last layer's role heads read the objects' attributes straight into the answer
        logits), the first head of each half of the heads (so of different KV groups whenever
        there are several), and the label head as head 0 of layer 0. With ``count_head``, the first
        head of the middle layer that is not a role head counts (so the last layer can read its
        result)."""
        role_layers = tuple(sorted({cfg.num_layers // 2, cfg.num_layers - 1}))
        role_heads = (0, cfg.num_heads // 2) if cfg.num_heads > 1 else (0,)
        free = [h for h in range(cfg.num_heads) if h not in role_heads]
        if count_head and not free:
            raise TrainingError(f"count_head needs a head besides the role heads {role_heads}; "
                                f"the decoder has {cfg.num_heads}: give it 3 or more (llm.num_heads) or set count_head=False "
                                f"in the phase config")
        count_layer = cfg.num_layers // 2 if count_head else None
        return cls(weight, role_layers, role_heads, 0, 0, count_layer, free[0] if free else 1)

    @property
    def layers(self) -> tuple[int, ...]:
        extra = () if self.count_layer is None else (self.count_layer,)
        return tuple(sorted({*self.role_layers, self.label_layer, *extra}))


@dataclass
class Targets:
    """Flat lists, one entry per supervised (batch row, layer, head, query position), with the
    key positions as a boolean mask row; ``uniform`` marks the targets whose attention should be
    spread evenly over their keys (the count head) rather than just land on them."""

    rows: list[int]
    layers: list[int]
    heads: list[int]
    queries: list[int]
    keys: list[np.ndarray]
    uniform: list[bool]


def build_targets(
    sup: AttentionSupervision,
    sequences: Sequence[Sequence[int]],
    turns: Sequence[Sequence[tuple[str, list[int]]]],
    scenes: Sequence[Sequence[Scene]],
    kept: Sequence[np.ndarray | None],
    image_id: int,
    tokens_per_image: int,
    patch_offset: int,
    patch_size: int,
    colon_id: int,
    plus_id: int | None = None,
) -> Targets:
    """Targets for one micro-batch laid out as ``MavenModel.assemble_batch`` does without left
    padding (``<image>`` at id position p becomes ``tokens_per_image`` tokens).

    ``turns[b]``: per answer turn of row b, its question line and the id positions of the answer
    tokens it predicts (without the final ``<eos>``). ``kept[b]``: int [n_images, k] raster
    indices of the patches in each image's sequence, which start ``patch_offset`` tokens after
    ``<img_start>`` (hybrid: the kept patches after the codes; continuous: all patches, offset 0;
    None in discrete mode, where there are no patches and so no role targets). The label of
    image k is the token before the last ``colon_id`` (``:``) that precedes its ``<image>``
    (``Image 2: <image>``: ``" 2"``; ``"3"`` where the tokenizer splits ``" 3"``). ``plus_id``: the
    ``+`` token, by which a worked count is recognised (its terms: :func:`_tally_terms`); None: no
    worked counts."""
    t = Targets([], [], [], [], [], [])

    def add(row: int, layer: int, head: int, queries: Iterable[int], keys: np.ndarray, uniform: bool = False) -> None:
        for q in queries:
            t.rows.append(row)
            t.layers.append(layer)
            t.heads.append(head)
            t.queries.append(int(q))
            t.keys.append(keys)
            t.uniform.append(uniform)

    def image_count(row: int, k: int, objects: Role, queries: Iterable[int], width: int, first: np.ndarray) -> None:
        """A count in image k (a tally's term or a "... in image k?" question): the role head on
        image k's counted objects, else on all of image k; the count head (when on) spreads over
        <bos> and one kept patch per counted object, so the share left on <bos> says the count
        (``width``: the row's sequence length, ``first``: each image's first kept patch)."""
        keys = np.zeros(width, dtype=bool)
        keys[_patch_positions(first[k], kept[row][k], scenes[row][k], patch_size,
                              [o.mask for _, o in objects] or None)] = True
        for layer in sup.role_layers:
            add(row, layer, sup.role_heads[0], queries, keys)
        if sup.count_layer is not None:
            add(row, sup.count_layer, sup.count_head, queries,
                _count_keys(width, objects, first, kept[row], patch_size), uniform=True)

    for b, ids in enumerate(sequences):
        img_pos = np.flatnonzero(np.asarray(ids) == image_id)
        seq = _sequence_positions(ids, image_id, tokens_per_image)
        width = len(ids) + len(img_pos) * (tokens_per_image - 1)
        first = seq[img_pos] + 1 + patch_offset  # per image, the sequence position of its first kept patch
        for question, answer_positions in turns[b]:
            queries = seq[np.asarray(answer_positions, dtype=np.int64)] - 1  # predicts the token
            if plus_id is not None and kept[b] is not None and counts_across(question):
                terms = _tally_terms(question, [ids[p] for p in answer_positions], len(scenes[b]), plus_id,
                                     colon_id)
                if terms is not None:
                    counted = counted_objects(question, scenes[b]) or [[]]
                    for k, pos in enumerate(terms):
                        image_count(b, k, [(j, o) for j, o in counted[0] if j == k], queries[pos], width, first)
                    continue
            k = counted_image(question)
            if k is not None and kept[b] is not None and k < len(scenes[b]):  # "... in image k?"
                counted = counted_objects(question, scenes[b]) or [[]]
                image_count(b, k, counted[0], queries, width, first)
                continue
            named = referents(question, scenes[b]) if kept[b] is not None else []
            for r, role in enumerate(named[: len(sup.role_heads)]):
                keys = np.zeros(width, dtype=bool)
                for k in sorted({k for k, _ in role}):
                    keys[_patch_positions(first[k], kept[b][k], scenes[b][k], patch_size,
                                          [obj.mask for j, obj in role if j == k])] = True
                if keys.any():
                    for layer in sup.role_layers:
                        add(b, layer, sup.role_heads[r], queries, keys)
            counted = None
            if sup.count_layer is not None and kept[b] is not None:
                counted = counted_objects(question, scenes[b])
            if counted is not None:
                keys = _count_keys(width, counted[0] if counted else [], first, kept[b], patch_size)
                add(b, sup.count_layer, sup.count_head, queries, keys, uniform=True)
        if len(img_pos) > 1:
            for k, p in enumerate(img_pos):
                colons = [i for i in range(img_pos[k - 1] + 1 if k else 0, p) if ids[i] == colon_id]
                if colons and colons[-1] > 0:
                    keys = np.zeros(width, dtype=bool)
                    keys[seq[colons[-1] - 1]] = True
                    add(b, sup.label_layer, sup.label_head, range(seq[p] + 1, seq[p] + tokens_per_image), keys)
    return t


def term_weights(sequences: Sequence[Sequence[int]], turns: Sequence[Sequence[tuple[str, list[int]]]],
                 n_images: Sequence[int], image_id: int, tokens_per_image: int, plus_id: int, colon_id: int,
                 width: int, weight: float) -> torch.Tensor:
    """Per-token answer-loss weights for one micro-batch laid out as :func:`build_targets`' (no
    left padding, ``width`` columns): ``weight`` on each term of a worked count (the per-image count,
    :func:`_tally_terms`; ``PhaseConfig.term_loss_weight``), 1 everywhere else (``answer_loss``
    reads the weights of labelled positions only)."""
    out = torch.ones(len(sequences), width)
    for b, ids in enumerate(sequences):
        seq = _sequence_positions(ids, image_id, tokens_per_image)
        for question, answer_positions in turns[b]:
            if not counts_across(question):
                continue
            terms = _tally_terms(question, [ids[p] for p in answer_positions], n_images[b], plus_id, colon_id)
            for pos in terms or []:
                out[b, seq[[answer_positions[i] for i in pos]]] = weight
    return out


def _sequence_positions(ids: Sequence[int], image_id: int, tokens_per_image: int) -> np.ndarray:
    """The sequence position of each id position of a row once each ``<image>`` id becomes
    ``tokens_per_image`` tokens (every earlier ``<image>`` adds ``tokens_per_image - 1``)."""
    is_image = np.asarray(ids) == image_id
    return np.arange(len(ids)) + (np.cumsum(is_image) - is_image) * (tokens_per_image - 1)


def _patch_positions(first: int, kept: np.ndarray, scene: Scene, patch_size: int,
                     masks: list[np.ndarray] | None) -> np.ndarray:
    """Sequence positions of an image's kept patches (``kept``: raster indices, the first of them at
    sequence position ``first``) that hold any pixel of ``masks``; None: all of them."""
    on = np.ones(len(kept), dtype=bool) if masks is None else patch_labels(masks, scene.image_size, patch_size)[kept] > 0
    return first + np.flatnonzero(on)


def _count_keys(width: int, objects: Role, first: np.ndarray, kept: np.ndarray, patch_size: int) -> np.ndarray:
    """The count head's keys: ``<bos>`` (the sink whose share says the count; all of it when nothing
    is counted) and, per counted (image k, object), the kept patch holding most of the object
    (``first[k]``: the sequence position of image k's first kept patch)."""
    keys = np.zeros(width, dtype=bool)
    keys[0] = True
    for k, obj in objects:
        pixels = patch_pixel_counts(obj.mask, patch_size)[kept[k]]
        if pixels.max() > 0:
            keys[first[k] + int(pixels.argmax())] = True
    return keys


def _tally_terms(question: str, answer_ids: Sequence[int], n_images: int, plus_id: int,
                 colon_id: int) -> list[list[int]] | None:
    """Per image, the indices into ``answer_ids`` of a worked count's term for it: in a plain tally
    (``2+0=2``) the tokens before the first ``+`` (which may be a space and a digit), then the token
    after each ``+``; in a labelled one (``1:2+ 2:0=2``) the token after each ``:``. None when the
    answer is not a tally (a plain total)."""
    plus = [i for i, t in enumerate(answer_ids) if t == plus_id]
    if not plus:
        return None
    colons = [i for i, t in enumerate(answer_ids) if t == colon_id]
    if colons:
        terms = [[i + 1] for i in colons if i + 1 < len(answer_ids)]
    else:
        terms = [list(range(plus[0]))] + [[i + 1] for i in plus if i + 1 < len(answer_ids)]
    if len(terms) != n_images:
        raise TrainingError(f"a worked count of {question!r} has {len(terms)} terms for {n_images} images")
    return terms


def attention_loss(probs: dict[int, torch.Tensor], targets: Targets) -> torch.Tensor | None:
    """Mean over the targets of ``-log`` (attention mass on the target keys), or for ``uniform``
    targets of the mean ``-log`` attention over the keys (the cross-entropy against the uniform
    distribution over them); ``probs[layer]`` is that layer's attention [batch, heads, queries,
    keys]. None when there are no targets."""
    if not targets.rows:
        return None
    losses = []
    for layer in sorted(set(targets.layers)):
        sel = [i for i, lay in enumerate(targets.layers) if lay == layer]
        p = probs[layer]
        rows = torch.tensor([targets.rows[i] for i in sel])
        heads = torch.tensor([targets.heads[i] for i in sel])
        queries = torch.tensor([targets.queries[i] for i in sel])
        width = p.shape[-1]
        keys = torch.from_numpy(np.stack([np.pad(targets.keys[i], (0, width - len(targets.keys[i]))) for i in sel]))
        att = p[rows, heads, queries].float()
        uniform = torch.tensor([targets.uniform[i] for i in sel])
        mass_loss = -torch.log((att * keys).sum(-1).clamp_min(1e-6))  # land on the keys
        spread_loss = -(torch.log(att.clamp_min(1e-6)) * keys).sum(-1) / keys.sum(-1).clamp_min(1)  # evenly
        losses.append(torch.where(uniform, spread_loss, mass_loss))
    return torch.cat(losses).mean()


def answer_turns(sample: Sample, followups: Sequence[tuple[str, str]], targets: Sequence[bool]) -> list[tuple[str, list[int]]]:
    """Per answer turn of a `batches.text_batch` row: its question line and the id positions of
    its answer tokens without the closing ``<eos>`` (each turn is a run of target flags)."""
    questions = [question_line(sample)] + [q for q, _ in followups]
    runs, cur = [], []
    for i, flag in enumerate(targets):
        if flag:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [(q, run[:-1]) for q, run in zip(questions, runs, strict=True)]
