"""Small numerics helpers shared by the torch losses: the compute dtype, an exact softplus,
a fast in-place exp, a hyperparameter gathered at each row's label, and the saving of the
hyperparameters ``alpha`` and ``gamma`` in an autograd.Function.

The softmax, categorical, sigmoid and fused-linear modules import these from here (not from
one another), so that no loss module is a hub the others depend on.
"""

from __future__ import annotations

from typing import Any

import torch


def softplus(x: torch.Tensor) -> torch.Tensor:
  """``log(1 + exp(x))``, exact in float64 too (``F.softplus`` returns ``x`` beyond 20, a
  1e-10 relative error in float64), with a correct derivative everywhere (also at 0)."""
  return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
  """float64 stays float64; everything else is computed in float32."""
  return torch.float64 if dtype == torch.float64 else torch.float32


def per_row(value: Any, t3: torch.Tensor, cdt: torch.dtype) -> Any:
  """A hyperparameter at each row's label: None, a float, or a tensor."""
  if isinstance(value, torch.Tensor):
    value = value.to(device=t3.device, dtype=cdt)
    return value[t3] if value.ndim == 1 else value
  return value


def exp_(x: torch.Tensor) -> torch.Tensor:
  """In-place ``exp`` as ``exp2(x log2 e)``: torch's CPU ``exp2`` is faster than its ``exp``
  (BENCHMARKS.md, "Engine choices in focal_torch"), for a relative error of about
  ``3e-8 |x|`` from rounding the scaled argument (a few ulp for |x| < 100)."""
  # The constant written out: a module-level float read inside an autograd.Function becomes
  # a symbolic input under torch.compile(dynamic=True), which dynamo cannot lift into a
  # second Function of the same graph (torch 2.13).
  return x.mul_(1.4426950408889634).exp2_()


def lse_shift(m: torch.Tensor) -> torch.Tensor:
  """A row maximum ``m`` as the shift of a log-sum-exp, as torch.logsumexp takes it: 0 where
  ``m`` is infinite (a row of -inf, or one with +inf), so that ``exp(z - m)`` is not NaN there
  unless the row's result is."""
  return torch.where(m.abs() == float("inf"), torch.zeros((), dtype=m.dtype, device=m.device), m)


def after(go: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
  """``x`` as a function of the cotangent ``go`` too: ``where(isnan(go), go, x)`` (rows where
  ``go`` is NaN become NaN, as their gradient, a multiple of ``go``, is anyway).

  Under torch.compile the joint graph's partitioner may compute anything of the backward that
  depends on forward values alone in the forward and save it (an ``(N, C)`` gradient before its
  multiply by ``go`` costs less to save than the inputs it comes from). A backward whose math
  starts from this can only have its inputs saved.
  """
  return torch.where(torch.isnan(go), go, x)


def traced(value: Any, cdt: torch.dtype, logits: torch.Tensor) -> Any:
  """Under torch.compile, a Python-number hyperparameter as a 0-d tensor: a number that
  changes between calls (a gamma schedule) is symbolic there, and dynamo cannot pass a
  symbolic float into the autograd.Function. Eager: as it is."""
  if isinstance(value, float) and torch.compiler.is_compiling():
    return torch.full((), value, dtype=cdt, device=logits.device)
  return value


def save_hypers(ctx: Any, tensors: tuple[torch.Tensor | None, ...], alpha: Any,
                gamma: Any) -> None:
  """``ctx.save_for_backward(*tensors)`` with the hyperparameters ``alpha`` and ``gamma``:
  a tensor is saved with the others, a number (or None) kept on ``ctx``. Read back with
  :func:`saved_hypers`."""
  hypers = (alpha, gamma)
  ctx.save_for_backward(*tensors, *(x if isinstance(x, torch.Tensor) else None for x in hypers))
  ctx.hyper_numbers = tuple(None if isinstance(x, torch.Tensor) else x for x in hypers)


def saved_hypers(ctx: Any) -> tuple[tuple[torch.Tensor | None, ...], Any, Any]:
  """``(tensors, alpha, gamma)`` as given to :func:`save_hypers`."""
  *tensors, alpha_t, gamma_t = ctx.saved_tensors
  alpha = alpha_t if alpha_t is not None else ctx.hyper_numbers[0]
  gamma = gamma_t if gamma_t is not None else ctx.hyper_numbers[1]
  return tuple(tensors), alpha, gamma
