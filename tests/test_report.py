"""The report from small synthetic run folders: plots, table and verdicts follow the data."""

import json

import pytest
from PIL import Image

from hopd.cli import main
from hopd.report import group, summarize, verdicts, write_report
from hopd.runs import find_runs


def _write_run(root, strategy, horizons, accs, step_time, seed=0, flops=0.0, load=None):
    """A run folder: one eval every 2 steps; accs[i] is the accuracy after step 2 * i. `flops`:
    estimated FLOPs per sampled token (logged as the loop does when given); `load`: the load
    average each step saw."""
    run = root / strategy / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "strategy.json").write_text(json.dumps({"strategy": strategy, "seed": seed}))
    lines, t, tok = [], 0.0, 0
    cost = {"train_flops": 0.0} if flops else {}
    lines.append({"step": 0, "eval_accuracy": accs[0], "train_time_s": 0.0, "sampled_tokens": 0,
                  **cost})
    for step, h in enumerate(horizons, start=1):
        t += step_time * h
        tok += 4 * h
        if flops:
            cost = {"est_flops": flops * 4 * h, "train_flops": flops * tok, "load_avg": load}
        lines.append({"step": step, "horizon": h, "loss": 0.1, "step_time_s": step_time * h,
                      "sample_time_s": step_time * h / 2, "teacher_time_s": step_time * h / 4,
                      "learn_time_s": step_time * h / 4, "sampled_tokens": tok,
                      "cut_fraction": 1.0, "peak_mem_mb": 100.0, "act_mem_mb": h / 10,
                      "train_time_s": t, "diag_rkl_by_pos": [0.5, 0.2, float("nan")],
                      "probe_teacher_acc_by_cut": {"0": 1.0, "0.5": 0.5 * step / 6}, **cost})
        if step % 2 == 0:
            lines.append({"step": step, "eval_accuracy": accs[step // 2], "train_time_s": t,
                          "sampled_tokens": tok, **cost})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def _make(root, popd_accs, topd_accs):
    L = 100
    _write_run(root, "opd", [L] * 6, [0.1, 0.3, 0.5, 0.8], 0.01)
    _write_run(root, "popd", [10, 10, 50, 50, L, L], popd_accs, 0.01)
    _write_run(root, "topd10", [10] * 6, topd_accs, 0.01)


def test_plots_exist_and_are_valid_pngs(tmp_path):
    _make(tmp_path / "runs", [0.1, 0.5, 0.8, 0.8], [0.1, 0.4, 0.6, 0.78])
    write_report([tmp_path / "runs"], tmp_path / "rep")
    for name in ("accuracy.png", "cost.png", "rkl_heatmap.png", "horizon.png", "probe.png"):
        with Image.open(tmp_path / "rep" / name) as im:
            im.verify()
            assert im.format == "PNG"
        assert f"]({name})" in (tmp_path / "rep" / "report.md").read_text()


def test_table_matches_the_metrics(tmp_path):
    _make(tmp_path / "runs", [0.1, 0.5, 0.8, 0.8], [0.1, 0.4, 0.6, 0.78])
    s = summarize(group(find_runs([tmp_path / "runs"])))
    assert s["target"] == pytest.approx(0.95 * 0.8)
    opd, popd, topd = s["rows"]["opd"], s["rows"]["popd"], s["rows"]["topd10"]
    assert opd["final_accuracy"] == 0.8 and opd["best_accuracy"] == 0.8
    assert opd["train_time_s"] == pytest.approx(0.01 * 600)
    assert opd["total_tokens"] == 4 * 600
    assert opd["time_to_target_s"] == pytest.approx(6.0)  # reached only at the last eval
    # popd reaches 0.8 at step 4: time 0.01 * (10 + 10 + 50 + 50)
    assert popd["time_to_target_s"] == pytest.approx(1.2)
    assert popd["speedup_time"] == pytest.approx(6.0 / 1.2)
    assert topd["time_to_target_s"] == pytest.approx(0.6)  # 0.78 >= 0.76 at step 6
    assert topd["peak_act_mem_mb"] == pytest.approx(1.0)
    text = (write_report([tmp_path / "runs"], tmp_path / "rep") and
            (tmp_path / "rep" / "report.md").read_text())
    assert "| popd | 1 | 10.0% | 80.0% | 80.0% | 6 | 3.20 | 1280 | 1.20 | 480 | 5.00x |" in text


def test_verdicts_follow_the_numbers(tmp_path):
    _make(tmp_path / "a", [0.1, 0.5, 0.8, 0.8], [0.1, 0.4, 0.6, 0.78])
    v = verdicts(summarize(group(find_runs([tmp_path / "a"]))))
    assert "sooner**: supported" in v[0] and "matches OPD**: supported" in v[1]
    # flip the numbers: POPD never gets there, TOPD ends far below OPD
    _make(tmp_path / "b", [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.5])
    v = verdicts(summarize(group(find_runs([tmp_path / "b"]))))
    assert "sooner**: not supported" in v[0] and "matches OPD**: not supported" in v[1]


def test_a_busy_machine_cannot_flip_the_verdicts(tmp_path):
    """The verdicts compare estimated compute and sampled tokens: the same runs with one run's
    step times ten times longer (a busy machine) keep their verdicts, and the report warns that
    wall-clock is not comparable when the load differed."""
    def make(root, popd_time, popd_load, popd_accs=(0.1, 0.5, 0.8, 0.8),
             opd_accs=(0.1, 0.3, 0.5, 0.8)):
        _write_run(root, "opd", [100] * 6, list(opd_accs), 0.01, flops=1e9, load=0.3)
        _write_run(root, "popd", [10, 10, 50, 50, 100, 100], list(popd_accs), popd_time,
                   flops=1e9, load=popd_load)
        _write_run(root, "topd10", [10] * 6, [0.1, 0.4, 0.6, 0.78], 0.01, flops=1e9, load=0.3)
        return summarize(group(find_runs([root])))

    quiet, busy = make(tmp_path / "quiet", 0.01, 0.3), make(tmp_path / "busy", 0.1, 2.9)
    assert busy["rows"]["popd"]["time_to_target_s"] == pytest.approx(
        10 * quiet["rows"]["popd"]["time_to_target_s"])
    assert busy["rows"]["popd"]["time_to_target_s"] > busy["rows"]["opd"]["time_to_target_s"]
    vq, vb = verdicts(quiet), verdicts(busy)
    assert [v.split("Wall-clock")[0] for v in vq] == [v.split("Wall-clock")[0] for v in vb]
    assert "sooner**: supported" in vb[0] and "5.00x less" in vb[0]  # 6e11 FLOPs against 1.2e11
    assert "matches OPD**: supported" in vb[1] and "0.10x OPD's estimated training compute" in vb[1]
    write_report([tmp_path / "busy"], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "load changed during the comparison" in text and "2.9 during `popd`" in text
    write_report([tmp_path / "quiet"], tmp_path / "rep2")
    assert "load changed" not in (tmp_path / "rep2" / "report.md").read_text()
    # and the compute verdict can fail: POPD that needs more compute than OPD is not sooner,
    # however fast its steps ran
    slow = make(tmp_path / "slow", 0.001, 0.3, popd_accs=(0.1, 0.2, 0.3, 0.8),
                opd_accs=(0.1, 0.8, 0.8, 0.8))
    assert slow["rows"]["popd"]["time_to_target_s"] < slow["rows"]["opd"]["time_to_target_s"]
    assert "sooner**: not supported" in verdicts(slow)[0]


def test_no_opd_run_means_no_verdict(tmp_path):
    _write_run(tmp_path / "r", "topd10", [10] * 4, [0.1, 0.2, 0.3], 0.01)
    v = verdicts(summarize(group(find_runs([tmp_path / "r"]))))
    assert "neither claim can be judged" in v[0]


def test_report_command_and_bad_paths(tmp_path, capsys):
    _make(tmp_path / "runs", [0.1, 0.5, 0.8, 0.8], [0.1, 0.4, 0.6, 0.78])
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_torn_last_metrics_line_is_tolerated(tmp_path):
    run = _write_run(tmp_path / "r", "opd", [10] * 4, [0.1, 0.2, 0.3], 0.01)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "horizon": 10, "lo')  # a kill mid-write
    runs = find_runs([run])
    assert runs[0].train[-1]["step"] == 4


def test_verdicts_are_inconclusive_when_opd_gain_is_noise(tmp_path):
    import yaml

    def make(root, opd_accs, n):
        _write_run(root, "opd", [100] * 6, opd_accs, 0.01)
        _write_run(root, "popd", [10, 10, 50, 50, 100, 100], [0.1, 0.5, 0.8, 0.8], 0.01)
        for run in root.glob("*/seed0"):
            (run / "config.yaml").write_text(yaml.safe_dump({"eval_n": n}))
        return verdicts(summarize(group(find_runs([root]))))

    assert "sooner**: supported" in make(tmp_path / "a", [0.1, 0.3, 0.5, 0.8], 200)[0]
    v = make(tmp_path / "b", [0.1, 0.12, 0.15, 0.14], 100)  # +4 points on 100 prompts
    assert len(v) == 1 and "inconclusive" in v[0] and "100 prompts" in v[0]
    v = make(tmp_path / "c", [0.5, 0.4, 0.3, 0.2], 200)  # OPD loses 30 points: not "noise"
    assert len(v) == 1 and "got worse, from 50.0% to 20.0%" in v[0] and "within" not in v[0]


def test_learning_rate_is_chosen_on_val_and_reported_on_test(tmp_path):
    """Each strategy is shown at the rate with the best val accuracy, even when another rate has
    the better test accuracy (choosing on test would be peeking)."""
    import yaml

    def run(strategy, lr, val, test):
        r = _write_run(tmp_path / f"lr{lr}", strategy, [100] * 6, [0.1, 0.2, 0.3, test], 0.01)
        (r / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}, "eval_n": 500}))
        with open(r / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 6, "val_accuracy": val, "val_n": 200}) + "\n")

    run("opd", 1e-3, val=0.60, test=0.55)
    run("opd", 3e-3, val=0.50, test=0.70)  # best on test, not on val: not chosen
    run("topd10", 1e-3, val=0.20, test=0.20)
    run("topd10", 3e-4, val=0.40, test=0.35)
    summary = write_report([tmp_path], tmp_path / "out")
    assert summary["rows"]["opd"]["final_accuracy"] == pytest.approx(0.55)
    assert summary["rows"]["topd10"]["final_accuracy"] == pytest.approx(0.35)
    chosen = {(row[0], row[1]) for row in summary["lr_grid"][1:] if row[5] == "yes"}
    assert chosen == {("opd", "0.001"), ("topd10", "0.0003")}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Learning rates" in text and "| opd | 0.003 | 1 | 50.0% | 70.0% |  |" in text


