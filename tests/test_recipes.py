"""The bundled-teacher recipe at a small scale learns; the bundled checkpoints are what they claim."""

from __future__ import annotations

import json

from hopd.cli import main
from hopd.models import BUNDLED, BUNDLED_DIR
from hopd.progress import read_metrics


def test_sft_recipe_learns_at_small_scale(tmp_path):
    """The teacher's recipe (hopd sft, AdamW, warm-up + cosine) on two-step chains."""
    out = tmp_path / "sft"
    rc = main(["sft", "--out", str(out), "--quiet", "model=size:student", "task=chain:two",
               "steps=500", "lr=3e-3", "warmup_steps=30", "eval_every=0", "eval_n=200",
               "threads=1"])
    assert rc == 0
    lines = read_metrics(out / "metrics.jsonl")
    first = sum(r["loss"] for r in lines[:10]) / 10
    last = sum(r["loss"] for r in lines[-10:]) / 10
    assert last < 0.1 * first  # the loss falls well below its start
    acc = json.loads((out / "sft_result.json").read_text())["final_eval_accuracy"]
    assert acc >= 0.2  # chance is 0.10 (answers are uniform over ten digits)


def test_bundled_checkpoints_ship_with_the_package():
    for name, folder in BUNDLED.items():
        path = BUNDLED_DIR / folder
        assert (path / "model.safetensors").stat().st_size < 8 * 2**20, name
        assert (path / "tokenizer.json").exists() and (path / "config.json").exists(), name
