"""The transformer around the attention variants, in two backbones, and its task heads.

- backbone "a" (paper A, as its reference code): embedding + positions (sinusoidal | learned |
  none | rope) + dropout, pre-LayerNorm blocks, FFN = Linear-GELU-Dropout-Linear-Dropout (no dropout on
  the attention branch), final LayerNorm (optional: the KWS model has none), untied head.
- `positions: rope`: RoPE on q and k inside every attention layer, nothing added to the embedding
  (the paper-A backbone with paper B's positions).
- backbone "b" (paper B): RoPE on q and k inside attention, pre-RMSNorm blocks, SwiGLU FFN
  (W_2 (silu(W_1 x) * W_3 x), no biases), dropout on both branches, final RMSNorm, untied head;
  use it with positions "none".
Heads: lm (next-token logits), classify (mean-pool over non-padding positions), token (read at a
given position per example). `input_dim` reads continuous features through Linear instead of an
embedding.

Legend: B batch, T sequence, D model width, F FFN width, V vocabulary, C classes, L max length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import build_attention
from workers.configs import ModelConfig  # the model's config, declared once (torch-free)


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table_LD = torch.zeros(max_len, d_model)
    table_LD[:, 0::2] = torch.sin(position * div)
    table_LD[:, 1::2] = torch.cos(position * div[: d_model // 2])
    return table_LD


class SwiGLU(nn.Module):
    """Paper B's FFN: W_2 (silu(W_1 x) * W_3 x), no biases."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff, bias=False)
        self.w_3 = nn.Linear(d_model, d_ff, bias=False)
        self.w_2 = nn.Linear(d_ff, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w_2(F.silu(self.w_1(x_BTD)) * self.w_3(x_BTD)))


def make_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model) if cfg.backbone == "a" else nn.RMSNorm(cfg.d_model)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = make_norm(cfg)
        self.attn = build_attention(
            cfg.attention,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            max_seq_len=cfg.max_seq_len,
            causal=cfg.causal,
            rotary=cfg.rotary,
            **cfg.attention_options,
        )
        self.ln_ffn = make_norm(cfg)
        if cfg.backbone == "a":
            self.ffn = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.d_ff),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.d_ff, cfg.d_model),
                nn.Dropout(cfg.dropout),
            )
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff, cfg.dropout)
        # paper A's reference code drops out inside the FFN only, not on the attention branch
        self.drop = nn.Dropout(cfg.dropout) if cfg.backbone == "b" else nn.Identity()

    def forward(self, x_BTD: torch.Tensor, key_padding_BT: torch.Tensor | None) -> torch.Tensor:
        x_BTD = x_BTD + self.drop(self.attn(self.ln_attn(x_BTD), key_padding_BT))
        return x_BTD + self.ffn(self.ln_ffn(x_BTD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.input_dim is None:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.padding_idx)
        else:  # continuous features (e.g. log-mel frames): Linear(input_dim -> d_model)
            self.embed = nn.Linear(cfg.input_dim, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_LD = nn.Parameter(torch.randn(cfg.max_seq_len, cfg.d_model) * 0.02)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_LD", sinusoidal_positions(cfg.max_seq_len, cfg.d_model), persistent=False)
        else:
            self.pos_LD = None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = make_norm(cfg) if cfg.final_norm else nn.Identity()
        out = cfg.vocab_size if cfg.head == "lm" else cfg.num_classes
        self.head = nn.Linear(cfg.d_model, out)  # untied from the embedding, as in paper A

    def forward(
        self,
        tokens_BT: torch.Tensor,
        key_padding_BT: torch.Tensor | None = None,
        positions_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens_BT: ids (B, T), or features (B, T, input_dim). positions_B: for the `token` head."""
        T = tokens_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        x_BTD = self.embed(tokens_BT)
        if self.pos_LD is not None:
            x_BTD = x_BTD + self.pos_LD[:T]
        x_BTD = self.drop(x_BTD)
        for block in self.blocks:
            x_BTD = block(x_BTD, key_padding_BT)
        x_BTD = self.ln_final(x_BTD)
        if self.cfg.head == "lm":
            return self.head(x_BTD)  # B T V
        if self.cfg.head == "token":
            if positions_B is None:
                raise ValueError("the `token` head needs positions_B: the position to read per example")
            return self.head(x_BTD[torch.arange(x_BTD.shape[0], device=x_BTD.device), positions_B])  # B C
        if key_padding_BT is None:
            pooled_BD = x_BTD.mean(dim=1)
        else:
            keep_BT1 = (~key_padding_BT)[..., None].to(x_BTD.dtype)
            pooled_BD = (x_BTD * keep_BT1).sum(1) / keep_BT1.sum(1).clamp_min(1.0)
        return self.head(pooled_BD)  # B C

    def param_counts(self) -> tuple[int, int]:
        """(total, non-embedding): non-embedding leaves out token and learned position tables."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.embed.weight.numel() if self.cfg.input_dim is None else 0
        if self.cfg.positions == "learned":
            embedding += self.pos_LD.numel()
        return total, total - embedding

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at sequence length `seq_len`: 2 per multiply-add of every matmul
        (read-in, attention projections, mixing, FFN, head); norms, activations and softmax are
        not counted. Attention mixing counts the full context even when causal (the Kaplan /
        Chinchilla / nanoGPT convention and what torch's flop counter measures). A training step
        costs about 3x this (forward + backward)."""
        return flops_per_token(self.cfg, seq_len, self.blocks[0].attn if self.blocks else None)


def ffn_flops_per_token(cfg: ModelConfig) -> float:
    return 2 * (2 if cfg.backbone == "a" else 3) * cfg.d_model * cfg.d_ff


def flops_per_token(cfg: ModelConfig, seq_len: int, attn: nn.Module | None = None) -> float:
    if attn is None:
        with torch.device("meta"):
            attn = Block(cfg).attn
    per_layer = attn.projection_flops_per_token(cfg.d_model) + attn.attention_flops_per_token(seq_len, cfg.d_model)
    per_layer += ffn_flops_per_token(cfg)
    head_out = cfg.vocab_size if cfg.head == "lm" else cfg.num_classes
    # lm: logits at every position; classify / token: one read-out per sequence, spread over its tokens
    head = 2 * cfg.d_model * head_out if cfg.head == "lm" else 2 * cfg.d_model * head_out / max(seq_len, 1)
    read_in = 2 * cfg.input_dim * cfg.d_model if cfg.input_dim else 0
    return cfg.n_layers * per_layer + head + read_in
