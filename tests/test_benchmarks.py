"""The benchmark scripts stay runnable and truthful: the GPU check's dry run (toy sizes, CPU) goes
through every check in seconds and writes the JSON the GPU run will write, and the README's
real-pair recipe is the one `benchmarks/real_pair.sh` runs."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_every_check(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and set(res["checks"]) == {"vllm", "drift", "horizon",
                                                              "real_pair"}
    errors = {k: v["error"] for k, v in res["checks"].items() if "error" in v}
    assert not errors, errors
    c = res["checks"]
    assert c["drift"]["max_abs_logp_diff"] < 1e-4  # fp32 on a CPU: the learner's own numbers
    assert c["horizon"]["opd"]["step_time_s"] > 0 and c["horizon"]["speedup"] > 0
    assert c["real_pair"]["H"] == 4 and c["real_pair"]["step_time_s"] > 0
    assert "check" in proc.stdout and "real_pair" in proc.stdout


def recipe_settings(text: str, common: str) -> list[tuple[str, ...]]:
    """Each stage of a real-pair recipe as its sorted settings: `--layers K` for the prune, then
    every key=value of each `hopd distill` with the shared settings (`common`, the body of the
    README's C="..." or the script's COMMON=(...)) merged in; paths and flags are left out."""
    def settings(words: list[str]) -> list[str]:
        return [w for w in words if re.fullmatch(r"[a-z_.]+=[^$\"]\S*", w)
                and not w.startswith(("student=", "teacher="))]

    text = text.replace("\\\n", " ")
    shared = settings(shlex.split(re.search(common, text, re.S).group(1)))
    stages = [("layers", re.search(r"hopd prune \S+ --layers (\d+)", text).group(1))]
    for line in re.findall(r"hopd distill (.*)", text):
        stages.append(tuple(sorted(settings(line.split()) + shared)))
    return stages


def test_readme_recipe_is_the_script():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("The whole recipe is `bash benchmarks/real_pair.sh`", 1)[1]
    block = block.split("```bash", 1)[1].split("```", 1)[0]
    script = (ROOT / "benchmarks" / "real_pair.sh").read_text()
    ours = recipe_settings(block, r'C="(.*?)"')
    theirs = recipe_settings(script, r"COMMON=\((.*?)\)")
    assert len(ours) == 3 and any("loss.kind=sft" in s for s in ours[1:]), ours
    assert ours == theirs


def test_loop_anatomy_reads_an_answer_by_hand():
    import importlib.util
    spec = importlib.util.spec_from_file_location("loop_anatomy",
                                                  ROOT / "benchmarks" / "loop_anatomy.py")
    la = sys.modules["loop_anatomy"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(la)
    eos = 9
    loop = [5, 6] * 10  # 20 tokens, 2 distinct bigrams of 19: a loop; no EOS (cut by the budget)
    r = la.read_answer(loop, [-0.5] * 10 + [-0.1] * 10, [5, eos] + [6, 5] * 9, eos)
    assert r.loops and r.missed_stop  # the teacher's top-1 was EOS at position 1
    # "5 6 5 6" first ends at 4; the one starting at 2 overlaps it, the one at 4 repeats it
    assert r.first_repeat == 4 and la.first_repeat([1, 2, 3, 4, 1, 2, 3]) == -1
    assert la.first_repeat([7, 1, 2, 3, 4, 9, 1, 2, 3, 4]) == 6 and la.first_repeat([]) == -1
    # 4-gram repeats: "5 6 5 6" x 5 marks tokens 4-19; in [7 1 2 3 4 9 1 2 3 4], 6-9
    assert la.repeats_inside([loop, [7, 1, 2, 3, 4, 9, 1, 2, 3, 4], []], 8) == (4 + 2, 12 + 2)
    assert r.nll_first == [0.5] * 10 and r.nll_second == [0.1] * 10
    assert sum(r.teacher_agrees) == 1  # position 0 only: then EOS, then out of phase
    ended = [1, 2, 3, eos]  # stops where the teacher's top-1 is EOS: no missed stop
    r = la.read_answer(ended, [-1.0, -2.0, -3.0, -0.5], [1, 2, 4, eos], eos)
    assert not r.loops and not r.missed_stop and r.teacher_agrees == [True, True, False, True]
    assert r.nll_first == [1.0, 2.0] and r.nll_second == [3.0, 0.5]
    s = la.summary([r])
    assert s["teacher_top1_agrees"] == 0.75 and s["missed_stops"] == 0 and s["answers"] == 1
    # two students on three prompts: the first prompt's answer loops for b, so only the
    # other two pair; b reads 0.5 and 0.25 worse per token there
    a = [r, la.read_answer([1, 2], [-1.0, -1.0], [1, 2], eos),
         la.read_answer([3, 4], [-2.0, -2.0], [0, 0], eos)]
    b = [la.read_answer(loop, [-0.1] * 20, [5, 6] * 10, eos),
         la.read_answer([1, 2], [-1.0, -2.0], [1, 0], eos),
         la.read_answer([3, 4, eos], [-2.0, -2.5, -2.25], [3, 0, 0], eos)]
    p = la.paired(a, b)
    assert p["prompts"] == 2 and p["b_worse_on"] == 2
    assert p["nll_a"] == pytest.approx(6 / 4) and p["nll_b"] == pytest.approx(9.75 / 5)
    assert p["nll_diff"] == pytest.approx(0.375) and p["nll_diff_se"] == pytest.approx(0.125)
    assert p["agrees_a"] == 0.5 and p["agrees_b"] == pytest.approx(2 / 5)


def test_loop_anatomy_runs_on_the_testbed_pair():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loop_anatomy.py"), "--model",
                           "testbed:student", "--teacher", "testbed:teacher", "--task",
                           "chain:default", "--n", "8", "--budget", "48", "--prefixes", "4",
                           "--against", "testbed:student"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["looping"]["answers"] + res["other"]["answers"] == res["n"] == 8
    # the bundled student was distilled from this teacher: a position shifted by one would
    # leave the teacher's top-1 agreeing with few of its tokens
    assert res["other"]["teacher_top1_agrees"] > 0.9
    assert "missed stops" in proc.stdout
    inside, past = res["repeats_inside_past"]  # the default horizon, 32, of 48 tokens
    assert f"{inside + past} tokens inside a repeated 4-gram, {inside} lie in the first 32" in \
        proc.stdout
    # against itself: the same greedy answers, so no difference on any prompt
    p = res["paired"]
    assert p["prompts"] == res["other"]["answers"] and p["nll_diff"] == 0 and p["b_worse_on"] == 0


def test_sample_ahead_benchmark_reports_the_same_answers_sooner_or_later(tmp_path):
    """benchmarks/sample_ahead.py on the testbed teacher: one table row per setting, and the
    rows' tokens compared with one step at a time (fp32 on a CPU: the same)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sample_ahead.py"),
                           "--model", "testbed:teacher", "--steps", "4", "--ahead", "1,2,4",
                           "--repeats", "1", "--budget", "32"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["ahead"] for r in res["results"]] == [1, 2, 4]
    assert all(r["same_rows"] == 1.0 and r["s_per_step"] > 0 for r in res["results"])
    assert res["results"][0]["speedup"] == 1.0


