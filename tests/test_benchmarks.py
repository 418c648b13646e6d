"""The benchmark scripts stay runnable and truthful: the GPU check's dry run (toy sizes, CPU) goes
through every check in seconds and writes the JSON the GPU run will write, and the README's
real-pair recipe is the one `benchmarks/real_pair.sh` runs."""

import json
import re
import shlex
import subprocess
from pathlib import Path

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
