"""Softmax focal loss for integer labels, with its analytic derivative.

The per-row quantities and their names are docs/math.md's ("Softmax", its "Names" table:
`u`, `log_p`, `log_q`, `focal`, `a`, `b`, `a_rest`, `undefined`, `valid`, `in_range`, `m`,
`s_rest`, `z_t`), and so is the reason for the `custom_jvp` ("Why a `custom_jvp` in JAX and
an `autograd.Function` in torch"). `focal_torch._softmax` derives the same quantities under
the same names. The one-pass row statistics (a variadic `lax.reduce`) are JAX engine work of
their own module, `_rowreduce`; the engine work of this one (the remat of the `(.., C)`
gradient) sits below its marked boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.extend.core

from focal_jax import _categorical
from focal_jax import _categorical_kernel
from focal_jax import _checks
from focal_jax import _numerics
from focal_jax import _reduce
from focal_jax import _rowreduce

# Stands in for an infinite margin when a row has no mass outside its target (one class, or
# every other logit -inf): finite, so that 0 * margin and exp(0 * log q) stay well defined.
_NO_REST_MARGIN = 1e30


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
  """The checked settings of one softmax focal loss call that are not arrays, passed whole to
  `focal_rows` (a nondiff argument of its custom_jvp) and to the checkpointed tangent (a
  static argument): frozen and hashable.

  Attributes:
    label_smoothing: `eps` in [0, 1].
    split: the `_rowreduce.ClassSplit` of `class_axis_name` (this member holds a slice of the
      classes), or None.
  """
  label_smoothing: float
  split: _rowreduce.ClassSplit | None = None


class RowStats(NamedTuple):
  """Per-row scalars of the softmax focal loss (all of shape `z.shape[:-1]`)."""
  loss: jax.Array  # alpha_t * (1 - p)**gamma_t * CE, 0 on masked rows, NaN on out-of-range labels
  a: jax.Array  # gradient = a * v + b * (onehot - 1/C), v = (s - onehot) / (1 - p)
  b: jax.Array
  m: jax.Array  # max logit (finite)
  a_rest: jax.Array  # a / sum_{c != t} exp(z_c - m) (0 where that sum is 0)
  dloss_dalpha: jax.Array  # (1 - p)**gamma * CE
  dloss_dgamma: jax.Array  # loss * log(1 - p)


def row_stats(z: jax.Array, t: jax.Array, alpha: jax.Array, gamma: jax.Array,
              valid: jax.Array, in_range: jax.Array, eps: float, *,
              one_pass: bool = False, split: _rowreduce.ClassSplit | None = None) -> RowStats:
  """`_row_stats`, with `one_pass` honoured on TPU and GPU only: XLA:CPU runs the one-pass
  (variadic) reduction as a slow scalar loop, several times the time of a max and a masked sum
  (BENCHMARKS.md, "CPU time of the one-pass row statistics"), so the CPU takes the two-pass
  form for 32- and 64-bit logits, the same numbers up to rounding. 16-bit logits keep the
  one-pass form everywhere: the two-pass form would copy them to float32 in memory."""
  args = (z, t, alpha, gamma, valid, in_range, eps)
  if not one_pass or split is not None or z.dtype.itemsize < 4:
    return _row_stats(*args, one_pass=one_pass, split=split)
  return lax.platform_dependent(
      cpu=lambda: _row_stats(*args, one_pass=False),
      default=lambda: _row_stats(*args, one_pass=True))


def _row_stats(z: jax.Array, t: jax.Array, alpha: jax.Array, gamma: jax.Array,
               valid: jax.Array, in_range: jax.Array, eps: float, *,
               one_pass: bool = False, split: _rowreduce.ClassSplit | None = None) -> RowStats:
  """Loss and gradient coefficients of each row of `z` (class axis last).

  `t` are in-range labels (out-of-range ones replaced by 0; `in_range` says which were not),
  `alpha` and `gamma` per-row values, `valid` the rows that count. Written in differentiable
  jnp ops (and the one-pass reduction, which has its own JVP): the custom JVP below, and its
  derivative (the Hessian), are built from this function. With `one_pass` the row max,
  non-target mass and target logit come from one read of `z` (`_rowreduce.softmax_stats`, what
  `softmax_focal` uses); otherwise from a max, a masked sum and a gather (as
  `linear_softmax_focal`'s scan over blocks of rows uses it), the same numbers up to rounding.
  With `split` (classes split over a named axis), `z` is this member's slice of the classes,
  `t` global labels: the one-pass statistics of the slice are combined over the axis
  (`_rowreduce.combine_softmax_stats`) and the rest is computed from the whole rows'.
  """
  # Inputs stay in their dtype (reverse mode keeps them as they came); math in alpha's dtype,
  # the compute dtype (float32 at least).
  # p = sigmoid(u) with u = z_t - logsumexp(non-target logits): log p and log(1 - p) are both
  # exact and finite at every margin (log(1 - p) from the non-target mass, never from 1 - p).
  # A NaN logit makes the max NaN, a row without a finite logit makes it -inf: such a row has
  # no defined loss (NaN, never hidden as a finite value). The max itself stays finite below.
  if split is not None:
    # This member's partial statistics (its slice's columns are classes first, first + 1, ..:
    # no column matches a target held elsewhere), combined into the whole rows'.
    m, s_rest, z_t = _rowreduce.softmax_stats(z, t - split.first(), alpha.dtype)
    z_sum = jnp.sum(z.astype(alpha.dtype), axis=-1) if eps > 0.0 else None
    m, s_rest, z_t, z_sum = _rowreduce.combine_softmax_stats(m, s_rest, z_t, z_sum, split)
    return stats_from_raw(m, s_rest, z_t, z_sum, alpha, gamma, valid, in_range, eps,
                          split.num_classes)
  if one_pass:
    # bfloat16 / float16 z is converted inside the reduction's fusion, never copied in memory.
    m, s_rest, z_t = _rowreduce.softmax_stats(z, t, alpha.dtype)
    undefined = jnp.isnan(m) | (m == -jnp.inf)
    # A non-finite max: s_rest as the two-pass form's against m = 0, up to a positive factor
    # (same loss and same NaN / zero pattern of the gradient). +inf: infinite when a non-target
    # logit is +inf, else u = +inf - log s_rest = +inf; NaN: positive (whole gradient row NaN)
    # when only the target is NaN; -inf: 0.
    s_rest = jnp.where(m == jnp.inf, jnp.where(s_rest > 0.0, jnp.inf, 1.0),
                       jnp.where(jnp.isfinite(m), s_rest, jnp.where(jnp.isnan(z_t), 1.0, 0.0)))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    z = z.astype(alpha.dtype)  # for the mean below (label smoothing) only
  else:
    z = z.astype(alpha.dtype)
    is_t = target_mask(t, z.shape)
    z_t = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
    m = lax.stop_gradient(jnp.max(z, axis=-1))
    undefined = jnp.isnan(m) | (m == -jnp.inf)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s_rest = jnp.sum(jnp.where(is_t, 0.0, jnp.exp(z - m[..., None])), axis=-1)
  return _finish(m, s_rest, z_t, undefined, lambda: jnp.mean(z, axis=-1), alpha, gamma,
                 valid, in_range, eps)


def _finish(m, s_rest, z_t, undefined, row_mean, alpha, gamma, valid, in_range,
            eps) -> RowStats:
  """The rest of `row_stats` from the row max `m` (finite), the non-target mass `s_rest`
  against it, the target logit, the rows without a defined loss (`undefined`) and
  `row_mean()`, the mean of the logits (called only with label smoothing)."""
  # No mass outside the target (one class, other logits -inf, or a margin beyond the dtype's
  # exp range): p = 1 exactly. Double where: log() never sees that 0, so no NaN in derivatives.
  has_rest = s_rest > 0.0
  s_rest_safe = jnp.where(has_rest, s_rest, 1.0)
  u = jnp.where(has_rest, z_t - m - jnp.log(s_rest_safe), _NO_REST_MARGIN)
  u = jnp.where(undefined, jnp.nan, u)
  log_p = jax.nn.log_sigmoid(u)
  log_q = jax.nn.log_sigmoid(-u)  # log(1 - p)
  p = jnp.exp(log_p)
  q = jnp.exp(log_q)
  if eps > 0.0:
    # logsumexp(z); from the non-target mass alone when the target logit is -inf (p = 0).
    lse = jnp.where(z_t == -jnp.inf, m + jnp.log(s_rest_safe), z_t - log_p)
    ce = -(1.0 - eps) * log_p + eps * (lse - row_mean())
  else:
    ce = -log_p
  # p * CE -> 0 as p -> 0 (a target logit of -inf: CE = inf); double where, no 0 * inf.
  p_ce = p * jnp.where(p > 0.0, ce, 0.0)
  # (1 - p)**gamma as exp(gamma * log(1 - p)): finite, with finite derivatives, for gamma < 1.
  focal = jnp.exp(gamma * log_q)
  # dloss/dz = alpha q**g [(1 + g p CE / q)(s - onehot) + eps (onehot - 1/C)], and
  # s - onehot = q * v with v the softmax of the non-target logits (and -1 at the target):
  # multiplying q in before dividing keeps every factor finite as q -> 0.
  a = alpha * focal * (q + gamma * p_ce)
  b = alpha * focal * eps
  dloss_dalpha = focal * ce
  loss = alpha * dloss_dalpha
  # loss * log(1 - p) -> 0 as p -> 0 (also when the loss is +inf there).
  dloss_dgamma = jnp.where(log_q == 0.0, 0.0, loss * log_q)

  def finish(x: jax.Array) -> jax.Array:
    # Masked rows: 0. Unmasked rows with an out-of-range label: NaN (never wrap around).
    return jnp.where(valid, jnp.where(in_range, x, jnp.nan), 0.0)

  a_rest = jnp.where(has_rest, a / s_rest_safe, 0.0)
  return RowStats(finish(loss), finish(a), finish(b), m, finish(a_rest), finish(dloss_dalpha),
                  finish(dloss_dgamma))


def stats_from_raw(m: jax.Array, s_rest: jax.Array, z_t: jax.Array, z_sum: jax.Array | None,
                   alpha: jax.Array, gamma: jax.Array, valid: jax.Array, in_range: jax.Array,
                   eps: float, num_classes: int) -> RowStats:
  """`row_stats` from the whole rows' `softmax_stats` (and row sums of the logits, eps > 0).

  For rows whose classes are split over members: the statistics combined across them.
  """
  undefined = jnp.isnan(m) | (m == -jnp.inf)
  # As row_stats' one-pass branch: a non-finite max, s_rest as the two-pass form's.
  s_rest = jnp.where(m == jnp.inf, jnp.where(s_rest > 0.0, jnp.inf, 1.0),
                     jnp.where(jnp.isfinite(m), s_rest, jnp.where(jnp.isnan(z_t), 1.0, 0.0)))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return _finish(m, s_rest, z_t, undefined, lambda: z_sum / num_classes, alpha, gamma, valid,
                 in_range, eps)


# Class ids up to this count are exact in float32 (`target_mask`).
_FLOAT_IOTA_CLASSES = 1 << 24


def target_mask(t: jax.Array, shape: tuple[int, ...], *, first_class: Any = 0,
                num_classes: int | None = None) -> jax.Array:
  """`class == t[..., None]` over the last axis of `shape`, whose first column is class
  `first_class` (a traced int is fine) of `num_classes` (default: the last axis).

  On the CPU compared as float32 (every class id is exact there) up to 2**24 classes: XLA:CPU
  compares an int32 class iota with a broadcast label in 64-bit vector lanes, which doubled
  the time of the masked exp pass (`exp(z - m)` with the target left out, the bulk of a step)
  at (16384, 91) on an Intel Xeon (AVX2); a float32 compare costs about nothing next to the
  exp. Elsewhere (and beyond 2**24 classes) an integer compare: compiled for TPU v5e, the
  float32 compare put the step's bytes at (65536, 2) at 18.0x the logits
  (`tests/test_aot.py`'s budget 17.87x; 17.52x measured with the integer compare).
  """
  if num_classes is None:
    num_classes = shape[-1]
  first = jnp.asarray(first_class)

  def as_int():
    classes = lax.broadcasted_iota(t.dtype, shape, len(shape) - 1)
    return classes + first.astype(t.dtype) == t[..., None]

  if num_classes > _FLOAT_IOTA_CLASSES:
    return as_int()

  def as_float():
    classes = lax.broadcasted_iota(jnp.float32, shape, len(shape) - 1)
    return classes + first.astype(jnp.float32) == t.astype(jnp.float32)[..., None]

  return lax.platform_dependent(cpu=as_float, default=as_int)


def grad_from_stats(z: jax.Array, t: jax.Array, st: RowStats, valid: jax.Array,
                    eps: float, *, first_class: Any = 0,
                    num_classes: int | None = None) -> jax.Array:
  """dloss/dz for each row: a * v + b * (onehot - 1/C), 0 on masked rows.

  v is -1 at the target and exp(z_c - m) / sum_{c' != t} exp(z_c' - m) elsewhere; exp(z - m)
  never overflows. One elementwise pass over z (fused with the cotangent under jit).
  `z` may be a block of columns: `first_class` (a traced int is fine) is the class of its first
  column and `num_classes` the whole class count C (default: z's last axis).
  """
  if num_classes is None:
    num_classes = z.shape[-1]
  z = z.astype(st.m.dtype)
  is_t = target_mask(t, z.shape, first_class=first_class, num_classes=num_classes)
  e_rest = jnp.where(is_t, 0.0, jnp.exp(z - st.m[..., None]))  # as in row_stats
  g = jnp.where(is_t, -st.a[..., None], e_rest * st.a_rest[..., None])
  if eps > 0.0:
    g = g + st.b[..., None] * (is_t.astype(z.dtype) - 1.0 / num_classes)
  return jnp.where(valid[..., None], g, 0.0)


# --- engine (JAX-specific: jax.checkpoint, the (.., C) gradient recomputed in the backward) ---


def _dot_grad(z, t, st, valid, dz, options: SoftmaxOptions):
  split = options.split
  if split is None:
    g = grad_from_stats(z, t, st, valid, options.label_smoothing)
  else:  # this member's slice of the classes
    g = grad_from_stats(z, t, st, valid, options.label_smoothing, first_class=split.first(),
                        num_classes=split.num_classes)
  return jnp.sum(g * dz.astype(st.m.dtype), axis=-1)


# Under jax.checkpoint the (.., C) gradient is not a residual of the linearization: reverse
# mode keeps the logits and the per-row scalars, and recomputes the gradient in the backward
# pass (XLA fuses it with the cotangent multiply under jit).
_dot_grad_remat = jax.checkpoint(_dot_grad, static_argnums=(5,), prevent_cse=False)

# --- The CPU form: forward and backward in blocks of rows -----------------------------------
# XLA on CPU writes every per-row scalar shared by the forward and the gradient to memory
# (about nine (N,) arrays: 4.6x the logits under jit(value_and_grad) at C = 2, 0.58x at
# C = 16), and the (N,) losses and prepared labels besides. Here both passes run over blocks
# of rows (lax.scan over the logits reshaped to (blocks, rows, C), a view): the forward sums
# (or writes) each block's losses; the tangent is a scan whose body is checkpointed, so reverse
# mode keeps only the inputs themselves (forwarded, not stacked) and the transposed scan
# recomputes each block's row statistics from its logits and labels and writes that block of
# the gradient into the output. The labels' masks, alpha[t] and gamma[t] are derived inside
# each block. Same values as the fused form (the same row_stats on each block).

# Entries per block (a few blocks' temporaries: a few MiB at most).
_BLOCK = 1 << 16
# Most classes of the blocked form: the per-row float32 vectors it keeps out of memory cost
# 4/C bytes per logit byte (fused, about 9/C float32 logits' size), so with more classes the
# fused form costs little memory and is faster. 16-bit logits pay one 16-bit copy in the blocked
# form (XLA on CPU copies for their uint16 bitcasts) and a slower loop: blocked only where
# the fused form's temporaries are several times the logits.
_BLOCKED_CLASSES = 16
_BLOCKED_CLASSES_16BIT = 4


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
  """Static settings of the blocked form (a nondiff argument of its custom_jvp)."""
  label_smoothing: float
  ignore_index: int | None
  background_class: int
  block_rows: int  # rows per block; divides the row count
  total: bool  # the sum of the weighted losses (else the per-row losses)


def _block_rows(rows: int, num_classes: int, itemsize: int) -> int | None:
  """Rows per block of the CPU form for `rows` rows of `num_classes` logits of `itemsize`
  bytes, or None.

  A divisor of `rows` (the blocks are a reshape of the logits, no copy) of at most `_BLOCK`
  entries; None (the fused form) for at most one block of rows, more than `_BLOCKED_CLASSES`
  classes (`_BLOCKED_CLASSES_16BIT` for 16-bit logits), or when `rows` has no divisor within
  64x of a block (a prime count of rows would make one-row blocks).
  """
  per_block = _BLOCK // num_classes
  most = _BLOCKED_CLASSES_16BIT if itemsize <= 2 else _BLOCKED_CLASSES
  if rows <= per_block or per_block < 16 or num_classes > most:
    return None
  for size in range(per_block, max(2, per_block // 64) - 1, -1):
    if rows % size == 0:
      return size
  return None


def _block_loss(z, labels, where, weight, alpha, gamma, spec: _BlockSpec):
  """One block's row statistics (`RowStats`) and weighted per-row losses."""
  num_classes = z.shape[-1]
  valid, in_range, t, _ = _checks.softmax_masks(labels, where, num_classes, spec.ignore_index,
                                                spec.background_class)
  alpha_t = jnp.broadcast_to(alpha, t.shape) if alpha.ndim == 0 else alpha[t]
  gamma_t = jnp.broadcast_to(gamma, t.shape) if gamma.ndim == 0 else gamma[t]
  # CPU only: the two-pass statistics (see row_stats).
  st = row_stats(z, t, alpha_t, gamma_t, valid, in_range, spec.label_smoothing)
  return st, t, valid, _checks.apply_sample_weight(st.loss, weight, valid)


def _as_blocks(a, spec: _BlockSpec):
  """(rows, ...) -> (blocks, block_rows, ...), a view; None stays None. bfloat16 as float16 bits
  (`_linear_bitcast`: XLA on CPU would otherwise hand the loop a float32 copy of the whole
  input; a float type, so forward mode over reverse differentiates through it)."""
  if a is None:
    return None
  if a.dtype == jnp.bfloat16:
    a = _linear_bitcast(a, jnp.float16)
  return a.reshape((a.shape[0] // spec.block_rows, spec.block_rows) + a.shape[1:])


def _from_bits(a, dtype):
  return a if a is None or a.dtype == dtype else _linear_bitcast(a, dtype)


# A bitcast between bfloat16 and float16 as a linear map whose transpose bitcasts back, so a
# bfloat16 tangent can enter the tangent scan as float16 bits: the transposed scan then stacks
# the gradient blocks as float16 (XLA on CPU converts a bfloat16 buffer that a loop updates to
# float32 whole, at every step; not a float16 one). A float type, so that forward mode (over
# reverse) carries tangents through it; the bits are only moved, never computed on. jax's
# linear_call would do, but has no batching rule.
_linear_bitcast_p = jax.extend.core.Primitive("focal_linear_bitcast")


def _bitcast_impl(a, *, dtype, src):
  del src
  return lax.bitcast_convert_type(a, dtype)


def _bitcast_jvp(primals, tangents, *, dtype, src):
  (a,), (da,) = primals, tangents
  out = _linear_bitcast_p.bind(a, dtype=dtype, src=src)
  if type(da) is ad.Zero:
    return out, ad.Zero.from_primal_value(out)
  return out, _linear_bitcast_p.bind(da, dtype=dtype, src=src)


def _bitcast_transpose(ct, a, *, dtype, src):
  del a
  if type(ct) is ad.Zero:
    return [None]
  return [_linear_bitcast_p.bind(ct, dtype=src, src=dtype)]


_linear_bitcast_p.def_impl(_bitcast_impl)
_linear_bitcast_p.def_abstract_eval(
    lambda a, *, dtype, src: jax.core.ShapedArray(a.shape, dtype))
mlir.register_lowering(_linear_bitcast_p, mlir.lower_fun(_bitcast_impl, multiple_results=False))
ad.primitive_jvps[_linear_bitcast_p] = _bitcast_jvp
ad.primitive_transposes[_linear_bitcast_p] = _bitcast_transpose
batching.defvectorized(_linear_bitcast_p)


def _linear_bitcast(a, dtype):
  """`a` bitcast to `dtype` (bfloat16 <-> float16), linear (`_linear_bitcast_p`)."""
  if a is None or a.dtype == dtype:
    return a
  return _linear_bitcast_p.bind(a, dtype=jnp.dtype(dtype), src=a.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _blocked_focal(z, labels, where, weight, alpha, gamma, spec: _BlockSpec):
  """Weighted per-row softmax focal losses of (rows, C) logits (their sum if `spec.total`),
  computed block by block. `alpha` (1 when None) and `gamma` are scalars or (C,) vectors;
  `where` and `weight` (rows,) or None."""
  dtypes = (z.dtype, weight.dtype if weight is not None else None)
  xs = tuple(_as_blocks(a, spec) for a in (z, labels, where, weight))

  def body(acc, x):
    zb, lb, wb, sw = x
    loss = _block_loss(_from_bits(zb, dtypes[0]), lb, wb, _from_bits(sw, dtypes[1]), alpha,
                       gamma, spec)[3]
    return (acc + jnp.sum(loss), None) if spec.total else (acc, loss)

  acc, losses = lax.scan(
      body, _numerics.zeros_varying((), alpha.dtype, (xs, alpha, gamma)), xs)
  return acc if spec.total else losses.reshape(-1)


def _block_tangent(z, labels, where, weight, alpha, gamma, dz, dalpha, dgamma,
                   spec: _BlockSpec, dtypes):
  """One block's tangent of the weighted per-row losses (linear in dz, dalpha, dgamma; None
  where not differentiated): the rule of `focal_rows`, from this block's row statistics.
  `z` and `weight` may come as their bits (`dtypes`: theirs)."""
  z, weight = _from_bits(z, dtypes[0]), _from_bits(weight, dtypes[1])
  st, t, valid, _ = _block_loss(z, labels, where, weight, alpha, gamma, spec)
  per_row = lambda d: d if d.ndim == 0 else d[t]
  tangent = _numerics.tangent_sum(
      st.loss,
      (dz, lambda dz: jnp.sum(grad_from_stats(z, t, st, valid, spec.label_smoothing)
                              * dz.astype(st.m.dtype), axis=-1)),
      (dalpha, lambda d: st.dloss_dalpha * per_row(d)),
      (dgamma, lambda d: st.dloss_dgamma * per_row(d)))
  tangent = _checks.apply_sample_weight(tangent, weight, valid)
  return jnp.sum(tangent) if spec.total else tangent


# Reverse mode keeps the block's inputs only; the transposed scan recomputes its statistics.
_block_tangent_remat = jax.checkpoint(_block_tangent, static_argnums=(9, 10),
                                      prevent_cse=True)


def _blocked_focal_jvp(spec, primals, tangents):
  z, labels, where, weight, alpha, gamma = primals
  dz, _, _, _, dalpha, dgamma = map(_numerics.given, tangents)
  out = _blocked_focal(z, labels, where, weight, alpha, gamma, spec)
  if dz is None and dalpha is None and dgamma is None:
    return out, jnp.zeros_like(out)
  dtypes = (z.dtype, weight.dtype if weight is not None else None)
  # The primal inputs as blocks; dz as blocks, bfloat16 as float16 bits through a linear
  # bitcast (`_linear_bitcast`), so the gradient is stacked as float16.
  dz_bits = None
  if dz is not None and dz.dtype == jnp.bfloat16:
    dz_bits = dz.dtype
    dz = _linear_bitcast(dz, jnp.float16)
  xs = tuple(_as_blocks(a, spec) for a in (z, labels, where, weight)) + (
      None if dz is None else dz.reshape(-1, spec.block_rows, z.shape[-1]),)

  def body(acc, x):
    zb, lb, wb, sw, dzb = x
    if dz_bits is not None:
      dzb = _linear_bitcast(dzb, dz_bits)
    # The bits go in as they are: a residual the transposed scan reads from the input.
    tan = _block_tangent_remat(zb, lb, wb, sw, alpha, gamma, dzb, dalpha, dgamma, spec, dtypes)
    return (acc + tan, None) if spec.total else (acc, tan)

  acc, tans = lax.scan(
      body, _numerics.zeros_varying((), alpha.dtype, (xs, alpha, gamma, dalpha, dgamma)), xs)
  return out, acc if spec.total else tans.reshape(-1)


_blocked_focal.defjvp(_blocked_focal_jvp, symbolic_zeros=True)


# --- engine (XLA:GPU-specific): the column form, for few classes ----------------------------
# On XLA:GPU the one-pass statistics are a variadic reduce, a fusion of their own: they and the
# per-row coefficients derived from them go to memory, and the loop fusion that writes the
# gradient reads them back (compiled for the H100 without a device, `focal-bench aot`'s
# `jit(grad(mean loss))` step: temporaries 2.0x the float32 logits at (65536, 2), 4.0x in
# bfloat16; 0.27x / 0.53x at (131072, 16)). The column form computes every per-row value as
# an elementwise function of the C column slices of the logits (the max, the target logit and
# the non-target sum of exponentials unrolled over the columns; `row_stats`' two-pass
# formulas), and builds the gradient column by column (a concatenate), so nothing in the step
# is a reduction over classes. How much of it XLA fuses into the gradient's loop is priority
# fusion's choice (its cost model weighs recomputing a row's statistics for each of its C
# outputs against storing them, and depends on N): at C = 2 all of it up to N = 2^16 rows
# (no temporaries, one read of the logits and labels, one write of the gradient; at N = 2^20
# one / three per-row vectors stay, 0.5x / 3.0x of float32 / bfloat16 logits against 2.0x /
# 4.0x), at C = 5 all of it at N = 1000; otherwise two or three per-row vectors (at C = 16 the
# max, the non-target mass and the gradient coefficient; there the model puts recomputing them
# per output at 2.5x to 3x the unfused time), against the default form's four to five.
# Measured from C = 2 to 40, N = 1000 to 2^20, float32 and bfloat16: temporaries and bytes
# below the default form's at every point; at C = 48, 64 and 91 several times the default's,
# hence `_COLUMN_CLASSES`.

# Most classes of the column form (`_column_form_fits`).
_COLUMN_CLASSES = 32


def _column_form_fits(num_classes: int) -> bool:
  """Whether CUDA takes the column form at this class count (see above)."""
  return num_classes <= _COLUMN_CLASSES


def _columns(z: jax.Array, dtype) -> list[jax.Array]:
  return [z[..., c].astype(dtype) for c in range(z.shape[-1])]


def _column_stats(z: jax.Array, t: jax.Array, alpha: jax.Array, gamma: jax.Array,
                  valid: jax.Array, in_range: jax.Array, eps: float) -> RowStats:
  """`row_stats` (the two-pass form) from the columns of `z`, elementwise."""
  cols = _columns(z, alpha.dtype)
  m = cols[0]
  for col in cols[1:]:
    m = jnp.maximum(m, col)  # NaN propagates
  m = lax.stop_gradient(m)
  undefined = jnp.isnan(m) | (m == -jnp.inf)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  z_t = cols[0]
  s_rest = jnp.where(t == 0, 0.0, jnp.exp(cols[0] - m))
  for c, col in enumerate(cols[1:], 1):
    z_t = jnp.where(t == c, col, z_t)
    s_rest = s_rest + jnp.where(t == c, 0.0, jnp.exp(col - m))

  def row_mean():
    total = cols[0]
    for col in cols[1:]:
      total = total + col
    return total / len(cols)

  return _finish(m, s_rest, z_t, undefined, row_mean, alpha, gamma, valid, in_range, eps)


def _column_grad(z: jax.Array, t: jax.Array, st: RowStats, valid: jax.Array,
                 eps: float) -> jax.Array:
  """`grad_from_stats`, its columns computed one by one and stacked (class axis last)."""
  num_classes = z.shape[-1]
  out = []
  for c, col in enumerate(_columns(z, st.m.dtype)):
    is_t = t == c
    g = jnp.where(is_t, -st.a, jnp.exp(col - st.m) * st.a_rest)
    if eps > 0.0:
      g = g + st.b * (is_t.astype(g.dtype) - 1.0 / num_classes)
    out.append(jnp.where(valid, g, 0.0))
  return jnp.stack(out, axis=-1)


def _column_dot_grad(z, t, st, valid, dz, eps):
  return jnp.sum(_column_grad(z, t, st, valid, eps) * dz.astype(st.m.dtype), axis=-1)


_column_dot_grad_remat = jax.checkpoint(_column_dot_grad, static_argnums=(5,),
                                        prevent_cse=False)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def column_focal_rows(z: jax.Array, t: jax.Array, alpha: jax.Array, gamma: jax.Array,
                      valid: jax.Array, in_range: jax.Array, options: SoftmaxOptions) -> jax.Array:
  """`focal_rows` in the column form (classes whole, class axis last): the same values and
  derivatives. Runs on every platform (the tests call it on the CPU); `softmax_focal` selects
  it for CUDA only, at few classes (`_platform_rows`)."""
  return _column_stats(z, t, alpha, gamma, valid, in_range, options.label_smoothing).loss


def _column_focal_rows_jvp(options, primals, tangents):
  z, t, alpha, gamma, valid, in_range = primals
  dz, _, dalpha, dgamma, _, _ = tangents
  eps = options.label_smoothing
  st = _column_stats(z, t, alpha, gamma, valid, in_range, eps)
  return st.loss, _numerics.tangent_sum(
      st.loss, (dz, lambda dz: _column_dot_grad_remat(z, t, st, valid, dz, eps)),
      (dalpha, lambda d: st.dloss_dalpha * d), (dgamma, lambda d: st.dloss_dgamma * d))


column_focal_rows.defjvp(_column_focal_rows_jvp, symbolic_zeros=True)


def _platform_rows(z: jax.Array, t: jax.Array, alpha: jax.Array, gamma: jax.Array,
                   valid: jax.Array, in_range: jax.Array, options: SoftmaxOptions) -> jax.Array:
  """Per-row losses: on CUDA at few classes (classes whole) the column form, else
  `focal_rows`."""
  args = (z, t, alpha, gamma, valid, in_range)
  if options.split is not None or not _column_form_fits(z.shape[-1]):
    return focal_rows(*args, options)
  return lax.platform_dependent(*args, cuda=lambda *a: column_focal_rows(*a, options),
                                default=lambda *a: focal_rows(*a, options))
# --- end of engine -------------------------------------------------------------------------


# --- engine (CUDA-specific): the gradient as categorical_focal's Triton kernel ---------------
# The column form still leaves XLA:GPU's priority fusion three per-row float32 vectors at
# C = 16 (the max, the non-target mass, the gradient coefficient: compiled for the H100,
# `jit(grad(mean loss))` at (131072, 16) 0.19x / 0.38x the float32 / bfloat16 logits in
# temporaries). Without label smoothing the softmax focal loss of integer labels is the
# categorical focal loss of one-hot targets, -alpha_t (1 - s_t)**gamma_t log s_t, so on CUDA the
# logits' tangent term is `_categorical_kernel`'s primitive with the labels as targets
# (`labels_form`: the Triton kernel builds the one-hot targets in registers), whose transpose
# writes `ct * dloss/dz` from one read of the logits and labels. The loss itself stays the
# column form's (a reduction XLA fuses whole); reduced without sample weights, the tangent is
# `total_dot_grad` (the kernel reads the cotangent as one scalar). Where it applies
# (`_kernel_fits`): 2-D logits, class axis last, int32 labels, float32 compute, no label
# smoothing, classes whole, at the column form's class counts; elsewhere the forms above.
# Set "gpu" to take it on every platform in Pallas' interpret mode (the tests).
_KERNEL_INTERPRET: list[str | None] = [None]


def _kernel_fits(z: jax.Array, prep: Prepared, options: SoftmaxOptions, last_axis: bool) -> bool:
  """Whether the kernel form takes these logits (see above)."""
  interpret = _KERNEL_INTERPRET[0] is not None
  if (not last_axis or z.ndim != 2 or options.split is not None or prep.eps > 0.0
      or prep.labels is None or prep.labels.dtype != jnp.int32
      or not _column_form_fits(z.shape[-1])):
    return False
  if not interpret and os.environ.get(_categorical.GPU_KERNEL_ENV, "1") == "0":
    return False
  return _categorical_kernel.gpu_plan(z.shape, prep.compute_dtype, interpret) is not None


def _kernel_hypers(prep: Prepared):
  """Class (or scalar) alpha and gamma for the kernel, in the compute dtype: a class vector as
  (1, C), rank-matched to the logits (as `_categorical` hands them to the primitives)."""
  alpha = prep.class_alpha
  if alpha is None:
    alpha = jnp.ones((), prep.compute_dtype)
  return tuple(v.reshape(1, -1) if v.ndim else v for v in (alpha, prep.class_gamma))


def _kernel_dot(dz, z, labels, alpha, gamma, valid, masked, total):
  cat = _categorical.CategoricalOptions(kernel="auto", masked=masked)
  dot = _categorical_kernel.total_dot_grad if total else _categorical_kernel.row_dot_grad
  return dot(dz, z, labels[:, None], alpha, gamma, valid, options=cat,
             interpret=_KERNEL_INTERPRET[0])


@functools.partial(jax.custom_jvp, nondiff_argnums=(9, 10, 11))
def _kernel_rows(z, labels, t, alpha_row, gamma_row, valid, in_range, alpha, gamma,
                 eps: float, masked: bool, total: bool):
  """The per-row losses (or, `total`, their sum) of the column form; the logits' tangent the
  kernel primitive's (`labels`: the checked int32 labels; `alpha`, `gamma`: scalars or class
  vectors, the same values as `alpha_row`, `gamma_row`)."""
  loss = _column_stats(z, t, alpha_row, gamma_row, valid, in_range, eps).loss
  return jnp.sum(loss) if total else loss


def _kernel_rows_jvp(eps, masked, total, primals, tangents):
  z, labels, t, alpha_row, gamma_row, valid, in_range, alpha, gamma = primals
  dz, _, _, dalpha_row, dgamma_row, _, _, dalpha, dgamma = tangents
  st = _column_stats(z, t, alpha_row, gamma_row, valid, in_range, eps)
  out = jnp.sum(st.loss) if total else st.loss
  fold = jnp.sum if total else (lambda x: x)
  # alpha / gamma reach the loss through the per-row values (their terms below); the class
  # vectors only feed the kernel's dz term (their tangents: its derivatives, for Hessians).
  del dalpha, dgamma
  return out, _numerics.tangent_sum(
      out, (dz, lambda dz: _kernel_dot(dz, z, labels, alpha, gamma, valid, masked, total)),
      (dalpha_row, lambda d: fold(st.dloss_dalpha * d)),
      (dgamma_row, lambda d: fold(st.dloss_dgamma * d)))


_kernel_rows.defjvp(_kernel_rows_jvp, symbolic_zeros=True)


def _kernel_focal(z: jax.Array, prep: Prepared, total: bool) -> jax.Array:
  """`platform_focal` by the kernel form (`_kernel_fits`)."""
  alpha, gamma = _kernel_hypers(prep)
  masked = prep.where is not None or prep.ignore_index is not None
  sum_here = total and prep.weight is None
  out = _kernel_rows(z, prep.labels, prep.t, prep.alpha, prep.gamma, prep.valid,
                     prep.in_range, alpha, gamma, prep.eps, masked, sum_here)
  if sum_here:
    return out
  loss = _checks.apply_sample_weight(out, prep.weight, prep.valid)
  return jnp.sum(loss) if total else loss
# --- end of engine -------------------------------------------------------------------------


def platform_focal(z: jax.Array, prep: Prepared, options: SoftmaxOptions,
                   total: bool, *, last_axis: bool = False) -> jax.Array:
  """The weighted per-row losses of `z` (class axis last), or their sum when `total`.

  On CPU, for more than one block of rows, the blocked form above (`lax.platform_dependent`);
  elsewhere (and for split classes) `_platform_rows`: on CUDA at few classes the column form,
  else `focal_rows`, which XLA fuses on TPU and GPU.
  """
  def fused():
    loss = _platform_rows(z, prep.t, prep.alpha, prep.gamma, prep.valid, prep.in_range,
                          options)
    loss = _checks.apply_sample_weight(loss, prep.weight, prep.valid)
    return jnp.sum(loss) if total else loss

  kernel = _kernel_fits(z, prep, options, last_axis)
  if kernel and _KERNEL_INTERPRET[0] is not None:
    return _kernel_focal(z, prep, total)
  branches = {"cuda": lambda: _kernel_focal(z, prep, total)} if kernel else {}
  num_classes = z.shape[-1]
  rows = math.prod(z.shape[:-1])
  size = (None if options.split is not None else
          _block_rows(rows, num_classes, jnp.dtype(z.dtype).itemsize))
  if size is None:
    return lax.platform_dependent(default=fused, **branches) if branches else fused()
  spec = _BlockSpec(label_smoothing=prep.eps, ignore_index=prep.ignore_index,
                    background_class=prep.background_class, block_rows=size, total=total)
  flat = lambda a: None if a is None else jnp.broadcast_to(a, z.shape[:-1]).reshape(rows)
  alpha = prep.class_alpha
  if alpha is None:
    alpha = jnp.ones((), prep.compute_dtype)

  def blocked():
    out = _blocked_focal(z.reshape(rows, num_classes), prep.labels.reshape(rows),
                         flat(prep.where), flat(prep.weight), alpha, prep.class_gamma, spec)
    return out if total else out.reshape(z.shape[:-1])

  return lax.platform_dependent(cpu=blocked, default=fused, **branches)


# --- end of engine: the custom_jvp (docs/math.md, "Why a `custom_jvp` in JAX ...") ----------


# Why a custom_jvp and not a custom_vjp: jax.hessian is jacfwd(jacrev(f)), and a custom_vjp
# cannot be forward-differentiated. The tangent rule below is written in differentiable jnp
# ops, so JAX transposes it for reverse mode and differentiates it again for Hessians; the
# gradient it encodes is the closed form of the design (one per-row scalar times
# softmax - onehot, plus the smoothing term), which stays finite where plain autodiff of
# (1 - p)**gamma gives NaN (0 < gamma < 1, p rounded to 1).
@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def focal_rows(z: jax.Array, t: jax.Array, alpha: jax.Array, gamma: jax.Array,
               valid: jax.Array, in_range: jax.Array, options: SoftmaxOptions) -> jax.Array:
  """Per-row softmax focal loss (class axis last), differentiable in z, alpha and gamma.

  With `options.split`, `z` is this member's slice of the classes and the loss is the whole
  row's.
  """
  return row_stats(z, t, alpha, gamma, valid, in_range, options.label_smoothing, one_pass=True,
                   split=options.split).loss


def _focal_rows_jvp(options, primals, tangents):
  z, t, alpha, gamma, valid, in_range = primals
  dz, _, dalpha, dgamma, _, _ = tangents
  split = options.split
  st = row_stats(z, t, alpha, gamma, valid, in_range, options.label_smoothing, one_pass=True,
                 split=split)

  def dz_term(dz):
    if split is None:
      return _dot_grad_remat(z, t, st, valid, dz, options)
    # The whole loss depends on every member's slice: its tangent is the sum over the
    # members of each one's slice term. Reverse mode transposes this psum into handing the
    # (invariant) cotangent to every member (check_vma), each then getting its slice's
    # gradient; nothing crosses the axis in the backward pass.
    return lax.psum(_dot_grad_remat(z, t, st, valid, dz, options), split.axis_name)

  # Symbolic zeros: the terms of arguments that are not being differentiated cost nothing.
  return st.loss, _numerics.tangent_sum(
      st.loss, (dz, dz_term), (dalpha, lambda d: st.dloss_dalpha * d),
      (dgamma, lambda d: st.dloss_dgamma * d))


focal_rows.defjvp(_focal_rows_jvp, symbolic_zeros=True)


class Prepared(NamedTuple):
  """Checked inputs of a softmax focal loss, class axis moved last, in the compute dtype."""
  t: jax.Array
  alpha: jax.Array
  gamma: jax.Array
  valid: jax.Array
  in_range: jax.Array
  positive: jax.Array
  weight: jax.Array | None  # sample_weight, shape of the rows, constant
  eps: float
  reduction: str
  dtype: Any
  compute_dtype: Any
  # The checked inputs themselves, for the CPU blocked path (the per-row arrays above are
  # derived from them inside each block there): labels, `where` (or None), alpha (None, a
  # scalar or (C,)), gamma (a scalar or (C,)), ignore_index, background_class.
  labels: jax.Array | None = None
  where: jax.Array | None = None
  class_alpha: jax.Array | None = None
  class_gamma: jax.Array | None = None
  ignore_index: int | None = None
  background_class: int = 0


def prepare_labels(fn: str, labels: Any, num_classes: int, row_shape: tuple[int, ...],
                   dtype: Any, *, alpha: Any, gamma: Any, label_smoothing: Any, where: Any,
                   ignore_index: Any, reduction: Any, background_class: Any,
                   what_rows: str, sample_weight: Any = None) -> Prepared:
  """Checks the labels and keywords of a softmax focal loss; per-row alpha, gamma and masks.

  Shared by `softmax_focal` and `linear_softmax_focal`.
  """
  labels = _checks.labels(fn, labels, row_shape, what_rows)
  cdtype = _checks.compute_dtype(dtype)
  reduction = _checks.reduction(fn, reduction)
  eps = _checks.label_smoothing(fn, label_smoothing)
  ignore_index = _checks.optional_int(fn, "ignore_index", ignore_index)
  background_class = _checks.optional_int(fn, "background_class", background_class,
                                          allow_none=False)
  where = _checks.where_mask(fn, where, row_shape, "the shape of labels")
  weight = _checks.sample_weight(fn, sample_weight, row_shape, cdtype, "the shape of labels")
  alpha, gamma = _checks.softmax_hypers(fn, num_classes, cdtype, alpha=alpha, gamma=gamma)

  valid, in_range, t, positive = _checks.softmax_masks(labels, where, num_classes, ignore_index,
                                                       background_class)
  if alpha is None:
    alpha_row = jnp.ones(row_shape, cdtype)
  elif alpha.ndim == 0:
    alpha_row = jnp.broadcast_to(alpha, row_shape)
  else:
    alpha_row = alpha[t]
  gamma_row = jnp.broadcast_to(gamma, row_shape) if gamma.ndim == 0 else gamma[t]
  return Prepared(t, alpha_row, gamma_row, valid, in_range, positive, weight, eps, reduction,
                  dtype, cdtype, labels, where, alpha, gamma, ignore_index, background_class)


def softmax_focal(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike | None = None,
    gamma: jax.typing.ArrayLike = 2.0,
    label_smoothing: float = 0.0,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "none",
    background_class: int = 0,
    axis_name: Any = None,
    sample_weight: jax.typing.ArrayLike | None = None,
    class_axis_name: Any = None,
) -> jax.Array:
  r"""Softmax focal loss for integer labels.

  With :math:`s = \mathrm{softmax}(z)` over the class axis, :math:`t` the label,
  :math:`p = s_t` and :math:`C` classes:

  .. math::
    \ell = \alpha_t (1 - p)^{\gamma_t} \left[-(1 - \epsilon) \log p
      - \frac{\epsilon}{C} \sum_c \log s_c\right]

  The focal factor uses the unsmoothed :math:`p`; label smoothing :math:`\epsilon` acts on the
  cross-entropy term only (as ``torch.nn.functional.cross_entropy``). With ``gamma=0`` and
  ``alpha=None`` this is the softmax cross-entropy
  (:func:`optax.softmax_cross_entropy_with_integer_labels`).

  The gradient is computed in closed form, one per-row scalar times
  :math:`s - \mathrm{onehot}(t)` (plus :math:`\epsilon`'s term): reverse mode keeps only the
  logits and per-row scalars. Everything is computed in log space, in float32 at least:
  loss, gradient and Hessian are finite at any logit margin and any ``gamma >= 0``. Supports
  ``jit``, ``vmap``, ``grad``, ``jax.hessian``, ``pmap`` and ``shard_map``.

  Args:
    logits: floating-point logits, class axis at ``axis`` (e.g. ``(N, C)``, or
      ``(N, C, H, W)`` with ``axis=1``).
    labels: integers in ``[0, C)`` of any integer dtype (int8 ... uint64), shape of
      ``logits`` without ``axis``. An out-of-range label (including ``-1``) that is not masked
      gives NaN for its entry; it never wraps. Comparisons with ``C``, ``ignore_index`` and
      ``background_class`` never wrap those values into the labels' dtype.
    alpha: None (no weighting), a scalar, or a ``(C,)`` vector of class weights
      (:math:`\alpha_t = \alpha[t]`), finite and ``>= 0``; a list, tuple or NumPy array is
      fine.
    gamma: focusing exponent, a finite scalar ``>= 0`` or a ``(C,)`` vector
      (:math:`\gamma[t]`).
    label_smoothing: :math:`\epsilon \in [0, 1]`, a Python float.
    axis: the class axis of ``logits``.
    where: optional boolean mask, shape of ``labels`` (or broadcastable to it); False entries
      give 0 loss and 0 gradient and are left out of every denominator.
    ignore_index: optional label value treated like ``where=False``; a value that the labels'
      dtype cannot hold ignores nothing.
    reduction: ``"none"`` (per-entry losses, shape of ``labels``), ``"sum"``, ``"mean"``
      (over valid entries) or ``"mean_positive"`` (sum over valid entries divided by the
      number of valid entries whose label is not ``background_class``). A denominator of 0 is
      taken as 1.
    background_class: the label that is not counted as positive by ``"mean_positive"``.
    axis_name: optional named axis (pmap, shard_map). The denominators are summed over it and
      each shard returns ``n * local_sum / global_denominator`` (``n`` the axis size), so that
      ``lax.pmean`` of the value and of the gradients gives the single-device result on the
      whole batch. Ignored by ``"none"``.
    sample_weight: optional non-negative weights, a scalar or an array broadcastable to the
      shape of ``labels`` (bool, integer or floating; a list or NumPy array is fine). Each
      entry's loss and gradient are multiplied by its weight before the reduction; the
      denominators of ``"mean"`` and ``"mean_positive"`` are unchanged. Never differentiated;
      masked entries stay exactly 0.
    class_axis_name: optional named axis (``shard_map``) over which the classes are split
      (vocabulary parallelism): member ``r`` of ``k`` holds the contiguous slice
      ``[r * C / k, (r + 1) * C / k)`` of the classes, i.e. ``logits`` is its slice of the
      columns (``P(..., "model")`` as ``in_specs``); ``labels`` are global class ids and a
      ``(C,)`` ``alpha`` or ``gamma`` is the whole vector, the same on every member
      (``labels``, ``where`` and ``sample_weight`` are per row, not split). Only per-row
      statistics cross the axis (a ``pmax`` of the row max, ``psum`` of the rescaled sums of
      exponentials, of the owner's target logit and, with label smoothing, of the row sums);
      every member returns the loss of the whole rows, and ``jax.grad`` gives each member the
      gradient of its own slice (``shard_map``'s default ``check_vma=True``; under ``pmap``
      or ``check_vma=False`` JAX transposes ``psum`` into ``psum``, which multiplies that
      gradient by ``k``). Combines with ``axis_name`` on a 2-D (data x class) mesh; the two
      must name different axes.

  Non-finite logits are never hidden: an unmasked row with a NaN logit, or with no finite
  logit, gives NaN. A logit of ``-inf`` on a class other than the label is a masked class (the
  loss of the remaining classes, 0 gradient there); a label whose logit is ``-inf`` gives
  ``+inf`` with the finite gradient of the limit :math:`p \to 0`. Masked rows are exactly 0,
  with exactly 0 gradient, whatever their logits.

  Returns:
    The losses in the dtype of ``logits``: shape of ``labels`` for ``reduction="none"``,
    else a scalar.

  Raises:
    TypeError: ``logits`` not floating point; ``labels`` not integer; a keyword of the wrong
      type.
    ValueError: ``logits`` with no class (``C = 0``); ``labels``, ``where`` or
      ``sample_weight`` of the wrong shape; ``gamma`` or ``alpha`` negative, not finite, or not
      scalar or ``(C,)``; ``sample_weight`` negative or not finite; ``label_smoothing``
      outside ``[0, 1]``; an unknown ``reduction``; ``axis`` out of range. All raised at trace
      time (values only when known: never those of traced arrays). With
      ``class_axis_name``: the axis not bound, or also in ``axis_name``; a ``(C,)``
      ``alpha`` / ``gamma`` whose length is not the local class count times the axis size
      (or not divisible by the axis size).

  Examples:
    >>> import jax.numpy as jnp
    >>> import focal_jax
    >>> jnp.set_printoptions(precision=4)
    >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    >>> labels = jnp.array([0, 2])
    >>> print(focal_jax.softmax_focal(logits, labels, gamma=2.0))
    [0.0041 1.452 ]
    >>> loss = focal_jax.softmax_focal(logits, labels, alpha=0.25, reduction="mean")
    >>> print(f"{loss:.4f}")
    0.1820

  References:
    Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_,
    ICCV 2017.
  """
  fn = "softmax_focal"
  logits = _checks.floating_array(fn, "logits", logits)
  ax = _checks.axis(fn, axis, logits.ndim)
  num_classes = _checks.num_classes(
      fn, "logits", logits.shape[ax], f"C = 0 (shape {logits.shape}, class axis {ax})")
  row_shape = logits.shape[:ax] + logits.shape[ax + 1:]
  split = _checks.class_split(fn, class_axis_name, axis_name, num_classes)
  if split is not None:  # labels, alpha and gamma against the whole class count
    for arg, value in (("alpha", alpha), ("gamma", gamma)):
      _checks.split_class_vector(fn, arg, value, split, "classes of logits")
    num_classes = split.num_classes
  prep = prepare_labels(
      fn, labels, num_classes, row_shape, logits.dtype, alpha=alpha, gamma=gamma,
      label_smoothing=label_smoothing, where=where, ignore_index=ignore_index,
      reduction=reduction, background_class=background_class,
      what_rows=f"the shape of logits {logits.shape} without axis {ax}",
      sample_weight=sample_weight)
  z = jnp.moveaxis(logits, ax, -1)  # cast to the compute dtype inside, see row_stats
  options = SoftmaxOptions(label_smoothing=prep.eps, split=split)
  total = prep.reduction != "none"
  out = platform_focal(z, prep, options, total,  # per-row losses, or their sum
                       last_axis=ax == logits.ndim - 1)
  # The per-row losses, or (a reduction) only their shape: the sum is out.
  loss = jax.ShapeDtypeStruct(row_shape, prep.compute_dtype) if total else out
  return _reduce.reduce_loss(loss, valid=prep.valid, positive=prep.positive,
                             reduction=prep.reduction, axis_name=axis_name, dtype=prep.dtype,
                             total=out if total else None)
