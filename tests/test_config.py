"""Presets, token math, overrides and config (de)serialisation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maven_edge.core.config import PRESETS, VISUAL_MODES, MavenConfig, apply_overrides, get_config
from maven_edge.core.errors import ConfigError, MavenError

DOC = Path(__file__).resolve().parents[1] / "docs" / "usage" / "model.md"


# ---- token math --------------------------------------------------------------------------


def test_paper_token_math():
    cfg = get_config("paper")
    assert cfg.num_patches == 576  # CLIP ViT-L/14 at 336 px: (336 / 14)^2
    assert cfg.num_kept_patches(0.25) == 144
    assert cfg.visual_tokens_per_image("hybrid", 0.25) == 176  # 32 codes + 144 patches
    assert cfg.num_kept_patches(0.1) == 57
    assert cfg.visual_tokens_per_image("hybrid", 0.1) == 89
    assert cfg.visual_tokens_per_image("discrete") == 32
    assert cfg.visual_tokens_per_image("continuous") == 576
    assert cfg.visual_tokens_per_image() == 176  # default: hybrid at the preset's 0.25


@pytest.mark.parametrize(
    "preset,patches,kept,tokens",
    [("tiny", 64, 16, 48), ("edge-small", 196, 49, 81), ("paper", 576, 144, 176)],
)
def test_preset_geometry(preset, patches, kept, tokens):
    cfg = get_config(preset)
    assert cfg.name == preset
    assert (cfg.num_patches, cfg.num_kept_patches(), cfg.visual_tokens_per_image()) == (patches, kept, tokens)
    assert cfg.visual_offset == cfg.llm.text_vocab_size
    assert cfg.vocab_size == cfg.llm.text_vocab_size + cfg.discrete.codebook_size


def test_preset_design_numbers():
    edge = get_config("edge-small")
    assert (edge.vision.hidden_size, edge.discrete.num_codes, edge.discrete.codebook_size) == (768, 32, 8192)
    assert (edge.llm.hidden_size, edge.llm.num_layers, edge.llm.num_heads, edge.llm.num_kv_heads) == (
        896,
        24,
        14,
        2,
    )
    paper = get_config("paper")
    assert (paper.vision.hidden_size, paper.llm.hidden_size, paper.llm.num_layers) == (1024, 4096, 32)
    assert paper.vision.feature_layer == -2


@settings(max_examples=60, deadline=None)
@given(side=st.integers(1, 64), data=st.data())
def test_num_kept_patches_is_floor(side, data):
    """floor(r * N) exactly, also where float error would give k - 1 (r = k / N is inexact)."""
    cfg = get_config("tiny")
    cfg.vision.patch_size, cfg.vision.image_size = 1, side
    n = cfg.num_patches
    assert n == side * side
    k = data.draw(st.integers(1, n))
    assert cfg.num_kept_patches(k / n) == k
    assert cfg.num_kept_patches(1.0) == n
    assert cfg.num_kept_patches(0.5 / n) == 1  # never zero patches


def test_unknown_mode():
    with pytest.raises(ConfigError, match="unknown mode"):
        get_config("tiny").visual_tokens_per_image("sparse")
    assert set(VISUAL_MODES) == {"hybrid", "discrete", "continuous"}


# ---- presets and overrides --------------------------------------------------------------------


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*tiny.*edge-small.*paper") as exc:
        get_config("huge")
    assert isinstance(exc.value, MavenError)


def test_presets_are_valid_and_independent():
    for name in PRESETS:
        a, b = get_config(name), get_config(name)
        a.llm.num_layers = 1
        assert b.llm.num_layers != 1  # each call builds a fresh tree


def test_overrides_parse_types():
    cfg = get_config(
        "paper",
        [
            "llm.num_layers=2",
            "selector.keep_ratio=0.1",
            "llm.tie_word_embeddings=true",
            "mode=discrete",
            "preprocess.mean=0.5,0.5,0.5",
        ],
    )
    assert cfg.llm.num_layers == 2 and isinstance(cfg.llm.num_layers, int)
    assert cfg.selector.keep_ratio == 0.1
    assert cfg.llm.tie_word_embeddings is True
    assert cfg.mode == "discrete"
    assert cfg.preprocess.mean == (0.5, 0.5, 0.5)
    assert cfg.visual_tokens_per_image() == 32


@pytest.mark.parametrize(
    "override,match",
    [
        ("llm.nope=1", r"unknown config field 'llm.nope'"),
        ("llm.num_layers=abc", r"bad value 'abc' for llm.num_layers: expected int"),
        ("selector.keep_ratio=lots", r"bad value 'lots' for selector.keep_ratio: expected float"),
        ("llm.tie_word_embeddings=maybe", r"bad value 'maybe'"),
        ("nosuch.field=1", r"unknown config section 'nosuch'"),
        ("llm=3", r"'llm' is a section"),
        ("llm.num_layers", r"must look like section.field=value"),
        ("selector.keep_ratio=0", r"keep_ratio must be in \(0, 1\]"),
        ("llm.num_layers=0", r"num_layers must be >= 1"),
        ("llm.num_heads=7", r"divisible by llm.num_heads"),
        ("mode=sparse", r"mode must be one of"),
        ("vision.image_size=100", r"not a multiple of patch_size"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        get_config("tiny", [override])


def test_apply_overrides_validates_existing_config():
    cfg = get_config("tiny")
    assert apply_overrides(cfg, []) is cfg
    cfg.preprocess.image_size = 65
    with pytest.raises(ConfigError, match="preprocess.image_size 65 != vision.image_size 64"):
        cfg.validate()


# ---- serialisation -----------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    cfg = get_config("edge-small", ["llm.num_layers=3"])
    path = tmp_path / "config.json"
    cfg.to_json(path)
    back = MavenConfig.from_json(path)
    assert back == cfg
    assert back.preprocess.mean == cfg.preprocess.mean  # tuples survive JSON lists


def test_from_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        MavenConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MavenConfig.from_json(bad)
    data = get_config("tiny").to_dict()
    data["llm"]["nope"] = 1
    with pytest.raises(ConfigError, match="unknown LLMConfig field"):
        MavenConfig.from_dict(data)
    data = get_config("tiny").to_dict()
    data["selector"]["keep_ratio"] = 2.0
    with pytest.raises(ConfigError, match="keep_ratio"):
        MavenConfig.from_dict(json.loads(json.dumps(data)))


# ---- the documented presets table matches the code ----------------------------------------


def test_docs_presets_table_matches_code():
    text = DOC.read_text()
    rows = {
        m.group(1): [c.strip() for c in m.group(2).split("|")]
        for m in re.finditer(r"^\| `([\w-]+)` \|(.*)\|$", text, flags=re.M)
    }
    assert set(PRESETS) <= set(rows), "docs/usage/model.md lacks a row per preset"
    for name in PRESETS:
        cfg = get_config(name)
        expected = [
            f"{cfg.vision.image_size} / {cfg.vision.patch_size}",
            str(cfg.num_patches),
            str(cfg.num_kept_patches()),
            str(cfg.visual_tokens_per_image("hybrid")),
            str(cfg.visual_tokens_per_image("hybrid", 0.1)),
            str(cfg.visual_tokens_per_image("continuous")),
            f"{cfg.llm.hidden_size} / {cfg.llm.num_layers} / {cfg.llm.num_heads} / {cfg.llm.num_kv_heads}",
            f"{cfg.llm.text_vocab_size} + {cfg.discrete.codebook_size} = {cfg.vocab_size}",
        ]
        assert rows[name][: len(expected)] == expected, f"docs row for {name} is stale"
