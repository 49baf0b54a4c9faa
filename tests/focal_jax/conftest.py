"""Float64 references for the focal_jax tests, written from the formulas of DESIGN.md.

NumPy references give values; the `jnp_*` ones are the same formulas written naively in
jax.numpy (no custom derivative, no log-space tricks) so that plain float64 autodiff of them is
an independent reference for gradients and Hessians at moderate margins.

They are handed to test modules through the `refs` fixture (pytest runs with
--import-mode=importlib, so test modules cannot import each other).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = np.asarray(z, np.float64)
  shifted = z - z.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _class_values(v, t, num_classes):
  """alpha / gamma per row: None -> 1, scalar, or a (C,) vector indexed by the label."""
  if v is None:
    return np.ones(np.shape(t))
  v = np.asarray(v, np.float64)
  return v[t] if v.ndim else np.full(np.shape(t), float(v))


def softmax_focal_rows(z, t, alpha=None, gamma=2.0, label_smoothing=0.0):
  """Per-row loss, class axis last, labels in range: alpha_t (1 - p)^gamma_t CE_eps."""
  z = np.asarray(z, np.float64)
  t = np.asarray(t)
  num_classes = z.shape[-1]
  ls = _log_softmax(z)
  log_p = np.take_along_axis(ls, t[..., None], -1)[..., 0]
  p = np.exp(log_p)
  ce = -(1 - label_smoothing) * log_p - label_smoothing / num_classes * ls.sum(-1)
  a = _class_values(alpha, t, num_classes)
  g = _class_values(gamma, t, num_classes)
  return a * (1 - p) ** g * ce


def reduce(loss, valid, positive, reduction):
  """Reference reductions: masked entries are 0; denominators of 0 are taken as 1."""
  loss = np.where(valid, loss, 0.0)
  if reduction == "none":
    return loss
  if reduction == "sum":
    return loss.sum()
  if reduction == "mean":
    return loss.sum() / max(int(np.sum(valid)), 1)
  if reduction == "mean_positive":
    return loss.sum() / max(int(np.sum(positive & valid)), 1)
  raise ValueError(reduction)


def softmax_focal(logits, labels, *, alpha=None, gamma=2.0, label_smoothing=0.0, axis=-1,
                  where=None, ignore_index=None, reduction="none", background_class=0):
  """Reference softmax_focal: any axis, masks, NaN for unmasked out-of-range labels."""
  z = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
  labels = np.asarray(labels)
  num_classes = z.shape[-1]
  valid = np.ones(labels.shape, bool) if where is None else np.broadcast_to(where, labels.shape)
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  in_range = (labels >= 0) & (labels < num_classes)
  t = np.where(in_range, labels, 0)
  loss = softmax_focal_rows(z, t, alpha, gamma, label_smoothing)
  loss = np.where(in_range, loss, np.nan)
  positive = valid & (labels != background_class)
  return reduce(loss, valid, positive, reduction)


def sigmoid_focal(logits, labels, *, alpha=None, gamma=2.0, label_smoothing=0.0, where=None,
                  reduction="none"):
  """Reference sigmoid_focal (torchvision's formula), labels smoothed toward 1/2 first."""
  x = np.asarray(logits, np.float64)
  y0 = np.asarray(labels, np.float64)
  y = (1 - label_smoothing) * y0 + 0.5 * label_smoothing
  log_p = -np.logaddexp(0.0, -x)
  log_q = -np.logaddexp(0.0, x)
  p = np.exp(log_p)
  bce = -(y * log_p + (1 - y) * log_q)
  p_t = p * y + (1 - p) * (1 - y)
  g = np.asarray(gamma, np.float64)
  loss = (1 - p_t) ** g * bce
  if alpha is not None:
    a = np.asarray(alpha, np.float64)
    loss = (a * y + (1 - a) * (1 - y)) * loss
  valid = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
  return reduce(loss, valid, valid & (y0 > 0), reduction)


def categorical_focal(logits, targets, *, alpha=None, gamma=2.0, axis=-1, where=None,
                      reduction="none", background_class=0):
  """Reference categorical_focal: -sum_c alpha_c y_c (1 - s_c)^gamma_c log s_c."""
  z = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
  y = np.moveaxis(np.asarray(targets, np.float64), axis, -1)
  ls = _log_softmax(z)
  a = 1.0 if alpha is None else np.asarray(alpha, np.float64)
  g = np.asarray(gamma, np.float64)
  loss = -(a * y * (1 - np.exp(ls)) ** g * ls).sum(-1)
  rows = z.shape[:-1]
  valid = np.ones(rows, bool) if where is None else np.broadcast_to(where, rows)
  positive = valid & (y.argmax(-1) != background_class)
  return reduce(loss, valid, positive, reduction)


# Naive jax.numpy versions (class axis last, no masks): plain autodiff gives float64 reference
# gradients and Hessians where the naive formula is well conditioned.


def jnp_softmax_focal_sum(z, t, alpha=None, gamma=2.0, label_smoothing=0.0):
  num_classes = z.shape[-1]
  ls = jax.nn.log_softmax(z, axis=-1)
  log_p = jnp.take_along_axis(ls, t[..., None], -1)[..., 0]
  p = jnp.exp(log_p)
  ce = -(1 - label_smoothing) * log_p - label_smoothing / num_classes * ls.sum(-1)
  a = 1.0 if alpha is None else (alpha[t] if jnp.ndim(alpha) else alpha)
  g = gamma[t] if jnp.ndim(gamma) else gamma
  return jnp.sum(a * (1 - p) ** g * ce)


def jnp_sigmoid_focal_sum(x, y, alpha=None, gamma=2.0):
  gamma = jnp.broadcast_to(gamma, x.shape)
  alpha = None if alpha is None else jnp.broadcast_to(alpha, x.shape)
  p = jax.nn.sigmoid(x)
  bce = -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p))
  p_t = p * y + (1 - p) * (1 - y)
  loss = (1 - p_t) ** gamma * bce
  if alpha is not None:
    loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
  return jnp.sum(loss)


