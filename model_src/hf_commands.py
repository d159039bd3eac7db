"""`maven-edge import-hf`: build a maven-edge checkpoint from local Hugging Face model folders.

    maven-edge import-hf --llm path/to/qwen2 --vision path/to/clip --preset edge-small --out ckpt/

Only local directories are read (``from_pretrained(dir, local_files_only=True)``); nothing is
downloaded. The config's ``vision`` and ``llm`` sections come from the HF configs, the rest
(discrete tokenizer, selector, projector, mode, keep ratio) from the preset; those parts are
randomly initialised with ``--seed`` and need training. torch and transformers are imported only
inside the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from maven_edge.core.cliutil import add_command
from maven_edge.core.config import apply_overrides, get_config
from maven_edge.core.errors import CheckpointError, ConfigError
from maven_edge.core.tokenizer import SPECIAL_TOKENS, TextTokenizer, build_default_tokenizer

HELP = "build a maven-edge checkpoint from local Hugging Face LLM (+ CLIP vision) folders"

DESCRIPTION = """\
Build a maven-edge checkpoint from local Hugging Face model directories (no downloads).

--llm DIR     a LlamaForCausalLM or Qwen2ForCausalLM folder (config.json + *.safetensors/*.bin).
--vision DIR  optional CLIPVisionModel or CLIPModel folder; without it the preset's ViT is
              randomly initialised. Image mean/std/resample come from its preprocessor_config.json.
--preset      supplies everything the HF folders do not: discrete tokenizer, selector, projector,
              mode and keep ratio (and the ViT when --vision is not given).

The LLM's vocabulary is expanded to the unified layout [text | special | visual codes]: the
maven-edge special tokens (<image>, <img_start>, <img_end>, <eos_vis>, <pad>, <eos>, <bos>) are
added to the LLM's tokenizer.json (or --tokenizer FILE; without either, maven-edge's default BPE is
used, whose ids do NOT match the LLM's pretraining), and one row per codebook entry is appended to
embed_tokens and lm_head. New rows, the discrete tokenizer, selector and projector are seeded
random weights: fine-tune before expecting sensible answers.

The imported weights are checked against the HF models on a short input (--no-verify skips it).
Output: model.safetensors, config.json, tokenizer.json and import_info.json in --out.
"""

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers, "import-hf", help=HELP, description=DESCRIPTION,
        examples=["maven-edge import-hf --llm hf/Qwen2-0.5B --vision hf/clip-vit-base-patch16 --preset edge-small "
                  "--out checkpoints/qwen-clip",
                  "maven-edge import-hf --llm hf/tiny-llama --preset tiny --out checkpoints/tiny-llama --no-verify"])
    p.add_argument(
        "--llm", required=True, metavar="DIR", help="local LlamaForCausalLM / Qwen2ForCausalLM folder"
    )
    p.add_argument("--vision", metavar="DIR", help="local CLIPVisionModel / CLIPModel folder (optional)")
    p.add_argument(
        "--preset",
        required=True,
        choices=("tiny", "edge-small", "paper"),
        help="preset for the parts the HF folders do not provide",
    )
    p.add_argument("--out", required=True, metavar="CHECKPOINT_DIR", help="where to write the checkpoint")
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="tokenizer.json to extend (default: the one in --llm, else maven-edge's default BPE)",
    )
    p.add_argument(
        "--feature-layer",
        type=int,
        default=-2,
        help="ViT hidden state used as patch features: -1 last, -2 penultimate (default -2, as LLaVA-1.5)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field after import, e.g. --set selector.keep_ratio=0.1 (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the randomly initialised parts (default 0)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip the logits/feature check against the HF models"
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    p.set_defaults(func=cmd_import_hf)


def _check_hf_dir(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{flag} {d}: directory not found")
    if not d.is_dir():
        raise CheckpointError(f"{flag} {d}: not a directory (give the folder that holds config.json)")
    if not (d / "config.json").is_file():
        raise CheckpointError(
            f"{flag} {d}: no config.json; expected a Hugging Face model folder "
            "(as written by save_pretrained)"
        )
    return d


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def read_preprocessor(vision_dir: Path) -> dict[str, Any]:
    """mean/std/resample from a CLIP preprocessor_config.json, as PreprocessConfig fields."""
    path = vision_dir / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    out: dict[str, Any] = {}
    for key, field in (("image_mean", "mean"), ("image_std", "std")):
        value = data.get(key)
        if isinstance(value, list) and len(value) == 3:
            out[field] = tuple(float(x) for x in value)
    if data.get("resample") in _PIL_RESAMPLE:
        out["resample"] = _PIL_RESAMPLE[data["resample"]]
    return out


def import_tokenizer(path: Path | None, hf_vocab_size: int, codebook_size: int):
    """(TextTokenizer with maven-edge's special tokens added, text_vocab_size, origin string)."""
    from tokenizers import Tokenizer


    if path is not None:
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception on bad input
            raise CheckpointError(f"cannot read tokenizer {path}: {exc}") from exc
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        origin = str(path)
    else:
        tok = build_default_tokenizer()
        origin = "maven-edge default BPE"
    size = tok.get_vocab_size(with_added_tokens=True)
    text_vocab = hf_vocab_size if size <= hf_vocab_size else _round_up(size)
    return TextTokenizer(tok, text_vocab, codebook_size), text_vocab, origin


def assemble_model(cfg, tokenizer, seed: int, vision=None, llm=None):
    """A MavenModel whose `vision` / `llm` are the given modules and whose other parts are seeded
    random weights. Built on the meta device first, so no time is spent initialising big parts
    that are replaced anyway."""
    import torch

    from maven_edge.model_src.modeling.discrete import DiscreteTokenizer
    from maven_edge.model_src.modeling.maven import MavenModel
    from maven_edge.model_src.modeling.selector import PatchSelector, Projector
    from maven_edge.model_src.modeling.vision import VisionEncoder

    with torch.device("meta"):
        model = MavenModel(cfg, tokenizer)
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        dv, d = cfg.vision.hidden_size, cfg.llm.hidden_size
        model.vision = vision if vision is not None else VisionEncoder(cfg.vision)
        model.discrete = DiscreteTokenizer(cfg.discrete, dv, cfg.visual_offset, cfg.vision.grid_size)
        model.selector = PatchSelector(cfg.selector, dv, d)
        model.projector = Projector(dv, d, cfg.projector.output_scale)
    finally:
        torch.random.set_rng_state(rng)
    if llm is None:
        raise ConfigError("assemble_model needs the language model")
    model.llm = llm
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"import-hf does not know how to initialise {left[:3]}; update assemble_model")
    return model.eval()


def _verify(model, hf_llm, hf_vision, hf_vocab: int, feature_layer: int) -> dict[str, float]:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_vocab, (1, 8), generator=gen)
    with torch.no_grad():
        ref = hf_llm(input_ids=ids).logits.float()
        ours = model.llm(model.llm.embed_tokens(ids), torch.ones_like(ids))[0][..., :hf_vocab]
        report = {"llm_logits_max_abs_diff": float((ours - ref).abs().max())}
        if hf_vision is not None:
            v = model.config.vision
            px = torch.randn(1, v.num_channels, v.image_size, v.image_size, generator=gen)
            ref_v = hf_vision(pixel_values=px, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
            report["vision_features_max_abs_diff"] = float((model.vision(px) - ref_v).abs().max())
    bad = {k: x for k, x in report.items() if not x <= 1e-3}
    if bad:
        raise CheckpointError(f"imported model does not reproduce the Hugging Face outputs: {bad}")
    return report


def import_hf(
    llm_dir: str | Path,
    out: str | Path,
    preset: str = "tiny",
    vision_dir: str | Path | None = None,
    tokenizer_file: str | Path | None = None,
    feature_layer: int = -2,
    overrides: list[str] | None = None,
    seed: int = 0,
    verify: bool = True,
    force: bool = False,
    log=print,
) -> Path:
    """Everything `maven-edge import-hf` does; returns the checkpoint directory."""
    llm_path = _check_hf_dir(str(llm_dir), "--llm")
    vision_path = _check_hf_dir(None if vision_dir is None else str(vision_dir), "--vision")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a directory for the checkpoint")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"--out {out} exists and is not empty; pass --force to write into it")


    cfg = get_config(preset)  # fail fast on a bad preset before the slow imports

    import torch
    import transformers

    from maven_edge.model_src.checkpoint import save_checkpoint
    from maven_edge.model_src.hf_import import decoder_from_hf, llm_config_from_hf, vision_config_from_hf

    def load(cls, path: Path, what: str):
        try:
            return cls.from_pretrained(str(path), local_files_only=True).float().eval()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load the {what} from {path}: {exc}") from exc

    def read_config(path: Path, flag: str):
        try:
            return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{flag} {path}: cannot read config.json: {exc}") from exc

    hf_cfg = read_config(llm_path, "--llm")
    if vision_path is not None:  # reject a non-CLIP folder before loading anything big
        vision_config_from_hf(read_config(vision_path, "--vision"), feature_layer)
    classes = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}
    if hf_cfg.model_type not in classes:
        raise ConfigError(
            f"--llm {llm_path}: model_type {hf_cfg.model_type!r} is not supported; "
            f"use a {' or '.join(classes)} causal LM"
        )
    llm_config_from_hf(hf_cfg)  # reject configs we cannot represent before loading weights
    hf_llm = load(classes[hf_cfg.model_type], llm_path, "language model")
    hf_vocab = int(hf_llm.config.vocab_size)

    tok_path = Path(tokenizer_file) if tokenizer_file is not None else llm_path / "tokenizer.json"
    if tokenizer_file is None and not tok_path.is_file():
        tok_path = None
        log(
            f"note: no tokenizer.json in {llm_path}; using maven-edge's default BPE, whose ids do not "
            "match the LLM's pretraining tokenizer"
        )
    tokenizer, text_vocab, tok_origin = import_tokenizer(tok_path, hf_vocab, cfg.discrete.codebook_size)

    cfg.name = f"{preset}+hf"
    cfg.llm = llm_config_from_hf(hf_llm.config, text_vocab)
    hf_vision = encoder = None
    if vision_path is not None:
        hf_vision = load(transformers.CLIPVisionModel, vision_path, "CLIP vision model")
        cfg.vision = vision_config_from_hf(hf_vision.config, feature_layer)
        cfg.preprocess.image_size = cfg.vision.image_size
        for key, value in read_preprocessor(vision_path).items():
            setattr(cfg.preprocess, key, value)
    from_hf = {"llm": dataclasses.asdict(cfg.llm), "vision": dataclasses.asdict(cfg.vision)}
    cfg = apply_overrides(cfg, list(overrides or []))
    for section, allowed in (("llm", {"max_position_embeddings"}), ("vision", {"feature_layer"})):
        now = dataclasses.asdict(getattr(cfg, section))
        changed = sorted(k for k in now if now[k] != from_hf[section][k] and k not in allowed)
        if section == "vision" and vision_path is None:
            changed = []
        if changed:
            raise ConfigError(
                f"{', '.join(f'{section}.{k}' for k in changed)} come(s) from the Hugging Face "
                f"config and cannot be overridden (allowed: {', '.join(sorted(allowed))})"
            )

    if vision_path is not None:
        from maven_edge.model_src.hf_import import load_clip_vision
        from maven_edge.model_src.modeling.vision import VisionEncoder

        with torch.device("meta"):
            encoder = VisionEncoder(cfg.vision)
        load_clip_vision(encoder, hf_vision)
    decoder = decoder_from_hf(hf_llm, cfg.discrete.codebook_size, text_vocab, seed=seed)
    decoder.config = cfg.llm  # differs from the HF-derived one at most in max_position_embeddings
    model = assemble_model(cfg, tokenizer, seed, vision=encoder, llm=decoder)

    report: dict[str, float] = {}
    if verify:
        report = _verify(model, hf_llm, hf_vision, hf_vocab, cfg.vision.feature_layer)
    try:
        save_checkpoint(model, out)
    except OSError as exc:
        raise CheckpointError(f"cannot write the checkpoint to {out}: {exc}") from exc
    info = {
        "llm_dir": str(llm_path.resolve()),
        "llm_type": hf_cfg.model_type,
        "llm_vocab_size": hf_vocab,
        "vision_dir": None if vision_path is None else str(vision_path.resolve()),
        "tokenizer": tok_origin,
        "preset": preset,
        "seed": seed,
        "text_vocab_size": text_vocab,
        "unified_vocab_size": cfg.vocab_size,
        "random_init": ["discrete", "selector", "projector", f"llm rows >= {hf_vocab}"]
        + ([] if vision_path is not None else ["vision"]),
        "verify": report,
    }
    (out / "import_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(
        f"imported {hf_cfg.model_type} ({hf_vocab} tokens) "
        f"{'+ CLIP vision ' if vision_path is not None else ''}into {out} "
        f"(preset {preset}, unified vocab {cfg.vocab_size}, {cfg.num_patches} patches, "
        f"{cfg.visual_tokens_per_image()} visual tokens per image)"
    )
    if report:
        log("verified against Hugging Face: " + ", ".join(f"{k}={v:.2e}" for k, v in report.items()))
    return out


def cmd_import_hf(args: argparse.Namespace) -> int:
    import_hf(
        args.llm,
        args.out,
        preset=args.preset,
        vision_dir=args.vision,
        tokenizer_file=args.tokenizer,
        feature_layer=args.feature_layer,
        overrides=args.set,
        seed=args.seed,
        verify=not args.no_verify,
        force=args.force,
    )
    return 0