def test_ul_paired_benchmark_reports_the_same_rows_from_one_call(tmp_path):
    """benchmarks/ul_paired.py on the testbed student: the paired call's sampled and greedy
    rows against two calls' (fp32 on a CPU: the same), and a time for each."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ul_paired.py"),
                           "--model", "testbed:student", "--steps", "2", "--horizon", "16",
                           "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["same_rows"] == 1.0 and res["horizon"] == 16
    assert res["s_per_step_apart"] > 0 and res["s_per_step_paired"] > 0


def test_packed_decode_benchmark_times_both_weight_layouts(tmp_path):
    """benchmarks/packed_decode.py on the testbed student, packed although narrow: a time per
    call for each layout and the share of rows whose tokens the layouts agree on."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "packed_decode.py"),
                           "--model", "testbed:student", "--steps", "1", "--eval-n", "4",
                           "--horizon", "16", "--budget", "32", "--repeats", "1",
                           "--pack-narrow"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["packed"] is True
    assert res["opd_step_speedup"] > 0 and res["evaluation_speedup"] > 0
    assert res["opd_step_same_rows"] >= 0.75 and res["evaluation_same_rows"] >= 0.75
    assert "BLAS matmul" in proc.stdout and "packed (oneDNN)" in proc.stdout


def test_shared_prefix_benchmark_times_each_setting_at_the_same_loss(tmp_path):
    """benchmarks/shared_prefix.py on the testbed pair (no shared prefix there: its prompts
    start at once with the program): a time for each setting, and grad_accum's trimmed
    micro-batches at the same loss (float rounding only)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shared_prefix.py"),
                           "--model", "testbed:student", "--teacher", "testbed:teacher",
                           "--steps", "2", "--horizon", "24", "--repeats", "1",
                           "--accum", "1,4"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(res["seconds"]) == ["off/1", "on/1", "on/4"]
    assert all(v["learn"] > 0 and v["teacher"] > 0 for v in res["seconds"].values())
    assert res["shared_prefix"] == [0, 0] and res["loss_max_diff"] < 1e-5


def _run_folder(path: Path, readings: list[dict], **cfg) -> Path:
    """A run folder as `hopd distill` leaves it: config.yaml and metrics.jsonl with evaluations
    (each reading's missing fields filled with harmless values)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(json.dumps({"budget": 128, "max_steps": 240, **cfg}))
    lines = [{"eval_accuracy": None, "eval_metric": "rkl", "train_time_s": 10.0 * r["step"],
              "eval_rkl_se": 0.02, "eval_distinct_2_se": 0.03, "eval_looping": 0.1,
              "eval_mostly_one_token": 0.0, **r} for r in readings]
    (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    return path


def test_real_frontier_reads_each_mark_and_the_trend_by_hand(tmp_path):
    """benchmarks/real_frontier.py on hand-made run folders: which marks each reading meets
    against the pruned student's (KL at most half, NLL below, distinct-2 >= 0.5, no answer mostly
    one token), the least-squares line through the final readings, and the plot written."""
    def reading(step, rkl, nll, d2, **kw):
        return {"step": step, "eval_rkl": rkl, "eval_teacher_nll": nll, "eval_distinct_2": d2,
                **kw}

    warm = _run_folder(tmp_path / "warm", [reading(0, 1.0, 1.1, 0.3, guard_reference={
        "of": "teacher", "distinct_2": 0.6})], loss={"kind": "sft"})
    a = _run_folder(tmp_path / "a" / "opd", [reading(0, 0.5, 0.9, 0.3),
                                             reading(120, 0.6, 1.2, 0.4),
                                             reading(240, 0.5, 1.0, 0.5)],
                    loss={"kind": "rkl", "unlikelihood": 0.1}, optim={"lr": 2e-4},
                    horizon={"kind": "truncated", "fraction": 0.25})
    b = _run_folder(tmp_path / "b" / "opd", [reading(60, 0.4, 1.3, 0.7,
                                                     eval_mostly_one_token=1 / 32)],
                    loss={"kind": "rkl"}, horizon={"kind": "full"}, max_steps=60)
    c = _run_folder(tmp_path / "c", [reading(60, 0.45, 1.2, 0.6)], loss={"kind": "fkl"},
                    horizon={"kind": "full"})
    out = tmp_path / "frontier.png"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_frontier.py"),
                           str(a), str(b), str(c), "--pruned", str(warm), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| a/")
            or line.startswith("| b/") or line.startswith("| c ")]
    assert [(r[0], r[2]) for r in rows] == [("| a/opd", "120"), ("| a/opd", "240"),
                                            ("| b/opd", "60"), ("| c", "60")]  # no step 0
    assert rows[0][1] == "rkl H=32 ul=0.1 lr=0.0002 240 steps"
    assert rows[0][5] == "-40%" and rows[0][-1] == "not KL halved, NLL below, distinct-2 |"
    assert rows[1][-1] == "all |"  # KL 0.5 is half of 1.0, NLL 1.0 < 1.1, distinct-2 0.5
    assert rows[2][-1] == "not NLL below, no mostly-one |"
    assert rows[3][-1] == "not NLL below |"
    # final readings (1.0, 0.5), (1.3, 0.7), (1.2, 0.6); means 7/6 and 0.6: sxy = 0.03,
    # sxx = 0.14/3, syy = 0.02, so slope 9/14, r = 0.03 / sqrt(0.14/3 x 0.02) = 0.98, and at
    # NLL 1.1: 0.6 + 9/14 x (1.1 - 7/6) = 0.557
    fit = proc.stdout.splitlines()[-2]
    assert "= -0.150 + 0.643 x teacher NLL (r = 0.98)" in fit, fit
    assert "at the pruned student's NLL 1.100 it reads 0.557" in fit, fit
    assert out.stat().st_size > 10_000


def test_real_pair_table_reads_each_run_and_variant_by_hand(tmp_path):
    """benchmarks/real_pair_table.py on a hand-made grid folder: each run's last reading on val
    and its test.json judged against the pruned student of that split, a run killed before its
    first reading after step 0 left out, each variant's distinct-2 over its seeds and the count
    of runs that met every mark, and the plot written."""
    def reading(step, rkl, nll, d2):
        return {"step": step, "eval_rkl": rkl, "eval_teacher_nll": nll, "eval_distinct_2": d2}

    def result(rkl, nll, d2, mostly=0.0):  # hopd eval's JSON: the keys without eval_
        return {"rkl": rkl, "teacher_nll": nll, "distinct_2": d2, "looping": 0.1,
                "mostly_one_token": mostly, "eos_rate": 0.7, "mean_length": 60.0}

    (tmp_path / "student_val.json").write_text(json.dumps(result(1.0, 1.1, 0.3)))
    (tmp_path / "student_test.json").write_text(json.dumps(result(1.2, 1.2, 0.3)))
    a = _run_folder(tmp_path / "recipe_s0", [reading(0, 1.0, 1.1, 0.3),
                                             reading(120, 0.6, 1.0, 0.45),
                                             reading(240, 0.5, 1.0, 0.5)])
    (a / "test.json").write_text(json.dumps(result(0.55, 1.1, 0.52, mostly=1 / 32)))
    _run_folder(tmp_path / "recipe_s1", [reading(240, 0.4, 1.05, 0.48)])
    _run_folder(tmp_path / "ul1.0_s0", [reading(0, 1.0, 1.1, 0.3)])  # killed before step 120
    _run_folder(tmp_path / "warm_s0", [reading(40, 0.5, 0.9, 0.35)])  # a warm start, not a run
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_pair_table.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines()
            if line.startswith(("| recipe", "| ul", "| warm"))]
    runs = [(r[0], r[1], r[2], r[-2]) for r in rows if "_s" in r[0]]
    assert runs == [("| recipe_s0", "val", "240", "all"),  # 0.5 is half of 1.0
                    ("| recipe_s0", "test", "240", "not no mostly-one"),  # 0.55 <= 0.6
                    ("| recipe_s1", "val", "240", "not distinct-2")]
    summary = [r for r in rows if "_s" not in r[0]]
    assert [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in summary] == [
        ("| recipe", "val", "2", "0.490", "0.480", "0.500", "1 of 2 |"),
        ("| recipe", "test", "1", "0.520", "0.520", "0.520", "0 of 1 |")]
    last = json.loads(proc.stdout.splitlines()[-1])["variants"]
    assert last["recipe"]["val"]["every_mark"] == 1 and last["recipe"]["test"]["runs"] == 1
    assert last["recipe"]["val"]["distinct_2_mean"] == pytest.approx(0.49)
    assert (tmp_path / "grid.png").stat().st_size > 10_000


