"""Reductions of per-entry losses, and the cross-device convention.

This is the one place where `reduction` and `axis_name` are interpreted; every loss in
focal_jax calls :func:`reduce_loss`.

Convention with `axis_name` (pmap, shard_map): the denominators (count of valid entries, count
of positive entries) are summed over the named axis with `lax.psum` under `lax.stop_gradient`,
and each shard returns ``n * local_sum / global_denominator`` with ``n`` the axis size. The
usual data-parallel recipe -- average the value and the gradients over the axis with
`lax.pmean` -- then gives exactly the single-device value and gradient on the whole batch.
For ``"sum"`` the denominator is 1 (so `pmean` gives the global sum). ``"none"`` ignores
`axis_name`. A denominator of 0 is taken as 1: an empty or all-masked batch gives 0, never NaN.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _axis_size(axis_name: Any) -> Any:
  if hasattr(lax, "axis_size"):
    return lax.axis_size(axis_name)
  return lax.psum(1, axis_name)  # older jax: the size of a named axis


def _count(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  # Counted in integers: exact beyond float32's 2**24.
  if mask is None:
    size = 1
    for d in shape:
      size *= d
    return jnp.asarray(size, dtype=jnp.int32)
  return jnp.sum(mask, dtype=jnp.int32)


def reduce_loss(
    loss: jax.Array,
    *,
    valid: jax.Array | None,
    positive: jax.Array | None,
    reduction: str,
    axis_name: Any,
    dtype: Any,
) -> jax.Array:
  """Reduces per-entry losses.

  Args:
    loss: per-entry losses in the compute dtype, already 0 where `valid` is False.
    valid: boolean mask of the entries that count (None: all of them), shape of `loss`.
    positive: boolean mask of the valid positive entries, for ``"mean_positive"``.
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"`` (already checked).
    axis_name: None, or the named axis (or tuple of axes) to reduce the denominators over.
    dtype: the dtype of the result (the input logits' dtype).

  Returns:
    ``loss`` itself for ``"none"``, else a scalar; cast to ``dtype``.
  """
  if reduction == "none":
    return loss.astype(dtype)
  total = jnp.sum(loss)
  if reduction == "sum":
    denominator = None
  elif reduction == "mean":
    denominator = _count(valid, loss.shape)
  elif reduction == "mean_positive":
    denominator = _count(positive, loss.shape)
  else:  # unreachable: callers check `reduction` first
    raise ValueError(f"unknown reduction {reduction!r}")
  if axis_name is not None:
    total = total * _axis_size(axis_name)
    if denominator is not None:
      denominator = lax.psum(lax.stop_gradient(denominator), axis_name)
  if denominator is not None:
    # A denominator of 0 (nothing valid, or no positive) is taken as 1: the result is 0.
    denominator = jnp.maximum(denominator, 1).astype(total.dtype)
    total = total / denominator
  return total.astype(dtype)
