"""The visual-token budget (core/budget.py): property tests of the selection and of the prompt it
gives, and the torch reference's budget path (encode_images, generate, the batched evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maven_edge.core.budget import min_budget, per_image_budget, select_under_budget, visual_tokens
from maven_edge.core.errors import InputError, PromptError
from maven_edge.core.prompt import check_context, plan_prompt, splice

IMAGE = -1  # placeholder id in the prompt-plan tests


@st.composite
def requests(draw):
    n = draw(st.integers(1, 8))
    patches = draw(st.sampled_from([4, 16, 64]))
    codes = draw(st.integers(0, 32))
    min_patches = draw(st.integers(0, min(3, patches)))
    # few distinct values, so ties are common
    scores = np.array(draw(st.lists(st.integers(-3, 3), min_size=n * patches, max_size=n * patches)),
                      dtype=np.float32).reshape(n, patches) / 2
    budget = draw(st.integers(min_budget(n, codes, min_patches), n * (codes + patches) + 20))
    return scores, budget, codes, min_patches


@settings(max_examples=100, deadline=None)
@given(requests())
def test_selection_never_exceeds_the_budget_and_fills_it(req):
    scores, budget, codes, min_patches = req
    n, num_patches = scores.shape
    kept = select_under_budget(scores, budget, codes, min_patches)
    assert len(kept) == n
    total = visual_tokens(kept, codes)
    assert total <= budget
    assert total == min(budget, n * (codes + num_patches))  # the budget is used up, or every patch is kept
    for k in kept:
        assert k.dtype == np.int64 and len(k) >= min_patches
        assert np.all(np.diff(k) > 0)  # raster order, no repeats
        assert k.size == 0 or (k[0] >= 0 and k[-1] < num_patches)


@settings(max_examples=100, deadline=None)
@given(requests())
def test_patches_beyond_the_minimum_are_the_best_of_all_images(req):
    """Global ranking: no dropped patch scores higher than a kept one that is not one of its image's
    guaranteed `min_patches` best."""
    scores, budget, codes, min_patches = req
    kept = select_under_budget(scores, budget, codes, min_patches)
    extra, dropped = [], []
    for i, k in enumerate(kept):
        order = np.argsort(-scores[i], kind="stable")
        guaranteed = set(order[:min_patches].tolist())
        mask = np.zeros(scores.shape[1], dtype=bool)
        mask[k] = True
        extra += [scores[i, j] for j in np.flatnonzero(mask) if j not in guaranteed]
        dropped += scores[i, ~mask].tolist()
    if extra and dropped:
        assert min(extra) >= max(dropped)


@settings(max_examples=100, deadline=None)
@given(requests(), st.integers(0, 40), st.integers(0, 5))
def test_the_assembled_prompt_holds_exactly_the_selected_tokens(req, text_len, gap):
    """The prompt plan of a budgeted request: visual positions = the kept tokens plus two markers
    per image, never more than budget + 2 n; splice puts each image's sequence at its placeholder."""
    scores, budget, codes, min_patches = req
    n = scores.shape[0]
    kept = select_under_budget(scores, budget, codes, min_patches)
    per = [codes + len(k) for k in kept]
    ids = list(range(text_len)) + [t for _ in range(n) for t in ([IMAGE] + list(range(gap)))]
    plan = plan_prompt(ids, IMAGE, n, per)
    assert plan.image_tokens == tuple(per) and plan.tokens_per_image == max(per)
    assert plan.visual_tokens == sum(per) + 2 * n <= budget + 2 * n
    assert plan.total_tokens == len(ids) - n + plan.visual_tokens
    text = np.zeros((len(ids), 1))
    visual = [np.full((p + 2, 1), k + 1.0) for k, p in enumerate(per)]
    out = splice(plan, text, visual, np.concatenate)
    assert out.shape[0] == plan.total_tokens
    assert [int(v) for v in np.unique(out[out > 0])] == [k + 1 for k in range(n) if per[k] + 2 > 0]
    check_context(plan, 0, plan.total_tokens)
    with pytest.raises(PromptError, match="visual-token budget"):
        check_context(plan, 1, plan.total_tokens)


