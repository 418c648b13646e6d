"""Losses against brute-force float64 references on small vocabularies."""

import math

import pytest
import torch

from hopd.losses import (
    discounted_returns,
    distribution_loss,
    divergence,
    repeated_ngrams,
    sampled_rkl,
    token_logprobs,
    topk_with_tail,
    unlikelihood,
)

B, R, V = 3, 5, 7


@pytest.fixture(autouse=True)
def float64():
    """float64 references; the default dtype is restored so other tests are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mask():
    # mixed lengths: full row, stopped early (EOS at t=2), fully masked row
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)


def _kl_ref(p, q):
    return sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in range(len(p)) if p[i] > 0)


def _probs(logits):
    return [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]


@pytest.mark.parametrize("kind,beta", [("rkl", 0.5), ("fkl", 0.5), ("jsd", 0.0), ("jsd", 0.3),
                                       ("jsd", 0.5), ("jsd", 1.0)])
def test_divergences_match_brute_force(kind, beta):
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(B, R, V, generator=g)
    t_logits = torch.randn(B, R, V, generator=g)
    mask = _mask()
    n_tokens = int(mask.sum())
    got = distribution_loss(s_logits, {"logp_B_R_V": t_logits.log_softmax(-1)}, mask, n_tokens,
                            kind, beta)
    total = 0.0
    for b in range(B):
        for r in range(R):
            if not mask[b, r]:
                continue
            s, t = _probs(s_logits[b, r].tolist()), _probs(t_logits[b, r].tolist())
            if kind == "rkl" or (kind == "jsd" and beta == 1.0):
                d = _kl_ref(s, t)
            elif kind == "fkl" or (kind == "jsd" and beta == 0.0):
                d = _kl_ref(t, s)
            else:
                m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
                d = beta * _kl_ref(t, m) + (1 - beta) * _kl_ref(s, m)
            total += d
    assert got.item() == pytest.approx(total / n_tokens, rel=1e-10, abs=1e-12)


def test_divergence_is_zero_for_identical_and_positive_otherwise():
    logp = torch.randn(2, 3, V).log_softmax(-1)
    for kind in ("rkl", "fkl", "jsd"):
        assert torch.allclose(divergence(logp, logp, kind), torch.zeros(2, 3), atol=1e-12)
        assert (divergence(logp, torch.randn(2, 3, V).log_softmax(-1), kind) > 0).all()


def test_fully_masked_batch_gives_zero_loss_and_zero_gradient():
    s_logits = torch.randn(B, R, V, requires_grad=True)
    t = {"logp_B_R_V": torch.randn(B, R, V).log_softmax(-1)}
    loss = distribution_loss(s_logits, t, torch.zeros(B, R), 0, "rkl")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(s_logits.grad) == 0
    lp = torch.randn(B, R, requires_grad=True)
    loss2, _ = sampled_rkl(lp, torch.randn(B, R), torch.randn(B, R), torch.zeros(B, R), 0)
    loss2.backward()
    assert loss2.item() == 0.0 and torch.count_nonzero(lp.grad) == 0


def test_topk_with_full_k_equals_full_divergence():
    s_logits = torch.randn(B, R, V)
    t_logp = torch.randn(B, R, V).log_softmax(-1)
    vals, idx = torch.topk(t_logp, V, dim=-1)
    mask = _mask()
    full = distribution_loss(s_logits, {"logp_B_R_V": t_logp}, mask, 10, "rkl")
    topk = distribution_loss(s_logits, {"topk_logp_B_R_K": vals, "topk_ids_B_R_K": idx}, mask, 10,
                             "rkl")
    # with k = V the teacher's tail is empty; the student's tail is ~0 too (floored at 1e-10)
    assert topk.item() == pytest.approx(full.item(), abs=1e-8)


def test_topk_is_a_lower_bound_and_matches_brute_force_with_tail():
    s_logits = torch.randn(1, 1, V)
    t_logp = torch.randn(1, 1, V).log_softmax(-1)
    k = 3
    vals, idx = torch.topk(t_logp, k, dim=-1)
    s_c, t_c = topk_with_tail(s_logits.log_softmax(-1), vals, idx)
    s, t = _probs(s_logits[0, 0].tolist()), [math.exp(x) for x in t_logp[0, 0].tolist()]
    ids = idx[0, 0].tolist()
    s_ref = [s[i] for i in ids] + [1 - sum(s[i] for i in ids)]
    t_ref = [t[i] for i in ids] + [1 - sum(t[i] for i in ids)]
    for kind, ref in (("rkl", _kl_ref(s_ref, t_ref)), ("fkl", _kl_ref(t_ref, s_ref))):
        assert divergence(s_c, t_c, kind).item() == pytest.approx(ref, rel=1e-9)
        full = divergence(s_logits.log_softmax(-1), t_logp, kind).item()
        assert ref <= full + 1e-12


def test_sampled_rkl_matches_formula_and_gradient():
    g = torch.Generator().manual_seed(1)
    learner = torch.randn(B, R, generator=g, requires_grad=True)
    sampler = learner.detach() + 0.1 * torch.randn(B, R, generator=g)
    teacher = torch.randn(B, R, generator=g)
    mask = _mask()
    n = 11  # the optimizer step's token count (more than this micro-batch's 8)
    loss, stats = sampled_rkl(learner, sampler, teacher, mask, n)
    ref = 0.0
    for b in range(B):
        for r in range(R):
            if mask[b, r]:
                a = -(sampler[b, r] - teacher[b, r]).item()
                ref += math.exp(learner[b, r].item() - sampler[b, r].item()) * a
    assert loss.item() == pytest.approx(-ref / n, rel=1e-12)
    loss.backward()
    rho = torch.exp(learner.detach() - sampler)
    expected = -(rho * -(sampler - teacher)) * mask / n
    assert torch.allclose(learner.grad, expected, atol=1e-14)
    assert stats["sampled_rkl_sum"] == pytest.approx(((sampler - teacher) * mask).sum().item())


def test_sampled_rkl_gradient_at_rho_one_is_reinforce():
    learner = torch.randn(2, 4, requires_grad=True)
    sampler, teacher = learner.detach().clone(), torch.randn(2, 4)
    mask = torch.ones(2, 4)
    loss, _ = sampled_rkl(learner, sampler, teacher, mask, 8)
    loss.backward()
    assert torch.allclose(learner.grad, (sampler - teacher) / 8)


def test_discounted_returns_brute_force():
    r = torch.randn(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float64)
    gamma = 0.7
    got = discounted_returns(r, mask, gamma)
    for b in range(2):
        for t in range(6):
            ref = sum(gamma ** (u - t) * r[b, u].item() * mask[b, u].item() for u in range(t, 6))
            assert got[b, t].item() == pytest.approx(ref * mask[b, t].item(), abs=1e-12)
    assert torch.equal(discounted_returns(r, mask, 0.0), r * mask)


def test_clipping_limits_the_ratio():
    learner = torch.zeros(1, 2, requires_grad=True)
    sampler = torch.tensor([[-1.0, 1.0]])  # rho = e and 1/e
    teacher = sampler + 1.0  # positive advantages
    loss, _ = sampled_rkl(learner, sampler, teacher, torch.ones(1, 2), 2, clip_eps=0.2)
    loss.backward()
    # rho = e > 1.2 with A > 0: clipped branch, no gradient; rho = 1/e: unclipped
    assert learner.grad[0, 0].item() == 0.0
    assert learner.grad[0, 1].item() != 0.0


def test_token_logprobs_matches_cross_entropy():
    logits = torch.randn(B, R, V)
    ids = torch.randint(0, V, (B, R))
    ref = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    assert torch.allclose(token_logprobs(logits, ids), ref)


@pytest.mark.parametrize("kind, teacher_form, normalizer", [
    ("rkl", "hidden", "token_mean"), ("fkl", "hidden", "seq_mean"), ("jsd", "hidden", "token_mean"),
    ("rkl", "full", "seq_mean"), ("fkl", "topk", "token_mean"), ("jsd", "topk", "seq_mean")])
def test_chunked_full_vocabulary_loss_equals_the_direct_one(monkeypatch, kind, teacher_form,
                                                            normalizer):
    """float64: the loss and every gradient of a step computed a few positions at a time (the
    student's head, log-softmax and divergence under checkpoint; the teacher's log-probs from
    its hidden states per chunk) equal the direct [B, R, V] computation; the chunked path is
    taken (more than one chunk) and the teacher then never returns [B, R, V] log-probs."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import hopd.losses as L
    from hopd.distill_config import LossConfig
    from hopd.rollout import sample
    from hopd.step import chunked, learn
    from hopd.teacher import LocalTeacher

    torch.manual_seed(0)
    shape = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2)
    student = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True)).double()
    teacher = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).double().eval()
    r = sample(student, [[1, 2, 3, 4], [5, 6, 7], [8, 9]], 12, eos_id=7, pad_id=0,
               generator=torch.Generator().manual_seed(0))
    assert r.response_mask_B_R.sum() < r.response_mask_B_R.numel()  # some rows end early
    cfg = LossConfig(kind=kind, normalizer=normalizer, top_k=5 if teacher_form == "topk" else 0)
    need = {"hidden": "full", "full": "full", "topk": "topk"}[teacher_form]

    def step(chunk_elements: int | None):
        if chunk_elements:
            monkeypatch.setattr(L, "CHUNK_ELEMENTS", chunk_elements)
        m = copy.deepcopy(student)
        use = "hidden" if chunk_elements and teacher_form == "hidden" else need
        scores = LocalTeacher(teacher, 50).score(r, use, cfg.top_k)
        assert chunked(m, r, 50, 1) == bool(chunk_elements)
        out = learn(m, r, scores, cfg, vocab=50)
        monkeypatch.undo()
        return out["loss"], [p.grad for p in m.parameters()], scores

    direct, chunks = step(None), step(3 * 50 * 5)  # 5 positions per chunk: 3 chunks
    assert direct[0] == pytest.approx(chunks[0], rel=1e-12, abs=1e-15)
    for a, b in zip(direct[1], chunks[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert torch.equal(direct[2].logp_B_R, chunks[2].logp_B_R)
    if teacher_form == "hidden":
        assert chunks[2].logp_B_R_V is None and chunks[2].hidden_B_R_D is not None


def _repeats_ref(tokens, n):
    """Welleck et al.'s candidates written out: token t is marked when some n-gram that holds
    it already occurs whole in the tokens before that n-gram's start."""
    marks = [False] * len(tokens)
    for t in range(len(tokens)):
        for start in range(max(0, t - n + 1), min(t, len(tokens) - n) + 1):
            g = tokens[start:start + n]
            if any(tokens[e:e + n] == g for e in range(0, start - n + 1)):
                marks[t] = True
    return marks


def test_repeated_ngrams_hand_cases():
    ids = torch.tensor([[1, 2, 1, 2, 1, 0], [7, 7, 7, 7, 9, 9], [5, 6, 5, 6, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    got = repeated_ngrams(ids, mask, 2).tolist()
    assert got[0] == [False, False, True, True, True, False]  # "a b a b a": 2-3 and 3-4
    assert got[1] == [False, False, True, True, False, False]  # "x x x x": only from 2
    assert got[2] == [False] * 6  # the repeat lies past the mask: not the answer's
    assert not repeated_ngrams(ids, mask, 4).any()  # no 4-gram repeats in these
    assert repeated_ngrams(torch.tensor([[3, 4, 3]]), torch.ones(1, 3), 1).tolist() == \
        [[False, False, True]]  # n = 1: any token seen before


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_repeated_ngrams_match_brute_force(n):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 2, (6, 20), generator=g)  # 2 symbols: plenty of repeats
    lengths = [20, 17, 9, 4, 1, 0]
    mask = torch.tensor([[1] * k + [0] * (20 - k) for k in lengths])
    got = repeated_ngrams(ids, mask, n)
    for b, k in enumerate(lengths):
        assert got[b].tolist() == _repeats_ref(ids[b, :k].tolist(), n) + [False] * (20 - k)
    assert got.any()


def test_unlikelihood_matches_brute_force_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, R, V, generator=g)
    logits[0, 1, 2] = 30.0  # p(y) = 1 - 1e-12: floored, finite
    logits = logits.requires_grad_(True)
    y = torch.randint(0, V, (B, R), generator=g)
    y[0, 1] = 2
    marks = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    loss = unlikelihood(token_logprobs(logits, y), marks, num_tokens=9)
    # reference: 1 - p(y) summed over the other tokens, so that no log(1 - p) is formed
    ref = torch.zeros(())
    for b, t in marks.nonzero().tolist():
        p = logits[b, t].softmax(-1)
        others = p.sum() - p[y[b, t]] if (b, t) != (0, 1) else p[torch.arange(V) != 2].sum()
        ref = ref - torch.log(others.clamp(min=1e-10))
    ref = ref / 9
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    grad, = torch.autograd.grad(loss, logits)
    grad_ref, = torch.autograd.grad(ref, logits)
    assert torch.allclose(grad, grad_ref, rtol=1e-8, atol=1e-12)
    assert torch.isfinite(grad).all() and grad[2].abs().sum() == 0  # unmarked rows: no pull
    # its gradient on the marked token's own logit is p(y) (it pushes that token down)
    p = logits[1, 0].softmax(-1)[y[1, 0]]
    assert grad[1, 0, y[1, 0]].item() == pytest.approx(p.item() / 9, rel=1e-10)
