"""Checkpoint I/O: safetensors weights + JSON config + tokenizer.json. No pickle anywhere.

A checkpoint directory holds::

    model.safetensors   all weights, names as in MavenModel.state_dict()
    config.json         MavenConfig.to_dict()
    tokenizer.json      the text tokenizer (Hugging Face `tokenizers` format)
    (optional) training_log.jsonl, eval_report.json, ...
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maven_edge.core.config import MavenConfig, apply_overrides, get_config
from maven_edge.core.errors import CheckpointError, ConfigError
from maven_edge.core.tokenizer import TextTokenizer
from maven_edge.model_src.modeling.maven import MavenModel
from maven_edge.model_src.resources import shipped_checkpoint

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"

SHIPPED_TINY = shipped_checkpoint("tiny")


def build_model(cfg: MavenConfig, seed: int | None = None, tokenizer: TextTokenizer | None = None) -> MavenModel:
    """A randomly initialised model; the same seed gives the same weights."""
    tokenizer = tokenizer or TextTokenizer.default(cfg.llm.text_vocab_size, cfg.discrete.codebook_size)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed if seed is None else seed)
    try:
        model = MavenModel(cfg, tokenizer)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def save_checkpoint(model: MavenModel, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.llm.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt", "preset": model.config.name})
    model.config.to_json(directory / CONFIG)
    model.tokenizer.save(directory / TOKENIZER)
    return directory


def load_config(directory: str | Path) -> MavenConfig:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG} is missing")
    try:
        return MavenConfig.from_json(path)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_checkpoint(directory: str | Path, overrides: list[str] | None = None) -> MavenModel:
    """Load a checkpoint directory; every missing, corrupt or mismatched file is a CheckpointError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    cfg = load_config(directory)
    if overrides:

        cfg = apply_overrides(cfg, overrides)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}; re-run training or export the weights")
    tokenizer = TextTokenizer.from_file(directory / TOKENIZER, cfg.llm.text_vocab_size, cfg.discrete.codebook_size)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {exc}") from exc
    model = MavenModel(cfg, tokenizer)
    load_state(model, state, source=str(weights))
    return model.eval()


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, reporting missing/unexpected/mis-shaped tensors clearly."""
    own = model.state_dict()
    tied = "llm.lm_head.weight" if getattr(model.config.llm, "tie_word_embeddings", False) else None
    missing = [k for k in own if k not in state and k != tied]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"{source} does not match its config ({'; '.join(parts)}); "
            "the config.json beside the weights must be the one they were trained with"
        )
    model.load_state_dict(state, strict=tied is None)


def load_model(
    checkpoint: str | Path | None = None, preset: str | None = None, overrides: list[str] | None = None,
    seed: int | None = None,
) -> MavenModel:
    """The model a CLI command asked for: a checkpoint directory, or a seeded random preset."""
    if checkpoint is not None:
        return load_checkpoint(checkpoint, overrides)
    if preset is None:
        raise ConfigError("give --checkpoint DIR or --preset NAME")
    return build_model(get_config(preset, overrides), seed=seed)
