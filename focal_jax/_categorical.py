"""Categorical focal loss: softmax with probability targets, per-class focal terms.

The quantities and their names are docs/math.md's ("Categorical", its "Names" table: `z`, `y`,
`top`, `m`, `s_rest`, `log_s`, `s`, `log_1m_s`, `focal`, `coef`, `r`, `w`, `w_sum`, `w_rest`,
`valid`), and so is the reason for the `custom_jvp` ("Why a `custom_jvp` in JAX and an
`autograd.Function` in torch"). The one-pass row statistics are the engine module
`_rowreduce`'s; the remat of the derivatives sits below a marked boundary. On TPU and CUDA the
logits' gradient of whole 2-D rows is one Pallas kernel, `_categorical_kernel`'s (see there,
`CategoricalOptions.kernel` and `_kernel_total`, which hands it a scalar cotangent under a
reduction).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from focal_jax import _categorical_kernel
from focal_jax import _checks
from focal_jax import _numerics
from focal_jax import _reduce
from focal_jax import _rowreduce

# Stands in for log(1 - s) = -inf at the top class of a row without any other mass: finite,
# so that exp(0 * it) = 1 (gamma = 0) and 0 * it = 0 stay well defined.
_NO_REST_LOG = -1e30


@dataclasses.dataclass(frozen=True)
class CategoricalOptions:
  """The checked settings of one categorical focal loss call that are not arrays, passed whole
  to `_focal_rows` (a nondiff argument of its custom_jvp) and to the checkpointed tangent (a
  static argument): frozen and hashable.

  Attributes:
    split: the `_rowreduce.ClassSplit` of `class_axis_name` (this member holds a slice of the
      classes), or None.
    cpu: the CPU form (`lax.platform_dependent(cpu=...)` branches only): the row statistics
      in two passes above `_ONE_PASS_CLASSES` classes (`_two_pass_top_stats`), `1 - s` for
      `exp(log(1 - s))` and, with `whole_gamma`, `(1 - s)**gamma` as products (`_elems`).
      The same numbers up to rounding.
    whole_gamma: `gamma` where it is a scalar whole number known at trace time (0 to
      `_MAX_WHOLE_GAMMA`), else None. Used by the CPU form only.
    kernel: the logits' tangent term of whole 2-D rows through `_categorical_kernel`'s
      primitives, whose transpose (the gradient) is a Pallas kernel: "auto" on TPU (Mosaic)
      and CUDA (Triton) where that platform's kernel plan fits
      (`lax.platform_dependent(tpu=..., cuda=...)`), "tpu-interpret" / "gpu-interpret" on
      every platform with that kernel in Pallas' interpret mode (the tests), "off" never.
    masked: whether `where` masks rows (else every row counts, and the kernels read no mask).
  """
  split: _rowreduce.ClassSplit | None = None
  cpu: bool = False
  whole_gamma: int | None = None
  kernel: str = "auto"
  masked: bool = True


class _Rows(NamedTuple):
  """Per-row scalars (shape `z.shape[:-1]`)."""
  top: jax.Array  # index of the largest logit
  m: jax.Array  # the largest logit (finite)
  s_rest: jax.Array  # sum of exp(z_c - m) over c != top
  loss: jax.Array
  w_sum: jax.Array  # sum_c w_c
  w_rest: jax.Array  # sum_{c != top} w_c


class _Elems(NamedTuple):
  log_s: jax.Array  # log softmax
  log_1m_s: jax.Array  # log(1 - softmax)
  focal: jax.Array  # (1 - s)**gamma
  s: jax.Array
  w: jax.Array  # alpha y (1 - s)**gamma (1 + gamma s r), r = -log s / (1 - s)
  log_s_fin: jax.Array  # log_s, 0 where s = 0 exactly (a logit of -inf)
  no_mass: jax.Array  # s = 0 exactly
  one_m_s: jax.Array | None = None  # 1 - s (the CPU form only)


def _class_index(dtype, shape):
  return lax.broadcasted_iota(dtype, shape, len(shape) - 1)


def _is_top(top, shape, split):
  """Where the (global) class index equals the row's top class; `split`: this member's slice."""
  classes = _class_index(top.dtype, shape)
  if split is not None:
    classes = classes + split.first().astype(top.dtype)
  return classes == top[..., None]


def _elems(z, y, alpha, gamma, top, m, s_rest, options: CategoricalOptions) -> _Elems:
  """Elementwise terms from the per-row max and non-top mass; differentiable jnp ops only.

  `options.cpu`: the CPU form, with fewer transcendental functions (each several times the
  cost of a multiply on XLA:CPU, and the terms are recomputed in the backward): `s` from the
  row statistics' own `exp(z - m)`, `1 - s` itself where the default form takes
  `exp(log(1 - s))`, `r` by a division for `exp(-log(1 - s))`, and with
  `options.whole_gamma` `(1 - s)**gamma` as products.
  """
  split, cpu = options.split, options.cpu
  z = z.astype(alpha.dtype)
  is_top = _is_top(top, z.shape, split)
  has_rest = s_rest > 0.0
  s_rest_safe = jnp.where(has_rest, s_rest, 1.0)
  log_norm = jnp.log1p(s_rest)  # log sum_c exp(z_c - m); exp(z_top - m) = 1 exactly
  log_s = z - m[..., None] - log_norm[..., None]
  if cpu:
    # exp(z - m), the very term of the row statistics' sum (_two_pass_top_stats), which XLA
    # then computes once in the forward, over 1 + s_rest (= exp(log_norm)).
    s = jnp.exp(z - m[..., None]) / (1.0 + s_rest)[..., None]
  else:
    s = jnp.exp(log_s)
  # A logit of -inf: s = 0 exactly, log s = -inf. Where needed below it is replaced by 0 (the
  # terms it enters are 0 there: s log s, y log s with y = 0), keeping 0 * inf out.
  no_mass = log_s == -jnp.inf
  log_s_fin = jnp.where(no_mass, 0.0, log_s)
  # log(1 - s): log1p(-s) where s <= 1/2 (every class but the top one); at the top class the
  # non-top mass over the total, log(s_rest) - log(1 + s_rest), exact as s -> 1. Double wheres
  # keep log1p(-1) and log(0) out of the unselected branches (no NaN in derivatives).
  s_not_top = jnp.where(is_top, 0.0, s)
  log_1m_s_top = jnp.where(has_rest, jnp.log(s_rest_safe) - log_norm, _NO_REST_LOG)
  log_1m_s = jnp.where(is_top, log_1m_s_top[..., None], jnp.log1p(-s_not_top))
  one_m_s = None
  if cpu:
    # 1 - s: off the top class s <= 1/2 and 1 - s is exact to rounding; at the top class
    # s_rest / (1 + s_rest) = s_rest * s there (exp(z_top - m) = 1), 0 without other mass.
    # r = -log s / (1 - s) from it at every class (at the top class -log s = log_norm), 1 at
    # a top class without other mass (the double where keeps 0 / 0 out of derivatives).
    # No per-row divisions: XLA would write each to memory for the backward.
    one_m_s = jnp.where(is_top, s_rest[..., None] * s, 1.0 - s)
    has_den = one_m_s > 0.0
    r = jnp.where(has_den, -log_s_fin / jnp.where(has_den, one_m_s, 1.0), 1.0)
  else:
    # r = -log s / (1 - s) -> 1 as s -> 1: at the top class log1p(s_rest) (1 + s_rest) / s_rest.
    r_top = jnp.where(has_rest, log_norm * (1.0 + s_rest_safe) / s_rest_safe, 1.0)
    r = jnp.where(is_top, r_top[..., None],
                  -log_s_fin * jnp.exp(-jnp.where(is_top, 0.0, log_1m_s)))
  if cpu and options.whole_gamma is not None:
    # A whole gamma: (1 - s)**gamma as products of 1 - s, no log1p and exp.
    focal = lax.integer_pow(one_m_s, options.whole_gamma)
  else:
    # (1 - s)**gamma as exp(gamma * log(1 - s)): finite with finite derivatives for gamma < 1.
    focal = jnp.exp(gamma * log_1m_s)
  w = alpha * y * focal * (1.0 + gamma * s * r)
  return _Elems(log_s, log_1m_s, focal, s, w, log_s_fin, no_mass, one_m_s)


def _y_log_s(coef, el: _Elems) -> jax.Array:
  """coef * log s, with 0 (not NaN) where coef = 0 and s = 0: a -inf logit without target mass
  is a masked class. coef > 0 at such a class gives +inf loss (its true value)."""
  at_no_mass = lax.stop_gradient(jnp.where(coef == 0.0, 0.0, coef * -jnp.inf))
  return jnp.where(el.no_mass, at_no_mass, coef * el.log_s_fin)


# The most classes at which the CPU form keeps the one-pass statistics: on rows this short
# XLA:CPU's three plain reductions cost more than the variadic one (crossover from 8 to 16).
_ONE_PASS_CLASSES = 8

# The top class of a row without one (a NaN logit): no class index equals it.
_NO_TOP = jnp.iinfo(jnp.int32).max


@jax.custom_jvp
def _two_pass_top_stats(z):
  """`_rowreduce.top_stats` (same values, same derivatives) as a max, the first class at it
  (a min of class indices) and a masked sum of `exp(z - m)`: the CPU form. XLA:CPU runs the
  one-pass (variadic) reduction as a scalar loop, several times the time of these three
  plain reductions. A row with a NaN logit has `m` NaN and no top class (`_NO_TOP`)."""
  m = jnp.max(z, axis=-1)  # NaN propagates
  if z.shape[-1] <= 1 << 24:
    # The class indices as float32 (exact to 2**24): XLA:CPU splits an int32 min into a
    # reduce-window and a reduce.
    first = jnp.min(jnp.where(z == m[..., None], _class_index(jnp.float32, z.shape), jnp.inf),
                    axis=-1)
    top = jnp.where(first == jnp.inf, _NO_TOP, first.astype(jnp.int32))
  else:
    top = jnp.min(jnp.where(z == m[..., None], _class_index(jnp.int32, z.shape), _NO_TOP),
                  axis=-1)
  fin = jnp.isfinite(m)
  e = jnp.where(_is_top(top, z.shape, None), 0.0,
                jnp.exp(z - jnp.where(fin, m, 0.0)[..., None]))
  return m, top, jnp.where(fin, jnp.sum(e, axis=-1), 0.0)


@_two_pass_top_stats.defjvp
def _two_pass_top_stats_jvp(primals, tangents):
  # The rule of `_rowreduce.top_stats`: dm = dz_top, ds = sum_{c != top} e_c (dz_c - dm).
  (z,), (dz,) = primals, tangents
  m, top, s_rest = _two_pass_top_stats(z)
  is_top = _is_top(top, z.shape, None)
  dm = jnp.sum(jnp.where(is_top, dz, 0.0), axis=-1)
  m_fin = jnp.isfinite(m)
  e = jnp.where(is_top, 0.0, jnp.exp(z - jnp.where(m_fin, m, 0.0)[..., None]))
  ds = jnp.where(m_fin, jnp.sum(e * (dz - dm[..., None]), axis=-1), 0.0)
  return (m, top, s_rest), (dm, jnp.zeros_like(top, dtype=jax.dtypes.float0), ds)


def _rows(z, y, alpha, gamma, valid, options: CategoricalOptions) -> _Rows:
  # Logits and targets stay in their dtype outside (converted inside the fusions); math in
  # the compute dtype.
  z = z.astype(alpha.dtype)
  # One read of z for the argmax, the max and the non-top mass (the CPU form above
  # _ONE_PASS_CLASSES: three reads, see _two_pass_top_stats). m = z_top itself, not a
  # stop_gradient copy: log(1 + s_rest) below relies on exp(z_top - m) = 1 identically, also
  # in the derivatives of this rule (Hessian).
  split = options.split
  if split is None:
    two_pass = options.cpu and z.shape[-1] > _ONE_PASS_CLASSES
    m, top, s_rest = (_two_pass_top_stats if two_pass else _rowreduce.top_stats)(z)
  else:  # whole rows' statistics from every member's slice; top is a global class
    m, top, s_rest = _rowreduce.split_top_stats(z, split)
  is_top = _is_top(top, z.shape, split)
  # A NaN logit (m is NaN) or no finite logit (m = -inf): no defined loss, NaN.
  undefined = jnp.isnan(m) | (m == -jnp.inf)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  el = _elems(z, y, alpha, gamma, top, m, s_rest, options)
  coef = alpha * y * el.focal
  loss = -jnp.sum(_y_log_s(coef, el), axis=-1)
  loss = jnp.where(undefined, jnp.nan, loss)
  w_sum = jnp.sum(el.w, axis=-1)
  w_rest = jnp.sum(jnp.where(is_top, 0.0, el.w), axis=-1)
  if split is not None:  # the sums over the classes of every member
    loss, w_sum, w_rest = (lax.psum(x, split.axis_name) for x in (loss, w_sum, w_rest))
  return _Rows(top, m, s_rest, jnp.where(valid, loss, 0.0), w_sum, w_rest)


def _z_grad(z, valid_c, rows, el: _Elems, one_m_s, split):
  """where(valid_c, dloss/dz, 0), (.., C) (`valid_c`: the row mask, (.., 1)): dloss/dz_j =
  s_j W - w_j = s_j (W - w_j) - (1 - s_j) w_j with W - w_top summed directly (no
  cancellation at the top class as s -> 1)."""
  is_top = _is_top(rows.top, z.shape, split)
  others = jnp.where(is_top, rows.w_rest[..., None], rows.w_sum[..., None] - el.w)
  grad = el.s * others - one_m_s * el.w
  return jnp.where(valid_c, grad, 0.0)


def masked_z_grad(z, y, alpha, gamma, valid, options: CategoricalOptions):
  """where(valid, dloss/dz, 0) of whole rows, (.., C) in the compute dtype, from the inputs
  (the row statistics recomputed): `_categorical_kernel`'s jnp form of its primitives."""
  rows = _rows(z, y, alpha, gamma, valid, options)
  # As `_dot_remat`'s prevent_cse: the (.., C) terms of the gradient are recomputed, not
  # shared with the row sums (XLA would write them to memory between the two passes).
  z, y, rows = lax.optimization_barrier((z, y, rows))
  el = _elems(z, y, alpha, gamma, rows.top, rows.m, rows.s_rest, options)
  one_m_s = el.one_m_s if options.cpu else jnp.exp(el.log_1m_s)
  return _z_grad(z, valid[..., None], rows, el, one_m_s, options.split)


