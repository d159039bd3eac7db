"""Patch selector (MLP over concat(patch, h_eos) -> sigmoid score) and the LLaVA-1.5 projector.

Selection keeps the top `k = floor(keep_ratio * N)` patches and returns them in raster order
(ascending patch index). Ranking uses the pre-sigmoid logits: sigmoid saturates to exactly 1.0
in float32 for logits above ~17, and ties there would make the kept set backend-dependent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maven_edge.core.config import SelectorConfig


class PatchSelector(nn.Module):
    """logits [B, N] = MLP(concat(patch_features [B,N,Dv], h_eos [B,D] broadcast to N))."""

    def __init__(self, cfg: SelectorConfig, vision_width: int, llm_width: int):
        super().__init__()
        self.config = cfg
        dims = [vision_width + llm_width] + [cfg.hidden_size] * (cfg.num_layers - 1) + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, patch_features: torch.Tensor, h_eos: torch.Tensor) -> torch.Tensor:
        x = torch.cat([patch_features, h_eos[:, None, :].expand(-1, patch_features.shape[1], -1)], dim=-1)
        for layer in self.layers[:-1]:
            x = F.gelu(layer(x))
        return self.layers[-1](x).squeeze(-1)


def select_patches(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k highest-scoring patches, sorted ascending (raster order)."""
    top = torch.topk(logits, k, dim=-1).indices
    return torch.sort(top, dim=-1).values


def gather_patches(patch_features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """patch_features [B, N, Dv] at indices [B, k] -> [B, k, Dv]."""
    return torch.gather(patch_features, 1, indices[..., None].expand(-1, -1, patch_features.shape[-1]))


class Projector(nn.Module):
    """LLaVA-1.5 `mlp2x_gelu`: Linear(Dv, D) -> GELU -> Linear(D, D)."""

    def __init__(self, vision_width: int, llm_width: int, output_scale: float = 1.0):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, llm_width)
        self.linear_2 = nn.Linear(llm_width, llm_width)
        self.output_scale = output_scale  # ProjectorConfig.output_scale: a constant, not a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_2(F.gelu(self.linear_1(x)))
        # No multiply at 1.0, so exported graphs of unscaled models stay exactly as before.
        return y if self.output_scale == 1.0 else y * self.output_scale
