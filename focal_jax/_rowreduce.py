"""One-pass row statistics of the softmax losses: a single variadic `lax.reduce` per row.

Engine (JAX-specific): the whole module. It computes docs/math.md's per-row scalars, `m` (the
row max), `s_rest` (the mass outside the target, or outside the top class for the categorical
loss) and `z_t` ("Softmax" and "Categorical", their "Names" tables), that the loss modules
derive the rest from.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def _class_iota(dtype, shape):
  return lax.broadcasted_iota(dtype, shape, len(shape) - 1)


def _merge_softmax(lhs, rhs):
  """Merges (max, sum of exp(z - max) over non-targets, target logit) triples."""
  m1, s1, t1 = lhs
  m2, s2, t2 = rhs
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


def _merge_top(lhs, rhs):
  """Merges (max, its first index, sum of exp(z - max) over every other element) triples."""
  m1, i1, s1 = lhs
  m2, i2, s2 = rhs
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
  # zeros_like: a float0 tangent that keeps top's varying axes under shard_map.
  return (m, top, s_rest), (dm, jnp.zeros_like(top, dtype=jax.dtypes.float0), ds)


# ------------------------------------------------------------------------------------------
# Classes split over a named axis (class_axis_name): each member holds a contiguous slice of
# the classes and computes the statistics above on it; these combine the per-row partials of
# all members with (rows,)-sized collectives into the statistics of the whole row.


class ClassSplit(NamedTuple):
  """Static description of a split class axis: the axis, its size and the class counts."""
  axis_name: Any
  size: int  # members of the class axis
  local: int  # classes each member holds
  num_classes: int  # the whole class count, local * size

  def first(self) -> jax.Array:
    """The first (global) class of this member's slice (a traced int32)."""
    return lax.axis_index(self.axis_name).astype(jnp.int32) * self.local


def combine_softmax_stats(m, s_rest, z_t, z_sum, split: ClassSplit):
  """`softmax_stats` of whole rows from each member's partial `(m, s_rest, z_t)`.

  Each member's partial is `softmax_stats` of its slice with the target given as a local
  column (no column matches where another member holds the target). The merge is the one of
  the reduction itself, across members: `m` is the `pmax` of the partial maxima, `s_rest` the
  `psum` of each partial rescaled to it, `z_t` the `psum` of the owner's target logit (0
  elsewhere), and `z_sum` (the row sums of the logits, for label smoothing; None when not
  needed) a `psum`. Non-finite rows keep `softmax_stats`' conventions: `lax.pmax` does not
  propagate NaN, so a NaN partial maximum enters the rescaled sum as NaN (NaN on every member)
  and makes `m` NaN after it. `m` is not differentiated; `s_rest`, `z_t`, `z_sum` are (psum is
  linear).
  """
  m = lax.stop_gradient(m)
  m_all = lax.pmax(jnp.where(jnp.isnan(m), -jnp.inf, m), split.axis_name)
  # The side at the max is scaled by exactly 1 (also at m = +-inf); NaN stays NaN.
  scale = jnp.where(m == m_all, 1.0, jnp.exp(m - m_all))
  parts = (s_rest * scale, z_t) + (() if z_sum is None else (z_sum,))
  parts = lax.psum(parts, split.axis_name)
  s_rest, z_t = parts[0], parts[1]
  m_all = jnp.where(jnp.isnan(s_rest), jnp.nan, m_all)
  return m_all, s_rest, z_t, (None if z_sum is None else parts[2])


def to_varying(x: jax.Array, axis_name: Any) -> jax.Array:
  """`x` marked as varying over `axis_name` (shard_map's check_vma), where it is not already.

  A value the same on every member (e.g. a replicated `hidden`) that meets a member's own
  slice is broadcast to the members implicitly, and reverse mode sums the members' cotangents
  at that point. Marking it varying once, outside a loop, puts that one sum there too.
  """
  aval = jax.typeof(x)
  varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  if varying is None:
    varying = getattr(aval, "vma", frozenset())
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  missing = tuple(n for n in names if n not in varying)
  return lax.pcast(x, missing, to="varying") if missing else x


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _at_winner(m, m_all, winner, axis_name):
  """`m_all` (the row max over the members), differentiated as the winner's own max `m`."""
  del m, winner, axis_name
  return m_all


@_at_winner.defjvp
def _at_winner_jvp(axis_name, primals, tangents):
  m, m_all, winner = primals
  dm = tangents[0]
  return m_all, lax.psum(jnp.where(winner, dm, jnp.zeros_like(dm)), axis_name)


def split_top_stats(z: jax.Array, split: ClassSplit):
  """`top_stats` of whole rows whose classes are split over `split.axis_name`.

  `z` is this member's slice (class axis last). Returns `(m, top, s_rest)` with `top` a
  global class index (the first one on ties, across members as within one), `m` the row max,
  differentiated as `z[top]` (its tangent is a psum of the owner's), and
  `s_rest = sum_{c != top} exp(z_c - m)` over the whole row (0 where `m` is not finite), each
  member adding its own mass rescaled to `m` (plus its own max where it is not the top).
  Collectives: a pmax of the maxima, a pmin of the candidate top indices and a psum of the
  rescaled masses, all of shape (rows,).
  """
  m_loc, top_loc, s_loc = top_stats(z)
  first = split.first()
  m_sg = lax.stop_gradient(m_loc)
  nan = jnp.isnan(m_sg)
  m_all = lax.pmax(jnp.where(nan, -jnp.inf, m_sg), split.axis_name)
  big = jnp.iinfo(jnp.int32).max
  cand = jnp.where(m_sg == m_all, top_loc + first, big)
  top = lax.pmin(cand, split.axis_name)
  winner = cand == top
  m = _at_winner(m_loc, m_all, winner, split.axis_name)
  fin = jnp.isfinite(m_all)
  # Members other than the top's: their max joins the rest, (s + 1) exp(m_loc - m). Double
  # where: exp never sees a non-finite difference in the unselected branch.
  other = ~winner & fin & ~nan
  diff = jnp.where(other, m_loc - jnp.where(fin, m, 0.0), 0.0)
  mass = jnp.where(other, (s_loc + 1.0) * jnp.exp(diff), jnp.where(winner & fin, s_loc, 0.0))
  mass = jnp.where(nan, jnp.nan, mass)  # a NaN on any member: NaN on every member
  s_rest = lax.psum(mass, split.axis_name)
  undefined = jnp.isnan(s_rest)  # a NaN logit on some member: no defined loss
  m = jnp.where(undefined, jnp.nan, m)
  return m, top, jnp.where(jnp.isfinite(m), s_rest, 0.0)


def split_argmax(y: jax.Array, split: ClassSplit) -> jax.Array:
  """The global index of the largest entry of each row (the first one on ties; a NaN counts
  as +inf, where `jnp.argmax` ranks NaN above it), `y` this member's slice (class axis
  last). int32; a pmax and a pmin of shape (rows,)."""
  y = lax.stop_gradient(y)
  key = jnp.max(y, axis=-1)
  arg = jnp.argmax(y, axis=-1).astype(jnp.int32)
  key = jnp.where(jnp.isnan(key), jnp.inf, key)
  at_max = key == lax.pmax(key, split.axis_name)
  cand = jnp.where(at_max, arg + split.first(), jnp.iinfo(jnp.int32).max)
  return lax.pmin(cand, split.axis_name)