# The kernel module's jnp formula (its lowering off TPU, its JVP rules): this one.
_categorical_kernel.use_jnp_grad(masked_z_grad)


def _dot(z, y, alpha, gamma, valid, rows, dz, dy, options: CategoricalOptions):
  """sum_c dloss/dz_c dz_c + dloss/dy_c dy_c, per row, from the logits and per-row scalars.

  With `options.split`, the sum over this member's slice of the classes only.
  """
  split = options.split
  el = _elems(z, y, alpha, gamma, rows.top, rows.m, rows.s_rest, options)
  one_m_s = el.one_m_s if options.cpu else jnp.exp(el.log_1m_s)
  start = jnp.zeros_like(rows.loss)
  # Masked rows: the (.., C) derivatives themselves are set to 0 (not just the output), so
  # that whatever their logits hold (even NaN), reverse mode gives them exactly 0.
  valid_c = valid[..., None]

  def dz_term(dz):
    grad = _z_grad(z, valid_c, rows, el, one_m_s, split)
    return jnp.sum(grad * dz.astype(grad.dtype), axis=-1)

  return _numerics.tangent_sum(
      rows.loss, (dz, dz_term),
      (dy, lambda d: jnp.sum(jnp.where(valid_c, -alpha * el.focal * el.log_s, 0.0) * d,
                             axis=-1)),
      start=start)


