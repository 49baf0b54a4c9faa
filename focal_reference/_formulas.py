"""The three focal losses, written once from their formulas (docs/design.md, docs/math.md).

One line per term of the formula, the class axis moved last, masks applied last. Two guards
keep them exact where the textbook evaluation is not, so that they serve as truth at saturated
margins (``stable=True``, the default):

- ``1 - p`` is formed without cancellation: ``-expm1(log p)`` for softmax and categorical,
  ``y * sigmoid(-x) + (1 - y) * sigmoid(x)`` for sigmoid;
- ``q ** gamma`` has a finite derivative at ``q = 0`` for ``gamma < 1`` (the derivative of the
  power is infinite there while ``dq/dz`` is 0): the power is taken of ``where(q > 0, q, 1)``.

Masked entries (``where`` False, ``label == ignore_index``) have their logits replaced by 0
before anything is computed, so their loss and gradient are exactly 0 in every framework, even
for non-finite logits. An unmasked label outside ``[0, C)`` gives NaN for that entry.

``stable=False`` is the textbook evaluation of the focal factor (``1 - p`` from ``p``, a plain
power), computed in ``compute``: autodiff of it gives NaN gradients for ``0 < gamma < 1`` once
``p`` rounds to 1, the failure the library guards against (a test shows it).

``compute`` is the dtype the formula runs in: ``"float64"`` (the truth, the default), a lower
precision (``parity_tests.derive`` measures how far a plain float32 evaluation lies from
float64), or ``None`` for the input's own floating dtype.
"""

from __future__ import annotations

from focal_reference._namespace import namespace

REDUCTIONS = ("none", "sum", "mean", "mean_positive")


def _compute_dtype(xp, x, compute):
  return xp.float_dtype(x) if compute is None else xp.dtype(compute)


def log_softmax(z, axis: int = -1):
  """``log softmax(z)`` along ``axis``, shifted by the (non-differentiated) maximum."""
  xp = namespace(z)
  z = xp.moveaxis(z, axis, -1)
  shifted = z - xp.max_nograd(z)
  out = shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))
  return xp.moveaxis(out, -1, axis)


def _softplus(xp, x):
  """``log(1 + exp(x))`` without overflow."""
  return xp.relu(x) + xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid(xp, x):
  return xp.exp(-_softplus(xp, -x))


def _pow(xp, q, gamma, stable: bool):
  """``q ** gamma`` for ``q >= 0``; ``stable``: a derivative of 0 (not NaN) at ``q = 0``."""
  if not stable:
    return q ** gamma
  positive = q > 0
  powered = xp.where(positive, q, 1.0) ** gamma
  zero = q * 0  # q's dtype and shape (NaN where q is NaN, which then propagates)
  at_zero = xp.where(gamma == 0, zero + 1, zero)
  return xp.where(positive, powered, at_zero)


def _per_class(xp, value, index, default: float, dtype):
  """A hyperparameter that is None, a scalar, or a (C,) vector, at each entry's class."""
  v = xp.asarray(default if value is None else value, dtype)
  if v.ndim == 0:
    return v
  return xp.gather(v, index)


def _valid(xp, shape, where):
  valid = xp.ones_bool(shape)
  if where is not None:
    valid = valid & xp.broadcast_to(xp.asarray(where, "bool"), shape)
  return valid


def reduce(loss, valid, positive, reduction: str, sample_weight=None):
  """Masked entries count 0; ``"mean"`` divides by the valid entries, ``"mean_positive"`` by
  the valid positive ones; a denominator of 0 counts as 1. ``sample_weight`` (None, a scalar
  or an array broadcastable to ``loss``) multiplies each entry and changes no denominator."""
  xp = namespace(loss)
  valid = xp.asarray(valid, "bool")
  if sample_weight is not None:
    loss = loss * xp.broadcast_to(xp.asarray(sample_weight, xp.float_dtype(loss)), loss.shape)
  loss = xp.where(valid, loss, 0.0)
  if reduction == "none":
    return loss
  total = xp.sum(loss)
  if reduction == "sum":
    return total
  if reduction == "mean":
    return total / xp.count(valid, total)
  if reduction == "mean_positive":
    return total / xp.count(valid & xp.asarray(positive, "bool"), total)
  raise ValueError(f"focal_reference: unknown reduction {reduction!r}; expected one of "
                   f"{REDUCTIONS}")


