"""Scale-out on torch's own engines: DDP by default, FSDP2 with `fsdp = true`, launched by torchrun.

    torchrun --nproc_per_node=2 -m nanogemma train --data DATA ...          # 2 processes (GPUs, or CPUs)

torchrun starts N copies of the command with RANK / WORLD_SIZE / LOCAL_RANK in the environment; each
process here joins the process group (NCCL on GPUs, gloo on CPUs) and owns one device.

* **DDP** keeps a full copy of the model in every process and averages the gradients during backward.
  With gradient accumulation, only the last micro-batch of a step synchronises (`no_sync` on the others).
* **FSDP2** (`fully_shard`) splits every block's parameters, gradients and AdamW state across the
  processes and gathers a block's weights just before it runs: memory per process falls ~N-fold, for
  models that do not fit one device.

**Same data, any world size.** Every process draws the offsets of the *whole* optimizer step,
`world_size · grad_accum` micro-batches, from the same seeded generator, and takes its own share. So N
processes with accumulation A see exactly the batches of 1 process with accumulation N·A, and their
averaged gradient is the same number up to the order of float additions: the DDP test checks the loss
curves agree.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import NanogemmaError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NanogemmaError("device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name not in ("cpu", "mps"):
        raise NanogemmaError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def setup(device: str) -> World:
    """Join torchrun's process group if launched by it; otherwise a world of one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World(device=pick_device(device))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return World(rank, size, local, dev)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, fsdp: bool) -> nn.Module:
    """The model the training step calls: itself (one process), DDP-wrapped, or FSDP2-sharded in place."""
    if not world.distributed:
        if fsdp:
            raise NanogemmaError("fsdp = true needs several processes: launch with "
                                 "torchrun --nproc_per_node=N -m nanogemma train ...")
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # one all-gather per block: only one block is ever whole at a time
            fully_shard(block)
        fully_shard(model)  # the rest: embedding (and tied head), final norm
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on every micro-batch but the last of a step (DDP; FSDP2 reduces each)."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_mean(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world.size
    return x


def all_sum(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_flag(flag: bool, world: World) -> bool:
    """True on every process if it is True on any (a Ctrl-C seen by one process stops all together)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
