"""Sharpness of a model's loss at its current weights, SAM's own objective and the Hessian's top eigenvalue: a
manipulation check for SAM ("did SAM training flatten the teacher?"). Definitions: docs/analysis.md, "Sharpness".

Everything is measured with respect to the parameters that require grad, in eval mode, and nothing is written to the
model: every module's ``training`` flag, every parameter's ``.grad`` and ``requires_grad`` are restored.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from timm_remem.analysis import measure_sharpness
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> batches = [(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2, 1))]
    >>> result = measure_sharpness(model, batches, loss_fn=F.mse_loss)
    >>> round(result.top_eigenvalue, 3), result.num_samples  # Hessian 2 X^T X / n = diag(1, 4)
    (4.0, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._serialization import dataclass_to_dict
from .._validation import check_bool, check_float, check_int
from ..errors import ConfigError
from ._common import _split_batch

__all__ = ["SAMSharpness", "Sharpness", "TopEigenvalue", "hessian_top_eigenvalue", "measure_sharpness",
           "sam_sharpness"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_Params = dict[str, torch.Tensor]


class SAMSharpness(NamedTuple):
    """What :func:`sam_sharpness` returns.

    Attributes:
        increase: Mean over batches of ``L_b(w + rho g_b / ||g_b||) - L_b(w)``.
        per_batch: The increase of each batch, in order.
        loss: Mean loss at ``w`` over all samples.
    """

    increase: float
    per_batch: tuple[float, ...]
    loss: float
    num_samples: int


class TopEigenvalue(NamedTuple):
    """What :func:`hessian_top_eigenvalue` returns.

    Attributes:
        value: The Hessian's eigenvalue of largest magnitude (sign kept), as estimated at the last iteration.
        iterations: Power iterations run.
        converged: Whether the relative change of the estimate fell below ``tol`` within ``iters`` iterations.
    """

    value: float
    iterations: int
    converged: bool


@dataclass(frozen=True)
class Sharpness:
    """Sharpness of a model on some batches (:func:`measure_sharpness`).

    Attributes:
        sam_increase: :attr:`SAMSharpness.increase` (``sam_increase_per_batch`` its ``per_batch``).
        loss: Mean loss at the current weights over all samples.
        top_eigenvalue: :attr:`TopEigenvalue.value`, or ``None`` with ``eigen=False`` (as ``eigen_iterations`` and
            ``eigen_converged``).
    """

    sam_increase: float
    sam_increase_per_batch: tuple[float, ...]
    loss: float
    top_eigenvalue: float | None
    eigen_iterations: int | None
    eigen_converged: bool | None
    rho: float
    num_batches: int
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary with sorted keys.

        Example:
            >>> s = Sharpness(0.1, (0.1,), 1.0, None, None, None, 0.05, 1, 8)
            >>> s.to_dict()["sam_increase_per_batch"], s.to_dict()["top_eigenvalue"]
            ([0.1], None)
        """
        return dataclass_to_dict(self) | {"sam_increase_per_batch": list(self.sam_increase_per_batch)}


def _check_model(model: Any) -> list[tuple[str, nn.Parameter]]:
    """The trainable named parameters of ``model``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters (none of its {sum(1 for _ in model.parameters())} "
            "parameters requires grad), and sharpness is measured with respect to those; call "
            "requires_grad_(True) on the parameters to measure (model.requires_grad_(True) for all of them)."
        )
    return params


def _check_loss_fn(loss_fn: Any) -> LossFn:
    if loss_fn is None:
        return F.cross_entropy
    if not callable(loss_fn):
        raise ConfigError(
            f"loss_fn must be a callable loss_fn(logits, labels) returning a scalar tensor, or None for "
            f"cross-entropy, got {type(loss_fn).__name__} {loss_fn!r:.60}."
        )
    return loss_fn


def _check_rho(rho: Any) -> float:
    return check_float("rho", rho, low=0, low_open=True, hint="SAM's radius is a positive number such as 0.05")


def _check_power(iters: Any, tol: Any, seed: Any) -> tuple[int, float, int]:
    """The power iteration's ``(iters, tol, seed)``, checked."""
    return (check_int("iters", iters, low=1, hint="the number of power iterations, e.g. 100"),
            check_float("tol", tol, low=0, low_open=True, hint="a relative tolerance such as 1e-3"),
            check_int("seed", seed, low=0, hint="any non-negative integer"))


