"""The manifest's ``host`` section: what a runtime does besides running the ONNX files.

torch-free. The exporter writes this section into ``manifest.json`` (docs/design.md §4) so a
runtime in another language (``hosts/node``, a C++ integration; see docs/hosts.md) builds the
same inputs as the Python runtime without reading Python code: how text is tokenized and
decoded, where each image's sequence goes and what it holds, how ``h_eos`` is read, how images
are decoded, padded, resized and normalised, and which ids generation may pick and stops at.

Every value comes from the function or constant the Python runtime itself uses (the prompt
template, the pad colour, the vocabulary layout, the visual modes), so the section cannot drift
from the Python behaviour; ``tests/test_host_contract.py`` checks it against the runtime.

The section is additive: manifests written before it (format version 1 without ``host``) still
load in Python, which never needs it; hosts that do need it ask for a re-export.
"""

from __future__ import annotations

from typing import Any

from maven_edge.core.config import VISUAL_MODES, MavenConfig
from maven_edge.core.preprocess import pad_fill
from maven_edge.core.prompt import PROMPT_TEMPLATE
from maven_edge.core.tokenizer import BOS, EOS, EOS_VIS, IMAGE_TOKEN, IMG_END, IMG_START, VocabLayout

#: Bumped when a field changes meaning; hosts refuse a version they do not know.
#: 2 (issue 31): images are resized to fit the square first and padded after (was: padded to a
#: square of the long side, then resized); `resize_passes` fixes the order of the two passes.
HOST_CONTRACT_VERSION = 2


