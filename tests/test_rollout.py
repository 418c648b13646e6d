import copy

import pytest
import torch

from hopd.rollout import filter_logits, left_pad, sample
from hopd.teacher import score


def _prompts(tokenizer, texts):
    return [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in texts]


def test_greedy_matches_hf_generate(micro_model, tokenizer):
    prompts = _prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;"])
    r = sample(micro_model, prompts, 12, eos_id=-1, pad_id=tokenizer.pad_token_id, greedy=True)
    for i, p in enumerate(prompts):  # one at a time: no padding in the reference
        ref = micro_model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                   eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        assert r.response_ids_B_R[i].tolist() == ref[0, len(p):].tolist()


def test_left_padding_does_not_change_the_samples(micro_model, tokenizer):
    short, long = _prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;c=b+b;"])
    alone = sample(micro_model, [short], 10, eos_id=-1, pad_id=0, greedy=True)
    padded = sample(micro_model, [short, long], 10, eos_id=-1, pad_id=0, greedy=True)
    assert padded.response_ids_B_R[0].tolist() == alone.response_ids_B_R[0].tolist()
    assert torch.allclose(padded.sampler_logp_B_R[0], alone.sampler_logp_B_R[0], atol=1e-5)


def test_masks_are_exact_for_eos_and_horizon(micro_model, tokenizer):
    prompts = _prompts(tokenizer, ["a=1+2;"] * 64)
    gen = torch.Generator().manual_seed(0)
    # pick a frequent token as "EOS" so that some rows stop early and others are cut
    eos = 14
    r = sample(micro_model, prompts, 8, eos_id=eos, pad_id=0, generator=gen, temperature=3.0)
    ids, m = r.response_ids_B_R, r.response_mask_B_R
    for row_ids, row_m, cut in zip(ids.tolist(), m.tolist(), r.cut_B.tolist()):
        n = sum(row_m)
        assert row_m == [1] * n + [0] * (len(row_m) - n)  # a prefix
        if cut:
            assert n == 8 and eos not in row_ids[:n]
        else:
            assert row_ids[n - 1] == eos and eos not in row_ids[: n - 1]
            assert all(t == 0 for t in row_ids[n:])  # padding after EOS
    assert r.cut_B.any() and (~r.cut_B).any()
    assert (r.sampler_logp_B_R[m == 0] == 0).all()
    assert r.attn_B_T[:, r.prompt_len:].equal(m)


def test_sampler_logp_equals_a_full_forward_pass(micro_model, tokenizer):
    prompts = _prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;"])
    r = sample(micro_model, prompts, 9, eos_id=-1, pad_id=0,
               generator=torch.Generator().manual_seed(1))
    s = score(micro_model, r)  # scoring the rollout with the sampler itself
    mask = r.response_mask_B_R.bool()
    assert torch.allclose(s.logp_B_R[mask], r.sampler_logp_B_R[mask], atol=1e-4)


def test_same_seed_same_tokens(micro_model, tokenizer):
    prompts = _prompts(tokenizer, ["a=1+2;"] * 4)
    a = sample(micro_model, prompts, 6, eos_id=-1, pad_id=0,
               generator=torch.Generator().manual_seed(5))
    b = sample(micro_model, prompts, 6, eos_id=-1, pad_id=0,
               generator=torch.Generator().manual_seed(5))
    c = sample(micro_model, prompts, 6, eos_id=-1, pad_id=0,
               generator=torch.Generator().manual_seed(6))
    assert a.ids_B_T.equal(b.ids_B_T)
    assert not a.ids_B_T.equal(c.ids_B_T)


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw)).tolist()[0]

    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum() == 1


def test_left_pad_layout():
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]


