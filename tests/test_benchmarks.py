"""The GPU check is ready to run when a GPU is lent: its dry run (toy sizes, CPU) goes through
every check in seconds and writes the JSON the GPU run will write."""

import json
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
