"""h_eos read in context (``GenerateOptions.h_eos="context"``, docs/design.md §5.2): the prefill
stops after each image's codes, reads <eos_vis> there and goes on with the kept patches — no
separate h_eos pass. Same tokens and kept patches on every backend and decoder, with and without
the caches and batching; the separate pass stays the default."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from maven_edge.core.errors import InputError
from maven_edge.export.genai_decoder import builder_unavailable
from maven_edge.runtime.caches import PrefixHit
from maven_edge.runtime.options import NO_CACHING, CachingOptions
from maven_edge.runtime.pipeline import MavenPipeline


@pytest.fixture(scope="module")
def model():
    from tools.soak import build_test_model

    return build_test_model()


@pytest.fixture(scope="module")
def torch_pipe(model):
    from maven_edge.runtime.backends.torch_backend import TorchBackend

    return MavenPipeline(TorchBackend(model), caching=NO_CACHING)


@pytest.fixture(scope="module", params=["torch", "genai"])
def ort_backend(request, pytestconfig, model):
    """Both decoders: torch.onnx's (present = past + new: rewinding copies) and the builder's
    shared KV buffer (rewinding moves the length back)."""
    from maven_edge.runtime.backends.ort_backend import OrtBackend
    from tools.soak import cached_test_artifacts

    if request.param == "genai" and builder_unavailable() is not None:
        pytest.skip(str(builder_unavailable()))
    art = cached_test_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"), model, decoder=request.param)
    return OrtBackend(art, session_options={"intra_op_num_threads": 1})


@pytest.fixture(scope="module")
def questions():
    from maven_edge.model_src.data import iter_samples

    # single, multi (2-8 images) and video questions of the test split
    return [(s.images, s.prompt) for s in iter_samples("test", 16)]


def test_in_context_equals_the_torch_backend(ort_backend, torch_pipe, questions):
    pipe = MavenPipeline(ort_backend, caching=NO_CACHING)
    differs = 0
    for images, prompt in questions:
        got = pipe.generate(images, prompt, max_new_tokens=8, h_eos="context")
        want = torch_pipe.generate(images, prompt, max_new_tokens=8, h_eos="context")
        assert got.token_ids == want.token_ids
        assert got.selected_indices == want.selected_indices
        assert got.timings.h_eos_ms == 0.0  # no separate pass: it is inside the prefill
        assert got.prompt_tokens == pipe.prepare_prompt(prompt, len(images))
        separate = pipe.generate(images, prompt, max_new_tokens=8)
        differs += separate.selected_indices != got.selected_indices
    # the random test model's selection does depend on where h_eos is read: the test compares something
    assert differs > 0


def test_the_separate_pass_stays_the_default(ort_backend, questions):
    pipe = MavenPipeline(ort_backend, caching=NO_CACHING)
    images, prompt = questions[3]
    a = pipe.generate(images, prompt, max_new_tokens=4)
    b = pipe.generate(images, prompt, max_new_tokens=4, h_eos="separate")
    assert a.token_ids == b.token_ids and a.selected_indices == b.selected_indices
    assert a.timings.h_eos_ms > 0.0


def test_caches_and_batching_change_nothing_in_context(ort_backend, questions):
    plain = MavenPipeline(ort_backend, caching=NO_CACHING)
    cached = MavenPipeline(ort_backend, caching=CachingOptions(visual_cache_mb=16, prefix_cache_mb=32, max_batch=4))
    for images, prompt in questions[:8]:
        want = plain.generate(images, prompt, max_new_tokens=8, h_eos="context")
        first = cached.generate(images, prompt, max_new_tokens=8, h_eos="context")
        again = cached.generate(images, prompt, max_new_tokens=8, h_eos="context")
        for res in (first, again):
            assert res.token_ids == want.token_ids and res.selected_indices == want.selected_indices
        assert again.cache.visual_hits == len(images)
        assert again.cache.prefix_tokens_reused == again.prompt_tokens - 1  # all but the last position
        # a follow-up turn: the conversation so far is the reused prefix, kept patches included
        follow = prompt + " " + want.text + "\nQuestion: and again?\nAnswer:"
        turn = cached.generate(images, follow, max_new_tokens=6, h_eos="context")
        ref = plain.generate(images, follow, max_new_tokens=6, h_eos="context")
        assert turn.token_ids == ref.token_ids and turn.selected_indices == ref.selected_indices
    # the separate pass's cache entries are not mixed with these: same images, other sequences
    images, prompt = questions[0]
    sep = cached.generate(images, prompt, max_new_tokens=8)
    assert sep.token_ids == plain.generate(images, prompt, max_new_tokens=8).token_ids


def test_a_prefix_without_noted_patches_is_cut_back_to_the_image(ort_backend, questions, monkeypatch):
    """A reused prefix that covers an image's kept patches but does not say which they were (or
    covers them only in part) restarts at that image's first kept patch: its h_eos is read again."""
    pipe = MavenPipeline(ort_backend, caching=CachingOptions(visual_cache_mb=0, prefix_cache_mb=32, max_batch=1))
    images, prompt = next(q for q in questions if len(q[0]) >= 2)
    want = pipe.generate(images, prompt, max_new_tokens=8, h_eos="context")
    lookup = pipe.prefix_cache.lookup
    seen = []

    def forgetful(fingerprint, keys):
        hit = lookup(fingerprint, keys)
        if hit.kv is not None:  # drop the notes, and end the prefix in the middle of the last image
            hit = PrefixHit(hit.length, dataclasses.replace(hit.kv, selections=hit.kv.selections[:1]))
        seen.append(hit.length)
        return hit

    monkeypatch.setattr(pipe.prefix_cache, "lookup", forgetful)
    again = pipe.generate(images, prompt, max_new_tokens=8, h_eos="context")
    assert again.token_ids == want.token_ids and again.selected_indices == want.selected_indices
    starts = [p for p, _, _ in want_selections(pipe, images, prompt)]
    assert again.cache.prefix_tokens_reused == starts[1] < seen[0]


