"""Move weights between Hugging Face `transformers` models and the maven-edge modules.

Vision: `CLIPVisionModel` / `CLIPModel` (keys ``vision_model.*``) -> :class:`VisionEncoder`.
Language: `LlamaForCausalLM` and `Qwen2ForCausalLM` (q/k/v biases, tied embeddings) ->
:class:`LlamaDecoder`, and back again with :func:`to_hf_llama` / :func:`save_hf_llama` (for
benchmarks with third-party runtimes).

    vcfg = vision_config_from_hf(clip.config, feature_layer=-2)
    encoder = VisionEncoder(vcfg); load_clip_vision(encoder, clip)
    decoder = decoder_from_hf(llama, codebook_size=8192)      # expanded to the unified vocab
    hf = to_hf_llama(decoder)                                 # Llama, or Qwen2 when q/k/v have biases

Our parameter names already follow the HF ones (minus the ``vision_model.`` / ``model.``
prefixes), so loading is a strict, checked rename: every missing, unexpected or mis-shaped
tensor is reported in one :class:`CheckpointError`; an HF config that our modules cannot
represent exactly (rope scaling, sliding window, o_proj/MLP biases, an odd head_dim, another
activation) is a :class:`ConfigError` rather than a silently different model.

The reverse direction emits ``Qwen2ForCausalLM`` for decoders with q/k/v biases
(``attention_bias=True``): HF Llama's ``attention_bias`` also adds an o_proj bias, which our
decoder does not have, while Qwen2 has exactly q/k/v biases. Bias-free decoders become
``LlamaForCausalLM``.

torch and transformers are imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maven_edge.core.config import LLMConfig, VisionConfig
from maven_edge.core.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from maven_edge.model_src.modeling.decoder import LlamaDecoder
    from maven_edge.model_src.modeling.vision import VisionEncoder

# HF activation names -> names maven_edge.model_src.modeling.vision.activation understands.
_VISION_ACT = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
_LLM_TYPES = ("llama", "qwen2")
# Buffers some HF checkpoints carry that hold no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


# ---- helpers ---------------------------------------------------------------------------------


def _state_dict(source: Any, what: str) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "state_dict"):
        return dict(source.state_dict())
    raise CheckpointError(f"expected a {what} model or a state dict, got {type(source).__name__}")


def _load_checked(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, tied: tuple[str, str] | None = None
) -> None:
    """Load `state` into `module` strictly; one clear CheckpointError for every mismatch.

    `tied` = (alias, target): the module shares `alias` with `target`, so `alias` may be absent.
    Works for modules built on the meta device too (the tensors are then assigned).
    """
    import torch

    own = module.state_dict()
    if tied is not None and tied[0] not in state and tied[1] in state:
        state[tied[0]] = state[tied[1]]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: source {tuple(state[k].shape)} vs ours {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:4]))
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:4]}")
        raise CheckpointError(
            f"{source} does not fit the model built from its config ({'; '.join(parts)}); "
            "build the maven-edge module from the same Hugging Face config (see vision_config_from_hf / "
            "llm_config_from_hf)"
        )
    on_meta = any(t.is_meta for t in own.values())
    # On meta the tensors are assigned, so copy them: the module must not share storage with the source.
    converted = {
        k: v.detach().to(dtype=own[k].dtype, device="cpu" if on_meta else own[k].device, copy=on_meta)
        for k, v in state.items()
    }
    with torch.no_grad():
        module.load_state_dict(converted, strict=True, assign=on_meta)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, default)
    return default if value is None else value


# ---- vision: CLIP ----------------------------------------------------------------------------


def vision_config_from_hf(hf_config: Any, feature_layer: int = -2) -> VisionConfig:
    """A :class:`VisionConfig` equal to a `CLIPVisionConfig` (or a `CLIPConfig`'s vision part).

    `feature_layer` picks the hidden state used as patch features: -1 = last layer, -2 =
    penultimate (LLaVA-1.5, and the default here).
    """
    cfg = getattr(hf_config, "vision_config", None) or hf_config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ("clip_vision_model", "clip"):
        raise ConfigError(
            f"expected a CLIP vision config, got model_type {model_type!r}; "
            "only CLIP-style ViTs (CLIPVisionModel / CLIPModel) can be imported"
        )
    act = _get(cfg, "hidden_act", "quick_gelu")
    if act not in _VISION_ACT:
        raise ConfigError(f"unsupported vision activation {act!r}; supported: {', '.join(_VISION_ACT)}")
    layers = int(cfg.num_hidden_layers)
    if not (-layers <= feature_layer <= -1):
        raise ConfigError(
            f"feature_layer must be in [-{layers}, -1] for a {layers}-layer ViT, got {feature_layer}"
        )
    return VisionConfig(
        image_size=int(cfg.image_size),
        patch_size=int(cfg.patch_size),
        num_channels=int(_get(cfg, "num_channels", 3)),
        hidden_size=int(cfg.hidden_size),
        num_layers=layers,
        num_heads=int(cfg.num_attention_heads),
        intermediate_size=int(cfg.intermediate_size),
        layer_norm_eps=float(_get(cfg, "layer_norm_eps", 1e-5)),
        hidden_act=_VISION_ACT[act],
        feature_layer=int(feature_layer),
    )


def clip_vision_state(hf_model_or_state_dict: Any) -> dict[str, torch.Tensor]:
    """The ``vision_model.*`` tensors of a CLIP model / state dict, with that prefix removed."""
    state = _state_dict(hf_model_or_state_dict, "CLIP vision")
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}


def load_clip_vision(encoder: VisionEncoder, hf_model_or_state_dict: Any) -> VisionEncoder:
    """Copy CLIP vision weights (keys ``vision_model.*``; text tower and projections are ignored)."""
    state = clip_vision_state(hf_model_or_state_dict)
    _load_checked(encoder, state, "CLIP vision weights")
    return encoder


def vision_encoder_from_hf(hf_model: Any, feature_layer: int = -2) -> VisionEncoder:
    """Our :class:`VisionEncoder` with the weights of a `CLIPVisionModel` / `CLIPModel`."""
    import torch

    from maven_edge.model_src.modeling.vision import VisionEncoder

    with torch.device("meta"):
        encoder = VisionEncoder(vision_config_from_hf(hf_model.config, feature_layer))
    return load_clip_vision(encoder, hf_model).eval()


# ---- language model: Llama / Qwen2 -----------------------------------------------------------


def llm_config_from_hf(hf_config: Any, text_vocab_size: int | None = None) -> LLMConfig:
    """An :class:`LLMConfig` equal to a `LlamaConfig` or `Qwen2Config`.

    `text_vocab_size` (default: the HF vocab size) is where the visual codes will start in the
    unified vocabulary; it may be larger than the HF vocab (room for maven-edge's special tokens).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _LLM_TYPES:
        raise ConfigError(
            f"unsupported language model type {model_type!r}; supported: {', '.join(_LLM_TYPES)}"
        )
    problems = []
    hidden, heads = int(hf_config.hidden_size), int(hf_config.num_attention_heads)
    head_dim = _get(hf_config, "head_dim", hidden // heads)
    if head_dim != hidden // heads:
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads = {hidden // heads}")
    if _get(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf_config.hidden_act!r} (only silu / SwiGLU is supported)")
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        problems.append(f"rope_scaling {scaling} (only plain RoPE is supported)")
    if getattr(hf_config, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if model_type == "llama" and getattr(hf_config, "attention_bias", False):
        problems.append("Llama attention_bias=True (adds an o_proj bias, which the maven-edge decoder lacks)")
    if model_type == "qwen2" and getattr(hf_config, "use_sliding_window", False):
        problems.append("use_sliding_window=True (only full attention is supported)")
    if problems:
        raise ConfigError(f"cannot import this {model_type} config exactly: " + "; ".join(problems))
    vocab = int(hf_config.vocab_size)
    if text_vocab_size is None:
        text_vocab_size = vocab
    if text_vocab_size < vocab:
        raise ConfigError(
            f"text_vocab_size {text_vocab_size} is smaller than the model's vocabulary ({vocab})"
        )
    return LLMConfig(
        hidden_size=hidden,
        num_layers=int(hf_config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(_get(hf_config, "num_key_value_heads", heads)),
        intermediate_size=int(hf_config.intermediate_size),
        text_vocab_size=int(text_vocab_size),
        max_position_embeddings=int(hf_config.max_position_embeddings),
        rope_theta=float(_get(hf_config, "rope_theta", 10000.0)),
        rms_norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        attention_bias=model_type == "qwen2",
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        initializer_range=float(_get(hf_config, "initializer_range", 0.02)),
    )


def hf_decoder_state(hf_model_or_state_dict: Any) -> dict[str, torch.Tensor]:
    """Decoder tensors of a *ForCausalLM model / state dict with the ``model.`` prefix removed."""
    state = _state_dict(hf_model_or_state_dict, "Llama/Qwen2")
    out = {}
    for k, v in state.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        out[k[len("model.") :] if k.startswith("model.") else k] = v
    return out


def load_hf_decoder(decoder: LlamaDecoder, hf_model_or_state_dict: Any) -> LlamaDecoder:
    """Copy `LlamaForCausalLM` / `Qwen2ForCausalLM` weights into `decoder` (same vocab size).

    Tied embeddings: a tied decoder needs only ``embed_tokens``; an untied one needs ``lm_head``.
    """
    state = hf_decoder_state(hf_model_or_state_dict)
    tied = decoder.config.tie_word_embeddings
    if not tied and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        cfg = getattr(hf_model_or_state_dict, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            raise CheckpointError(
                "the source model ties its embeddings but the decoder config has "
                "tie_word_embeddings=False; build it with llm_config_from_hf"
            )
    _load_checked(
        decoder,
        state,
        "Llama/Qwen2 weights",
        tied=("lm_head.weight", "embed_tokens.weight") if tied else None,
    )
    if tied:  # keep the parameters shared (assign=True on meta replaces them separately)
        decoder.lm_head.weight = decoder.embed_tokens.weight
    return decoder


def decoder_from_hf(
    hf_model: Any,
    codebook_size: int = 0,
    text_vocab_size: int | None = None,
    seed: int = 0,
) -> LlamaDecoder:
    """Our :class:`LlamaDecoder` from a text-only HF decoder, expanded to the unified vocabulary.

    The result has ``text_vocab_size + codebook_size`` rows; rows below the HF vocab size are
    the HF weights, the rest (new special tokens, visual codes) are initialised by
    :func:`~maven_edge.model_src.modeling.decoder.expand_vocab` with `seed`. The decoder's config has
    ``text_vocab_size`` set, so visual code ``c`` is id ``text_vocab_size + c``.
    """
    import torch

    from maven_edge.model_src.modeling.decoder import LlamaDecoder, expand_vocab

    cfg = llm_config_from_hf(hf_model.config, text_vocab_size)
    with torch.device("meta"):
        decoder = LlamaDecoder(cfg, int(hf_model.config.vocab_size))
    load_hf_decoder(decoder, hf_model)
    return expand_vocab(decoder, cfg.text_vocab_size + codebook_size, seed=seed).eval()


def hf_llm_config(decoder: LlamaDecoder, **extra: Any):
    """The `LlamaConfig` (no biases) or `Qwen2Config` (q/k/v biases) equal to `decoder`'s config."""
    from transformers import LlamaConfig, Qwen2Config

    c = decoder.config
    common = dict(
        vocab_size=decoder.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    common.update(extra)
    if c.attention_bias:
        return Qwen2Config(use_sliding_window=False, **common)
    return LlamaConfig(attention_bias=False, mlp_bias=False, head_dim=c.head_dim, **common)


def to_hf_llama(decoder: LlamaDecoder, **config_extra: Any):
    """A transformers model with `decoder`'s weights: `LlamaForCausalLM`, or `Qwen2ForCausalLM`
    when the decoder has q/k/v biases (Llama's attention_bias would also add an o_proj bias).

    `config_extra` goes into the HF config (e.g. ``bos_token_id=...``).
    """
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    config = hf_llm_config(decoder, **config_extra)
    cls = Qwen2ForCausalLM if decoder.config.attention_bias else LlamaForCausalLM
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        hf = cls(config)
    state = {f"model.{k}": v for k, v in decoder.state_dict().items() if not k.startswith("lm_head.")}
    if not decoder.config.tie_word_embeddings:
        state["lm_head.weight"] = decoder.lm_head.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (decoder.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"cannot map the decoder onto {cls.__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    if decoder.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(decoder.lm_head.weight.dtype).eval()


def save_hf_llama(decoder: LlamaDecoder, directory: str | Path, tokenizer: Any = None) -> Path:
    """Save `decoder` as a transformers model directory (config.json + model.safetensors).

    With a :class:`~maven_edge.core.tokenizer.TextTokenizer`, its ``tokenizer.json`` is written too and
    the bos/eos/pad ids are set in the config, so tools that read HF directories can use it.
    """
    directory = Path(directory)
    extra: dict[str, Any] = {}
    if tokenizer is not None:
        if tokenizer.layout.tokenizer_size > decoder.vocab_size:
            raise CheckpointError(
                f"tokenizer has {tokenizer.layout.tokenizer_size} ids but the decoder's "
                f"vocabulary holds {decoder.vocab_size}"
            )
        extra = dict(
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id
        )
    hf = to_hf_llama(decoder, **extra)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")
    return directory
