"""Several processes (gloo on CPU, NCCL on GPUs) with DDP or FSDP, or just one.

`accelerate launch -m hopd distill ...` (or torchrun) starts one process per device. Each rank
samples and learns on its own slice of every step's prompts. Losses are divided by the *global*
token count and the backward is scaled by the world size (DDP and FSDP both average gradients),
so the update equals one process with the combined batch. Rank 0 alone logs, evaluates and
writes checkpoints.

- `parallel=ddp` (default): accelerate's DDP, a full copy of the student per rank.
- `parallel=fsdp` (or `accelerate launch --use_fsdp`): PyTorch's FSDP2 (`fully_shard`, per
  decoder layer and the root): weights, gradients and AdamW state sharded across ranks. For
  sampling, evaluation and saving, `full_weights` gathers the whole student on every rank for
  the duration (as TRL gathers ZeRO-3 weights for generation): the decode loop then runs at
  full speed instead of an all-gather per layer per token, and the sharded gradient and
  optimizer state, the bulk of training memory, stay sharded.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import torch

from hopd.config import ConfigError


def free_port() -> int:
    """A local TCP port nobody holds now (a fixed one may linger in TIME_WAIT or be taken by a
    neighbouring run): for a process group's rendezvous or a test's server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dist:
    """This process's place among the ranks; a no-op when there is only one."""

    def __init__(self, device: str, from_env: bool = True, parallel: str = "ddp"):
        self.accel = None
        self.rank, self.world = 0, 1
        self.device = device
        self.fsdp = False
        if from_env and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import Accelerator
            except ImportError:
                raise ConfigError("several processes need accelerate: pip install "
                                 "'hopd[dist]'") from None
            self.accel = Accelerator(cpu=device == "cpu")
            self.rank, self.world = self.accel.process_index, self.accel.num_processes
            self.device = str(self.accel.device)
            self.fsdp = parallel == "fsdp" or \
                os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")

    @classmethod
    def local(cls, device: str = "cpu") -> Dist:
        """One process, whatever the environment says (for callers outside the loop)."""
        return cls(device, from_env=False)

    @property
    def parallel(self) -> str:
        """How the student is replicated: "fsdp" (sharded) or "ddp" (one process counts too)."""
        return "fsdp" if self.fsdp else "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run forward/backward through: DDP's wrapper, or the model itself sharded
        in place by FSDP (build the optimizer after this: it must see the sharded weights)."""
        if self.accel is None:
            return model
        if not self.fsdp:
            return self.accel.prepare_model(model)
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Every rank holds the whole model inside the block (FSDP: all-gathered, kept through
        forwards, sharded again on exit); a no-op otherwise. All ranks must enter it."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        shards = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in shards:
            m.unshard()
            m.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for m in shards:
                m.reshard()
                m.set_reshard_after_forward(True)

    def model_state(self, model: torch.nn.Module) -> dict | None:
        """The state dict to save the student from: None (the model's own) unless FSDP, where
        it is gathered in full on the CPU (all ranks must call it; rank 0 gets the tensors)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied weight (lm_head = embeddings) is saved once, under its first name, as HF does
        first = {name for name, _ in model.named_parameters()}
        tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
        return {k: v for k, v in state.items() if k not in tied}

    def optimizer_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
        """The optimizer's state to save (FSDP: gathered in full, keyed by parameter name; all
        ranks must call it, rank 0 gets the state)."""
        if not self.fsdp:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer,
                             state: dict) -> None:
        if not self.fsdp:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, opt, state,
                                 options=StateDictOptions(full_state_dict=True))

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        if self.accel is not None:
            self.accel.wait_for_everyone()

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, skip: bool) -> Iterator[None]:
        """Skips the gradient all-reduce inside the block when `skip` (accumulation)."""
        if self.fsdp:
            model.set_requires_gradient_sync(not skip)  # type: ignore[operator]
            yield
        elif self.accel is not None and skip:
            with self.accel.no_sync(model):
                yield
        else:
            yield


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one (Llama-style `model.layers`, GPT-style `h`)."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers"):
        mod: object = model
        for name in path.split("."):
            mod = getattr(mod, name, None)
        if isinstance(mod, torch.nn.ModuleList):
            return list(mod)
    raise ConfigError(f"parallel=fsdp: no decoder layers found in {type(model).__name__}; "
                     "use parallel=ddp")
