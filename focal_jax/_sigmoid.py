"""Sigmoid focal loss for binary and multi-label tasks, hard or soft labels.

The entry-wise quantities and their names are docs/math.md's ("Sigmoid", its "Names" table:
`x`, `y`, `log_p`, `log_q`, `bce`, `log_1m_pt`, `focal`, `alpha_t`, `r`, `p_minus_y`,
`dloss_dx`, `dloss_dy`, `valid`), and so is the reason for the `custom_jvp` ("Why a
`custom_jvp` in JAX and an `autograd.Function` in torch"). The engine work (the remat of the
derivatives; the reduced losses' forward sum in blocks on CPU, chosen by
`lax.platform_dependent`) sits below marked boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from focal_jax import _checks
from focal_jax import _numerics
from focal_jax import _reduce


def _safe_log(x: jax.Array) -> jax.Array:
  # log(0) = -inf, with a zero (not NaN) derivative there: the double-where trick.
  positive = x > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class SigmoidOptions:
  """The checked settings of one sigmoid focal loss call that are not arrays, passed whole to
  the custom_jvp functions (a nondiff argument) and the checkpointed tangents (a static
  argument): frozen and hashable.

  Attributes:
    label_smoothing: `eps` in [0, 1].
    compute_dtype: the dtype of the math (float32 at least).
    has_alpha: whether `alpha` was given (None: no weighting, `alpha_t = 1`).
    check_labels: labels not boolean: an unmasked label outside [0, 1] or NaN gives NaN.
  """
  label_smoothing: float
  compute_dtype: Any
  has_alpha: bool
  check_labels: bool


class _EntryStats(NamedTuple):
  loss: jax.Array
  dloss_dx: jax.Array
  dloss_dy: jax.Array
  dloss_dalpha: jax.Array
  dloss_dgamma: jax.Array


def _entry_stats(x: jax.Array, y: jax.Array, alpha: jax.Array, gamma: jax.Array,
                 valid: jax.Array, has_alpha: bool) -> _EntryStats:
  """Loss and its partial derivatives, entry by entry; differentiable jnp ops only."""
  x = x.astype(alpha.dtype)  # logits stay in their dtype outside; math in the compute dtype
  # log p and log(1 - p) from log_sigmoid of +x and -x: exact at any margin.
  log_p = jax.nn.log_sigmoid(x)
  log_q = jax.nn.log_sigmoid(-x)
  bce = -(y * log_p + (1.0 - y) * log_q)
  # log(1 - p_t) = log(y (1 - p) + (1 - y) p) in log space: finite for every x and y in [0, 1]
  # (at least one of y, 1 - y is >= 1/2), never computed as 1 - p_t.
  log_1m_pt = jnp.logaddexp(_safe_log(y) + log_q, _safe_log(1.0 - y) + log_p)
  # (1 - p_t)**gamma as exp(gamma * log(1 - p_t)): finite with finite derivatives, gamma < 1.
  focal = jnp.exp(gamma * log_1m_pt)
  alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y) if has_alpha else jnp.ones_like(y)
  loss = alpha_t * focal * bce
  # r = d(1 - p_t)/dx / (1 - p_t) = (1 - 2y) p (1 - p) / (1 - p_t), as an exp of logs (<= 1);
  # dbce/dx = p_minus_y = (1 - y) p - y (1 - p), without cancellation near p = y in {0, 1}
  # (its two terms are added to gamma * bce * r one after the other).
  r = (1.0 - 2.0 * y) * jnp.exp(log_p + log_q - log_1m_pt)
  dloss_dx = alpha_t * focal * (gamma * bce * r + (1.0 - y) * jnp.exp(log_p) - y * jnp.exp(log_q))
  # dloss/dy: dbce/dy = -x; d(1 - p_t)/dy = 1 - 2p, times (1 - p_t)**(gamma - 1) * bce, taken
  # as one exp of logs (bce -> 0 exactly where 1 - p_t -> 0).
  one_m_2p = jnp.exp(log_q) - jnp.exp(log_p)
  dloss_dy = alpha_t * (focal * -x + gamma * one_m_2p
                        * jnp.exp(_safe_log(bce) + (gamma - 1.0) * log_1m_pt))
  dloss_dalpha = (2.0 * y - 1.0) * focal * bce
  if has_alpha:
    dloss_dy = dloss_dy + (2.0 * alpha - 1.0) * focal * bce
  dloss_dgamma = loss * log_1m_pt

  def masked(v: jax.Array) -> jax.Array:
    return jnp.where(valid, v, 0.0)

  return _EntryStats(masked(loss), masked(dloss_dx), masked(dloss_dy), masked(dloss_dalpha),
                     masked(dloss_dgamma))


def _dot(x, y, alpha, gamma, valid, options: SigmoidOptions, dx, dy):
  st = _entry_stats(x, y, alpha, gamma, valid, options.has_alpha)
  return _numerics.tangent_sum(st.loss, (dx, lambda d: st.dloss_dx * d.astype(st.loss.dtype)),
                               (dy, lambda d: st.dloss_dy * d), start=jnp.zeros_like(st.loss))


# --- engine (JAX-specific: jax.checkpoint, the derivatives recomputed in the backward) -------
# Reverse mode keeps x and y only; the elementwise derivatives are recomputed in the backward
# pass (under jit XLA fuses them with the cotangent multiply).
_dot_remat = jax.checkpoint(_dot, static_argnums=(5,), prevent_cse=False)
# --- end of engine -----------------------------------------------------------------------


# A custom_jvp (not custom_vjp) so that jax.hessian (forward over reverse) works; the rule is
# the closed-form derivative, written in log space so that it stays finite where autodiff of
# (1 - p_t)**gamma gives NaN (0 < gamma < 1, p_t rounded to 1).
@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _focal_entries(x: jax.Array, y: jax.Array, alpha: jax.Array, gamma: jax.Array,
                   valid: jax.Array, options: SigmoidOptions) -> jax.Array:
  return _entry_stats(x, y, alpha, gamma, valid, options.has_alpha).loss


def _focal_entries_jvp(options, primals, tangents):
  x, y, alpha, gamma, valid = primals
  dx, dy, dalpha, dgamma, _ = tangents
  st = _entry_stats(x, y, alpha, gamma, valid, options.has_alpha)
  return st.loss, _numerics.tangent_sum(
      st.loss, ((dx, dy), lambda d: _dot_remat(x, y, alpha, gamma, valid, options, *d)),
      (dalpha if options.has_alpha else None, lambda d: st.dloss_dalpha * d),
      (dgamma, lambda d: st.dloss_dgamma * d))


_focal_entries.defjvp(_focal_entries_jvp, symbolic_zeros=True)


# --- engine (JAX-specific: reduced losses, the forward sum in blocks of rows on CPU chosen by
# lax.platform_dependent, the backward one elementwise pass under jax.checkpoint) ---
#
# With a reduction, ``jit(value_and_grad)`` compiles the forward sum and the backward
# gradient into one program. Written as plain elementwise ops, XLA on CPU materializes every
# expensive intermediate (log-sigmoids, logs of the labels, the focal factor) shared by the
# forward sum and the gradient, and every input of its vectorized reduction that the
# reduction cannot fuse (selects): about six arrays of the logits' size. Here the forward sum
# runs over blocks of rows (a loop: its temporaries are of one block's size), the backward
# recomputes everything from the logits and the raw labels in one fusion (a checkpoint that
# XLA may not merge with the forward), and the labels' checks and smoothing happen inside
# both, so no array of the logits' size is kept or materialized beyond the gradient.

# Entries per block of the forward sum: temporaries of a few blocks (a few MiB at most).
_BLOCK = 1 << 16


def _labels_to_y(labels: jax.Array, where: jax.Array | None,
                 options: SigmoidOptions) -> jax.Array:
  """The labels as the loss sees them: compute dtype, checked, smoothed (elementwise)."""
  y = labels.astype(options.compute_dtype)
  if options.check_labels:
    # Labels outside [0, 1] (class ids passed by mistake) or NaN: NaN for the entry, like an
    # out-of-range class label (masked entries stay 0).
    # Masked bad labels are replaced by 1/2 (no NaN inside the derivatives of masked entries).
    zero, one = jnp.zeros((), labels.dtype), jnp.ones((), labels.dtype)
    bad_label = jnp.nan if where is None else jnp.where(where, jnp.nan, 0.5)
    y = jnp.where((labels >= zero) & (labels <= one), y, bad_label)
  eps = options.label_smoothing
  if eps > 0.0:
    y = (1.0 - eps) * y + 0.5 * eps
  return y


def _weighted(v: jax.Array, weight: jax.Array | None, where: jax.Array | None) -> jax.Array:
  """Per-entry values times the sample weights; masked entries exactly 0."""
  if weight is None:
    return v
  v = v * weight
  return v if where is None else jnp.where(where, v, 0.0)


def _block_losses(x, labels, alpha, gamma, where, weight, options):
  y = _labels_to_y(labels, where, options)
  valid = jnp.ones((), bool) if where is None else where
  loss = _entry_stats(x, y, alpha, gamma, valid, options.has_alpha).loss
  return _weighted(loss, weight, where)


def _as_rows(a: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
  """``a`` (broadcastable to ``shape``) as a 2-D array of rows matching ``_rows(shape)``.

  Its first axis is 1 (the same for every row) or the number of rows; its second is 1 or the
  last axis of ``shape``. No copy unless ``a`` broadcasts along some leading axes only.
  """
  if a is None:
    return None
  a = jnp.reshape(a, (1,) * (len(shape) - a.ndim) + a.shape)
  if len(shape) == 1:  # 1-D logits: one entry per row
    return a.reshape(a.shape[0], 1)
  lead = a.shape[:-1]
  if all(d == 1 for d in lead):
    return a.reshape(1, a.shape[-1])
  if lead != shape[:-1]:
    a = jnp.broadcast_to(a, shape[:-1] + a.shape[-1:])
  return a.reshape(math.prod(shape[:-1]), a.shape[-1])


def _blocked_sum(fn, x: jax.Array, *args: jax.Array | None) -> jax.Array:
  """``sum(fn(x, *args))`` for an elementwise ``fn``, one block of rows at a time.

  ``args`` broadcast to ``x.shape`` (or are None). The loop keeps XLA from materializing
  ``fn``'s intermediates at the logits' size: each block's are of ``_BLOCK`` entries.
  """
  if x.ndim == 0 or x.size <= _BLOCK:
    return jnp.sum(fn(x, *args))
  rows = x.shape[0] if x.ndim == 1 else math.prod(x.shape[:-1])
  cols = 1 if x.ndim == 1 else x.shape[-1]
  x2 = x.reshape(rows, cols)
  args2 = [_as_rows(a, x.shape) for a in args]
  # 16-bit floats enter the loop as their bits: XLA on CPU otherwise hands the loop a
  # float32 copy of the whole input (its bfloat16 normalization) and converts each slice back.
  dtypes = [None if a is None else a.dtype for a in (x2, *args2)]
  as_bits = lambda a: (a if a is None or not jnp.issubdtype(a.dtype, jnp.floating)
                       or a.dtype.itemsize != 2 else jax.lax.bitcast_convert_type(a, jnp.uint16))
  x2, *args2 = map(as_bits, (x2, *args2))
  per_block = max(1, _BLOCK // cols)
  blocks = rows // per_block

  def block_sum(start, size):
    def rows_of(a):
      if a is None or a.shape[0] == 1:
        return a
      return jax.lax.dynamic_slice_in_dim(a, start, size, axis=0)
    # The barrier keeps XLA from moving conversions (bfloat16 logits, boolean labels to the
    # compute dtype) ahead of the slice and out of the loop: a converted copy of the whole
    # input.
    block = jax.lax.optimization_barrier([rows_of(a) for a in (x2, *args2)])
    block = [a if a is None or a.dtype == d else jax.lax.bitcast_convert_type(a, d)
             for a, d in zip(block, dtypes)]
    return jnp.sum(fn(*block))

  total = _numerics.zeros_varying(
      (), jax.eval_shape(lambda: block_sum(0, per_block)).dtype, (x2, args2))
  total = jax.lax.fori_loop(0, blocks, lambda i, acc: acc + block_sum(i * per_block, per_block),
                            total)
  if rows > blocks * per_block:
    total = total + block_sum(blocks * per_block, rows - blocks * per_block)
  return total


def _total_dot(x, labels, alpha, gamma, where, weight, options, dx, dlabels):
  """The tangent of the weighted, masked per-entry losses: linear in ``dx`` and ``dlabels``."""
  y = _labels_to_y(labels, where, options)
  dy = None
  if dlabels is not None:
    dy = jax.jvp(lambda l: _labels_to_y(l, where, options), (labels,), (dlabels,))[1]
  valid = jnp.ones((), bool) if where is None else where
  out = _dot(x, y, alpha, gamma, valid, options, dx, dy)
  return _weighted(out, weight, where)


# Reverse mode keeps the logits and the labels as they came; the backward recomputes the
# label checks and every per-entry term in one fusion. On CPU, prevent_cse: XLA must not merge
# this recomputation with the forward's (the merged intermediates would be materialized). On
# TPU and GPU XLA fuses the forward sum and the gradient into one pass over the logits when it
# may merge them (the floor: read logits and labels, write the gradient), so there it may.
_total_dot_remat_cpu = jax.checkpoint(_total_dot, static_argnums=(6,), prevent_cse=True)
_total_dot_remat = jax.checkpoint(_total_dot, static_argnums=(6,), prevent_cse=False)


def _total_tangent(x, labels, alpha, gamma, where, weight, options, dx, dlabels):
  def run(remat):
    return lambda *a: jnp.sum(remat(*a[:6], options, *a[6:]))
  return jax.lax.platform_dependent(x, labels, alpha, gamma, where, weight, dx, dlabels,
                                    cpu=run(_total_dot_remat_cpu), default=run(_total_dot_remat))


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _focal_total(x: jax.Array, labels: jax.Array, alpha: jax.Array, gamma: jax.Array,
                 where: jax.Array | None, weight: jax.Array | None,
                 options: SigmoidOptions) -> jax.Array:
  """The sum of the weighted, masked per-entry losses (the forward in blocks)."""
  losses = lambda *a: _block_losses(*a, options)
  # The blocked loop on CPU only (see above); elsewhere XLA fuses the plain sum.
  return jax.lax.platform_dependent(
      x, labels, alpha, gamma, where, weight,
      cpu=lambda *a: _blocked_sum(losses, *a), default=lambda *a: jnp.sum(losses(*a)))


def _focal_total_jvp(options, primals, tangents):
  x, labels, alpha, gamma, where, weight = primals
  dx, dlabels, dalpha, dgamma, _, _ = tangents
  total = _focal_total(x, labels, alpha, gamma, where, weight, options)
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    dlabels = None  # integer or boolean labels: no tangent

  @functools.cache
  def stats():  # the entries' derivatives w.r.t. alpha and gamma, for both terms, once
    y = _labels_to_y(labels, where, options)
    valid = jnp.ones((), bool) if where is None else where
    return _entry_stats(x, y, alpha, gamma, valid, options.has_alpha)

  return total, _numerics.tangent_sum(
      total,
      ((dx, dlabels),
       lambda d: _total_tangent(x, labels, alpha, gamma, where, weight, options, *d)),
      (dalpha if options.has_alpha else None,
       lambda d: jnp.sum(_weighted(stats().dloss_dalpha * d, weight, where))),
      (dgamma, lambda d: jnp.sum(_weighted(stats().dloss_dgamma * d, weight, where))))


_focal_total.defjvp(_focal_total_jvp, symbolic_zeros=True)

# --- end of engine -----------------------------------------------------------------------


def sigmoid_focal(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike | None = None,
    gamma: jax.typing.ArrayLike = 2.0,
    label_smoothing: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
    axis_name: Any = None,
    sample_weight: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Sigmoid focal loss for binary and multi-label tasks, with hard or soft labels.

  With :math:`p = \sigma(x)` and a label :math:`y \in [0, 1]`:

  .. math::
    p_t = p\,y + (1 - p)(1 - y), \qquad
    \alpha_t = \alpha\,y + (1 - \alpha)(1 - y), \qquad
    \ell = \alpha_t (1 - p_t)^\gamma \,\mathrm{BCE}(x, y)

  with :math:`\mathrm{BCE}(x, y) = -y \log p - (1 - y) \log(1 - p)` (the formula of
  torchvision's and optax's ``sigmoid_focal_loss``). ``label_smoothing`` :math:`\epsilon`
  first moves the labels toward 1/2: :math:`y \leftarrow (1 - \epsilon) y + \epsilon / 2`.
  Every term is computed in log space, in float32 at least: loss, gradient and Hessian are
  finite at any logit margin and any ``gamma >= 0``. The derivative with respect to the
  logits (and to soft labels) is in closed form; reverse mode keeps only the logits and
  labels.

  Args:
    logits: floating-point logits of any shape (binary: ``(N,)``; multi-label: ``(N, C)``).
    labels: labels in ``[0, 1]`` (bool, integer or floating), same shape as ``logits``. An
      unmasked label outside ``[0, 1]`` (a class id passed by mistake) or NaN gives NaN for
      its entry.
    alpha: None (no weighting), a scalar weight in ``[0, 1]`` of the positive class, or -- for
      multi-label logits -- a ``(C,)`` vector over the last axis of ``logits`` (one weight
      per label). torchvision's ``alpha=-1`` ("no weighting") is ``alpha=None`` here. For
      channels-first multi-label logits (``(N, C, H, W)``), move the class axis last or pass
      a scalar.
    gamma: focusing exponent, a finite scalar ``>= 0`` or a ``(C,)`` vector over the last
      axis. alpha and gamma may be lists, tuples or NumPy arrays.
    label_smoothing: :math:`\epsilon \in [0, 1]`, a Python float.
    where: optional boolean mask, shape of ``labels`` (or broadcastable to it); False entries
      give 0 loss and 0 gradient and are left out of every denominator.
    reduction: ``"none"`` (shape of ``labels``), ``"sum"``, ``"mean"`` (over valid entries) or
      ``"mean_positive"`` (sum over valid entries divided by the number of valid entries with
      an unsmoothed label ``> 0``; RetinaNet's normalization). A denominator of 0 is taken
      as 1.
    axis_name: optional named axis (pmap, shard_map): denominators are summed over it and
      each shard returns ``n * local_sum / global_denominator`` (see ``softmax_focal``).
    sample_weight: optional non-negative weights, a scalar or an array broadcastable to the
      shape of ``labels`` (bool, integer or floating). Each entry's loss and gradient are
      multiplied by its weight before the reduction; denominators are unchanged. Never
      differentiated; masked entries stay exactly 0. A scalar with ``alpha=None`` puts one
      weight on both terms.

  Returns:
    The losses in the dtype of ``logits``: shape of ``labels`` for ``reduction="none"``,
    else a scalar.

  Raises:
    TypeError: ``logits`` not floating point; ``labels`` or ``sample_weight`` not numeric; a
      keyword of the wrong type.
    ValueError: ``labels``, ``where`` or ``sample_weight`` of the wrong shape; ``gamma``
      negative or not finite; ``alpha`` outside ``[0, 1]``; ``alpha`` or ``gamma`` not scalar
      or ``(C,)``; ``sample_weight`` negative or not finite; ``label_smoothing`` outside
      ``[0, 1]``; an unknown ``reduction``. All raised at trace time (values only when known:
      never those of traced arrays).

  Examples:
    >>> import jax.numpy as jnp
    >>> import focal_jax
    >>> jnp.set_printoptions(precision=4)
    >>> logits = jnp.array([2.0, -1.0, 0.5])
    >>> labels = jnp.array([1.0, 0.0, 0.0])
    >>> print(focal_jax.sigmoid_focal(logits, labels, alpha=0.25))
    [0.0005 0.017  0.2831]

  References:
    Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_,
    ICCV 2017.
  """
  fn = "sigmoid_focal"
  logits = _checks.floating_array(fn, "logits", logits)
  labels = _checks.real_array(fn, "labels", labels)
  _checks.same_shape(fn, "labels", labels.shape, logits.shape, "the shape of logits")
  reduction = _checks.reduction(fn, reduction)
  eps = _checks.label_smoothing(fn, label_smoothing)
  where_arg = where
  where = _checks.where_mask(fn, where, labels.shape, "the shape of labels")
  dtype = logits.dtype
  cdtype = _checks.compute_dtype(dtype)
  weight = _checks.sample_weight(fn, sample_weight, labels.shape, cdtype, "the shape of labels")
  num_classes = logits.shape[-1] if logits.ndim else 1
  what = " (one per entry of the last axis of logits)"
  has_alpha = alpha is not None
  alpha = _checks.class_param(fn, "alpha", 0.5 if alpha is None else alpha, num_classes, cdtype,
                              nonnegative=True, what_classes=what, unit_interval=True)
  gamma = _checks.class_param(fn, "gamma", gamma, num_classes, cdtype, nonnegative=True,
                              what_classes=what)
  # (C,) vectors act on the last axis, at the rank of the logits (no implicit rank promotion);
  # scalar logits take scalar hyperparameters (a (1,) vector is one).
  lead = (1,) * (logits.ndim - 1)
  alpha = jnp.reshape(alpha, lead + alpha.shape if logits.ndim and alpha.ndim else ())
  gamma = jnp.reshape(gamma, lead + gamma.shape if logits.ndim and gamma.ndim else ())

  x = logits  # cast to the compute dtype inside, see _entry_stats
  options = SigmoidOptions(label_smoothing=eps, compute_dtype=cdtype, has_alpha=has_alpha,
                           check_labels=labels.dtype != jnp.bool_)
  positive = labels > 0 if where is None else where & (labels > 0)
  if reduction != "none":
    # where and sample_weight as given (not broadcast): the blocked sum slices what varies.
    # At the rank of the labels (no implicit rank promotion).
    at_rank = lambda a: jnp.reshape(a, (1,) * (labels.ndim - a.ndim) + a.shape)
    raw_where = None if where is None else at_rank(jnp.asarray(where_arg))
    raw_weight = None if weight is None else jax.lax.stop_gradient(
        at_rank(jnp.asarray(sample_weight).astype(cdtype)))
    total = _focal_total(x, labels, alpha, gamma, raw_where, raw_weight, options)
    shape = jax.ShapeDtypeStruct(labels.shape, cdtype)  # what reduce_loss counts over
    return _reduce.reduce_loss(shape, valid=where, positive=positive, reduction=reduction,
                               axis_name=axis_name, dtype=dtype, total=total)
  y = _labels_to_y(labels, where, options)
  valid = jnp.ones((), bool) if where is None else where
  loss = _focal_entries(x, y, alpha, gamma, valid, options)
  loss = _checks.apply_sample_weight(loss, weight, where)
  return _reduce.reduce_loss(loss, valid=where, positive=positive, reduction=reduction,
                             axis_name=axis_name, dtype=dtype)