def test_several_seeds_show_mean_sd_and_how_many_reached(tmp_path):
    from hopd.report import table_rows

    for seed, final in enumerate((0.8, 0.6, 0.7)):
        _write_run(tmp_path, "opd", [100] * 6, [0.1, 0.3, 0.5, final], 0.01, seed=seed)
    for seed, final in enumerate((0.78, 0.2, 0.75)):  # one seed never reaches the target
        _write_run(tmp_path, "topd10", [10] * 6, [0.1, 0.2, 0.4, final], 0.01, seed=seed)
    rows = {r[0]: r for r in table_rows(summarize(group(find_runs([tmp_path]))))}
    assert rows["opd"][3] == "70.0% +- 10.0"
    assert rows["topd10"][8] == "n/a (2/3)"  # target 66.5%: two of three seeds got there


def test_unrelated_runs_are_not_pooled_and_the_report_says_so(tmp_path, capsys):
    import yaml

    a = _write_run(tmp_path / "a", "opd", [100] * 6, [0.1, 0.2, 0.3, 0.4], 0.01)
    b = _write_run(tmp_path / "b", "opd", [100] * 6, [0.1, 0.5, 0.6, 0.9], 0.01, seed=1)
    (a / "config.yaml").write_text(yaml.safe_dump({"max_steps": 6, "eval_n": 200, "seed": 0}))
    (b / "config.yaml").write_text(yaml.safe_dump({"max_steps": 16, "eval_n": 100, "seed": 1}))
    summary = write_report([tmp_path], tmp_path / "out")
    assert set(summary["rows"]) == {"opd", "opd#2"}  # not one 'opd' of two seeds
    assert "max_steps (16, 6)" in summary["warnings"][0]
    assert "warning" in capsys.readouterr().err
    assert "**Warning**" in (tmp_path / "out" / "report.md").read_text()


