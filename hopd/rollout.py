"""Student sampling up to a horizon of H new tokens, batched, with a KV cache.

Sampling is H sequential decode steps, the dominant cost of an OPD step, so this loop does the
least per step: one model call on a (B, 1) slice with the cache, inverse-CDF sampling on the last
logits with uniforms drawn up front, and an early exit once every sequence has emitted EOS. A row
that is done keeps decoding until the batch stops (its extra tokens are masked afterwards), so a
step never depends on the data and can be replayed as a CUDA graph.

Layout: prompts are left-padded to a common length P, so every response starts at column P and
`ids_B_T[:, P:]` are the (right-padded) responses: T = P + (number of decode steps taken) <= P + H.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from hopd.fastgen import StaticDecoder, supports
from hopd.models import base_model, cache_kw, forward_inputs, positions_from_mask


@dataclass
class Rollout:
    ids_B_T: torch.Tensor  # prompt (left-padded) + response tokens (right-padded with pad)
    attn_B_T: torch.Tensor  # 1 on real prompt tokens and response tokens up to and incl. EOS
    response_mask_B_R: torch.Tensor  # (B, R) 1 on sampled tokens, incl. EOS; R = T - P
    sampler_logp_B_R: torch.Tensor  # log-prob of each sampled token under the sampling dist.
    prompt_len: int  # P: column where responses start
    cut_B: torch.Tensor  # bool: no EOS within the horizon (cut by H)
    horizon: int  # H this rollout was sampled with

    @property
    def response_ids_B_R(self) -> torch.Tensor:
        return self.ids_B_T[:, self.prompt_len:]

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask_B_R.sum())


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads token lists to (B, P) ids and a (B, P) attention mask."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits_B_V: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Masks (to -inf) tokens outside the top-k and outside the top-p nucleus."""
    if top_k > 0 and top_k < logits_B_V.size(-1):
        kth = torch.topk(logits_B_V, top_k, dim=-1).values[:, -1:]
        logits_B_V = logits_B_V.masked_fill(logits_B_V < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_B_V, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_B_V = logits_B_V.masked_fill(drop, float("-inf"))
    return logits_B_V


def row_seeds(seed: int, step: int, rows: range | list[int], stream: str = "train"
              ) -> list[int]:
    """One random stream per global row of a step (training rollouts, or the diagnostics'),
    so a row's tokens do not depend on how a batch is split across processes."""
    return [(seed * SEED_STREAMS[stream] + step) * 4099 + i for i in rows]


SEED_STREAMS = {"train": 1_000_003, "diag": 7919}


class Sampler(Protocol):
    """What the loop needs from a rollout engine: rollouts of <= H tokens, and a hook to call
    after each optimizer step (an engine that holds its own copy of the weights reloads them)."""

    def sample(self, prompts: list[list[int]], horizon: int,
               row_seeds: list[int] | None = None) -> Rollout: ...

    def sync(self) -> None: ...


class HFSampler:
    """Rollouts from a transformers model in this process (the static-cache fast path of
    `hopd.fastgen`, or the model's own forward), with the run's sampling settings. Samples in
    eval mode and hands the model back in the mode it came in.

    With `dtype` (a torch dtype other than the model's), it samples from a copy of the model in
    that dtype instead, which `sync()` refreshes from the model's weights after each optimizer
    step: on a CPU with bf16 instructions (AVX512-BF16, AMX) a bf16 copy decodes about twice
    as fast as fp32 (half the weight bytes per token). The rollout's log-probs are then the
    copy's, so the loss's importance ratio rho = s(y) / q(y) measures the rounding."""

    def __init__(self, model: PreTrainedModel, eos_id: int, pad_id: int, *,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, cuda_graph: bool = True,
                 dtype: torch.dtype | None = None):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.opts = {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                     "greedy": greedy, "cuda_graph": cuda_graph}
        self.copy = None  # a frozen model (the SFT baseline's teacher) is copied once, never synced
        self.twin_of: HFSampler | None = None  # the sampler this one is the greedy twin of
        self.trains = any(p.requires_grad for p in model.parameters())
        if dtype is not None and dtype != next(model.parameters()).dtype:
            self.copy = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
            for mine, theirs in zip(self.copy.buffers(), model.buffers(), strict=True):
                mine.data = theirs.data.clone()  # rotary tables etc. keep their own dtype

    def sample(self, prompts: list[list[int]], horizon: int,
               row_seeds: list[int] | None = None,
               greedy_rows: list[bool] | None = None) -> Rollout:
        if self.copy is not None:  # its log-probs differ from the learner's in any case
            return sample(self.copy, prompts, horizon, eos_id=self.eos_id, pad_id=self.pad_id,
                          row_seeds=row_seeds, greedy_rows=greedy_rows, match_hf=False,
                          **self.opts)
        was = self.model.training
        self.model.eval()
        try:
            return sample(self.model, prompts, horizon, eos_id=self.eos_id, pad_id=self.pad_id,
                          row_seeds=row_seeds, greedy_rows=greedy_rows, **self.opts)
        finally:
            self.model.train(was)

    def greedy_twin(self) -> HFSampler:
        """A sampler of the same model that decodes greedily, sharing this one's copy (which
        this one's `sync` keeps current) instead of making a second."""
        twin = copy.copy(self)
        twin.opts = {**self.opts, "greedy": True}
        twin.twin_of = self
        return twin

    def sample_with_greedy(self, prompts: list[list[int]], horizon: int,
                           row_seeds: list[int] | None = None) -> tuple[Rollout, Rollout]:
        """`sample(prompts)` and the greedy twin's answers to the same prompts, decoded as one
        batch of 2B rows: on a CPU a decode step of 16 rows costs far less than two of 8 (the
        weights are read once). Each half is laid out as if sampled alone (`take_rows`); its
        tokens equal a separate call's up to float rounding at the other batch size."""
        if self.opts["greedy"]:
            raise ValueError("sample_with_greedy: this sampler is greedy already")
        B = len(prompts)
        both = self.sample(prompts + prompts, horizon,
                           row_seeds=None if row_seeds is None else row_seeds + row_seeds,
                           greedy_rows=[False] * B + [True] * B)
        return take_rows(both, list(range(B))), take_rows(both, list(range(B, 2 * B)))

    @torch.no_grad()
    def sync(self) -> None:
        """The copy takes the model's current weights (cast); without a copy, nothing to do."""
        if self.copy is None or not self.trains:
            return
        for mine, theirs in zip(self.copy.parameters(), self.model.parameters(), strict=True):
            mine.copy_(theirs)


def take_rows(r: Rollout, rows: list[int]) -> Rollout:
    """The rollout of `rows` alone, as `sample` would lay it out for those prompts: the columns
    of left padding that none of them needs, and the decode columns after all of them were
    done, are dropped."""
    idx = torch.tensor(rows, dtype=torch.long, device=r.ids_B_T.device)
    ids, attn = r.ids_B_T[idx], r.attn_B_T[idx]
    used = attn[:, :r.prompt_len].any(0).nonzero()
    first = int(used[0]) if len(used) else r.prompt_len
    mask = r.response_mask_B_R[idx]
    R = int(mask.sum(-1).max()) if len(rows) else 0
    end = r.prompt_len + R
    return Rollout(ids_B_T=ids[:, first:end], attn_B_T=attn[:, first:end],
                   response_mask_B_R=mask[:, :R], sampler_logp_B_R=r.sampler_logp_B_R[idx, :R],
                   prompt_len=r.prompt_len - first, cut_B=r.cut_B[idx], horizon=r.horizon)


class SampleAhead:
    """A frozen model's sampler (the teacher's, for the SFT warm start and supervised KD) that
    draws several steps' rollouts in one batch. The loop announces the coming steps' rows with
    `plan`; the first `sample` call among them decodes every planned row of its horizon at
    once, and the next calls are served from that batch. The answers do not depend on the
    step, since the model does not change, and with `row_seeds` each row's tokens do not depend
    on the batch it shares (up to float rounding); but a decode step of 64 rows costs far less
    than 8 steps of 8 on a CPU, whose matrix products are slow at a few rows. A call that
    was not planned samples on its own."""

    def __init__(self, inner: Sampler):
        self.inner = inner
        self.planned: dict[tuple, tuple[list[list[int]], int, list[int]]] = {}  # by _key
        self.ready: dict[tuple, Rollout] = {}

    @staticmethod
    def _key(prompts: list[list[int]], horizon: int, row_seeds: list[int] | None) -> tuple:
        return (horizon, tuple(map(tuple, prompts)), tuple(row_seeds or ()))

    def plan(self, steps: list[tuple[list[list[int]], int, list[int]]]) -> None:
        """The coming steps' (prompts, horizon, row_seeds), replacing any earlier plan."""
        self.planned, self.ready = {self._key(*step): step for step in steps}, {}

    def expects(self, prompts: list[list[int]], horizon: int, row_seeds: list[int]) -> bool:
        """Whether this step is in the plan, still to be served (else: time to plan again)."""
        key = self._key(prompts, horizon, row_seeds)
        return key in self.ready or key in self.planned

    def sample(self, prompts: list[list[int]], horizon: int,
               row_seeds: list[int] | None = None) -> Rollout:
        key = self._key(prompts, horizon, row_seeds)
        if row_seeds and key in self.planned:
            self._draw(horizon)
        if key in self.ready:
            return self.ready.pop(key)
        return self.inner.sample(prompts, horizon, row_seeds=row_seeds)

    def _draw(self, horizon: int) -> None:
        """Samples every planned step of this horizon in one batch."""
        keys = [k for k in self.planned if k[0] == horizon]
        steps = [self.planned.pop(k) for k in keys]
        big = self.inner.sample([p for s in steps for p in s[0]], horizon,
                                row_seeds=[x for s in steps for x in s[2]])
        lo = 0
        for key, (prompts, _, _) in zip(keys, steps):
            self.ready[key] = take_rows(big, list(range(lo, lo + len(prompts))))
            lo += len(prompts)

    def sync(self) -> None:
        self.inner.sync()


def _uniforms(B: int, horizon: int, greedy: bool, row_seeds: list[int] | None,
              generator: torch.Generator | None, device: torch.device) -> torch.Tensor | None:
    """The (B, H) uniforms of inverse-CDF sampling, drawn up front (None when greedy)."""
    if greedy:
        return None
    if row_seeds is None:
        return torch.rand((B, horizon), generator=generator, device=device)
    if len(row_seeds) != B:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {B} prompts")
    return torch.stack([torch.rand(horizon, generator=torch.Generator().manual_seed(s))
                        for s in row_seeds]).to(device)


def _as_rollout(prompt_B_P: torch.Tensor, prompt_attn_B_P: torch.Tensor, ids_B_H: torch.Tensor,
                logp_B_H: torch.Tensor, n_steps: int, eos_id: int, pad_id: int, horizon: int
                ) -> Rollout:
    """The decoded tokens as a Rollout: a row's response runs up to and including its first EOS,
    and columns decoded after every row was done are dropped."""
    eos_B_H = ids_B_H[:, :n_steps] == eos_id
    resp_mask = ((eos_B_H.cumsum(-1) - eos_B_H.long()) == 0).long()
    n_steps = int(resp_mask.sum(-1).max())
    resp_mask = resp_mask[:, :n_steps]
    out_ids = torch.where(resp_mask.bool(), ids_B_H[:, :n_steps], pad_id)
    out_logp = torch.where(resp_mask.bool(), logp_B_H[:, :n_steps], 0.0)
    return Rollout(
        ids_B_T=torch.cat([prompt_B_P, out_ids], dim=1),
        attn_B_T=torch.cat([prompt_attn_B_P, resp_mask], dim=1),
        response_mask_B_R=resp_mask,
        sampler_logp_B_R=out_logp,
        prompt_len=prompt_B_P.size(1),
        cut_B=~eos_B_H[:, :n_steps].any(-1),
        horizon=horizon,
    )


def pick_token(logits_B_V: torch.Tensor, u_B_1: torch.Tensor | None, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, greedy_B: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and the log-probs it was drawn from: the argmax of softmax(logits)
    when `u_B_1` is None, else the first token whose cumulative probability under
    softmax(filter(logits / temperature)) exceeds u (inverse-CDF sampling). `greedy_B` (bool,
    with `u_B_1`) marks the rows that take the argmax instead."""
    if u_B_1 is None:
        logp_B_V = logits_B_V.log_softmax(-1)
        return logp_B_V.argmax(-1), logp_B_V
    scaled = logits_B_V / temperature if temperature != 1.0 else logits_B_V
    logp_B_V = filter_logits(scaled, top_k, top_p).log_softmax(-1)
    cdf = logp_B_V.exp().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.minimum(u_B_1 * total, total.nextafter(torch.zeros_like(total)))
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # u < total: lands
    if greedy_B is None:
        return tok, logp_B_V
    plain_B_V = logits_B_V.log_softmax(-1)
    return (torch.where(greedy_B, plain_B_V.argmax(-1), tok),
            torch.where(greedy_B[:, None], plain_B_V, logp_B_V))


def _prefill(model: PreTrainedModel, prompt_B_P: torch.Tensor, prompt_attn_B_P: torch.Tensor,
             length: int, fast: bool, static: bool, match_hf: bool = True
             ) -> tuple[torch.Tensor, DynamicCache | None, StaticDecoder | None, torch.Tensor]:
    """One forward over the prompts: the first logits, the cache the decode steps extend (the
    static buffers of the fast path when `fast` and the model supports it) and the attention
    mask of its columns (the prompts' own, or with a shared prefix first: `forward_inputs`)."""
    kw = forward_inputs(model, prompt_B_P, prompt_attn_B_P, prompt_B_P.size(1), cache=True)
    cache, attn_B_P = kw[cache_kw(model)], kw["attention_mask"]
    logits_B_V = model(**kw, logits_to_keep=1).logits[:, -1].float()
    if not (fast and supports(model, length)):
        return logits_B_V, cache, None, attn_B_P
    decoder = StaticDecoder(model, prompt_B_P.size(0), length, static=static,
                            match_hf=match_hf)
    decoder.load_prefill(cache, attn_B_P)
    return logits_B_V, None, decoder, attn_B_P  # the static buffers hold the prompt's K/V now


def _decode(pick: Callable[[], torch.Tensor], advance: Callable[[torch.Tensor], None],
            horizon: int, done: torch.Tensor, graph: bool, check_every: int) -> int:
    """Runs pick / advance until H tokens or every row is done; returns the steps taken. With
    `graph`, the first step runs eagerly (the warm-up) and the next is recorded as a CUDA graph
    that every later step replays."""
    recorded = None
    n_steps = 0
    for t in range(horizon):
        if recorded is not None:
            recorded.replay()  # pick + advance; the last advance is wasted (in bounds)
        else:
            tok = pick()
        n_steps = t + 1
        if n_steps == horizon or (n_steps % check_every == 0 and bool(done.all())):
            break
        if recorded is None:
            advance(tok)
            if graph:
                recorded = torch.cuda.CUDAGraph()
                with torch.cuda.graph(recorded):
                    advance(pick())  # recorded, not run
    return n_steps


@torch.no_grad()  # not inference_mode: the rollout's tensors feed the learner's autograd graph
def sample(
    model: PreTrainedModel,
    prompts: list[list[int]],
    horizon: int,
    *,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    fast: bool = True,
    row_seeds: list[int] | None = None,
    greedy_rows: list[bool] | None = None,
    cuda_graph: bool = True,
    match_hf: bool = True,
) -> Rollout:
    """Samples at most `horizon` tokens after each prompt; each row stops at its EOS.

    `sampler_logp_B_R` is the log-probability of each chosen token under the distribution it was
    drawn from: softmax(filter(logits / temperature)); with `greedy`, under softmax(logits).
    The prompt runs through the model's forward once (prefill); decode steps use the static-cache
    fast path of `hopd.fastgen` when `fast` and the model supports it, else the model's forward;
    on a GPU that step is recorded once as a CUDA graph and replayed (`cuda_graph=False`: not).
    In 16-bit that step rounds where HF's forward does, so that its log-probs equal the model's
    own; `match_hf=False` lets it round where it is fastest (a copy that samples for a learner
    in another dtype, which the copy's log-probs cannot equal anyway).

    Row b at step t picks the first token whose cumulative probability exceeds u_(b,t)
    (inverse-CDF sampling), with the (B, H) uniforms drawn up front from `generator`. With
    `row_seeds`, row b draws its uniforms from its own stream seeded by row_seeds[b]: its tokens
    then do not depend on which other rows share the batch, so splitting a batch across
    processes or micro-batches gives the same rollouts.

    `greedy_rows` (one flag per prompt) makes the flagged rows decode greedily and the others
    sample, in one batch (their row seeds are not used).
    """
    if horizon < 1:
        raise ValueError(f"horizon={horizon}: must be >= 1")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (or use greedy)")
    model = base_model(model)  # a PEFT model's adapters live inside the base model's layers
    device = next(model.parameters()).device
    prompt_B_P, prompt_attn_B_P = left_pad(prompts, pad_id, device)
    B, P = prompt_B_P.shape
    ids_B_H = torch.full((B, horizon), pad_id, dtype=torch.long, device=device)
    logp_B_H = torch.zeros((B, horizon), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    u_B_H = _uniforms(B, horizon, greedy, row_seeds, generator, device)
    greedy_B = None
    if greedy_rows is not None and not greedy:
        if len(greedy_rows) != B:
            raise ValueError(f"greedy_rows has {len(greedy_rows)} flags for {B} prompts")
        greedy_B = torch.tensor(greedy_rows, dtype=torch.bool, device=device)

    graph = cuda_graph and device.type == "cuda"
    logits_B_V, cache, decoder, cache_attn = _prefill(model, prompt_B_P, prompt_attn_B_P,
                                                      P + horizon, fast=fast, static=graph,
                                                      match_hf=match_hf)
    graph = graph and decoder is not None
    positions = positions_from_mask(prompt_attn_B_P)[:, -1].clone()  # each row's last token
    attn = [cache_attn]
    column = torch.zeros(1, dtype=torch.long, device=device)  # the response column t

    # pick() and advance() touch device-side state only, so a CUDA graph can replay them
    def pick() -> torch.Tensor:
        """Picks and records token t (at `column`) from the current logits."""
        u_B_1 = None if greedy else u_B_H.index_select(1, column)
        tok, logp_B_V = pick_token(logits_B_V, u_B_1, temperature, top_k, top_p, greedy_B)
        ids_B_H.index_copy_(1, column, tok[:, None])
        logp_B_H.index_copy_(1, column, logp_B_V.gather(-1, tok[:, None]))
        done.logical_or_(tok == eos_id)
        column.add_(1)
        return tok

    def advance(tok: torch.Tensor) -> None:
        """Decodes token t into the logits of token t + 1."""
        # rows that are done keep decoding (their tokens are masked below): rows never
        # attend to each other, and the step keeps one shape
        positions.add_(1)
        if decoder is not None:
            logits_B_V.copy_(decoder.step(tok, positions))
        else:
            attn.append(torch.ones_like(attn[0][:, :1]))
            logits_B_V.copy_(model(input_ids=tok[:, None], attention_mask=torch.cat(attn, 1),
                                   position_ids=positions[:, None], use_cache=True,
                                   **{cache_kw(model): cache}).logits[:, -1])

    # asking whether every row is done waits for the device: on a GPU only every few steps
    n_steps = _decode(pick, advance, horizon, done, graph=graph,
                      check_every=8 if device.type == "cuda" else 1)
    return _as_rollout(prompt_B_P, prompt_attn_B_P, ids_B_H, logp_B_H, n_steps, eos_id, pad_id,
                       horizon)
