"""The few array operations the reference formulas use, for NumPy, jax.numpy and torch.

The formulas in ``focal_reference._formulas`` are written once against this small interface, so
that the same lines give float64 NumPy values (the tests' truth), float64 autodiff in JAX
(gradients and Hessians) and float64 autograd in torch (the parity suite's vector-Jacobian
products). The framework is picked from the type of the logits; JAX and torch are imported only
when their arrays are passed in, so the package itself needs NumPy alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyLike:
  """NumPy, or a module with NumPy's names (``jax.numpy``)."""

  def __init__(self, module, stop_gradient=None):
    self.m = module
    self._stop = stop_gradient

  def dtype(self, name):
    return self.m.dtype(name) if isinstance(name, str) else name

  def is_array(self, x) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape")

  def asarray(self, x, dtype=None):
    if dtype is None:
      return self.m.asarray(x)
    return self.m.asarray(x, dtype=self.dtype(dtype))

  def labels(self, x):
    return self.m.asarray(x)

  def float_dtype(self, x):
    return x.dtype

  def moveaxis(self, x, source: int, destination: int):
    return self.m.moveaxis(x, source, destination)

  def take_last(self, a, index):
    """``a[..., index]`` row by row: ``index`` has ``a``'s shape without the last axis."""
    return self.m.take_along_axis(a, index[..., None].astype(self.m.int64), axis=-1)[..., 0]

  def gather(self, vector, index):
    return vector[index.astype(self.m.int64)]

  def where(self, cond, a, b):
    return self.m.where(cond, a, b)

  def max_nograd(self, x):
    m = self.m.max(x, axis=-1, keepdims=True)
    return m if self._stop is None else self._stop(m)

  def sum(self, x, axis=None, keepdims=False):
    return self.m.sum(x, axis=axis, keepdims=keepdims)

  def argmax(self, x):
    return self.m.argmax(x, axis=-1)

  def ones_bool(self, shape):
    return self.m.ones(shape, dtype=bool)

  def broadcast_to(self, x, shape):
    return self.m.broadcast_to(x, shape)

  def relu(self, x):
    return self.m.maximum(x, 0)

  def count(self, mask, like):
    """``max(number of True entries, 1)`` in ``like``'s dtype (an empty mean divides by 1)."""
    return self.m.maximum(self.m.sum(mask), 1).astype(like.dtype)

  def __getattr__(self, name: str):
    # exp, log, expm1, log1p, abs, isfinite ...: the module's own.
    return getattr(self.m, name)


class TorchOps:
  """The same operations on torch tensors (autograd follows them)."""

  def __init__(self):
    import torch
    self.t = torch

  def dtype(self, name):
    return getattr(self.t, name) if isinstance(name, str) else name

  def is_array(self, x) -> bool:
    return isinstance(x, self.t.Tensor)

  def asarray(self, x, dtype=None):
    if not isinstance(x, self.t.Tensor):
      x = self.t.as_tensor(np.array(x))  # a copy: read-only NumPy views warn
    return x if dtype is None else x.to(self.dtype(dtype))

  def labels(self, x):
    x = x if isinstance(x, self.t.Tensor) else self.t.as_tensor(np.array(x))
    return x if x.is_floating_point() else x.to(self.t.int64)

  def float_dtype(self, x):
    return x.dtype

  def moveaxis(self, x, source: int, destination: int):
    return self.t.movedim(x, source, destination)

  def take_last(self, a, index):
    return self.t.gather(a, -1, index.to(self.t.int64)[..., None])[..., 0]

  def gather(self, vector, index):
    return vector[index.to(self.t.int64)]

  def where(self, cond, a, b):
    if not isinstance(a, self.t.Tensor):
      a = self.t.as_tensor(a, dtype=b.dtype)
    if not isinstance(b, self.t.Tensor):
      b = self.t.as_tensor(b, dtype=a.dtype)
    return self.t.where(cond, a, b)

  def max_nograd(self, x):
    return self.t.amax(x.detach(), dim=-1, keepdim=True)

  def sum(self, x, axis=None, keepdims=False):
    return x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims)

  def argmax(self, x):
    return self.t.argmax(x, dim=-1)

  def ones_bool(self, shape):
    return self.t.ones(tuple(shape), dtype=self.t.bool)

  def broadcast_to(self, x, shape):
    return self.t.broadcast_to(x, tuple(shape))

  def relu(self, x):
    return self.t.relu(x)

  def count(self, mask, like):
    return self.t.clamp_min(mask.sum(), 1).to(like.dtype)

  def ndim(self, x) -> int:
    return x.ndim

  def __getattr__(self, name: str):
    return getattr(self.t, name)


def namespace(x: Any):
  """The operations for ``x``'s framework: torch for tensors, jax.numpy for JAX arrays and
  tracers, NumPy for everything else."""
  module = type(x).__module__
  if module.startswith("torch"):
    return TorchOps()
  if module.startswith(("jax", "jaxlib")):
    import jax
    import jax.numpy as jnp
    return NumpyLike(jnp, jax.lax.stop_gradient)
  return NumpyLike(np)
