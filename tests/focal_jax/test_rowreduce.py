"""The one-pass row reductions of focal_jax/_rowreduce.py against float64 NumPy references.

softmax_stats: (max, sum over non-targets of exp(z - max), target logit); top_stats: (max, first
index of the max, sum over the other classes of exp(z - max)). Values, ties, -inf / NaN / +inf
rows, bf16 input, and the tangents (checked against central differences in float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax import _rowreduce

INF, NAN = np.inf, np.nan


def _softmax_ref(z, t):
  z = np.asarray(z, np.float64)
  m = z.max(-1)
  mf = np.where(np.isfinite(m), m, 0.0)
  other = np.arange(z.shape[-1])[None, :] != t[:, None]
  s = np.sum(np.where(other, np.exp(z - mf[:, None]), 0.0), -1)
  return m, s, z[np.arange(len(t)), t]


def _top_ref(z):
  z = np.asarray(z, np.float64)
  top = np.argmax(z, -1)
  m = z[np.arange(len(z)), top]
  mf = np.where(np.isfinite(m), m, 0.0)
  other = np.arange(z.shape[-1])[None, :] != top[:, None]
  s = np.sum(np.where(other, np.exp(z - mf[:, None]), 0.0), -1)
  return m, top, np.where(np.isfinite(m), s, 0.0)


def _rows(rng, n, c, scale):
  z = rng.standard_normal((n, c)) * scale
  t = rng.integers(0, c, n)
  return z, t


@pytest.mark.parametrize("c", [1, 2, 7, 300])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_softmax_stats_equal_float64_reference(c, scale):
  z, t = _rows(np.random.default_rng(c), 9, c, scale)
  if c > 2:
    z[0, :] = -INF
    z[0, 1] = 2.0  # -inf classes
    z[1, t[1]] = -INF  # -inf target
    z[2, :] = z[2].max()  # all tied
  m, s, zt = jax.jit(_rowreduce.softmax_stats, static_argnums=2)(z, t, jnp.float64)
  want = _softmax_ref(z, t)
  for got, ref in zip((m, s, zt), want):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-13, atol=0)


def test_softmax_stats_non_finite_rows():
  z = np.array([[0.5, NAN, 1.0], [-INF, -INF, -INF], [0.1, INF, 0.2], [INF, 0.0, INF],
                [INF, 0.0, 1.0]])
  t = np.array([0, 1, 1, 2, 0])
  m, s, zt = (np.asarray(x) for x in _rowreduce.softmax_stats(z, t, jnp.float64))
  assert np.isnan(m[0]) and m[1] == -INF and np.all(m[2:] == INF), m
  # Where the max is not finite, s counts the non-target logits equal to it.
  np.testing.assert_array_equal(s[1:], [2.0, 0.0, 1.0, 0.0])
  np.testing.assert_array_equal(zt, [0.5, -INF, INF, INF, INF])


def test_softmax_stats_bf16_input_in_float32():
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.standard_normal((16, 500)) * 4, jnp.bfloat16)
  t = rng.integers(0, 500, 16)
  out = _rowreduce.softmax_stats(z, t, jnp.float32)
  assert all(x.dtype == jnp.float32 for x in out)
  for got, ref in zip(out, _softmax_ref(np.asarray(z, np.float64), t)):
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5)


def _central_difference(f, z, dz, h=1e-6):
  return (np.asarray(f(z + h * dz), np.float64) - np.asarray(f(z - h * dz), np.float64)) / (2 * h)


def test_softmax_stats_tangent_matches_differences():
  rng = np.random.default_rng(4)
  z, t = _rows(rng, 6, 5, 2.0)
  dz = rng.standard_normal(z.shape)
  with jax.enable_x64(True):
    _, tans = jax.jvp(lambda z: _rowreduce.softmax_stats(z, t, jnp.float64), (z,), (dz,))
    # m is not differentiated: the sum is taken against a constant max.
    m = np.max(z, -1)
    other = np.arange(5)[None, :] != t[:, None]
    s_fixed = lambda z: np.sum(np.where(other, np.exp(z - m[:, None]), 0.0), -1)
    np.testing.assert_array_equal(np.asarray(tans[0]), 0.0)
    np.testing.assert_allclose(tans[1], _central_difference(s_fixed, z, dz), rtol=1e-7)
    np.testing.assert_allclose(tans[2], dz[np.arange(6), t], rtol=1e-15)
    # Second order (the Hessians of the losses go through the tangent rule).
    hess = jax.hessian(lambda z: jnp.sum(_rowreduce.softmax_stats(z, t, jnp.float64)[1]))(z)
    want = np.zeros_like(np.asarray(hess))
    for i in range(6):
      for c in range(5):
        if c != t[i]:
          want[i, c, i, c] = np.exp(z[i, c] - m[i])
    np.testing.assert_allclose(hess, want, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("c", [1, 2, 7, 300])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_top_stats_equal_float64_reference(c, scale):
  z, _ = _rows(np.random.default_rng(10 + c), 9, c, scale)
  if c > 2:
    z[0, :] = -INF
    z[0, 1] = 2.0
    z[1, 2] = z[1, 5] = z[1].max() + 1.0  # tie: the first index, as argmax
    z[2, :] = -INF  # no finite logit
  m, top, s = jax.jit(_rowreduce.top_stats)(z)
  m_ref, top_ref, s_ref = _top_ref(z)
  np.testing.assert_array_equal(np.asarray(top), top_ref)
  np.testing.assert_array_equal(np.asarray(m), m_ref)
  np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-13, atol=0)


def test_top_stats_nan_row_and_vmap():
  z = np.array([[0.5, NAN, 1.0], [0.2, 0.1, 0.3]])
  m, _, s = _rowreduce.top_stats(z)
  assert np.isnan(m[0]) and s[0] == 0.0 and m[1] == 0.3
  zz = np.random.default_rng(5).standard_normal((3, 4, 6))
  m, top, s = jax.vmap(_rowreduce.top_stats)(zz)
  for i in range(3):
    for got, ref in zip((m[i], top[i], s[i]), _top_ref(zz[i])):
      np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-13)


def test_top_stats_tangent_matches_differences():
  rng = np.random.default_rng(6)
  z = rng.standard_normal((6, 5)) * 2
  dz = rng.standard_normal(z.shape)
  _, tans = jax.jvp(_rowreduce.top_stats, (z,), (dz,))
  f_m = lambda z: _top_ref(z)[0]
  f_s = lambda z: _top_ref(z)[2]
  np.testing.assert_allclose(tans[0], _central_difference(f_m, z, dz), rtol=1e-9)
  np.testing.assert_allclose(tans[2], _central_difference(f_s, z, dz), rtol=1e-7)
  assert tans[1].dtype == jax.dtypes.float0
