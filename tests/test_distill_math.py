"""The learn step: gradient accumulation invariance, and the SFT loss mask."""

import pytest
import torch

from hopd.distill import LossConfig
from hopd.models import tiny_llama
from hopd.rollout import sample
from hopd.sft import sft_batch, sft_loss
from hopd.step import learn
from hopd.tasks import load_examples
from hopd.teacher import score


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind,top_k", [("sampled_rkl", 0), ("rkl", 0), ("fkl", 0), ("jsd", 0),
                                        ("rkl", 5), ("sft", 0)])
def test_batch8_accum1_equals_batch2_accum4(tokenizer, kind, top_k):
    """Also: micro-batches of rows of like length run only up to their longest response."""
    student = tiny_llama("micro", tokenizer, seed=1).double()
    teacher = tiny_llama("micro", tokenizer, seed=2).double().eval()
    prompts = [[1] + tokenizer(f"a={i}+{i};", add_special_tokens=False)["input_ids"]
               for i in range(8)]
    prompts[3] = prompts[3] + [14, 66]  # mixed prompt lengths
    # a frequent token as EOS so that rows have mixed lengths
    r = sample(student, prompts, 10, eos_id=14, pad_id=0, temperature=2.0,
               generator=torch.Generator().manual_seed(0))
    assert r.cut_B.any() and (~r.cut_B).any()
    need = "sampled" if kind == "sampled_rkl" else ("topk" if top_k else "full")
    scores = score(teacher, r, need, top_k)
    grads, work = [], []
    shapes = []
    student.register_forward_hook(lambda m, a, kw, out: shapes.append(kw["input_ids"].shape),
                                  with_kwargs=True)
    for accum in (1, 4):
        student.zero_grad(set_to_none=True)
        shapes.clear()
        stats = learn(student, r, scores, LossConfig(kind=kind, top_k=top_k), grad_accum=accum,
                      vocab=len(tokenizer))
        grads.append((_grads(student), stats["loss"]))
        work.append(sum(b * t for b, t in shapes))
    assert work[1] < work[0] == r.ids_B_T.numel()  # padding columns trimmed per micro-batch
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-12)
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-9)
    assert grads[0][0].abs().sum() > 0


def test_per_microbatch_normalisation_would_differ(tokenizer):
    """Guards the test above: dividing each micro-batch by its own token count changes things."""
    lengths = torch.tensor([10.0, 2.0])
    per_token = torch.tensor([1.0, 5.0])  # mean loss per token of each micro-batch
    right = (per_token * lengths).sum() / lengths.sum()
    wrong = per_token.mean()
    assert right != wrong


def test_sft_loss_mask_covers_exactly_the_response(tokenizer):
    ex = load_examples("chain:tiny", 3, "train", seed=0)
    ids, attn, loss_mask = sft_batch(tokenizer, ex)
    for row, e in enumerate(ex):
        n_prompt = 1 + len(e.prompt) + 1  # BOS + program + newline
        n_resp = len(e.response) + 1  # + EOS
        assert loss_mask[row].tolist() == [0] * n_prompt + [1] * n_resp + [0] * (
            ids.size(1) - n_prompt - n_resp)
        masked = ids[row][loss_mask[row].bool()].tolist()
        assert tokenizer.decode(masked[:-1]) == e.response and masked[-1] == tokenizer.eos_token_id


def test_sft_loss_ignores_prompt_tokens(tokenizer):
    model = tiny_llama("micro", tokenizer, seed=0)
    ex = load_examples("chain:tiny", 2, "train", seed=0)
    ids, attn, loss_mask = sft_batch(tokenizer, ex)
    base = sft_loss(model, ids, attn, loss_mask)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = loss_mask[:, 1:].float()
    assert base.item() == pytest.approx(((nll * m).sum() / m.sum()).item(), rel=1e-5)
    # the mask matters: the plain mean over all positions (prompt included) is different
    assert not torch.isclose(base, (nll.sum() / nll.numel()))


