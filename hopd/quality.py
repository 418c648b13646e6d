"""What an evaluation measures where no answer checker fits, and the collapse guard that reads it.

A falling OPD loss is not progress by itself: a student can find a degenerate sequence the
teacher finds likely (a row of spaces) and drive the sampled reverse KL down while its answers
die. So every evaluation also measures:

- held-out reverse KL at the full budget L: the student samples held-out prompts (T = 1), and
  at every sampled position KL(s || t) = sum_v s(v) (log s(v) - log t(v)) over the vocabulary
  (exact; with a server teacher, which returns top-k at most, the sampled estimate
  log s(y) - log t(y)). Reported as a mean per token with its standard error over prompts;
- the teacher's NLL per token of the student's greedy answers, -mean_t log t(y_t);
- degeneration of the greedy answers: distinct-2 (distinct token bigrams / bigrams, over all
  answers; with its jackknife standard error over answers), the share of answers that loop
  (under half of their own bigrams distinct, among at least 16: pooled distinct-2 also falls
  as answers are added, since bigrams repeat across answers, while this share does not), the
  share of each answer that its longest run of one repeated token fills (mean and max over
  answers, and how many answers it fills past half), EOS rate, mean length, and the student's
  mean entropy at its own greedy positions.

The guard (`collapse_check`) fires when the loss has fallen while the greedy answers have
collapsed: distinct-2 at most half of the reference's, at least half of the answers mostly one
repeated token, or answers under a quarter of the reference's mean length (a student that stops
at once). The reference is the teacher's own greedy answers to the same prompts (with a
teacher server, the student's first evaluation): a pruned student starts out degenerate, so its
own start is no yardstick.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from hopd.losses import divergence, entropy
from hopd.models import response_logits
from hopd.rollout import Rollout, row_seeds, sample
from hopd.teacher import Teacher

MOSTLY_ONE_TOKEN = 0.5  # an answer whose longest run of one token fills more than this share
LOOPING = 0.5  # an answer loops when under this share of its own bigrams are distinct,
LOOP_MIN_BIGRAMS = 16  # among at least this many (a short answer is too short to judge)


def answers_of(ids_B_R: torch.Tensor, mask_B_R: torch.Tensor, eos_id: int
               ) -> tuple[list[list[int]], list[bool]]:
    """Each row's answer tokens (EOS and padding removed), and whether it ended with EOS."""
    out, ended = [], []
    for ids, m in zip(ids_B_R.tolist(), mask_B_R.tolist()):
        toks = [t for t, keep in zip(ids, m) if keep]
        ended.append(bool(toks) and toks[-1] == eos_id)
        out.append([t for t in toks if t != eos_id])
    return out, ended


def ngrams(answer: list[int], n: int) -> list[tuple[int, ...]]:
    """An answer's n-grams in order (none when it is shorter than n)."""
    return [tuple(answer[i:i + n]) for i in range(len(answer) - n + 1)]


