"""Float64 references of the three focal losses, written from the formulas in DESIGN.md.

These are the "truth" every comparison is measured against. They are deliberately plain:
torch in float64 with autograd for the gradient, the class axis moved last, masks applied with
``torch.where``, one line per term of the formula. Two guards keep them exact where the naive
formula is not, so that they can serve as truth at saturated margins:

- ``1 - p`` is computed without cancellation (``-expm1(log p)`` for softmax,
  ``y * sigmoid(-x) + (1 - y) * sigmoid(x)`` for sigmoid);
- ``q ** gamma`` has a zero-safe derivative (``d/dq q**gamma`` is infinite at ``q = 0`` for
  ``gamma < 1``, while the product with ``dq/dz = 0`` there is 0), via the double-``where``.

They share no code with ``focal_jax`` or ``focal_torch``. ``compute`` (default float64) lets
``parity_tests.tolerances`` evaluate the same formulas in float32 to measure how far a plain
float32 evaluation lies from float64: that is the error budget the tolerances are derived from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

F64 = torch.float64


def _t(x: Any, dtype=F64) -> torch.Tensor:
  if isinstance(x, torch.Tensor):
    return x.to(dtype)
  return torch.as_tensor(np.asarray(x), dtype=dtype)


def _safe_pow(q: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
  """``q ** gamma`` for ``q >= 0`` whose gradient is finite (0) at ``q = 0``."""
  pos = q > 0
  q_safe = torch.where(pos, q, torch.ones_like(q))
  zero_value = torch.where(gamma == 0, torch.ones_like(q), torch.zeros_like(q))
  return torch.where(pos, q_safe ** gamma, zero_value)


def _reduce(loss: torch.Tensor, valid: torch.Tensor, positive: torch.Tensor,
            reduction: str) -> torch.Tensor:
  loss = torch.where(valid, loss, torch.zeros_like(loss))
  if reduction == "none":
    return loss
  if reduction == "sum":
    return loss.sum()
  if reduction == "mean":
    return loss.sum() / max(int(valid.sum()), 1)
  if reduction == "mean_positive":
    return loss.sum() / max(int(positive.sum()), 1)
  raise ValueError(f"reference: unknown reduction {reduction!r}")


def _per_class(value, labels: torch.Tensor, default: float, dtype) -> torch.Tensor:
  """Scalar or (C,)-vector hyperparameter, gathered at the labels."""
  if value is None:
    return torch.full(labels.shape, default, dtype=dtype)
  v = _t(value, dtype)
  if v.ndim == 0:
    return v.expand(labels.shape)
  return v[labels]


def softmax_focal(logits: torch.Tensor, labels, *, alpha=None, gamma=2.0,
                  label_smoothing=0.0, axis=-1, where=None, ignore_index=None,
                  reduction="none", background_class=0, compute=F64) -> torch.Tensor:
  """``alpha[t] * (1 - p)**gamma[t] * ((1-eps) * -log p - eps/C * sum_c log s_c)``."""
  z = torch.movedim(logits.to(compute), axis, -1)
  c = z.shape[-1]
  labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
  valid = torch.ones(labels.shape, dtype=torch.bool)
  if where is not None:
    valid &= torch.as_tensor(np.asarray(where), dtype=torch.bool)
  if ignore_index is not None:
    valid &= labels != ignore_index
  safe = torch.where(valid, labels, torch.zeros_like(labels))
  log_s = torch.log_softmax(z, dim=-1)
  log_p = torch.gather(log_s, -1, safe[..., None])[..., 0]
  one_minus_p = -torch.expm1(log_p)
  focal = _safe_pow(one_minus_p, _per_class(gamma, safe, 2.0, compute))
  eps = float(label_smoothing)
  ce = -(1 - eps) * log_p - (eps / c) * log_s.sum(-1)
  loss = _per_class(alpha, safe, 1.0, compute) * focal * ce
  return _reduce(loss, valid, valid & (labels != background_class), reduction)


def sigmoid_focal(logits: torch.Tensor, labels, *, alpha=None, gamma=2.0,
                  label_smoothing=0.0, where=None, reduction="none",
                  compute=F64) -> torch.Tensor:
  """``alpha_t * (1 - p_t)**gamma * BCE(x, y)``, ``y`` smoothed toward 0.5 first."""
  x = logits.to(compute)
  y_raw = _t(labels, compute)
  eps = float(label_smoothing)
  y = y_raw * (1 - eps) + eps / 2
  valid = torch.ones(x.shape, dtype=torch.bool)
  if where is not None:
    valid &= torch.as_tensor(np.asarray(where), dtype=torch.bool)
  bce = torch.relu(x) - x * y + torch.log1p(torch.exp(-torch.abs(x)))
  one_minus_pt = y * torch.sigmoid(-x) + (1 - y) * torch.sigmoid(x)
  loss = _safe_pow(one_minus_pt, _t(gamma, compute)) * bce
  if alpha is not None:
    a = _t(alpha, compute)
    loss = (a * y + (1 - a) * (1 - y)) * loss
  return _reduce(loss, valid, valid & (y_raw > 0), reduction)


def categorical_focal(logits: torch.Tensor, targets, *, alpha=None, gamma=2.0, axis=-1,
                      where=None, reduction="none", background_class=0,
                      compute=F64) -> torch.Tensor:
  """``sum_c -alpha[c] * y[c] * (1 - s[c])**gamma[c] * log s[c]``."""
  z = torch.movedim(logits.to(compute), axis, -1)
  y = torch.movedim(_t(targets, compute), axis, -1)
  c = z.shape[-1]
  log_s = torch.log_softmax(z, dim=-1)
  one_minus_s = -torch.expm1(log_s)
  g = _t(gamma, compute)
  a = torch.ones(c, dtype=compute) if alpha is None else _t(alpha, compute).expand(c)
  per_class = -a * y * _safe_pow(one_minus_s, g.expand(c) if g.ndim else g) * log_s
  loss = per_class.sum(-1)
  valid = torch.ones(loss.shape, dtype=torch.bool)
  if where is not None:
    valid &= torch.as_tensor(np.asarray(where), dtype=torch.bool)
  positive = valid & (torch.argmax(y, dim=-1) != background_class)
  return _reduce(loss, valid, positive, reduction)


FUNCTIONS = {
    "softmax_focal": softmax_focal,
    "sigmoid_focal": sigmoid_focal,
    "categorical_focal": categorical_focal,
}
