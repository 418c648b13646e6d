import random

import pytest

from hopd.config import ConfigError
from hopd.tasks import chain, default_budget, load_examples
from hopd.tasks.chain import PRESETS, extract_answer, generate, is_correct, make_problem


def _solve(prompt: str) -> str:
    """Independent reference: executes the program text."""
    env: dict[str, int] = {}
    last = None
    for stmt in filter(None, prompt.split(";")):
        name, expr = stmt.split("=")
        x, op, y = expr[0], expr[1], expr[2]
        xv = int(x) if x.isdigit() else env[x]
        yv = int(y) if y.isdigit() else env[y]
        env[name] = {"+": xv + yv, "-": xv - yv, "*": xv * yv}[op] % 10
        last = env[name]
    return str(last)


def test_generator_is_deterministic_and_seed_dependent():
    a = generate(50, PRESETS["default"], "train", seed=3)
    b = generate(50, PRESETS["default"], "train", seed=3)
    c = generate(50, PRESETS["default"], "train", seed=4)
    assert a == b
    assert a != c


def test_answers_match_an_independent_interpreter():
    for p in generate(200, PRESETS["default"], "train", seed=0):
        assert p.answer == _solve(p.prompt)
        assert is_correct(p.response, p.answer)


def test_train_and_eval_never_overlap():
    train = {p.prompt for s in range(5) for p in generate(400, PRESETS["default"], "train", s)}
    ev = {p.prompt for p in generate(500, PRESETS["default"], "eval", 0)}
    assert len(ev) == 500
    assert not train & ev


def test_response_lengths_meet_the_presets():
    d = generate(20, PRESETS["default"], "eval", 0)
    h = generate(20, PRESETS["hard"], "eval", 0)
    assert min(len(p.response) for p in d) >= 150
    assert min(len(p.response) for p in h) >= 400
    assert default_budget("chain:default") >= max(len(p.response) for p in d) + 1


def test_steps_reference_only_recent_variables():
    spec = chain.ChainSpec(steps=20, reach=2, p_const=0.0)
    p = make_problem(random.Random(0), spec)
    for i, stmt in enumerate(filter(None, p.prompt.split(";"))):
        for operand in (stmt[2], stmt[4]):
            if not operand.isdigit():
                assert i - 2 <= chain.VARIABLES.index(operand) < i


@pytest.mark.parametrize("response,expected", [
    ("a=1+1=1+1=2\nAnswer: 2", "2"),
    ("a=1+1=1+1=2\nAnswer: 3", "3"),
    ("a=1+1=1+1=2\nb=a", None),  # cut by the budget
    ("Answer: 2\nb=a*2=", None),  # kept going after the answer
    ("#$%garbage", None),
    ("", None),
    ("Answer: ", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_checker_rejects_wrong_and_accepts_right():
    p = generate(1, PRESETS["default"], "eval", 0)[0]
    wrong = str((int(p.answer) + 1) % 10)
    assert is_correct(p.response, p.answer)
    assert not is_correct(p.response[:-1] + wrong, p.answer)
    assert not is_correct(p.response[:40], p.answer)


def test_bad_specs_and_sources_fail_clearly():
    with pytest.raises(ValueError, match="steps"):
        chain.ChainSpec(steps=0)
    with pytest.raises(ValueError, match="ops"):
        chain.ChainSpec(ops="/")
    with pytest.raises(ValueError, match="unknown testbed preset"):
        load_examples("chain:nope", 1, "train")


def test_shortcut_style_goes_to_the_prompts_with_a_low_first_digit():
    """The fork regime's SFT data: a visible feature decides the style, so a student can learn
    it per prompt (a coin flip per example would teach a 50/50 first token instead)."""
    from hopd.sft import with_shortcuts
    from hopd.tasks import load_examples

    ex = load_examples("chain:default", 200, "train", seed=0)
    mixed = with_shortcuts(ex, 0.5)
    short = [m for m in mixed if m.response.startswith("Answer: ")]
    assert 60 < len(short) < 140  # about half
    for e, m in zip(ex, mixed):
        low = int(e.prompt[2]) < 5  # "a=D..." : the program's first digit
        assert (m.response == f"Answer: {e.answer}") == low
        assert m.response == e.response or low
    assert with_shortcuts(ex, 0.0) == ex


def test_a_misconception_changes_every_line_of_its_operation_and_what_follows():
    """The spread regime's SFT data: `*` computed as `+` on every `*` line, later lines use the
    wrong values, the format is the teacher's; a program without `*` keeps its solution."""
    from hopd.sft import SFTConfig, with_misconception

    ex = load_examples("chain:default", 50, "train", seed=0)
    wrong = with_misconception(ex, "*:+")
    changed = 0
    for e, w in zip(ex, wrong):
        values: dict[str, int] = {}
        for line in w.response.splitlines()[:-1]:  # brute force: parse and recompute each line
            name, expr, subst, result = line.split("=")
            a, op, b = expr
            x, y = (int(o) if o.isdigit() else values[o] for o in (a, b))
            assert subst == f"{x}{op}{y}"
            values[name] = (x + y) % 10 if op in "*+" else (x - y) % 10
            assert int(result) == values[name]
        assert w.response.endswith(f"Answer: {values[name]}")
        assert ("*" in e.prompt) or w == e
        changed += w.response != e.response
    assert changed > 40
    assert with_misconception(ex, "") == ex
    some = with_misconception(ex, "*:+", 0.5)  # half of the examples, chosen by prompt hash
    n = sum(s != e for s, e in zip(some, ex))
    assert 10 < n < changed and all(s in (e, w) for s, e, w in zip(some, ex, wrong))
    for bad in ("/:+", "*+", "*:/"):
        with pytest.raises(ConfigError, match="misconception"):
            SFTConfig(misconception=bad).validate()
    assert chain.worked_solution(ex[0].prompt) == ex[0].response


def test_a_file_is_shuffled_once_per_epoch_not_once_per_prompt(tmp_path, monkeypatch):
    """A step's cost must not grow with the file: the order of an epoch is computed once."""
    import json
    import random

    from hopd.tasks import PromptSource

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "1"}) + "\n"
                            for i in range(5000)))
    src = PromptSource(str(path))
    calls = []
    real = random.Random.shuffle
    monkeypatch.setattr(random.Random, "shuffle", lambda self, x: (calls.append(len(x)),
                                                                   real(self, x))[1])
    first = src.train_batch(0, 32, seed=0)
    for step in range(1, 20):
        src.train_batch(step, 32, seed=0)
    assert len(calls) == 1  # 20 batches of 32, one epoch: one shuffle (was 640)
    assert src.train_batch(0, 32, seed=0) == first  # still a pure function of (seed, step)
    n = len(src.train_rows)
    src.train_batch(n // 32 + 1, 32, seed=0)  # the next epoch: one more shuffle
    assert len(calls) == 2