def test_real_pair_grid_recipe_variant_is_the_recipe():
    """The grid's `recipe` variant is the OPD stage of benchmarks/real_pair.sh: its steps, rate
    and unlikelihood weight, with the same horizon."""
    grid = (ROOT / "benchmarks" / "real_pair_grid.sh").read_text()
    steps, *ours = re.search(r'\[recipe\]="([^"]*)"', grid).group(1).split()
    script = (ROOT / "benchmarks" / "real_pair.sh").read_text().replace("\\\n", " ")
    opd = re.search(r"hopd distill --out \"\$OUT/opd\"(.*)", script).group(1).split()
    assert f"max_steps={steps}" in opd and all(s in opd for s in ours), (steps, ours, opd)
    run = grid.split("run() {", 1)[1].replace("\\\n", " ")
    assert all(s in opd and s in run for s in ("horizon.kind=truncated",
                                               "horizon.fraction=0.25", "loss.kind=rkl"))


def test_real_pair_grid_variants_are_valid_configs():
    """Every variant's settings, after the grid's shared ones and its run's own, load as a
    config (a misspelt key or a refused combination fails here, not an hour into a CPU run), and
    keep the recipe's horizon; t40 stops on its time budget."""
    from hopd.distill_config import load_config

    grid = (ROOT / "benchmarks" / "real_pair_grid.sh").read_text()
    table = re.search(r"declare -A VARIANT=\((.*?)\n\)", grid, re.S).group(1)
    variants = dict(re.findall(r'^\s*\[([\w.-]+)\]="([^"]*)"', table, re.M))
    assert {"recipe", "steps360", "t40", "b4x480", "sftul"} <= set(variants)
    # the grid's shared settings and the run's own, as the grid writes them (those that name a
    # shell variable aside: the models, the step counts)
    fixed = re.search(r"COMMON=\((.*?)\)", grid, re.S).group(1) + grid.split("run() {", 1)[1]
    shared = ["teacher=T.gguf", "student=S",
              *re.findall(r"(?<![\w$])([a-z_.]+=[^\s$\"]+)", fixed)]
    assert {"data=chat:prompts", "loss.kind=rkl", "horizon.fraction=0.25"} <= set(shared)
    cfgs = {name: load_config(None, [*shared, f"max_steps={spec.split()[0]}",
                                     *spec.split()[1:]]) for name, spec in variants.items()}
    for name, cfg in cfgs.items():
        assert cfg.max_steps == int(variants[name].split()[0]), name
        assert cfg.horizon.kind == "truncated", name
    assert cfgs["t40"].max_time_s == 2400 and cfgs["t40"].loss.unlikelihood == 0.1
    assert variants["recipe"] == variants["t40"]  # the recipe since t40's runs


