"""How a run spreads over processes: one process, DDP, or FSDP2 sharding (`fully_shard`, which,
unlike FSDP1, also runs on CPU/gloo). Everything here is a no-op for a single unsharded process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tidar.model.transformer import Transformer
from tidar.train.errors import TrainConfigError

__all__ = ["Dist", "all_mean", "any_rank", "barrier", "device_for", "dist_from_env", "gather_state",
           "load_optimizer_state", "process_group", "wrap"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """This process's place in a torchrun launch (rank 0 of 1 outside one)."""
    # torchrun sets these; a plain `python` run has none. A stray RANK (a common shell variable name)
    # would make this process a non-main rank that trains but writes nothing, so it is checked.
    try:
        d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise TrainConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None
    if not (d.world_size >= 1 and 0 <= d.rank < d.world_size and d.local_rank >= 0):
        raise TrainConfigError(
            f"environment RANK={d.rank}, WORLD_SIZE={d.world_size}: these are torch.distributed's launch "
            "variables (torchrun sets them); unset RANK for a single-process run, or launch with torchrun")
    return d


def device_for(device: str, dist: Dist) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> this rank's device (the GPU of its local rank), made current."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{dist.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    return dev


@contextmanager
def process_group(dist: Dist, fsdp: bool, device: torch.device) -> Iterator[None]:
    """A process group for the run when it needs one (several ranks, or FSDP even for one process),
    unless one exists already; destroyed at the end if it was made here."""
    import torch.distributed as tdist

    own_group = (dist.enabled or fsdp) and not tdist.is_initialized()
    if own_group:
        if not dist.enabled:  # FSDP needs a process group even for one process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=dist.rank,
                                 world_size=dist.world_size)
    try:
        yield
    finally:
        if own_group and tdist.is_initialized():
            tdist.destroy_process_group()


def wrap(model: Transformer, dist: Dist, fsdp: bool, device: torch.device) -> nn.Module:
    """What the forward runs through: the model sharded in place (FSDP), a DDP wrapper, or the model."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # FSDP2 (per-parameter sharding): unlike FSDP1 it runs on CPU (gloo) too, and frozen and
        # trainable weights may share a layer (adapter mode). One unit per block, plus the root.
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if dist.enabled:
        # broadcast_buffers off: the only buffers are RoPE tables, identical everywhere
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                   broadcast_buffers=False, find_unused_parameters=False)
    return model


def all_mean(vec: torch.Tensor, dist: Dist) -> torch.Tensor:
    """`vec` averaged over ranks, in place (it must live on the device: NCCL only reduces GPU tensors)."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(vec)
        vec /= dist.world_size
    return vec


def any_rank(flag: bool, dist: Dist, device: torch.device) -> bool:
    """True on every rank when it is True on any."""
    if not dist.enabled:
        return flag
    import torch.distributed as tdist

    t = torch.tensor([float(flag)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()


def gather_state(net: nn.Module, model: Transformer, opt: torch.optim.Optimizer, fsdp: bool,
                 optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model + optimizer state on this process (FSDP: gathered to rank 0; all ranks must call)."""
    if not fsdp:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, (opt.state_dict() if optimizer else {})
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    # full_state_dict + cpu_offload: gathered on rank 0 only (the others get {}), which is who saves
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(net, options=options)
    osd = get_optimizer_state_dict(net, opt, options=options) if optimizer else {}
    return state, osd


def load_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], fsdp: bool) -> None:
    """The inverse of `gather_state`'s optimizer part (FSDP: each rank takes its shard of the full state)."""
    if not fsdp:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(net, opt, state, options=StateDictOptions(full_state_dict=True))
