"""The quality metrics against hand-computed cases and float64 brute force, and the collapse guard
on synthetic runs and inside `hopd distill`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hopd import context
from hopd.cli import main
from hopd.quality import (
    GuardReading,
    QualityAccumulator,
    answers_of,
    collapse_check,
    degeneration,
    distinct_n,
    distinct_n_se,
    distinct_parts,
    longest_run_share,
    loops,
    ratio_se,
    sampled_rkl,
    teacher_nll,
)
from hopd.rollout import row_seeds, sample
from hopd.teacher import LocalTeacher


def test_degeneration_metrics_by_hand():
    answers = [[1, 2, 3, 1, 2], [7, 7, 7, 7, 5], []]
    # bigrams: (1,2) (2,3) (3,1) (1,2) | (7,7) x3 (7,5): 8 bigrams, 5 distinct
    assert distinct_n(answers, 2) == pytest.approx(5 / 8)
    assert longest_run_share([7, 7, 7, 7, 5]) == pytest.approx(4 / 5)
    assert longest_run_share([1, 2, 3]) == pytest.approx(1 / 3)
    assert longest_run_share([]) == 0.0
    d = degeneration(answers, [True, False, True])
    assert d["mostly_one_token"] == pytest.approx(1 / 3)  # only the 7777 answer
    assert d["max_run_share_max"] == pytest.approx(0.8)
    assert d["max_run_share"] == pytest.approx((0.2 + 0.8 + 0.0) / 3)
    assert d["eos_rate"] == pytest.approx(2 / 3) and d["mean_length"] == pytest.approx(10 / 3)
    assert math.isnan(distinct_n([[1], []], 2))


def test_distinct_2_parts_by_hand():
    # [1,2,3,1,2]: 3 of its 4 bigrams distinct within it; [7,7,7,7,5]: 2 of 4; none shared
    answers = [[1, 2, 3, 1, 2], [7, 7, 7, 7, 5], []]
    assert distinct_parts(answers) == pytest.approx((5 / 8, 1.0))
    # no repeat inside either answer, (1,2) in both: 4 of 4 within, 3 kinds of those 4 across
    shared = [[1, 2, 3], [1, 2, 4]]
    assert distinct_parts(shared) == pytest.approx((1.0, 3 / 4))
    d = degeneration(shared + [[5, 5, 5, 5]], [True] * 3)  # 3 more bigrams, 1 kind
    assert (d["distinct_2_within"], d["distinct_2_across"]) == pytest.approx((5 / 7, 4 / 5))
    assert d["distinct_2"] == pytest.approx(4 / 7) == d["distinct_2_within"] * d[
        "distinct_2_across"]
    # the same answers twice: within unchanged, across (and distinct-2) halved
    assert distinct_parts(answers * 2) == pytest.approx((5 / 8, 0.5))
    assert all(math.isnan(x) for x in distinct_parts([[1], []]))
    g = torch.Generator().manual_seed(1)
    many = [torch.randint(0, 5, (int(n),), generator=g).tolist()
            for n in torch.randint(0, 25, (20,), generator=g)]
    within, across = distinct_parts(many)
    assert within * across == pytest.approx(distinct_n(many), rel=1e-12) and across < 1


def test_distinct_2_standard_error_by_hand_and_by_leaving_each_answer_out():
    # leaving out [1,2,3,1,2] leaves 2 distinct of 4 bigrams; leaving out [7,7,7,7,5], 3 of 4;
    # the empty answer holds no bigram and does not count: k = 2, values 0.5 and 0.75
    answers = [[1, 2, 3, 1, 2], [7, 7, 7, 7, 5], []]
    assert distinct_n_se(answers) == pytest.approx(math.sqrt(1 / 2 * 2 * 0.125 ** 2))
    assert degeneration(answers, [True] * 3)["distinct_2_se"] == pytest.approx(0.125)
    assert math.isnan(distinct_n_se([[1, 2, 3], [4]]))  # one answer with bigrams
    g = torch.Generator().manual_seed(0)
    many = [torch.randint(0, 6, (int(n),), generator=g).tolist()
            for n in torch.randint(0, 30, (25,), generator=g)]
    kept = [a for a in many if len(a) >= 2]
    loo = [distinct_n(kept[:i] + kept[i + 1:]) for i in range(len(kept))]
    k, mean = len(loo), sum(loo) / len(loo)
    brute = math.sqrt((k - 1) / k * sum((v - mean) ** 2 for v in loo))
    assert distinct_n_se(many) == pytest.approx(brute, rel=1e-12) and brute > 0


def test_looping_by_hand():
    phrase = [4, 5, 6, 7]  # "a symbol of the past," repeated: 19 bigrams, 4 distinct
    assert loops(phrase * 5)
    assert not loops(list(range(20)))  # 19 bigrams, all distinct
    assert not loops(phrase * 4)  # 15 bigrams: too short to judge, however repetitive
    some = list(range(10)) + [0, 1] * 4 + [0]  # 18 bigrams: the 9 of 0..9, (9, 0), (1, 0)
    assert distinct_n([some], 2) == pytest.approx(11 / 18) and not loops(some)
    d = degeneration([phrase * 5, list(range(20)), phrase * 4, []], [False, True, True, True])
    assert d["looping"] == pytest.approx(1 / 4)
    # pooled distinct-2 falls as the same good answer is repeated; the looping share does not
    twice = degeneration([list(range(20))] * 2, [True, True])
    assert twice["distinct_2"] == pytest.approx(0.5) and twice["looping"] == 0.0


def test_answers_drop_eos_and_padding():
    ids = torch.tensor([[5, 6, 2, 0], [7, 7, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    answers, ended = answers_of(ids, mask, eos_id=2)
    assert answers == [[5, 6], [7, 7, 7, 7]] and ended == [True, False]


def test_ratio_se_by_hand():
    # two prompts: sums 2 and 6 over 1 and 3 tokens; mean 8/4 = 2; residuals 0 and 0
    assert ratio_se([2.0, 6.0], [1.0, 3.0]) == (2.0, 0.0)
    mean, se = ratio_se([1.0, 5.0], [1.0, 1.0])  # plain mean 3, sd of the two = sqrt(8)
    assert mean == 3.0 and se == pytest.approx(math.sqrt(8) / math.sqrt(2))


def _brute_rkl(student, teacher, ids_B_T, P, mask_B_R):
    """KL(s || t) per response position from full float64 forward passes, no response_logits."""
    with torch.no_grad():
        s = student.double()(ids_B_T).logits[:, P - 1:-1].log_softmax(-1)
        t = teacher.double()(ids_B_T).logits[:, P - 1:-1].log_softmax(-1)
    student.float(), teacher.float()
    return ((s.exp() * (s - t)).sum(-1) * mask_B_R.double())


def test_held_out_rkl_and_teacher_nll_equal_float64_brute_force(micro_pair, tokenizer):
    from hopd.models import load_model

    s_dir, t_dir = micro_pair
    student, teacher = load_model(str(s_dir)).eval(), load_model(str(t_dir)).eval()
    prompts = [[1, 10, 11, 12], [1, 13, 14]]  # equal-length rows need no padding
    prompts = [[1, 10, 11, 12], [1, 13, 14, 15]]
    acc = QualityAccumulator.empty()
    sampled_rkl(student, LocalTeacher(teacher), prompts, budget=9, vocab=None, eos=-1, pad=0,
                seed=3, acc=acc)
    r = sample(student, prompts, 9, eos_id=-1, pad_id=0, temperature=1.0,
               row_seeds=row_seeds(3, 0, range(2), stream="diag"))
    kl = _brute_rkl(student, teacher, r.ids_B_T, r.prompt_len, r.response_mask_B_R)
    mean, _ = ratio_se(acc.rkl_sums, acc.rkl_counts)
    assert mean == pytest.approx(float(kl.sum() / r.response_mask_B_R.sum()), rel=1e-5)
    teacher_nll(LocalTeacher(teacher), r, vocab=None, acc=acc)
    with torch.no_grad():
        t = teacher.double()(r.ids_B_T).logits[:, r.prompt_len - 1:-1].log_softmax(-1)
    teacher.float()
    want = -t.gather(-1, r.response_ids_B_R.unsqueeze(-1)).squeeze(-1).mean()
    assert sum(acc.nll_sums) / sum(acc.nll_counts) == pytest.approx(float(want), rel=1e-5)


TEACHER = {"of": "teacher", "distinct_2": 0.6, "mostly_one_token": 0.0}


def _reading(losses, answers):
    now = degeneration(answers, [True] * len(answers))
    return GuardReading(sum(losses[:2]) / 2, sum(losses[-2:]) / 2, TEACHER, now)


def test_the_guard_fires_on_a_collapsing_run_and_stays_quiet_on_a_healthy_one():
    varied = [[i, i + 1, i + 2, i + 3, i + 5, i + 8] for i in range(0, 60, 6)]
    spaces = [[220] * 40 + [198] for _ in range(10)]  # a row of spaces per answer
    # collapse: the loss falls while the answers become a row of spaces
    warning = collapse_check(_reading([4.9, 4.8, 2.0, 0.6], spaces))
    assert warning is not None and "0.60" in warning and "100%" in warning
    # healthy: the loss falls and the answers stay varied
    assert collapse_check(_reading([4.9, 4.8, 2.0, 0.6], varied)) is None
    # degenerate answers, but the loss did not fall: nothing claims progress, no warning
    assert collapse_check(_reading([4.9, 4.8, 4.9, 4.7], spaces)) is None
    # repetitive without one token filling the answers: distinct-2 at a fifth of the teacher's
    loop = [[5, 6, 7] * 10 for _ in range(10)]
    assert collapse_check(_reading([3.0, 3.0, 1.0, 1.0], loop)) is not None
    # answers that stop at once: distinct-2 of what little is left says nothing, the length does
    teacher = {**TEACHER, "mean_length": 70.0}
    empty = degeneration([[9]] * 9 + [[3, 4]], [True] * 10)
    assert empty["distinct_2"] == 1.0
    fired = collapse_check(GuardReading(3.0, 1.0, teacher, empty))
    assert fired is not None and "mean length 1 against 70" in fired
    short_teacher = {**TEACHER, "mean_length": 8.0}  # answers of about the teacher's length
    assert collapse_check(GuardReading(3.0, 1.0, short_teacher,
                                       degeneration(varied, [True] * 10))) is None


def _distill(tmp_path, pair, *extra):
    s, t = pair
    run = tmp_path / "run"
    code = main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                 "data=chain:tiny", "batch_size=2", "max_steps=4", "eval_every=2", "eval_n=4",
                 "eval_kl_n=2", "diag_every=0", "save_every=0", *extra])
    return code, run


def test_collapse_stop_saves_the_state_and_stops(tmp_path, micro_pair, monkeypatch, capsys):
    monkeypatch.setattr(context, "collapse_check", lambda g: "collapse: synthetic")
    code, run = _distill(tmp_path, micro_pair, "collapse_stop=true")
    assert code == 3
    assert "collapse_stop: collapse: synthetic" in capsys.readouterr().err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("collapse")] == [2]
    assert (run / "checkpoints" / "step_0000002").is_dir()  # saved where it stopped
    assert not any(x.get("step", 0) > 2 for x in lines)


def test_without_collapse_stop_the_guard_warns_once_and_the_report_flags_it(
        tmp_path, micro_pair, monkeypatch, capsys):
    monkeypatch.setattr(context, "collapse_check", lambda g: "collapse: synthetic")
    code, run = _distill(tmp_path, micro_pair)
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("collapse: synthetic") == 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(x for x in lines if "eval_accuracy" in x)
    assert first["guard_reference"]["of"] == "teacher"  # the teacher's answers, measured
    assert 0 <= first["eval_distinct_2"] <= 1 and first["eval_rkl"] >= 0
    assert first["eval_distinct_2"] == pytest.approx(first["eval_distinct_2_within"]
                                                     * first["eval_distinct_2_across"])
    assert main(["report", str(run)]) == 0
    assert "Collapse flagged" in (run / "report.md").read_text()


def test_a_healthy_run_is_not_flagged(tmp_path, micro_pair, capsys):
    code, run = _distill(tmp_path, micro_pair)
    assert code == 0 and "collapse" not in capsys.readouterr().err
    result = json.loads((run / "result.json").read_text())
    assert result["collapse"] is None and result["eval_metric"] == "accuracy"
    assert result["final_eval_rkl"] >= 0 and result["final_eval_teacher_nll"] > 0


def test_hopd_eval_with_a_teacher_reports_the_held_out_kl(micro_pair, tmp_path, capsys):
    s, t = micro_pair
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(s), "--teacher", str(t), "--task", "chain:tiny",
                 "--n", "4", "--kl-n", "2", "--budget", "8", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["kl_n"] == 2 and res["rkl"] >= 0 and res["teacher_nll"] > 0
    assert res["rkl_exact"] is True and 0 <= res["distinct_2"] <= 1


def test_the_evaluated_split_does_not_change_training(tmp_path, micro_pair):
    """Settings are chosen on `val` evaluations and reported on `test` ones: the two runs train
    the same student step for step (evaluations draw from their own seeded streams), so a
    student chosen on val is the one a test-evaluated run of the same command trains."""
    from hopd.progress import read_metrics

    s, t = micro_pair
    runs = {}
    for split in ("test", "val"):
        run = tmp_path / split
        assert main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                     "data=chain:tiny", "max_steps=4", "batch_size=4", "eval_n=4",
                     "eval_every=2", "eval_kl_n=4", "diag_every=0", "threads=1",
                     f"eval_split={split}"]) == 0
        runs[split] = read_metrics(run / "metrics.jsonl")
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in runs.items()}
    kls = {k: [r["eval_rkl"] for r in v if "eval_rkl" in r] for k, v in runs.items()}
    assert len(losses["test"]) == 4 and losses["test"] == losses["val"]
    assert len(kls["test"]) == 3 and kls["test"] != kls["val"]  # other prompts were read


def test_an_evaluation_of_the_same_weights_and_settings_is_read_back(micro_pair, tmp_path,
                                                                    monkeypatch):
    """hopd.evalcache: the same weights, teacher, prompts and settings are evaluated once; a
    changed weight (student or teacher), setting or prompt evaluates afresh, and
    HOPD_EVAL_CACHE=off or cache=False never reads back."""
    from hopd import evalcache
    from hopd.evaluate import evaluate
    from hopd.models import load_model, load_tokenizer
    from hopd.tasks import PromptSource

    monkeypatch.setenv("HOPD_EVAL_CACHE", "on")
    monkeypatch.setenv("HOPD_CACHE_DIR", str(tmp_path / "cache"))
    s, t = micro_pair
    s, t = str(s), str(t)
    tok, student, teacher = load_tokenizer(s), load_model(s), load_model(t)
    source = PromptSource("chain:tiny")
    examples = source.eval_set(4, seed=0, part="val")
    calls = []
    real = evalcache.store
    monkeypatch.setattr(evalcache, "store", lambda k, r: calls.append(k) or real(k, r))

    def run(model=student, t_model=teacher, **kw):
        return evaluate(model, tok, examples, source.is_correct, 8, seed=0, kl_n=2,
                        teacher=LocalTeacher(t_model, len(tok)), vocab=len(tok), **kw)

    first = run()
    again = run()
    assert "cached" not in first and again["cached"] is True and len(calls) == 1
    for k in ("accuracy", "rkl", "teacher_nll", "distinct_2", "student_entropy"):
        assert again[k] == first[k]
    assert again["cached_eval_time_s"] == first["eval_time_s"]
    # a loaded copy of the same checkpoint has the same digest (a warm start's model folder)
    assert run(model=load_model(s))["cached"] is True
    assert "cached" not in run(cache=False) and len(calls) == 1
    with torch.no_grad():
        next(student.parameters()).view(-1)[0] += 1e-3
    assert "cached" not in run() and len(calls) == 2  # one weight changed
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)  # (keeps torch's
    for p in student.parameters():  # version counters as they were)
        p.grad = torch.ones_like(p)
    opt.step()
    assert "cached" not in run() and len(calls) == 3  # an optimizer step
    assert "cached" not in run(t_model=load_model(s)) and len(calls) == 4  # another teacher
    teacher.requires_grad_(False)  # a frozen teacher's digest is kept on it ...
    assert run()["cached"] is True and teacher._hopd_digest
    with torch.no_grad():
        next(teacher.parameters()).view(-1)[0] += 1e-3
    assert "cached" not in run() and len(calls) == 5  # ... until a weight is written
    assert "cached" not in evaluate(student, tok, examples, source.is_correct, 9, seed=0,
                                    kl_n=2, teacher=LocalTeacher(teacher, len(tok)),
                                    vocab=len(tok))  # another budget
    assert "cached" not in evaluate(student, tok, examples[:3], source.is_correct, 8, seed=0,
                                    kl_n=2, teacher=LocalTeacher(teacher, len(tok)),
                                    vocab=len(tok))  # other prompts
    monkeypatch.setenv("HOPD_EVAL_CACHE", "off")
    assert "cached" not in run() and evalcache.cache_dir() is None


def test_a_run_from_an_evaluated_model_reads_its_first_evaluation_back(micro_pair, tmp_path,
                                                                      monkeypatch):
    """A stage that starts from the model folder of a run evaluated with the same settings
    (the recipe's warm start) reads its step-0 evaluation and the teacher's guard answers
    back instead of decoding them again; eval_cache=false evaluates them."""
    from hopd import evalcache
    from hopd.progress import read_metrics

    monkeypatch.setenv("HOPD_EVAL_CACHE", "on")
    monkeypatch.setenv("HOPD_CACHE_DIR", str(tmp_path / "cache"))
    s, t = micro_pair
    common = [f"teacher={t}", "data=chain:tiny", "batch_size=4", "eval_n=4", "eval_kl_n=4",
              "diag_every=0", "threads=1", "eval_split=val", "loss.kind=rkl", "--quiet"]
    warm = tmp_path / "warm"
    assert main(["distill", "--out", str(warm), f"student={s}", "max_steps=2", "eval_every=2",
                 *common]) == 0
    runs, stored = {}, {}
    real = evalcache.store
    for cache in ("true", "false"):
        run, stored[cache] = tmp_path / f"stage_{cache}", []
        monkeypatch.setattr(evalcache, "store",
                            lambda k, r, into=stored[cache]: into.append(k) or real(k, r))
        assert main(["distill", "--out", str(run), f"student={warm / 'model'}", "max_steps=1",
                     "eval_every=1", f"eval_cache={cache}", *common]) == 0
        runs[cache] = read_metrics(run / "metrics.jsonl")
    warm_evals = [r for r in read_metrics(warm / "metrics.jsonl") if "eval_rkl" in r]
    for cache, rows in runs.items():
        first = [r for r in rows if "eval_rkl" in r][0]
        assert first["step"] == 0 and first.get("eval_cached", False) == (cache == "true")
        assert first["eval_rkl"] == warm_evals[-1]["eval_rkl"]  # the same weights, either way
        assert first["eval_distinct_2"] == warm_evals[-1]["eval_distinct_2"]
        assert first["guard_reference"] == warm_evals[0]["guard_reference"]
    # with the cache only the step-1 evaluation ran (the teacher's answers were read back too)
    assert len(stored["true"]) == 1 and stored["false"] == []
    assert [r.get("eval_cached") for r in runs["true"] if "eval_rkl" in r] == [True, None]


def test_hopd_eval_says_when_it_reads_an_evaluation_back(micro_pair, tmp_path, monkeypatch,
                                                         capsys):
    """hopd eval run twice on the same model and settings: the second reads the first back and
    says so on stderr; --no-cache evaluates again (and says nothing)."""
    monkeypatch.setenv("HOPD_EVAL_CACHE", "on")
    monkeypatch.setenv("HOPD_CACHE_DIR", str(tmp_path / "cache"))
    s, t = micro_pair
    args = ["eval", "--model", str(s), "--teacher", str(t), "--task", "chain:tiny", "--n", "3",
            "--kl-n", "2", "--budget", "8", "--quiet"]
    outs = []
    for extra in ([], [], ["--no-cache"]):
        assert main(args + extra) == 0
        cap = capsys.readouterr()
        outs.append((json.loads(cap.out), cap.err))
    assert "cached" not in outs[0][0] and "read back" not in outs[0][1]
    assert outs[1][0]["cached"] is True and "read back from" in outs[1][1]
    assert outs[1][0]["rkl"] == outs[0][0]["rkl"]
    assert "cached" not in outs[2][0] and "read back" not in outs[2][1]
