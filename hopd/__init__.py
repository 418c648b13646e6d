"""hopd: on-policy distillation with rollout-horizon control.

From code (the same as `hopd distill CONFIG --out RUN key=value ...`):

    from pathlib import Path
    from hopd.distill import distill, load_config

    cfg = load_config("configs/popd.yaml", ["max_steps=100", "optim.lr=3e-4"])
    result = distill(cfg, Path("runs/popd"))       # metrics.jsonl, checkpoints/, model/
    print(result["final_eval_accuracy"])

Tensor names carry their shape: B batch rows, T prompt + response tokens, P prompt columns,
R response positions, H horizon, V vocabulary, K top-k entries, L the full budget.
"""

__version__ = "0.1.0"
