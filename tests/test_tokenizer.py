"""Text tokenizer and the unified vocabulary layout."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maven_edge.core.errors import CheckpointError, ConfigError, MavenError, PromptError
from maven_edge.core.tokenizer import (
    BOS,
    EOS,
    EOS_VIS,
    IMAGE_TOKEN,
    IMG_END,
    IMG_START,
    PAD,
    SPECIAL_TOKENS,
    TextTokenizer,
    count_image_placeholders,
    load_layout,
    split_prompt,
)

TEXT_VOCAB, CODEBOOK = 512, 256


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.default(TEXT_VOCAB, CODEBOOK)


@pytest.fixture(scope="module")
def tok_file(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


def test_default_tokenizer_is_deterministic(tok):
    again = TextTokenizer.default(TEXT_VOCAB, CODEBOOK)
    assert again.to_json() == tok.to_json()


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_user_typed_special_text_is_plain_text(tok, special):
    special_ids = set(tok.layout.special_ids.values())
    for text in (special, f"hello {special} world", f"{special}{special}"):
        ids = tok.encode(text)
        assert not special_ids & set(ids), f"{text!r} produced a special id"
        assert tok.decode(ids) == text


def test_encode_prompt_recognises_only_image_placeholders(tok):
    ids = tok.encode_prompt("<image> and <image>: what changed? <eos> <img_start>")
    assert ids[0] == tok.bos_id
    assert ids.count(tok.image_id) == 2
    for other in (tok.eos_id, tok.img_start_id, tok.img_end_id, tok.eos_vis_id, tok.pad_id):
        assert other not in ids
    assert count_image_placeholders("<image><image> x <image>") == 3
    assert split_prompt("a<image>b") == ["a", "b"]
    with pytest.raises(PromptError):
        split_prompt(b"<image>")  # type: ignore[arg-type]
    with pytest.raises(PromptError):
        tok.encode(3)  # type: ignore[arg-type]


def test_layout_ids(tok):
    lay = tok.layout
    assert set(lay.special_ids) == set(SPECIAL_TOKENS)
    assert len(set(lay.special_ids.values())) == len(SPECIAL_TOKENS)
    # specials follow the BPE ids, all below the text vocabulary
    assert min(lay.special_ids.values()) == lay.tokenizer_size - len(SPECIAL_TOKENS)
    assert max(lay.special_ids.values()) == lay.tokenizer_size - 1 < TEXT_VOCAB
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (lay[PAD], lay[EOS], lay[BOS])
    assert (tok.image_id, tok.img_start_id, tok.img_end_id, tok.eos_vis_id) == (
        lay[IMAGE_TOKEN],
        lay[IMG_START],
        lay[IMG_END],
        lay[EOS_VIS],
    )
    assert lay.visual_offset == TEXT_VOCAB
    assert lay.vocab_size == TEXT_VOCAB + CODEBOOK
    assert lay.code_to_id(0) == TEXT_VOCAB and lay.code_to_id(CODEBOOK - 1) == lay.vocab_size - 1
    assert lay.id_to_code(TEXT_VOCAB + 7) == 7
    assert lay.id_to_code(TEXT_VOCAB - 1) is None and lay.id_to_code(lay.vocab_size) is None
    assert (
        lay.is_visual(TEXT_VOCAB) and not lay.is_visual(TEXT_VOCAB - 1) and not lay.is_visual(lay.vocab_size)
    )
    d = lay.to_dict()
    assert d["visual_offset"] == TEXT_VOCAB and d["vocab_size"] == TEXT_VOCAB + CODEBOOK


def test_image_slot_ids_follow_the_tokenizer(tok):
    lay = tok.layout
    ids = lay.image_slot_ids(8)
    assert ids == list(range(lay.tokenizer_size, lay.tokenizer_size + 8))
    assert ids[-1] < lay.text_vocab_size and not any(lay.is_visual(i) for i in ids)
    assert tok.decode(ids) == ""  # never decoded as text
    room = lay.text_vocab_size - lay.tokenizer_size
    assert len(lay.image_slot_ids(room)) == room
    with pytest.raises(ConfigError, match="lower max_images"):
        lay.image_slot_ids(room + 1)


def test_layout_json_round_trip(tok, tmp_path):
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(tok.layout.to_dict()))
    assert load_layout(path) == tok.layout


def test_decode_drops_visual_and_padding_ids(tok):
    ids = tok.encode("red circle")
    mixed = [TEXT_VOCAB + 3, *ids[:1], tok.layout.tokenizer_size, *ids[1:], TEXT_VOCAB + CODEBOOK - 1]
    assert tok.decode(mixed) == "red circle"
    assert tok.decode([tok.eos_id, *ids]) == "red circle"
    assert tok.decode([tok.eos_id, *ids], skip_special=False).startswith(EOS)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_json_loads_in_transformers(tok, tok_file):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    for text in ("What color is the circle?", "Which image has a red square? Answer: image 2", "héllo ✓ 42"):
        assert fast(text, add_special_tokens=False).input_ids == tok.encode(text)
        assert fast.decode(tok.encode(text)) == text
    # special text stays text when transformers is told not to parse it, as maven-edge never does
    text = "hi <eos> <img_start> <image>"
    assert fast(text, add_special_tokens=False, split_special_tokens=True).input_ids == tok.encode(text)
    for name, idx in tok.layout.special_ids.items():
        assert fast.convert_tokens_to_ids(name) == idx


def test_from_file_round_trip(tok, tok_file):
    loaded = TextTokenizer.from_file(tok_file, TEXT_VOCAB, CODEBOOK)
    assert loaded.layout == tok.layout
    assert loaded.encode("two blue stars <eos>") == tok.encode("two blue stars <eos>")


def test_from_file_errors(tmp_path, tok_file):
    with pytest.raises(CheckpointError, match="not found"):
        TextTokenizer.from_file(tmp_path / "nope.json", TEXT_VOCAB, CODEBOOK)
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        TextTokenizer.from_file(bad, TEXT_VOCAB, CODEBOOK)
    with pytest.raises(CheckpointError, match="text vocabulary holds 100"):
        TextTokenizer.from_file(tok_file, 100, CODEBOOK)


def test_tokenizer_without_specials_is_rejected():
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.BPE())
    with pytest.raises(CheckpointError, match="lacks special tokens") as exc:
        TextTokenizer(plain, TEXT_VOCAB, CODEBOOK)
    assert isinstance(exc.value, MavenError)
