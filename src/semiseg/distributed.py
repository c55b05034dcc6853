"""Multi-process training through torch.distributed, as launched by `torchrun` (no process
management of our own): each rank trains on its own shard of every global batch; rank 0 writes
checkpoints and logs; validation cases are split across ranks and their results gathered."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from semiseg.devices import resolve_device

if TYPE_CHECKING:
    from semiseg.methods.base import Method


@dataclass(frozen=True)
class Distribution:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device_request: str) -> tuple[Distribution, torch.device]:
    """Join the process group torchrun describes in the environment (one process: no group)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distribution(), resolve_device(device_request)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_request in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = resolve_device(device_request)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distribution(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def stop(distribution: Distribution) -> None:
    if distribution.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(method: "Method", distribution: Distribution, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the whole method: its forward is the training step."""
    if not distribution.enabled:
        return method
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        # Batch statistics over the global batch: 3D patches leave 1-2 per GPU. (SyncBatchNorm
        # needs an accelerator; on CPU each rank normalises its own shard.)
        nn.SyncBatchNorm.convert_sync_batchnorm(method)

    return DistributedDataParallel(
        method,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=method.find_unused_parameters,
    )


def broadcast_flag(value: bool, distribution: Distribution, device: torch.device) -> bool:
    """Rank 0's decision (e.g. cancel) for every rank."""
    if not distribution.enabled:
        return value
    flag = torch.tensor([1.0 if value else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def mean_across_ranks(values: dict[str, torch.Tensor], distribution: Distribution) -> dict[str, torch.Tensor]:
    if not distribution.enabled:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in keys])
    dist.all_reduce(stacked)
    return {k: v / distribution.world_size for k, v in zip(keys, stacked)}


def gather(items: list[Any], distribution: Distribution) -> list[Any]:
    """Concatenate every rank's list (rank order)."""
    if not distribution.enabled:
        return items
    gathered: list[list[Any]] = [[] for _ in range(distribution.world_size)]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier(distribution: Distribution) -> None:
    if distribution.enabled:
        dist.barrier()