def distinct_n(answers: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of all answers (Li et al. 2016); NaN with none."""
    grams = [g for a in answers for g in ngrams(a, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def distinct_parts(answers: list[list[int]], n: int = 2) -> tuple[float, float]:
    """`distinct_n` as the product of two shares (NaN with no n-grams): `within`, the n-grams
    that are distinct inside their own answer, summed over answers, over all n-grams (what
    loops lower; it does not change as answers are added), and `across`, the distinct n-grams
    of all answers over that sum (1 when no n-gram occurs in two answers; lowered by phrases
    that many answers share, and falling as answers are added)."""
    per = [ngrams(a, n) for a in answers]
    grams = sum(map(len, per))
    if not grams:
        return math.nan, math.nan
    own = sum(len(set(g)) for g in per)
    return own / grams, len({x for g in per for x in g}) / own


def distinct_n_se(answers: list[list[int]], n: int = 2) -> float:
    """The jackknife standard error of `distinct_n` over answers (leave one answer out; NaN with
    fewer than two answers holding n-grams). A bootstrap would draw some answers twice, and a
    duplicated answer repeats all its n-grams: it would bias distinct-n down. Each leave-one-out
    value comes from global n-gram counts, so the cost is one pass over the n-grams."""
    per = [Counter(ngrams(a, n)) for a in answers]
    per = [c for c in per if c]
    total: Counter = Counter()
    for c in per:
        total.update(c)
    k, grams, kinds = len(per), sum(total.values()), len(total)
    if k < 2:
        return math.nan
    loo = []
    for c in per:  # answer i's n-gram kinds found nowhere else leave with it
        gone = sum(1 for g, m in c.items() if total[g] == m)
        loo.append((kinds - gone) / (grams - sum(c.values())))
    mean = sum(loo) / k
    return math.sqrt((k - 1) / k * sum((v - mean) ** 2 for v in loo))


def longest_run_share(answer: list[int]) -> float:
    """The share of an answer that its longest run of one repeated token fills (0 if empty)."""
    if not answer:
        return 0.0
    best = run = 1
    for a, b in zip(answer, answer[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best / len(answer)


def loops(answer: list[int]) -> bool:
    """Whether an answer repeats itself: under LOOPING of its bigrams distinct, among at least
    LOOP_MIN_BIGRAMS."""
    return len(answer) - 1 >= LOOP_MIN_BIGRAMS and distinct_n([answer], 2) < LOOPING


def degeneration(answers: list[list[int]], ended: list[bool]) -> dict[str, float]:
    """distinct-2 (with its jackknife standard error and its two factors, `distinct_parts`),
    the looping share, the longest-run shares, EOS rate and mean length of greedy answers."""
    shares = [longest_run_share(a) for a in answers]
    n = max(len(answers), 1)
    within, across = distinct_parts(answers, 2)
    return {"distinct_2": distinct_n(answers, 2), "distinct_2_se": distinct_n_se(answers, 2),
            "distinct_2_within": within, "distinct_2_across": across,
            "looping": sum(loops(a) for a in answers) / n,
            "max_run_share": sum(shares) / n,
            "max_run_share_max": max(shares, default=0.0),
            "mostly_one_token": sum(s > MOSTLY_ONE_TOKEN for s in shares) / n,
            "eos_rate": sum(ended) / n,
            "mean_length": sum(len(a) for a in answers) / n}


def ratio_se(sums: list[float], counts: list[float]) -> tuple[float, float]:
    """Mean per token sum(s_i) / sum(n_i) and its standard error, prompts as clusters (the
    linearised ratio estimator: tokens of one answer are not independent)."""
    total, n = sum(sums), sum(counts)
    if n == 0:
        return math.nan, math.nan
    mean = total / n
    k = len(sums)
    if k < 2:
        return mean, math.nan
    var = sum((s - mean * c) ** 2 for s, c in zip(sums, counts)) * k / (k - 1)
    return mean, math.sqrt(var) / n


@dataclass
class QualityAccumulator:
    """Per-prompt sums gathered batch by batch, turned into the metrics by `result`."""

    rkl_sums: list[float]
    rkl_counts: list[float]
    nll_sums: list[float]
    nll_counts: list[float]
    ent_sum: float = 0.0
    ent_count: float = 0.0
    rkl_exact: bool = True

    @classmethod
    def empty(cls) -> QualityAccumulator:
        return cls([], [], [], [])

    def result(self, with_teacher: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "student_entropy": self.ent_sum / self.ent_count if self.ent_count else math.nan}
        if with_teacher:
            out["rkl"], out["rkl_se"] = ratio_se(self.rkl_sums, self.rkl_counts)
            out["teacher_nll"], out["teacher_nll_se"] = ratio_se(self.nll_sums, self.nll_counts)
            out["rkl_exact"] = self.rkl_exact
            out["kl_n"] = len(self.rkl_sums)
        return out


CHUNK_ELEMENTS = 2**25  # rows scored at once hold at most this many (R x V) logits (128 MiB)


def take_rows(r: Rollout, n: int, start: int = 0) -> Rollout:
    """Rows start .. start + n of the rollout."""
    rows = slice(start, start + n)
    return Rollout(r.ids_B_T[rows], r.attn_B_T[rows], r.response_mask_B_R[rows],
                   r.sampler_logp_B_R[rows], r.prompt_len, r.cut_B[rows], r.horizon)


def row_chunks(r: Rollout, vocab: int | None, first: int = 0,
               n: int | None = None) -> list[tuple[Rollout, int]]:
    """Rows first .. first + n of `r` in slices whose (rows, R, V) logits stay under
    CHUNK_ELEMENTS, each with its first row's index in `r`: a full-vocabulary score of a long
    rollout never holds the whole batch's logits at once."""
    n = r.ids_B_T.size(0) - first if n is None else n
    per = max(1, CHUNK_ELEMENTS // max(1, r.response_mask_B_R.size(1) * (vocab or 50_000)))
    return [(take_rows(r, min(per, first + n - lo), lo), lo)
            for lo in range(first, first + n, per)]


@torch.no_grad()
def student_entropy(student: PreTrainedModel, greedy: Rollout, *, vocab: int | None,
                    acc: QualityAccumulator) -> None:
    """The student's mean entropy at the positions of its own greedy answers."""
    for r, _ in row_chunks(greedy, vocab):
        mask = r.response_mask_B_R.float()
        logits = response_logits(student, r.ids_B_T, r.attn_B_T, r.prompt_len, vocab)
        ent = entropy(logits.float().log_softmax(-1)) * mask
        acc.ent_sum += float(ent.sum())
        acc.ent_count += float(mask.sum())


@torch.no_grad()
def teacher_nll(teacher: Teacher, greedy: Rollout, *, vocab: int | None,
                acc: QualityAccumulator, teacher_prompts: list[list[int]] | None = None) -> None:
    """The teacher's NLL of the student's greedy answers, per prompt (EOS included: stopping
    is part of the answer)."""
    for r, lo in row_chunks(greedy, vocab):
        mask = r.response_mask_B_R.float()
        t_prompts = teacher_prompts[lo:lo + mask.size(0)] if teacher_prompts else None
        t = teacher.score(r, "sampled", prompts=t_prompts)
        nll = -(t.logp_B_R.to(mask.device) * mask)
        acc.nll_sums += nll.sum(1).tolist()
        acc.nll_counts += mask.sum(1).tolist()


@torch.no_grad()
def sampled_rkl(student: PreTrainedModel, teacher: Teacher, prompts: list[list[int]], *,
                budget: int, vocab: int | None, eos: int, pad: int, seed: int,
                acc: QualityAccumulator, teacher_prompts: list[list[int]] | None = None,
                first_row: int = 0) -> None:
    """Reverse KL(s || t) at the student's own T = 1 samples of `prompts` at the full budget,
    per prompt (exact over the vocabulary when the teacher gives whole distributions)."""
    r = sample(student, prompts, budget, eos_id=eos, pad_id=pad, temperature=1.0,
               row_seeds=row_seeds(seed, 0, range(first_row, first_row + len(prompts)),
                                   stream="diag"))
    for c, lo in row_chunks(r, vocab):
        mask = c.response_mask_B_R.float()
        t_prompts = teacher_prompts[lo:lo + mask.size(0)] if teacher_prompts else None
        if teacher.full_distributions:
            t = teacher.score(c, "full", prompts=t_prompts)
            s_logp = response_logits(student, c.ids_B_T, c.attn_B_T, c.prompt_len,
                                     vocab).float().log_softmax(-1)
            kl = divergence(s_logp, t.logp_B_R_V.to(s_logp.device), "rkl") * mask
        else:
            t = teacher.score(c, "sampled", prompts=t_prompts)
            kl = (c.sampler_logp_B_R - t.logp_B_R.to(mask.device)) * mask
            acc.rkl_exact = False
        acc.rkl_sums += kl.sum(1).tolist()
        acc.rkl_counts += mask.sum(1).tolist()


@dataclass
class GuardReading:
    """What the collapse guard compares: the loss's fall and the answers' degeneration."""

    first_loss: float  # mean loss of the run's first steps
    recent_loss: float  # mean loss of the latest steps
    base: dict[str, float]  # the reference's degeneration metrics (the teacher's answers)
    now: dict[str, float]  # this evaluation's


def degenerated(base: dict[str, float], now: dict[str, float]) -> str | None:
    """How greedy answers degenerated against a reference's (the teacher's), else None:
    distinct-2 at most half the reference's, half the answers mostly one repeated token (when
    the reference's are not: a teacher may repeat too), or answers under a quarter of the
    reference's length (the student stops at once)."""
    d0, d1 = base.get("distinct_2", math.nan), now.get("distinct_2", math.nan)
    halved = math.isfinite(d0) and math.isfinite(d1) and d1 <= 0.5 * d0
    mostly = now.get("mostly_one_token", 0.0)
    repeats = mostly >= 0.5 and base.get("mostly_one_token", 0.0) < 0.5
    n0, n1 = base.get("mean_length", math.nan), now.get("mean_length", math.nan)
    emptied = math.isfinite(n0) and math.isfinite(n1) and n1 < 0.25 * n0
    if not (halved or repeats or emptied):
        return None
    return (f"distinct-2 {d1:.2f} against the {base.get('of', 'reference')}'s {d0:.2f}; mean "
            f"length {n1:.0f} against {n0:.0f} tokens; {mostly:.0%} of answers mostly one "
            "repeated token")


def collapse_check(g: GuardReading) -> str | None:
    """A one-line warning when the loss fell while the greedy answers collapsed, else None."""
    fell = math.isfinite(g.first_loss) and math.isfinite(g.recent_loss) and \
        g.first_loss - g.recent_loss > 0.1 * abs(g.first_loss)  # (a sampled KL can be < 0)
    how = degenerated(g.base, g.now) if fell else None
    if how is None:
        return None
    return (f"collapse: the loss fell {g.first_loss:.3g} -> {g.recent_loss:.3g} while the greedy "
            f"answers degenerated ({how}). Look at the answers; warm-start the student first "
            f"(loss.kind=sft or fkl) or lower optim.lr; collapse_stop=true stops here")
