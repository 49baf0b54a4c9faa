"""Bad input raises at trace time, with a message naming the function, the argument, what was
expected and what came."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax

Z = np.zeros((4, 7), np.float32)
T = np.zeros((4,), np.int32)
Y = np.zeros((4, 7), np.float32)

SOFTMAX_CASES = [
    (dict(logits=np.zeros((4, 7), np.int32)), TypeError,
     ["softmax_focal: logits must be a floating-point array", "int32"]),
    (dict(labels=np.zeros((4,), np.float32)), TypeError,
     ["softmax_focal: labels must be an integer array", "float32"]),
    (dict(labels=np.zeros((5,), np.int32)), ValueError,
     ["softmax_focal: labels must have shape (4,)", "got shape (5,)"]),
    (dict(labels=np.zeros((4, 7), np.int32)), ValueError,
     ["softmax_focal: labels must have shape (4,)", "without axis 1", "got shape (4, 7)"]),
    (dict(gamma=-1.0), ValueError, ["softmax_focal: gamma must be >= 0, got -1.0"]),
    (dict(gamma=np.array([2.0, 2, 2, -0.5, 2, 2, 2])), ValueError,
     ["softmax_focal: gamma must be >= 0", "-0.5"]),
    (dict(gamma=jnp.array(-2.0)), ValueError, ["softmax_focal: gamma must be >= 0, got -2.0"]),
    (dict(gamma=np.ones(3)), ValueError,
     ["softmax_focal: gamma must be a scalar or shape (7,)", "got shape (3,)"]),
    (dict(alpha=np.ones(8)), ValueError,
     ["softmax_focal: alpha must be a scalar or shape (7,)", "got shape (8,)"]),
    (dict(alpha=np.ones((7, 1))), ValueError,
     ["softmax_focal: alpha must be a scalar or shape (7,)", "got shape (7, 1)"]),
    (dict(alpha="balanced"), TypeError, ["softmax_focal: alpha must be a real scalar", "str"]),
    (dict(reduction="avg"), ValueError,
     ["softmax_focal: reduction must be one of 'none', 'sum', 'mean', 'mean_positive'",
      "got 'avg'"]),
    (dict(label_smoothing=1.5), ValueError,
     ["softmax_focal: label_smoothing must be in [0, 1], got 1.5"]),
    (dict(label_smoothing=-0.1), ValueError,
     ["softmax_focal: label_smoothing must be in [0, 1], got -0.1"]),
    (dict(label_smoothing=np.float32(0.1) * np.ones(1)), TypeError,
     ["softmax_focal: label_smoothing must be a Python float", "ndarray"]),
    (dict(axis=2), ValueError, ["softmax_focal: axis must be in [-2, 2)", "got 2"]),
    (dict(axis=1.0), TypeError, ["softmax_focal: axis must be an int", "float"]),
    (dict(where=np.ones((4, 7), bool)), ValueError,
     ["softmax_focal: where must have shape (4,)", "got shape (4, 7)"]),
    (dict(where=np.ones(4, np.float32)), TypeError,
     ["softmax_focal: where must be a boolean array", "float32"]),
    (dict(ignore_index=-1.0), TypeError, ["softmax_focal: ignore_index must be an int or None",
                                          "float"]),
    (dict(background_class=None), TypeError,
     ["softmax_focal: background_class must be an int", "NoneType"]),
]


def _call_softmax(kw):
  kw = dict(kw)
  logits, labels = kw.pop("logits", Z), kw.pop("labels", T)
  return focal_jax.softmax_focal(logits, labels, **kw)


@pytest.mark.parametrize("kw,error,parts", SOFTMAX_CASES,
                         ids=[f"{list(c[0])[0]}-{i}" for i, c in enumerate(SOFTMAX_CASES)])
def test_softmax_focal_bad_input_raises_with_clear_message(kw, error, parts):
  with pytest.raises(error) as info:
    _call_softmax(kw)
  for part in parts:
    assert part in str(info.value), (str(info.value), part)


def test_errors_are_raised_at_trace_time_under_jit():
  # Static checks fire while tracing (eval_shape runs nothing), not from the traced values.
  with pytest.raises(ValueError, match=re.escape("softmax_focal: labels must have shape (4,)")):
    jax.eval_shape(lambda z, t: focal_jax.softmax_focal(z, t), Z, np.zeros(5, np.int32))
  with pytest.raises(ValueError, match=re.escape("softmax_focal: gamma must be >= 0")):
    jax.jit(lambda z: focal_jax.softmax_focal(z, T, gamma=-1.0))(Z)
  # A traced gamma cannot be checked; it is accepted (and its value is the caller's business).
  out = jax.jit(lambda z, g: focal_jax.softmax_focal(z, T, gamma=g))(Z, jnp.float32(1.0))
  assert out.shape == (4,)


SIGMOID_CASES = [
    (dict(logits=np.zeros((4, 7), np.int32)), TypeError,
     ["sigmoid_focal: logits must be a floating-point array", "int32"]),
    (dict(labels=np.zeros((4,), np.float32)), ValueError,
     ["sigmoid_focal: labels must have shape (4, 7)", "got shape (4,)"]),
    (dict(labels=np.zeros((4, 7), np.complex64)), TypeError,
     ["sigmoid_focal: labels must be a real", "complex64"]),
    (dict(gamma=-0.5), ValueError, ["sigmoid_focal: gamma must be >= 0, got -0.5"]),
    (dict(alpha=np.ones(4)), ValueError,
     ["sigmoid_focal: alpha must be a scalar or shape (7,)", "got shape (4,)"]),
    (dict(reduction="batchmean"), ValueError,
     ["sigmoid_focal: reduction must be one of", "got 'batchmean'"]),
    (dict(label_smoothing=2.0), ValueError,
     ["sigmoid_focal: label_smoothing must be in [0, 1], got 2.0"]),
    (dict(where=np.ones((3, 7), bool)), ValueError,
     ["sigmoid_focal: where must have shape (4, 7)", "got shape (3, 7)"]),
]


@pytest.mark.parametrize("kw,error,parts", SIGMOID_CASES,
                         ids=[f"{list(c[0])[0]}-{i}" for i, c in enumerate(SIGMOID_CASES)])
def test_sigmoid_focal_bad_input_raises_with_clear_message(kw, error, parts):
  kw = dict(kw)
  logits, labels = kw.pop("logits", Z), kw.pop("labels", Y)
  with pytest.raises(error) as info:
    focal_jax.sigmoid_focal(logits, labels, **kw)
  for part in parts:
    assert part in str(info.value), (str(info.value), part)


CATEGORICAL_CASES = [
    (dict(logits=np.zeros((4, 7), np.int32)), TypeError,
     ["categorical_focal: logits must be a floating-point array", "int32"]),
    (dict(targets=np.zeros((4, 7), np.int32)), TypeError,
     ["categorical_focal: targets must be a floating-point array", "int32"]),
    (dict(targets=np.zeros((4,), np.float32)), ValueError,
     ["categorical_focal: targets must have shape (4, 7)", "got shape (4,)"]),
    (dict(gamma=-2.0), ValueError, ["categorical_focal: gamma must be >= 0, got -2.0"]),
    (dict(alpha=np.ones(6)), ValueError,
     ["categorical_focal: alpha must be a scalar or shape (7,)", "got shape (6,)"]),
    (dict(reduction="max"), ValueError,
     ["categorical_focal: reduction must be one of", "got 'max'"]),
    (dict(where=np.ones((4, 7), bool)), ValueError,
     ["categorical_focal: where must have shape (4,)", "got shape (4, 7)"]),
    (dict(axis=-3), ValueError, ["categorical_focal: axis must be in [-2, 2)", "got -3"]),
]


@pytest.mark.parametrize("kw,error,parts", CATEGORICAL_CASES,
                         ids=[f"{list(c[0])[0]}-{i}" for i, c in enumerate(CATEGORICAL_CASES)])
def test_categorical_focal_bad_input_raises_with_clear_message(kw, error, parts):
  kw = dict(kw)
  logits, targets = kw.pop("logits", Z), kw.pop("targets", Y)
  with pytest.raises(error) as info:
    focal_jax.categorical_focal(logits, targets, **kw)
  for part in parts:
    assert part in str(info.value), (str(info.value), part)
