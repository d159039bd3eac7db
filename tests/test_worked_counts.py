"""Worked counts across images (`PhaseConfig.worked_counts`): the running tally a count across
images is trained to answer with, how it is scored, and its per-term attention targets."""

from __future__ import annotations

import numpy as np
import pytest

from maven_edge.model_src.data.splits import iter_samples
from maven_edge.model_src.data.tasks import answer_result, count_chain, normalize_answer, question_line


def test_count_chain_is_a_running_tally():
    assert count_chain([2, 0, 1, 1]) == "2+0=2+1=3+1=4"
    assert count_chain([0, 2]) == "0+2=2"
    assert count_chain([3]) == "3"
    with pytest.raises(ValueError):
        count_chain([])


def test_a_labelled_tally_names_each_image_as_the_prompt_does():
    assert count_chain([2, 0, 1, 1], labelled=True) == "1:2+ 2:0=2+ 3:1=3+ 4:1=4"
    assert count_chain([0, 2], labelled=True) == "1:0+ 2:2=2"
    assert count_chain([3], labelled=True) == "3"  # one image: just its count, as unlabelled


def test_labelled_tally_needs_worked_counts():
    from maven_edge.core.errors import TrainingError
    from maven_edge.model_src.train.recipe import PhaseConfig

    with pytest.raises(TrainingError, match="needs worked_counts"):
        PhaseConfig(steps=2, batch_size=1, lr=1e-3, labelled_tally=True)
    assert PhaseConfig(steps=2, batch_size=1, lr=1e-3, worked_counts=True, labelled_tally=True).labelled_tally


@pytest.mark.parametrize(("text", "scored"), [
    ("2+0=2+1=3+1=4", "4"),
    (" 1+1=2 ", "2"),
    ("2+0=3+1=4", "4"),  # only the result is checked, as for a chain of thought
    ("1:2+ 2:0=2+ 3:1=3", "3"),
    (" 1:1+ 2:1=2 ", "2"),
    ("1:2+2:0=2", "1:2+2:0=2"),  # not a tally: a labelled term is "+ k:c"
    ("4", "4"),
    ("2+0", "2+0"),  # not a tally: compared as written
    ("image 2", "image 2"),
    ("the red circle was removed", "the red circle was removed"),
])
def test_a_tally_is_scored_by_its_result(text, scored):
    assert answer_result(text).strip() == scored


def test_exact_match_accepts_a_tally_with_the_right_total_only():
    assert normalize_answer("1+2=3+2=5") == normalize_answer("5")
    assert normalize_answer("1+2=3+2=6") != normalize_answer("5")
    assert normalize_answer("  Image  2 ") == "image 2"


def test_every_test_count_across_answer_becomes_a_tally_with_its_total():
    pytest.importorskip("torch")
    from maven_edge.model_src.data.counts import per_image_counts
    from maven_edge.model_src.train.attention_targets import worked_count

    seen = 0
    for s in iter_samples("test", 1000, tasks=("count_across",)):
        counts = per_image_counts(question_line(s), s.scenes)
        assert counts is not None and len(counts) == len(s.images) and max(counts) <= 2
        tally = worked_count(question_line(s), s.scenes, s.answer)
        assert tally == count_chain(counts) and normalize_answer(tally) == s.answer
        seen += 1
    assert seen == 100
    other = next(iter(iter_samples("test", 1, tasks=("count",))))
    assert worked_count(question_line(other), other.scenes, other.answer) == other.answer


def test_a_tally_that_does_not_add_up_is_an_error():
    pytest.importorskip("torch")
    from maven_edge.core.errors import TrainingError
    from maven_edge.model_src.train.attention_targets import worked_count

    s = next(iter(iter_samples("test", 1, tasks=("count_across",))))
    with pytest.raises(TrainingError, match="does not add up"):
        worked_count(question_line(s), s.scenes, str(int(s.answer) + 1))


