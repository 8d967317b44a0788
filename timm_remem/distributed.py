"""Small helpers over ``torch.distributed`` for runs launched with ``torchrun`` (see ``docs/distributed.md``).

:func:`init_distributed` joins the process group torchrun's environment describes; without one (or with
``WORLD_SIZE=1``) every helper behaves like a single process, so the same code runs either way.

Example:
    >>> from timm_remem import distributed
    >>> distributed.init_distributed("cpu")  # a plain process: nothing to join
    False
    >>> distributed.get_world_size(), distributed.is_main_process()
    (1, True)
    >>> distributed.all_reduce_sum([3.0, 1.0])  # metric sums over every rank (here only one)
    [3.0, 1.0]
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import errors
from .errors import ConfigError, RememError

__all__ = ["env_world_size", "env_local_rank", "init_distributed", "is_distributed", "get_rank", "get_world_size",
           "is_main_process", "barrier", "all_reduce_sum", "all_reduce_max", "broadcast_object", "broadcast_buffers",
           "all_gather_object", "run_on_main", "cleanup"]

# Whether this module created the default process group (then cleanup() destroys it).
_OWNED = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun, which sets RANK, "
            "WORLD_SIZE and LOCAL_RANK, or unset it"
        ) from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset).

    Example:
        >>> env_world_size() >= 1
        True
    """
    return _env_int("WORLD_SIZE", 1)


def env_local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset).

    Example:
        >>> env_local_rank() >= 0
        True
    """
    return _env_int("LOCAL_RANK", 0)


def init_distributed(device: str | torch.device | None = None, *, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment variables, if there is one.

    An existing default process group is used as it is; otherwise one is made with ``init_method="env://"`` and
    backend ``nccl`` for a CUDA ``device`` (``gloo`` otherwise). ``timeout_s`` is the collective timeout (torch's
    default when None). Returns True when this process is part of a group of more than one process.

    Raises:
        ConfigError: Malformed ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, or ``MASTER_ADDR``/``MASTER_PORT`` missing.

    Example:
        >>> init_distributed("cpu")  # not launched by torchrun
        False
    """
    global _OWNED
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = env_world_size()
    if world <= 1:
        return False
    if not dist.is_available():  # pragma: no cover - every official torch build has torch.distributed
        raise ConfigError(f"WORLD_SIZE={world} but this torch build has no torch.distributed; run one process")
    rank = _env_int("RANK", -1)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={os.environ.get('RANK')!r} must be in [0, WORLD_SIZE={world}); launch with torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun (it sets them)"
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    _OWNED = True
    return True


def is_distributed() -> bool:
    """True inside a process group of more than one process.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 without a process group).

    Example:
        >>> get_rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 without a process group).

    Example:
        >>> get_world_size()
        1
    """
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints.

    Example:
        >>> is_main_process()
        True
    """
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank reaches this point (no-op in a single process).

    Example:
        >>> barrier()
    """
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(values: Sequence[float] | torch.Tensor, op: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    values = [float(v) for v in values]
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: Sequence[float] | torch.Tensor) -> list[float]:
    """Sum numbers (or a flattened tensor) over every rank in float64; every rank gets the same list of floats.

    Use it for metric *sums*, then divide: averages of per-rank averages are wrong for uneven ranks.

    Example:
        >>> all_reduce_sum([2.5, 7])
        [2.5, 7.0]
    """
    return _all_reduce(values, "sum")


def all_reduce_max(values: Sequence[float] | torch.Tensor) -> list[float]:
    """Element-wise maximum over every rank (e.g. the slowest rank's epoch time).

    Example:
        >>> all_reduce_max([1.0, 4.0])
        [1.0, 4.0]
    """
    return _all_reduce(values, "max")


def _to_bytes(obj: Any) -> torch.Tensor:
    """JSON-encode ``obj`` (tensors and NumPy arrays included) as a uint8 tensor: collectives never pickle."""

    def default(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.tolist()}
        if hasattr(value, "tolist"):  # NumPy arrays and scalars
            return value.tolist()
        raise TypeError(f"cannot send {type(value).__name__} between ranks (JSON, tensors and arrays only)")

    payload = json.dumps(obj, default=default).encode()
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor) -> Any:
    def hook(d: dict) -> Any:
        if "__tensor__" in d:
            return torch.tensor(d["data"], dtype=getattr(torch, d["__tensor__"])).reshape(d["shape"])
        return d

    return json.loads(bytes(data.cpu().tolist()).decode(), object_hook=hook)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (JSON types, tensors, NumPy arrays) on every rank, sent as JSON bytes, never pickled.

    Example:
        >>> broadcast_object({"path": "runs/x"})
        {'path': 'runs/x'}
    """
    if not is_distributed():
        return obj
    device = _comm_device()
    data = _to_bytes(obj).to(device) if get_rank() == src else None
    size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=src)
    if data is None:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=src)
    return _from_bytes(data)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics, ...) into the module on every rank.

    After the last step of an epoch each DDP rank holds the statistics of its own last batch; call this before
    evaluating or saving.

    Example:
        >>> broadcast_buffers(torch.nn.BatchNorm1d(3))  # a single process: nothing to do
    """
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank, sent as JSON bytes (never pickled).

    Example:
        >>> all_gather_object(3)
        [3]
    """
    if not is_distributed():
        return [obj]
    device = _comm_device()
    data = _to_bytes(obj).to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.long, device=device))
    longest = max(int(n.item()) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    chunks = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(chunks, padded)
    return [_from_bytes(chunk[: int(n.item())]) for chunk, n in zip(chunks, sizes, strict=True)]


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 alone, its (JSON-able) result returned on every rank.

    A :class:`~timm_remem.errors.RememError` it raises is raised on every rank (same class and message); another
    exception is re-raised on rank 0 and as a ``RuntimeError`` naming it on the others.

    Example:
        >>> run_on_main(lambda: {"path": "runs/x"})
        {'path': 'runs/x'}
    """
    if not is_distributed():
        return fn()
    result, failure, caught = None, None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then re-raised here
            caught = e
            name = type(e).__name__ if isinstance(e, RememError) else ""
            failure = [name, str(e) if name else f"{type(e).__name__}: {e}"]
    result, failure = broadcast_object([result, failure])
    if caught is not None:
        raise caught
    if failure is not None:
        cls = getattr(errors, failure[0], None) if failure[0] else None
        if isinstance(cls, type) and issubclass(cls, RememError):
            raise cls(failure[1])
        raise RuntimeError(f"rank 0 failed: {failure[1]}")
    return result


def cleanup() -> None:
    """Destroy the default process group if :func:`init_distributed` created it (call once, at the end).

    Example:
        >>> cleanup()
    """
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False
