"""Float64 NumPy formulas of other libraries' focal losses, each in that library's convention.

Written from each library's documentation and source behaviour (read, not copied; none of them
is installed here), one function per documented call, so that ``test_migrations.py`` can check
the README's "Migrating" rows against them, value and gradient. They share no code with
``focal_jax`` or ``focal_torch`` and keep each library's quirks (kornia's one-hot epsilon,
mmcv's ``log(max(p, FLT_MIN))`` clamp, mmdet's ``avg_factor + eps``, the blog's broadcast of
``weights[target]``), so the tests show where a row is exact and where it is not.

The formulas are the naive ones (``(1 - p) ** gamma``, ``log(sigmoid(x))`` as the libraries write
them): exact enough in float64 at the moderate logits the tests draw. Gradients come from
``fd_grad``, central finite differences of the formula in float64.

Sources (the versions read):
- kornia ``kornia/losses/focal.py`` (``focal_loss``, ``binary_focal_loss_with_logits``),
  ``kornia/losses/one_hot.py`` and ``kornia/losses/_utils.py`` (``mask_ignore_pixels``).
- mmcv ``mmcv/ops/focal_loss.py`` and ``.../cuda/sigmoid_focal_loss_cuda_kernel.cuh``
  (``sigmoid_focal_loss``), mmdet ``mmdet/models/losses/focal_loss.py``
  (``py_sigmoid_focal_loss``, ``FocalLoss.forward``) and ``.../losses/utils.py``
  (``weight_reduce_loss``).
- ``../shared/seeds/`` 001 (a blog's ``FocalLossBinary``, ``FocalLossMultiClass``,
  ``WeightedFocalLoss``), 003 (an AD-conversion model's ``FocalLoss``), 004 (the focal_loss
  repository, itakurah/Focal-loss-PyTorch: its README formulas and its ``focal_loss.py``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

FLT_MIN = float(np.finfo(np.float32).tiny)  # C's FLT_MIN, mmcv's log clamp
FLT_EPS = float(np.finfo(np.float32).eps)  # mmdet's avg_factor guard


# ----------------------------------------------------------------------------------------------
# shared plain pieces


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
  m = np.max(x, axis=axis, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
  return -np.logaddexp(0.0, -x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _one_hot_axis1(t: np.ndarray, num_classes: int) -> np.ndarray:
  """(N, *) integer labels -> (N, C, *) float64 one-hot (out-of-range labels: all zeros)."""
  classes = np.arange(num_classes).reshape((1, num_classes) + (1,) * (t.ndim - 1))
  return (t[:, None] == classes).astype(np.float64)


def _bce_with_logits(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  # F.binary_cross_entropy_with_logits(reduction="none")
  return -(y * _log_sigmoid(x) + (1.0 - y) * _log_sigmoid(-x))


def _reduce(loss: np.ndarray, reduction: str) -> np.ndarray:
  if reduction == "none":
    return loss
  if reduction == "mean":
    return np.asarray(loss.mean())
  if reduction == "sum":
    return np.asarray(loss.sum())
  raise ValueError(reduction)


def fd_grad(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
  """Central finite differences of a scalar function of a float64 array."""
  x = np.array(x, dtype=np.float64)
  g = np.zeros_like(x)
  flat, gflat = x.reshape(-1), g.reshape(-1)
  for i in range(flat.size):
    keep = flat[i]
    flat[i] = keep + h
    up = float(f(x))
    flat[i] = keep - h
    down = float(f(x))
    flat[i] = keep
    gflat[i] = (up - down) / (2.0 * h)
  return g


# ----------------------------------------------------------------------------------------------
# kornia


def kornia_focal_loss(pred, target, alpha, gamma=2.0, reduction="none", weight=None,
                      ignore_index=-100, one_hot_eps=1e-6):
  """kornia ``focal_loss``: multi-class, logits (N, C, *), labels (N, *).

  Per class c: ``-alpha_c (1 - s_c) ** gamma * log s_c * onehot_c``, NOT summed over classes:
  the result is (N, C, *) and "mean" averages over N x C x positions (ignored ones included).
  ``alpha`` (a float) means class weights ``[1 - alpha, alpha, ..., alpha]``; ``weight`` (C,)
  multiplies per class; ``onehot`` is kornia's ``one_hot``: ``onehot * (1 - eps) + eps`` with
  ``eps = 1e-6`` (``one_hot_eps``), then zeroed at ignored pixels (``mask_ignore_pixels`` maps
  them to class 0 and masks the whole one-hot row).
  """
  pred = np.asarray(pred, np.float64)
  target = np.asarray(target)
  num_classes = pred.shape[1]
  bshape = (-1,) + (1,) * (pred.ndim - 2)
  mask = None
  if ignore_index is not None:
    mask = target != ignore_index
    target = np.where(mask, target, 0)
  onehot = _one_hot_axis1(target, num_classes) * (1.0 - one_hot_eps) + one_hot_eps
  if mask is not None:
    onehot = onehot * mask[:, None]
  log_s = _log_softmax(pred, axis=1)
  loss = -np.power(1.0 - np.exp(log_s), gamma) * log_s * onehot
  if alpha is not None:
    fac = np.array([1.0 - alpha] + [alpha] * (num_classes - 1))
    loss = fac.reshape(bshape) * loss
  if weight is not None:
    loss = np.asarray(weight, np.float64).reshape(bshape) * loss
  return _reduce(loss, reduction)


def kornia_binary_focal_loss_with_logits(pred, target, alpha=0.25, gamma=2.0, reduction="none",
                                         pos_weight=None, weight=None, ignore_index=-100):
  """kornia ``binary_focal_loss_with_logits``: logits and targets (N, C, *), same shape.

  ``-alpha (1 - p) ** gamma y log p - (1 - alpha) p ** gamma (1 - y) log(1 - p)``, each term with
  its own factor (equal to ``alpha_t (1 - p_t) ** gamma BCE`` for hard labels only); ``alpha``
  None drops both alpha factors; ``pos_weight`` (C,) multiplies the positive term per class,
  ``weight`` (C,) the whole loss per class (class axis 1); entries equal to ``ignore_index``
  have their log-probabilities zeroed (loss 0). "mean" averages over every entry.
  """
  pred = np.asarray(pred, np.float64)
  target = np.asarray(target, np.float64)
  bshape = (-1,) + (1,) * (pred.ndim - 2)
  log_pos = _log_sigmoid(pred)
  log_neg = _log_sigmoid(-pred)
  if ignore_index is not None:
    mask = target != ignore_index
    target = np.where(mask, target, 0.0)
    log_pos = log_pos * mask
    log_neg = log_neg * mask
  pos = -np.power(np.exp(log_neg), gamma) * target * log_pos
  neg = -np.power(np.exp(log_pos), gamma) * (1.0 - target) * log_neg
  if alpha is not None:
    pos = alpha * pos
    neg = (1.0 - alpha) * neg
  if pos_weight is not None:
    pos = np.asarray(pos_weight, np.float64).reshape(bshape) * pos
  loss = pos + neg
  if weight is not None:
    loss = np.asarray(weight, np.float64).reshape(bshape) * loss
  return _reduce(loss, reduction)


# ----------------------------------------------------------------------------------------------
# mmcv / mmdet


def mmcv_sigmoid_focal_loss(inp, target, gamma=2.0, alpha=0.25, weight=None, reduction="mean"):
  """mmcv ``ops.sigmoid_focal_loss(input, target, gamma, alpha, weight, reduction)``.

  Logits (N, C), integer labels (N,) in ``[0, C]``: entry (n, c) is positive iff
  ``target[n] == c``, so the label C (``num_classes``) is background (every entry negative).
  ``-alpha (1 - p) ** gamma log(max(p, FLT_MIN))`` for positives,
  ``-(1 - alpha) p ** gamma log(max(1 - p, FLT_MIN))`` for negatives; ``weight`` (C,) is taken
  at the row's label and multiplies the whole row; "mean" is the sum divided by N.
  """
  x = np.asarray(inp, np.float64)
  target = np.asarray(target)
  n, c = x.shape
  flag_p = (target[:, None] == np.arange(c)[None, :]).astype(np.float64)
  p = _sigmoid(x)
  term_p = np.power(1.0 - p, gamma) * np.log(np.maximum(p, FLT_MIN))
  term_n = np.power(p, gamma) * np.log(np.maximum(1.0 - p, FLT_MIN))
  out = -flag_p * alpha * term_p - (1.0 - flag_p) * (1.0 - alpha) * term_n
  if weight is not None:
    out = out * np.asarray(weight, np.float64)[target][:, None]
  if reduction == "mean":
    return np.asarray(out.sum() / n)
  return _reduce(out, reduction)


def mmcv_sigmoid_focal_loss_grad(inp, target, gamma=2.0, alpha=0.25, weight=None,
                                 reduction="mean"):
  """d(sum of mmcv's loss)/d(input), its backward kernel's closed form (reduction scaling too)."""
  x = np.asarray(inp, np.float64)
  target = np.asarray(target)
  n, c = x.shape
  flag_p = (target[:, None] == np.arange(c)[None, :]).astype(np.float64)
  p = _sigmoid(x)
  term_p = np.power(1.0 - p, gamma) * (1.0 - p - gamma * p * np.log(np.maximum(p, FLT_MIN)))
  term_n = np.power(p, gamma) * (gamma * (1.0 - p) * np.log(np.maximum(1.0 - p, FLT_MIN)) - p)
  g = -flag_p * alpha * term_p - (1.0 - flag_p) * (1.0 - alpha) * term_n
  if weight is not None:
    g = g * np.asarray(weight, np.float64)[target][:, None]
  return g / n if reduction == "mean" else g


def mmdet_py_sigmoid_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.25,
                                reduction="mean", avg_factor=None):
  """mmdet ``py_sigmoid_focal_loss`` after ``FocalLoss.forward``'s label handling.

  Integer labels (N,) become ``one_hot(target, C + 1)[:, :C]`` (label C: background, all
  zeros); one-hot (N, C) targets pass as they are. Loss: torchvision's
  ``alpha_t (1 - p_t) ** gamma BCE``. ``weight_reduce_loss``: a (N,) weight multiplies rows;
  "mean" is the mean over N x C, or ``sum / (avg_factor + float32 eps)`` with ``avg_factor``.
  """
  x = np.asarray(pred, np.float64)
  target = np.asarray(target)
  n, c = x.shape
  if target.ndim != x.ndim:
    target = (target[:, None] == np.arange(c + 1)[None, :])[:, :c]
  y = target.astype(np.float64)
  p = _sigmoid(x)
  pt = (1.0 - p) * y + p * (1.0 - y)
  focal_weight = (alpha * y + (1.0 - alpha) * (1.0 - y)) * np.power(pt, gamma)
  loss = _bce_with_logits(x, y) * focal_weight
  if weight is not None:
    weight = np.asarray(weight, np.float64)
    if weight.shape != loss.shape:
      weight = weight.reshape(n, -1)
    loss = loss * weight
  if avg_factor is None:
    return _reduce(loss, reduction)
  if reduction == "mean":
    return np.asarray(loss.sum() / (avg_factor + FLT_EPS))
  raise ValueError("avg_factor can not be used with reduction='sum'")


# ----------------------------------------------------------------------------------------------
# seed 001: a blog's three modules


def blog001_binary(inp, target, gamma=2.0, alpha=0.25):
  """``FocalLossBinary``: ``p_t = where(target == 1, p, 1 - p)``, one alpha on both terms,
  ``-alpha (1 - p_t) ** gamma log p_t``, mean."""
  x = np.asarray(inp, np.float64)
  target = np.asarray(target)
  p = _sigmoid(x)
  pt = np.where(target == 1, p, 1.0 - p)
  return np.asarray(np.mean(-alpha * np.power(1.0 - pt, gamma) * np.log(pt)))


def blog001_multiclass(inp, target, gamma=2.0, alpha=None, num_classes=10):
  """``FocalLossMultiClass``: ``-alpha * (1 - s) ** gamma * log s * onehot`` over (N, C),
  ``alpha`` a (C,) list (None: ones), summed over classes, mean over N."""
  x = np.asarray(inp, np.float64)
  target = np.asarray(target)
  a = np.ones(num_classes) if alpha is None else np.asarray(alpha, np.float64)
  log_s = _log_softmax(x, axis=1)
  onehot = _one_hot_axis1(target, num_classes)
  loss = -a * np.power(1.0 - np.exp(log_s), gamma) * log_s * onehot
  return np.asarray(loss.sum(axis=1).mean())


def blog001_weighted(inp, target, gamma=2.0, weights=None, num_classes=10):
  """``WeightedFocalLoss``, broadcasting as the blog's code does.

  With weights: ``-weights[target] * (1 - s) ** gamma * log s * onehot``, where
  ``weights[target]`` has shape (N,) and broadcasts against (N, C) along the LAST axis (NumPy
  and torch agree): it only runs when N == C (or N == 1), and then column c carries
  ``weights[target[c]]``, so row i is weighted by ``weights[target[target[i]]]``. Summed over
  classes, mean over N. Without weights: the unreduced (N, C) matrix.
  """
  x = np.asarray(inp, np.float64)
  target = np.asarray(target)
  log_s = _log_softmax(x, axis=1)
  onehot = _one_hot_axis1(target, num_classes)
  factor = np.power(1.0 - np.exp(log_s), gamma)
  if weights is not None:
    w = np.asarray(weights, np.float64)[target]
    return np.asarray((-w * factor * log_s * onehot).sum(axis=1).mean())
  return -factor * log_s * onehot


# ----------------------------------------------------------------------------------------------
# seed 003: an AD-conversion model's FocalLoss


def ad003_focal(logits, targets, alpha=0.25, gamma=2.0, reduction="mean", label_smoothing=0.0):
  """003's ``FocalLoss(alpha, gamma, reduction, label_smoothing)`` on (N, 2) logits, labels (N,).

  As documented: ``FL = -alpha_t (1 - p_t) ** gamma log p_t``, alpha the weight of the positive
  class (class 1; class 0 gets ``1 - alpha``), targets smoothed as
  ``target * (1 - eps) + eps / num_classes``. Read (as docs/design.md, "Categorical", does)
  as the per-class sum ``-sum_c alpha_c y_c (1 - s_c) ** gamma log s_c`` over the smoothed
  targets y; "mean" over N.
  """
  x = np.asarray(logits, np.float64)
  targets = np.asarray(targets)
  num_classes = x.shape[1]
  if num_classes != 2:
    raise ValueError("003's alpha is the weight of the positive class: two classes")
  y = _one_hot_axis1(targets, num_classes) * (1.0 - label_smoothing) + label_smoothing / 2
  a = np.array([1.0 - alpha, alpha])
  log_s = _log_softmax(x, axis=1)
  loss = -(a * y * np.power(1.0 - np.exp(log_s), gamma) * log_s).sum(axis=1)
  return _reduce(loss, reduction)


# ----------------------------------------------------------------------------------------------
# seed 004: the focal_loss repository (itakurah/Focal-loss-PyTorch)


def fl004(inputs, targets, gamma=2.0, alpha=None, reduction="mean", task_type="binary",
          num_classes=None, convention="readme"):
  """004's ``FocalLoss(gamma, alpha, reduction, task_type, num_classes)``.

  ``convention="readme"``: the formulas of its README (the seed document):
  binary / multi-label ``-alpha [y (1 - p) ** gamma log p + (1 - y) p ** gamma log(1 - p)]``
  (one alpha on both terms; no alpha: 1), "mean" over every entry; multi-class
  ``-alpha_t (1 - p_t) ** gamma log p_t`` "summed over all classes and averaged over the batch".

  ``convention="code"``: its ``focal_loss.py``: binary / multi-label
  ``alpha_t (1 - p_t) ** gamma BCE`` with ``alpha_t = alpha y + (1 - alpha)(1 - y)``;
  multi-class the (N, C) matrix ``(1 - p_t) ** gamma * alpha[t] * (-onehot * log s)``, whose
  "mean" is over N x C.
  """
  x = np.asarray(inputs, np.float64)
  targets = np.asarray(targets)
  if task_type in ("binary", "multi-label"):
    y = targets.astype(np.float64)
    p = _sigmoid(x)
    if convention == "readme":
      a = 1.0 if alpha is None else alpha
      loss = -a * (y * np.power(1.0 - p, gamma) * np.log(p)
                   + (1.0 - y) * np.power(p, gamma) * np.log(1.0 - p))
      return _reduce(loss, reduction)
    pt = p * y + (1.0 - p) * (1.0 - y)
    bce = _bce_with_logits(x, y)
    if alpha is not None:
      bce = (alpha * y + (1.0 - alpha) * (1.0 - y)) * bce
    return _reduce(np.power(1.0 - pt, gamma) * bce, reduction)
  if task_type != "multi-class":
    raise ValueError(task_type)
  log_s = _log_softmax(x, axis=1)
  onehot = _one_hot_axis1(targets, num_classes)
  a_t = np.ones(len(targets)) if alpha is None else np.asarray(alpha, np.float64)[targets]
  pt = np.sum(np.exp(log_s) * onehot, axis=1)
  if convention == "readme":
    loss = -a_t * np.power(1.0 - pt, gamma) * np.sum(onehot * log_s, axis=1)
    return np.asarray(loss.sum() / len(targets)) if reduction == "mean" else _reduce(
        loss, reduction)
  loss = np.power(1.0 - pt, gamma)[:, None] * a_t[:, None] * (-onehot * log_s)
  return _reduce(loss, reduction)
