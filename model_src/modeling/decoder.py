"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, explicit KV cache.

Parameter names follow `transformers.LlamaForCausalLM` without the `model.` prefix
(embed_tokens, layers.{i}.self_attn.{q,k,v,o}_proj, layers.{i}.mlp.{gate,up,down}_proj,
layers.{i}.input_layernorm, layers.{i}.post_attention_layernorm, norm, lm_head), so Llama and
Qwen2 checkpoints load by name. The KV cache is passed in and returned as plain tensors:

    logits, hidden, present = decoder(inputs_embeds, attention_mask, position_ids, past)

with `past` / `present` a list of (key, value) per layer, each [batch, kv_heads, length, head_dim]
and `present[i] = cat(past[i], new)`. `attention_mask` [batch, past + seq] marks real tokens
with 1 and padding with 0; attention is causal on top of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from maven_edge.core.config import LLMConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [batch, seq, head_dim] for integer positions (HF Llama convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        # Set by `record_attention` (diagnostics, attention targets): when a list, each forward
        # appends its attention probabilities [batch, heads, queries, keys], detached unless
        # record_grad. None (the default) records nothing.
        self.record: list[torch.Tensor] | None = None
        self.record_grad = False

    def forward(self, x, cos, sin, mask, past: tuple[torch.Tensor, torch.Tensor] | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
            k = k[:, :, None].expand(b, self.num_kv_heads, rep, k.shape[2], self.head_dim).reshape(
                b, self.num_heads, k.shape[2], self.head_dim)
            v = v[:, :, None].expand(b, self.num_kv_heads, rep, v.shape[2], self.head_dim).reshape(
                b, self.num_heads, v.shape[2], self.head_dim)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5 + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        if self.record is not None:
            self.record.append(probs if self.record_grad else probs.detach())
        out = probs @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), present


@contextmanager
def record_attention(
    decoder: LlamaDecoder, layers: Sequence[int] | None = None, grad: bool = False
) -> Iterator[list[torch.Tensor]]:
    """Collect the attention maps of `layers` (all if None) while the block runs: one tensor per
    recorded layer per forward, in layer order. With `grad` they stay in the autograd graph (for a
    loss on them); otherwise they are detached."""
    attns = [decoder.layers[i].self_attn for i in (range(len(decoder.layers)) if layers is None else layers)]
    store: list[torch.Tensor] = []
    for attn in attns:
        attn.record, attn.record_grad = store, grad
    try:
        yield store
    finally:
        for attn in attns:
            attn.record, attn.record_grad = None, False


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


def causal_mask(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [batch, 1, seq, total]: query i (absolute past+i) sees keys j <= past+i."""
    total = attention_mask.shape[1]
    past = total - seq_len
    q_pos = torch.arange(seq_len, device=attention_mask.device)[:, None] + past
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & attention_mask[:, None, :].bool()
    # finfo.min instead of -inf: fully padded rows stay finite instead of NaN.
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    zero = torch.tensor(0.0, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)[:, None]


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """position_ids [batch, seq] for the last `seq_len` tokens: count of real tokens before each."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -seq_len:]


class LlamaDecoder(nn.Module):
    def __init__(self, cfg: LLMConfig, vocab_size: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=self.config.initializer_range)

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> KVCache:
        c = self.config
        z = torch.zeros(batch, c.num_kv_heads, 0, c.head_dim, dtype=dtype, device=self.lm_head.weight.device)
        return [(z, z) for _ in range(c.num_layers)]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """(logits [B,T,V], hidden_states [B,T,D] after the final norm, present per layer)."""
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq_len)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = causal_mask(attention_mask, seq_len, inputs_embeds.dtype)
        x, present = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, None if past_key_values is None else past_key_values[i])
            present.append(kv)
        hidden = self.norm(x)
        return self.lm_head(hidden), hidden, present


@torch.no_grad()
def expand_vocab(decoder: LlamaDecoder, new_vocab_size: int, seed: int = 0) -> LlamaDecoder:
    """Grow embed_tokens and lm_head to `new_vocab_size` (text model -> unified vocabulary).

    New embedding rows start at the mean of the existing rows plus small noise scaled by their
    std (so new tokens look like an average token and do not dominate attention); new head rows
    start at the mean head row (so initial logits for visual codes are neutral, not random).
    """
    old = decoder.vocab_size
    if new_vocab_size < old:
        raise ValueError(f"cannot shrink vocabulary from {old} to {new_vocab_size}")
    if new_vocab_size == old:
        return decoder
    gen = torch.Generator().manual_seed(seed)
    n_new = new_vocab_size - old
    emb = decoder.embed_tokens.weight
    noise = torch.randn(n_new, emb.shape[1], generator=gen) * emb.std(0, keepdim=True).cpu() * 0.1
    new_emb = nn.Embedding(new_vocab_size, emb.shape[1]).to(emb.device, emb.dtype)
    new_emb.weight.copy_(torch.cat([emb, (emb.mean(0, keepdim=True).cpu() + noise).to(emb)]))
    decoder.embed_tokens = new_emb
    if decoder.config.tie_word_embeddings:
        decoder.lm_head = nn.Linear(emb.shape[1], new_vocab_size, bias=False).to(emb.device, emb.dtype)
        decoder.lm_head.weight = decoder.embed_tokens.weight
    else:
        head = decoder.lm_head.weight
        new_head = nn.Linear(head.shape[1], new_vocab_size, bias=False).to(head.device, head.dtype)
        new_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(n_new, -1)]))
        decoder.lm_head = new_head
    return decoder
