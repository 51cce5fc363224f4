"""The forward pass of S models of one architecture at once, written natively over stacked parameters
(no vmap): what `workers.stacked.run_pack` trains a cell's seeds with.

Legend: S seeds, B batch, T sequence, N = B*T rows, D model width, F FFN width, H heads, K head width,
d oscillator dimension, P phase coordinates per head, G gate width, V vocabulary, C classes, L max length.

Why not `torch.func.vmap(functional_call(...))`: on CPU at the small presets' shapes (~14k parameters)
a step is dominated by per-op dispatch, and vmap adds its own per-op cost (batching rules, and the
fallback to plain ops where a fused kernel has no rule: SDPA on CPU, the hand-written autograd
Functions of the oscillator and kuramoto). Measured on the quickstart softmax shape, a vmapped pack of
3 ran at 0.84x the trials/hour of the seeds one after another. Here every op runs once for all S seeds:

- parameter-free ops (GELU, softmax attention, the oscillator and kuramoto kernels, the losses'
  inputs) see the seed axis folded into the batch (or, for the oscillator, whose anchors are a
  per-seed parameter of every head, into the heads);
- Linear layers are one batched GEMM over [S, in, out] weights (`baddbmm`), embeddings one gather
  from the [S * V, D] table, LayerNorm/RMSNorm a normalisation plus a per-seed affine;
- dropout masks are drawn per seed from that seed's own generator, in the order and shapes the solo
  model draws them (embedding, then per block the attention branch (backbone b) and the FFN), so a
  stacked seed sees exactly its solo masks.

Each function mirrors the solo module it stands for (workers/model.py, workers/attention/*); the
equivalence test (tests/test_stacked.py) holds them to the solo losses over 100 steps. An attention
module this file does not know runs seed by seed through `torch.func.functional_call` (correct, not
faster).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention.kuramoto import KuramotoAttention, kuramoto_tangent
from workers.attention.oscillator import OscillatorAttention, oscillator_attention
from workers.attention.softmax import SoftmaxAttention, apply_rotary, softmax_attention
from workers.model import Transformer

Params = dict[str, torch.Tensor]


def linear(x_SNI: torch.Tensor, w_SOI: torch.Tensor, b_SO: torch.Tensor | None = None) -> torch.Tensor:
    """Every seed's `x @ W^T + b` as one batched GEMM: (S, N, in) -> (S, N, out)."""
    if b_SO is None:
        return torch.bmm(x_SNI, w_SOI.transpose(1, 2))
    return torch.baddbmm(b_SO.unsqueeze(1), x_SNI, w_SOI.transpose(1, 2))


