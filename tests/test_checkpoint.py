"""Checkpoint I/O: safetensors + JSON round trip, clear errors for broken directories, no pickle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from maven_edge.core.config import get_config
from maven_edge.core.errors import CheckpointError, ConfigError, MavenError
from maven_edge.core.sampling import GenerationConfig
from maven_edge.model_src.checkpoint import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    build_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
GEN = GenerationConfig(max_new_tokens=6)
PROMPT = "<image> What color is the circle?"


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def copy_ckpt(saved, tmp_path):
    def make() -> Path:
        d = tmp_path / "copy"
        d.mkdir()
        for f in saved.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    return make


def test_round_trip_same_weights_and_generate(tiny_model, saved, make_pixels):
    assert sorted(p.name for p in saved.iterdir()) == sorted([WEIGHTS, CONFIG, TOKENIZER])
    loaded = load_checkpoint(saved)
    assert not loaded.training
    assert loaded.config == tiny_model.config
    assert loaded.tokenizer.layout == tiny_model.tokenizer.layout
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    px = make_pixels(1, seed=2)
    assert loaded.generate(px, PROMPT, GEN) == tiny_model.generate(px, PROMPT, GEN)


def test_tied_embeddings_round_trip(tmp_path, make_pixels):
    model = build_model(get_config("tiny", ["llm.tie_word_embeddings=true", "llm.num_layers=1"]), seed=1)
    save_checkpoint(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        assert "llm.lm_head.weight" not in f.keys()  # stored once
    loaded = load_checkpoint(tmp_path)
    assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    px = make_pixels(1)
    assert loaded.generate(px, PROMPT, GEN) == model.generate(px, PROMPT, GEN)


def test_build_model_is_seeded():
    cfg = get_config("tiny", ["llm.num_layers=1", "vision.num_layers=1"])
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    w = "llm.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    state = torch.random.get_rng_state()
    build_model(cfg, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_load_model_paths(saved):
    assert load_model(checkpoint=saved).config.name == "tiny"
    assert load_model(preset="tiny", overrides=["llm.num_layers=1"], seed=0).config.llm.num_layers == 1
    with pytest.raises(ConfigError, match="--checkpoint DIR or --preset NAME"):
        load_model()
    with pytest.raises(ConfigError, match="unknown preset"):
        load_model(preset="giant")


# ---- broken checkpoints ---------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found") as exc:
        load_checkpoint(tmp_path / "nope")
    assert isinstance(exc.value, MavenError)


@pytest.mark.parametrize(
    "name,match",
    [
        (CONFIG, "config.json is missing"),
        (WEIGHTS, "has no model.safetensors"),
        (TOKENIZER, "tokenizer file not found"),
    ],
)
def test_missing_files(copy_ckpt, name, match):
    d = copy_ckpt()
    (d / name).unlink()
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(d)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(copy_ckpt, damage):
    d = copy_ckpt()
    path = d / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x00not a safetensors file" * 10, "truncated": data[: len(data) // 2], "empty": b""}[
            damage
        ]
    )
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_checkpoint(d)


def test_corrupt_config(copy_ckpt):
    d = copy_ckpt()
    (d / CONFIG).write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(d)


def test_bad_tokenizer_file(copy_ckpt):
    d = copy_ckpt()
    (d / TOKENIZER).write_text("[]")
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        load_checkpoint(d)


@pytest.mark.parametrize(
    "section,field,value,match",
    [
        ("llm", "num_layers", 2, r"\d+ unexpected tensor\(s\).*llm\.layers\.2"),
        ("llm", "num_layers", 8, r"\d+ missing tensor\(s\).*llm\.layers\.6"),
        ("llm", "intermediate_size", 1000, r"shape mismatch llm\.layers\.0\.mlp\.gate_proj\.weight"),
        ("discrete", "codebook_size", 128, r"shape mismatch"),
        ("llm", "nope", 1, r"unknown LLMConfig field"),
    ],
)
def test_config_not_matching_weights(copy_ckpt, section, field, value, match):
    d = copy_ckpt()
    data = json.loads((d / CONFIG).read_text())
    data[section][field] = value
    (d / CONFIG).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=match) as exc:
        load_checkpoint(d)
    assert "config" in str(exc.value)


def test_overrides_on_load_are_checked(saved):
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(saved, overrides=["llm.num_layers=1"])
    assert load_checkpoint(saved, overrides=["selector.keep_ratio=0.5"]).config.num_kept_patches() == 32


# ---- no pickle anywhere -----------------------------------------------------------------------

_PICKLE = re.compile(
    r"\btorch\.(save|load)\(|^\s*(import|from)\s+(c?pickle|dill|joblib)\b"
    r"|\bpickle\.(loads?|dumps?|Unpickler|Pickler)\b",
    re.M,
)


def test_no_pickle_in_the_code_base():
    offenders = []
    for folder in ("model_src", "runtime", "export", "calibration", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for m in _PICKLE.finditer(path.read_text(errors="replace")):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()}")
    assert not offenders, "pickle-based serialisation found (use safetensors / JSON): " + "; ".join(offenders)


def test_checkpoint_files_are_not_pickles(saved):
    for f in saved.iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x04" and head[:1] != b"\x80", f"{f.name} looks like a pickle"
        assert not f.read_bytes().startswith(b"PK"), f"{f.name} is a zip (torch.save) archive"
