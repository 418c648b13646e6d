"""A prompt prefix that every row shares runs once: the same logits and gradients as the plain
forward (float64), for each architecture that allows it, and the plain forward where it does not."""

import pytest
import torch
from archs import ARCHS, COMMON
from transformers import MistralConfig, MistralForCausalLM

from hopd import models
from hopd.models import (
    MIN_SHARED_PREFIX,
    positions_from_mask,
    response_logits,
    shared_prefix_len,
    shares_prefix,
)
from hopd.rollout import left_pad, sample

SYSTEM = list(range(10, 10 + 20))  # a 20-token "system prompt" every row starts with


def batch(tails: list[list[int]], R: int = 6, ends: tuple[int, ...] = ()):
    """Prompts SYSTEM + tail, left padded, then R response tokens; row i's response is masked
    from column ends[i] on (EOS), where given."""
    g = torch.Generator().manual_seed(1)
    p_ids, p_attn = left_pad([SYSTEM + t for t in tails], pad_id=0)
    resp = torch.randint(3, 50, (len(tails), R), generator=g)
    r_attn = torch.ones_like(resp)
    for i, e in enumerate(ends):
        r_attn[i, e:] = 0
    return torch.cat([p_ids, resp], 1), torch.cat([p_attn, r_attn], 1), p_ids.size(1)


def plain_logits(model, ids, attn, P):
    R = ids.size(1) - P
    return model(input_ids=ids, attention_mask=attn, position_ids=positions_from_mask(attn),
                 logits_to_keep=R + 1).logits[:, :-1]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shared_prefix_gives_the_plain_logits_and_gradients(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().double().train()
    assert shares_prefix(model)
    ids, attn, P = batch([[31, 32, 33, 34, 35], [36, 37], [38, 39, 40], [41]], ends=(6, 3, 5, 1))
    assert shared_prefix_len(ids, attn, P) == 20
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape),
                                       with_kwargs=True)
    shared = response_logits(model, ids, attn, P)
    hook.remove()
    assert calls == [(1, 20), (4, ids.size(1) - 20)]  # the prefix once, then the rows without it
    plain = plain_logits(model, ids, attn, P)
    mask = attn[:, P:].bool()
    assert shared.shape == plain.shape
    assert torch.allclose(shared[mask], plain[mask], atol=1e-10)
    weights = torch.randn(plain.shape, dtype=torch.float64)
    grads = []
    for logits in (shared, plain):
        model.zero_grad()
        (logits.log_softmax(-1) * weights)[mask].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        # HF's RMSNorm computes in float32 whatever the model's dtype: the prefix's gradient,
        # summed over the rows before it passes back through a norm rather than after, differs
        # in float32's last places, not more
        assert torch.allclose(g, grads[1][name], rtol=1e-6, atol=1e-7 * float(g.abs().max())), name


def test_the_prefix_stops_where_rows_differ_and_keeps_the_last_prompt_token():
    ids, attn, P = batch([[31, 32, 33], [31, 32, 34]])
    assert shared_prefix_len(ids, attn, P) == 22  # SYSTEM + 31, 32
    ids, attn, P = batch([[31], [31]])
    assert shared_prefix_len(ids, attn, P) == 20  # the last prompt token stays out of it
    ids, attn, P = batch([[31], [32]])
    ids[1, 5] = 0  # rows differ inside the system prompt, before MIN_SHARED_PREFIX tokens
    assert shared_prefix_len(ids, attn, P) == 0
    ids, attn, P = batch([[31]])
    assert shared_prefix_len(ids, attn, P) == 0  # one row: nothing to share
    ids, attn, P = batch([[31, 32], [33]])
    attn[0, 3] = 0  # padding inside a prompt: not a layout the prefix path knows
    assert shared_prefix_len(ids, attn, P) == 0
    assert MIN_SHARED_PREFIX <= 20


def test_models_that_may_not_share_run_the_plain_forward(monkeypatch):
    torch.manual_seed(0)
    window = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8))
    assert not shares_prefix(window)  # the window would see other keys in the two layouts
    model = ARCHS["llama"]()
    model.gradient_checkpointing_enable()
    assert not shares_prefix(model)
    model.gradient_checkpointing_disable()
    assert shares_prefix(model)
    monkeypatch.setenv("HOPD_SHARE_PREFIX", "off")
    assert not shares_prefix(model)
    monkeypatch.delenv("HOPD_SHARE_PREFIX")
    ids, attn, P = batch([[31, 32], [33]])
    monkeypatch.setattr(models, "prefix_cache",
                        lambda *a: pytest.fail("took the shared path"))
    monkeypatch.setattr(models, "shares_prefix", lambda m: False)
    assert response_logits(model, ids, attn, P).shape == (2, 6, 50)


@pytest.mark.parametrize("fast", [True, False])
def test_sampling_after_a_shared_prefix_gives_the_same_rollouts(fast, monkeypatch):
    torch.manual_seed(0)
    model = ARCHS["llama"]().double().eval()
    prompts = [SYSTEM + [31, 32, 33], SYSTEM + [34], SYSTEM + [35, 36]]
    calls = []
    model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape),
                                with_kwargs=True)
    runs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("HOPD_SHARE_PREFIX", mode)
        calls.clear()
        runs[mode] = sample(model, prompts, 12, eos_id=-1, pad_id=0, row_seeds=[5, 6, 7],
                            greedy_rows=[False, True, False], fast=fast)
        assert calls[0] == ((1, 20) if mode == "on" else (3, 23))  # the prefill's first pass
    on, off = runs["on"], runs["off"]
    assert on.ids_B_T.equal(off.ids_B_T) and on.attn_B_T.equal(off.attn_B_T)
    assert torch.allclose(on.sampler_logp_B_R, off.sampler_logp_B_R, atol=1e-9)
