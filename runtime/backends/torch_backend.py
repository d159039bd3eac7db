"""The torch reference backend: the stage primitives over a :class:`MavenModel` (eager, fp32).

Importing this module imports torch; :mod:`maven_edge.runtime.backends` imports it lazily, only when a
caller asks for ``backend="torch"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from maven_edge.model_src.checkpoint import load_checkpoint
from maven_edge.model_src.modeling.decoder import KVCache
from maven_edge.model_src.modeling.maven import MavenModel
from maven_edge.model_src.modeling.selector import gather_patches, select_patches

if TYPE_CHECKING:
    from maven_edge.runtime.options import PipelineOptions

from maven_edge.runtime.backends.base import Backend, DecodeState, SelectorOutput
from maven_edge.runtime.caches import KVSnapshot


class TorchDecodeState(DecodeState):
    def __init__(self, past: KVCache, length: int, capacity: int):
        self.past: KVCache | None = past
        self.length = length
        self.capacity = capacity

    def release(self) -> None:
        self.past = None


class TorchBackend(Backend):
    """Runs each stage with the PyTorch reference modules, on CPU (or `device`)."""

    name = "torch"
    thread_safe = True  # inference under no_grad shares only read-only weights
    supports_kv_snapshots = True
    supports_chunked_prefill = True

    def __init__(self, model: MavenModel, device: str = "cpu"):
        super().__init__(model.config, model.tokenizer)
        self.model = model.eval().to(device)
        self._device = torch.device(device)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str = "cpu") -> TorchBackend:
        return cls(load_checkpoint(directory), device=device)

    @classmethod
    def from_options(cls, options: PipelineOptions) -> TorchBackend:
        assert options.checkpoint is not None
        return cls.from_checkpoint(options.checkpoint, device=options.device)

    @property
    def device(self) -> str:
        return str(self._device)

    # ---- helpers ---------------------------------------------------------------------------
    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self._device)

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    # ---- stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._np(self.model.vision(self._t(pixel_values)))

    @torch.no_grad()
    def discrete(self, patch_features: np.ndarray) -> np.ndarray:
        return self._np(self.model.discrete(self._t(patch_features))).astype(np.int64)

    @torch.no_grad()
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._np(self.model.embed_ids(self._t(input_ids.astype(np.int64))))

    @torch.no_grad()
    def hidden_states(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        _, hidden, _ = self.model.llm(self._t(inputs_embeds), self._t(attention_mask.astype(np.int64)))
        return self._np(hidden)

    @torch.no_grad()
    def select(self, patch_features: np.ndarray, h_eos: np.ndarray, k: int) -> SelectorOutput:
        pf = self._t(patch_features)
        logits = self.model.selector(pf, self._t(h_eos))
        indices = select_patches(logits, k)
        embeds = self.model.projector(gather_patches(pf, indices))
        return SelectorOutput(self._np(logits), self._np(embeds), self._np(indices).astype(np.int64))

    @torch.no_grad()
    def project(self, patch_features: np.ndarray) -> np.ndarray:
        return self._np(self.model.projector(self._t(patch_features)))

    def start(self, capacity: int, prefix: KVSnapshot | None = None) -> TorchDecodeState:
        if prefix is None:
            return TorchDecodeState(None, 0, capacity)
        t = [self._t(a)[None] for a in prefix.tensors]
        return TorchDecodeState([(t[2 * i], t[2 * i + 1]) for i in range(len(t) // 2)], prefix.length, capacity)

    @torch.no_grad()
    def _append(self, state: TorchDecodeState, inputs_embeds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._t(inputs_embeds)
        state.length += x.shape[1]
        mask = torch.ones(1, state.length, dtype=torch.long, device=self._device)
        logits, hidden, state.past = self.model.llm(x, mask, None, state.past)
        return logits[0, -1], hidden[0, -1]

    def prefill(self, inputs_embeds: np.ndarray, capacity: int, prefix: KVSnapshot | None = None
                ) -> tuple[np.ndarray, TorchDecodeState]:
        state = self.start(capacity, prefix)
        logits, _ = self._append(state, inputs_embeds)
        return self._np(logits), state

    def extend(self, state: DecodeState, inputs_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(state, TorchDecodeState)
        logits, hidden = self._append(state, inputs_embeds)
        return self._np(logits), self._np(hidden)

    def rewind(self, state: DecodeState, length: int) -> None:
        assert isinstance(state, TorchDecodeState) and 0 <= length <= state.length
        if state.past is not None and length < state.length:
            state.past = [(k[:, :, :length], v[:, :, :length]) for k, v in state.past]
        state.length = length

    def snapshot(self, state: DecodeState, length: int) -> KVSnapshot:
        assert isinstance(state, TorchDecodeState) and state.past is not None
        return KVSnapshot(length, tuple(self._np(t[0, :, :length]).copy() for kv in state.past for t in kv))

    @torch.no_grad()
    def decode(self, state: DecodeState, token_id: int) -> np.ndarray:
        assert isinstance(state, TorchDecodeState) and state.past is not None
        state.length += 1
        mask = torch.ones(1, state.length, dtype=torch.long, device=self._device)
        x = self.model.embed_ids(torch.tensor([[token_id]], device=self._device))
        logits, _, state.past = self.model.llm(x, mask, None, state.past)
        return self._np(logits[0, -1])

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": self.device, "torch": torch.__version__}
