"""torch.distributed for the evaluation: one process per GPU (or CPU process) under `torchrun`.

Without torchrun (no WORLD_SIZE in the environment, or 1) nothing is initialised and every
collective is the identity. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None  #: the device collectives run on
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: Optional[str] = None) -> "DistContext":
        """Join the process group torchrun describes; a single process needs nothing."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            comm_device = torch.device("cuda", local)
        else:
            comm_device = torch.device("cpu")
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), comm_device, owns)

    def local_device(self, requested: Optional[str]) -> Optional[str]:
        """The device this process runs the model on: its own GPU under torchrun with NCCL."""
        if self.world > 1 and self.device is not None and self.device.type == "cuda":
            return str(self.device)
        return requested

    def sum(self, array: np.ndarray) -> np.ndarray:
        """All-reduce (sum) an int64 array across processes."""
        if self.world <= 1:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (on every process)."""
        if self.world <= 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
