"""The distributed wrappers a reweighted model must not be reweighted inside, built in this process.

A one-process gloo group (world size 1, file rendezvous) is enough to build every wrapper torch has on CPU:
``DistributedDataParallel``, FSDP (``FullyShardedDataParallel``), ``fully_shard`` and the composable ``replicate``,
alone, nested in a module of the user's (``.module`` chains) and inside or around ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import replicate
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.nn.parallel import DistributedDataParallel


class Holder(nn.Module):
    """A user's module around another one, reached through ``.module`` (as trainers often nest their wrappers)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A gloo group of one process for the duration (an existing default group is used as it is)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _fsdp(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "switching to NO_SHARD since the world size is 1"
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


def _fully_shard(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


# name -> (wrap the model, the path the refusal names: '' for the model itself)
WRAPPERS: dict[str, tuple[Callable[[nn.Module], nn.Module], str]] = {
    "ddp": (DistributedDataParallel, ""),
    "ddp-in-a-module": (lambda m: Holder(Holder(DistributedDataParallel(m))), "module.module"),
    "compiled-ddp": (lambda m: torch.compile(DistributedDataParallel(m), backend="eager"), "_orig_mod"),
    "ddp-of-compiled": (lambda m: DistributedDataParallel(torch.compile(m, backend="eager")), ""),
    "fsdp": (_fsdp, ""),
    "fully-shard": (_fully_shard, ""),
    "replicate": (replicate, ""),
}
