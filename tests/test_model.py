"""MavenModel: token counts, patch selection, prompt assembly, input errors and generate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maven_edge.core.errors import ImageError, InputError, MavenError, PromptError
from maven_edge.core.sampling import GenerationConfig
from maven_edge.model_src.modeling.selector import select_patches

RATIOS = (0.1, 0.25, 0.5, 1.0)


# ---- token counts --------------------------------------------------------------------------


def test_encode_images_paper_geometry(reduced_paper_cfg, make_pixels):
    """576 patches at 336 px / 14 px; r=0.25 -> 144 kept -> 176 tokens, r=0.1 -> 57 -> 89."""
    from maven_edge.model_src.checkpoint import build_model

    model = build_model(reduced_paper_cfg, seed=0)
    px = make_pixels(2, cfg=reduced_paper_cfg)
    assert reduced_paper_cfg.num_patches == 576
    with torch.no_grad():
        for r, k, tokens in ((0.25, 144, 176), (0.1, 57, 89)):
            enc = model.encode_images(px, "hybrid", r)
            assert enc.patch_features.shape == (2, 576, 32)
            assert enc.selected_indices.shape == (2, k)
            assert enc.tokens_per_image == tokens
            assert enc.embeds.shape == (2, tokens + 2, reduced_paper_cfg.llm.hidden_size)
        assert model.encode_images(px, "discrete").tokens_per_image == 32
        assert model.encode_images(px, "continuous").tokens_per_image == 576


@pytest.mark.parametrize("mode", ["hybrid", "discrete", "continuous"])
def test_encode_images_tiny_modes(tiny_model, make_pixels, mode):
    cfg = tiny_model.config
    with torch.no_grad():
        enc = tiny_model.encode_images(make_pixels(3), mode)
    assert enc.tokens_per_image == cfg.visual_tokens_per_image(mode)
    lay = tiny_model.tokenizer.layout
    assert enc.codes.shape == (3, cfg.discrete.num_codes)
    assert bool(((enc.codes >= lay.visual_offset) & (enc.codes < lay.vocab_size)).all())
    start = tiny_model.embed_ids(torch.tensor([tiny_model.tokenizer.img_start_id]))[0]
    end = tiny_model.embed_ids(torch.tensor([tiny_model.tokenizer.img_end_id]))[0]
    assert torch.equal(enc.embeds[:, 0], start.expand(3, -1))
    assert torch.equal(enc.embeds[:, -1], end.expand(3, -1))
    if mode == "hybrid":
        assert enc.h_eos.shape == (3, cfg.llm.hidden_size)
        expected = torch.sort(torch.topk(enc.selector_logits, cfg.num_kept_patches(), -1).indices, -1).values
        assert torch.equal(enc.selected_indices, expected)
    else:
        assert enc.selected_indices is None


def test_images_are_encoded_independently(tiny_model, make_pixels):
    px = make_pixels(3, seed=1)
    with torch.no_grad():
        together = tiny_model.encode_images(px).embeds
        alone = tiny_model.encode_images(px[1:2]).embeds
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


# ---- selector --------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=1, max_size=600),
    r=st.sampled_from(RATIOS),
    batch=st.integers(1, 2),
)
def test_select_patches_is_sorted_topk(logits, r, batch):
    x = torch.tensor(logits, dtype=torch.float32)
    x = torch.stack([x, x.flip(0)][:batch])
    n = x.shape[1]
    k = max(1, int(np.floor(r * n + 1e-9)))
    idx = select_patches(x, k)
    assert idx.shape == (batch, k) and idx.dtype == torch.int64
    for b in range(batch):
        row = idx[b].tolist()
        assert row == sorted(row) and len(set(row)) == k  # raster order, no repeats
        # the kept values are the k largest (as a multiset, so ties cannot break the check)
        kept = sorted(x[b, row].tolist(), reverse=True)
        assert kept == sorted(x[b].tolist(), reverse=True)[:k]


@pytest.mark.parametrize("r", RATIOS)
def test_selector_counts_on_paper_geometry(r):
    from maven_edge.core.config import get_config

    cfg = get_config("paper")
    k = cfg.num_kept_patches(r)
    assert k == int(np.floor(r * 576))
    logits = torch.randn(2, 576, generator=torch.Generator().manual_seed(3))
    idx = select_patches(logits, k)
    assert idx.shape == (2, k)
    assert set(idx[0].tolist()) == set(torch.topk(logits[0], k).indices.tolist())
    assert bool((idx[:, 1:] > idx[:, :-1]).all())


# ---- prompt assembly --------------------------------------------------------------------------


def test_assemble_batch_splices_and_pads(tiny_model, make_pixels):
    tok = tiny_model.tokenizer
    with torch.no_grad():
        vis = tiny_model.encode_images(make_pixels(2)).embeds
        t_img = vis.shape[1]
        a = tok.encode_prompt("<image> and <image> differ?")
        b = tok.encode_prompt("<image>")
        for pad_left in (False, True):
            batch = tiny_model.assemble_batch(
                [a, b], [vis, vis[:1]], targets=[[False] * (len(a) - 1) + [True], [False] * len(b)],
                pad_left=pad_left,
            )
            len_a, len_b = len(a) - 2 + 2 * t_img, len(b) - 1 + t_img
            assert batch.inputs_embeds.shape == (2, len_a, tiny_model.config.llm.hidden_size)
            assert batch.attention_mask.sum(1).tolist() == [len_a, len_b]
            row_b = batch.attention_mask[1]
            assert (row_b[-len_b:] if pad_left else row_b[:len_b]).all()
            # only the last text token of `a` is a label; prompt and visual tokens are -100
            assert (batch.labels[0] != -100).sum() == 1 and batch.labels[0, -1] == a[-1]
            assert (batch.labels[1] == -100).all()
            # the first image sits right after <bos> in sample a
            torch.testing.assert_close(batch.inputs_embeds[0, 1 : 1 + t_img], vis[0])


def test_image_slots_add_slot_k_to_the_kth_image(make_pixels):
    from maven_edge.core.config import get_config
    from maven_edge.core.errors import ConfigError
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.train.stages import enable_image_slots

    model = build_model(get_config("tiny"), seed=0)
    tok = model.tokenizer
    assert model.image_slot_embeds(2) is None
    ids = tok.encode_prompt("Image 1: <image>\nImage 2: <image>\nQuestion: which?")
    with torch.no_grad():
        vis = model.encode_images(make_pixels(2)).embeds
        plain = model.assemble_batch([ids], [vis]).inputs_embeds
        enable_image_slots(model)  # zero vectors: the model is unchanged
        assert model.config.image_slots
        torch.testing.assert_close(model.assemble_batch([ids], [vis]).inputs_embeds, plain, rtol=0, atol=0)
        slot_rows = tok.layout.image_slot_ids(model.config.max_images)
        model.llm.embed_tokens.weight[slot_rows] = torch.randn(len(slot_rows), plain.shape[-1])
        with_slots = model.assemble_batch([ids], [vis]).inputs_embeds
    diff = (with_slots - plain)[0]
    t_img = vis.shape[1]
    starts = [i for i, t in enumerate(ids) if t == tok.image_id]
    starts = [starts[0], starts[1] + t_img - 1]  # positions after splicing the first image
    slots = model.image_slot_embeds(2)
    for k, s in enumerate(starts):
        torch.testing.assert_close(diff[s : s + t_img], slots[k].expand(t_img, -1))
    covered = torch.zeros(diff.shape[0], dtype=torch.bool)
    for s in starts:
        covered[s : s + t_img] = True
    assert (diff[~covered] == 0).all()  # text tokens untouched
    with pytest.raises(ImageError, match="exceed the limit"):
        model.image_slot_embeds(model.config.max_images + 1)
    with pytest.raises(ConfigError, match="lower max_images"):
        build_model(get_config("tiny", ["image_slots=true", "max_images=64"]), seed=0)


def test_projector_output_scale_is_a_constant_multiplier():
    """`projector.output_scale` multiplies the projector's output (same weights, same seed) and is
    not a parameter; configs without it load as 1.0 (LLaVA); a scale <= 0 is refused."""
    from maven_edge.core.config import MavenConfig, get_config
    from maven_edge.core.errors import ConfigError
    from maven_edge.model_src.checkpoint import build_model

    plain = build_model(get_config("tiny"), seed=0)
    scaled = build_model(get_config("tiny", ["projector.output_scale=0.025"]), seed=0)
    assert {n for n, _ in plain.projector.named_parameters()} == {n for n, _ in scaled.projector.named_parameters()}
    feats = torch.randn(2, 5, plain.config.vision.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(scaled.projector(feats), plain.projector(feats) * 0.025)
    legacy = plain.config.to_dict()
    del legacy["projector"]["output_scale"]
    assert MavenConfig.from_dict(legacy).projector.output_scale == 1.0
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ConfigError, match="output_scale"):
            get_config("tiny", [f"projector.output_scale={bad}"])


def test_placeholder_count_mismatch(tiny_model, make_pixels):
    tok = tiny_model.tokenizer
    px = make_pixels(1)
    with pytest.raises(PromptError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)") as exc:
        tiny_model.generate(px, "<image> vs <image>?", GenerationConfig(max_new_tokens=2))
    assert isinstance(exc.value, MavenError)
    with pytest.raises(PromptError, match=r"0 <image> placeholder\(s\) but 1 image"):
        tiny_model.generate(px, "no placeholder", GenerationConfig(max_new_tokens=2))
    with torch.no_grad():
        vis = tiny_model.encode_images(px).embeds
    with pytest.raises(PromptError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        tiny_model.assemble_batch([tok.encode_prompt("<image>")], [torch.cat([vis, vis])])
    with pytest.raises(PromptError, match="placeholder"):
        tiny_model.assemble_batch([tok.encode_prompt("<image><image>")], [vis])


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 32, 32), r"shape \[images, 3, 64, 64\], got \(1, 3, 32, 32\)"),
        ((1, 1, 64, 64), r"got \(1, 1, 64, 64\)"),
        ((1, 4, 64, 64), r"got \(1, 4, 64, 64\)"),
        ((3, 64, 64), r"got \(3, 64, 64\)"),
    ],
)
def test_bad_pixel_values(tiny_model, shape, match):
    px = torch.zeros(shape)
    prompt = "<image>" * (shape[0] if len(shape) == 4 else 3)
    with pytest.raises(ImageError, match=match):
        tiny_model.generate(px, prompt, GenerationConfig(max_new_tokens=1))
    with pytest.raises(ImageError, match="preprocess images"):
        tiny_model.encode_images(px)


def test_too_many_images(tiny_model, make_pixels):
    n = tiny_model.config.max_images + 1
    with pytest.raises(ImageError, match=rf"{n} images exceed the limit of {n - 1}") as exc:
        tiny_model.generate(make_pixels(n), "<image>" * n, GenerationConfig(max_new_tokens=1))
    assert isinstance(exc.value, InputError)


def test_context_overflow(tiny_model, make_pixels):
    limit = tiny_model.config.llm.max_position_embeddings
    with pytest.raises(PromptError, match=rf"over the context limit of {limit}"):
        tiny_model.generate(make_pixels(1), "<image> hi", GenerationConfig(max_new_tokens=limit))
    with pytest.raises(PromptError, match="context limit"):
        tiny_model.generate(make_pixels(0), "word " * limit, GenerationConfig(max_new_tokens=1))


def test_bad_generation_options(tiny_model, make_pixels):
    for gen in (
        GenerationConfig(max_new_tokens=0),
        GenerationConfig(do_sample=True, temperature=0.0),
        GenerationConfig(top_p=0.0),
        GenerationConfig(top_k=-1),
    ):
        with pytest.raises(InputError):
            tiny_model.generate(make_pixels(1), "<image>", gen)


# ---- generate() ---------------------------------------------------------------------------------

PROMPT = "<image> <image> Question: What changed between image 1 and image 2? Answer:"


@pytest.fixture(scope="module")
def px2(make_pixels):
    return make_pixels(2, seed=5)


def test_greedy_is_deterministic(tiny_model, px2):
    gen = GenerationConfig(max_new_tokens=8)
    a = tiny_model.generate(px2, PROMPT, gen)
    b = tiny_model.generate(px2, PROMPT, gen)
    assert a == b and len(a[0]) >= 1
    assert all(t < tiny_model.tokenizer.layout.tokenizer_size for t in a[0])  # never visual codes
    # a prompt given as ids gives the same result, and stream_tokens yields the same tokens
    ids = tiny_model.tokenizer.encode_prompt(PROMPT)
    assert tiny_model.generate(px2, ids, gen) == a
    assert list(tiny_model.stream_tokens(px2, PROMPT, gen)) == a[0]
    seen: list[int] = []
    tiny_model.generate(px2, PROMPT, gen, on_token=seen.append)
    assert seen == a[0]


def test_text_only_prompt(tiny_model, make_pixels):
    ids, text = tiny_model.generate(make_pixels(0), "Describe the image.", GenerationConfig(max_new_tokens=3))
    assert 1 <= len(ids) <= 3 and isinstance(text, str)


def test_sampling_seeds(tiny_model, px2):
    def run(seed):
        return tiny_model.generate(
            px2, PROMPT, GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=seed)
        )[0]

    assert run(1) == run(1)
    outs = {tuple(run(s)) for s in (1, 2, 3)}
    assert len(outs) > 1, "different seeds should (almost always) give different samples"


def test_max_new_tokens(tiny_model, px2):
    short = tiny_model.generate(px2, PROMPT, GenerationConfig(max_new_tokens=3))[0]
    long = tiny_model.generate(px2, PROMPT, GenerationConfig(max_new_tokens=10))[0]
    assert len(short) <= 3 and long[: len(short)] == short
    if len(long) >= 3:
        assert len(short) == 3


def _sampled(model, px, **kw):
    return model.generate(
        px, PROMPT, GenerationConfig(max_new_tokens=24, do_sample=True, temperature=2.0, seed=11, **kw)
    )


def test_stop_token_ids(tiny_model, px2):
    full, _ = _sampled(tiny_model, px2)
    assert len(full) > 4
    stop = full[3]
    cut = full.index(stop)
    ids, text = _sampled(tiny_model, px2, stop_token_ids=(stop,))
    assert ids == full[:cut]  # the stop token itself is not returned
    assert text == tiny_model.tokenizer.decode(full[:cut])


def test_eos_stops(tiny_model, px2):
    full, _ = _sampled(tiny_model, px2)
    eos = tiny_model.tokenizer.eos_id
    assert eos not in full  # EOS always stops generation
    ids, _ = _sampled(tiny_model, px2, stop_token_ids=(full[0],))
    assert ids == []


def test_stop_strings(tiny_model, px2):
    full_ids, full_text = _sampled(tiny_model, px2)
    candidates = [
        full_text[i : i + 2]
        for i in range(1, len(full_text) - 1)
        if full_text[i : i + 2].isascii() and full_text[i : i + 2].strip()
    ]
    assert candidates, f"sampled text too short for the test: {full_text!r}"
    stop = candidates[len(candidates) // 2]
    ids, text = _sampled(tiny_model, px2, stop_strings=(stop,))
    assert text == full_text[: full_text.index(stop)]
    assert stop not in text
    assert len(ids) < len(full_ids) and ids == full_ids[: len(ids)]
    assert stop in tiny_model.tokenizer.decode(ids)  # generation stopped right after the stop string appeared
    assert stop not in tiny_model.tokenizer.decode(ids[:-1])