def jnp_categorical_focal_sum(z, y, alpha=None, gamma=2.0):
  ls = jax.nn.log_softmax(z, axis=-1)
  a = 1.0 if alpha is None else jnp.broadcast_to(alpha, z.shape)
  gamma = jnp.broadcast_to(gamma, z.shape)
  return -jnp.sum(a * y * (1 - jnp.exp(ls)) ** gamma * ls)


@pytest.fixture(scope="session")
def refs() -> types.SimpleNamespace:
  return types.SimpleNamespace(
      softmax_focal=softmax_focal, softmax_focal_rows=softmax_focal_rows,
      sigmoid_focal=sigmoid_focal, categorical_focal=categorical_focal, reduce=reduce,
      jnp_softmax_focal_sum=jnp_softmax_focal_sum, jnp_sigmoid_focal_sum=jnp_sigmoid_focal_sum,
      jnp_categorical_focal_sum=jnp_categorical_focal_sum)


# Compiled calls. Eager dispatch compiles every primitive for every new shape, which makes
# eager tests slow; these helpers jit the loss once per (function, static keywords, array
# keyword names) and let jit's own cache handle shapes and dtypes, so tests that share a
# configuration share the compiled program.

_COMPILED: dict = {}


def _split(kwargs):
  static, dynamic = [], {}
  for key, value in sorted(kwargs.items()):
    if isinstance(value, (np.ndarray, jax.Array)):
      dynamic[key] = value
    else:
      static.append((key, value if not isinstance(value, list) else tuple(value)))
  return tuple(static), dynamic


def _compiled(fn, mode, static, dyn_names, argnums):
  key = (fn, mode, static, dyn_names, argnums)
  if key not in _COMPILED:
    def loss(args, dyn):
      return fn(*args, **dict(static), **dyn)
    if mode == "value":
      f = loss
    else:
      def f(args, dyn):
        def of(*diff):
          full = list(args)
          for i, v in zip(argnums, diff):
            full[i] = v
          return loss(tuple(full), dyn)
        return jax.value_and_grad(of, argnums=tuple(range(len(argnums))))(
            *(args[i] for i in argnums))
    _COMPILED[key] = jax.jit(f)
  return _COMPILED[key]


def jit_loss(fn, *args, **kwargs):
  """fn(*args, **kwargs) under a cached jit (array keywords traced, others static)."""
  static, dyn = _split(kwargs)
  return _compiled(fn, "value", static, tuple(dyn), None)(args, dyn)


def jit_value_and_grad(fn, *args, argnums=(0,), **kwargs):
  """(value, grads w.r.t. args[argnums]) of a scalar-valued fn, under a cached jit."""
  static, dyn = _split(kwargs)
  return _compiled(fn, "vg", static, tuple(dyn), tuple(argnums))(args, dyn)


@pytest.fixture(scope="session")
def jc() -> types.SimpleNamespace:
  """`jc.loss(fn, *args, **kw)` and `jc.vg(fn, *args, argnums=(0,), **kw)`, jitted and cached."""
  return types.SimpleNamespace(loss=jit_loss, vg=jit_value_and_grad)