def host_section(cfg: MavenConfig, layout: VocabLayout, tokenizer_file: str = "tokenizer.json") -> dict[str, Any]:
    """The ``host`` section of the manifest of a model with config `cfg` and vocabulary `layout`."""
    pre = cfg.preprocess
    k = cfg.num_kept_patches()
    return {
        "version": HOST_CONTRACT_VERSION,
        "reference": "docs/hosts.md",
        "tokenizer": {
            "file": tokenizer_file,
            "library": "huggingface-tokenizers",
            # User text never becomes special ids: the special added tokens are not matched in it
            # (tokenizers' encode_special_tokens=True); only the literal placeholder is split out first.
            "add_special_tokens": False,
            "match_special_tokens_in_text": False,
            "image_placeholder": IMAGE_TOKEN,
            "prompt_prefix": [BOS],  # ids put before the first text piece
            # Decoding drops ids >= decode_below (image slots, padding rows, visual codes) and
            # the special tokens, then joins the byte-level pieces.
            "decode_below": layout.tokenizer_size,
            "decode_skip_special_tokens": True,
            "decode_clean_up_spaces": False,  # tokenizers' plain decode (no transformers-style clean-up)
        },
        "prompt": {
            # The layout the model was trained on; {k} counts from 1, {text} is the question line.
            "template": dict(PROMPT_TEMPLATE),
            "question_prefix": "Question: ",
        },
        "visual_sequence": {
            # What replaces each <image> placeholder, in order: token names are looked up in
            # vocab.special_ids; "codes" = the discrete tokenizer's visual_codes (already unified
            # ids, embedded with embed_tokens), "patches" = projected patch embeddings.
            "layout": [IMG_START, "codes", "patches", IMG_END],
            "modes": {name: {"codes": m.codes, "patches": m.patches} for name, m in VISUAL_MODES.items()},
            "codes_per_image": cfg.discrete.num_codes,
            "kept_patches": k,
            "tokens_per_image": cfg.visual_tokens_per_image(cfg.mode),  # between the two markers
            # k for another keep ratio r (needs projector.onnx): max(1, floor(r * num_patches + 1e-9))
            "keep_rule": "max(1, floor(keep_ratio * num_patches + 1e-9))",
            # Image slot k (counting from 0) is id first_slot_id + k; its embedding is added to
            # every row of the k-th image's sequence, markers included.
            "image_slots": bool(cfg.image_slots),
            "first_slot_id": layout.tokenizer_size,
        },
        "h_eos": {
            # One decoder pass per batch of images with an empty KV cache over these ids; h_eos is
            # the decoder's hidden_states row at `position` (-1 = the last, i.e. <eos_vis>).
            "input": ["codes", EOS_VIS],
            "position": -1,
            "output": "hidden_states",
            "attention_mask": "ones",
        },
        "selector": {
            "k": k,
            "keep_ratio": cfg.selector.keep_ratio,
            "ranking": "scores, descending, stable (ties keep the lower index)",
            "order": "ascending patch index (raster)",
        },
        "generation": {
            "max_positions": cfg.llm.max_position_embeddings,
            "stop_tokens": [EOS],
            # Only ids below this are picked (greedy: first index of the maximum).
            "sample_below": layout.tokenizer_size,
            "position_ids": "past_length + arange(seq)",  # for decoders that take position_ids
            "attention_mask": "ones over past + new positions",
            # The answer's text: the decoded ids without leading whitespace (Python str.lstrip(); the
            # model's first piece starts with a space); stop strings are matched in that text; the
            # token ids are not changed.
            "answer_text": "decode(ids).lstrip()",
        },
        "preprocess": {
            "channel_order": "RGB",
            "layout": "NCHW",
            "exif_orientation": True,
            "icc_profile": "ignored",
            # straight alpha over white, per channel: (c * a + 255 * (255 - a) + 127) // 255
            "alpha_background": [255, 255, 255],
            # pad_to_square: resize so the long side is `size` (fitted_size), then centre the result on
            # a size x size canvas of pad_color: the picture of padding first and resizing after
            # (LLaVA-1.5) without a canvas that grows with the long side squared. Otherwise stretch.
            "pad_to_square": bool(pre.pad_to_square),
            "resize_then_pad": True,
            "fitted_size": "long side -> size, other side -> max(1, (2 * side * size + long) // (2 * long))",
            "pad_color": list(pad_fill(pre)),  # trunc(mean * 255), like LLaVA-1.5
            "pad_offset": "((size - fitted_width) // 2, (size - fitted_height) // 2)",
            "size": [pre.image_size, pre.image_size],
            "resample": pre.resample,
            "resample_implementation": "pillow",  # Pillow's fixed-point 8-bit convolution, one axis per pass
            "resize_passes": "horizontal (to the new width), then vertical (to the new height)",
            # pixel (uint8) * rescale in float64, rounded to float32; then (x - mean) / std in float32
            "rescale": 1 / 255,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "dtype": "float32",
        },
    }


def add_host_section(directory: Any, force: bool = False) -> bool:
    """Write the ``host`` section into an existing export's ``manifest.json`` (older exports lack
    it, or have an older version of it). Nothing else changes: the section is derived from the manifest's own config and
    vocabulary, and ``manifest.json`` is not among the hashed files. Returns whether it wrote."""
    import json
    from pathlib import Path

    from maven_edge.core.manifest import MANIFEST, load_manifest, write_manifest

    manifest = load_manifest(Path(directory), verify=False)
    if manifest.host and manifest.host.get("version") == HOST_CONTRACT_VERSION and not force:
        return False
    raw = json.loads((Path(directory) / MANIFEST).read_text())
    manifest.host = host_section(manifest.maven_config(), manifest.vocab_layout(), manifest.tokenizer.path)
    extra_keys = set(raw) - set(manifest.to_dict())
    if extra_keys:  # fields this version does not model: keep the file as it is rather than drop them
        from maven_edge.core.errors import ArtifactError

        raise ArtifactError(f"{MANIFEST} in {directory} has fields this maven-edge does not know ({sorted(extra_keys)}); "
                            "re-export the artifacts instead")
    write_manifest(manifest, directory)
    return True


if __name__ == "__main__":  # python -m maven_edge.core.host_contract DIR [DIR ...]
    import sys

    for d in sys.argv[1:]:
        print(f"{d}: {'host section written' if add_host_section(d) else 'already has a host section'}")
