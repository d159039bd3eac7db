"""Reliability of request inputs (issue 8, parts 1 and 2): prompts, options and images end to end.

What a caller sends either gets an answer or a :class:`MavenError` subclass that says what was
wrong, and a refused request is refused *before any model runs*: the tests count every
onnxruntime ``Session.run`` / ``run_with_iobinding`` call and pass images that fail the test if
they are read. The exhaustive image set (every PIL mode, EXIF, truncation, bombs, byte fuzzing)
is tests/test_preprocess.py; here a few representative images go through the whole pipeline.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from maven_edge.core.errors import ImageError, InputError, MavenError, PromptError
from maven_edge.core.tokenizer import SPECIAL_TOKENS

SOAK = bool(os.environ.get("MAVEN_SOAK"))
PROMPT_FUZZ_EXAMPLES = 3000 if SOAK else 200  # prepare_prompt only: no model runs
OPTION_FUZZ_EXAMPLES = 1000 if SOAK else 60  # generate, at most 2 new tokens
FUZZ = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ONE_IMAGE = "<image>\nQuestion: what color is the circle?\nAnswer:"
DEMO_IMAGE = str(Path(__file__).resolve().parents[1] / "model_src" / "samples" / "demo_1.png")


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def artifacts(pytestconfig) -> Path:
    from tools.soak import cached_test_artifacts

    return cached_test_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"))


@pytest.fixture(scope="module")
def pipe(artifacts):
    from tools.soak import load_pipeline

    return load_pipeline(artifacts)


@pytest.fixture(scope="module")
def pool() -> dict[str, Any]:
    from tools.soak import image_pool

    return image_pool()


class SessionRuns:
    """Counts every onnxruntime session call in the process (all components, all pipelines)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        self.calls = 0
        for name in ("run", "run_with_iobinding"):
            orig = getattr(InferenceSession, name)

            def counted(*a: Any, _orig=orig, **k: Any) -> Any:
                self.calls += 1
                return _orig(*a, **k)

            monkeypatch.setattr(InferenceSession, name, counted)


@pytest.fixture
def runs(monkeypatch) -> SessionRuns:
    return SessionRuns(monkeypatch)


class TouchedTripwire(BaseException):
    """Not an Exception, so that no `except Exception` on the way can turn it into an ImageError."""


class Tripwire(io.RawIOBase):
    """An image source that fails the test if anything reads it."""

    def readable(self) -> bool:
        return True

    def read(self, *a: Any) -> bytes:
        raise TouchedTripwire("an image was read for a request that should have been refused first")

    readinto = read


def refused(runs: SessionRuns, fn, exc: type[MavenError], match: str) -> MavenError:
    before = runs.calls
    with pytest.raises(exc, match=match) as info:
        fn()
    assert runs.calls == before, "a model ran for a request that was refused"
    return info.value


# ---- prompts: empty, long, context overflow ---------------------------------------------------------


def test_empty_prompt_is_served_as_bos_only(pipe):
    """Policy: an empty (or blank) prompt without images is a valid request: the model continues
    from <bos>. With images it is a placeholder mismatch (next test)."""
    for prompt in ("", " ", "\n"):
        res = pipe.generate([], prompt, max_new_tokens=3)
        assert res.prompt_tokens == 1 + len(pipe.tokenizer.encode(prompt))
        assert len(res.token_ids) <= 3 and res.visual_tokens_per_image == []


def test_empty_prompt_with_an_image_is_refused(pipe, runs):
    refused(
        runs,
        lambda: pipe.generate([Tripwire()], "", max_new_tokens=2),
        PromptError,
        r"0 <image> placeholder\(s\) but 1 image",
    )


