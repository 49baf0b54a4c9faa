"""categorical_focal against float64 NumPy references, optax and float64 autodiff."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import focal_jax

C = 5
REDUCTIONS = ("none", "sum", "mean", "mean_positive")
TOLERANCES = {"float64": (1e-12, 1e-12), "float32": (2e-5, 2e-5), "bfloat16": (1e-2, 1e-3),
              "float16": (2e-3, 1e-4)}


def _data(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, C)) * 3, rng.dirichlet(np.ones(C) * 0.5, size=n)


@pytest.mark.parametrize("alpha,gamma", [
    (None, 2.0), (0.25, 0.5), (np.linspace(0.1, 0.9, C), np.array([0.0, 0.5, 1.0, 2.0, 3.0]))])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_values_match_float64_reference(refs, jc, alpha, gamma, reduction):
  z, y = _data(seed=1)
  where = np.array([True] * 6 + [False, True])
  kw = dict(alpha=alpha, gamma=gamma, where=where, reduction=reduction, background_class=2)
  got = jc.loss(focal_jax.categorical_focal, z, y, **kw)
  np.testing.assert_allclose(got, refs.categorical_focal(z, y, **kw), rtol=1e-12, atol=1e-15)


def test_gamma_zero_equals_optax_soft_cross_entropy(jc):
  z, y = _data(seed=2)
  got = jc.loss(focal_jax.categorical_focal, z, y, gamma=0.0)
  np.testing.assert_allclose(got, optax.softmax_cross_entropy(z, y), rtol=1e-12)


def test_one_hot_targets_equal_softmax_focal(refs, jc):
  z, _ = _data(seed=3)
  t = np.random.default_rng(3).integers(0, C, size=8)
  alpha, gamma = np.linspace(0.1, 0.9, C), np.array([0.0, 0.5, 1.0, 2.0, 3.0])
  got = jc.loss(focal_jax.categorical_focal, z, np.eye(C)[t], alpha=alpha, gamma=gamma)
  np.testing.assert_allclose(got, refs.softmax_focal_rows(z, t, alpha, gamma), rtol=1e-12)
  np.testing.assert_allclose(
      got, jc.loss(focal_jax.softmax_focal, z, t, alpha=alpha, gamma=gamma), rtol=1e-12)


def test_class_axis_one(refs, jc):
  rng = np.random.default_rng(4)
  z = rng.normal(size=(2, C, 3))
  y = np.moveaxis(rng.dirichlet(np.ones(C), size=(2, 3)), -1, 1)
  got = jc.loss(focal_jax.categorical_focal, z, y, axis=1, gamma=1.5)
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, refs.categorical_focal(z, y, axis=1, gamma=1.5), rtol=1e-12)


def test_gradients_and_hessian_match_naive_float64_autodiff(refs):
  z, y = _data(n=3, seed=5)
  z[1] = [1.0, 1.0, 0.0, -1.0, 1.0]  # a three-way tie for the largest logit
  alpha, gamma = np.linspace(0.1, 0.9, C), np.array([0.5, 1.0, 2.0, 3.0, 1.5])
  fn = lambda z, y: focal_jax.categorical_focal(z, y, alpha=alpha, gamma=gamma,
                                                reduction="sum")
  ref = lambda z, y: refs.jnp_categorical_focal_sum(z, y, jnp.asarray(alpha), jnp.asarray(gamma))
  got = jax.jit(jax.grad(fn, argnums=(0, 1)))(z, y)
  want = jax.jit(jax.grad(ref, argnums=(0, 1)))(z, y)
  for g, w in zip(got, want):  # logits and targets
    np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-14)
  np.testing.assert_allclose(jax.jit(jax.hessian(fn))(z, y), jax.jit(jax.hessian(ref))(z, y),
                             rtol=1e-9, atol=1e-12)


def test_check_grads_float64_in_logits_targets_alpha_and_gamma():
  z, y = _data(n=3, seed=6)
  fn = jax.jit(lambda z, y, a, g: focal_jax.categorical_focal(
      z, y, alpha=a, gamma=g, reduction="mean"))
  args = (z, y, np.linspace(0.1, 0.9, C), np.array([0.75, 1.0, 2.0, 3.0, 1.5]))
  check_grads(fn, args, order=1, modes=["fwd", "rev"])
  check_grads(fn, args, order=2, modes=["rev"])


def test_masked_rows_have_zero_loss_and_grad(jc):
  z, y = _data(seed=7)
  z[3] = np.nan
  where = np.ones(8, bool)
  where[3] = False
  value, (gz, gy) = jc.vg(focal_jax.categorical_focal, z, y, argnums=(0, 1), where=where,
                          reduction="mean")
  assert np.isfinite(value)
  np.testing.assert_array_equal(gz[3], 0.0)
  np.testing.assert_array_equal(gy[3], 0.0)
  assert np.all(np.isfinite(gz)) and np.all(np.isfinite(gy))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_output_and_gradient_keep_the_input_dtype(refs, jc, dtype):
  z, y = _data(seed=8)
  zd, yd = jnp.asarray(z, dtype), jnp.asarray(y, dtype)
  got = jc.loss(focal_jax.categorical_focal, zd, yd, gamma=0.5)
  assert got.dtype == dtype
  _, (gz, gy) = jc.vg(focal_jax.categorical_focal, zd, yd, argnums=(0, 1), reduction="sum")
  assert gz.dtype == dtype and gy.dtype == dtype
  want = refs.categorical_focal(np.asarray(zd, np.float64), np.asarray(yd, np.float64),
                                gamma=0.5)
  rtol = {jnp.float16: 1e-3, jnp.bfloat16: 8e-3, jnp.float32: 2e-6}[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-6)


@st.composite
def _cases(draw):
  shape = list(draw(st.sampled_from([(4,), (2, 3)])))
  num_classes = draw(st.sampled_from([2, 5]))
  ndim = len(shape) + 1
  axis = draw(st.integers(-ndim, ndim - 1))
  shape.insert(axis % ndim, num_classes)
  dtype = draw(st.sampled_from([np.float32, np.float64, jnp.bfloat16, np.float16]))
  logits = draw(hnp.arrays(np.float64, shape, elements=st.floats(-20, 20)))
  raw = draw(hnp.arrays(np.float64, shape, elements=st.floats(0.01, 1)))
  targets = raw / raw.sum(axis=axis, keepdims=True)
  alpha = draw(st.one_of(st.none(), st.floats(0.05, 1.0),
                         hnp.arrays(np.float64, (num_classes,), elements=st.floats(0.05, 1.0))))
  gamma = draw(st.one_of(st.floats(0.0, 4.0),
                         hnp.arrays(np.float64, (num_classes,), elements=st.floats(0.0, 4.0))))
  rows = tuple(int(d) for i, d in enumerate(shape) if i != axis % ndim)
  where = draw(st.one_of(st.none(), hnp.arrays(np.bool_, rows)))
  kw = dict(alpha=alpha, gamma=gamma, axis=axis, where=where,
            reduction=draw(st.sampled_from(REDUCTIONS)),
            background_class=draw(st.integers(0, num_classes - 1)))
  return logits.astype(dtype), targets.astype(dtype), kw


@hypothesis.given(_cases())
def test_hypothesis_shapes_axes_forms_masks_dtypes_match_reference(refs, jc, case):
  logits, targets, kw = case
  got = jc.loss(focal_jax.categorical_focal, logits, targets, **kw)
  assert got.dtype == logits.dtype
  want = refs.categorical_focal(logits, targets, **kw)
  # The reference sees the same (rounded) inputs; the result is rounded once to the dtype.
  rtol, atol = TOLERANCES[np.dtype(logits.dtype).name]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)
