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


# -- issue 12: one contract for the hyperparameters (shared with focal_torch) -------------------

C7 = 7


def _call(name, **kw):
  """Each loss on small inputs of 7 classes (sigmoid: 4 x 7 multi-label)."""
  if name == "softmax":
    return focal_jax.softmax_focal(Z, T, **kw)
  if name == "sigmoid":
    return focal_jax.sigmoid_focal(Z, Y, **kw)
  if name == "categorical":
    return focal_jax.categorical_focal(Z, np.full((4, 7), 1 / 7, np.float32), **kw)
  return focal_jax.linear_softmax_focal(np.ones((4, 3), np.float32),
                                        np.zeros((3, 7), np.float32), T, **kw)


NAMES = ["softmax", "sigmoid", "categorical", "linear"]


@pytest.mark.parametrize("alpha,shown", [(-1.0, "-1.0"), (1.5, "1.5"), (-1, "-1.0"),
                                         (np.array([0.2, 0.3, 1.2, 0.0, 1.0, 0.5, 0.5]), "1.2"),
                                         (jnp.array(-0.25), "-0.25")])
def test_sigmoid_alpha_outside_unit_interval_raises(alpha, shown):
  # torchvision's alpha=-1 ("no weighting") is alpha=None here.
  with pytest.raises(ValueError) as info:
    focal_jax.sigmoid_focal(Z, Y, alpha=alpha)
  message = str(info.value)
  assert message.startswith("sigmoid_focal: alpha must be in [0, 1] (alpha=None means no "
                            "weighting), got "), message
  assert shown in message
  # Values in [0, 1] (the ends too) are accepted.
  for ok in (0.0, 1.0, [0.0, 1.0, 0.5, 0.25, 0.75, 1.0, 0.0]):
    assert focal_jax.sigmoid_focal(Z, Y, alpha=ok).shape == (4, 7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg,value", [
    ("gamma", np.inf), ("gamma", float("nan")), ("alpha", np.inf),
    ("alpha", np.array([0.1, np.nan, 0.2, 0.2, 0.2, 0.2, 0.1])),
    ("alpha", jnp.array([0.1, 0.2, np.inf, 0.2, 0.2, 0.2, 0.1])),
    ("gamma", [2.0, 2.0, np.inf, 2.0, 2.0, 2.0, 2.0])])
def test_non_finite_hyperparameters_raise(name, arg, value):
  if name == "sigmoid" and arg == "alpha":
    expected = "sigmoid_focal: alpha must be"  # [0, 1] or finite: either names the problem
  else:
    expected = f"{name}_focal: {arg} must be finite, got " if name != "linear" else (
        f"linear_softmax_focal: {arg} must be finite, got ")
  with pytest.raises(ValueError) as info:
    _call(name, **{arg: value})
  assert str(info.value).startswith(expected), str(info.value)


@pytest.mark.parametrize("name", ["softmax", "categorical", "linear"])
def test_negative_softmax_alpha_raises(name):
  fn = "linear_softmax_focal" if name == "linear" else f"{name}_focal"
  with pytest.raises(ValueError, match=re.escape(f"{fn}: alpha must be >= 0, got -0.5")):
    _call(name, alpha=-0.5)


@pytest.mark.parametrize("name", NAMES)
def test_lists_tuples_and_numpy_arrays_are_accepted_wherever_an_array_is(name):
  alpha = [0.1, 0.2, 0.3, 0.25, 0.15, 0.5, 0.9]
  gamma = [0.0, 0.5, 1.0, 2.0, 3.0, 2.0, 1.0]
  rows = (4, 7) if name == "sigmoid" else (4,)
  weight = np.linspace(0.5, 2.0, int(np.prod(rows))).reshape(rows)
  where = np.ones(rows, bool)
  where[1] = False
  want = _call(name, alpha=jnp.asarray(alpha, jnp.float32), gamma=jnp.asarray(gamma, jnp.float32),
               where=jnp.asarray(where), sample_weight=jnp.asarray(weight, jnp.float32),
               reduction="none")
  for convert in (list, tuple, np.asarray):
    def conv(x):
      x = np.asarray(x)
      return convert(x.tolist()) if convert is not np.asarray else x
    got = _call(name, alpha=conv(alpha), gamma=conv(gamma), where=conv(where),
                sample_weight=conv(weight), reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("weight,error,parts", [
    (-1.0, ValueError, ["sample_weight must be >= 0, got -1.0"]),
    (np.inf, ValueError, ["sample_weight must be finite, got inf"]),
    (np.array([1.0, np.nan, 1.0, 1.0]), ValueError, ["sample_weight must be finite"]),
    (np.ones(5), ValueError, ["sample_weight must be a scalar or broadcast to shape (4,",
                              "got shape (5,"]),
    (np.ones(4, np.complex64), TypeError, ["sample_weight must be a real", "complex64"]),
    ("balanced", TypeError, ["sample_weight must be None, a real scalar or an array, got str"]),
])
def test_bad_sample_weight_raises(name, weight, error, parts):
  fn = "linear_softmax_focal" if name == "linear" else f"{name}_focal"
  if name == "sigmoid" and np.ndim(weight) == 1:
    weight = np.asarray(weight)[:, None]  # (4, 1) broadcasts to (4, 7), (5, 1) does not
  with pytest.raises(error) as info:
    _call(name, sample_weight=weight)
  assert str(info.value).startswith(f"{fn}: "), str(info.value)
  for part in parts:
    assert part in str(info.value), (str(info.value), part)


def test_sigmoid_class_vectors_act_on_the_last_axis_and_where_broadcasts(refs):
  # One rule in both packages: a (C,) alpha / gamma is over the LAST axis of the logits; a
  # vector of another length raises; `where` broadcasts to the labels' shape.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5))
  y = (rng.uniform(size=x.shape) < 0.4).astype(np.float64)
  alpha = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
  got = focal_jax.sigmoid_focal(x, y, alpha=alpha)
  np.testing.assert_allclose(got, refs.sigmoid_focal(x, y, alpha=alpha), rtol=1e-12)
  with pytest.raises(ValueError) as info:
    focal_jax.sigmoid_focal(x, y, alpha=np.full(3, 0.25))
  assert str(info.value) == ("sigmoid_focal: alpha must be a scalar or shape (5,) (one per "
                             "entry of the last axis of logits), got shape (3,)")
  where = np.array([True, False, True, True, True])
  got = focal_jax.sigmoid_focal(x, y, where=where, reduction="mean")
  np.testing.assert_allclose(got, refs.sigmoid_focal(x, y, where=where, reduction="mean"),
                             rtol=1e-12)