FAKE_HOPD = r'''
"""A stand-in for the hopd command: logs its arguments, writes what the grid reads."""
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
if os.environ.get("FAKE_SPANS"):  # when each call ran, for the concurrency check
    start = time.time()
    time.sleep(0.3)
    with open(os.environ["FAKE_SPANS"], "a") as f:
        f.write(json.dumps([start, time.time()]) + "\n")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
opt = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
kv = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
reading = {"rkl": 1.0, "teacher_nll": 1.1, "distinct_2": 0.3, "looping": 0.4,
           "mostly_one_token": 0.0, "eos_rate": 0.6, "mean_length": 66.0}
if args[0] == "prune":
    Path(opt["--out"]).mkdir(parents=True)
elif args[0] == "eval":
    trained = not opt["--model"].endswith("student")
    Path(opt["--out"]).write_text(json.dumps({**reading, **({"rkl": 0.45, "teacher_nll": 1.0,
                                                            "distinct_2": 0.55} if trained
                                                           else {})}))
elif args[0] == "distill":
    out = Path(opt.get("--out") or opt["--resume"])
    (out / "model").mkdir(parents=True, exist_ok=True)  # --overwrite, or a resumed run's end
    (out / "model" / "config.json").write_text("{}")
    if "--resume" not in opt:
        steps = int(kv["max_steps"])
        rows = [{"step": s, "eval_accuracy": None, "train_time_s": float(s),
                 **{f"eval_{k}": v for k, v in reading.items()}}
                for s in range(0, steps + 1, int(kv["eval_every"]))]
        rows[-1].update(eval_rkl=0.4, eval_teacher_nll=1.0, eval_distinct_2=0.5)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
'''


