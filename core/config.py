"""Model configuration: one dataclass tree, three named presets, dotted field overrides.

This module is torch-free so the runtime (which must not import torch) can read configs.

    cfg = get_config("paper", overrides=["llm.num_layers=2"])
    cfg.num_patches, cfg.num_kept_patches, cfg.visual_tokens_per_image("hybrid")
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Ge, Gt, Interval

from maven_edge.core.errors import ConfigError
from maven_edge.core.registry import Registry


@dataclass(frozen=True)
class VisualMode:
    """What one image contributes to the prompt in a visual mode (between <img_start> and <img_end>)."""

    codes: bool  # its discrete codes
    patches: str | None  # "selected": the selector's top-k (needs h_eos), "all": every patch, None: none
    help: str


VISUAL_MODES: Registry[VisualMode] = Registry("mode")
VISUAL_MODES.add("hybrid", VisualMode(True, "selected", "codes + the patches the selector keeps (MaVEn)"))
VISUAL_MODES.add("discrete", VisualMode(True, None, "codes only"))
VISUAL_MODES.add("continuous", VisualMode(False, "all", "every projected patch (LLaVA-1.5)"))

#: Where hybrid mode reads h_eos, the LLM's hidden state at <eos_vis> after an image's codes:
#: "separate" — one extra decoder pass over [codes, <eos_vis>] per image, without the prompt (the
#: paper's two passes; what the selector is trained on); "context" — inside the prompt's prefill,
#: which stops after each image's codes, reads <eos_vis> there, and continues with the kept patches
#: (no extra pass; the selection then also sees the text and images before it). docs/design.md §5.2.
H_EOS_MODES = ("separate", "context")

# Ranges of the config fields: read by pydantic when manifest.json is validated (and published in
# docs/manifest.schema.json); `typing.get_type_hints` strips them, so the code below sees plain types.
Size = Annotated[int, Interval(ge=1, le=2**31 - 1)]  # a width, count or length: at least 1
Positive = Annotated[float, Gt(0)]
Unit = Annotated[float, Interval(ge=0.0, le=1.0)]
Std = Annotated[float, Interval(gt=0.0, le=10.0)]

# CLIP's normalisation constants (the ViT family MaVEn uses).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PreprocessConfig:
    """How an image becomes `pixel_values`; shared by training, torch and ONNX runtimes."""

    image_size: Annotated[int, Interval(ge=1, le=16384)] = 224
    mean: tuple[Unit, Unit, Unit] = CLIP_MEAN
    std: tuple[Std, Std, Std] = CLIP_STD
    resample: str = "bicubic"  # a PIL resampling filter name
    pad_to_square: bool = True  # LLaVA-1.5: pad with the mean colour, then resize


@dataclass
class VisionConfig:
    """CLIP-style ViT (pre-LN, class token, learned position embeddings, quick_gelu)."""

    image_size: Annotated[int, Interval(ge=1, le=16384)] = 224
    patch_size: Size = 16
    num_channels: Annotated[int, Interval(ge=1, le=4)] = 3
    hidden_size: Size = 768
    num_layers: Size = 12
    num_heads: Size = 12
    intermediate_size: Size = 3072
    layer_norm_eps: Positive = 1e-5
    hidden_act: str = "quick_gelu"
    # Which hidden state the patch features are taken from: -1 = last layer, -2 = penultimate
    # (LLaVA-1.5 takes -2). Patch features never include the class token.
    feature_layer: Annotated[int, Interval(ge=-1024, le=1024)] = -1

    @property
    def grid_size(self) -> int:
        """Patches along each side of the (square) image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class DiscreteConfig:
    """Q-Former-style query pooling over patch features, then a VQ codebook."""

    num_codes: Size = 32  # learned queries = codes per image
    codebook_size: Size = 8192
    code_dim: Size = 64
    hidden_size: Size = 768
    num_layers: Size = 2
    num_heads: Size = 12
    intermediate_size: Size = 3072
    commitment_cost: Annotated[float, Ge(0)] = 0.25
    # "queries": learned queries only (Q-Former, the paper's SEED-style tokenizer); "regions": the
    # patch grid is cut into num_codes regions (`region_grid`) and each query also starts from the
    # mean of its region's patches, so code k describes region k (docs/training.md, "Ablations")
    pooling: str = "queries"


DISCRETE_POOLINGS = ("queries", "regions")


def region_grid(num_codes: int) -> tuple[int, int]:
    """Rows x columns of the regions a "regions" tokenizer cuts the patch grid into: the factorisation
    of num_codes closest to square (32 -> 4 x 8)."""
    rows = max(d for d in range(1, math.isqrt(num_codes) + 1) if num_codes % d == 0)
    return rows, num_codes // rows