@pytest.mark.parametrize("case", ["long_text", "visual_tokens", "new_tokens", "text_and_images"])
def test_context_overflow_is_refused_before_anything_runs(pipe, runs, case):
    from maven_edge.runtime.options import PipelineLimits
    from maven_edge.runtime.pipeline import MavenPipeline

    limit = pipe.config.llm.max_position_embeddings
    n_cont = limit // pipe.config.num_patches + 1  # continuous mode: N visual tokens per image
    prompt, images, opts = {
        "long_text": ("word " * limit, [], {}),
        "visual_tokens": ("<image>" * n_cont, [Tripwire() for _ in range(n_cont)], {"mode": "continuous"}),
        "new_tokens": ("hello", [], {"max_new_tokens": limit}),
        "text_and_images": ("<image>" * 4 + " word" * (limit - 4 * 50), [Tripwire() for _ in range(4)], {}),
    }[case]
    assert len(prompt) <= pipe.limits.max_prompt_chars
    pipe = MavenPipeline(
        pipe.backend, PipelineLimits(max_images=max(len(images), 1))
    )  # the image count is fine
    err = refused(
        runs,
        lambda: pipe.generate(images, prompt, **{"max_new_tokens": 4, **opts}),
        PromptError,
        rf"over the context limit of {limit}",
    )
    assert "use fewer images, a shorter prompt" in str(err)


def test_prompt_over_the_character_limit_is_refused_before_tokenization(pipe, runs, monkeypatch):
    from maven_edge.runtime.options import PipelineLimits
    from maven_edge.runtime.pipeline import MavenPipeline

    small = MavenPipeline(pipe.backend, PipelineLimits(max_prompt_chars=1000))

    def tripwire(*a: Any) -> None:
        raise AssertionError("tokenized a prompt that is over the character limit")

    monkeypatch.setattr(small.tokenizer, "encode_prompt", tripwire)
    refused(
        runs, lambda: small.generate([], "x" * 1001), PromptError, "1001 characters, over the limit of 1000"
    )
    big = "<image>" * 10**6  # 7 MB of placeholders: still refused by length, not parsed
    refused(runs, lambda: pipe.generate([], big), PromptError, "over the limit of 100000")


# ---- prompts: encodings, control characters, special tokens -------------------------------------------