def test_a_speed_up_within_timing_noise_is_called_so(tmp_path):
    """On a busy machine OPD's step times spread; a POPD 'speed-up' smaller than that spread
    is flagged, with the sampled tokens beside it. A quiet machine gets no such warning."""
    import json as _json

    def make(root, jitter):
        _write_run(root, "opd", [100] * 6, [0.1, 0.3, 0.5, 0.8], 0.01)
        _write_run(root, "popd", [90, 90, 90, 90, 100, 100], [0.1, 0.3, 0.5, 0.8], 0.01)
        path = root / "opd" / "seed0" / "metrics.jsonl"
        lines = [_json.loads(x) for x in path.read_text().splitlines()]
        for i, x in enumerate(y for y in lines if "loss" in y):
            x["step_time_s"] *= 1 + jitter * (i % 2)  # every other step slowed by `jitter`
        path.write_text("".join(_json.dumps(x) + "\n" for x in lines))
        return verdicts(summarize(group(find_runs([root]))))[0]

    noisy = make(tmp_path / "noisy", 1.0)
    assert "sooner**: supported" in noisy and "within timing noise" in noisy
    assert "Sampled tokens to the target" in noisy
    assert "timing noise" not in make(tmp_path / "quiet", 0.0)


def test_a_topd_gap_within_evaluation_noise_is_inconclusive(tmp_path):
    """The demo's case: TOPD half a point under the 95%-of-OPD bar on 200 prompts is noise (two
    standard errors near the bar, 76% here, are 6 points), so the verdict says inconclusive,
    not 'not supported'; a gap well beyond the noise stays 'not supported'."""
    import yaml

    def make(root, topd_final):
        _make(root, [0.1, 0.5, 0.8, 0.8], [0.1, 0.4, 0.6, topd_final])
        for run in root.glob("*/seed0"):
            (run / "config.yaml").write_text(yaml.safe_dump({"eval_n": 200}))
        return verdicts(summarize(group(find_runs([root]))))[1]

    near = make(tmp_path / "near", 0.755)  # the bar is 0.95 x 0.8 = 0.76
    assert "inconclusive here" in near and "200 prompts" in near
    assert "not supported here" in make(tmp_path / "far", 0.6)


