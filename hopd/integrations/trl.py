"""hopd's horizon schedules inside TRL's on-policy distillation trainers.

A TRL user keeps their script and adds one line: the callback sets the generation horizon H (the
most tokens a rollout may have) before every optimizer step, from any hopd schedule, and logs it:

    from hopd.integrations.trl import HorizonCallback
    from hopd.schedules import HorizonConfig

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, ...)  # lmbda=1
    HorizonCallback(HorizonConfig(kind="progressive", start=0.1, reach_at=0.5),
                    budget=args.max_new_tokens).attach(trainer)
    trainer.train()

It works with `trl.experimental.gkd.GKDTrainer` (generation length `max_new_tokens`) and
`trl.DistillationTrainer` (`max_completion_length`), on their transformers generation path: the
trainer keeps the length in a `GenerationConfig` and in the keyword arguments it generates with,
and both are read at every step, so changing them changes the next rollouts. With
DistillationTrainer's vLLM generation (`use_vllm=True`) the length is fixed when vLLM is set up;
the callback refuses it rather than pretend. The adaptive schedule needs hopd's per-position
diagnostics, which a TRL trainer does not compute: it is refused with that reason.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from hopd.config import ConfigError
from hopd.schedules import HorizonConfig, horizon_at

# the trainer attribute that holds the generation budget L, per trainer class
_LENGTH_ARGS = ("max_new_tokens", "max_completion_length")


class HorizonCallback(TrainerCallback):
    """Sets a TRL trainer's generation horizon from a hopd schedule at every optimizer step.

    `budget` is the full response budget L (the trainer's own maximum generation length when
    left at 0). `history` keeps (step, H) for every step, and the trainer's logs get `horizon`.
    """

    def __init__(self, horizon: HorizonConfig, budget: int = 0):
        if horizon.kind == "adaptive":
            raise ConfigError("horizon.kind=adaptive decides from hopd's per-position "
                              "diagnostics, which a TRL trainer does not compute: use full, "
                              "truncated or progressive")
        self.horizon = horizon
        self.budget = budget
        self.trainer: Any = None
        self.forced = 0  # the trainer's min_new_tokens (forced lengths), capped at H each step
        self.history: list[tuple[int, int]] = []
        self.current = 0

    def attach(self, trainer: Any) -> HorizonCallback:
        """Binds the callback to `trainer` and adds it to the trainer's callbacks."""
        if getattr(trainer.args, "use_vllm", False):
            raise ConfigError("HorizonCallback changes the transformers generation path's length; "
                              "with use_vllm=True TRL fixes the length when it sets vLLM up. Set "
                              "use_vllm=False, or use hopd's own loop")
        if not hasattr(trainer, "generation_config"):
            raise ConfigError(f"{type(trainer).__name__} has no generation_config: "
                              "HorizonCallback drives GKDTrainer and DistillationTrainer")
        length = next((getattr(trainer.args, a) for a in _LENGTH_ARGS
                       if getattr(trainer.args, a, None)), None)
        self.budget = self.budget or int(length or trainer.generation_config.max_new_tokens)
        self.horizon.validate(self.budget)
        self.forced = getattr(trainer.generation_config, "min_new_tokens", None) or 0
        self.trainer = trainer
        trainer.add_callback(self)
        log = trainer.log

        def log_with_horizon(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if self.current and "loss" in logs:  # training logs, not evaluation's
                logs = {**logs, "horizon": self.current}
            return log(logs, *args, **kwargs)

        trainer.log = log_with_horizon
        return self

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            raise ConfigError("HorizonCallback was added without attach(trainer): call "
                              "HorizonCallback(...).attach(trainer) instead of callbacks=[...]")
        H = horizon_at(state.global_step, state.max_steps, self.budget, self.horizon)
        self.set_length(H)
        self.current = H
        self.history.append((state.global_step, H))

    def set_length(self, H: int) -> None:
        """Every place the trainer reads its generation length from."""
        t = self.trainer
        t.generation_config.max_new_tokens = H
        if self.forced:  # forced lengths stay <= H
            t.generation_config.min_new_tokens = min(self.forced, H)
        if isinstance(getattr(t, "generation_kwargs", None), dict):
            t.generation_kwargs["max_new_tokens"] = H
        if hasattr(t, "max_completion_length"):
            t.max_completion_length = H
