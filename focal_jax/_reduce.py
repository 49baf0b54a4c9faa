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

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _axis_size(axis_name: Any) -> Any:
  if hasattr(lax, "axis_size"):
    return lax.axis_size(axis_name)
  return lax.psum(1, axis_name)  # older jax: the size of a named axis


# Masks of at most this many entries are counted in one int32 sum; bigger ones block by block.
_BLOCK = 1 << 30


def _count(mask: jax.Array | None, shape: tuple[int, ...], *, wide: bool | None = None
           ) -> jax.Array:
  """The number of True entries of `mask` (all of `shape` when None), never wrapped.

  int64 when `wide` (default: when jax_enable_x64 is on). Otherwise exact in int32 below 2**31
  entries, and beyond that int32 counts of blocks of 2**30 entries whose sum is taken exactly
  (in two 15-bit halves) and returned as a float32 (one final rounding, no wrap).
  """
  if wide is None:
    wide = bool(jax.config.jax_enable_x64)
  size = math.prod(shape)
  if mask is None:  # a static count: a constant of a dtype that holds it
    if wide:
      return jnp.asarray(size, jnp.int64)
    return jnp.asarray(size, jnp.int32) if size < 2**31 else jnp.asarray(float(size), jnp.float32)
  if size < 2**31:
    # Rows first, in int32 (exact below 2**31), then the row counts: XLA simplifies a row
    # sum of a broadcast mask ((N, 1) `where` against (N, C) entries) to a product, where a
    # sum over every entry at once would write the converted mask, (N, C) integers, to memory.
    rows = mask if mask.ndim < 2 else jnp.sum(mask, axis=-1, dtype=jnp.int32)
    return jnp.sum(rows, dtype=jnp.int64 if wide else jnp.int32)
  if wide:
    return jnp.sum(mask, dtype=jnp.int64)
  flat = mask.reshape(-1)
  blocks = size // _BLOCK
  head = flat[:blocks * _BLOCK].reshape(blocks, _BLOCK)
  partial = jnp.sum(head, axis=1, dtype=jnp.int32)  # each <= 2**30
  tail = jnp.sum(flat[blocks * _BLOCK:], dtype=jnp.int32)
  # Each partial = hi * 2**15 + lo with hi, lo < 2**16: both sums stay far below 2**31 for
  # any array that fits in memory (fewer than 2**15 blocks).
  hi = jnp.sum(partial >> 15) + (tail >> 15)
  lo = jnp.sum(partial & 0x7FFF) + (tail & 0x7FFF)
  return hi.astype(jnp.float32) * 32768.0 + lo.astype(jnp.float32)


def _global_count(count: jax.Array, axis_name: Any) -> jax.Array:
  """Sum of the per-device counts over `axis_name`, never wrapped."""
  count = lax.stop_gradient(count)
  if count.dtype == jnp.int32:  # may exceed 2**31 once summed: sum as float32
    count = count.astype(jnp.float32)
  return lax.psum(count, axis_name)


def reduce_loss(
    loss: jax.Array,
    *,
    valid: jax.Array | None,
    positive: jax.Array | None,
    reduction: str,
    axis_name: Any,
    dtype: Any,
    total: jax.Array | None = None,
) -> jax.Array:
  """Reduces per-entry losses.

  Args:
    loss: per-entry losses in the compute dtype, already 0 where `valid` is False.
    valid: boolean mask of the entries that count (None: all of them), shape of `loss`.
    positive: boolean mask of the valid positive entries, for ``"mean_positive"``.
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"`` (already checked).
    axis_name: None, or the named axis (or tuple of axes) to reduce the denominators over.
    dtype: the dtype of the result (the input logits' dtype).
    total: optional ``sum(loss)`` already computed by the caller (a sum written to fuse with
      its producers); ``loss`` then only gives the shape. Ignored for ``"none"``.

  Returns:
    ``loss`` itself for ``"none"``, else a scalar; cast to ``dtype``.
  """
  if reduction == "none":
    return loss.astype(dtype)
  total = jnp.sum(loss) if total is None else total
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
      denominator = _global_count(denominator, axis_name)
  if denominator is not None:
    # A denominator of 0 (nothing valid, or no positive) is taken as 1: the result is 0.
    denominator = jnp.maximum(denominator, 1).astype(total.dtype)
    total = total / denominator
  return total.astype(dtype)