@pytest.mark.parametrize("labelled", [False, True])
def test_each_term_attends_to_its_own_image(stage4_targets, labelled):
    """The position predicting image k's count has role-0 targets on image k's counted objects
    (every kept patch of image k when it has none), in each role layer; nothing else of the turn.
    In a labelled tally that position is the ":" after image k's label."""
    pytest.importorskip("torch")
    from maven_edge.model_src.data.labels import patch_labels

    samples, tb, kept, sup, turns, t, tok, t_img, codes, plus = _tally_targets(stage4_targets, 4, count_head=False,
                                                                               labelled=labelled)
    assert all("+" in s.answer and (":" in s.answer) == labelled for s in samples)
    colon = tok.encode(":")[0]
    for b, s in enumerate(samples):
        ids, seq, starts, counts = _row_layout(tb.sequences[b], s, tok.image_id, t_img)
        (answer,) = [run for _, run in turns[b]]
        if labelled:
            term_queries = [int(seq[p]) for p in answer if ids[p] == colon]
            assert [tok.decode([ids[p + 1]]) for p in answer if ids[p] == colon] == [str(c) for c in counts]
        else:
            term_queries = [int(seq[answer[0]]) - 1] + [int(seq[p]) for p in answer if ids[p] == plus]
        assert len(term_queries) == len(s.images)
        mine = [i for i, r in enumerate(t.rows) if r == b and t.layers[i] != sup.label_layer]
        assert {t.heads[i] for i in mine} == {sup.role_heads[0]}
        assert {t.layers[i] for i in mine} == set(sup.role_layers)
        for k, q in enumerate(term_queries):
            hits = [i for i in mine if t.queries[i] == q]
            assert len(hits) == len(sup.role_layers)  # one per role layer
            (key_pos,) = np.nonzero(t.keys[hits[0]])
            assert (key_pos > starts[k] + codes).all() and (key_pos < starts[k] + t_img).all()  # image k's patches
            slots = key_pos - starts[k] - 1 - codes
            if counts[k]:
                counted = s.scenes[k].find(**_counted_attr(question_line(s)))
                on = patch_labels([o.mask for o in counted], 64, 8)[kept[b][k][slots]] > 0
                assert on.all()
            else:
                assert len(slots) == kept[b].shape[1]  # all of image k
        # the queries of "+", "=" and the totals have no targets
        first_term = set() if labelled else {int(seq[p]) - 1 for p in answer[:2]}
        assert {t.queries[i] for i in mine} <= set(term_queries) | first_term


def _tally_targets(stage4_targets, n: int, count_head: bool, labelled: bool = False):
    """The targets of `n` worked-count training samples (role heads, label head, and the count head
    when asked), with what the checks need to read them."""
    from maven_edge.model_src.train.stages import _worked

    samples, _ = _worked(list(iter_samples("train", n, tasks=("count_across",))), None, labelled)
    r = stage4_targets(samples, None, count_head)
    return samples, r.tb, r.kept, r.sup, r.turns, r.t, r.tok, r.t_img, r.codes, r.plus


def _row_layout(ids, sample, image_id: int, t_img: int):
    """A row's ids, the sequence position of each id, the first position of each image, and the
    per-image counts of its question."""
    from maven_edge.model_src.data.counts import per_image_counts

    is_image = np.asarray(ids) == image_id
    seq = np.arange(len(ids)) + (np.cumsum(is_image) - is_image) * (t_img - 1)
    return ids, seq, seq[is_image], per_image_counts(question_line(sample), sample.scenes)


def _counted_attr(question: str) -> dict[str, str]:
    from maven_edge.model_src.data.shapes import COLORS

    noun = question.removeprefix("Question: how many ").split(" are there")[0]
    if noun.endswith(" shapes") and noun.removesuffix(" shapes") in COLORS:
        return {"color": noun.removesuffix(" shapes")}
    return {"shape": noun.removesuffix("es") if noun.endswith("sses") else noun.removesuffix("s")}


