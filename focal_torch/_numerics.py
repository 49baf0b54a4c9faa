"""Small numerics helpers shared by the torch losses: the compute dtype, an exact softplus,
a fast in-place exp, and a hyperparameter gathered at each row's label.

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


def traced(value: Any, cdt: torch.dtype, logits: torch.Tensor) -> Any:
  """Under torch.compile, a Python-number hyperparameter as a 0-d tensor: a number that
  changes between calls (a gamma schedule) is symbolic there, and dynamo cannot pass a
  symbolic float into the autograd.Function. Eager: as it is."""
  if isinstance(value, float) and torch.compiler.is_compiling():
    return torch.full((), value, dtype=cdt, device=logits.device)
  return value
