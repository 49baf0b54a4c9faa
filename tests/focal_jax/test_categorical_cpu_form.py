"""categorical_focal's CPU form (`_categorical.CategoricalOptions.cpu`), and the default form
that TPU and GPU compile, run here on the CPU.

The CPU form takes the row statistics in plain passes above 8 classes (XLA:CPU runs the
one-pass variadic reduction of `_rowreduce.top_stats` as a scalar loop) and fewer
transcendental functions per class (`1 - s` for `exp(log(1 - s))`, and for a whole `gamma`
known at trace time `(1 - s)**gamma` as products). The program checks read XLA:CPU's optimized HLO
(deterministic for a given jax/XLA); the values are checked against the float64 references.
Every other CPU test of categorical_focal runs the CPU form too; the default form is run here
by having `lax.platform_dependent` take its default branch.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's program")

# A reduce with several results: `(f32[..], s32[..], f32[..]) reduce(...)`.
_VARIADIC_REDUCE = re.compile(r"= \([^)]*\) reduce\(")
# An elementwise log1p over a (rows, classes) array.
_LOG1P_2D = re.compile(r"= f32\[\d+,\d+\]\{1,0\} log-plus-one\(")


def _step_hlo(shape, reduction="mean", gamma=2.0):
  """XLA:CPU's optimized program of one jit(value_and_grad) step, float32."""
  def fn(z, y):
    return jnp.sum(focal_jax.categorical_focal(z, y, gamma=gamma, reduction=reduction))
  arg = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(arg, arg).compile().as_text()


# The CPU paths: blocked forward with the whole-array tangent (C = 91), the blocked total
# (C = 16, "mean"), the blocked tangent of the per-row losses (C = 16, "none"), one block.
# (At up to 8 classes the CPU form keeps the one-pass statistics.)
@pytest.mark.parametrize("shape,reduction", [
    ((4096, 91), "mean"), ((8192, 16), "mean"), ((8192, 16), "none"), ((64, 91), "mean")])
def test_cpu_program_has_no_variadic_reduction(shape, reduction):
  hlo = _step_hlo(shape, reduction)
  assert "reduce(" in hlo
  found = _VARIADIC_REDUCE.findall(hlo)
  assert not found, f"{len(found)} variadic reduce(s) in the CPU program at {shape}"


@pytest.mark.parametrize("shape,reduction", [((4096, 91), "mean"), ((8192, 16), "mean")])
def test_whole_gamma_takes_no_log1p_per_class(shape, reduction):
  # gamma = 2: (1 - s)**2 as a product; gamma = 2.5 keeps exp(gamma log1p(-s)) (the pattern
  # matches the program it is meant to catch).
  assert not _LOG1P_2D.search(_step_hlo(shape, reduction, gamma=2.0))
  assert _LOG1P_2D.search(_step_hlo(shape, reduction, gamma=2.5))


def _data(rows, classes, seed, scale=3.0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(rows, classes)) * scale
  z[0, :3] = 1.5  # a three-way tie at the max
  z[1, 2] = 40.0  # s -> 1 at the top class: 1 - s from the other classes' mass
  z[2] = np.arange(classes) * -30.0  # s -> 0 at every other class
  return z, rng.dirichlet(np.ones(classes) * 0.5, size=rows)


# 6000 rows take the blocked paths (more than one block of 2**16 entries); C = 5 the one-pass
# statistics, C = 12 the two-pass ones.
@pytest.mark.parametrize("classes", [5, 12])
@pytest.mark.parametrize("default_form", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.0, 0.5, [0.0, 1.0, 2.0, 3.0, 2.5]])
def test_values_and_gradients_match_float64(refs, monkeypatch, default_form, reduction, gamma,
                                            classes):
  z, y = _data(6000, classes, seed=7)
  if default_form:  # the TPU / GPU program's form
    monkeypatch.setattr(jax.lax, "platform_dependent",
                        lambda *args, default, **branches: default(*args))
  gamma = np.resize(gamma, classes) if np.ndim(gamma) else np.asarray(gamma)
  where = np.arange(z.shape[0]) % 7 != 3
  kw = dict(gamma=gamma, where=where)

  def fn(z, y):
    return jnp.sum(focal_jax.categorical_focal(z, y, reduction=reduction, **kw))

  step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  if default_form:  # the one-pass statistics: the default branch was taken
    assert _VARIADIC_REDUCE.search(step.lower(z, y).compile().as_text())
  value, (gz, gy) = step(z, y)
  want = np.sum(refs.categorical_focal(z, y, reduction=reduction, **kw))
  np.testing.assert_allclose(value, want, rtol=1e-12)
  # Gradients: the textbook formula's autodiff, away from its cancellations (the rows with
  # ties and saturated probabilities are left out of its input, and checked to be finite).
  keep = np.ones(z.shape[0], bool)
  keep[:3] = False
  scale = 1.0 / where.sum() if reduction == "mean" else 1.0
  ref = lambda z, y: refs.jnp_categorical_focal_sum(
      z * where[keep, None], y * where[keep, None], None, jnp.asarray(gamma)) * scale
  want_gz, want_gy = jax.grad(ref, argnums=(0, 1))(z[keep], y[keep])
  np.testing.assert_allclose(gz[keep], want_gz, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(gy[keep], want_gy, rtol=1e-10, atol=1e-14)
  assert np.all(np.isfinite(np.asarray(gz)[:3])) and np.all(np.isfinite(np.asarray(gy)[:3]))
