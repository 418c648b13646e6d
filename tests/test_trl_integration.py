"""hopd's horizon schedules inside TRL's GKDTrainer (hopd.integrations.trl), on tiny models."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("trl")

from hopd.config import ConfigError  # noqa: E402
from hopd.integrations.trl import HorizonCallback  # noqa: E402
from hopd.models import load_model, load_tokenizer  # noqa: E402
from hopd.schedules import HorizonConfig, horizon_at  # noqa: E402
from hopd.tasks import PromptSource  # noqa: E402

L = 12


def _trainer(tmp_path, micro_pair, steps: int):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    s, t = micro_pair
    tok = load_tokenizer(str(s))
    rows = [{"messages": [{"role": "user", "content": e.prompt},
                          {"role": "assistant", "content": e.response}]}
            for e in PromptSource("chain:tiny").train_batch(0, 16, seed=0)]
    args = GKDConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2,
                     max_steps=steps, learning_rate=1e-4, lmbda=1.0, beta=1.0, temperature=1.0,
                     max_new_tokens=L, max_length=512, logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                     seed=0)
    trainer = GKDTrainer(model=load_model(str(s)), teacher_model=load_model(str(t)), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.generation_config.min_new_tokens = L  # forced lengths: every rollout is exactly H
    return trainer


def test_gkd_rollouts_follow_a_progressive_schedule_step_by_step(tmp_path, micro_pair,
                                                                 monkeypatch):
    from trl.experimental.gkd import GKDTrainer

    steps = 4
    trainer = _trainer(tmp_path, micro_pair, steps)
    seen = []  # (max_new_tokens the rollout was asked for, completion tokens it got)
    generate = GKDTrainer.generate_on_policy_outputs

    def spy(model, inputs, generation_config):
        ids, mask, labels = generate(model, inputs, generation_config)
        seen.append((generation_config.max_new_tokens, ids.shape[1] - inputs["prompts"].shape[1]))
        return ids, mask, labels

    monkeypatch.setattr(GKDTrainer, "generate_on_policy_outputs", staticmethod(spy))
    horizon = HorizonConfig(kind="progressive", shape="linear", start=0.25, reach_at=1.0)
    cb = HorizonCallback(horizon).attach(trainer)
    trainer.train()
    expected = [horizon_at(k, steps, L, horizon) for k in range(steps)]
    assert expected[0] < expected[-1] == L  # the schedule really grows, and reaches L
    assert cb.history == list(enumerate(expected))
    assert seen == [(h, h) for h in expected]  # generation used H, and the rollouts had H tokens
    logged = [x["horizon"] for x in trainer.state.log_history if "horizon" in x]
    assert logged == expected


def test_what_the_callback_cannot_drive_is_refused(tmp_path, micro_pair):
    with pytest.raises(ConfigError, match="diagnostics"):
        HorizonCallback(HorizonConfig(kind="adaptive"))
    trainer = _trainer(tmp_path, micro_pair, 1)
    trainer.args.use_vllm = True
    with pytest.raises(ConfigError, match="use_vllm"):
        HorizonCallback(HorizonConfig(kind="truncated")).attach(trainer)
