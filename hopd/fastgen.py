"""A lean decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3) with a static KV cache.

Why: sampling is H sequential decode steps of a (B, 1) slice. For small models, and for any
model at small batch, a step is dominated by per-call overhead: the generic `forward` builds
attention masks, updates a growing cache with `torch.cat`, dispatches through module hooks and
returns output objects. Here a decode step is a fixed list of tensor ops on the model's own
weights, writing K/V into preallocated (B, n_kv, P + H, d) buffers, and attention reads the
cache up to the current column with a boolean key mask (left padding and finished rows).

The prompt (prefill) still runs through the model's own `forward`, once; its cache is copied into
the static buffers. Models whose structure this does not cover fall back to the generic loop
(`supports` says which); tests check both give the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
FUSE_MAX_PARAMS = 200_000_000


def supports(model: PreTrainedModel, max_len: int) -> bool:
    """True when the fast decode step reproduces this model's forward up to `max_len` tokens."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and max_len > window:
        return False  # the window would hide keys that this step attends to
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return False
    return hasattr(model, "model") and hasattr(model.model, "rotary_emb")


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    # HF's RMSNorm: compute in float32, scale by the weight in the input dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class StaticDecoder:
    """Holds the static cache of one batch; `step(tokens_B, positions_B)` gives (B, V) logits."""

    def __init__(self, model: PreTrainedModel, batch: int, max_len: int):
        self.model = model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        p = next(model.parameters())
        # K is kept transposed, (B, n_kv, d, T): q @ K^T is then a plain batched matmul over
        # contiguous rows, faster on CPU than the fused attention kernel at q_len = 1
        self.k = [torch.zeros((batch, self.n_kv, self.head_dim, max_len), dtype=p.dtype,
                              device=p.device) for _ in model.model.layers]
        self.v = [torch.zeros((batch, self.n_kv, max_len, self.head_dim), dtype=p.dtype,
                              device=p.device) for _ in model.model.layers]
        self.key_ok_B_T = torch.zeros((batch, max_len), dtype=torch.bool, device=p.device)
        self.length = 0  # columns of the cache in use
        self.scale = self.head_dim ** -0.5
        # Small models: one matmul for q/k/v and one for gate/up instead of five; per-call
        # overhead dominates there. The fused copies are rebuilt per batch (the weights change
        # every optimizer step) and skipped for large models, where they would cost memory.
        n_params = sum(t.numel() for t in model.parameters())
        plain = all(type(m) is torch.nn.Linear for layer in model.model.layers
                    for m in (layer.self_attn.q_proj, layer.mlp.gate_proj))  # no LoRA wrappers
        self.fused = [self._fuse(layer) for layer in model.model.layers] \
            if plain and n_params <= FUSE_MAX_PARAMS else None

    @staticmethod
    def _fuse(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        att, mlp = layer.self_attn, layer.mlp
        w_qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        b_qkv = None
        if att.q_proj.bias is not None:
            b_qkv = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
        w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        return w_qkv, b_qkv, w_gu

    def load_prefill(self, cache: object, attn_B_P: torch.Tensor) -> None:
        """Copies the prompt's K/V from the model's own cache after a prefill forward."""
        P = attn_B_P.size(1)
        for i, layer in enumerate(cache.layers):  # type: ignore[attr-defined]
            self.k[i][:, :, :, :P] = layer.keys.transpose(-1, -2)
            self.v[i][:, :, :P] = layer.values
        self.key_ok_B_T[:, :P] = attn_B_P.bool()
        self.length = P

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor,
             alive_B: torch.Tensor) -> torch.Tensor:
        """Appends one token per row at column `length`; returns next-token logits (B, V)."""
        m = self.model.model
        t = self.length
        self.key_ok_B_T[:, t] = alive_B
        bias = torch.zeros(self.key_ok_B_T.shape[0], 1, 1, t + 1, dtype=self.v[0].dtype,
                           device=self.v[0].device)
        bias.masked_fill_(~self.key_ok_B_T[:, None, None, : t + 1], float("-inf"))  # (B,1,1,T)
        group = self.n_heads // self.n_kv
        x = m.embed_tokens(tokens_B[:, None])  # (B, 1, D)
        cos, sin = m.rotary_emb(x, positions_B[:, None])  # (B, 1, d)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, d)
        B = x.size(0)
        for i, layer in enumerate(m.layers):
            att = layer.self_attn
            h = _rms(x, layer.input_layernorm)
            nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            if self.fused is not None:
                w_qkv, b_qkv, w_gu = self.fused[i]
                q, k, v = F.linear(h, w_qkv, b_qkv).split([nq, nk, nk], dim=-1)
            else:
                q, k, v = att.q_proj(h), att.k_proj(h), att.v_proj(h)
            q = q.view(B, 1, self.n_heads, self.head_dim)
            k = k.view(B, 1, self.n_kv, self.head_dim)
            v = v.reshape(B, 1, self.n_kv, self.head_dim)
            if hasattr(att, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
                q, k = _rms(q, att.q_norm), _rms(k, att.k_norm)
            q = _rotate(q.transpose(1, 2), cos, sin)  # (B, h, 1, d)
            k = _rotate(k.transpose(1, 2), cos, sin)
            self.k[i][:, :, :, t] = k[:, :, 0]
            self.v[i][:, :, t] = v[:, 0]
            # query heads grouped by their kv head (HF's repeat_kv order): (B, n_kv, group, d)
            qg = q.reshape(B, self.n_kv, group, self.head_dim)
            scores = torch.matmul(qg, self.k[i][:, :, :, : t + 1]) * self.scale + bias
            o = torch.matmul(scores.softmax(-1), self.v[i][:, :, : t + 1])  # (B, n_kv, g, d)
            x = x + att.o_proj(o.reshape(B, 1, -1))
            h = _rms(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            if self.fused is not None:
                gate, up = F.linear(h, self.fused[i][2]).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = x + mlp.down_proj(F.silu(gate) * up)
        self.length = t + 1
        return self.model.lm_head(_rms(x, m.norm))[:, 0]