def _rollout_and_scores(tokenizer, need="full"):
    student = tiny_llama("micro", tokenizer, seed=1).double()
    teacher = tiny_llama("micro", tokenizer, seed=2).double().eval()
    prompts = [[1] + tokenizer(f"a={i}+{i};", add_special_tokens=False)["input_ids"]
               for i in range(8)]
    r = sample(student, prompts, 10, eos_id=14, pad_id=0, temperature=2.0,
               generator=torch.Generator().manual_seed(0))
    assert r.cut_B.any() and (~r.cut_B).any()  # mixed lengths: the normalisers differ
    return student, teacher, r, score(teacher, r, need)


@pytest.mark.parametrize("normalizer", ["token_mean", "seq_mean", "constant", "sum"])
@pytest.mark.parametrize("kind", ["sampled_rkl", "rkl", "sft"])
def test_every_normalizer_matches_brute_force_and_accumulation(tokenizer, normalizer, kind):
    from hopd.losses import divergence

    student, teacher, r, scores = _rollout_and_scores(
        tokenizer, "sampled" if kind in ("sampled_rkl", "sft") else "full")
    L = 12
    # brute force in float64: per-token terms, then the normaliser written out row by row
    with torch.no_grad():
        logits = student(input_ids=r.ids_B_T, attention_mask=r.attn_B_T).logits
        s_logp = logits[:, r.prompt_len - 1:-1].log_softmax(-1)
        y = r.response_ids_B_R
        s_y = s_logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if kind == "sampled_rkl":  # -rho_t A_t, A_t = -(log q - log t), rho_t = s / q
            rho = (s_y - r.sampler_logp_B_R).exp()
            term = rho * (r.sampler_logp_B_R - scores.logp_B_R)
        elif kind == "sft":
            term = -s_y
        else:
            term = divergence(s_logp, scores.logp_B_R_V, "rkl")
    m = r.response_mask_B_R.double()
    rows = [(term[b] * m[b]).sum() for b in range(8)]
    n_b = m.sum(1)
    expected = {"token_mean": sum(rows) / m.sum(), "sum": sum(rows),
                "seq_mean": sum(rw / n for rw, n in zip(rows, n_b)) / 8,
                "constant": sum(rows) / (8 * L)}[normalizer]
    results = []
    for accum in (1, 4):
        student.zero_grad(set_to_none=True)
        stats = learn(student, r, scores, LossConfig(kind=kind, normalizer=normalizer),
                      grad_accum=accum, vocab=len(tokenizer), budget=L)
        results.append((_grads(student), stats["loss"]))
    assert results[0][1] == pytest.approx(float(expected), rel=1e-9)
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-9, atol=1e-12)


def test_sft_strategy_trains_on_the_teachers_answers(tmp_path, micro_pair):
    """loss.kind=sft: the rollouts are the teacher's (its log-probs, not the student's)."""
    from hopd.cli import main
    from hopd.progress import read_metrics

    s, t = micro_pair
    run = tmp_path / "sft"
    assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "batch_size=4", "eval_n=4", "diag_every=0", "max_steps=2",
                 "loss.kind=sft", "loss.sft_greedy=true", "eval_every=0"]) == 0
    train = [x for x in read_metrics(run / "metrics.jsonl") if "loss" in x]
    # greedy teacher answers carry log-prob <= 0 and the CE of a random student is about log V
    assert len(train) == 2 and all(2.0 < x["loss"] < 6.0 for x in train)
    assert all(x["sampled_rkl"] == 0.0 for x in train)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0),
                                                     (1.0, 0, 0.8), (0.7, 8, 0.9)])