def test_row_seeds_make_rows_independent_of_the_batch(micro_model, tokenizer):
    prompts = _prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;", "a=5-5;", "a=7*7;"])
    full = sample(micro_model, prompts, 12, eos_id=-1, pad_id=0, temperature=1.5, row_seeds=[10,
                  11, 12, 13])
    half = sample(micro_model, prompts[2:], 12, eos_id=-1, pad_id=0, temperature=1.5,
                  row_seeds=[12, 13])
    assert full.response_ids_B_R[2:].equal(half.response_ids_B_R)
    assert torch.allclose(full.sampler_logp_B_R[2:], half.sampler_logp_B_R, atol=1e-5)
    other = sample(micro_model, prompts, 12, eos_id=-1, pad_id=0, temperature=1.5, row_seeds=[20,
                   21, 22, 23])
    assert not full.response_ids_B_R.equal(other.response_ids_B_R)


def test_inverse_cdf_sampling_has_the_right_distribution():
    """Frequencies of a 3-token distribution drawn through the row-seed path."""
    from hopd.rollout import filter_logits  # noqa: F401  (same module under test)

    class Fixed(torch.nn.Module):  # a "model" whose next-token distribution never changes
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"model_type": "fixed"})()

        def forward(self, input_ids, **kw):
            logits = torch.log(torch.tensor([0.6, 0.3, 0.1, 0.0]))
            out = type("O", (), {})()
            out.logits = logits.expand(input_ids.size(0), input_ids.size(1), 4)
            return out

    r = sample(Fixed(), [[1]] * 4000, 1, eos_id=-1, pad_id=0, row_seeds=list(range(4000)),
               fast=False)
    counts = torch.bincount(r.response_ids_B_R[:, 0], minlength=4).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1, 0.0]), atol=0.03)
    assert counts[3] == 0  # a zero-probability token is never drawn


def test_a_bf16_sampler_copy_follows_the_learner_after_each_sync(tokenizer):
    """sampling.dtype=bfloat16: the sampler decodes with a bf16 copy of the fp32 learner. Its
    rollouts equal those of the learner cast to bf16, before and after the learner changes
    (sync), its log-probs stay close to the learner's own fp32 ones (rho near 1), and the
    learner itself is never touched."""
    import copy

    from hopd.models import tiny_llama
    from hopd.rollout import HFSampler

    torch.manual_seed(0)
    model = tiny_llama("micro", tokenizer, seed=0).train()
    sampler = HFSampler(model, -1, 0, dtype=torch.bfloat16)
    prompts = _prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;"] * 4)

    def reference():  # the learner as it is now, cast to bf16 by hand
        cast = copy.deepcopy(model).to(torch.bfloat16).eval()
        for mine, theirs in zip(cast.buffers(), model.buffers()):
            mine.data = theirs.data.clone()
        return sample(cast, prompts, 10, eos_id=-1, pad_id=0, row_seeds=list(range(8)),
                      match_hf=False)  # as the copy samples: off HF's rounding

    def same(a, b):
        return a.response_ids_B_R.equal(b.response_ids_B_R) and \
            a.sampler_logp_B_R.equal(b.sampler_logp_B_R)

    r = sampler.sample(prompts, 10, row_seeds=list(range(8)))
    assert same(r, reference()) and model.training
    assert next(model.parameters()).dtype == torch.float32
    s = score(model, r)  # the fp32 learner's log-probs of the copy's tokens
    assert (s.logp_B_R - r.sampler_logp_B_R).abs().mean() < 0.05
    with torch.no_grad():  # an optimizer step, as far as the sampler can tell
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not same(sampler.sample(prompts, 10, row_seeds=list(range(8))), reference())
    sampler.sync()
    assert same(sampler.sample(prompts, 10, row_seeds=list(range(8))), reference())
    # no copy without a dtype, or with the model's own: the learner samples itself
    assert HFSampler(model, -1, 0).copy is None
    assert HFSampler(model, -1, 0, dtype=torch.float32).copy is None