@pytest.mark.parametrize("labelled", [False, True])
def test_with_the_count_head_each_term_counts_its_own_image(stage4_targets, labelled):
    """With the count head, the position predicting image k's count also has a uniform count-head
    target over <bos> and one kept patch per counted object of image k (its count alone, 0-2): so
    the share left on <bos> says 1 / (n_k + 1); no other count-head target in the turn. In a
    labelled tally that position is the ":" after image k's label, as for the role heads."""
    pytest.importorskip("torch")
    from maven_edge.model_src.data.labels import patch_pixel_counts

    samples, tb, kept, sup, turns, t, tok, t_img, codes, plus = _tally_targets(stage4_targets, 6, count_head=True,
                                                                               labelled=labelled)
    colon = tok.encode(":")[0]
    seen_two = False
    for b, s in enumerate(samples):
        ids, seq, starts, counts = _row_layout(tb.sequences[b], s, tok.image_id, t_img)
        attr = _counted_attr(question_line(s))
        (answer,) = [run for _, run in turns[b]]
        if labelled:
            term_queries = [int(seq[p]) for p in answer if ids[p] == colon]
        else:
            term_queries = [int(seq[answer[0]]) - 1] + [int(seq[p]) for p in answer if ids[p] == plus]
        assert len(term_queries) == len(s.images)
        heads = [i for i, r in enumerate(t.rows) if r == b and t.uniform[i]]
        assert {(t.layers[i], t.heads[i]) for i in heads} == {(sup.count_layer, sup.count_head)}
        assert sorted(t.queries[i] for i in heads) == sorted(term_queries)  # one per term, nothing else
        for k, q in enumerate(term_queries):
            (i,) = [i for i in heads if t.queries[i] == q]
            (key_pos,) = np.nonzero(t.keys[i])
            assert key_pos[0] == 0  # <bos>
            patches = key_pos[1:]
            assert (patches > starts[k] + codes).all() and (patches < starts[k] + t_img).all()  # image k only
            shown = [o for o in s.scenes[k].find(**attr)
                     if patch_pixel_counts(o.mask, 8)[kept[b][k]].max() > 0]  # objects with a kept patch
            assert len(shown) <= counts[k] and len(patches) == len(shown)
            seen_two |= len(patches) == 2
    assert seen_two  # an image with two counted objects gives the count head three keys


@pytest.mark.parametrize("text, parsed", [
    ("2+0=2+1=3", ([2, 0, 1], True)), (" 1+1=2 ", ([1, 1], True)), ("2+0=2+1=4", ([2, 0, 1], False)),
    ("3", None), ("image 2", None), ("2+0", None), ("", None),
    ("1:2+ 2:0=2+ 3:1=3", ([2, 0, 1], True)), (" 1:1+ 2:1=3 ", ([1, 1], False)),
    ("1:2+ 3:0=2", None), ("2:2+ 3:0=2", None),  # labels out of order: the terms belong to no image
])
def test_tally_terms_reads_the_terms_and_checks_the_totals(text, parsed):
    from maven_edge.model_src.data.tasks import tally_terms

    assert tally_terms(text) == parsed