@dataclass
class LLMConfig:
    """Llama-style decoder: RMSNorm, RoPE, GQA, SwiGLU. `vocab_size` is the unified vocab."""

    hidden_size: Size = 896
    num_layers: Size = 24
    num_heads: Size = 14
    num_kv_heads: Size = 2
    intermediate_size: Size = 4864
    text_vocab_size: Size = 32000  # ids below this are text and special tokens
    max_position_embeddings: Size = 4096
    rope_theta: Positive = 1_000_000.0
    rms_norm_eps: Positive = 1e-6
    attention_bias: bool = False  # True for Qwen2 (q/k/v biases)
    tie_word_embeddings: bool = False
    initializer_range: Annotated[float, Ge(0)] = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class SelectorConfig:
    """Patch selector MLP over concat(patch_feature, h_eos); sigmoid score per patch."""

    hidden_size: Size = 1024
    num_layers: Annotated[int, Interval(ge=2, le=1024)] = 3
    keep_ratio: Annotated[float, Interval(gt=0.0, le=1.0)] = 0.25


@dataclass
class ProjectorConfig:
    """LLaVA-1.5 projector: Linear -> GELU -> Linear, times a constant `output_scale`.

    `output_scale` (1.0 = LLaVA) is a fixed multiplier on the projector's output. A ViT's patch
    features are large, so an unscaled projector emits vectors ~100x the RMS of the text and code
    embeddings, and anything added to a patch token at the decoder's input (an image slot) is
    negligible next to it. A constant multiplier, unlike a rescaled initialisation, is not undone
    by Adam's updates. Tried in recipe 6 (docs/training.md); the shipped model uses 1.0.
    """

    hidden_act: str = "gelu"
    output_scale: Positive = 1.0


