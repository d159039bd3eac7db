"""Discrete visual tokenizer: Q-Former-style query pooling, then vector quantization.

    patch_features [B, N, Dv] --(learned queries: self-attn, cross-attn to patches, MLP)x L-->
    z [B, Q, code_dim] --(nearest codebook entry, cosine)--> codes [B, Q]

With ``pooling="regions"`` each query starts as its learned vector plus the mean of its region's
patches (the patch grid cut into Q regions, `region_pooling`), so code k describes region k, as a
VQ-GAN-style tokenizer's codes do; ``"queries"`` (the default, the paper's design) has no regions.

`forward` returns the codes already offset into the unified vocabulary (visual_offset + c), as
the ONNX contract requires. For training, `quantize` also returns the straight-through
quantized vectors and the VQ-VAE codebook + commitment loss. Both `z` and the codebook are
L2-normalised before the nearest-neighbour search, which keeps code usage high (no collapse onto
a few codes with large norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maven_edge.core.config import DiscreteConfig, region_grid
from maven_edge.model_src.modeling.vision import MultiHeadAttention


@dataclass
class Quantized:
    codes: torch.Tensor  # [B, Q] int64 in [0, codebook_size)
    z_q: torch.Tensor  # [B, Q, code_dim] straight-through quantized vectors
    loss: torch.Tensor  # codebook + commitment loss (scalar)
    perplexity: torch.Tensor  # exp(entropy of code usage in this batch)


class QueryBlock(nn.Module):
    def __init__(self, cfg: DiscreteConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d)
        self.cross_attn = MultiHeadAttention(d, cfg.num_heads)
        self.norm3 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.intermediate_size), nn.GELU(), nn.Linear(cfg.intermediate_size, d))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = q + self.self_attn(self.norm1(q))
        q = q + self.cross_attn(self.norm2(q), kv)
        return q + self.mlp(self.norm3(q))


def region_pooling(grid: int, num_codes: int) -> torch.Tensor:
    """[num_codes, grid * grid]: row k averages the patches of region k (raster order of regions and
    patches; `region_grid` rows x columns of regions over the grid x grid patches)."""
    rows, cols = region_grid(num_codes)
    i, j = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    region = ((i * rows) // grid * cols + (j * cols) // grid).flatten()
    member = F.one_hot(region, num_codes).t().float()
    return member / member.sum(1, keepdim=True)


class DiscreteTokenizer(nn.Module):
    def __init__(self, cfg: DiscreteConfig, vision_width: int, visual_offset: int, grid: int | None = None):
        super().__init__()
        self.config = cfg
        self.visual_offset = visual_offset
        self.input_proj = nn.Linear(vision_width, cfg.hidden_size)
        self.input_norm = nn.LayerNorm(cfg.hidden_size)
        # unit-scale queries: with 0.02-scale ones every query attends alike and all 32 codes start identical
        self.queries = nn.Parameter(torch.randn(cfg.num_codes, cfg.hidden_size))
        self.blocks = nn.ModuleList(QueryBlock(cfg) for _ in range(cfg.num_layers))
        self.out_norm = nn.LayerNorm(cfg.hidden_size)
        self.to_code = nn.Linear(cfg.hidden_size, cfg.code_dim)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        nn.init.normal_(self.codebook.weight, std=1.0)
        if cfg.pooling == "regions":
            if grid is None:
                raise ValueError("a 'regions' tokenizer needs the patch grid size")
            # derived from the config, so not saved with the weights
            self.register_buffer("regions", region_pooling(grid, cfg.num_codes), persistent=False)
        else:
            self.regions = None

    def encode(self, patch_features: torch.Tensor) -> torch.Tensor:
        """Continuous query outputs z [B, Q, code_dim], L2-normalised."""
        kv = self.input_norm(self.input_proj(patch_features))
        q = self.queries.expand(patch_features.shape[0], -1, -1)
        if self.regions is not None:
            q = q + self.regions @ kv
        for block in self.blocks:
            q = block(q, kv)
        return F.normalize(self.to_code(self.out_norm(q)), dim=-1)

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each normalised vector (max cosine)."""
        return torch.argmax(z @ self.normalized_codebook().t(), dim=-1)

    def quantize(self, z: torch.Tensor) -> Quantized:
        codes = self.nearest(z)
        e = F.embedding(codes, self.normalized_codebook())
        loss = F.mse_loss(e, z.detach()) + self.config.commitment_cost * F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()  # straight-through estimator
        usage = F.one_hot(codes.flatten(), self.config.codebook_size).float().mean(0)
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        return Quantized(codes, z_q, loss, perplexity)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """visual_codes [B, Q] int64, offset into the unified vocabulary."""
        return self.nearest(self.encode(patch_features)) + self.visual_offset
