"""Loss, gradient and Hessian at extreme logit margins, in float32, bfloat16 and float16.

Margins +-30, +-100, +-1e4 (the target logit above / below the others), gamma 0, 0.5 and 2.
Every value must be finite; in float32 the value and gradient must also equal the float64
truth (the NumPy formula and its central differences).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax

MARGINS = np.array([30.0, -30.0, 100.0, -100.0, 1e4, -1e4])
GAMMAS = (0.0, 0.5, 2.0)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
C = 3


def _softmax_inputs():
  z = np.zeros((len(MARGINS), C))
  z[:, 0] = MARGINS  # label 0: right by the margin (> 0) or wrong by it (< 0)
  return z, np.zeros(len(MARGINS), np.int32)


def _sigmoid_inputs():
  x = np.repeat(MARGINS, 3)
  y = np.tile([1.0, 0.0, 0.3], len(MARGINS))
  return x, y


def _categorical_inputs():
  z, t = _softmax_inputs()
  onehot = np.eye(C)[t]
  smoothed = 0.9 * onehot + 0.1 / C
  return np.concatenate([z, z]), np.concatenate([onehot, smoothed])


def _loss(name, x, y, gamma, alpha):
  if name == "softmax":
    return focal_jax.softmax_focal(x, y, gamma=gamma, alpha=alpha, reduction="sum")
  if name == "softmax_smoothed":
    return focal_jax.softmax_focal(x, y, gamma=gamma, alpha=alpha, label_smoothing=0.1,
                                   reduction="sum")
  if name == "sigmoid":
    return focal_jax.sigmoid_focal(x, y, gamma=gamma, alpha=alpha, reduction="sum")
  return focal_jax.categorical_focal(x, y, gamma=gamma, alpha=alpha, reduction="sum")


@functools.lru_cache(maxsize=None)
def _value_grad_hessian(name):
  # gamma and alpha are traced: one compiled program per loss and dtype covers every gamma.
  def f(x, y, gamma, alpha):
    fn = lambda x: _loss(name, x, y, gamma, alpha)
    value, grad = jax.value_and_grad(fn)(x)
    return value, grad, jax.hessian(fn)(x)
  return jax.jit(f)


INPUTS = {"softmax": _softmax_inputs, "softmax_smoothed": _softmax_inputs,
          "sigmoid": _sigmoid_inputs, "categorical": _categorical_inputs}


def _reference_loss(refs, name, x, y, gamma, alpha):
  if name.startswith("softmax"):
    eps = 0.1 if name == "softmax_smoothed" else 0.0
    return np.sum(alpha * refs.softmax_focal_rows(x, y, None, gamma, eps))
  if name == "sigmoid":
    return np.sum(refs.sigmoid_focal(x, y, alpha=alpha, gamma=gamma))
  return np.sum(alpha * refs.categorical_focal(x, y, gamma=gamma))


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_gradient_and_hessian_are_finite_at_extreme_margins(refs, name, dtype):
  x, y = INPUTS[name]()
  xd = jnp.asarray(x, dtype)
  yd = y if name != "categorical" else jnp.asarray(y, dtype)
  fn = _value_grad_hessian(name)
  for gamma in GAMMAS:
    value, grad, hess = fn(xd, yd, jnp.float32(gamma), jnp.float32(0.25))
    assert value.dtype == dtype and grad.dtype == dtype
    for what, v in (("loss", value), ("gradient", grad), ("Hessian", hess)):
      assert np.all(np.isfinite(np.asarray(v, np.float32))), (name, dtype, gamma, what)
    if dtype == jnp.float32:
      # Not just finite: the float64 truth of the formula, value and gradient.
      x64 = np.asarray(xd, np.float64)
      f64 = lambda x: _reference_loss(refs, name, x, y, gamma, 0.25)
      np.testing.assert_allclose(value, f64(x64), rtol=2e-6)
      np.testing.assert_allclose(grad, refs.central_differences(f64, x64, 1e-3), rtol=1e-4,
                                 atol=1e-5)


def test_naive_formula_gives_nan_gradient_where_the_library_does_not(refs):
  # The failure mode the finiteness test guards against: autodiff of (1 - p)**0.5 once p
  # rounds to 1 in float32 (margin 30).
  z = jnp.asarray([[30.0, 0.0, 0.0]], jnp.float32)
  t = jnp.asarray([0])
  naive = jax.jit(jax.grad(lambda z: refs.jnp_softmax_focal_sum(z, t, None, 0.5)))(z)
  assert np.any(np.isnan(naive))
  ours = jax.jit(jax.grad(lambda z: focal_jax.softmax_focal(z, t, gamma=0.5,
                                                            reduction="sum")))(z)
  assert np.all(np.isfinite(ours))
