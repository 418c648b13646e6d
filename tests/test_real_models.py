"""Any HF causal LM pair from local paths, JSONL/GSM8K prompts, LoRA students."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hopd.cli import main
from hopd.models import attach_lora, save_checkpoint, tiny_llama
from hopd.progress import read_metrics
from hopd.rollout import sample
from hopd.tasks.jsonl import extract_math_answer, math_correct


def _arch(name: str, tok):
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, **llama_like))
    if name == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, **llama_like, head_dim=8))
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**common, n_embd=32, n_layer=2, n_head=2,
                                          n_positions=512))
    return tiny_llama("micro", tok, seed=3)


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    rows = [{"question": f"a={i % 10}+{(i * 3) % 10};{'b=a;' * (i // 10)}",
             "answer": f"step\n#### {(i + i * 3) % 10}"} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("student_arch,teacher_arch", [("qwen2", "qwen3"), ("gpt2", "llama"),
                                                       ("llama", "qwen2")])
def test_distill_any_pair_on_a_gsm8k_file(tmp_path, tokenizer, gsm8k_file, student_arch,
                                          teacher_arch):
    s, t = tmp_path / "s", tmp_path / "t"
    save_checkpoint(_arch(student_arch, tokenizer), tokenizer, s)
    save_checkpoint(_arch(teacher_arch, tokenizer), tokenizer, t)
    run = tmp_path / "run"
    rc = main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
               f"data={gsm8k_file}", "budget=12", "steps=2", "batch_size=4", "eval_n=3",
               "diag_every=1", "diag_n=2", "loss.kind=rkl", "loss.top_k=5"])
    assert rc == 0
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(train) == 2 and all(r["horizon"] == 12 for r in train)
    assert all(r["loss"] >= 0 for r in train)  # a KL (lower-bounded by top-k) is non-negative
    again = AutoModelForCausalLM.from_pretrained(run / "model")
    assert again.config.model_type == _arch(student_arch, tokenizer).config.model_type


def test_teacher_with_its_own_system_prompt_scores_the_same_tokens(tmp_path, tokenizer,
                                                                    gsm8k_file):
    """A different teacher prompt changes only the teacher's context, not the response."""
    from hopd.tasks import encode_prompts
    from hopd.teacher import score

    model = tiny_llama("micro", tokenizer, seed=4).eval()
    prompts = encode_prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;"])
    r = sample(model, prompts, 6, eos_id=-1, pad_id=0, greedy=True)
    same = score(model, r, prompts=prompts)
    plain = score(model, r)
    assert torch.allclose(same.logp_B_R, plain.logp_B_R, atol=1e-5)
    longer = encode_prompts(tokenizer, ["a=1+2;", "a=3*4;b=a-1;"], system_prompt="a=0+0;")
    other = score(model, r, prompts=longer)
    assert other.logp_B_R.shape == plain.logp_B_R.shape
    assert not torch.allclose(other.logp_B_R, plain.logp_B_R)
    # brute force: row 0 scored alone with the longer prompt
    ids = torch.tensor([longer[0] + r.response_ids_B_R[0].tolist()])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0]
    P = len(longer[0])
    ref = [logp[P - 1 + j, tok].item() for j, tok in enumerate(r.response_ids_B_R[0].tolist())]
    assert torch.allclose(other.logp_B_R[0], torch.tensor(ref), atol=1e-4)


def test_lora_student_trains_adapters_only_and_saves(tmp_path, micro_pair, gsm8k_file):
    s, t = micro_pair
    for merge in ("true", "false"):
        run = tmp_path / f"lora_{merge}"
        rc = main(["distill", "--out", str(run), "--quiet", f"student={s}", f"teacher={t}",
                   "data=chain:tiny", "steps=2", "batch_size=4", "eval_n=2", "diag_every=0",
                   "lora.rank=4", f"lora.merge={merge}", "save_every=1", "optim.lr=1e-2"])
        assert rc == 0
        ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
        assert (ckpt / "adapter_model.safetensors").exists()
        if merge == "true":
            merged = AutoModelForCausalLM.from_pretrained(run / "model")
            base = AutoModelForCausalLM.from_pretrained(s)
            changed = [n for (n, a), (_, b) in zip(merged.named_parameters(),
                                                   base.named_parameters())
                       if not torch.equal(a, b)]
            assert changed and all("proj" in n for n in changed)  # only adapted linear layers
        else:
            assert (run / "model" / "adapter_config.json").exists()
    # resume from an adapter checkpoint continues the step count
    rc = main(["distill", "--resume", "--out", str(run), "--quiet", f"student={s}",
               f"teacher={t}", "data=chain:tiny", "steps=3", "batch_size=4", "eval_n=2",
               "diag_every=0", "lora.rank=4", "lora.merge=false", "save_every=1",
               "optim.lr=1e-2"])
    assert rc == 0
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]


def test_fast_sampler_sees_lora_adapters(tokenizer):
    model = attach_lora(tiny_llama("micro", tokenizer, seed=5), 4, 8.0, 0.0, ["all-linear"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # non-zero adapters change the outputs
    prompts = [[1, 14, 66, 7], [1, 15]]
    fast = sample(model, prompts, 8, eos_id=-1, pad_id=0, greedy=True, fast=True)
    slow = sample(model, prompts, 8, eos_id=-1, pad_id=0, greedy=True, fast=False)
    assert fast.ids_B_T.equal(slow.ids_B_T)
    assert torch.allclose(fast.sampler_logp_B_R, slow.sampler_logp_B_R, atol=1e-5)
    with model.disable_adapter():
        off = sample(model, prompts, 8, eos_id=-1, pad_id=0, greedy=True, fast=True)
    assert not torch.allclose(off.sampler_logp_B_R, fast.sampler_logp_B_R)  # adapters count


@pytest.mark.parametrize("text,answer,ok", [
    ("so \\boxed{42}.", "42", True),
    ("\\boxed{\\frac{1}{2}} done", "\\frac{1}{2}", True),
    ("work\n#### 1,234", "1234", True),
    ("#### 7.0", "7", True),
    ("Answer: 5", "5", True),
    ("\\boxed{41}", "42", False),
    ("\\boxed{4", "4", False),  # cut before the closing brace
    ("no answer here", "1", False),
])
def test_math_answer_checking(text, answer, ok):
    assert math_correct(text, answer) is ok


def test_boxed_extraction_takes_the_last_and_nests():
    assert extract_math_answer("\\boxed{1} then \\boxed{{2}+1}") == "{2}+1"
