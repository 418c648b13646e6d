"""A lean decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3) with a static KV cache.

Why: sampling is H sequential decode steps of a (B, 1) slice. For small models, and for any
model at small batch, a step is dominated by per-call overhead: the generic `forward` builds
attention masks, updates a growing cache with `torch.cat`, recomputes rotary tables, dispatches
through module hooks and returns output objects. Here a decode step is a short fixed list of
tensor ops on the model's own weights, writing K/V into preallocated (B, n_kv, ., P + H)
buffers:

- q/k/v and gate/up are one matmul each (fused weight copies, for models up to 200M
  parameters), the attention scale is folded into the q weights, and q and k are rotated in
  one op with cos/sin looked up in a table built once per batch;
- the residual adds ride in the output projections (`addmm`), RMSNorm is one kernel in float32;
- attention is a plain batched matmul against a K cache kept transposed, with an additive key
  bias that hides the prompt's left padding;
- on a CPU, the projections' and the LM head's weights are packed once per batch into oneDNN's
  blocked layout for that many rows (`packed_weights`), the kernels PyTorch's own compiler
  uses for CPU inference: at 8-32 rows they ran 1.3-2.9x faster than the BLAS matmul, whose
  small-row kernels are far from reading the weights at memory speed.

That is the float32 step. In bf16/fp16 those fused roundings made the sampler's log-probs drift
from the learner's, so the 16-bit step rounds exactly where HF's forward does (RoPE as two
products, the scale unfolded, residual adds rounded, SDPA over K in HF's layout): its tokens and
log-probs equal HF's own cached decode. A 16-bit copy that samples for a float32 learner
(`match_hf=False`) needs no such match and runs the float32 step's ops in its own dtype.

Rows that have finished (EOS) keep decoding; rows never see each other, so their tokens are
simply discarded by the caller. Nothing in a step depends on the data, so on a GPU the sampler
records one whole token step (pick the token, decode it) as a CUDA graph and replays it
(`static=True` here: attention over the whole buffer with not-yet-written columns masked, and
the write column a device tensor that the step advances itself), which removes the per-kernel
launch cost that dominates small-batch decoding there.

The prompt (prefill) still runs through the model's own `forward`, once; its cache is copied into
the static buffers. Models whose structure this does not cover fall back to the generic loop
(`supports` says which); tests check both give the same tokens.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
FUSE_MAX_PARAMS = 200_000_000
TABLE_ROPE = {"default", "linear", "llama3", "yarn"}  # cos/sin depend on the position alone
# Below this hidden size the packed product's fixed cost outweighs its faster kernel (one
# (4h, h) product at 8-32 rows, 2-core CPU: 0.35-0.9x of BLAS at h = 64-128, 1.0-1.2x at 192,
# 1.3-2.7x from 256 up)
PACK_MIN_HIDDEN = 256


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
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    return getattr(rotary, "rope_type", "default") in TABLE_ROPE


def packed_weights(p: torch.Tensor, hidden: int) -> bool:
    """Whether a decoder of weights like `p` packs them for oneDNN: plain float32 tensors on a
    CPU whose PyTorch build has the packed linear op (not a sharded DTensor), for a model at
    least PACK_MIN_HIDDEN wide (HOPD_PACKED_DECODE=off: never)."""
    if os.environ.get("HOPD_PACKED_DECODE", "").lower() in ("off", "0", "false"):
        return False
    return p.device.type == "cpu" and p.dtype == torch.float32 and hidden >= PACK_MIN_HIDDEN \
        and type(p.detach()) is torch.Tensor and torch.backends.mkldnn.is_available() \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _pack(w: torch.Tensor, rows: int) -> torch.Tensor:
    """`w` (out, in) in oneDNN's blocked layout for products with `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T + b, with `w` packed (`_pack`) or plain."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _add_linear(x: torch.Tensor, o: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x + o @ w^T in one op (a residual add riding in an output projection)."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(o, x, w, None, "add")
    return torch.addmm(x, o, w.t())


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in float32, then scale by the weight in the input dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


