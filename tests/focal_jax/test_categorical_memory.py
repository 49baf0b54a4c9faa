"""categorical_focal's compiled memory on CPU, and the blocked forward that keeps it low.

The budget is read from XLA's own buffer assignment (``compiled.memory_analysis()``,
deterministic for a given jax/XLA): under ``jit(value_and_grad)`` the step may use at most
``TEMP_BUDGET`` times the logits' size in temporaries beyond its outputs. Before the blocked
forward (``_categorical._blocked_rows``) the same programs took 5.0x (XLA on CPU wrote every
(N, C) term of the forward's row sums to memory). The blocked path's values, gradients and
Hessians are checked against the float64 references with a block small enough that every test
shape takes it, remainder block included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax
from focal_jax import _categorical

# Measured: 0.08x (C = 1000, 30522), 0.15x (C = 91) at 2**22-entry float32 logits; 5.0x before.
TEMP_BUDGET = 0.25
ELEMENTS = 1 << 22
C = 5


def _temp_ratio(fn, shape, dtype=jnp.float32):
  args = [jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape, dtype)]
  analysis = jax.jit(jax.value_and_grad(fn)).lower(*args).compile().memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  return analysis.temp_size_in_bytes / (np.prod(shape) * jnp.dtype(dtype).itemsize)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the budget is XLA:CPU's")
@pytest.mark.parametrize("classes", [91, 1000, 30522])
def test_value_and_grad_needs_no_temporaries_of_the_logits_size(classes):
  shape = (ELEMENTS // classes, classes)
  loss = lambda z, y: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean")
  ratio = _temp_ratio(loss, shape)
  assert ratio <= TEMP_BUDGET, f"compiled temporaries {ratio:.2f}x the logits at {shape}"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the budget is XLA:CPU's")
def test_bfloat16_step_has_no_float32_copy_of_the_logits():
  # 1.2x of the bfloat16 logits measured (0.6x of a float32 copy); 2.0x would be such a copy.
  shape = (ELEMENTS // 1000, 1000)
  loss = lambda z, y: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean")
  assert _temp_ratio(loss, shape, jnp.bfloat16) <= 1.5


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(_categorical, "_BLOCK", 3 * C)  # 3 rows a block


def _data(shape, seed):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=shape + (C,)) * 4
  z[(0,) * len(shape)][:3] = 2.5  # a three-way tie
  return z, rng.dirichlet(np.ones(C) * 0.5, size=shape)


@pytest.mark.parametrize("shape", [(8,), (2, 5), (7,)])
def test_blocked_values_gradients_and_hessian_match_float64(refs, small_blocks, shape):
  z, y = _data(shape, seed=sum(shape))
  alpha, gamma = np.linspace(0.1, 0.9, C), np.array([0.5, 1.0, 2.0, 3.0, 1.5])
  where = np.arange(np.prod(shape)).reshape(shape) % 4 != 1
  kw = dict(alpha=alpha, gamma=gamma)
  got = jax.jit(lambda z, y: focal_jax.categorical_focal(z, y, where=where, **kw))(z, y)
  np.testing.assert_allclose(got, refs.categorical_focal(z, y, where=where, **kw),
                             rtol=1e-12, atol=1e-15)
  fn = lambda z, y: focal_jax.categorical_focal(z, y, reduction="sum", **kw)
  ref = lambda z, y: refs.jnp_categorical_focal_sum(z, y, jnp.asarray(alpha), jnp.asarray(gamma))
  for g, w in zip(jax.jit(jax.grad(fn, argnums=(0, 1)))(z, y),
                  jax.jit(jax.grad(ref, argnums=(0, 1)))(z, y)):
    np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-14)
  np.testing.assert_allclose(jax.jit(jax.hessian(fn))(z, y), jax.jit(jax.hessian(ref))(z, y),
                             rtol=1e-9, atol=1e-12)


def test_blocked_class_axis_masks_and_nan_rows(refs, small_blocks):
  rng = np.random.default_rng(3)
  z = rng.normal(size=(2, C, 7)) * 3
  y = np.moveaxis(rng.dirichlet(np.ones(C), size=(2, 7)), -1, 1)
  got = focal_jax.categorical_focal(z, y, axis=1, gamma=1.5, reduction="mean")
  np.testing.assert_allclose(got, refs.categorical_focal(z, y, axis=1, gamma=1.5,
                                                         reduction="mean"), rtol=1e-12)
  z2, y2 = _data((8,), seed=4)
  z2[5, 2] = np.nan
  keep = np.ones(8, bool)
  keep[6] = False
  z2[6] = np.nan
  loss = np.asarray(focal_jax.categorical_focal(z2, y2, where=keep))
  assert np.isnan(loss[5]) and loss[6] == 0.0 and np.all(np.isfinite(np.delete(loss, 5)))
  g = jax.grad(lambda z: focal_jax.categorical_focal(z, y2, where=keep, reduction="sum"))(z2)
  assert np.all(np.asarray(g)[6] == 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_blocked_16_bit_inputs(refs, small_blocks, dtype):
  z, y = _data((10,), seed=5)
  zd, yd = jnp.asarray(z, dtype), jnp.asarray(y, dtype)
  value, grad = jax.value_and_grad(lambda z: focal_jax.categorical_focal(
      z, yd, gamma=2.0, reduction="sum"))(zd)
  assert value.dtype == dtype and grad.dtype == dtype
  z64, y64 = np.asarray(zd, np.float64), np.asarray(yd, np.float64)
  rtol = {jnp.float16: 2e-3, jnp.bfloat16: 1e-2, jnp.float32: 2e-6}[dtype]
  np.testing.assert_allclose(np.float64(value), np.sum(refs.categorical_focal(z64, y64)),
                             rtol=rtol)
  want = jax.grad(lambda z: refs.jnp_categorical_focal_sum(z, jnp.asarray(y64), None, 2.0))(
      jnp.asarray(z64))
  tol = {jnp.float16: 5e-3, jnp.bfloat16: 3e-2, jnp.float32: 1e-5}[dtype]
  np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=tol, atol=tol)


# Few classes (issue 11): each (N,) float32 array costs 0.5x float32 logits at C = 2 (1x
# bfloat16). Measured with the reduction summed in blocks (`_blocked_total`: no (N,) losses,
# cotangent or per-row scalars): float32 0.13x (C = 2), 0.11x (C = 4), 0.10x (C = 16);
# bfloat16 0.27x, 0.21x (C = 8), 0.20x. With only the blocked tangent (`_blocked_dot`, the
# (N,) losses and their cotangent whole): float32 1.13x, 0.61x, 0.22x; bfloat16 2.27x, 0.71x,
# 0.45x. Before that: float32 4.00x, 2.00x, 0.50x; bfloat16 8.00x, 2.65x, 1.89x.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the budget is XLA:CPU's")
@pytest.mark.parametrize("dtype,classes,budget", [
    (jnp.float32, 2, 0.2), (jnp.float32, 4, 0.2), (jnp.float32, 16, 0.15),
    (jnp.bfloat16, 2, 0.4), (jnp.bfloat16, 8, 0.3), (jnp.bfloat16, 16, 0.3)])
def test_few_classes_keep_no_per_row_residuals(dtype, classes, budget):
  shape = (ELEMENTS // classes, classes)
  loss = lambda z, y: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean")
  ratio = _temp_ratio(loss, shape, dtype)
  assert ratio <= budget, f"compiled temporaries {ratio:.2f}x the logits at {shape}"


def _np_rows(z, y, alpha, gamma):
  """float64 NumPy loss rows and their gradients, from docs/math.md's formulas."""
  e = np.exp(z - z.max(-1, keepdims=True))
  s = e / e.sum(-1, keepdims=True)
  log_s = np.log(s)
  focal = (1.0 - s) ** gamma
  loss = -np.sum(alpha * y * focal * log_s, axis=-1)
  r = -log_s / (1.0 - s)
  w = alpha * y * focal * (1.0 + gamma * s * r)
  dz = s * w.sum(-1, keepdims=True) - w
  dy = -alpha * focal * log_s
  return loss, dz, dy


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("classes,rows", [(2, 7), (5, 9), (16, 11)])
def test_blocked_tangent_matches_numpy_formula(small_blocks, monkeypatch, classes, rows,
                                               reduction):
  # 3 * C entries a block: 3 rows. "none": the blocked tangent of the per-row losses, the last
  # block overlapping the one before (7, 11 rows). "sum": the blocked total, in blocks of 3
  # rows as a view (9 rows) or, where neither 3 nor 2 divides the rows, overlapping (7, 11).
  monkeypatch.setattr(_categorical, "_BLOCK", 3 * classes)
  calls = []
  name = "_blocked_dot" if reduction == "none" else "_blocked_total"
  blocked = getattr(_categorical, name)
  monkeypatch.setattr(_categorical, name, lambda *a: calls.append(1) or blocked(*a))
  rng = np.random.default_rng(classes)
  z = rng.normal(size=(rows, classes)) * 3
  y = rng.dirichlet(np.ones(classes), size=rows)
  alpha = np.linspace(0.25, 1.0, classes)
  gamma = np.linspace(0.5, 3.0, classes)
  where = np.arange(rows) % 5 != 3
  weight = np.linspace(0.5, 2.0, rows)
  fn = lambda z, y: jnp.sum(focal_jax.categorical_focal(
      z, y, alpha=alpha, gamma=gamma, where=where, sample_weight=weight, reduction=reduction))
  value, (gz, gy) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(z, y)
  assert calls, f"{name} was not used"
  c = weight * where

  def np_grad(z):
    loss, dz, dy = _np_rows(z, y, alpha, gamma)
    return np.sum(c * loss), c[:, None] * dz, c[:, None] * dy

  want, want_gz, want_gy = np_grad(z)
  np.testing.assert_allclose(value, want, rtol=1e-12)
  np.testing.assert_allclose(gz, want_gz, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(gy, want_gy, rtol=1e-10, atol=1e-13)
  # Hessian-vector product (forward over reverse) against central differences of the formula.
  v = rng.normal(size=z.shape)
  hvp = jax.jit(lambda z: jax.jvp(jax.grad(lambda z: fn(z, y)), (z,), (v,))[1])(z)
  h = 1e-5
  fd = (np_grad(z + h * v)[1] - np_grad(z - h * v)[1]) / (2 * h)
  np.testing.assert_allclose(hvp, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("rows", [9, 11])
def test_blocked_total_mean_hyperparameter_grads_and_nan_rows(refs, monkeypatch, rows):
  # The blocked total (3-row blocks: a view at 9 rows, overlapping at 11) under "mean" with a
  # mask: value and gradients in the logits, targets, alpha and gamma against the float64
  # reference; a NaN row gives NaN, a masked NaN row 0 gradient, and the row an overlapping
  # last block shares with the block before (row 8 of 11) is counted once.
  monkeypatch.setattr(_categorical, "_BLOCK", 3 * C)
  calls = []
  blocked = _categorical._blocked_total
  monkeypatch.setattr(_categorical, "_blocked_total", lambda *a: calls.append(1) or blocked(*a))
  z, y = _data((rows,), seed=rows)
  where = np.arange(rows) % 4 != 2
  alpha, gamma = np.linspace(0.2, 1.0, C), np.linspace(0.0, 3.0, C)
  fn = lambda z, y, a, g: focal_jax.categorical_focal(z, y, alpha=a, gamma=g, where=where,
                                                      reduction="mean")
  ref = lambda z, y, a, g: refs.jnp_categorical_focal_sum(
      z * where[:, None], y * where[:, None], a, g) / where.sum()
  args = (z, y, alpha, gamma)
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)
  assert calls
  want, want_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2, 3)))(*args)
  np.testing.assert_allclose(value, want, rtol=1e-12)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(value, np.sum(refs.categorical_focal(
      z, y, alpha=alpha, gamma=gamma, where=where)) / where.sum(), rtol=1e-12)
  z_nan = z.copy()
  z_nan[2, 1] = np.nan  # a masked row
  g = jax.grad(fn)(z_nan, y, alpha, gamma)
  assert np.all(np.asarray(g)[2] == 0.0) and np.all(np.isfinite(np.asarray(g)))
  z_nan[8, 0] = np.nan  # an unmasked row of the last block (and of the one before at 11)
  assert np.isnan(fn(z_nan, y, alpha, gamma))