def test_probe_lines_that_coincide_are_one_line_naming_every_cut():
    from hopd.report_plots import probe_lines

    rows = [{"step": 0, "probe_teacher_acc_by_cut": {"0": 1.0, "0.1": 1.0, "0.5": 0.5}},
            {"step": 10, "probe_teacher_acc_by_cut": {"0": 1.0, "0.1": 1.0, "0.5": 0.75}}]
    lines = probe_lines(rows)
    assert [label for label, _, _ in lines] == ["cuts at 0%, 10% of L (identical)",
                                                "cut at 50% of L"]
    assert lines[1][1:] == ([0, 10], [0.5, 0.75])


def test_a_rate_whose_val_answers_degenerated_is_not_chosen(tmp_path):
    """A KL can be lowered by repetition the teacher finds likely: the rate with the lowest val
    KL is passed over when its val answers degenerated against the teacher's."""
    import yaml

    from hopd.report import choose_rates

    ref = {"of": "teacher", "distinct_2": 0.56, "mostly_one_token": 0.0, "mean_length": 60.0}

    def run(lr, val_kl, d2, length):
        root = tmp_path / f"lr{lr}" / "opd" / "seed0"
        root.mkdir(parents=True)
        (root / "strategy.json").write_text(json.dumps({"strategy": "opd", "seed": 0}))
        (root / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}, "eval_n": 8,
                                                          "eval_metric": "rkl"}))
        lines = [{"step": 0, "eval_accuracy": None, "eval_metric": "rkl", "eval_rkl": 1.0,
                  "guard_reference": ref, "train_time_s": 0.0, "sampled_tokens": 0},
                 {"step": 1, "horizon": 8, "loss": 0.5, "step_time_s": 1.0, "sampled_tokens": 8,
                  "train_time_s": 1.0},
                 {"step": 1, "eval_accuracy": None, "eval_metric": "rkl", "eval_rkl": val_kl,
                  "train_time_s": 1.0, "sampled_tokens": 8},
                 {"step": 1, "val_accuracy": None, "val_rkl": val_kl, "val_distinct_2": d2,
                  "val_mostly_one_token": 0.0, "val_mean_length": length}]
        (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    run(1e-4, 0.69, 0.49, 48)
    run(3e-4, 0.66, 0.32, 66)
    run(1e-3, 0.65, 0.10, 128)  # the lowest KL, answers that loop to the budget
    chosen, table = choose_rates(group(find_runs([tmp_path])))
    assert chosen["opd"][0].lr == 3e-4
    rows = {r[1]: r for r in table[1:]}
    assert rows["0.001"][5] == "" and rows["0.001"][6].startswith("degenerate: distinct-2 0.10")
    assert rows["0.0003"][5] == "yes" and rows["0.0003"][6] == ""
    # an accuracy is not gamed by repetition: there the best val value is chosen as before
    for cfg in tmp_path.glob("lr*/opd/seed0/config.yaml"):
        cfg.write_text(cfg.read_text().replace("eval_metric: rkl", "eval_metric: accuracy"))
    for m in tmp_path.glob("lr*/opd/seed0/metrics.jsonl"):
        m.write_text(m.read_text().replace('"eval_metric": "rkl"', '"eval_metric": "accuracy"')
                     .replace('"val_accuracy": null', '"val_accuracy": 0.5'))
    _, table = choose_rates(group(find_runs([tmp_path])))
    assert all(r[6] == "" for r in table[1:])


def test_the_adaptive_horizons_readings_count_as_training_time(tmp_path):
    """Time to target and training time add the readings an adaptive horizon decides on:
    logged as control_time_s, or (runs written before it was) summed from diag_time_s."""
    _make(tmp_path, [0.1, 0.3, 0.5, 0.8], [0.1, 0.3, 0.5, 0.8])
    for name, logged in (("adaptive", True), ("adaptive_old", False)):
        run = _write_run(tmp_path, name, [10] * 6, [0.1, 0.3, 0.5, 0.8], 0.01)
        (run / "config.yaml").write_text("horizon:\n  kind: adaptive\n")
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        spent = 0.0
        for r in lines:
            if "loss" in r and r["step"] % 2 == 0:
                r["diag_time_s"] = 3.0  # a reading every 2 steps, before that step's eval
                spent += 3.0
            if logged:
                r["control_time_s"] = spent
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = summarize(group(find_runs([tmp_path])))["rows"]
    # topd10 and the adaptive runs train the same steps; each reading adds 3 s
    for name in ("adaptive", "adaptive_old"):
        assert rows[name]["train_time_s"] == pytest.approx(rows["topd10"]["train_time_s"] + 9)
        assert rows[name]["control_time_s"] == pytest.approx(9.0)
        assert rows[name]["time_to_target_s"] == pytest.approx(
            rows["topd10"]["time_to_target_s"] + 9)
