"""The MaVEn model in PyTorch: ViT, discrete tokenizer, Llama-style decoder, selector, projector."""

from maven_edge.model_src.modeling.decoder import LlamaDecoder, expand_vocab
from maven_edge.model_src.modeling.discrete import DiscreteTokenizer
from maven_edge.model_src.modeling.maven import MavenModel, VisualEncoding
from maven_edge.model_src.modeling.selector import PatchSelector, Projector, select_patches
from maven_edge.model_src.modeling.vision import VisionEncoder

__all__ = [
    "DiscreteTokenizer",
    "LlamaDecoder",
    "MavenModel",
    "PatchSelector",
    "Projector",
    "VisionEncoder",
    "VisualEncoding",
    "expand_vocab",
    "select_patches",
]