def test_importance_ratio_is_one_for_identical_weights_at_any_temperature(
        tokenizer, temperature, top_k, top_p):
    """The learner's log-probs are taken under the sampler's temperature and filters, so rho = 1
    when learner and sampler are the same weights (at T = 0.7 without this rho reached 3.3)."""
    from hopd.distill_config import SamplingConfig

    student = tiny_llama("micro", tokenizer, seed=1).double()
    teacher = tiny_llama("micro", tokenizer, seed=2).double().eval()
    prompts = [[1] + tokenizer(f"a={i}+{i};", add_special_tokens=False)["input_ids"]
               for i in range(8)]
    r = sample(student, prompts, 12, eos_id=14, pad_id=0, temperature=temperature,
               top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    student.zero_grad(set_to_none=True)
    stats = learn(student, r, score(teacher, r, "sampled"), LossConfig(), sampling=sampling,
                  vocab=len(tokenizer))
    assert stats["rho_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["rho_max"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("accum", [1, 4])
def test_unlikelihood_gradient_matches_brute_force(tokenizer, accum):
    from hopd.losses import repeated_ngrams
    from hopd.step import unlearn_repeats

    student = tiny_llama("micro", tokenizer, seed=1).double()
    # the term takes any answers; sampled ones of mixed lengths, n = 1, so that some repeat
    prompts = [[1] + tokenizer(f"a={i}+{i};", add_special_tokens=False)["input_ids"]
               for i in range(6)]
    r = sample(student, prompts, 16, eos_id=14, pad_id=0, temperature=0.7,
               generator=torch.Generator().manual_seed(0))
    marks = repeated_ngrams(r.response_ids_B_R, r.response_mask_B_R, 1)
    looped = marks.any(-1)
    assert looped.any() and (~looped).any()  # some answers repeat, some do not
    # brute force, float64, the whole batch at once: 0.7 * sum over marked tokens of
    # -log(1 - s(y)), divided by every answer token
    logits = student(input_ids=r.ids_B_T, attention_mask=r.attn_B_T).logits
    p = logits[:, r.prompt_len - 1:-1].softmax(-1)
    p_y = p.gather(-1, r.response_ids_B_R.unsqueeze(-1)).squeeze(-1)
    ref = 0.7 * -(torch.log1p(-p_y) * marks).sum() / r.response_mask_B_R.sum()
    student.zero_grad(set_to_none=True)
    ref.backward()
    want = _grads(student)
    student.zero_grad(set_to_none=True)
    stats = unlearn_repeats(student, r, LossConfig(kind="rkl", unlikelihood=0.7,
                                                   unlikelihood_n=1),
                            vocab=len(tokenizer), grad_accum=accum)
    assert torch.allclose(_grads(student), want, rtol=1e-9, atol=1e-12)
    assert stats["ul_loss"] == pytest.approx(ref.item(), rel=1e-9)
    assert stats["greedy_repeats"] == pytest.approx(
        float(marks.sum() / r.response_mask_B_R.sum()))
    # only the answers that repeat ran forward and backward
    assert stats["ul_tokens"] == int(r.attn_B_T[looped].sum()) < stats["greedy_tokens"]


def _greedy_setup(tokenizer):
    """A float64 micro student and teacher, six prompts, the student's sampler and an
    optimizer that leaves the gradients to be read (lr 0)."""
    from hopd.rollout import HFSampler

    student = tiny_llama("micro", tokenizer, seed=1).double()
    teacher = tiny_llama("micro", tokenizer, seed=2).double().eval()
    prompts = [[1] + tokenizer(f"a={i}+{i};", add_special_tokens=False)["input_ids"]
               for i in range(6)]
    sampler = HFSampler(student, 14, 0)
    return student, teacher, prompts, sampler, torch.optim.SGD(student.parameters(), lr=0.0)


def test_an_opd_step_adds_the_unlikelihood_gradient_of_its_greedy_answers(tokenizer):
    """opd_step with loss.unlikelihood: its gradient is the plain step's plus the term's on the
    student's greedy answers to the same prompts at the same H (the greedy twin shares the
    sampler's model), and the step reports the term."""
    from hopd.distill_config import DistillConfig, OptimConfig
    from hopd.step import opd_step, unlearn_repeats

    student, teacher, prompts, sampler, opt = _greedy_setup(tokenizer)
    grads, stats = {}, {}
    for weight in (0.0, 0.5):
        cfg = DistillConfig(loss=LossConfig(kind="rkl", unlikelihood=weight, unlikelihood_n=2),
                            optim=OptimConfig(grad_clip=1e9))
        _, _, stats[weight] = opd_step(student, teacher, opt, prompts, 12, cfg, sampler=sampler,
                                       vocab=len(tokenizer), greedy=sampler.greedy_twin(),
                                       row_seeds=list(range(6)))
        grads[weight] = _grads(student)
    student.zero_grad(set_to_none=True)
    answers = sample(student, prompts, 12, eos_id=14, pad_id=0, greedy=True)
    ul = unlearn_repeats(student, answers, LossConfig(unlikelihood=0.5, unlikelihood_n=2),
                         vocab=len(tokenizer))
    assert ul["ul_loss"] > 0 and stats[0.5].ul_loss == pytest.approx(ul["ul_loss"], rel=1e-9)
    assert stats[0.5].greedy_repeats == pytest.approx(ul["greedy_repeats"])
    assert ul["greedy_repeats"] > 0
    assert stats[0.0].ul_loss == 0.0 and stats[0.0].greedy_tokens == 0  # off: no greedy pass
    assert stats[0.5].loss == pytest.approx(stats[0.0].loss, rel=1e-12)  # reported apart
    assert torch.allclose(grads[0.5], grads[0.0] + _grads(student), rtol=1e-9, atol=1e-12)
    before = _grads(student)
    with pytest.raises(ValueError, match="greedy="):  # the term asked for, without its answers
        opd_step(student, teacher, opt, prompts, 12, cfg, sampler=sampler, vocab=len(tokenizer))
    assert torch.equal(_grads(student), before)  # raised before any pass


def test_the_unlikelihood_term_reads_answers_to_its_own_horizon_and_skips_when_told(tokenizer):
    """loss.unlikelihood_horizon: the greedy answers run to that many tokens (capped at the
    budget), not to the step's H; unlearn=False (loss.unlikelihood_every) leaves the term, and
    its greedy decode, out of the step."""
    from hopd.distill_config import DistillConfig, OptimConfig
    from hopd.step import opd_step, unlearn_repeats

    student, teacher, prompts, sampler, opt = _greedy_setup(tokenizer)

    def step(budget=0, unlearn=True, weight=0.5):
        cfg = DistillConfig(loss=LossConfig(kind="rkl", unlikelihood=weight, unlikelihood_n=2,
                                            unlikelihood_horizon=30),
                            optim=OptimConfig(grad_clip=1e9))
        _, _, st = opd_step(student, teacher, opt, prompts, 8, cfg, sampler=sampler,
                            vocab=len(tokenizer), greedy=sampler.greedy_twin(), budget=budget,
                            row_seeds=list(range(6)), unlearn=unlearn)
        return st, _grads(student)

    for budget, length in ((0, 30), (20, 20)):  # 30 tokens; the budget caps it
        st, _ = step(budget)
        student.zero_grad(set_to_none=True)
        answers = sample(student, prompts, length, eos_id=14, pad_id=0, greedy=True)
        assert answers.response_ids_B_R.size(1) > 8  # longer than the step's H
        ul = unlearn_repeats(student, answers, LossConfig(unlikelihood=0.5, unlikelihood_n=2),
                             vocab=len(tokenizer))
        assert ul["ul_loss"] > 0 and st.ul_loss == pytest.approx(ul["ul_loss"], rel=1e-9)
        assert st.greedy_tokens == int(answers.attn_B_T.sum())
    off, g_off = step(unlearn=False)
    plain, g_plain = step(weight=0.0)
    assert off.greedy_tokens == 0 and off.ul_loss == 0.0  # no greedy decode, no term
    assert torch.equal(g_off, g_plain)


def test_loss_unlikelihood_every_runs_the_term_on_every_nth_step(tmp_path, micro_pair):
    from hopd.cli import main
    from hopd.progress import read_metrics

    s, t = micro_pair
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "batch_size=4", "eval_n=4", "diag_every=0", "threads=1",
                 "max_steps=5", "eval_every=0", "loss.kind=rkl", "loss.unlikelihood=0.5",
                 "loss.unlikelihood_n=1", "loss.unlikelihood_every=2"]) == 0
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in steps if "ul_loss" in r] == [1, 3, 5]


@pytest.mark.parametrize("arg,match", [("loss.unlikelihood_every=0", "unlikelihood_every"),
                                       ("loss.unlikelihood_horizon=-1", "unlikelihood_horizon"),
                                       ("loss.unlikelihood_horizon=65", "above budget=64")])
def test_bad_unlikelihood_settings_are_refused_before_any_work(tmp_path, micro_pair, capsys,
                                                               arg, match):
    from hopd.cli import main

    s, t = micro_pair
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "budget=64", "loss.unlikelihood=0.5", arg]) == 2
    assert match in capsys.readouterr().err
    assert not run.exists()
