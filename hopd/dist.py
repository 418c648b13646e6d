"""Several processes through accelerate (DDP; gloo on CPU, NCCL on GPUs), or just one.

`accelerate launch -m hopd distill ...` (or torchrun) starts one process per device. Each rank
samples and learns on its own slice of every step's prompts; gradients are all-reduced by DDP.
Losses are divided by the *global* token count and the backward is scaled by the world size
(DDP averages gradients), so the update equals one process with the combined batch. Rank 0
alone logs, evaluates and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


class Dist:
    """This process's place among the ranks; a no-op when there is only one."""

    def __init__(self, device: str, from_env: bool = True):
        self.accel = None
        self.rank, self.world = 0, 1
        self.device = device
        if from_env and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import Accelerator
            except ImportError:
                raise ValueError("several processes need accelerate: pip install "
                                 "'hopd[dist]'") from None
            self.accel = Accelerator(cpu=device == "cpu")
            self.rank, self.world = self.accel.process_index, self.accel.num_processes
            self.device = str(self.accel.device)

    @classmethod
    def local(cls, device: str = "cpu") -> Dist:
        """One process, whatever the environment says (for callers outside the loop)."""
        return cls(device, from_env=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run forward/backward through (DDP when distributed)."""
        return self.accel.prepare_model(model) if self.accel is not None else model

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
        """Skips DDP's gradient all-reduce inside the block when `skip` (accumulation)."""
        if self.accel is not None and skip:
            with self.accel.no_sync(model):
                yield
        else:
            yield