def test_budget_edge_cases_and_errors():
    scores = np.array([[0.9, 0.1, 0.5, 0.2], [0.8, 0.7, 0.6, 0.0]], dtype=np.float32)
    # 2 images x 2 codes + 3 patches: each its best, then the best left of both (0.7 in image 2)
    kept = select_under_budget(scores, 2 * 2 + 3, codes_per_image=2, min_patches=1)
    assert [k.tolist() for k in kept] == [[0], [0, 1]]
    # min_patches 0 lets an image keep codes only
    kept = select_under_budget(scores, 2 * 2 + 2, codes_per_image=2, min_patches=0)
    assert [k.tolist() for k in kept] == [[0], [0]]
    kept = select_under_budget(scores, 2 * 2 + 3, codes_per_image=2, min_patches=0)
    assert [k.tolist() for k in kept] == [[0], [0, 1]]
    assert [k.tolist() for k in select_under_budget(scores, 10**6, 2)] == [[0, 1, 2, 3]] * 2
    assert select_under_budget(np.zeros((0, 4)), 0, 2) == []
    assert per_image_budget(8, 32, 8) == 320 and min_budget(8, 32, 1) == 264
    with pytest.raises(InputError, match="raise the budget to >= 264"):
        select_under_budget(np.zeros((8, 64)), 4 * 48, 32, 1)  # 8 images cannot fit 4 images' default
    for bad in (np.zeros(4), np.array([[np.nan, 0.0]])):
        with pytest.raises(InputError):
            select_under_budget(bad, 100, 2)
    with pytest.raises(InputError, match="integer"):
        select_under_budget(scores, 10.5, 2)  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="2 visual-token counts for 3"):
        plan_prompt([IMAGE] * 3, IMAGE, 3, [1, 2])


def test_reference_model_budget_paths_agree(tiny_model):
    """encode_images with a budget keeps codes + patches within it; the batched evaluation's budget
    path gives the answers and selections of MavenModel.generate with the same budget; a budget of
    every patch keeps every patch."""
    import torch

    from maven_edge.core.preprocess import preprocess_images
    from maven_edge.core.sampling import GenerationConfig
    from maven_edge.model_src.data.splits import iter_samples
    from maven_edge.model_src.train.evaluate import greedy_batch

    cfg = tiny_model.config
    q, n_patches = cfg.discrete.num_codes, cfg.num_patches
    samples = [s for s in iter_samples("test", 12, families=["multi"]) if len(s.images) >= 3][:2]
    budget = len(samples[0].images) * (q + 4) + 3
    px = torch.from_numpy(preprocess_images(samples[0].images, cfg.preprocess))
    with torch.no_grad():
        enc = tiny_model.encode_images(px, "hybrid", visual_token_budget=budget)
    assert sum(enc.image_tokens) == budget and min(enc.image_tokens) >= q + 1
    assert all(e.shape[0] == t + 2 for e, t in zip(enc.embeds, enc.image_tokens, strict=True))
    answers, _, sel = greedy_batch(tiny_model, samples[:1], "hybrid", visual_token_budget=budget, max_new_tokens=4)
    ids, _ = tiny_model.generate(px, samples[0].prompt, GenerationConfig(max_new_tokens=4), visual_token_budget=budget)
    assert answers[0] == tiny_model.tokenizer.decode(ids)
    assert [k.tolist() for k in sel[0]] == [k.tolist() for k in enc.selected_indices]
    with torch.no_grad():
        full = tiny_model.encode_images(px, "hybrid", visual_token_budget=10**6)
    assert full.image_tokens == [q + n_patches] * len(samples[0].images)
    with pytest.raises(InputError, match="hybrid"):
        tiny_model.encode_images(px, "discrete", visual_token_budget=budget)
    with pytest.raises(InputError, match="raise the budget"):
        tiny_model.generate(px, samples[0].prompt, visual_token_budget=q)
