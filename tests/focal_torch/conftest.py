"""Float64 NumPy references for the focal_torch tests, written from the formulas.

They share no code with ``focal_torch``: plain NumPy, the class axis moved last, one line per
term, gradients by the chain rule written out (``d(1 - p)/dz = p (s - onehot)`` etc.). They
are exact where ``1 - p`` is representable in float64 (margins below ~700); tests at larger
margins compare values only or use their own guards.

Exposed as the session fixture ``ref`` (test modules cannot import each other).
"""

from __future__ import annotations

import socket
import types

import numpy as np
import pytest
import torch

F64 = np.float64


def log_softmax(z: np.ndarray) -> np.ndarray:
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _at_label(value, labels: np.ndarray, default: float) -> np.ndarray:
  if value is None:
    return np.full(labels.shape, default)
  v = np.asarray(value, F64)
  return np.broadcast_to(v, labels.shape) if v.ndim == 0 else v[labels]


def _reduce(loss, grad, valid, positive, reduction):
  """Reduced value and d(value)/d(logits); ``grad`` is d(loss_i)/d(logits)."""
  if reduction == "none":
    return loss, grad
  denom = {"sum": 1.0, "mean": max(int(valid.sum()), 1),
           "mean_positive": max(int(positive.sum()), 1)}[reduction]
  return loss.sum() / denom, grad / denom


def softmax_focal(z, labels, *, alpha=None, gamma=2.0, label_smoothing=0.0,
                  reduction="mean", where=None, ignore_index=-100, background_class=0,
                  dim=1):
  """``alpha[t] (1 - p)^gamma[t] (-(1-eps) log p - eps/C sum_c log s_c)`` and its gradient.

  Returns ``(value, grad)``; for ``"none"`` the per-entry losses and the gradient of their
  sum.
  """
  z = np.moveaxis(np.asarray(z, F64), dim, -1)
  labels = np.asarray(labels)
  c = z.shape[-1]
  valid = np.ones(labels.shape, bool)
  if ignore_index is not None:
    valid &= labels != ignore_index
  if where is not None:
    valid &= np.asarray(where, bool)
  t = np.where(valid, labels, 0)
  ls = log_softmax(z)
  s = np.exp(ls)
  onehot = np.eye(c)[t]
  log_p = np.take_along_axis(ls, t[..., None], -1)[..., 0]
  p = np.exp(log_p)
  q = -np.expm1(log_p)
  g = _at_label(gamma, t, 2.0)
  a = _at_label(alpha, t, 1.0)
  eps = float(label_smoothing)
  ce = -(1 - eps) * log_p - eps / c * ls.sum(-1)
  loss = np.where(valid, a * q ** g * ce, 0.0)
  # Chain rule: d q / dz = p (s - onehot); d ce / dz = s - ((1 - eps) onehot + eps / C).
  with np.errstate(divide="ignore", invalid="ignore"):
    dfocal = np.where(q > 0, g * q ** (g - 1), np.where(g == 1, 1.0, 0.0))
  dq = p[..., None] * (s - onehot)
  dce = s - ((1 - eps) * onehot + eps / c)
  grad = a[..., None] * (dfocal[..., None] * dq * ce[..., None] + (q ** g)[..., None] * dce)
  grad = np.where(valid[..., None], grad, 0.0)
  positive = valid & (labels != background_class)
  value, grad = _reduce(loss, grad, valid, positive, reduction)
  return value, np.moveaxis(grad, -1, dim)


