import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hopd.models import check_compatible, load_model, load_tokenizer, save_checkpoint, tiny_llama
from hopd.tasks import encode_prompts
from hopd.tasks.chain import PRESETS, generate


def test_tokenizer_round_trip_and_reload(tokenizer, tmp_path):
    p = generate(5, PRESETS["default"], "train", 0)
    for prob in p:
        text = prob.prompt + "\n" + prob.response
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.chat_template == tokenizer.chat_template
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


def test_chat_template_matches_the_training_layout(tokenizer):
    prompt, response = "a=1+2;", "a=1+2=1+2=3\nAnswer: 3"
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False)
    gen = encode_prompts(tokenizer, [prompt])[0]
    assert full == "<bos>" + prompt + "\n" + response + "<eos>"
    assert gen == [tokenizer.bos_token_id] + tokenizer(prompt + "\n",
                                                       add_special_tokens=False)["input_ids"]


def test_save_load_gives_identical_logits(tokenizer, tmp_path):
    model = tiny_llama("micro", tokenizer, seed=3).eval()
    save_checkpoint(model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, len(tokenizer), (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert load_tokenizer(str(tmp_path)).get_vocab() == tokenizer.get_vocab()
    assert isinstance(load_model(str(tmp_path)), type(model))


def test_bf16_checkpoint_is_half_size(tokenizer, tmp_path):
    model = tiny_llama("micro", tokenizer, seed=3)
    save_checkpoint(model, tokenizer, tmp_path / "f32")
    save_checkpoint(model, tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    f32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    bf16 = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert bf16 < 0.6 * f32
    loaded = load_model(str(tmp_path / "bf16"))
    assert loaded.dtype == torch.float32  # upcast on load


def test_incompatible_vocabularies_fail_clearly(tokenizer):
    import pytest
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "x": 1, "<unk>": 2}, "<unk>")),
        pad_token="<pad>", unk_token="<unk>", eos_token="x")
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        check_compatible(other, tokenizer, 3, len(tokenizer))
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        check_compatible(tokenizer, tokenizer, len(tokenizer), 10)
    check_compatible(tokenizer, tokenizer, len(tokenizer) + 64, len(tokenizer))  # padded rows ok