def softmax_focal(logits, labels, *, alpha=None, gamma=2.0, label_smoothing=0.0, axis=-1,
                  where=None, ignore_index=None, reduction="none", background_class=0,
                  sample_weight=None, compute="float64", stable=True):
  """``alpha[t] (1 - p)**gamma[t] (-(1 - eps) log p - eps/C sum_c log s_c)``, ``p = s_t``.

  The focal factor uses the unsmoothed ``p``; ``label_smoothing`` (eps) acts on the
  cross-entropy only. Positives (for ``"mean_positive"``): ``label != background_class``.
  """
  xp = namespace(logits)
  dtype = _compute_dtype(xp, logits, compute)
  z = xp.moveaxis(xp.asarray(logits, dtype), axis, -1)
  labels = xp.labels(labels)
  c = z.shape[-1]
  valid = _valid(xp, labels.shape, where)
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  in_range = (labels >= 0) & (labels < c)
  t = xp.where(valid & in_range, labels, 0)
  z = xp.where(valid[..., None], z, 0.0)
  log_s = log_softmax(z)
  log_p = xp.take_last(log_s, t)
  if stable:
    one_minus_p = -xp.expm1(log_p)
  else:
    one_minus_p = 1 - xp.exp(log_p)
  focal = _pow(xp, one_minus_p, _per_class(xp, gamma, t, 2.0, dtype), stable)
  eps = float(label_smoothing)
  ce = -(1 - eps) * log_p
  if eps:  # without smoothing a -inf logit (log_s = -inf) must not enter as 0 * -inf = NaN
    ce = ce - (eps / c) * xp.sum(log_s, axis=-1)
  loss = _per_class(xp, alpha, t, 1.0, dtype) * focal * ce
  loss = xp.where(in_range | ~valid, loss, float("nan"))
  return reduce(loss, valid, valid & (labels != background_class), reduction, sample_weight)


def sigmoid_focal(logits, labels, *, alpha=None, gamma=2.0, label_smoothing=0.0, where=None,
                  reduction="none", sample_weight=None, compute="float64", stable=True):
  """``alpha_t (1 - p_t)**gamma BCE(x, y)``, ``y`` moved toward 1/2 by ``label_smoothing``.

  torchvision's and optax's formula: ``p = sigmoid(x)``, ``p_t = p y + (1 - p)(1 - y)``,
  ``alpha_t = alpha y + (1 - alpha)(1 - y)`` (``alpha=None``: no weighting). ``alpha`` and
  ``gamma`` broadcast against the logits. Positives: ``label > 0``.
  """
  xp = namespace(logits)
  dtype = _compute_dtype(xp, logits, compute)
  x = xp.asarray(logits, dtype)
  y_raw = xp.asarray(labels, dtype)
  valid = _valid(xp, x.shape, where)
  x = xp.where(valid, x, 0.0)
  eps = float(label_smoothing)
  y = y_raw * (1 - eps) + eps / 2
  bce = _softplus(xp, x) - x * y
  if stable:
    one_minus_pt = y * _sigmoid(xp, -x) + (1 - y) * _sigmoid(xp, x)
  else:
    p = _sigmoid(xp, x)
    one_minus_pt = 1 - (p * y + (1 - p) * (1 - y))
  # Explicit broadcasts: JAX's tests forbid implicit rank promotion.
  g = xp.broadcast_to(xp.asarray(gamma, dtype), x.shape)
  loss = _pow(xp, one_minus_pt, g, stable) * bce
  if alpha is not None:
    a = xp.broadcast_to(xp.asarray(alpha, dtype), x.shape)
    loss = (a * y + (1 - a) * (1 - y)) * loss
  return reduce(loss, valid, valid & (y_raw > 0), reduction, sample_weight)


def categorical_focal(logits, targets, *, alpha=None, gamma=2.0, axis=-1, where=None,
                      reduction="none", background_class=0, sample_weight=None,
                      compute="float64", stable=True):
  """``sum_c -alpha[c] y[c] (1 - s[c])**gamma[c] log s[c]`` (keras'
  ``CategoricalFocalCrossentropy`` from logits, without its clipping).

  ``alpha`` and ``gamma``: None / scalars or (C,) vectors. Positives: rows whose
  ``argmax(targets) != background_class``.
  """
  xp = namespace(logits)
  dtype = _compute_dtype(xp, logits, compute)
  z = xp.moveaxis(xp.asarray(logits, dtype), axis, -1)
  y = xp.moveaxis(xp.asarray(targets, dtype), axis, -1)
  valid = _valid(xp, z.shape[:-1], where)
  z = xp.where(valid[..., None], z, 0.0)
  log_s = log_softmax(z)
  if stable:
    one_minus_s = -xp.expm1(log_s)
  else:
    one_minus_s = 1 - xp.exp(log_s)
  a = 1.0 if alpha is None else xp.broadcast_to(xp.asarray(alpha, dtype), z.shape)
  g = xp.broadcast_to(xp.asarray(gamma, dtype), z.shape)
  loss = -xp.sum(a * y * _pow(xp, one_minus_s, g, stable) * log_s, axis=-1)
  positive = valid & (xp.argmax(y) != background_class)
  return reduce(loss, valid, positive, reduction, sample_weight)


FUNCTIONS = {
    "softmax_focal": softmax_focal,
    "sigmoid_focal": sigmoid_focal,
    "categorical_focal": categorical_focal,
}
