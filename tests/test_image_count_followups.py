"""Per-image count follow-ups (`PhaseConfig.image_count_followups`): "how many red shapes are there
in image 3?" asked about one labelled image of a multi-image sample -- the skill of one term of a
worked count -- and their attention targets."""

from __future__ import annotations

import re

import numpy as np
import pytest

from maven_edge.model_src.data.followups import IMAGE_COUNT_TASK, MULTI_POOL, followup_questions
from maven_edge.model_src.data.shapes import COLORS, SHAPES
from maven_edge.model_src.data.splits import iter_samples
from maven_edge.model_src.data.tasks import plural, question_line

# a colour or shape count in one image ("how many shapes are there in image k?" is in_image's)
_ASKED = re.compile(r"Question: how many (\w+ shapes|(?!shapes )\w+) are there in image (\d)\?")
_SHAPE_OF = {plural(s): s for s in SHAPES}


def _kind(noun: str) -> dict[str, str]:
    if noun.endswith(" shapes") and noun.removesuffix(" shapes") in COLORS:
        return {"color": noun.removesuffix(" shapes")}
    return {"shape": _SHAPE_OF[noun]}


def test_per_image_counts_are_asked_only_when_on_and_only_of_several_images():
    rng = np.random.default_rng(0)
    counts: list[int] = []
    for s in iter_samples("train", 60, tasks=("which_image", "count_across", "count", "video")):
        kwargs = {"skip": [question_line(s)], "video": s.family == "video"}
        off = followup_questions(s.scenes, np.random.default_rng(1), 6, **kwargs)
        assert not any(_ASKED.fullmatch(q) for q, _ in off)  # the default pool is unchanged
        on = followup_questions(s.scenes, rng, 6, image_counts=True, **kwargs)
        asked = [(m, a) for q, a in on if (m := _ASKED.fullmatch(q))]
        if len(s.scenes) == 1 or s.family == "video":
            assert not asked
            continue
        present = {(attr, getattr(o, attr)) for sc in s.scenes for o in sc.objects for attr in ("color", "shape")}
        for m, answer in asked:
            (attr, value), = _kind(m.group(1)).items()
            assert (attr, value) in present  # a kind that occurs somewhere in the set
            k = int(m.group(2))
            assert 1 <= k <= len(s.scenes)
            assert answer == str(len(s.scenes[k - 1].find(**{attr: value})))
            counts.append(int(answer))
    assert IMAGE_COUNT_TASK not in MULTI_POOL
    assert len(counts) > 20 and {0, 1, 2} <= set(counts)  # zeros are asked too


def test_image_count_followups_need_followups():
    from maven_edge.core.errors import TrainingError
    from maven_edge.model_src.train.recipe import PhaseConfig

    with pytest.raises(TrainingError, match="needs followups"):
        PhaseConfig(steps=2, batch_size=2, lr=1e-3, image_count_followups=True)
    assert PhaseConfig(steps=2, batch_size=2, lr=1e-3, followups=2, image_count_followups=True).image_count_followups


@pytest.mark.parametrize("count_head", [False, True])
def test_a_per_image_count_attends_to_that_image(stage4_targets, count_head):
    """Each answer of "how many X are there in image k?" has role-0 targets on image k's counted
    objects (all of image k's kept patches when it has none) in each role layer, and with the count
    head a uniform target over <bos> and one kept patch per counted object of image k."""
    pytest.importorskip("torch")
    from maven_edge.model_src.data.labels import patch_labels

    samples = list(iter_samples("train", 10, tasks=("count_across",)))
    rng = np.random.default_rng(3)
    extra = []
    for s in samples:  # only per-image count follow-ups, so every follow-up turn is one
        qas = followup_questions(s.scenes, rng, 12, skip=[question_line(s)], image_counts=True)
        extra.append([qa for qa in qas if _ASKED.fullmatch(qa[0])][:3])
    r = stage4_targets(samples, extra, count_head)
    tb, kept, sup, turns, t, tok, t_img, codes = r.tb, r.kept, r.sup, r.turns, r.t, r.tok, r.t_img, r.codes
    zeros = twos = 0
    for b, s in enumerate(samples):
        ids = tb.sequences[b]
        is_image = np.asarray(ids) == tok.image_id
        seq = np.arange(len(ids)) + (np.cumsum(is_image) - is_image) * (t_img - 1)
        starts = seq[is_image]
        for question, answer in turns[b][1:]:
            m = _ASKED.fullmatch(question)
            k = int(m.group(2)) - 1
            objects = s.scenes[k].find(**_kind(m.group(1)))
            for q in {int(seq[p]) - 1 for p in answer}:  # the digit (and a space before it)
                hits = [i for i, r in enumerate(t.rows) if r == b and t.queries[i] == q]
                role = [i for i in hits if not t.uniform[i]]
                layers = {(lay, sup.role_heads[0]) for lay in sup.role_layers}
                assert {(t.layers[i], t.heads[i]) for i in role} == layers
                (key_pos,) = np.nonzero(t.keys[role[0]])
                assert (key_pos > starts[k] + codes).all() and (key_pos < starts[k] + t_img).all()  # image k only
                slots = key_pos - starts[k] - 1 - codes
                if objects:
                    assert (patch_labels([o.mask for o in objects], 64, 8)[kept[b][k][slots]] > 0).all()
                else:
                    assert len(slots) == kept[b].shape[1]  # all of image k
                    zeros += 1
                uniform = [i for i in hits if t.uniform[i]]
                if not count_head:
                    assert not uniform
                    continue
                (u,) = uniform
                (key_pos,) = np.nonzero(t.keys[u])
                assert key_pos[0] == 0 and len(key_pos) - 1 <= len(objects)  # <bos> + one patch per object
                assert ((key_pos[1:] > starts[k] + codes) & (key_pos[1:] < starts[k] + t_img)).all()
                twos += len(key_pos) == 3
    assert zeros > 0 and (twos > 0 or not count_head)
