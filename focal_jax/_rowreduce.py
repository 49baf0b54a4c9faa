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
import numpy as np


def _class_iota(dtype, shape):
  return lax.broadcasted_iota(dtype, shape, len(shape) - 1)


def _merge_softmax(a, b):
  """Merges (max, sum of exp(z - max) over non-targets, target logit) triples."""
  m1, s1, t1 = a
  m2, s2, t2 = b
  m = jnp.maximum(m1, m2)  # NaN propagates
  # exp(m_i - m) with m_i = m = -inf would be NaN: the side at the max is scaled by exactly 1.
  f1 = jnp.where(m1 == m, 1.0, jnp.exp(m1 - m))
  f2 = jnp.where(m2 == m, 1.0, jnp.exp(m2 - m))
  return m, s1 * f1 + s2 * f2, t1 + t2


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def softmax_stats(z: jax.Array, t: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row `(m, s_rest, z_t)` of `z` (class axis last), `t` the target classes.

  In `dtype` (`z` is converted inside the reduction): `m = max_c z_c` (NaN if a logit is NaN,
  -inf if none is finite, +inf if one is +inf), `s_rest = sum_{c != t} exp(z_c - m)`
  accumulated against the running max (no cancellation as the target's probability -> 1; where
  `m` is not finite, the number of non-target logits equal to it), and `z_t = z[t]`. One read
  of `z`. `m` is not differentiated (a stop_gradient, as the shift of a logsumexp).
  """
  zc = z.astype(dtype)
  is_t = _class_iota(t.dtype, z.shape) == t[..., None]
  zero = jnp.zeros((), dtype)
  ops = (zc, jnp.where(is_t, zero, jnp.ones((), dtype)), jnp.where(is_t, zc, zero))
  inits = (jnp.array(-jnp.inf, dtype), zero, zero)
  return tuple(lax.reduce(ops, inits, _merge_softmax, (z.ndim - 1,)))


@softmax_stats.defjvp
def _softmax_stats_jvp(dtype, primals, tangents):
  z, t = primals
  dz, _ = tangents
  out = softmax_stats(z, t, dtype)
  m = out[0]
  zc = z.astype(dtype)
  dzc = dz.astype(dtype)
  is_t = _class_iota(t.dtype, z.shape) == t[..., None]
  m_fin = jnp.isfinite(m)
  e = jnp.where(is_t, 0.0, jnp.exp(zc - jnp.where(m_fin, m, 0.0)[..., None]))
  # A non-finite max: s_rest counts logits, it has no derivative.
  tans = (jnp.zeros_like(m), jnp.where(m_fin, jnp.sum(e * dzc, axis=-1), 0.0),
          jnp.sum(jnp.where(is_t, dzc, 0.0), axis=-1))
  return out, tans


def _merge_top(a, b):
  """Merges (max, its first index, sum of exp(z - max) over every other element) triples."""
  m1, i1, s1 = a
  m2, i2, s2 = b
  # The larger max wins; a tie goes to the smaller index (the first one, as jnp.argmax).
  take1 = (m1 > m2) | ((m1 == m2) & (i1 < i2))
  m = jnp.where(take1, m1, m2)
  i = jnp.where(take1, i1, i2)
  # The loser's max joins the rest: its mass relative to the new max is (s_lose + 1) times
  # exp(m_lose - m). A loser at -inf (the identity, or a -inf logit) adds exactly 0.
  m_lose = jnp.where(take1, m2, m1)
  s_win = jnp.where(take1, s1, s2)
  s_lose = jnp.where(take1, s2, s1)
  scale = jnp.where(m_lose == -jnp.inf, 0.0, jnp.exp(m_lose - m))
  m = jnp.where(jnp.isnan(m1) | jnp.isnan(m2), jnp.nan, m)  # NaN propagates
  return m, i, s_win + (s_lose + 1.0) * scale


def _top_reduce(z):
  idx = _class_iota(jnp.int32, z.shape)
  init = (jnp.array(-jnp.inf, z.dtype), jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32),
          jnp.array(0, z.dtype))
  return lax.reduce((z, idx, jnp.zeros_like(z)), init, _merge_top, (z.ndim - 1,))


@jax.custom_jvp
def top_stats(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row `(m, top, s_rest)` of `z` (class axis last, floating), one read of `z`.

  `top` is the index of the largest logit (the first one on ties, as `jnp.argmax`), `m = z[top]`
  (NaN if a logit is NaN, -inf if none is finite) and `s_rest = sum_{c != top} exp(z_c - m)`
  (0 where `m` is not finite). `m` is differentiated (`dm = dz[top]`): `exp(z_top - m) = 1`
  identically, also in derivatives.
  """
  m, top, s = _top_reduce(z)
  return m, top, jnp.where(jnp.isfinite(m), s, 0.0)


@top_stats.defjvp
def _top_stats_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  m, top, s_rest = top_stats(z)
  is_top = _class_iota(top.dtype, z.shape) == top[..., None]
  dm = jnp.sum(jnp.where(is_top, dz, 0.0), axis=-1)
  m_fin = jnp.isfinite(m)
  e = jnp.where(is_top, 0.0, jnp.exp(z - jnp.where(m_fin, m, 0.0)[..., None]))
  ds = jnp.where(m_fin, jnp.sum(e * (dz - dm[..., None]), axis=-1), 0.0)
  return (m, top, s_rest), (dm, np.zeros(top.shape, jax.dtypes.float0), ds)