def want_selections(pipe, images, prompt):
    """(first kept position, ...) per image, from the prompt plan."""
    req = pipe._validate(images, prompt, pipe._options(None, {"h_eos": "context"}))
    q = pipe.config.discrete.num_codes
    out, pos = [], 0
    for a, b, image in req.plan.segments():
        pos += b - a
        if image is not None:
            out.append((pos + 1 + q, None, None))
            pos += req.plan.tokens_of(image) + 2
    return out


def test_bad_uses_are_input_errors(ort_backend, questions):
    pipe = MavenPipeline(ort_backend, caching=NO_CACHING)
    images, prompt = questions[4]
    with pytest.raises(InputError, match="h_eos must be one of"):
        pipe.generate(images, prompt, h_eos="inline")
    with pytest.raises(InputError, match="use one or the other"):
        pipe.generate(images, prompt, h_eos="context", visual_token_budget=200)
    # modes without a selector have no h_eos: the option changes nothing there
    a = pipe.generate(images, prompt, max_new_tokens=4, mode="continuous", h_eos="context")
    b = pipe.generate(images, prompt, max_new_tokens=4, mode="continuous")
    assert a.token_ids == b.token_ids


def test_chunked_prefill_primitives_equal_one_prefill(ort_backend):
    """start + extend in pieces (with a rewound probe between them) = one prefill."""
    be = ort_backend
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 40, be.config.llm.hidden_size)).astype(np.float32)
    want, full = be.prefill(x, 48)
    state = be.start(48)
    be.extend(state, x[:, :15])
    be.extend(state, rng.standard_normal((1, 1, x.shape[2])).astype(np.float32))  # a probe, then forgotten
    be.rewind(state, 15)
    logits, hidden = be.extend(state, x[:, 15:])
    assert state.length == full.length == 40
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    assert hidden.shape == (be.config.llm.hidden_size,)
    np.testing.assert_allclose(be.decode(state, 5), be.decode(full, 5), rtol=1e-4, atol=1e-4)