def _hyper_tangent(z, y, alpha, gamma, valid, rows, dalpha, dgamma, options):
  """sum_c dloss/dalpha_c dalpha_c + dloss/dgamma_c dgamma_c, per row (None: not given)."""
  el = _elems(z, y, alpha, gamma, rows.top, rows.m, rows.s_rest, options)
  per_class = jnp.where(valid[..., None], -_y_log_s(y * el.focal, el), 0.0)  # dloss/dalpha_c
  return _numerics.tangent_sum(
      rows.loss, (dalpha, lambda da: jnp.sum(per_class * da, axis=-1)),
      (dgamma, lambda dg: jnp.sum(alpha * per_class * el.log_1m_s * dg, axis=-1)),
      start=jnp.zeros_like(rows.loss))


# --- engine (JAX-specific: jax.checkpoint, the (.., C) derivatives recomputed in the backward;
# the CPU forward in blocks of rows)
# Reverse mode keeps the logits, targets and per-row scalars; the (.., C) gradient is
# recomputed in the backward pass from them. prevent_cse: shared with the forward's row sums,
# XLA would write those (.., C) terms to memory instead of recomputing them in the fusion.
_dot_remat = jax.checkpoint(_dot, prevent_cse=True, static_argnums=(8,))


# Entries per block of the CPU forward (see _blocked_rows).
_BLOCK = 1 << 16


def _slice_rows(start, size, *arrays):
  """Rows `[start, start + size)` of each array, for a loop over blocks of rows on the CPU.

  Optimization barriers keep XLA from converting a whole 16-bit input to float32 ahead of the
  loop and slicing that copy: the arrays cross the first one with the (loop-varying) start, so
  nothing derived from them is loop-invariant, and the slices cross the second one before any
  conversion to the compute dtype.
  """
  start, *arrays = lax.optimization_barrier((start, *arrays))
  return lax.optimization_barrier([None if a is None else
                                   lax.dynamic_slice_in_dim(a, start, size, axis=0)
                                   for a in arrays])


