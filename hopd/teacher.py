"""Teacher scoring: one no-grad forward pass over prompt + response.

The logits at column P - 1 + r predict response token r, so the R response positions are read
from columns P - 1 .. T - 2 (`logits_to_keep = R + 1` skips the prompt's other logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from hopd.losses import entropy
from hopd.rollout import Rollout, left_pad, positions_from_mask


@dataclass
class TeacherScores:
    logp_B_R: torch.Tensor  # teacher log-prob of each sampled token (float32)
    logp_B_R_V: torch.Tensor | None = None  # full next-token log-distribution (need="full")
    topk_logp_B_R_K: torch.Tensor | None = None  # top-k log-probs (need="topk")
    topk_ids_B_R_K: torch.Tensor | None = None
    entropy_B_R: torch.Tensor | None = None  # teacher entropy per position (diagnostics)

    def as_loss_input(self) -> dict[str, torch.Tensor]:
        if self.topk_ids_B_R_K is not None:
            return {"topk_logp_B_R_K": self.topk_logp_B_R_K, "topk_ids_B_R_K": self.topk_ids_B_R_K}
        assert self.logp_B_R_V is not None
        return {"logp_B_R_V": self.logp_B_R_V}

    def to(self, device: torch.device | str) -> TeacherScores:
        move = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()}
        return TeacherScores(**move)


def response_logits(model: PreTrainedModel, ids_B_T: torch.Tensor, attn_B_T: torch.Tensor,
                    prompt_len: int, vocab: int | None = None) -> torch.Tensor:
    """(B, R, V) logits predicting each response token; V cut to `vocab` when given."""
    R = ids_B_T.size(1) - prompt_len
    out = model(input_ids=ids_B_T, attention_mask=attn_B_T,
                position_ids=positions_from_mask(attn_B_T), logits_to_keep=R + 1)
    logits = out.logits[:, :-1, :]
    return logits[..., :vocab] if vocab is not None else logits


@torch.no_grad()
def score(teacher: PreTrainedModel, rollout: Rollout, need: str = "sampled", top_k: int = 0,
          with_entropy: bool = False, vocab: int | None = None,
          prompts: list[list[int]] | None = None) -> TeacherScores:
    """Teacher log-probs of the rollout's tokens; `need` in {sampled, full, topk}.

    `prompts`, when given, are the teacher's own prompt ids (its system prompt or chat
    template); the same response tokens follow them, so positions stay aligned. Runs on the
    teacher's own device and dtype; results come back as float32 on the rollout's device.
    """
    device = next(teacher.parameters()).device
    ids, attn, P = rollout.ids_B_T, rollout.attn_B_T, rollout.prompt_len
    if prompts is not None:
        t_ids, t_attn = left_pad(prompts, pad_id=0)  # padding is masked; any id will do
        resp = rollout.response_ids_B_R
        ids = torch.cat([t_ids, resp], dim=1)
        attn = torch.cat([t_attn, rollout.response_mask_B_R], dim=1)
        P = t_ids.size(1)
    logits = response_logits(teacher, ids.to(device), attn.to(device), P, vocab).float()
    logp_B_R_V = logits.log_softmax(-1)
    ids = rollout.response_ids_B_R.to(device)
    scores = TeacherScores(logp_B_R=logp_B_R_V.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
    if need == "full":
        scores.logp_B_R_V = logp_B_R_V
    elif need == "topk":
        vals, idx = torch.topk(logp_B_R_V, top_k, dim=-1)
        scores.topk_logp_B_R_K, scores.topk_ids_B_R_K = vals, idx
    elif need != "sampled":
        raise ValueError(f"need={need!r}: choose sampled, full or topk")
    if with_entropy:
        scores.entropy_B_R = entropy(logp_B_R_V)
    return scores.to(rollout.ids_B_T.device)
