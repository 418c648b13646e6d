"""vLLM against hopd's own sampler and learner, in a process of its own (tests/test_vllm.py runs
it once and checks what it prints): vLLM's in-process engine pins its threads and takes over
torch.set_num_threads, which must not leak into the rest of the suite.

Usage: python tests/vllm_checks.py OUT.json
"""

from __future__ import annotations

import json
import sys


def max_diff(a, b, mask) -> float:
    return float(((a - b).abs() * mask).max())


def main(out: str) -> None:
    import torch

    from hopd.distill_config import SamplingConfig
    from hopd.losses import token_logprobs
    from hopd.models import load_model, load_tokenizer, resolve_model_path, response_logits
    from hopd.rollout import row_seeds, sample
    from hopd.step import as_sampled
    from hopd.tasks import encode_prompts, load_examples
    from hopd.vllm_sampler import VLLMSampler

    # the bundled teacher: a real chain solver whose head size vLLM's CPU kernels support
    path = resolve_model_path("testbed:teacher")
    tok = load_tokenizer(str(path))
    model = load_model(str(path))
    examples = load_examples("chain:default", 12, "eval", seed=3)
    prompts = encode_prompts(tok, [e.prompt for e in examples])
    prompts += encode_prompts(tok, [e.prompt for e in examples[:4]], system_prompt="a=1;")
    eos, pad, L = tok.eos_token_id, tok.pad_token_id, 160
    engine = VLLMSampler(model, str(path), eos_id=eos, pad_id=pad, max_len=512)
    res: dict[str, object] = {}

    def greedy_pair(tag: str, hf_model=model) -> None:
        engine.opts = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
        v = engine.sample(prompts, L)
        h = sample(hf_model, prompts, L, eos_id=eos, pad_id=pad, greedy=True)
        res[tag] = {"ids_equal": v.ids_B_T.equal(h.ids_B_T),
                    "mask_equal": v.response_mask_B_R.equal(h.response_mask_B_R),
                    "attn_equal": v.attn_B_T.equal(h.attn_B_T), "cut_equal": v.cut_B.equal(h.cut_B),
                    "prompt_len_equal": v.prompt_len == h.prompt_len,
                    "eos_rows": int((~v.cut_B).sum()), "tokens": v.num_tokens,
                    "logp_max_diff": max_diff(v.sampler_logp_B_R, h.sampler_logp_B_R,
                                              v.response_mask_B_R),
                    "first_row": v.response_ids_B_R[0].tolist()}

    def sampled(tag: str, T: float, k: int, p: float, rows: list[list[int]] = prompts,
                H: int = L) -> None:
        engine.opts = {"temperature": T, "top_k": k, "top_p": p}
        seeds = row_seeds(0, 1, range(len(rows)))
        r = engine.sample(rows, H, row_seeds=seeds)
        again = engine.sample(rows, H, row_seeds=seeds)
        with torch.no_grad():
            logits = response_logits(model, r.ids_B_T, r.attn_B_T, r.prompt_len)
            as_drawn = as_sampled(logits, SamplingConfig(temperature=T, top_p=p, top_k=k))
            mine = token_logprobs(as_drawn, r.response_ids_B_R)
        res[tag] = {"logp_max_diff": max_diff(mine, r.sampler_logp_B_R, r.response_mask_B_R),
                    "tokens": r.num_tokens, "reproducible": r.ids_B_T.equal(again.ids_B_T),
                    "distinct_rows": len({tuple(x) for x in r.response_ids_B_R.tolist()})}

    greedy_pair("greedy")
    sampled("sampled_t1", 1.0, 0, 1.0)
    sampled("sampled_t07_k8", 0.7, 8, 1.0)
    sampled("sampled_t13_p09", 1.3, 0, 0.9)
    # more prompt tokens than one scheduler step takes (4,096): prefills are split across steps
    sampled("many_rows", 1.0, 0, 1.0, rows=prompts * 8, H=16)
    # one optimizer step that moves the model's greedy answers, then the sync
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    r = sample(model, prompts, L, eos_id=eos, pad_id=pad, temperature=1.5,
               row_seeds=row_seeds(0, 2, range(len(prompts))))
    model.train()
    logits = response_logits(model, r.ids_B_T, r.attn_B_T, r.prompt_len)
    loss = -(token_logprobs(logits, r.response_ids_B_R) * r.response_mask_B_R).sum() / r.num_tokens
    loss.backward()
    opt.step()
    model.eval()
    before = res["greedy"]["first_row"]
    engine.sync()
    greedy_pair("after_step")
    res["after_step"]["changed"] = res["after_step"]["first_row"] != before
    # a LoRA student: the engine gets the merged weights, and the learner keeps its own
    from hopd.models import attach_lora

    lora = attach_lora(load_model(str(path)), 8, 16.0, 0.0, ["all-linear"])
    with torch.no_grad():
        for name, w in lora.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.1)
    base = {n: w.detach().clone() for n, w in lora.named_parameters() if "base_layer" in n}
    engine.model = lora
    engine.sync()
    greedy_pair("lora", hf_model=lora)
    res["lora"]["changed"] = res["lora"]["first_row"] != res["greedy"]["first_row"]
    res["lora"]["base_untouched"] = all(torch.equal(w, base[n]) for n, w in lora.named_parameters()
                                  if n in base)
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main(sys.argv[1])