@pytest.mark.parametrize(
    "raw", [b"\xff", b"caf\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"ok \x80 no", b"\xf8\x88\x80\x80\x80"]
)
def test_invalid_utf8_bytes_are_refused(pipe, runs, raw):
    refused(runs, lambda: pipe.generate([], raw, max_new_tokens=2), PromptError, "not valid UTF-8")


def test_valid_utf8_bytes_are_decoded(pipe):
    a = pipe.generate([], "caf\u00e9 \u2603 \U0001f600".encode(), max_new_tokens=3)
    b = pipe.generate([], "caf\u00e9 \u2603 \U0001f600", max_new_tokens=3)
    assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens


@pytest.mark.parametrize("prompt", ["\ud800", "abc\udfffdef", "<image>\udbff"])
def test_lone_surrogates_are_refused(pipe, runs, prompt):
    images = [Tripwire()] * prompt.count("<image>")
    refused(runs, lambda: pipe.generate(images, prompt, max_new_tokens=2), PromptError, "cannot be tokenized")


CONTROL = [
    "\x00",
    "\x00" * 50,
    "\x1b[2J\x1b[31mred",
    "\r\n\t\x0b\x0c",
    "\u202e\u202d",
    "\u200b\u200d\ufeff",
    "\x7f\x85\x9f",
    "\ufffd\uffff",
    "\U0010ffff",
    "e\u0301" * 20,
]


@pytest.mark.parametrize("text", CONTROL, ids=[repr(c)[:12] for c in CONTROL])
def test_control_and_odd_characters_are_plain_text(pipe, text):
    tok = pipe.tokenizer
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level BPE: nothing lost, nothing added
    res = pipe.generate([], f"Question: {text}?\nAnswer:", max_new_tokens=2)
    assert res.prompt_tokens == 1 + len(tok.encode(f"Question: {text}?\nAnswer:"))


@pytest.mark.parametrize("special", [t for t in SPECIAL_TOKENS if t != "<image>"])
def test_typed_special_token_text_is_not_a_special_token(pipe, special):
    tok = pipe.tokenizer
    prompt = f"{special} Question: {special}?{special}\nAnswer:"
    ids = tok.encode_prompt(prompt)
    specials = set(tok.layout.special_ids.values())
    assert ids[0] == tok.bos_id and not specials & set(ids[1:]), ids
    res = pipe.generate([], prompt, max_new_tokens=3)
    assert res.prompt_tokens == len(ids) and res.visual_tokens_per_image == []


def test_only_the_exact_image_placeholder_is_recognised(pipe, pool):
    """<image> is the one piece of markup a prompt has (by design); its near misses are text."""
    tok = pipe.tokenizer
    for text in ("<Image>", "< image>", "<image", "image>", "<img>", "&lt;image&gt;", "<im\u200bage>"):
        assert pipe.prepare_prompt(text, 0) == 1 + len(tok.encode(text))
    assert tok.encode_prompt("<<image>>").count(tok.image_id) == 1
    res = pipe.generate([pool["scene0"]], "<<image>> <img_start>", max_new_tokens=2)
    assert res.visual_tokens_per_image == [pipe.config.visual_tokens_per_image("hybrid", res.keep_ratio)]


_PROMPT_PIECES = st.one_of(
    st.text(max_size=12),
    st.sampled_from([*SPECIAL_TOKENS, "<", ">", "<image", "\x00", "\ud800", "\u202e", "\r\n"]),
)


@settings(max_examples=PROMPT_FUZZ_EXAMPLES, **FUZZ)
@given(pieces=st.lists(_PROMPT_PIECES, max_size=8), n_images=st.integers(0, 3))
def test_fuzz_prompt_text_only_prompt_errors(pipe, pieces, n_images):
    """Any text: either a prompt length, or a PromptError (placeholder mismatch or an unencodable
    character). Typed special tokens never become special ids."""
    prompt = "".join(pieces)
    placeholders = prompt.count("<image>")
    try:
        length = pipe.prepare_prompt(prompt, n_images, max_new_tokens=1)
    except PromptError as exc:
        assert placeholders != n_images or any("\ud800" <= c <= "\udfff" for c in prompt), exc
        return
    assert placeholders == n_images
    ids = pipe.tokenizer.encode_prompt(prompt)
    assert ids.count(pipe.tokenizer.image_id) == placeholders
    others = set(pipe.tokenizer.layout.special_ids.values()) - {pipe.tokenizer.image_id}
    assert not others & set(ids[1:])
    assert length == len(ids) + n_images * (pipe.config.visual_tokens_per_image("hybrid", None) + 1)


@settings(max_examples=PROMPT_FUZZ_EXAMPLES, **FUZZ)
@given(raw=st.binary(max_size=64))
def test_fuzz_prompt_bytes(pipe, raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(PromptError, match="not valid UTF-8"):
            pipe.prepare_prompt(raw, 0)  # type: ignore[arg-type]
        return
    if "<image>" not in text:
        assert pipe.prepare_prompt(raw, 0) == pipe.prepare_prompt(text, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("prompt", [None, 42, ["a"], {"a": 1}, 3.5, object()])
def test_non_text_prompts_are_refused(pipe, runs, prompt):
    refused(runs, lambda: pipe.generate([], prompt), PromptError, "prompt must be a str")


# ---- placeholders and image counts ------------------------------------------------------------------


@pytest.mark.parametrize("placeholders, images", [(1, 2), (2, 1), (1, 0), (0, 1), (3, 8), (8, 3)])
def test_placeholder_count_mismatch_is_refused(pipe, runs, placeholders, images):
    prompt = "<image>" * placeholders + "\nQuestion: which?\nAnswer:"
    refused(
        runs,
        lambda: pipe.generate([Tripwire() for _ in range(images)], prompt),
        PromptError,
        rf"{placeholders} <image> placeholder\(s\) but {images} image\(s\)",
    )


def test_too_many_images_are_refused(pipe, runs):
    from maven_edge.runtime.options import PipelineLimits
    from maven_edge.runtime.pipeline import MavenPipeline

    n = pipe.limits.max_images + 1
    refused(
        runs,
        lambda: pipe.generate([Tripwire()] * n, "<image>" * n),
        InputError,
        rf"{n} images exceed the limit of {pipe.limits.max_images}",
    )
    small = MavenPipeline(pipe.backend, PipelineLimits(max_images=1))
    refused(
        runs,
        lambda: small.generate([Tripwire()] * 2, "<image><image>"),
        InputError,
        "2 images exceed the limit of 1",
    )
    refused(
        runs, lambda: small.select_patches([Tripwire()] * 2), InputError, "2 images exceed the limit of 1"
    )
    none = MavenPipeline(pipe.backend, PipelineLimits(max_images=0))
    refused(
        runs, lambda: none.generate([Tripwire()], "<image>"), InputError, "1 images exceed the limit of 0"
    )


def test_endless_image_iterable_is_refused_without_reading_it_all(pipe, runs):
    """Regression: a generator of images used to be read to its end (forever, for an endless one)."""
    taken = itertools.count()

    def endless():
        while True:
            next(taken)
            yield Tripwire()

    refused(
        runs,
        lambda: pipe.generate(endless(), "<image>"),
        InputError,
        rf"more than {pipe.limits.max_images} images exceed the limit",
    )
    assert next(taken) == pipe.limits.max_images + 1  # read one past the limit, no more
    refused(runs, lambda: pipe.select_patches(itertools.repeat(Tripwire())), InputError, "exceed the limit")
    # a short generator is fine
    res = pipe.generate(
        (im for im in [Path(__file__).parent.parent / "model_src/samples/demo_1.png"]),
        ONE_IMAGE,
        max_new_tokens=2,
    )
    assert len(res.visual_tokens_per_image) == 1


@pytest.mark.parametrize("images", [42, 3.5, object(), {"a"}.__iter__, True])
def test_images_of_the_wrong_type(pipe, runs, images):
    with pytest.raises(MavenError):
        pipe.generate(images, "<image>", max_new_tokens=1)
    assert runs.calls == 0


# ---- images end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        ("truncated", "truncated|corrupt|cannot"),
        ("empty", "empty"),
        ("text", "not a supported image"),
        ("too_wide", "aspect ratio"),
        ("bomb", "pixels"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_images_end_to_end(pipe, pool, runs, bad, match):
    """A bad image in second place: an ImageError naming "image 2" (numbered from 1, as prompts
    say "Image 2"), before any model runs, and
    the next request gets the same answer as before."""
    prompt = "<image><image>\nQuestion: same?\nAnswer:"
    before = pipe.generate([pool["scene0"], pool["scene1"]], prompt, max_new_tokens=4).token_ids
    calls = runs.calls
    with pytest.raises(ImageError, match=match) as exc:
        pipe.generate([pool["scene0"], pool[bad]], prompt, max_new_tokens=4)
    assert str(exc.value).startswith("image 2 ")
    assert runs.calls == calls
    assert pipe.generate([pool["scene0"], pool["scene1"]], prompt, max_new_tokens=4).token_ids == before


def test_bad_image_paths_end_to_end(pipe, runs, tmp_path):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "zero.png").write_bytes(b"")
    for path, match in (
        (tmp_path / "missing.png", "not found"),
        (tmp_path / "dir.png", "directory"),
        (tmp_path / "zero.png", "empty"),
        ("https://example.com/a.png", "URLs are not fetched"),
    ):
        refused(runs, lambda p=path: pipe.generate([p], ONE_IMAGE, max_new_tokens=2), ImageError, match)
    if os.path.exists("/dev/zero"):  # an endless device: reading stops at ImageLimits.max_bytes
        refused(runs, lambda: pipe.generate(["/dev/zero"], ONE_IMAGE), ImageError, "too large")


def test_pixel_limit_end_to_end(pipe, pool, runs):
    from maven_edge.core.preprocess import ImageLimits
    from maven_edge.runtime.options import PipelineLimits
    from maven_edge.runtime.pipeline import MavenPipeline

    refused(
        runs, lambda: pipe.generate([pool["bomb"]], ONE_IMAGE), ImageError, r"10000x10000 = 100\.0 megapixels"
    )
    from tools.soak import bomb_png

    refused(
        runs, lambda: pipe.generate([bomb_png(60000, 60000)], ONE_IMAGE), ImageError, "too large to decode"
    )
    small = MavenPipeline(pipe.backend, PipelineLimits(image=ImageLimits(max_pixels=32 * 32)))
    refused(runs, lambda: small.generate([pool["scene0"]], ONE_IMAGE), ImageError, "pixels")
    assert small.generate([pool["one_pixel"]], ONE_IMAGE, max_new_tokens=1).visual_tokens_per_image


@pytest.mark.parametrize("name", ["one_pixel", "gray_jpeg", "rgba", "palette_gif", "i16", "wide", "array"])
def test_odd_but_valid_images_are_served(pipe, pool, name):
    res = pipe.generate([pool[name]], ONE_IMAGE, max_new_tokens=2)
    assert len(res.visual_tokens_per_image) == 1 and res.selected_indices and len(res.selected_indices[0]) > 0


def test_animated_gif_is_answered_from_its_first_frame(pipe, pool):
    """Policy (docs/usage/images.md): multi-frame images use their first frame."""
    first = Image.open(io.BytesIO(pool["palette_gif"]))
    first.seek(0)
    png = io.BytesIO()
    first.convert("RGB").save(png, "PNG")
    a = pipe.generate([pool["palette_gif"]], ONE_IMAGE, max_new_tokens=4)
    b = pipe.generate([png.getvalue()], ONE_IMAGE, max_new_tokens=4)
    assert a.token_ids == b.token_ids and a.selected_indices == b.selected_indices


# ---- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"seed": -1, "temperature": 0.8}, "seed must be an integer >= 0"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"temperature": "hot"}, "must be numbers"),
        ({"top_k": "many"}, "must be numbers"),
        ({"top_p": [0.5]}, "must be numbers"),
        ({"greedy": "false"}, "greedy must be True, False or None"),
        ({"top_k": math.inf}, "must be numbers.*infinity"),
        ({"seed": math.inf}, "cannot convert float infinity"),
        ({"stop_token_ids": [math.nan]}, "cannot convert float NaN"),
    ],
)
def test_bad_option_values_are_refused_before_anything_runs(pipe, runs, opts, match):
    """Regression: a negative seed raised numpy's ValueError after the prefill had run, and a
    non-numeric temperature a bare TypeError, an infinite top_k/seed an OverflowError (found by
    the MAVEN_SOAK=1 option fuzz); greedy="false" silently meant greedy."""
    refused(runs, lambda: pipe.generate([Tripwire()], "<image>", max_new_tokens=2, **opts), InputError, match)


def test_sampling_config_refuses_a_negative_seed():
    from maven_edge.core.sampling import GenerationConfig

    with pytest.raises(InputError, match="seed"):
        GenerationConfig(seed=-3).validate()
    assert GenerationConfig(seed=np.int64(3)).validate().seed == 3


_OPTION_VALUES = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        1,
        2,
        -1,
        10**12,
        0.0,
        0.5,
        1.0,
        2.0,
        -0.5,
        math.inf,
        -math.inf,
        math.nan,
        1e-30,
        "",
        "1",
        "x",
        [],
        [1],
        ["a", ""],
        (1, 2),
        {"k": 1},
        b"\xff",
        "hybrid",
        "discrete",
        "continuous",
    ]
)
_OPTION_NAMES = [
    "max_new_tokens",
    "greedy",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "stop_token_ids",
    "mode",
    "keep_ratio",
    "cancel",
    "unknown_option",
]


@settings(max_examples=OPTION_FUZZ_EXAMPLES, **FUZZ)
@given(opts=st.dictionaries(st.sampled_from(_OPTION_NAMES), _OPTION_VALUES, max_size=4))
def test_fuzz_generation_options_only_input_errors(pipe, opts):
    """Any combination of option values: an answer or an InputError, never another exception."""
    m = opts.setdefault("max_new_tokens", 2)
    if isinstance(m, int) and not isinstance(m, bool) and m > 2:
        opts["max_new_tokens"] = 2  # keep it quick (context overflow is tested above)
    try:
        res = pipe.generate([DEMO_IMAGE], ONE_IMAGE, **opts)
    except InputError:
        return
    assert res.finish_reason in ("eos", "stop_token", "stop_string", "length")
    assert len(res.token_ids) <= 2


def test_cancel_must_be_an_event(pipe, runs):
    refused(runs, lambda: pipe.generate([], "hi", cancel=True), InputError, "threading.Event")
    ev = threading.Event()
    assert pipe.generate([], "hi", cancel=ev, max_new_tokens=1).finish_reason != "cancelled"