def test_the_eval_report_scores_each_term_of_a_tally_against_the_scene():
    """`tally_report`: per-image terms right against the scenes, tallies that add up, whole tallies
    right; plain totals and other tasks are not tallies."""
    pytest.importorskip("torch")
    from maven_edge.model_src.data.counts import per_image_counts
    from maven_edge.model_src.data.tasks import count_chain
    from maven_edge.model_src.train.evaluate import tally_report

    samples = list(iter_samples("test", 200, tasks=("count_across", "count")))[:8]
    across = [s for s in samples if s.task == "count_across"]
    assert across and len(across) < len(samples)
    counts = [per_image_counts(question_line(s), s.scenes) for s in across]
    preds, wrong_terms = [], 0
    for s in samples:
        if s.task != "count_across":
            preds.append(s.answer)  # a plain count: not a tally
            continue
        c = list(per_image_counts(question_line(s), s.scenes))
        if len(preds) % 2:  # every other one: the first term off by one, totals kept consistent
            c[0] += 1
            wrong_terms += 1
        preds.append(count_chain(c))
    assert wrong_terms
    r = tally_report(samples, preds)
    n_terms = sum(len(c) for c in counts)
    assert (r["questions"], r["tallies"], r["adds_up"], r["terms"]) == (len(across), len(across), len(across), n_terms)
    assert r["whole_tally_right"] == len(across) - wrong_terms
    assert r["term_accuracy"] == pytest.approx((n_terms - wrong_terms) / n_terms)
    assert tally_report(samples, [s.answer for s in samples]) is None  # plain totals


def test_term_loss_weight_needs_worked_counts():
    from maven_edge.core.errors import TrainingError
    from maven_edge.model_src.train.recipe import PhaseConfig

    with pytest.raises(TrainingError, match="needs worked_counts"):
        PhaseConfig(steps=2, batch_size=1, lr=1e-3, term_loss_weight=5.0)
    with pytest.raises(TrainingError, match="must be > 0"):
        PhaseConfig(steps=2, batch_size=1, lr=1e-3, worked_counts=True, term_loss_weight=0.0)
    assert PhaseConfig(steps=2, batch_size=1, lr=1e-3, worked_counts=True, term_loss_weight=5.0).term_loss_weight == 5


@pytest.mark.parametrize("labelled", [False, True])
def test_term_weights_fall_on_each_images_count(stage4_targets, labelled):
    """`PhaseConfig.term_loss_weight`: in the answer-loss weights of a micro-batch the weighted
    positions are exactly the tally's terms (the tokens that say image k's count), in image order;
    every other position weighs 1."""
    pytest.importorskip("torch")
    from maven_edge.model_src.train.attention_targets import term_weights

    samples, tb, _, _, turns, _, tok, t_img, _, plus = _tally_targets(stage4_targets, 4, count_head=False,
                                                                      labelled=labelled)
    width = max(len(ids) + (t_img - 1) * int((np.asarray(ids) == tok.image_id).sum()) for ids in tb.sequences)
    w = term_weights(tb.sequences, turns, tb.image_counts, tok.image_id, t_img, plus, tok.encode(":")[0], width, 5.0)
    assert w.shape == (len(samples), width)
    assert set(np.unique(w.numpy())) == {1.0, 5.0}
    for b, s in enumerate(samples):
        ids, seq, _, counts = _row_layout(tb.sequences[b], s, tok.image_id, t_img)
        at = {int(q): p for p, q in enumerate(seq)}
        weighted = [at[int(q)] for q in np.flatnonzero(w[b].numpy() == 5.0)]
        assert all(tb.targets[b][p] for p in weighted)  # answer tokens only
        said = "".join(tok.decode([ids[p]]) for p in weighted).replace(" ", "")
        assert said == "".join(str(c) for c in counts)


def test_weighted_answer_loss_is_the_weighted_mean_per_sample():
    torch = pytest.importorskip("torch")
    from maven_edge.model_src.train.common import answer_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, 2, 6, -100]])
    plain, n = answer_loss(logits, labels)
    assert n == 2
    assert torch.allclose(answer_loss(logits, labels, torch.ones(2, 5))[0], plain)
    weights = torch.tensor([[1.0, 1.0, 4.0, 9.0, 1.0], [1.0, 1.0, 1.0, 4.0, 1.0]])
    tok = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="none").view(2, 4)
    want = (tok[0, 0] + 4 * tok[0, 1] + tok[0, 3]) / 6 + (tok[1, 1] + 4 * tok[1, 2]) / 5
    assert torch.allclose(answer_loss(logits, labels, weights)[0], want)
