"""Checkpoint state without pickle: nested optimizer/scheduler/scaler state split into tensors plus JSON, and the
random-generator states of Python, NumPy, torch and CUDA. Used by :mod:`timm_remem.checkpoint` (which re-exports
these functions).

Example:
    >>> import json, torch
    >>> from timm_remem._state_tree import flatten_state, unflatten_state
    >>> tree, tensors = flatten_state({"m": torch.ones(2), "betas": (0.9, 0.99)}, "opt")
    >>> out = unflatten_state(json.loads(json.dumps(tree)), tensors)
    >>> out["betas"], out["m"].tolist()
    ((0.9, 0.99), [1.0, 1.0])
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["flatten_state", "unflatten_state", "get_rng_state", "set_rng_state"]


# ----------------------------------------------------------------------------------------------------------------
# Flattening nested state (optimizer/scheduler/scaler state dicts) into tensors + JSON
# ----------------------------------------------------------------------------------------------------------------

_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def flatten_state(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON-able tree and a flat ``{key: tensor}`` dict.

    Tensors become ``{"__tensor__": key}`` references; tuples, dicts with non-string keys and non-finite floats get
    small tagged forms so that :func:`unflatten_state` restores them exactly.

    Args:
        obj: Nested dicts/lists/tuples of tensors, numbers, strings, booleans and None.
        prefix: Prefix of the tensor keys (e.g. ``"optimizer"``).

    Returns:
        ``(tree, tensors)``.

    Raises:
        CheckpointError: A value of another type (it could only be stored by pickling it).

    Example:
        >>> tree, tensors = flatten_state({"state": {0: {"m": torch.zeros(2)}}, "betas": (0.9, 0.99)}, "opt")
        >>> list(tensors), tree["betas"]
        (['opt.state.0.m'], {'__tuple__': [0.9, 0.99]})
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path
            n = 1
            while key in tensors:
                key = f"{path}#{n}"
                n += 1
            tensors[key] = value
            return {"__tensor__": key}
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and k not in _MARKERS for k in value):
                return {k: enc(v, f"{path}.{k}") for k, v in value.items()}
            return {"__dict__": [[enc(k, f"{path}.key"), enc(v, f"{path}.{k}")] for k, v in value.items()]}
        # numpy scalars and arrays (NumPy RNG state) without importing numpy at module level
        if type(value).__module__ == "numpy":
            if hasattr(value, "tolist"):
                return enc(value.tolist(), path)
        raise CheckpointError(
            f"cannot store a value of type {type(value).__name__} at {path!r} in a checkpoint: checkpoints hold only "
            "tensors, numbers, strings, lists and dicts (no pickle); convert it (e.g. to a list) before saving"
        )

    return enc(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`.

    Raises:
        CheckpointError: A tensor reference has no tensor (the checkpoint files do not belong together).

    Example:
        >>> import json
        >>> tree, tensors = flatten_state({"a": (1, torch.ones(1)), 3: float("inf")}, "x")
        >>> out = unflatten_state(json.loads(json.dumps(tree)), tensors)
        >>> out["a"][0], out[3]
        (1, inf)
    """

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if isinstance(value, dict):
            if len(value) == 1:
                (tag, inner), = value.items()
                if tag == "__tensor__":
                    if inner not in tensors:
                        raise CheckpointError(f"checkpoint tensor {inner!r} is missing from state.safetensors")
                    return tensors[inner]
                if tag == "__tuple__":
                    return tuple(dec(v) for v in inner)
                if tag == "__dict__":
                    return {dec(k): dec(v) for k, v in inner}
                if tag == "__float__":
                    return float(inner)
            return {k: dec(v) for k, v in value.items()}
        return value

    return dec(tree)


# ----------------------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Current states of the Python, NumPy (when installed), torch CPU and CUDA random generators.

    Example:
        >>> s = get_rng_state(); a = torch.rand(1); set_rng_state(s); bool(torch.rand(1) == a)
        True
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states saved by :func:`get_rng_state` (also after a JSON/safetensors round trip)."""

    def to_tuple(v: Any) -> Any:
        return tuple(to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v

    if "python" in state:
        random.setstate(to_tuple(state["python"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), i)