class StaticDecoder:
    """The static cache of one batch; `step(tokens_B, positions_B)` gives (B, V) logits.

    With `static`, shapes and buffers never change from step to step (attention reads the whole
    buffer under a mask), so the step can be recorded as a CUDA graph.
    """

    def __init__(self, model: PreTrainedModel, batch: int, max_len: int, static: bool = False,
                 match_hf: bool = True):
        self.model = model
        m = model.model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = m.norm.variance_epsilon
        # the attention scale, folded into q's projection, or into q's norm where there is one
        # (Qwen3: a norm after the projection would undo it)
        self.scale = self.head_dim ** -0.5
        p = next(model.parameters())
        # In 16-bit every rounding must fall where HF's forward puts it, or the sampler's
        # log-probs drift from the learner's (bf16, the testbed student: 3x HF's own decode
        # with the fused float32 tricks). So in 16-bit: RoPE as two rounded products, the scale
        # unfolded, residual adds rounded, and attention through SDPA over a K cache in HF's
        # (B, n_kv, T, d) layout (SDPA rounds differently when K is a transposed view).
        # `match_hf=False` (a 16-bit copy that samples for a float32 learner, whose log-probs
        # differ from the copy's anyway) takes the float32 step's faster ops instead: at long
        # horizons SDPA's kv-head repeat copies the whole cache in every layer.
        self.hf_exact = match_hf and p.dtype in (torch.bfloat16, torch.float16)
        fold = 1.0 if self.hf_exact else self.scale
        self.q_scale = [1.0 if hasattr(layer.self_attn, "q_norm") else fold
                        for layer in m.layers]
        self.static = static
        kw = dict(dtype=p.dtype, device=p.device)
        # float32: K is kept transposed, (B, n_kv, d, T): q @ K^T is then a plain batched matmul
        # over contiguous rows, faster on CPU than the fused attention kernel at q_len = 1
        k_shape = (batch, self.n_kv, max_len, self.head_dim) if self.hf_exact else \
            (batch, self.n_kv, self.head_dim, max_len)
        self.k = [torch.zeros(k_shape, **kw) for _ in m.layers]
        self.v = [torch.zeros((batch, self.n_kv, max_len, self.head_dim), **kw) for _ in m.layers]
        self.bias = torch.zeros((batch, 1, 1, max_len), **kw)  # 0: attend; -inf: hidden key
        self.column = torch.zeros(1, dtype=torch.long, device=p.device)  # write column (static)
        self.length = 0  # columns of the cache in use
        cos, sin = m.rotary_emb(self.bias, torch.arange(max_len, device=p.device)[None])
        half = self.head_dim // 2
        # rotate_half(x) * sin == x.roll(half) * [-sin_lo, sin_hi]: one op less, same values
        self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)
        # Small models: one matmul for q/k/v and one for gate/up instead of five; per-call
        # overhead dominates there. The fused copies are rebuilt per batch (the weights change
        # every optimizer step) and skipped for large models, where they would cost memory.
        n_params = sum(t.numel() for t in model.parameters())
        plain = all(type(mod) is torch.nn.Linear for layer in m.layers
                    for mod in (layer.self_attn.q_proj, layer.self_attn.o_proj,
                                layer.mlp.gate_proj, layer.mlp.down_proj)) \
            and all(layer.self_attn.o_proj.bias is None for layer in m.layers)  # no LoRA
        self.fused = [self._fuse(layer, q) for layer, q in zip(m.layers, self.q_scale)] \
            if plain and n_params <= FUSE_MAX_PARAMS else None
        self.head = model.lm_head.weight  # the LM head's weight (packed with the rest)
        if self.fused is not None and not self.hf_exact and packed_weights(p, cfg.hidden_size):
            self.fused = [(_pack(w_qkv, batch), b_qkv, _pack(w_o, batch), _pack(w_gu, batch),
                           _pack(w_down, batch))
                          for w_qkv, b_qkv, w_o, w_gu, w_down in self.fused]
            if type(model.lm_head) is torch.nn.Linear:
                self.head = _pack(self.head, batch)
        self.qk_norm = [self._qk_norm_weight(layer) for layer in m.layers]

    @staticmethod
    def _fuse(layer: torch.nn.Module, scale: float) -> tuple[torch.Tensor, torch.Tensor | None,
                                                             torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        """A layer's q/k/v weight and bias, o, gate/up and down weights, as the step uses them."""
        att, mlp = layer.self_attn, layer.mlp
        w_qkv = torch.cat([att.q_proj.weight * scale, att.k_proj.weight, att.v_proj.weight])
        b_qkv = None
        if att.q_proj.bias is not None:
            b_qkv = torch.cat([att.q_proj.bias * scale, att.k_proj.bias, att.v_proj.bias])
        w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        return w_qkv, b_qkv, att.o_proj.weight, w_gu, mlp.down_proj.weight

    def _qk_norm_weight(self, layer: torch.nn.Module) -> torch.Tensor | None:
        """Qwen3 normalises each q and k head before RoPE: one norm over (n_heads + n_kv, d)."""
        att = layer.self_attn
        if not hasattr(att, "q_norm"):
            return None
        fold = 1.0 if self.hf_exact else self.scale
        return torch.cat([att.q_norm.weight.expand(self.n_heads, -1) * fold,
                          att.k_norm.weight.expand(self.n_kv, -1)])

    def load_prefill(self, cache: object, attn_B_P: torch.Tensor) -> None:
        """Copies the prompt's K/V from the model's own cache after a prefill forward."""
        P = attn_B_P.size(1)
        for i, layer in enumerate(cache.layers):  # type: ignore[attr-defined]
            if self.hf_exact:
                self.k[i][:, :, :P] = layer.keys
            else:
                self.k[i][:, :, :, :P] = layer.keys.transpose(-1, -2)
            self.v[i][:, :, :P] = layer.values
        self.bias.zero_()
        self.bias[:, 0, 0, :P].masked_fill_(attn_B_P == 0, float("-inf"))  # left padding
        if self.static:  # the whole buffer is read: columns not written yet stay hidden
            self.bias[:, :, :, P:] = float("-inf")
        self.length = P
        self.column.fill_(P)

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        """Appends one token per row at column `length`; returns next-token logits (B, V).

        `static`: the column lives on the device and the step advances it itself, so a CUDA
        graph that records this call stays right on every replay."""
        t = self.length
        self.length = t + 1
        out = self._step(tokens_B, positions_B, t)
        if self.static:
            self.column.add_(1)
        return out

    def _write_kv(self, i: int, k: torch.Tensor, v: torch.Tensor, t: int) -> None:
        """Writes this token's (B, n_kv, d) K and V at column t (static: at `column`)."""
        k_dim = 2 if self.hf_exact else 3
        if self.static:
            self.k[i].index_copy_(k_dim, self.column, k.unsqueeze(k_dim))
            self.v[i].index_copy_(2, self.column, v[:, :, None])
        else:
            self.k[i].select(k_dim, t).copy_(k)
            self.v[i][:, :, t] = v

    def _attend_hf(self, i: int, q: torch.Tensor, k_len: int, bias: torch.Tensor
                   ) -> torch.Tensor:
        """16-bit attention as HF's SDPA path computes it: kv heads repeated, a boolean mask,
        the exact scale."""
        B, nh, d = q.shape
        group = nh // self.n_kv
        keys, values = self.k[i][:, :, :k_len], self.v[i][:, :, :k_len]
        if group > 1:
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=bias == 0,
                                           scale=self.scale)
        return o.reshape(B, nh * d)

    def _step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, t: int) -> torch.Tensor:
        m = self.model.model
        B, nh, nkv, d = tokens_B.size(0), self.n_heads, self.n_kv, self.head_dim
        if self.static:
            self.bias.index_fill_(-1, self.column, 0.0)
            k_len = self.bias.size(-1)
        else:
            k_len = t + 1
        bias = self.bias[..., :k_len]
        x = F.embedding(tokens_B, m.embed_tokens.weight)  # (B, D)
        cos, sin = self.cos[positions_B][:, None], self.sin[positions_B][:, None]  # (B, 1, d)
        for i, layer in enumerate(m.layers):
            att, mlp = layer.self_attn, layer.mlp
            h = _rms(x, layer.input_layernorm.weight, self.eps)
            if self.fused is not None:
                w_qkv, b_qkv, w_o, w_gu, w_down = self.fused[i]
                qkv = _linear(h, w_qkv, b_qkv).view(B, nh + 2 * nkv, d)
            else:  # module calls, so that adapters (LoRA) wrapping the projections apply
                qkv = torch.cat([att.q_proj(h) * self.q_scale[i], att.k_proj(h),
                                 att.v_proj(h)], -1).view(B, nh + 2 * nkv, d)
            qk, v = qkv[:, : nh + nkv], qkv[:, nh + nkv:]
            if self.qk_norm[i] is not None:
                qk = _rms(qk, None, self.eps) * self.qk_norm[i]
            if self.hf_exact:  # RoPE on q and k at once, each product rounded as HF's is
                qk = qk * cos + qk.roll(d // 2, -1) * sin
            else:
                qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
            q, k = qk[:, :nh], qk[:, nh:]
            self._write_kv(i, k, v, t)
            if self.hf_exact:
                o = self._attend_hf(i, q, k_len, bias)
            else:  # query heads grouped by their kv head (HF's repeat_kv order)
                q = q.view(B, nkv, nh // nkv, d)
                probs = (torch.matmul(q, self.k[i][..., :k_len]) + bias).softmax(-1)
                o = torch.matmul(probs, self.v[i][:, :, :k_len]).view(B, nh * d)
            if self.fused is not None and not self.hf_exact:
                x = _add_linear(x, o, w_o)  # float32: one op, same rounding
                gate, up = _linear(_rms(x, layer.post_attention_layernorm.weight, self.eps),
                                   w_gu).chunk(2, dim=-1)
                x = _add_linear(x, F.silu(gate) * up, w_down)
            elif self.fused is not None:  # 16-bit: round the residual adds where HF does
                x = x + F.linear(o, w_o)
                gate, up = F.linear(_rms(x, layer.post_attention_layernorm.weight, self.eps),
                                    w_gu).chunk(2, dim=-1)
                x = x + F.linear(F.silu(gate) * up, w_down)
            else:
                x = x + att.o_proj(o)
                h = _rms(x, layer.post_attention_layernorm.weight, self.eps)
                x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        h = _rms(x, m.norm.weight, self.eps)
        if self.head.is_mkldnn:
            return _linear(h, self.head, self.model.lm_head.bias)
        return self.model.lm_head(h)
