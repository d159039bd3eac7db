"""Stage 4's attention targets: the objects a question names, where their patches and the image
labels sit in the assembled sequence, and the loss on the recorded attention."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from maven_edge.model_src.data.followups import followup_questions  # noqa: E402
from maven_edge.model_src.data.labels import patch_labels  # noqa: E402
from maven_edge.model_src.data.splits import iter_samples  # noqa: E402
from maven_edge.model_src.data.tasks import question_line  # noqa: E402
from maven_edge.model_src.train.attention_targets import (  # noqa: E402
    AttentionSupervision,
    answer_turns,
    attention_loss,
    build_targets,
    referents,
)

NAMING = ("color", "shape", "position", "which_image", "same")


def test_referents_are_the_objects_the_generator_named():
    """Read back from the question templates: the objects a question names (one role each, in
    text order), every object a count question counts (one role), and the edited object of
    "what changed" (one role per image) are the ones the generator labelled for the selector."""
    for s in iter_samples("train", 120):
        roles = referents(question_line(s), s.scenes)
        if s.task == "caption":
            assert roles == [], s.prompt
            continue
        if s.task in NAMING:
            assert [len(r) for r in roles] == ([1, 1] if s.task in ("position", "same") else [1]), s.prompt
        elif s.task == "changed":
            edit = s.meta["edit"]
            assert [len(r) for r in roles] == {"recolor": [1, 1], "removed": [1, 0], "added": [0, 1]}[edit]
            assert all(k == r for r, role in enumerate(roles) for k, _ in role)  # role r: image r+1
            assert edit != "recolor" or roles[0][0][1].color != roles[1][0][1].color
        elif s.task == "video":
            variant = s.meta["variant"]
            if variant == "event":  # the actor where it first and last shows
                (k0, first), (k1, last) = roles[0][0], roles[1][0]
                assert first.track == last.track and k0 <= k1
            elif variant == "first_frame":  # the object in the frame the answer names
                assert [k + 1 for k, _ in roles[0]] == [int(s.answer.split()[1])]
            else:  # frame_count: every matching object of every frame (one per frame here)
                assert len({k for k, _ in roles[0]}) == int(s.answer), s.prompt
            continue  # the selector labels mark the object in every frame it shows in
        else:  # count, count_across: one role with every counted object
            assert len(roles) == 1 and len(roles[0]) == int(s.answer), s.prompt
        for k, scene in enumerate(s.scenes):
            mine = [o for role in roles for j, o in role if j == k]
            if mine and s.task != "changed":
                assert np.array_equal(patch_labels([o.mask for o in mine], scene.image_size, 8), s.patch_labels[k])
        if s.task == "position":
            q = question_line(s)
            a, b = (f"{role[0][1].color} {role[0][1].shape}" for role in roles)
            assert q.index(a) < q.index(b)
        if s.task == "same":
            assert [role[0][0] for role in roles] == [0, 1]


def test_backwards_change_question_swaps_the_images_roles():
    """"What changed between image 2 and image 1?" (the reverse_change follow-up): role 0 is the
    edited object in image 2, role 1 the one in image 1 -- the forward roles, swapped."""
    n = 0
    for s in iter_samples("train", 120, tasks=("changed",)):
        forward = referents(question_line(s), s.scenes)
        (q, _), *_ = followup_questions(s.scenes, np.random.default_rng(0), 1, skip=[question_line(s)],
                                        reverse_change=True)
        assert q == "Question: what changed between image 2 and image 1?"
        assert referents(q, s.scenes) == forward[::-1]
        n += 1
    assert n > 5


def test_follow_up_in_image_questions_name_the_labelled_image():
    rng = np.random.default_rng(0)
    seen = counted = 0
    for s in iter_samples("train", 40, tasks=("which_image", "count_across")):
        for q, a in followup_questions(s.scenes, rng, 6, skip=[question_line(s)]):
            if " the same " in q or " in image " not in q:
                continue
            k = int(q[-2]) - 1
            (role,) = referents(q, s.scenes)
            assert all(j == k and obj in s.scenes[k].objects for j, obj in role)
            if q.startswith("Question: what"):
                assert len(role) == 1
                seen += 1
            else:  # "how many shapes are there in image k?"
                assert len(role) == int(a) == len(s.scenes[k].objects)
                counted += 1
    assert seen > 5 and counted > 5


@pytest.fixture(scope="module")
def batch():
    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.train import batches as B
    from maven_edge.model_src.train.common import visual_embeds, visual_features

    model = build_model(get_config("tiny", ["llm.num_layers=3", "vision.num_layers=1", "discrete.num_layers=1"]),
                        seed=0)
    tok = model.tokenizer
    samples = list(iter_samples("train", 6, tasks=("position", "which_image", "same")))
    rng = np.random.default_rng(1)
    extra = [followup_questions(s.scenes, rng, 3, skip=[question_line(s)]) for s in samples]
    tb = B.text_batch(samples, tok, extra)
    vf = visual_features(model, B.pixel_tensor(samples, model.config), "hybrid")
    offsets = np.concatenate([[0], np.cumsum(tb.image_counts)])
    emb = visual_embeds(model, vf, "hybrid")
    asm = model.assemble_batch(tb.sequences, [emb[offsets[i]:offsets[i + 1]] for i in range(len(samples))],
                               tb.targets)
    sup = AttentionSupervision.for_decoder(model.config.llm, 1.0)
    t_img = model.config.visual_tokens_per_image("hybrid") + 2
    kept = [vf.indices[offsets[i]:offsets[i + 1]].numpy() for i in range(len(samples))]
    turns = [answer_turns(s, e, t) for s, e, t in zip(samples, extra, tb.targets, strict=True)]

    def targets_for(supervision: AttentionSupervision):
        return build_targets(supervision, tb.sequences, turns, [s.scenes for s in samples], kept, tok.image_id,
                             t_img, model.config.discrete.num_codes, 8, tok.encode(":")[0])

    targets = targets_for(sup)
    return model, samples, tb, asm, sup, kept, targets, t_img, targets_for


def test_targets_point_at_named_patches_and_image_labels(batch):
    model, samples, tb, asm, sup, kept, t, t_img, _ = batch
    tok, codes = model.tokenizer, model.config.discrete.num_codes
    assert sup.role_layers == (1, 2) and sup.role_heads == (0, 3) and sup.label_layer == 0
    n_role = n_label = 0
    for b, layer, head, q, keys in zip(t.rows, t.layers, t.heads, t.queries, t.keys, strict=True):
        ids = tb.sequences[b]
        is_image = np.asarray(ids) == tok.image_id
        seq = np.arange(len(ids)) + (np.cumsum(is_image) - is_image) * (t_img - 1)
        starts = seq[is_image]
        text = torch.from_numpy(np.flatnonzero(~is_image))  # the id -> sequence map is assemble_batch's
        assert torch.equal(asm.inputs_embeds[b, torch.from_numpy(seq)[text]],
                           model.embed_ids(torch.tensor(ids)[text]).detach())
        (key_pos,) = np.nonzero(keys)
        if layer == sup.label_layer:
            assert head == sup.label_head
            # a visual token of image k attends to the digit of "Image k:"
            k = int(np.searchsorted(starts, q, side="right")) - 1
            assert starts[k] < q < starts[k] + t_img
            token = ids[int(np.flatnonzero(seq == key_pos[0])[0])]
            assert tok.decode([token]).strip() == str(k + 1)
            n_label += 1
        else:
            assert head in sup.role_heads and asm.labels[b, q + 1] != -100  # the query predicts an answer
            for k in np.unique(np.searchsorted(starts, key_pos, side="right") - 1):
                mine = key_pos[(key_pos > starts[k]) & (key_pos < starts[k] + t_img)]
                slots = mine - starts[k] - 1 - codes
                assert ((0 <= slots) & (slots < kept[b].shape[1])).all()
                on_object = np.zeros(len(slots), dtype=bool)
                for o in samples[b].scenes[k].objects:
                    on_object |= patch_labels([o.mask], 64, 8)[kept[b][k][slots]] > 0
                assert on_object.all()  # every key is a kept patch of a named object of its image
            n_role += 1
    assert n_role > 10 and n_label > 100


def test_without_patches_only_the_label_head_is_supervised(batch):
    """Discrete mode has no patches to point the role heads at."""
    from maven_edge.model_src.train import batches as B

    model, samples, _, _, sup, _, _, t_img, _ = batch
    tok = model.tokenizer
    tb = B.text_batch(samples, tok)
    no_patches = build_targets(
        sup, tb.sequences, [answer_turns(s, [], tg) for s, tg in zip(samples, tb.targets, strict=True)],
        [s.scenes for s in samples], [None] * len(samples), tok.image_id, t_img, 0, 8, tok.encode(":")[0])
    assert no_patches.rows and set(no_patches.layers) == {sup.label_layer}


def test_attention_loss_is_minus_log_of_the_target_mass_and_trains_the_heads(batch):
    model, _, _, asm, sup, _, t, _, _ = batch
    from maven_edge.model_src.modeling.decoder import record_attention

    with record_attention(model.llm, sup.layers, grad=True) as maps:
        model.llm(asm.inputs_embeds, asm.attention_mask)
    probs = dict(zip(sup.layers, maps, strict=True))
    loss = attention_loss(probs, t)
    by_hand = np.mean([
        -np.log(float(probs[lay][b, h, q, : len(k)][torch.from_numpy(k)].sum().detach()))
        for b, lay, h, q, k in zip(t.rows, t.layers, t.heads, t.queries, t.keys, strict=True)
    ])
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-4)
    loss.backward()
    for layer in sup.layers:
        assert model.llm.layers[layer].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.llm.lm_head.weight.grad is None  # the attention loss trains attention, not the head


def test_every_role_layer_gets_the_same_role_targets(batch):
    """The role heads of each role layer get the same (row, head, query, keys) targets as they
    would with that layer alone; the label targets do not depend on the role layers."""
    import dataclasses
    from collections import Counter

    _, _, _, _, sup, _, t, _, targets_for = batch
    one = dataclasses.replace(sup, role_layers=(1,))
    t1 = targets_for(one)

    def entries(tg, layer):
        return Counter((r, h, q, k.tobytes()) for r, lay, h, q, k in
                       zip(tg.rows, tg.layers, tg.heads, tg.queries, tg.keys, strict=True) if lay == layer)

    assert sup.layers == (0, 1, 2) and one.layers == (0, 1)
    assert entries(t1, 1) and not entries(t1, 2)
    assert entries(t, 1) == entries(t, 2) == entries(t1, 1)
    assert entries(t, 0) == entries(t1, 0)


def test_count_head_spreads_over_one_patch_per_counted_object_and_bos(batch):
    """With a count head, a count question's answer positions get <bos> plus one kept patch per
    counted object as keys (so a count n has n + 1 keys), and its loss is the cross-entropy
    against the uniform distribution over them; the other targets are unchanged."""
    import dataclasses

    from maven_edge.model_src.modeling.decoder import record_attention
    from maven_edge.model_src.train import batches as B
    from maven_edge.model_src.train.common import visual_embeds, visual_features

    model, _, _, _, sup, _, _, t_img, _ = batch
    tok = model.tokenizer
    samples = list(iter_samples("train", 8, tasks=("count", "count_across")))
    tb = B.text_batch(samples, tok)
    vf = visual_features(model, B.pixel_tensor(samples, model.config), "hybrid")
    offsets = np.concatenate([[0], np.cumsum(tb.image_counts)])
    kept = [vf.indices[offsets[i]:offsets[i + 1]].numpy() for i in range(len(samples))]
    turns = [answer_turns(s, [], tg) for s, tg in zip(samples, tb.targets, strict=True)]
    counting = AttentionSupervision.for_decoder(model.config.llm, 1.0, count_head=True)
    assert counting.count_layer == 1 and counting.count_head == 1 and counting.layers == (0, 1, 2)
    assert AttentionSupervision.for_decoder(model.config.llm, 1.0).count_layer is None
    three = dataclasses.replace(model.config.llm, num_heads=3, num_kv_heads=1)
    odd = AttentionSupervision.for_decoder(three, 1.0, count_head=True)
    assert odd.count_head not in odd.role_heads  # never one of the role heads
    from maven_edge.core.errors import TrainingError

    with pytest.raises(TrainingError, match="count_head"):
        AttentionSupervision.for_decoder(dataclasses.replace(three, num_heads=2), 1.0, count_head=True)

    def targets(s):
        return build_targets(s, tb.sequences, turns, [x.scenes for x in samples], kept, tok.image_id, t_img,
                             model.config.discrete.num_codes, 8, tok.encode(":")[0])

    with_count, without = targets(counting), targets(dataclasses.replace(counting, count_layer=None))
    plain = [(r, lay, h, q) for r, lay, h, q, u in zip(with_count.rows, with_count.layers, with_count.heads,
                                                        with_count.queries, with_count.uniform, strict=True) if not u]
    assert plain == list(zip(without.rows, without.layers, without.heads, without.queries, strict=True))
    assert sum(with_count.uniform) >= len(samples)  # every answer token of every count question
    for r, lay, h, k, u in zip(with_count.rows, with_count.layers, with_count.heads, with_count.keys,
                                with_count.uniform, strict=True):
        if u:
            assert (lay, h) == (1, 1) and k[0]
            counted = referents(question_line(samples[r]), samples[r].scenes)
            assert len(counted[0] if counted else []) == int(samples[r].answer)
            # one key per counted object that has a kept patch (this untrained selector drops some)
            visible = sum(bool((patch_labels([o.mask], 64, 8)[kept[r][img]] > 0).any())
                          for img, o in (counted[0] if counted else []))
            assert k.sum() == 1 + visible

    emb = visual_embeds(model, vf, "hybrid")
    asm = model.assemble_batch(tb.sequences, [emb[offsets[i]:offsets[i + 1]] for i in range(len(samples))],
                               tb.targets)
    with record_attention(model.llm, counting.layers, grad=True) as maps:
        model.llm(asm.inputs_embeds, asm.attention_mask)
    probs = dict(zip(counting.layers, maps, strict=True))
    by_hand = []
    for b, lay, h, q, k, u in zip(with_count.rows, with_count.layers, with_count.heads, with_count.queries,
                                  with_count.keys, with_count.uniform, strict=True):
        p = probs[lay][b, h, q, : len(k)].detach().double()[torch.from_numpy(k)]
        by_hand.append(float(-torch.log(p).mean()) if u else float(-torch.log(p.sum())))
    assert float(attention_loss(probs, with_count).detach()) == pytest.approx(np.mean(by_hand), rel=1e-4)
