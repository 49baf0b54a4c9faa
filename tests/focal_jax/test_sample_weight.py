"""`sample_weight` (issue 12, DESIGN.md Reductions): it multiplies each entry's loss and gradient
before the reduction, changes no denominator, is never differentiated, and masked entries stay
exactly 0. References: the float64 per-entry formulas of conftest times the weights, reduced
here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax

C = 5
REDUCTIONS = ("none", "sum", "mean", "mean_positive")
ALPHA = np.array([0.1, 0.2, 0.3, 0.25, 0.15])


def _reduce(loss, valid, positive, reduction):
  loss = np.where(valid, loss, 0.0)
  if reduction == "none":
    return loss
  if reduction == "sum":
    return loss.sum()
  count = valid if reduction == "mean" else valid & positive
  return loss.sum() / max(int(count.sum()), 1)


def _softmax_data(seed=0, n=10):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, C)) * 2
  t = rng.integers(0, C, size=n)
  t[:3] = 0  # background rows
  t[7] = -100  # ignored
  where = np.ones(n, bool)
  where[4] = False
  weight = rng.uniform(0.0, 3.0, size=n)
  weight[4] = 1e30  # masked: still exactly 0
  weight[8] = 0.0
  return z, t, where, weight


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_sample_weight_matches_weighted_reference(refs, reduction):
  z, t, where, weight = _softmax_data()
  kw = dict(alpha=ALPHA, gamma=0.5, where=where, ignore_index=-100, background_class=0)

  def f(z):
    return focal_jax.softmax_focal(z, t, sample_weight=weight, reduction=reduction, **kw)

  valid = where & (t != -100)
  per_entry = refs.softmax_focal(z, t, alpha=ALPHA, gamma=0.5, where=valid)
  want = _reduce(per_entry * np.where(valid, weight, 0.0), valid, t != 0, reduction)
  np.testing.assert_allclose(f(z), want, rtol=1e-12, atol=1e-300)
  if reduction == "none":
    return
  # Gradient: each row's reference gradient times its weight, over the same denominator.
  t_safe = np.where(valid, t, 0)
  row_grads = jax.grad(lambda z: refs.jnp_softmax_focal_sum(
      z, jnp.asarray(t_safe), jnp.asarray(ALPHA), 0.5))(jnp.asarray(z))
  scale = np.where(valid, weight, 0.0)
  if reduction == "mean":
    scale = scale / valid.sum()
  elif reduction == "mean_positive":
    scale = scale / (valid & (t != 0)).sum()
  got = jax.grad(f)(jnp.asarray(z))
  np.testing.assert_allclose(got, row_grads * scale[:, None], rtol=1e-10, atol=1e-14)
  assert np.all(np.asarray(got)[[4, 7]] == 0.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_sample_weight_matches_weighted_reference(refs, reduction):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, C)) * 2
  y = (rng.uniform(size=(6, C)) < 0.3).astype(np.float64)
  y[0, 0] = 0.4  # a soft label
  where = np.ones((6, C), bool)
  where[2, 1] = False
  weight = rng.uniform(0.0, 2.0, size=(6, 1))  # per row, broadcast over the labels

  def f(x):
    return focal_jax.sigmoid_focal(x, y, alpha=0.25, gamma=2.0, where=where,
                                   sample_weight=weight, reduction=reduction)

  per_entry = refs.sigmoid_focal(x, y, alpha=0.25, gamma=2.0)
  w = np.broadcast_to(weight, x.shape)
  want = _reduce(per_entry * w, where, y > 0, reduction)
  np.testing.assert_allclose(f(x), want, rtol=1e-12, atol=1e-300)
  if reduction == "none":
    return
  entry_grads = jax.grad(lambda x: refs.jnp_sigmoid_focal_sum(
      x, jnp.asarray(y), 0.25, 2.0))(jnp.asarray(x))
  scale = np.where(where, w, 0.0)
  if reduction == "mean":
    scale = scale / where.sum()
  elif reduction == "mean_positive":
    scale = scale / (where & (y > 0)).sum()
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(x)), entry_grads * scale, rtol=1e-10,
                             atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_categorical_sample_weight_matches_weighted_reference(refs, reduction):
  z, t, where, weight = _softmax_data(seed=2)
  t = np.where(t < 0, 1, t)
  y = 0.9 * np.eye(C)[t] + 0.1 / C

  def f(z):
    return focal_jax.categorical_focal(z, y, alpha=ALPHA, gamma=2.0, where=where,
                                       sample_weight=weight, reduction=reduction)

  per_entry = refs.categorical_focal(z, y, alpha=ALPHA, gamma=2.0)
  want = _reduce(per_entry * np.where(where, weight, 0.0), where, t != 0, reduction)
  np.testing.assert_allclose(f(z), want, rtol=1e-12, atol=1e-300)
  if reduction == "none":
    return
  row_grads = jax.grad(lambda z: refs.jnp_categorical_focal_sum(
      z, jnp.asarray(y), jnp.asarray(ALPHA), 2.0))(jnp.asarray(z))
  scale = np.where(where, weight, 0.0)
  if reduction == "mean":
    scale = scale / where.sum()
  elif reduction == "mean_positive":
    scale = scale / (where & (t != 0)).sum()
  got = jax.grad(f)(jnp.asarray(z))
  np.testing.assert_allclose(got, row_grads * scale[:, None], rtol=1e-10, atol=1e-14)
  assert np.all(np.asarray(got)[4] == 0.0)


@pytest.mark.parametrize("reduction", ["none", "mean", "mean_positive"])
def test_linear_sample_weight_equals_softmax_on_the_logits(refs, reduction):
  rng = np.random.default_rng(3)
  h = rng.normal(size=(10, 4))
  w = rng.normal(size=(4, C))
  b = rng.normal(size=(C,))
  _, t, where, weight = _softmax_data(seed=3)
  kw = dict(alpha=ALPHA, gamma=2.0, where=where, ignore_index=-100, reduction=reduction,
            sample_weight=weight)

  def linear(h, w, b):
    return focal_jax.linear_softmax_focal(h, w, t, bias=b, chunk_size=4, **kw)

  def softmax(h, w, b):
    return focal_jax.softmax_focal(h @ w + b[None], t, **kw)

  valid = where & (t != -100)
  per_entry = refs.softmax_focal(h @ w + b[None], t, alpha=ALPHA, gamma=2.0, where=valid)
  want = _reduce(per_entry * np.where(valid, weight, 0.0), valid, t != 0, reduction)
  np.testing.assert_allclose(linear(h, w, b), want, rtol=1e-12, atol=1e-300)
  if reduction == "none":
    return
  got = jax.grad(linear, argnums=(0, 1, 2))(h, w, b)
  ref = jax.grad(softmax, argnums=(0, 1, 2))(h, w, b)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14)


def test_sample_weight_is_not_differentiated_and_masked_entries_stay_zero():
  z, t, where, _ = _softmax_data()

  def f(weight):
    return focal_jax.softmax_focal(z, t, where=where, ignore_index=-100, sample_weight=weight,
                                   reduction="sum")

  assert np.all(np.asarray(jax.grad(f)(jnp.ones(10))) == 0.0)
  # Traced weights (unchecked) on masked entries, even inf or NaN: those entries stay 0.
  weight = jnp.ones(10).at[4].set(jnp.inf).at[7].set(jnp.nan)
  loss = jax.jit(lambda w: focal_jax.softmax_focal(z, t, where=where, ignore_index=-100,
                                                   sample_weight=w))(weight)
  assert loss[4] == 0.0 and loss[7] == 0.0 and np.all(np.isfinite(loss))


@pytest.mark.parametrize("dtype", [np.bool_, np.int32, np.float32])
def test_sample_weight_dtypes_and_the_scalar_binary_convention(refs, dtype):
  # A scalar weight with alpha=None: one alpha on both terms (seeds 001 and 004).
  rng = np.random.default_rng(4)
  x = rng.normal(size=(8,)) * 2
  y = (rng.uniform(size=8) < 0.5).astype(np.float64)
  got = focal_jax.sigmoid_focal(x, y, sample_weight=0.25, reduction="mean")
  np.testing.assert_allclose(got, 0.25 * refs.sigmoid_focal(x, y).mean(), rtol=1e-12)
  weight = np.array([1, 0, 1, 1, 0, 1, 1, 1]).astype(dtype)
  got = focal_jax.sigmoid_focal(x, y, sample_weight=weight, reduction="mean")
  np.testing.assert_allclose(got, (refs.sigmoid_focal(x, y) * weight).sum() / 8, rtol=1e-12)
  assert got.dtype == jnp.float64