def sigmoid_focal(x, y, *, alpha=None, gamma=2.0, label_smoothing=0.0, reduction="mean",
                  where=None, dim=1):
  """torchvision's ``sigmoid_focal_loss`` written out (``alpha=None``: no weighting), labels
  smoothed toward 1/2 first, with per-class ``(C,)`` alpha/gamma along ``dim``."""
  x = np.asarray(x, F64)
  y_raw = np.asarray(y, F64)
  eps = float(label_smoothing)
  y = y_raw * (1 - eps) + eps / 2

  def along_dim(v):
    v = np.asarray(v, F64)
    if v.ndim == 1:
      shape = [1] * x.ndim
      shape[dim] = -1
      v = v.reshape(shape)
    return v

  g = along_dim(gamma)
  p = 1 / (1 + np.exp(-x))
  ce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))  # BCE with logits
  p_t = p * y + (1 - p) * (1 - y)
  loss = ce * (1 - p_t) ** g
  # d/dx: d ce = p - y; d(1 - p_t) = p (1 - p) (1 - 2y).
  with np.errstate(divide="ignore", invalid="ignore"):
    dfocal = np.where(1 - p_t > 0, g * (1 - p_t) ** (g - 1), np.where(g == 1, 1.0, 0.0))
  grad = dfocal * p * (1 - p) * (1 - 2 * y) * ce + (1 - p_t) ** g * (p - y)
  if alpha is not None:
    a = along_dim(alpha)
    alpha_t = a * y + (1 - a) * (1 - y)
    loss = alpha_t * loss
    grad = alpha_t * grad
  valid = np.ones(x.shape, bool) if where is None else np.asarray(where, bool)
  loss = np.where(valid, loss, 0.0)
  grad = np.where(valid, grad, 0.0)
  return _reduce(loss, grad, valid, valid & (y_raw > 0), reduction)


def categorical_focal(z, y, *, alpha=None, gamma=2.0, reduction="mean", where=None,
                      background_class=0, dim=1):
  """keras' ``CategoricalFocalCrossentropy``: ``-sum_c alpha_c y_c (1-s_c)^gamma_c log s_c``."""
  z = np.moveaxis(np.asarray(z, F64), dim, -1)
  y = np.moveaxis(np.asarray(y, F64), dim, -1)
  c = z.shape[-1]
  a = np.ones(c) if alpha is None else np.broadcast_to(np.asarray(alpha, F64), (c,))
  g = np.broadcast_to(np.asarray(gamma, F64), (c,))
  ls = log_softmax(z)
  s = np.exp(ls)
  q = 1 - s
  loss = -(a * y * q ** g * ls).sum(-1)
  # d log s_c / dz_j = delta_cj - s_j; d q_c / dz_j = -s_c (delta_cj - s_j).
  with np.errstate(divide="ignore", invalid="ignore"):
    dfocal = np.where(q > 0, g * q ** (g - 1), np.where(g == 1, 1.0, 0.0))
  coef = a * y * (q ** g - dfocal * s * ls)  # -d loss / d log s_c (q_c = 1 - exp(log s_c))
  grad = -(coef - s * coef.sum(-1, keepdims=True))
  valid = np.ones(loss.shape, bool) if where is None else np.asarray(where, bool)
  loss = np.where(valid, loss, 0.0)
  grad = np.where(valid[..., None], grad, 0.0)
  positive = valid & (y.argmax(-1) != background_class)
  value, grad = _reduce(loss, grad, valid, positive, reduction)
  return value, np.moveaxis(grad, -1, dim)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Tolerances of the loss tests against the float64 references, per input dtype.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -8),
       torch.float16: dict(rtol=2 ** -10, atol=2 ** -11)}


def grad(loss: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
  """d(loss)/dx, summing a non-scalar loss first."""
  out = loss if loss.ndim == 0 else loss.sum()
  return torch.autograd.grad(out, x, create_graph=create_graph)[0]


@pytest.fixture(scope="session")
def ref():
  """The NumPy references: ``ref.softmax_focal``, ``ref.sigmoid_focal``,
  ``ref.categorical_focal``, ``ref.log_softmax``, ``ref.free_port``; and two test helpers,
  ``ref.TOL`` (tolerances per dtype) and ``ref.grad``.
  """
  return types.SimpleNamespace(
      softmax_focal=softmax_focal, sigmoid_focal=sigmoid_focal,
      categorical_focal=categorical_focal, log_softmax=log_softmax,
      free_port=free_port, TOL=TOL, grad=grad)