def _blocked_rows(z, y, alpha, gamma, valid, options: CategoricalOptions) -> _Rows:
  """`_rows` of whole rows, one block of rows at a time (the CPU form of the forward).

  XLA on CPU writes every (.., C) term shared by the forward's row sums to memory (about 5x
  the logits under `jit(value_and_grad)`); in a loop over blocks of `_BLOCK` entries those
  terms are a block's. Same values as `_rows` (the same code on each block), in its CPU form.
  """
  options = dataclasses.replace(options, cpu=True)
  num_classes = z.shape[-1]
  rows = math.prod(z.shape[:-1])
  per_block = max(1, _BLOCK // num_classes)
  if rows <= per_block:
    return _rows(z, y, alpha, gamma, valid, options)
  row_shape = z.shape[:-1]
  z2, y2 = z.reshape(rows, num_classes), y.reshape(rows, num_classes)
  valid2 = jnp.broadcast_to(valid, row_shape).reshape(rows)
  alpha2, gamma2 = (x.reshape((1,) * (x.ndim > 0) + x.shape[-1:]) for x in (alpha, gamma))

  def block_rows(start, size):
    zs, ys, vs = _slice_rows(start, size, z2, y2, valid2)
    return _rows(zs, ys, alpha2, gamma2, vs, options)

  blocks = rows // per_block
  shapes = jax.eval_shape(lambda: block_rows(0, per_block))
  refs = (z2, y2, valid2, alpha2, gamma2)
  init = _Rows(*(_numerics.zeros_varying((rows,), x.dtype, refs) for x in shapes))

  def body(i, acc):
    start = i * per_block
    return _Rows(*(lax.dynamic_update_slice_in_dim(a, b, start, axis=0)
                   for a, b in zip(acc, block_rows(start, per_block))))
  out = lax.fori_loop(0, blocks, body, init)
  if rows > blocks * per_block:
    start = blocks * per_block
    out = _Rows(*(lax.dynamic_update_slice_in_dim(a, b, start, axis=0)
                  for a, b in zip(out, block_rows(start, rows - start))))
  return _Rows(*(a.reshape(row_shape) for a in out))


# The loop is never differentiated: derivatives of the blocked rows (Hessians differentiate the
# rule of _focal_rows) are those of `_rows` (its CPU form) on the whole array.
_blocked_rows = jax.custom_jvp(_blocked_rows, nondiff_argnums=(5,))
_blocked_rows.defjvp(lambda options, primals, tangents: jax.jvp(
    functools.partial(_rows, options=dataclasses.replace(options, cpu=True)), primals,
    tangents))


def _blocked_dot(z, y, alpha, gamma, valid, dz, dy, options: CategoricalOptions):
  """`_dot` of whole rows, one block of rows at a time, the per-row scalars recomputed in each
  block (the CPU form of the tangent).

  Reverse mode keeps only the inputs: the loop body is under `jax.checkpoint` and slices the
  whole arrays itself, so its residuals are the logits, the targets and the block's index; the
  backward recomputes `_rows` and the (.., C) gradient one block at a time and writes that
  block of the gradient. `_dot_remat` keeps the six per-row scalars instead (3x float32 logits
  at C = 2), and its backward holds them all at once.
  """
  options = dataclasses.replace(options, cpu=True)
  num_classes = z.shape[-1]
  rows = math.prod(z.shape[:-1])
  per_block = max(1, _BLOCK // num_classes)
  row_shape = z.shape[:-1]
  flat = lambda a: None if a is None else a.reshape(rows, num_classes)
  z2, y2, dz2, dy2 = map(flat, (z, y, dz, dy))
  valid2 = jnp.broadcast_to(valid, row_shape).reshape(rows)
  alpha2, gamma2 = (x.reshape((1,) * (x.ndim > 0) + x.shape[-1:]) for x in (alpha, gamma))

  @functools.partial(jax.checkpoint, prevent_cse=True)
  def block_dot(start, z2, y2, valid2, dz2, dy2):
    block = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, start, per_block, 0)
    zs, ys, vs = _slice_rows(start, per_block, z2, y2, valid2)
    return _dot(zs, ys, alpha2, gamma2, vs, _rows(zs, ys, alpha2, gamma2, vs, options),
                block(dz2), block(dy2), options)

  # The last block ends at the last row and may overlap the one before: its rows are written
  # twice with the same values (and their cotangents are read once, by the last block).
  def body(i, acc):
    start = jnp.minimum(i * per_block, rows - per_block)
    tangent = block_dot(start, z2, y2, valid2, dz2, dy2)
    return lax.dynamic_update_slice_in_dim(acc, tangent, start, 0)

  like = jax.eval_shape(lambda: block_dot(0, z2, y2, valid2, dz2, dy2))
  init = _numerics.zeros_varying((rows,), like.dtype, (z2, y2, valid2, dz2, dy2, alpha2, gamma2))
  out = lax.fori_loop(0, -(-rows // per_block), body, init)
  return out.reshape(row_shape)


# The most classes for which the CPU tangent is blocked (_blocked_dot). Its six per-row
# scalars are what `_dot_remat` costs at few classes; from C = 91 on `_blocked_dot`'s block
# temporaries cost more (compiled temporaries of `jit(value_and_grad(mean loss))`, 2**22
# entries, over the logits: float32 C = 64 0.13x vs 0.14x, C = 91 0.12x vs 0.11x, C = 1000
# 0.10x vs 0.06x; bfloat16 C = 64 0.25x vs 0.32x, C = 256 0.20x vs 0.17x).
_BLOCKED_DOT_CLASSES = 64


def _total_block_rows(rows: int, num_classes: int) -> tuple[int, bool]:
  """Rows per block of `_blocked_total`, and whether they divide `rows`.

  The most rows in `_BLOCK` entries, or fewer (down to a quarter of them) where that divides
  `rows`: the tangent's blocks of `dz` and `dy` are then a view, whose cotangent the
  transposed loop writes block by block. Otherwise they are sliced from the whole tangent,
  and the transposed loop adds each block into the whole cotangent: in place for float32.
  For 16-bit cotangents XLA on CPU does either in float32 over the whole array, once a block
  (time, not memory; slicing about 5x slower than the view), hence few, large blocks.
  """
  per_block = max(1, _BLOCK // num_classes)
  for size in range(per_block, max(2, per_block // 4) - 1, -1):
    if rows % size == 0:
      return size, True
  return per_block, False


def _block_view(z, y, alpha, gamma, valid, weight):
  """The (rows, C) views of `z` and `y`, the (rows,) `valid` and `weight` (None stays None),
  `alpha` and `gamma` as (1, C) or scalars, rows per block and the number of blocks."""
  num_classes = z.shape[-1]
  rows = math.prod(z.shape[:-1])
  per_block = _total_block_rows(rows, num_classes)[0]
  flat_rows = lambda a: None if a is None else jnp.broadcast_to(a, z.shape[:-1]).reshape(rows)
  classes = lambda a: None if a is None else a.reshape((1,) * (a.ndim > 0) + a.shape[-1:])
  return ((z.reshape(rows, num_classes), y.reshape(rows, num_classes), flat_rows(valid),
           flat_rows(weight), classes(alpha), classes(gamma)), per_block, -(-rows // per_block))


def _block_start(i, per_block, rows):
  """The first row of block `i` (the last block ends at the last row: it may overlap the one
  before) and the mask of its rows that no block before it holds."""
  start = jnp.minimum(i * per_block, rows - per_block)
  return start, start + lax.iota(start.dtype, per_block) >= i * per_block


def _blocked_total(z, y, alpha, gamma, valid, weight, options: CategoricalOptions):
  """The sum over whole rows of `weight * loss` (`weight` None or per row), one block of rows
  at a time: the CPU form of a reduction, where neither the (N,) losses nor their (N,)
  cotangent need to exist (`_blocked_rows` and `_blocked_dot` hand them over whole: 1x
  float32 logits at C = 2). Rows that an overlapping last block shares with the one before
  count once (masked in the last block: 0 loss and exactly 0 derivatives). `_rows` in its
  CPU form."""
  options = dataclasses.replace(options, cpu=True)
  (z2, y2, valid2, weight2, alpha2, gamma2), per_block, blocks = _block_view(
      z, y, alpha, gamma, valid, weight)

  def body(i, acc):
    start, new = _block_start(i, per_block, z2.shape[0])
    zs, ys, vs, ws = _slice_rows(start, per_block, z2, y2, valid2, weight2)
    vs = vs & new
    loss = _rows(zs, ys, alpha2, gamma2, vs, options).loss
    return acc + jnp.sum(_checks.apply_sample_weight(loss, ws, vs))

  return lax.fori_loop(0, blocks, body, _numerics.zeros_varying(
      (), alpha.dtype, (z2, y2, valid2, weight2, alpha2, gamma2)))


def _blocked_total_jvp(options, primals, tangents):
  """The tangent of `_blocked_total`: a loop over the blocks whose body is checkpointed, so
  reverse mode keeps only the inputs and the block indices; the transposed loop recomputes a
  block's per-row scalars (`_rows`) and the rule of `_focal_rows_jvp` (`_dot`,
  `_hyper_tangent`) and writes its block of the gradient into the output.

  The primal inputs are sliced through `_slice_rows` (never transposed); the tangents `dz`,
  `dy` as a view of blocks or by plain slices (see `_total_block_rows`), whose transposes
  write one block.
  """
  z, y, alpha, gamma, valid, weight = primals
  dz, dy, dalpha, dgamma = map(_numerics.given, tangents[:4])  # valid, weight: constants
  out = _blocked_total(z, y, alpha, gamma, valid, weight, options)
  options = dataclasses.replace(options, cpu=True)
  if dz is None and dy is None and dalpha is None and dgamma is None:
    return out, jnp.zeros_like(out)
  (z2, y2, valid2, weight2, alpha2, gamma2), per_block, blocks = _block_view(
      z, y, alpha, gamma, valid, weight)
  dz2, dy2 = (None if d is None else d.reshape(z2.shape) for d in (dz, dy))
  dalpha2, dgamma2 = (None if d is None else d.reshape(a.shape)
                      for d, a in ((dalpha, alpha2), (dgamma, gamma2)))

  @functools.partial(jax.checkpoint, prevent_cse=True)
  def block_tangent(i, z2, y2, valid2, weight2, alpha2, gamma2, dzs, dys, dalpha2, dgamma2):
    start, new = _block_start(i, per_block, z2.shape[0])
    zs, ys, vs, ws = _slice_rows(start, per_block, z2, y2, valid2, weight2)
    vs = vs & new
    rows = _rows(zs, ys, alpha2, gamma2, vs, options)
    tangent = _numerics.tangent_sum(
        rows.loss,
        ((dzs, dys), lambda d: _dot(zs, ys, alpha2, gamma2, vs, rows, *d, options)),
        ((dalpha2, dgamma2),
         lambda d: _hyper_tangent(zs, ys, alpha2, gamma2, vs, rows, *d, options)))
    return jnp.sum(_checks.apply_sample_weight(tangent, ws, vs))

  primal = (z2, y2, valid2, weight2, alpha2, gamma2)
  zero = _numerics.zeros_varying((), out.dtype, (primal, dz2, dy2, dalpha2, dgamma2))
  if blocks * per_block == z2.shape[0]:  # dz and dy as (blocks, rows, C) views
    blocked = lambda d: None if d is None else d.reshape(blocks, per_block, d.shape[-1])
    tangent, _ = lax.scan(
        lambda acc, x: (acc + block_tangent(x[0], *primal, *x[1:], dalpha2, dgamma2), None),
        zero, (jnp.arange(blocks), blocked(dz2), blocked(dy2)))
  else:  # an overlapping last block: dz and dy sliced (the rows of _block_start)
    def body(i, acc):
      start = _block_start(i, per_block, z2.shape[0])[0]
      block = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, start, per_block, 0)
      return acc + block_tangent(i, *primal, block(dz2), block(dy2), dalpha2, dgamma2)
    tangent = lax.fori_loop(0, blocks, body, zero)
  return out, tangent


_blocked_total = jax.custom_jvp(_blocked_total, nondiff_argnums=(6,))
_blocked_total.defjvp(_blocked_total_jvp, symbolic_zeros=True)


def _zy_tangent(z, y, alpha, gamma, valid, rows, dz, dy, options: CategoricalOptions):
  """The tangent in the logits and targets: `_dot_remat`, its CPU form on the CPU; for whole
  rows larger than a block, `_blocked_dot` on the CPU (`rows` unused there)."""
  per_block = max(1, _BLOCK // z.shape[-1])
  if options.split is not None:
    return _dot_remat(z, y, alpha, gamma, valid, rows, dz, dy, options)
  interpret = _INTERPRET.get(options.kernel)
  if interpret is not None and _kernel_fits(z, alpha, gamma, interpret):
    return _kernel_tangent(z, y, alpha, gamma, valid, rows, dz, dy, options)
  kernels = {platform: lambda *a: _kernel_tangent(*a, options)
             for platform in _kernel_platforms(z, alpha, gamma, options)}
  if math.prod(z.shape[:-1]) <= per_block or z.shape[-1] > _BLOCKED_DOT_CLASSES:
    return lax.platform_dependent(
        z, y, alpha, gamma, valid, rows, dz, dy,
        cpu=lambda *a: _dot_remat(*a, dataclasses.replace(options, cpu=True)),
        default=lambda *a: _dot_remat(*a, options), **kernels)
  return lax.platform_dependent(
      z, y, alpha, gamma, valid, rows, dz, dy,
      cpu=lambda z, y, a, g, v, rows, dz, dy: _blocked_dot(z, y, a, g, v, dz, dy, options),
      default=lambda *a: _dot_remat(*a, options), **kernels)


# Set to "0" to keep the TPU / GPU kernel out (read when the loss is traced): the escape
# hatches for a chip where Mosaic or Triton misbehaves; the gradient then takes XLA's fusions
# (on TPU 6x the logits' HBM traffic at C >= 1000 instead of 3x; the same values).
TPU_KERNEL_ENV = "FOCAL_JAX_TPU_KERNEL"
GPU_KERNEL_ENV = "FOCAL_JAX_GPU_KERNEL"
# CategoricalOptions.kernel's interpret modes: the kernel each runs.
_INTERPRET = {"tpu-interpret": "tpu", "gpu-interpret": "gpu"}


def _kernel_fits(z, alpha, gamma, kernel: str) -> bool:
  """Whether `kernel`'s ("tpu", "gpu") plan takes these logits in interpret mode."""
  if kernel == "gpu":
    return _categorical_kernel.gpu_plan(z.shape, alpha.dtype, interpret=True) is not None
  per_class = alpha.size > 1 or gamma.size > 1
  return _categorical_kernel.plan(z.shape, z.dtype, alpha.dtype, per_class,
                                  interpret=True) is not None


def _kernel_platforms(z, alpha, gamma, options: CategoricalOptions) -> tuple[str, ...]:
  """The platforms whose compiled kernel takes the logits' tangent term of these whole 2-D rows
  (`CategoricalOptions.kernel` "auto", the platform's plan fits, its variable not "0"; on CUDA
  not where the GPU form is chosen, `_gpu_form_fits`)."""
  if options.kernel != "auto" or options.split is not None:
    return ()
  platforms = []
  if (os.environ.get(TPU_KERNEL_ENV, "1") != "0" and _categorical_kernel.plan(
      z.shape, z.dtype, alpha.dtype, alpha.size > 1 or gamma.size > 1) is not None):
    platforms.append("tpu")
  if (os.environ.get(GPU_KERNEL_ENV, "1") != "0" and not _gpu_form_fits(z.shape[-1])
      and _categorical_kernel.gpu_plan(z.shape, alpha.dtype) is not None):
    platforms.append("cuda")
  return tuple(platforms)


def _kernel_tangent(z, y, alpha, gamma, valid, rows, dz, dy, options: CategoricalOptions,
                    total: bool = False):
  """`_dot_remat`'s tangent with the logits' term `_categorical_kernel.row_dot_grad` (whose
  transpose, the gradient under reverse mode, is the kernel); the targets' term as before.
  `total`: the sum over the rows (the logits' term `total_dot_grad`, whose transpose hands the
  kernel a scalar cotangent)."""
  terms = []
  if dz is not None:
    dot = _categorical_kernel.total_dot_grad if total else _categorical_kernel.row_dot_grad
    terms.append(dot(dz, z, y, alpha, gamma, valid, options=options,
                     interpret=_INTERPRET.get(options.kernel)))
  if dy is not None:
    term = _dot_remat(z, y, alpha, gamma, valid, rows, None, dy, options)
    terms.append(jnp.sum(term) if total else term)
  return functools.reduce(lambda a, b: a + b, terms)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _kernel_total(z, y, alpha, gamma, valid, options: CategoricalOptions):
  """The sum of the per-row losses of whole 2-D rows where a kernel takes the gradient: its
  logits' tangent is `total_dot_grad`, so that under `jax.grad` of a reduced loss the kernel
  gets the cotangent as one scalar, not as a per-row vector written for it (at C = 2 that
  vector alone is half the float32 logits' bytes)."""
  return jnp.sum(_rows(z, y, alpha, gamma, valid, options).loss)


def _kernel_total_jvp(options, primals, tangents):
  z, y, alpha, gamma, valid = primals
  dz, dy, dalpha, dgamma, _ = tangents
  rows = _rows(z, y, alpha, gamma, valid, options)
  total = jnp.sum(rows.loss)
  tangent = _numerics.tangent_sum(
      total,
      ((dz, dy), lambda d: _kernel_tangent(z, y, alpha, gamma, valid, rows, *d, options,
                                           total=True)),
      ((dalpha, dgamma),
       lambda d: jnp.sum(_hyper_tangent(z, y, alpha, gamma, valid, rows, *d, options))))
  return total, tangent


_kernel_total.defjvp(_kernel_total_jvp, symbolic_zeros=True)


def _reduced_total(z, y, alpha, gamma, valid, weight, where, options: CategoricalOptions):
  """The sum of the weighted per-row losses of whole rows for a reduction, where a form other
  than the per-row losses' sum computes it, else None: `_kernel_total` where a kernel takes
  the gradient and no sample weight applies (the kernel's platforms; everywhere in interpret
  mode), `_blocked_total` on the CPU (`_total_blocked`)."""
  kernels = () if weight is not None else _kernel_platforms(z, alpha, gamma, options)
  interpret = _INTERPRET.get(options.kernel)
  if weight is None and interpret is not None and _kernel_fits(z, alpha, gamma, interpret):
    return _kernel_total(z, y, alpha, gamma, valid, options)
  blocked = _total_blocked(z.shape)
  if not kernels and not blocked:
    return None
  rows_sum = lambda: jnp.sum(_checks.apply_sample_weight(
      _platform_rows(z, y, alpha, gamma, valid, options), weight, where))
  return lax.platform_dependent(
      cpu=(lambda: _blocked_total(z, y, alpha, gamma, valid, weight, options)) if blocked
      else rows_sum,
      default=rows_sum,
      **{platform: lambda: _kernel_total(z, y, alpha, gamma, valid, options)
         for platform in kernels})


def _any_rows(z, y, alpha, gamma, valid, options: CategoricalOptions) -> _Rows:
  """`_rows`; for whole rows, in blocks on the CPU (`_blocked_rows`)."""
  if options.split is not None:
    return _rows(z, y, alpha, gamma, valid, options)
  return lax.platform_dependent(z, y, alpha, gamma, valid,
                                cpu=lambda *a: _blocked_rows(*a, options),
                                default=lambda *a: _rows(*a, options))
# --- end of engine -----------------------------------------------------------------------


# A custom_jvp (not custom_vjp) so that jax.hessian (forward over reverse) works; the rule is
# the closed form gradient in log space, finite where autodiff of (1 - s)**gamma is NaN.
@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _focal_rows(z, y, alpha, gamma, valid, options: CategoricalOptions):
  return _any_rows(z, y, alpha, gamma, valid, options).loss


def _focal_rows_jvp(options, primals, tangents):
  z, y, alpha, gamma, valid = primals
  dz, dy, dalpha, dgamma, _ = tangents
  split = options.split
  rows = _any_rows(z, y, alpha, gamma, valid, options)

  def hyper_term(d):  # d = (dalpha, dgamma), None for a symbolic zero
    return _hyper_tangent(z, y, alpha, gamma, valid, rows, *d, options)

  if all(isinstance(d, SymbolicZero) for d in (dz, dy, dalpha, dgamma)):
    return rows.loss, jnp.zeros_like(rows.loss)
  tangent = _numerics.tangent_sum(
      rows.loss, ((dz, dy), lambda d: _zy_tangent(z, y, alpha, gamma, valid, rows, *d, options)),
      ((dalpha, dgamma), hyper_term))
  if split is not None:
    # Every term is a sum over this member's classes: the whole rows' tangent sums them over
    # the members (reverse mode transposes the psum into handing each member the cotangent).
    tangent = lax.psum(tangent, split.axis_name)
  return rows.loss, tangent


_focal_rows.defjvp(_focal_rows_jvp, symbolic_zeros=True)


# --- engine (XLA:GPU-specific): the GPU form ----------------------------------------------
# The same closed forms, written so that XLA:GPU can compile the whole step into
# one Triton normalization fusion per block of rows (one read of the logits and targets, one
# write of the gradient). Its row statistics are plain max / sum reductions (the variadic
# reduce of `top_stats` has no Triton lowering), the row max is used once (`x = z - m`, the
# seed of the fusion), and the gradient rule is not under `jax.checkpoint`: the forward and the
# backward are one fusion, so there is nothing to rematerialize. Where XLA does not build that
# one fusion, the (.., C) terms go through memory (more than the default form), so the form is
# used only at class counts where it was measured to fuse (`_gpu_form_fits`).


class _GpuParts(NamedTuple):
  el: _Elems
  is_top: jax.Array  # the unique largest class of the row (no class on ties)
  bad: jax.Array  # the row max is not finite (a NaN, +inf, or no finite logit)


def _gpu_parts(z, y, alpha, gamma) -> _GpuParts:
  """Elementwise terms from `x = z - max(z)`, with the class at the max counted, not indexed.

  With `k` classes at the max, `s_rest = sum_{x_c < 0} exp(x_c) + (k - 1)` exactly. A unique
  max (`k = 1`) is the top class of docs/math.md, with its exact `log(1 - s)`. On ties every
  class has `s <= 1/2` and the plain formulas are exact: no class is treated as the top one.
  Derivatives (of the rule, for Hessians): the max's own rule spreads `dm` evenly over the
  tied classes, which makes `m + log1p(s_rest)` the log-sum-exp to first order whatever `k`;
  at a unique max `dm = dz_top`, so `x_top = 0` identically, as the top formulas assume.
  """
  z = z.astype(alpha.dtype)
  x = z - jnp.max(z, axis=-1)[..., None]  # NaN for a row whose max is not finite
  at_max = x == 0.0
  count = jnp.sum(at_max.astype(x.dtype), axis=-1)
  s_rest = jnp.sum(jnp.where(at_max, 0.0, jnp.exp(x)), axis=-1) + (count - 1.0)
  bad = jnp.isnan(s_rest)
  is_top = at_max & (count == 1.0)[..., None]
  has_rest = s_rest > 0.0
  s_rest_safe = jnp.where(has_rest, s_rest, 1.0)
  log_norm = jnp.log1p(s_rest)
  log_s = x - log_norm[..., None]
  s = jnp.exp(log_s)
  no_mass = log_s == -jnp.inf
  log_s_fin = jnp.where(no_mass, 0.0, log_s)
  # As in _elems: log1p(-s) off the top class, log(s_rest) - log1p(s_rest) at it; double
  # wheres keep log1p(-1) and exp(1e30) out of the unselected branches.
  s_not_top = jnp.where(is_top, 0.0, s)
  log_1m_s_top = jnp.where(has_rest, jnp.log(s_rest_safe) - log_norm, _NO_REST_LOG)
  log_1m_s = jnp.where(is_top, log_1m_s_top[..., None], jnp.log1p(-s_not_top))
  focal = jnp.exp(gamma * log_1m_s)
  r_top = jnp.where(has_rest, log_norm * (1.0 + s_rest_safe) / s_rest_safe, 1.0)
  r = jnp.where(is_top, r_top[..., None],
                -log_s_fin * jnp.exp(-jnp.where(is_top, 0.0, log_1m_s)))
  w = alpha * y * focal * (1.0 + gamma * s * r)
  return _GpuParts(_Elems(log_s, log_1m_s, focal, s, w, log_s_fin, no_mass), is_top, bad)


def _gpu_loss(parts: _GpuParts, y, alpha, valid) -> jax.Array:
  loss = -jnp.sum(_y_log_s(alpha * y * parts.el.focal, parts.el), axis=-1)
  return jnp.where(valid, jnp.where(parts.bad, jnp.nan, loss), 0.0)


def gpu_focal_rows(z, y, alpha, gamma, valid, options: CategoricalOptions | None = None):
  """Per-row categorical focal losses, the GPU form (classes whole, class axis last).

  The same value and derivatives as `_focal_rows` (docs/math.md, "Categorical"), apart from
  a row without any finite logit, whose gradient is NaN here. Runs on every platform (the
  tests call it on the CPU); `categorical_focal` selects it for CUDA only. `options` is not
  used (the signature of `_platform_rows`, which this form can stand in for).
  """
  del options
  return _gpu_focal_rows(z, y, alpha, gamma, valid)


@jax.custom_jvp
def _gpu_focal_rows(z, y, alpha, gamma, valid):
  return _gpu_loss(_gpu_parts(z, y, alpha, gamma), y, alpha, valid)


def _gpu_focal_rows_jvp(primals, tangents):
  z, y, alpha, gamma, valid = primals
  dz, dy, dalpha, dgamma, _ = tangents
  parts = _gpu_parts(z, y, alpha, gamma)
  el = parts.el
  loss = _gpu_loss(parts, y, alpha, valid)
  tangent = jnp.zeros_like(loss)
  valid_c = valid[..., None]
  if not isinstance(dz, SymbolicZero):
    # dloss/dz_j = s_j W - w_j; at the top class s (W - w_top) - (1 - s) w_top, with
    # W - w_top summed directly (no cancellation as s -> 1).
    w_sum = jnp.sum(el.w, axis=-1)[..., None]
    w_rest = jnp.sum(jnp.where(parts.is_top, 0.0, el.w), axis=-1)[..., None]
    grad = jnp.where(parts.is_top, el.s * w_rest - jnp.exp(el.log_1m_s) * el.w,
                     el.s * w_sum - el.w)
    tangent = tangent + jnp.sum(jnp.where(valid_c, grad, 0.0) * dz.astype(grad.dtype), axis=-1)
  if not isinstance(dy, SymbolicZero):
    tangent = tangent + jnp.sum(jnp.where(valid_c, -alpha * el.focal * el.log_s, 0.0) * dy,
                                axis=-1)
  if not (isinstance(dalpha, SymbolicZero) and isinstance(dgamma, SymbolicZero)):
    per_class = jnp.where(valid_c, -_y_log_s(y * el.focal, el), 0.0)  # dloss/dalpha_c
    if not isinstance(dalpha, SymbolicZero):
      tangent = tangent + jnp.sum(per_class * dalpha, axis=-1)
    if not isinstance(dgamma, SymbolicZero):
      tangent = tangent + jnp.sum(alpha * per_class * el.log_1m_s * dgamma, axis=-1)
  return loss, tangent


_gpu_focal_rows.defjvp(_gpu_focal_rows_jvp, symbolic_zeros=True)


def _gpu_form_fits(num_classes: int) -> bool:
  """Whether to use the GPU form on CUDA at this class count: at none, for now.

  Compiled for the H100 without a device (jaxlib 0.10.2, `focal-bench aot`'s recipe), one
  `jit(grad(mean loss))` step of the GPU form is a single Triton fusion at 3.0x the logits
  (the floor; optax's probability cross-entropy is 3.0x too, the default form 8x to 37x) in
  141 of 196 compiles (C = 2 to 32768, N = 1024 to 65536, float32 and bfloat16). In the
  others, scattered without a pattern in N or C below C = 8192 (C = 91 fuses at N = 4096 and
  not at 1024 or 16384; C = 512 at N = 16384 not in float32) and at most N from C = 12000
  on (C = 30522 never), XLA's priority fusion declines to fuse the row terms into their
  several consumers and writes them to memory: 6x to 36x, up to twice the default form. The
  outcome is not known at trace time, so the default form stays.
  """
  del num_classes
  return False


# The largest gamma that the CPU form takes as a whole number (CategoricalOptions.whole_gamma).
_MAX_WHOLE_GAMMA = 8


def _whole_gamma(gamma: Any) -> int | None:
  """`gamma` as an int where it is a scalar whole number from 0 to `_MAX_WHOLE_GAMMA` known at
  trace time (a Python number, a NumPy or a concrete jax scalar), else None."""
  values = _checks._concrete_values(gamma)
  if values is None or values.ndim != 0 or not np.issubdtype(values.dtype, np.number):
    return None
  value = float(values)
  return int(value) if value.is_integer() and 0 <= value <= _MAX_WHOLE_GAMMA else None


def _total_blocked(shape) -> bool:
  """Whether a reduction of whole rows of `shape` is summed in blocks on the CPU
  (`_blocked_total`): more than one block of rows, at most `_BLOCKED_DOT_CLASSES` classes.
  Beyond, the (N,) losses and their cotangent cost 2 / C float32 entries per logit, and the
  per-row form's backward (one fused pass, no loop) is the faster, in 16-bit much so."""
  rows = math.prod(shape[:-1])
  return (shape[-1] <= _BLOCKED_DOT_CLASSES
          and rows > _total_block_rows(rows, shape[-1])[0])


def _platform_rows(z, y, alpha, gamma, valid, options: CategoricalOptions):
  """Per-row losses of whole rows: the GPU form on CUDA where it fits, else `_focal_rows`."""
  if not _gpu_form_fits(z.shape[-1]):
    return _focal_rows(z, y, alpha, gamma, valid, options)
  return lax.platform_dependent(z, y, alpha, gamma, valid, cuda=gpu_focal_rows,
                                default=lambda *a: _focal_rows(*a, options))
# --- end of engine -----------------------------------------------------------------------


def categorical_focal(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike | None = None,
    gamma: jax.typing.ArrayLike = 2.0,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
    background_class: int = 0,
    axis_name: Any = None,
    sample_weight: jax.typing.ArrayLike | None = None,
    class_axis_name: Any = None,
) -> jax.Array:
  r"""Categorical focal loss: softmax focal loss with probability targets.

  With :math:`s = \mathrm{softmax}(z)` over the class axis and targets :math:`y` (one-hot,
  smoothed one-hot, mixup or distillation probabilities):

  .. math::
    \ell = -\sum_c \alpha_c\, y_c\, (1 - s_c)^{\gamma_c} \log s_c

  (keras ``CategoricalFocalCrossentropy``). With one-hot targets it equals
  :func:`softmax_focal`. To train with smoothed targets, smooth them first, e.g.
  ``optax.smooth_labels(jax.nn.one_hot(labels, C), eps)`` (each class then carries its own
  focal factor; ``softmax_focal(label_smoothing=eps)`` instead keeps the focal factor of the
  true class). The gradient with respect to the logits and the targets is in closed form and
  in log space (finite at any margin and any ``gamma >= 0``); reverse mode keeps the logits,
  the targets and per-row scalars.

  Args:
    logits: floating-point logits, class axis at ``axis``.
    targets: probabilities, same shape as ``logits`` (not checked to sum to 1).
    alpha: None (no weighting), a scalar, or a ``(C,)`` vector of class weights, finite and
      ``>= 0`` (a list, tuple or NumPy array is fine).
    gamma: focusing exponent, a finite scalar ``>= 0`` or a ``(C,)`` vector (one per class).
    axis: the class axis.
    where: optional boolean mask, shape of ``logits`` without ``axis`` (or broadcastable to
      it); False rows give 0 loss and 0 gradient and are left out of every denominator.
    reduction: ``"none"`` (shape of ``logits`` without ``axis``), ``"sum"``, ``"mean"`` (over
      valid rows) or ``"mean_positive"`` (sum over valid rows divided by the number of valid
      rows whose ``argmax(targets)`` is not ``background_class``). A denominator of 0 is
      taken as 1.
    background_class: the class that ``"mean_positive"`` does not count as positive.
    axis_name: optional named axis (pmap, shard_map): denominators are summed over it and
      each shard returns ``n * local_sum / global_denominator`` (see ``softmax_focal``).
    sample_weight: optional non-negative per-row weights, a scalar or an array broadcastable
      to the shape of ``logits`` without ``axis``. Each row's loss and gradient are
      multiplied by its weight before the reduction; denominators are unchanged. Never
      differentiated; masked rows stay exactly 0.
    class_axis_name: optional named axis (``shard_map``) over which the classes are split:
      member ``r`` of ``k`` holds the contiguous slice ``[r * C / k, (r + 1) * C / k)`` of the
      classes, i.e. ``logits`` and ``targets`` are its slices of the class axis (both with
      ``in_specs`` ``P(..., "model")``); a ``(C,)`` ``alpha`` or ``gamma`` is the whole
      vector, the same on every member (``where`` and ``sample_weight`` are per row, not
      split). Only per-row statistics cross the axis (``pmax`` of the row max, ``pmin`` of
      the top class, ``psum`` of the rescaled non-top mass and of the per-row sums of the loss
      and of the gradient weights; for ``"mean_positive"`` the targets' argmax, a ``pmax``
      and a ``pmin``). Every member returns the loss of the whole rows, and ``jax.grad``
      gives each member the gradient of its own slice (``check_vma=True``, shard_map's
      default; see ``softmax_focal``). Combines with ``axis_name`` on a 2-D (data x class)
      mesh.

  A logit of ``-inf`` on a class without target mass is a masked class (the loss of the
  remaining classes, 0 gradient there; e.g. ``log 2`` for logits ``[-inf, 0, 0]`` and targets
  ``[0, .5, .5]`` at ``gamma=0``); target mass on a ``-inf`` logit gives ``+inf`` with a
  finite gradient. An unmasked row with a NaN logit, or with no finite logit, gives NaN.

  Returns:
    The losses in the dtype of ``logits``: shape of ``logits`` without ``axis`` for
    ``reduction="none"``, else a scalar.

  Raises:
    TypeError: ``logits`` or ``targets`` not floating point; ``sample_weight`` not numeric; a
      keyword of the wrong type.
    ValueError: ``logits`` with no class (``C = 0``); ``targets``, ``where`` or
      ``sample_weight`` of the wrong shape; ``gamma`` or ``alpha`` negative, not finite, or not
      scalar or ``(C,)``; ``sample_weight`` negative or not finite; an unknown ``reduction``;
      ``axis`` out of range. All raised at trace time (values only when known).

  Examples:
    >>> import jax.numpy as jnp
    >>> import focal_jax
    >>> jnp.set_printoptions(precision=4)
    >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    >>> targets = jnp.array([[0.9, 0.05, 0.05], [0.0, 0.2, 0.8]])
    >>> print(focal_jax.categorical_focal(logits, targets, gamma=2.0))
    [0.2343 1.1744]

  References:
    Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_,
    ICCV 2017.
  """
  fn = "categorical_focal"
  logits = _checks.floating_array(fn, "logits", logits)
  targets = _checks.floating_array(fn, "targets", targets)
  ax = _checks.axis(fn, axis, logits.ndim)
  _checks.same_shape(fn, "targets", targets.shape, logits.shape, "the shape of logits")
  reduction = _checks.reduction(fn, reduction)
  background_class = _checks.optional_int(fn, "background_class", background_class,
                                          allow_none=False)
  num_classes = _checks.num_classes(
      fn, "logits", logits.shape[ax], f"C = 0 (shape {logits.shape}, class axis {ax})")
  row_shape = logits.shape[:ax] + logits.shape[ax + 1:]
  what_rows = f"the shape of logits {logits.shape} without axis {ax}"
  where = _checks.where_mask(fn, where, row_shape, what_rows)
  dtype = logits.dtype
  cdtype = _checks.compute_dtype(dtype)
  weight = _checks.sample_weight(fn, sample_weight, row_shape, cdtype, what_rows)
  per_class = " (one per class)"
  split = _checks.class_split(fn, class_axis_name, axis_name, num_classes)
  if split is not None:  # alpha and gamma are the whole (C,) vectors
    for arg, value in (("alpha", alpha), ("gamma", gamma)):
      _checks.split_class_vector(fn, arg, value, split, "classes of logits")
    num_classes = split.num_classes
  alpha = _checks.class_param(fn, "alpha", 1.0 if alpha is None else alpha, num_classes,
                              cdtype, nonnegative=True, what_classes=per_class)
  options = CategoricalOptions(split=split, whole_gamma=_whole_gamma(gamma),
                               masked=where is not None)
  gamma = _checks.class_param(fn, "gamma", gamma, num_classes, cdtype, nonnegative=True,
                              what_classes=per_class)
  if split is not None:  # this member's entries of the class vectors
    alpha, gamma = (x if x.ndim == 0 else lax.dynamic_slice_in_dim(x, split.first(), split.local)
                    for x in (alpha, gamma))
  # (C,) vectors act on the (last) class axis, at the rank of the logits.
  alpha = jnp.reshape(alpha, (1,) * (logits.ndim - 1) + alpha.shape) if alpha.ndim else alpha
  gamma = jnp.reshape(gamma, (1,) * (logits.ndim - 1) + gamma.shape) if gamma.ndim else gamma

  z = jnp.moveaxis(logits, ax, -1)  # cast to the compute dtype inside, see _rows
  y = jnp.moveaxis(targets, ax, -1)
  # Narrower targets (bf16 ...) stay in their dtype, promoted inside the fusions: never a copy
  # in the compute dtype in memory. Wider ones are brought down to it.
  if jnp.promote_types(y.dtype, cdtype) != cdtype:
    y = y.astype(cdtype)
  valid = jnp.ones(row_shape, bool) if where is None else where
  total = None
  if split is None and reduction != "none":
    # The sum of the weighted losses from a loop over blocks of rows on the CPU, or a form
    # whose gradient kernel takes a scalar cotangent (`_reduced_total`).
    total = _reduced_total(z, y, alpha, gamma, valid, weight, where, options)
  if total is not None:
    loss = jax.ShapeDtypeStruct(row_shape, cdtype)  # the sum is `total`
  elif split is None:
    loss = _checks.apply_sample_weight(_platform_rows(z, y, alpha, gamma, valid, options), weight,
                                       where)
  else:
    loss = _checks.apply_sample_weight(
        _focal_rows(z, y, alpha, gamma, valid, options), weight, where)
  if split is None:
    positive = valid & _checks.not_equal(jnp.argmax(y, axis=-1), background_class)
  elif reduction == "mean_positive":  # the whole rows' argmax (two (rows,) collectives)
    positive = valid & _checks.not_equal(_rowreduce.split_argmax(y, split), background_class)
  else:
    positive = None
  return _reduce.reduce_loss(loss, valid=where, positive=positive, reduction=reduction,
                             axis_name=axis_name, dtype=dtype, total=total)
