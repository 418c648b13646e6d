"""hopd: on-policy distillation with rollout-horizon control."""

__version__ = "0.1.0"