def _reiterable(batches: Any) -> Iterable[Any]:
    """``batches`` itself when it can be read again (a list, a DataLoader), else its items in a list."""
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise ConfigError(
            f"batches must be an iterable of (inputs, labels) pairs, such as a DataLoader or [(x, y)], got "
            f"{type(batches).__name__}."
        )
    return list(batches) if isinstance(batches, Iterator) else batches


def _batches(batches: Iterable[Any], device: torch.device, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor,
                                                                                                  torch.Tensor, int]]:
    """``(inputs, labels, samples)`` of each batch on ``device``, floating inputs and labels cast to ``dtype``."""
    count = 0
    for i, batch in enumerate(batches):
        x, y = _split_batch(batch)
        if y is None:
            raise ConfigError(
                f"batch {i} has no labels ({type(batch).__name__}); the loss needs them: yield (inputs, labels) "
                "pairs, and pass a list of pairs such as [(x, y)] rather than one pair."
            )
        n = int(x.shape[0]) if x.dim() > 0 else 0
        if n == 0:
            raise ConfigError(f"batch {i} has no samples (inputs of shape {tuple(x.shape)}); drop empty batches.")
        count += 1
        yield _to(x, device, dtype), _to(y, device, dtype), n
    if count == 0:
        raise ConfigError("batches yielded no batch; pass a non-empty iterable of (inputs, labels) pairs.")


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _scalar(loss: Any, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(
            f"loss_fn must return a scalar tensor (the batch mean), got "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__} on {where}; use a "
            "loss with reduction='mean'."
        )
    return loss.reshape(())


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ConfigError(
            f"{what} is {value}; sharpness is undefined there. Check the inputs (normalised?), the labels and the "
            "model's precision (fp16 overflow?), or lower rho."
        )
    return value


def _acc_device(device: torch.device) -> torch.device:
    """Where float64 vector sums live: the model's device, or the host for MPS (no float64 there)."""
    return torch.device("cpu") if device.type == "mps" else device


@contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's ``training``, every parameter's ``.grad`` and ``requires_grad`` restored."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, g, flag in zip(params, grads, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = g


