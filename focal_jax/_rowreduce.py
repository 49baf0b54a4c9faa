"""One-pass row statistics of the softmax losses: a single variadic `lax.reduce` per row.

A max pass followed by a pass summing `exp(z - max)` reads the logits twice; carrying
(max, sum of exp(z - max)) pairs through one reduction and rescaling a partial sum whenever the
max grows (the "online softmax" merge) reads them once. The conversion of bfloat16 / float16
logits to the compute dtype then happens inside that one fusion, never as a copy in memory.

`lax.reduce` with a custom reducer has no derivative rule, so each reduction here is a
`jax.custom_jvp` whose tangent is written in differentiable jnp ops (`jax.hessian` goes through
it; `jax.grad` of the losses never does, their own rules keep only per-row scalars).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _class_iota(dtype, shape):
  return lax.broadcasted_iota(dtype, shape, len(shape) - 1)


def _merge_softmax(a, b):
  """Merges (max, sum of exp(z - max) over non-targets, target logit[, sum of z]) tuples."""
  m1, s1, t1, *r1 = a
  m2, s2, t2, *r2 = b
  m = jnp.maximum(m1, m2)  # NaN propagates
  # exp(m_i - m) with m_i = m = -inf would be NaN: the side at the max is scaled by exactly 1.
  f1 = jnp.where(m1 == m, 1.0, jnp.exp(m1 - m))
  f2 = jnp.where(m2 == m, 1.0, jnp.exp(m2 - m))
  return (m, s1 * f1 + s2 * f2, t1 + t2, *[x + y for x, y in zip(r1, r2)])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def softmax_stats(z: jax.Array, t: jax.Array, dtype, with_sum: bool) -> tuple[jax.Array, ...]:
  """Per-row `(m, s_rest, z_t)` (and `sum_c z_c` if `with_sum`) of `z`, class axis last.

  In `dtype` (`z` is converted inside the reduction): `m = max_c z_c` (NaN if a logit is NaN,
  -inf if none is finite, +inf if one is +inf), `s_rest = sum_{c != t} exp(z_c - m)`
  accumulated against the running max (no cancellation as the target's probability -> 1; where
  `m` is not finite, the number of non-target logits equal to it), and `z_t = z[t]`. One read
  of `z`. `m` is not differentiated (a stop_gradient, as the shift of a logsumexp).
  """
  zc = z.astype(dtype)
  is_t = _class_iota(t.dtype, z.shape) == t[..., None]
  zero = jnp.zeros((), dtype)
  ops = [zc, jnp.where(is_t, zero, jnp.ones((), dtype)), jnp.where(is_t, zc, zero)]
  inits = [jnp.array(-jnp.inf, dtype), zero, zero]
  if with_sum:
    ops.append(zc)
    inits.append(zero)
  return tuple(lax.reduce(tuple(ops), tuple(inits), _merge_softmax, (z.ndim - 1,)))


@softmax_stats.defjvp
def _softmax_stats_jvp(dtype, with_sum, primals, tangents):
  z, t = primals
  dz, _ = tangents
  out = softmax_stats(z, t, dtype, with_sum)
  m = out[0]
  zc = z.astype(dtype)
  dzc = dz.astype(dtype)
  is_t = _class_iota(t.dtype, z.shape) == t[..., None]
  m_fin = jnp.isfinite(m)
  e = jnp.where(is_t, 0.0, jnp.exp(zc - jnp.where(m_fin, m, 0.0)[..., None]))
  # A non-finite max: s_rest counts logits, it has no derivative.
  tans = [jnp.zeros_like(m), jnp.where(m_fin, jnp.sum(e * dzc, axis=-1), 0.0),
          jnp.sum(jnp.where(is_t, dzc, 0.0), axis=-1)]
  if with_sum:
    tans.append(jnp.sum(dzc, axis=-1))
  return out, tuple(tans)