class StackedForward:
    """Calls like the template `Transformer` (same arguments), with every input and output carrying a
    leading seed axis: tokens (S, B, T) or features (S, B, T, input_dim) -> (S, B, T, V) | (S, B, C)."""

    def __init__(self, template: Transformer, params: Params, generators: list[torch.Generator]) -> None:
        self.template, self.cfg, self.params, self.generators = template, template.cfg, params, generators
        self.active: list[bool] = [True] * len(generators)  # seeds not active draw no dropout masks
        self.attention: list[Callable] = [_ATTENTION.get(type(b.attn), _per_seed_attention) for b in template.blocks]
        for i, block in enumerate(template.blocks):
            if isinstance(block.attn, OscillatorAttention) and block.attn.ode["mode"] != "analytic":
                self.attention[i] = _per_seed_attention

    # ---- pieces ------------------------------------------------------------------------------

    def dropout(self, x_SNW: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """F.dropout for every seed with its own generator: its mask as the solo model draws it, on
        the solo shape (B, T, W)."""
        p = self.cfg.dropout
        if p == 0:
            return x_SNW
        S, _, W = x_SNW.shape
        masks_SBTW = torch.empty(S, B, T, W, dtype=x_SNW.dtype, device=x_SNW.device)
        for s, (generator, live) in enumerate(zip(self.generators, self.active)):
            if live:
                masks_SBTW[s].bernoulli_(1 - p, generator=generator)
            else:
                masks_SBTW[s].fill_(1 - p)  # scaled to 1 below
        return x_SNW * masks_SBTW.div_(1 - p).view(S, B * T, W)

    def norm(self, name: str, x_SND: torch.Tensor) -> torch.Tensor:
        module = self.template.get_submodule(name)
        w_SD = self.params[f"{name}.weight"]
        if isinstance(module, nn.LayerNorm):
            y_SND = F.layer_norm(x_SND, module.normalized_shape, eps=module.eps)
            return torch.addcmul(self.params[f"{name}.bias"].unsqueeze(1), y_SND, w_SD.unsqueeze(1))
        return F.rms_norm(x_SND, module.normalized_shape, eps=module.eps) * w_SD.unsqueeze(1)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg, params = self.cfg, self.params
        S, B, T = tokens.shape[:3]
        if cfg.input_dim is not None:  # features through Linear(input_dim -> D)
            return linear(tokens.reshape(S, B * T, -1), params["embed.weight"], params["embed.bias"])
        w_SVD = params["embed.weight"]
        V = w_SVD.shape[1]
        offset_S11 = (torch.arange(S, device=tokens.device) * V).view(S, 1, 1)
        x_SBTD = F.embedding(tokens + offset_S11, w_SVD.reshape(S * V, -1))
        if cfg.padding_idx is not None:  # the PAD row gets no gradient, as nn.Embedding(padding_idx=...)
            x_SBTD = torch.where((tokens == cfg.padding_idx).unsqueeze(-1), x_SBTD.detach(), x_SBTD)
        return x_SBTD.view(S, B * T, -1)

    def ffn(self, i: int, h_SND: torch.Tensor, B: int, T: int) -> torch.Tensor:
        params, pre = self.params, f"blocks.{i}.ffn"
        if self.cfg.backbone == "a":  # Linear, GELU, Dropout, Linear, Dropout
            u_SNF = F.gelu(linear(h_SND, params[f"{pre}.0.weight"], params[f"{pre}.0.bias"]))
            u_SNF = self.dropout(u_SNF, B, T)
            return self.dropout(linear(u_SNF, params[f"{pre}.3.weight"], params[f"{pre}.3.bias"]), B, T)
        gated_SNF = F.silu(linear(h_SND, params[f"{pre}.w_1.weight"])) * linear(h_SND, params[f"{pre}.w_3.weight"])
        return self.dropout(linear(gated_SNF, params[f"{pre}.w_2.weight"]), B, T)

    # ---- the model ---------------------------------------------------------------------------

    def __call__(self, tokens: torch.Tensor, key_padding_BT: torch.Tensor | None = None,
                 positions_B: torch.Tensor | None = None) -> torch.Tensor:
        """`key_padding_BT` (S, B, T) and `positions_B` (S, B) carry the seed axis too (the names are
        the template's, so a task's `model_inputs` drive both)."""
        cfg, params, template = self.cfg, self.params, self.template
        S, B, T = tokens.shape[:3]
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        x_SND = self.embed(tokens)
        D = x_SND.shape[-1]
        if cfg.positions == "learned":
            x_SND = (x_SND.view(S, B, T, D) + params["pos_LD"][:, None, :T]).view(S, B * T, D)
        elif cfg.positions == "sinusoidal":
            x_SND = (x_SND.view(S, B, T, D) + template.pos_LD[:T]).view(S, B * T, D)
        x_SND = self.dropout(x_SND, B, T)
        for i, block in enumerate(template.blocks):
            a_SND = self.attention[i](self, i, self.norm(f"blocks.{i}.ln_attn", x_SND), B, T, key_padding_BT)
            if cfg.backbone == "b":
                a_SND = self.dropout(a_SND, B, T)
            x_SND = x_SND + a_SND
            x_SND = x_SND + self.ffn(i, self.norm(f"blocks.{i}.ln_ffn", x_SND), B, T)
        if cfg.final_norm:
            x_SND = self.norm("ln_final", x_SND)
        w_head, b_head = params["head.weight"], params["head.bias"]
        if cfg.head == "lm":
            return linear(x_SND, w_head, b_head).view(S, B, T, -1)
        x_SBTD = x_SND.view(S, B, T, D)
        if cfg.head == "token":
            if positions_B is None:
                raise ValueError("the `token` head needs positions_B: the position to read per example")
            seeds_S1 = torch.arange(S, device=x_SND.device)[:, None]
            rows_1B = torch.arange(B, device=x_SND.device)[None, :]
            return linear(x_SBTD[seeds_S1, rows_1B, positions_B], w_head, b_head)
        if key_padding_BT is None:
            pooled_SBD = x_SBTD.mean(dim=2)
        else:
            keep_SBT1 = (~key_padding_BT)[..., None].to(x_SBTD.dtype)
            pooled_SBD = (x_SBTD * keep_SBT1).sum(2) / keep_SBT1.sum(2).clamp_min(1.0)
        return linear(pooled_SBD, w_head, b_head)


# ---- attention, per variant: (forward, block index, normalised x (S, N, D), B, T, padding (S, B, T)) ----


def _softmax(fwd: StackedForward, i: int, h_SND, B: int, T: int, key_padding_SBT):
    """SoftmaxAttention: fused SDPA over (S*B, H, T, K)."""
    module, params, pre = fwd.template.blocks[i].attn, fwd.params, f"blocks.{i}.attn"
    S, N, D = h_SND.shape
    H = module.n_heads

    def heads(x_SND):
        return x_SND.view(S * B, T, H, D // H).transpose(1, 2)

    q, k, v = (heads(linear(h_SND, params[f"{pre}.{w}.weight"])) for w in ("w_q", "w_k", "w_v"))
    if module.rotary:
        q = apply_rotary(q, module.rope_cos_LM, module.rope_sin_LM)
        k = apply_rotary(k, module.rope_cos_LM, module.rope_sin_LM)
    padding = None if key_padding_SBT is None else key_padding_SBT.reshape(S * B, T)
    o_NHTK = softmax_attention(q, k, v, causal=module.causal, key_padding_BT=padding)
    o_SND = o_NHTK.transpose(1, 2).reshape(S, N, D)
    return linear(o_SND, params[f"{pre}.w_o.weight"], params[f"{pre}.w_o.bias"])


def _oscillator(fwd: StackedForward, i: int, h_SND, B: int, T: int, key_padding_SBT):
    """OscillatorAttention (analytic): the anchors are a per-seed parameter of every head, so without
    padding the seeds fold into the heads, (B, S*H, T, K) with anchors (S*H, L, d), and one call of
    the fast path serves every seed (its heads are independent); with padding (which differs per seed:
    each seed reads its own batch) it runs seed by seed."""
    module, params, pre = fwd.template.blocks[i].attn, fwd.params, f"blocks.{i}.attn"
    S, N, D = h_SND.shape
    H = module.n_heads
    K = D // H

    def heads(x_SND):
        return x_SND.view(S, B, T, H, K).permute(0, 1, 3, 2, 4)  # S B H T K

    q, k, v = (heads(linear(h_SND, params[f"{pre}.{w}.weight"])) for w in ("w_q", "w_k", "w_v"))
    if module.rotary:
        q = apply_rotary(q, module.rope_cos_LM, module.rope_sin_LM)
        k = apply_rotary(k, module.rope_cos_LM, module.rope_sin_LM)
    anchors_SHLd = params[f"{pre}.anchors_HLd"]
    if module.anchor_norm == "always":
        anchors_SHLd = anchors_SHLd / anchors_SHLd.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    options = dict(causal=module.causal, p=module.p, readout_padding_mask=module.readout_padding_mask, **module.ode)
    if key_padding_SBT is None:
        def fold(x_SBHTK):
            return x_SBHTK.transpose(0, 1).reshape(B, S * H, T, K)

        o_BXTK, _ = oscillator_attention(fold(q), fold(k), fold(v), anchors_SHLd.flatten(0, 1), **options)
        o_SBHTK = o_BXTK.view(B, S, H, T, K).transpose(0, 1)
    else:
        per_seed = zip(q.unbind(0), k.unbind(0), v.unbind(0), anchors_SHLd.unbind(0), key_padding_SBT.unbind(0))
        o_SBHTK = torch.stack([oscillator_attention(q_s, k_s, v_s, r_s, key_padding_BT=pad_s, **options)[0]
                               for q_s, k_s, v_s, r_s, pad_s in per_seed])
    o_SND = o_SBHTK.permute(0, 1, 3, 2, 4).reshape(S, N, D)
    return linear(o_SND, params[f"{pre}.w_o.weight"], params[f"{pre}.w_o.bias"])


def _kuramoto(fwd: StackedForward, i: int, h_SND, B: int, T: int, key_padding_SBT):
    """KuramotoAttention: the tangent update over (S*B, H, T, P), kappa per seed."""
    module, params, pre = fwd.template.blocks[i].attn, fwd.params, f"blocks.{i}.attn"
    S, N, _ = h_SND.shape
    H, M = module.n_heads, module.phase_dim
    P = M // H

    def heads(x_SNM):
        return x_SNM.view(S * B, T, H, -1).transpose(1, 2)  # (S B) H T P

    theta_XHTP = heads(linear(h_SND, params[f"{pre}.w_in.weight"]))
    gate_XHTG = None
    if module.w_g is not None:
        g_SNG = F.softplus(linear(h_SND, params[f"{pre}.w_g.weight"]))
        gate_XHTG = heads(g_SNG)  # per coordinate (S B) H T P, per head (S B) H T 1
    kappa_S1H1P = params[f"{pre}.kappa_M"].view(S, 1, H, 1, P)
    cos_TP = sin_TP = None
    if module.drift:
        cos_TP, sin_TP = module.rope_cos_LP[:T], module.rope_sin_LP[:T]
    padding = None if key_padding_SBT is None else key_padding_SBT.reshape(S * B, T)
    for _ in range(module.steps):
        delta_XHTP = kuramoto_tangent(theta_XHTP, gate_XHTG, cos_TP, sin_TP, causal=module.causal,
                                      key_padding_BT=padding, scale=module.scale)
        theta_XHTP = (theta_XHTP.view(S, B, H, T, P) + kappa_S1H1P * delta_XHTP.view(S, B, H, T, P)).view(S * B, H, T, P)
    if module.readout == "phase":
        feats_XHTE = torch.cat([theta_XHTP.cos(), theta_XHTP.sin()], dim=-1)
        out_SNE = feats_XHTE.transpose(1, 2).reshape(S, N, 2 * M)
    else:
        out_SNE = delta_XHTP.transpose(1, 2).reshape(S, N, M)
    return linear(out_SNE, params[f"{pre}.w_out.weight"], params[f"{pre}.w_out.bias"])


def _per_seed_attention(fwd: StackedForward, i: int, h_SND, B: int, T: int, key_padding_SBT):
    """Any other attention module (or the oscillator's ODE modes): seed by seed, its own module code."""
    module, pre = fwd.template.blocks[i].attn, f"blocks.{i}.attn"
    S, N, D = h_SND.shape
    names = [name for name, _ in module.named_parameters()]
    per_name = {name: fwd.params[f"{pre}.{name}"].unbind(0) for name in names}  # unbind: one gradient write each
    h_per_seed = h_SND.unbind(0)
    outs = []
    for s in range(S):
        seed_params = {name: per_name[name][s] for name in names}
        padding = None if key_padding_SBT is None else key_padding_SBT[s]
        outs.append(torch.func.functional_call(module, seed_params, (h_per_seed[s].view(B, T, D), padding)))
    return torch.stack(outs).view(S, N, D)


_ATTENTION: dict[type, Callable] = {
    SoftmaxAttention: _softmax,
    OscillatorAttention: _oscillator,
    KuramotoAttention: _kuramoto,
}
