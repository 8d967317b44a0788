"""Private tensor helpers of the SAM optimizer: fused norms, one host synchronisation, buffers allocated once.

Not ``torch.nn.utils``: ``get_total_norm`` returns a half-precision norm for half-precision gradients and sums in
another order (float32 results differ in the last bits), and ``clip_grads_with_norm_`` multiplies even when nothing
is clipped and wants the norm as a tensor, whose copy to the device would cost a synchronisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError

# Added to the gradient norm when clipping (as in torch.nn.utils.clip_grad_norm_).
_CLIP_EPS = 1e-6

# On the CPU, the element-wise passes of one step run over runs of tensors of about this many bytes, so that each
# run stays in the core's cache from one pass to the next (ViT-Ti, one thread: ASAM's own work 15-18% and SAM's 6%
# below whole-list passes). Elsewhere (CUDA) every pass covers the whole list: one fused launch per pass.
CPU_RUN_BYTES = 128 * 1024

GroupGrads = tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]


def sq_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all elements (0-dim, fp32 or wider, on the first tensor's device), one read pass."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    device = norms[0].device
    return torch.stack([n.to(device) for n in norms]).square().sum()


def dots(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inner products ``<a_i, b_i>`` (0-dim, fp32 or wider, each on its tensors' device)."""
    # torch has no multi-tensor dot, and _foreach_mul + _foreach_norm would allocate a copy of a; half-precision
    # pairs are widened one tensor at a time so that the sum keeps float32 precision.
    out = []
    for x, y in zip(a, b, strict=True):
        if x.dtype in (torch.float16, torch.bfloat16):
            x, y = x.float(), y.float()
        out.append(torch.dot(x.reshape(-1), y.reshape(-1)))
    return out


def runs(tensors: list[torch.Tensor]) -> list[slice]:
    """Slices of ``tensors`` of ``CPU_RUN_BYTES`` each on the CPU, one slice of everything elsewhere."""
    if not tensors or tensors[0].device.type != "cpu":
        return [slice(0, len(tensors))]
    out, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        size += t.numel() * t.element_size()
        if size >= CPU_RUN_BYTES:
            out.append(slice(start, i + 1))
            start, size = i + 1, 0
    if start < len(tensors):
        out.append(slice(start, len(tensors)))
    return out


def scale_and_add_(tensors: list[torch.Tensor], others: list[torch.Tensor], scale: float) -> None:
    """``tensors[i] <- others[i] + scale * tensors[i]`` in place, nothing allocated."""
    # On the CPU a foreach op loops over the tensors anyway, so one add(out=) per tensor is a single pass;
    # elsewhere two fused foreach launches beat a launch per tensor.
    if tensors and tensors[0].device.type == "cpu":
        for t, o in zip(tensors, others, strict=True):
            torch.add(o, t, alpha=scale, out=t)
    else:
        torch._foreach_mul_(tensors, scale)
        torch._foreach_add_(tensors, others)


def to_floats(tensors: list[torch.Tensor]) -> list[float]:
    """Move a non-empty list of 0-dim tensors to the host with a single synchronisation."""
    device = tensors[0].device
    return torch.stack([t.to(device) for t in tensors]).tolist()


def reused_buffers(cache: dict[torch.Tensor, torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter buffers allocated on first use and reused on every later step."""
    out = []
    for p in params:
        buf = cache.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            cache[p] = buf
        out.append(buf)
    return out


def drop_frozen(param_groups: list[dict[str, Any]], cache: dict[torch.Tensor, torch.Tensor]) -> None:
    """Frozen parameters take no part in a step: a gradient left from before they were frozen is set to None (so
    neither the perturbation nor the base optimizer moves them) and their buffers are released."""
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None and not p.requires_grad:
                p.grad = None
    for p in [p for p in cache if not p.requires_grad]:
        del cache[p]


def grads_by_group(param_groups: list[dict[str, Any]]) -> list[GroupGrads]:
    """``(group, params, grads)`` for every group with gradients; frozen parameters and those without one left out."""
    out = []
    for group in param_groups:
        params = [p for p in group["params"] if p.grad is not None and p.requires_grad]
        if not params:
            continue
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise ConfigError("SAM does not support sparse gradients; use dense embeddings (sparse=False).")
        out.append((group, params, grads))
    return out


def global_norm(tensors: list[torch.Tensor]) -> float:
    """The norm of all the tensors together (0.0 for none), one host synchronisation."""
    return math.sqrt(to_floats([sq_sum(tensors)])[0] if tensors else 0.0)


def clip_grads_(grads: list[torch.Tensor], norm: float, max_norm: float) -> None:
    """Scale the gradients in place so that their global ``norm`` is at most ``max_norm`` (as clip_grad_norm_)."""
    coef = max_norm / (norm + _CLIP_EPS)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)


def losses_to_floats(loss: Any, perturbed_loss: Any) -> tuple[float | None, float | None]:
    """The closure's losses at ``w`` and ``w + e`` as floats (one synchronisation); None if not a 1-element tensor."""
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        return None, None
    dtype = torch.promote_types(loss.dtype, torch.float32)
    losses = [loss.detach().reshape(()).to(dtype)]
    if isinstance(perturbed_loss, torch.Tensor) and perturbed_loss.numel() == 1:
        losses.append(perturbed_loss.detach().reshape(()).to(loss.device, dtype))
    values = to_floats(losses)
    return values[0], (values[1] if len(values) == 2 else None)