def _norm64(tensors: Iterable[torch.Tensor], device: torch.device) -> float:
    """Euclidean norm of several tensors seen as one vector, in float64."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total += t.detach().to(device=device, dtype=torch.float64).square().sum()
    return math.sqrt(float(total))


def _sam_pass(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, rho: float) -> SAMSharpness:
    named = _check_model(model)
    names, params = [n for n, _ in named], [p for _, p in named]
    device, dtype = params[0].device, params[0].dtype
    acc = _acc_device(device)
    per_batch: list[float] = []
    loss_sum, samples = 0.0, 0
    with _measuring(model):
        for i, (x, y, n) in enumerate(_batches(batches, device, dtype)):
            with torch.enable_grad():
                loss = _scalar(loss_fn(model(x), y), f"batch {i}")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            base = _finite(float(loss.detach()), f"the loss of batch {i}")
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            norm = _finite(_norm64(grads, acc), f"the gradient norm of batch {i}")
            loss_sum += base * n
            samples += n
            if norm == 0.0:  # no ascent direction: w is SAM's own perturbed point
                per_batch.append(0.0)
                continue
            scale = rho / norm
            with torch.no_grad():
                moved = {k: p.detach() + g * scale for k, p, g in zip(names, params, grads, strict=True)}
                del grads
                up = _scalar(loss_fn(functional_call(model, moved, (x,)), y), f"batch {i} (perturbed)")
            per_batch.append(_finite(float(up), f"the perturbed loss of batch {i}") - base)
    return SAMSharpness(math.fsum(per_batch) / len(per_batch), tuple(per_batch), loss_sum / samples, samples)


def sam_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    rho: float = 0.05,
) -> SAMSharpness:
    """SAM's loss increase ``L_b(w + rho g_b / ||g_b||) - L_b(w)`` per batch, and its mean over batches.

    ``g_b`` is the gradient of batch ``b``'s loss at the current weights ``w``. The step is taken per batch, as SAM
    does, so the result depends on the batch size: compare models on the same batches.

    Args:
        batches: ``(inputs, labels)`` pairs: a list, a DataLoader, or any iterable (read once).
        loss_fn: ``loss_fn(outputs, labels)`` returning the batch mean as a scalar tensor; default cross-entropy.
        rho: SAM's radius (> 0).

    Raises:
        ConfigError: A bad ``rho`` or ``loss_fn``, no batches, a batch without labels or samples, a model without
            trainable parameters, or a non-finite loss or gradient.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2, 1)
        >>> result = sam_sharpness(model, [(x, y)], loss_fn=F.mse_loss, rho=0.05)
        >>> round(result.increase, 4)   # rho ||g|| + rho^2 g^T H g / (2 ||g||^2), g = (-1, -2), H = diag(1, 4)
        0.1161
    """
    rho = _check_rho(rho)
    loss_fn = _check_loss_fn(loss_fn)
    return _sam_pass(model, _reiterable(batches), loss_fn, rho)


def _hvp(
    model: nn.Module, params: _Params, vector: _Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
    mode: str = "forward",
) -> _Params:
    """Hessian-vector product of ``loss_fn(model(x), y)`` at ``params``, ``jvp`` (``mode="forward"``) or ``vjp``
    (``"reverse"``) of ``grad``.

    Attention runs on SDPA's math kernel: the fused kernels (flash, memory-efficient, and PyTorch's CPU flash kernel)
    have neither a forward-mode derivative nor a derivative of their backward.
    """

    def loss_of(p: _Params) -> torch.Tensor:
        return _scalar(loss_fn(functional_call(model, p, (x,)), y), "a Hessian-vector product")

    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        if mode == "forward":
            return jvp(grad(loss_of), (params,), (vector,))[1]
        _, pullback = vjp(grad(loss_of), params)
        return pullback(vector)[0]


def _first_hvp(
    model: nn.Module, params: _Params, vector: _Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> tuple[str, _Params]:
    """The first product, and the mode every later one uses: forward-over-reverse where ``torch.func`` can run it.

    Reverse-over-reverse, which keeps the whole first backward graph alive, is the fallback where a forward-mode
    derivative is missing (NotImplementedError) or fails (RuntimeError: ``F.mse_loss``'s backward raises
    "ZeroTensors are immutable" under ``jvp`` in torch 2.14). Running out of memory is not retried.
    """
    try:
        return "forward", _hvp(model, params, vector, x, y, loss_fn, "forward")
    except (NotImplementedError, RuntimeError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        return "reverse", _hvp(model, params, vector, x, y, loss_fn, "reverse")


def _power_iteration(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, iters: int, tol: float, seed: int
) -> tuple[TopEigenvalue, int]:
    named = _check_model(model)
    device, dtype = named[0][1].device, named[0][1].dtype
    acc = _acc_device(device)
    params = {n: p.detach() for n, p in named}
    # The start: one N(0, I) draw over all parameters, on the host (the same for every device), normalised.
    gen = torch.Generator().manual_seed(seed)
    sizes = [p.numel() for p in params.values()]
    flat = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    flat /= torch.linalg.vector_norm(flat)
    v64 = {n: c.view(p.shape).to(acc) for (n, p), c in zip(params.items(), flat.split(sizes), strict=True)}
    mode: str | None = None
    samples, estimate, prev = None, 0.0, None
    with _measuring(model):
        for it in range(1, iters + 1):
            vector = {n: v.to(device=params[n].device, dtype=params[n].dtype) for n, v in v64.items()}
            hv64 = {n: torch.zeros_like(v) for n, v in v64.items()}
            count = 0
            for x, y, n in _batches(batches, device, dtype):
                if mode is None:
                    mode, hv = _first_hvp(model, params, vector, x, y, loss_fn)
                else:
                    hv = _hvp(model, params, vector, x, y, loss_fn, mode)
                for k, h in hv.items():
                    hv64[k] += h.detach().to(device=acc, dtype=torch.float64) * n
                count += n
            if samples is not None and count != samples:
                raise ConfigError(
                    f"batches gave {samples} samples on the first pass and {count} on pass {it}; the power iteration "
                    "reads them once per iteration: pass the same data every time (a list, or a DataLoader without "
                    "random augmentation or a sampler that changes the number of samples)."
                )
            samples = count
            for h in hv64.values():
                h /= count
            estimate = _finite(float(sum((v * h).sum() for v, h in zip(v64.values(), hv64.values(), strict=True))),
                               "a Hessian-vector product (its Rayleigh quotient)")
            norm = _finite(_norm64(hv64.values(), acc), "the norm of a Hessian-vector product")
            if norm == 0.0:  # H v = 0 from a random start: the Hessian is zero
                return TopEigenvalue(0.0, it, True), count
            v64 = {k: h / norm for k, h in hv64.items()}
            if prev is not None and abs(estimate - prev) <= tol * abs(estimate):
                return TopEigenvalue(estimate, it, True), count
            prev = estimate
    return TopEigenvalue(estimate, iters, False), samples or 0


def hessian_top_eigenvalue(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    iters: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> TopEigenvalue:
    """The eigenvalue of largest magnitude of the Hessian of the mean loss over all samples, by power iteration.

    Each iteration takes the Rayleigh quotient ``v^T H v`` as the estimate and ``H v / ||H v||`` as the next ``v``,
    from a normalised N(0, I) start seeded with ``seed``.

    Args:
        model: Any ``nn.Module`` whose forward ``torch.func`` can differentiate twice (timm models can).
        batches: ``(inputs, labels)`` pairs, read once per iteration: a list or a deterministic DataLoader (a
            one-shot iterator is collected into a list first).
        loss_fn: ``loss_fn(outputs, labels)`` returning the batch mean as a scalar tensor; default cross-entropy.
        iters: Most power iterations, at least 1.
        tol: Relative change of the estimate below which it has converged (> 0).

    Raises:
        ConfigError: A bad ``iters``, ``tol``, ``seed`` or ``loss_fn``, no batches, a batch without labels or
            samples, batches that change between passes, a model without trainable parameters, or a non-finite
            Hessian-vector product.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2, 1)
        >>> top = hessian_top_eigenvalue(model, [(x, y)], loss_fn=F.mse_loss)
        >>> round(top.value, 3), top.converged  # Hessian 2 X^T X / n = diag(1, 4)
        (4.0, True)
    """
    iters, tol, seed = _check_power(iters, tol, seed)
    loss_fn = _check_loss_fn(loss_fn)
    return _power_iteration(model, _reiterable(batches), loss_fn, iters, tol, seed)[0]


def measure_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    rho: float = 0.05,
    eigen: bool = True,
    iters: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> Sharpness:
    """:func:`sam_sharpness` and (``eigen=True``) :func:`hessian_top_eigenvalue` on the same batches.

    A one-shot iterator of batches is collected into a list first; all arguments are checked before anything runs.

    Args:
        rho: SAM's radius (> 0); use the ``rho`` the teacher was (or would be) trained with.
        eigen: Also estimate the top Hessian eigenvalue.
        iters: Most power iterations (``tol`` and ``seed``: as :func:`hessian_top_eigenvalue`).

    Raises:
        ConfigError: As :func:`sam_sharpness` and :func:`hessian_top_eigenvalue`, or ``eigen`` not a bool.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> batches = [(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2, 1))]
        >>> result = measure_sharpness(model, batches, loss_fn=F.mse_loss, eigen=False)
        >>> result.num_batches, result.top_eigenvalue, result.sam_increase > 0
        (1, None, True)
    """
    rho = _check_rho(rho)
    eigen = check_bool("eigen", eigen, hint="eigen=False skips the Hessian's top eigenvalue")
    iters, tol, seed = _check_power(iters, tol, seed)
    loss_fn = _check_loss_fn(loss_fn)
    _check_model(model)
    batches = _reiterable(batches)
    sam = _sam_pass(model, batches, loss_fn, rho)
    top = None
    if eigen:
        top, samples = _power_iteration(model, batches, loss_fn, iters, tol, seed)
        if samples != sam.num_samples:
            raise ConfigError(
                f"batches gave {sam.num_samples} samples to the SAM measure and {samples} to the power iteration; "
                "pass the same data every time (a list, or a DataLoader without random augmentation)."
            )
    return Sharpness(
        sam_increase=sam.increase,
        sam_increase_per_batch=sam.per_batch,
        loss=sam.loss,
        top_eigenvalue=None if top is None else top.value,
        eigen_iterations=None if top is None else top.iterations,
        eigen_converged=None if top is None else top.converged,
        rho=rho,
        num_batches=len(sam.per_batch),
        num_samples=sam.num_samples,
    )
