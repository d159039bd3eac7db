"""Text tokenizer and the unified vocabulary layout (the one place that maps ids).

Layout of the unified vocabulary (docs/design.md §2)::

    [ byte-level BPE text tokens | special tokens | image slots | (unused padding) | visual codes ]
      0 ..                         specials follow BPE               visual_offset + c

Image slots (only when `MavenConfig.image_slots`): the rows right after the tokenizer's ids hold
one learned vector per image position in a prompt (1st, 2nd, ...), added to every token of that
image's visual sequence. The tokenizer never produces these ids.

The tokenizer is a Hugging Face `tokenizers` byte-level BPE saved as `tokenizer.json`, loadable
by `transformers.PreTrainedTokenizerFast` and by C++ tokenizer libraries. This module is
torch-free: the ONNX runtime uses it as it is.

User text is never parsed for special tokens: typing ``<eos>`` in a prompt gives the bytes of
"<eos>", not the special id. Only the literal placeholder ``<image>`` is recognised, by
:func:`split_prompt`, before tokenization.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from maven_edge.core.errors import CheckpointError, ConfigError, PromptError

IMAGE_TOKEN = "<image>"
IMG_START = "<img_start>"
IMG_END = "<img_end>"
EOS_VIS = "<eos_vis>"
PAD = "<pad>"
EOS = "<eos>"
BOS = "<bos>"
SPECIAL_TOKENS = (PAD, EOS, BOS, IMAGE_TOKEN, IMG_START, IMG_END, EOS_VIS)

# A small deterministic corpus the default BPE is trained on: the shapes-world vocabulary plus
# common English, so that prompts about the synthetic scenes tokenize compactly and any other
# text still works (byte-level BPE covers every byte).
_CORPUS_WORDS = """
a an the is are was were be there here this that these those it its of in on at to from with and or
not no yes what which where how many much does do did has have any all each both same different
image images picture first second third fourth last left right top bottom middle center centre above
below next beside between near far up down inside outside color colour colours shape shapes object
objects thing things count number total changed change moved removed added appear appears appeared
red green blue yellow purple orange cyan magenta white black gray grey pink brown
circle square triangle star diamond cross ring hexagon rectangle ellipse
small large big little medium tiny huge one two three four five six seven eight nine ten zero
question answer describe caption scene background clutter shows show contains contain there's
Question: Answer: Describe the image. How many shapes are there? What color is the circle?
Which image has a red square? What changed between image 1 and image 2? Are they the same?
""".split()


@dataclass(frozen=True)
class VocabLayout:
    """Where every kind of id lives in the unified vocabulary. Written into the manifest."""

    text_vocab_size: int  # ids < this are text + special tokens (and padding)
    tokenizer_size: int  # ids the tokenizer itself produces (BPE + specials)
    codebook_size: int
    special_ids: dict[str, int]

    @property
    def visual_offset(self) -> int:
        return self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.codebook_size

    def code_to_id(self, code: int) -> int:
        return self.visual_offset + code

    def id_to_code(self, token_id: int) -> int | None:
        c = token_id - self.visual_offset
        return c if 0 <= c < self.codebook_size else None

    def is_visual(self, token_id: int) -> bool:
        return self.visual_offset <= token_id < self.vocab_size

    def __getitem__(self, token: str) -> int:
        return self.special_ids[token]

    def image_slot_ids(self, n: int) -> list[int]:
        """Ids of the image-slot rows 1..n (`MavenConfig.image_slots`): the padding ids right after
        the tokenizer's own, so they never collide with text and are never decoded."""
        if self.tokenizer_size + n > self.text_vocab_size:
            raise ConfigError(
                f"image slots for {n} images need ids {self.tokenizer_size}..{self.tokenizer_size + n - 1} but the "
                f"text vocabulary ends at {self.text_vocab_size - 1}; lower max_images or raise llm.text_vocab_size"
            )
        return list(range(self.tokenizer_size, self.tokenizer_size + n))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["visual_offset"] = self.visual_offset
        d["vocab_size"] = self.vocab_size
        return d


def build_default_tokenizer(vocab_size: int = 496) -> Tokenizer:
    """Train the deterministic byte-level BPE; specials are appended after the BPE ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [" ".join(_CORPUS_WORDS[i : i + 12]) for i in range(0, len(_CORPUS_WORDS), 12)]
    tok.train_from_iterator(sentences * 4 + [" " + w for w in _CORPUS_WORDS], trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


class TextTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` that knows the unified vocabulary layout."""

    def __init__(self, tokenizer: Tokenizer, text_vocab_size: int, codebook_size: int):
        self.tokenizer = tokenizer
        # User text must never turn into special ids.
        self.tokenizer.encode_special_tokens = True
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise CheckpointError(f"tokenizer lacks special tokens {missing}; rebuild it with maven-edge")
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > text_vocab_size:
            raise CheckpointError(
                f"tokenizer has {size} ids but the model's text vocabulary holds {text_vocab_size}"
            )
        self.layout = VocabLayout(
            text_vocab_size=text_vocab_size,
            tokenizer_size=size,
            codebook_size=codebook_size,
            special_ids={t: vocab[t] for t in SPECIAL_TOKENS},
        )

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, text_vocab_size: int, codebook_size: int) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
            raise CheckpointError(f"cannot read tokenizer {path}: {exc}") from exc
        return cls(tok, text_vocab_size, codebook_size)

    @classmethod
    def default(cls, text_vocab_size: int, codebook_size: int) -> TextTokenizer:
        return cls(build_default_tokenizer(), text_vocab_size, codebook_size)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    # -- ids ------------------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        return self.layout.special_ids[EOS]

    @property
    def pad_id(self) -> int:
        return self.layout.special_ids[PAD]

    @property
    def bos_id(self) -> int:
        return self.layout.special_ids[BOS]

    @property
    def image_id(self) -> int:
        return self.layout.special_ids[IMAGE_TOKEN]

    @property
    def img_start_id(self) -> int:
        return self.layout.special_ids[IMG_START]

    @property
    def img_end_id(self) -> int:
        return self.layout.special_ids[IMG_END]

    @property
    def eos_vis_id(self) -> int:
        return self.layout.special_ids[EOS_VIS]

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token text is encoded literally."""
        if not isinstance(text, str):
            raise PromptError(f"prompt text must be str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """A prompt to ids, with each ``<image>`` placeholder as the image-token id."""
        ids: list[int] = [self.bos_id]
        for i, piece in enumerate(split_prompt(prompt)):
            if i:
                ids.append(self.image_id)
            if piece:
                ids.extend(self.encode(piece))
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Ids to text; visual-code ids and padding ids are dropped."""
        keep = [int(i) for i in ids if int(i) < self.layout.tokenizer_size]
        return self.tokenizer.decode(keep, skip_special_tokens=skip_special)

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def split_prompt(prompt: str) -> list[str]:
    """Split a prompt at ``<image>`` placeholders: n placeholders give n + 1 text pieces."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt.split(IMAGE_TOKEN)


def count_image_placeholders(prompt: str) -> int:
    return len(split_prompt(prompt)) - 1


def load_layout(path: str | Path) -> VocabLayout:
    d = json.loads(Path(path).read_text())
    return VocabLayout(d["text_vocab_size"], d["tokenizer_size"], d["codebook_size"], d["special_ids"])