@dataclass
class MavenConfig:
    name: str = "custom"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    discrete: DiscreteConfig = field(default_factory=DiscreteConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    mode: str = "hybrid"
    seed: Annotated[int, Interval(ge=0, le=2**63 - 1)] = 0
    max_images: Annotated[int, Interval(ge=0, le=4096)] = 8
    # Add a learned vector per image position (1st, 2nd, ...) to every token of that image's visual
    # sequence, so "which image" is a property of the tokens themselves (see tokenizer.VocabLayout).
    image_slots: bool = False

    # ---- derived geometry -------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    @property
    def visual_offset(self) -> int:
        """Id of visual code 0 in the unified vocabulary."""
        return self.llm.text_vocab_size

    @property
    def vocab_size(self) -> int:
        """Unified vocabulary: text + special tokens, then the visual codebook."""
        return self.llm.text_vocab_size + self.discrete.codebook_size

    def num_kept_patches(self, keep_ratio: float | None = None) -> int:
        r = self.selector.keep_ratio if keep_ratio is None else keep_ratio
        # The epsilon guards against 0.1 * 570 = 56.99999 style float error.
        return max(1, math.floor(r * self.num_patches + 1e-9))

    def visual_tokens_per_image(self, mode: str | None = None, keep_ratio: float | None = None) -> int:
        """Tokens one image occupies in the prompt, excluding <img_start>/<img_end>."""
        spec = VISUAL_MODES.get(check_mode(mode or self.mode))
        patches = {"selected": self.num_kept_patches(keep_ratio) if spec.patches == "selected" else 0,
                   "all": self.num_patches, None: 0}[spec.patches]
        return (self.discrete.num_codes if spec.codes else 0) + patches

    # ---- validation / (de)serialisation ------------------------------------------------
    def validate(self) -> MavenConfig:
        v, llm = self.vision, self.llm
        d = self.discrete
        sizes = {
            "vision.image_size": v.image_size, "vision.patch_size": v.patch_size,
            "vision.hidden_size": v.hidden_size, "vision.num_heads": v.num_heads,
            "llm.hidden_size": llm.hidden_size, "llm.num_heads": llm.num_heads,
            "llm.num_kv_heads": llm.num_kv_heads,
            "discrete.hidden_size": d.hidden_size, "discrete.num_heads": d.num_heads,
        }
        bad = [f"{k} must be an integer >= 1, got {x!r}" for k, x in sizes.items()
               if isinstance(x, bool) or not isinstance(x, int) or x < 1]
        if bad:  # before the divisibility checks below, which would divide by them
            raise ConfigError("invalid config: " + "; ".join(bad))
        problems = []
        if v.image_size % v.patch_size:
            problems.append(f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if self.preprocess.image_size != v.image_size:
            problems.append(
                f"preprocess.image_size {self.preprocess.image_size} != vision.image_size {v.image_size}"
            )
        if v.hidden_size % v.num_heads:
            problems.append("vision.hidden_size must be divisible by vision.num_heads")
        if llm.hidden_size % llm.num_heads:
            problems.append("llm.hidden_size must be divisible by llm.num_heads")
        if llm.num_heads % llm.num_kv_heads:
            problems.append("llm.num_heads must be a multiple of llm.num_kv_heads")
        if llm.head_dim % 2:
            problems.append("llm head_dim must be even for RoPE")
        if self.discrete.hidden_size % self.discrete.num_heads:
            problems.append("discrete.hidden_size must be divisible by discrete.num_heads")
        if d.pooling not in DISCRETE_POOLINGS:
            problems.append(f"discrete.pooling must be one of {DISCRETE_POOLINGS}, got {d.pooling!r}")
        elif d.pooling == "regions" and isinstance(d.num_codes, int) and d.num_codes >= 1:
            grid, (rows, cols) = v.grid_size, region_grid(d.num_codes)
            if max(rows, cols) > grid:
                problems.append(f"discrete.pooling 'regions' cuts the {grid}x{grid} patch grid into {rows}x{cols} "
                                f"regions for {d.num_codes} codes, more than it has patches along a side: use fewer "
                                "codes or pooling 'queries'")
        if not 0.0 < self.selector.keep_ratio <= 1.0:
            problems.append(f"selector.keep_ratio must be in (0, 1], got {self.selector.keep_ratio}")
        scale = self.projector.output_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale < math.inf:
            problems.append(f"projector.output_scale must be a number > 0, got {scale!r}")
        if self.mode not in VISUAL_MODES:
            problems.append(f"mode must be one of {VISUAL_MODES.names()}, got {self.mode!r}")
        for name in ("num_layers",):
            for sub in (v, llm, self.discrete):
                if getattr(sub, name) < 1:
                    problems.append(f"{name} must be >= 1")
        if self.selector.num_layers < 2:
            problems.append("selector.num_layers must be >= 2")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MavenConfig:
        try:
            return _from_dict(cls, data).validate()
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"config does not match the MavenConfig schema: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> MavenConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def check_mode(mode: str) -> str:
    """`mode` if it is a registered visual mode, else a ConfigError naming the known ones."""
    if mode not in VISUAL_MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(VISUAL_MODES)}")
    return mode


def _from_dict(cls: type, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _from_dict(hint, value)
        elif typing.get_origin(hint) is tuple:
            kwargs[f.name] = tuple(float(x) for x in value)
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


# ---- presets ---------------------------------------------------------------------------


def _tiny() -> MavenConfig:
    return MavenConfig(
        name="tiny",
        preprocess=PreprocessConfig(image_size=64, resample="bicubic"),
        vision=VisionConfig(
            image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512
        ),
        discrete=DiscreteConfig(
            num_codes=32, codebook_size=256, code_dim=32, hidden_size=128, num_layers=2, num_heads=4,
            intermediate_size=512,
        ),
        llm=LLMConfig(
            hidden_size=192, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=512,
            text_vocab_size=512, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
        ),
        selector=SelectorConfig(hidden_size=256, num_layers=3, keep_ratio=0.25),
    )


def _edge_small() -> MavenConfig:
    # ViT-B/16-224 geometry + a Qwen2-0.5B-style GQA decoder (hidden 896, 24 layers, 14/2 heads).
    return MavenConfig(
        name="edge-small",
        preprocess=PreprocessConfig(image_size=224),
        vision=VisionConfig(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                            intermediate_size=3072, feature_layer=-2),
        discrete=DiscreteConfig(num_codes=32, codebook_size=8192, code_dim=64, hidden_size=768,
                                num_layers=2, num_heads=12, intermediate_size=3072),
        llm=LLMConfig(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                      text_vocab_size=32000, max_position_embeddings=4096, rope_theta=1_000_000.0,
                      rms_norm_eps=1e-6, attention_bias=True),
        selector=SelectorConfig(hidden_size=1024, num_layers=3, keep_ratio=0.25),
    )


def _paper() -> MavenConfig:
    # CLIP ViT-L/14-336 (576 patches, width 1024) + Vicuna-7B geometry (hidden 4096, 32 layers).
    return MavenConfig(
        name="paper",
        preprocess=PreprocessConfig(image_size=336),
        vision=VisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                            intermediate_size=4096, feature_layer=-2),
        discrete=DiscreteConfig(num_codes=32, codebook_size=8192, code_dim=64, hidden_size=1024,
                                num_layers=2, num_heads=16, intermediate_size=4096),
        llm=LLMConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                      text_vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-6),
        selector=SelectorConfig(hidden_size=1024, num_layers=3, keep_ratio=0.25),
    )


PRESETS = {"tiny": _tiny, "edge-small": _edge_small, "paper": _paper}


def get_config(preset: str, overrides: list[str] | None = None) -> MavenConfig:
    """A preset by name, with `section.field=value` overrides applied and validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: MavenConfig, overrides: list[str]) -> MavenConfig:
    """Apply `llm.num_layers=2`-style overrides; values are parsed to the field's type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. llm.num_layers=2)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        target: Any = cfg
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, p):
                raise ConfigError(f"unknown config section {p!r} in override {item!r}")
            target = getattr(target, p)
        name = parts[-1]
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"unknown config field {key!r} in override {item!r}")
        hint = typing.get_type_hints(type(target))[name]
        if dataclasses.is_dataclass(hint):
            raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.num_layers=2")
        setattr(target, name, _parse_value(hint, raw.strip(), key))
    return cfg.validate()


def _parse_value(hint: Any, raw: str, key: str) -> Any:
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if typing.get_origin(hint) is tuple:
            return tuple(float(x) for x in raw.strip("()[]").split(","))
        if hint is str or isinstance(hint, types.UnionType):
            return raw
    except ValueError as exc:
        raise ConfigError(f"bad value {raw!r} for {key}: expected {getattr(hint, '__name__', hint)}") from exc
    return raw