def run_grid(out: Path, jobs: int, env: dict) -> subprocess.CompletedProcess:
    """benchmarks/real_pair_grid.sh on teacher "T.gguf" into `out`, `jobs` at a time."""
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "real_pair_grid.sh"), "T.gguf",
                           str(out), str(jobs)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_real_pair_grid_runs_each_variant_and_seed_once(tmp_path):
    """benchmarks/real_pair_grid.sh with a stand-in hopd: one prune with the named layers, the
    pruned student read on both splits, one warm start per seed, each variant from each seed's
    warm start with the variant's settings after the shared ones (so b4x480's batch 4 wins),
    read halfway, then on test, and the table at the end; a variant with its own warm start
    (sftul) from that one; run again, it redoes only what did not finish, and resumes a run
    that a signal stopped."""
    fake, log, out = tmp_path / "fake_hopd.py", tmp_path / "calls.jsonl", tmp_path / "grid"
    fake.write_text(FAKE_HOPD)
    env = {**os.environ, "FAKE_LOG": str(log), "HOPD": f"{sys.executable} {fake}",
           "SEEDS": "0 1", "VARIANTS": "recipe b4x480 sftul"}
    proc = run_grid(out, 3, env)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    prune = [c for c in calls if c[0] == "prune"]
    assert len(prune) == 1 and prune[0][1] == "T.gguf" and "--keep" in prune[0]
    distill = {Path(c[c.index("--out") + 1]).name: c for c in calls if c[0] == "distill"}
    assert sorted(distill) == ["b4x480_s0", "b4x480_s1", "recipe_s0", "recipe_s1", "sftul_s0",
                               "sftul_s1", "warm_s0", "warm_s1", "warm_sftul_s0",
                               "warm_sftul_s1"]

    def last(call, key):
        return [a.split("=", 1)[1] for a in call if a.startswith(key + "=")][-1]

    assert last(distill["warm_s1"], "loss.kind") == "sft" and last(distill["warm_s1"],
                                                                   "seed") == "1"
    assert last(distill["recipe_s1"], "student") == f"{out}/warm_s1/model"
    assert last(distill["sftul_s1"], "student") == f"{out}/warm_sftul_s1/model"
    assert last(distill["warm_sftul_s1"], "loss.unlikelihood") == "0.1"
    assert last(distill["warm_sftul_s1"], "seed") == "1"
    assert not any(a.startswith("loss.unlikelihood") for a in distill["warm_s1"])
    assert [last(distill["recipe_s0"], k) for k in ("max_steps", "max_time_s", "eval_every",
                                                    "batch_size", "loss.unlikelihood")] == [
        "480", "2400", "240", "8", "0.1"]
    assert [last(distill["b4x480_s0"], k) for k in ("max_steps", "eval_every",
                                                    "batch_size")] == ["480", "240", "4"]
    evals = sorted(Path(c[c.index("--model") + 1]).parent.name + ":" + c[c.index("--split") + 1]
                   for c in calls if c[0] == "eval")
    assert evals == ["b4x480_s0:test", "b4x480_s1:test", "grid:test", "grid:val",
                     "recipe_s0:test", "recipe_s1:test", "sftul_s0:test", "sftul_s1:test"]
    assert "| recipe | val | 2 | 0.500 | 0.500 | 0.500 | 2 of 2 |" in proc.stdout
    assert "| b4x480 | test | 2 | 0.550 | 0.550 | 0.550 | 2 of 2 |" in proc.stdout
    # again on the same folder: nothing to redo but the one run whose test reading is gone
    (out / "recipe_s1" / "test.json").unlink()
    log.unlink()
    again = run_grid(out, 3, env)
    assert again.returncode == 0, again.stderr[-2000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(c[0], c[2]) for c in calls] == [("distill", f"{out}/recipe_s1"),
                                             ("eval", f"{out}/recipe_s1/model")], calls
    # a run stopped by a signal (a checkpoint, no final model) is resumed, not started over
    shutil.rmtree(out / "b4x480_s0" / "model")
    (out / "b4x480_s0" / "test.json").unlink()
    (out / "b4x480_s0" / "checkpoints" / "step_100").mkdir(parents=True)
    log.unlink()
    again = run_grid(out, 3, env)
    assert again.returncode == 0, again.stderr[-2000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[:3] for c in calls] == [["distill", "--resume", f"{out}/b4x480_s0"],
                                      ["eval", "--model", f"{out}/b4x480_s0/model"]], calls


@pytest.mark.parametrize("jobs", [1, 2])
def test_real_pair_grid_runs_at_most_jobs_at_once(tmp_path, jobs):
    """JOBS bounds every phase of the grid, the pruned student's readings and the warm starts
    included. On a 2-core CPU the pruned student's val reading took 3.5 minutes alone; side by
    side with its test reading and a warm start (three processes of two threads each) neither
    reading had finished after 17 minutes."""
    fake, log, spans = tmp_path / "fake_hopd.py", tmp_path / "calls.jsonl", tmp_path / "spans"
    fake.write_text(FAKE_HOPD)
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_SPANS": str(spans),
           "HOPD": f"{sys.executable} {fake}", "SEEDS": "0 1", "VARIANTS": "recipe"}
    proc = run_grid(tmp_path / "grid", jobs, env)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    runs = [json.loads(line) for line in spans.read_text().splitlines()]
    assert len(runs) == 9  # prune, two readings, two warm starts, two runs and their tests
    most = max(sum(a <= t < b for a, b in runs) for t, _ in runs)
    assert most == jobs, (most, runs)