def test_sample_ahead_gives_each_step_the_rollout_it_would_sample_alone(micro_model, tokenizer,
                                                                          monkeypatch):
    """sampling.ahead: three steps' rows decoded as one batch, each step served its own rows,
    laid out (padding, columns) as if it had been sampled alone; one decode for the plan, and
    a step that was not planned samples on its own."""
    from hopd.rollout import HFSampler, SampleAhead

    texts = [["a=1+2;", "a=3*4;b=a-1;c=b+b;d=c-1;"], ["a=5-5;", "a=7*7;"],
             ["a=2+2;b=a*a;", "a=9-1;b=a+1;"]]
    seeds = [[0, 1], [20, 45], [200, 201]]  # step 1's rows both stop within 2 tokens
    steps = [(_prompts(tokenizer, t), 10, s) for t, s in zip(texts, seeds)]
    opts = {"eos_id": 14, "pad_id": 0, "temperature": 3.0}
    alone = [sample(micro_model, p, h, row_seeds=s, **opts) for p, h, s in steps]
    inner = HFSampler(micro_model, 14, 0, temperature=3.0)
    calls = []
    real = inner.sample
    monkeypatch.setattr(inner, "sample", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    ahead = SampleAhead(inner)
    assert not ahead.expects(*steps[0])
    ahead.plan(steps)
    assert all(ahead.expects(*step) for step in steps)
    for (p, h, s), want in zip(steps, alone):
        got = ahead.sample(p, h, row_seeds=s)
        assert got.prompt_len == want.prompt_len and got.ids_B_T.equal(want.ids_B_T)
        assert got.attn_B_T.equal(want.attn_B_T) and got.cut_B.equal(want.cut_B)
        assert got.response_mask_B_R.equal(want.response_mask_B_R)
        assert torch.allclose(got.sampler_logp_B_R, want.sampler_logp_B_R, atol=1e-5)
    assert calls == [6] and not any(ahead.expects(*step) for step in steps)
    # the plan's layouts differ, so the test checks the trimming: a longer prompt in step 0,
    # and a step whose rows all stop before H
    assert len({r.prompt_len for r in alone}) > 1
    assert any(r.response_mask_B_R.size(1) < 10 for r in alone)
    ahead.sample(steps[0][0], 10, row_seeds=[7, 8])  # not planned: sampled on its own
    assert calls == [6, 2]


def test_sample_with_greedy_gives_both_halves_as_if_sampled_apart(micro_model, tokenizer):
    """loss.unlikelihood's paired draw: the sampled rollouts and the greedy twin's answers come
    from one batch of 2B rows, each half laid out, token for token, as a separate call's (a
    float64 model, so that no rounding at the other batch size can part a row)."""
    from hopd.rollout import HFSampler, pick_token

    model = copy.deepcopy(micro_model).double()
    prompts = _prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;c=b+b;d=c-1;", "a=5-5;"])
    seeds = [3, 20, 45]
    sampler = HFSampler(model, 14, 0, temperature=3.0)
    twin = sampler.greedy_twin()
    assert twin.twin_of is sampler and sampler.twin_of is None
    rollout, answers = sampler.sample_with_greedy(prompts, 10, row_seeds=seeds)
    for got, want in ((rollout, sampler.sample(prompts, 10, row_seeds=seeds)),
                      (answers, twin.sample(prompts, 10))):
        assert got.prompt_len == want.prompt_len and got.ids_B_T.equal(want.ids_B_T)
        assert got.attn_B_T.equal(want.attn_B_T) and got.cut_B.equal(want.cut_B)
        assert got.response_mask_B_R.equal(want.response_mask_B_R)
        assert torch.allclose(got.sampler_logp_B_R, want.sampler_logp_B_R, atol=1e-12)
    # the halves differ (hot sampling against argmax), so taking the wrong rows would fail
    assert not rollout.response_ids_B_R.equal(answers.response_ids_B_R)
    with pytest.raises(ValueError, match="greedy already"):
        twin.sample_with_greedy(prompts, 10)
    # pick_token's flagged rows take the argmax of the unscaled softmax, the others sample
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    u = torch.tensor([[0.01], [0.01]])
    tok, logp = pick_token(logits, u, 5.0, greedy_B=torch.tensor([True, False]))
    assert tok.tolist() == [1, 0]
    assert torch.allclose(logp[0], logits[0].log_softmax(-1))
    assert torch.allclose(logp[1], (logits[1] / 5.0).log_softmax(-1))
