"""The column form of softmax_focal (focal_jax._softmax.column_focal_rows) on the CPU.

`softmax_focal` selects that form with `lax.platform_dependent` for CUDA only, at few classes,
so the ordinary CPU tests never run it. Here the platform choice is replaced by it (the `gpu`
fixture) and it is checked against the float64 references (`focal_reference`), float64
autodiff of the textbook formula and central differences: values, gradients and Hessians,
masks, label smoothing, alpha / gamma vectors, margins to 1e4, non-finite logits, float32 /
bfloat16 / float16 inputs, vmap. Every test builds its own `jax.jit` (the shared `jc` cache
would hand back programs traced with the default form).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import focal_jax
import focal_reference
from focal_jax import _softmax

C = 5
ALPHA = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
GAMMA = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
REDUCTIONS = ("none", "sum", "mean", "mean_positive")


@pytest.fixture
def gpu(monkeypatch):
  """softmax_focal with the column form on every platform (classes not split)."""
  monkeypatch.setattr(_softmax, "_platform_rows", _softmax.column_focal_rows)


def _data(n=12, seed=0, c=C, scale=3.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, c)) * scale, rng.integers(0, c, size=n)


def _ref(z, t, **kw):
  """float64 jnp reference (differentiable), the textbook formula."""
  return focal_reference.softmax_focal(z, t, compute=None, stable=False, **kw)


def _grad_reduction(kw):
  return dict(kw, reduction="sum") if kw.get("reduction", "none") == "none" else kw


def _reductions_in_cuda_program(c, dtype=jnp.float32):
  step = jax.jit(jax.grad(lambda z, y: focal_jax.softmax_focal(z, y, reduction="mean")))
  lowered = step.trace(jax.ShapeDtypeStruct((64, c), dtype),
                       jax.ShapeDtypeStruct((64,), jnp.int32)).lower(
                           lowering_platforms=("cuda",))
  return lowered.as_text().count("stablehlo.reduce")


@pytest.mark.parametrize("c", [2, 5, 32])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cuda_program_takes_the_column_form_at_few_classes(c, dtype):
  # The CUDA training step has no reduction over classes: the only reduce left counts the
  # valid rows of the mean. The default form's row statistics are a second (variadic) reduce.
  assert _reductions_in_cuda_program(c, dtype) == 1


def test_cuda_program_keeps_the_default_form_above_the_limit():
  assert _softmax._COLUMN_CLASSES == 32
  assert _reductions_in_cuda_program(33) == 2


@pytest.mark.parametrize("alpha,gamma,eps", [
    (None, 2.0, 0.0), (0.25, 0.5, 0.1), (ALPHA, GAMMA, 0.0), (ALPHA, 0.0, 0.1),
    (0.25, GAMMA, 0.3), (None, 0.0, 0.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_values_and_gradients_match_float64_reference(gpu, alpha, gamma, eps, reduction):
  z, t = _data(seed=1)
  t[:3] = 0  # background rows
  where = np.ones(12, bool)
  where[[3, 7]] = False
  t[11] = -100  # ignored
  kw = dict(alpha=alpha, gamma=gamma, label_smoothing=eps, where=where, ignore_index=-100,
            reduction=reduction, background_class=0)
  got = jax.jit(lambda z: focal_jax.softmax_focal(z, t, **kw))(z)
  np.testing.assert_allclose(got, focal_reference.softmax_focal(z, t, **kw), rtol=1e-12,
                             atol=1e-14)
  gkw = _grad_reduction(kw)
  grad = np.asarray(jax.jit(jax.grad(lambda z: focal_jax.softmax_focal(z, t, **gkw)))(z))
  want = jax.jit(jax.grad(lambda z: _ref(z, t, **gkw)))(z)
  np.testing.assert_allclose(grad, want, rtol=1e-11, atol=1e-14)
  np.testing.assert_array_equal(grad[[3, 7, 11]], 0.0)


@pytest.mark.parametrize("c", [2, 3, 32])
def test_class_counts_at_the_ends_match_float64_reference(gpu, c):
  z, t = _data(n=9, seed=2, c=c)
  gamma = np.linspace(0.0, 3.0, c)
  kw = dict(alpha=np.linspace(0.1, 0.9, c), gamma=gamma, label_smoothing=0.1)
  got = jax.jit(lambda z: focal_jax.softmax_focal(z, t, **kw))(z)
  np.testing.assert_allclose(got, focal_reference.softmax_focal(z, t, **kw), rtol=1e-12)
  grad = jax.jit(jax.grad(lambda z: focal_jax.softmax_focal(z, t, reduction="mean", **kw)))(z)
  want = jax.jit(jax.grad(lambda z: _ref(z, t, reduction="mean", **kw)))(z)
  np.testing.assert_allclose(grad, want, rtol=1e-11, atol=1e-14)


def test_gradient_and_hessian_match_naive_float64_autodiff(gpu):
  z, t = _data(n=3, seed=3, scale=2.0)
  kw = dict(alpha=ALPHA, gamma=np.array([0.5, 1.0, 2.0, 3.0, 1.5]), label_smoothing=0.3,
            reduction="sum")
  fn = lambda z: focal_jax.softmax_focal(z, t, **kw)
  ref = lambda z: _ref(z, t, **kw)
  np.testing.assert_allclose(jax.jit(jax.grad(fn))(z), jax.jit(jax.grad(ref))(z), rtol=1e-11,
                             atol=1e-14)
  np.testing.assert_allclose(jax.jit(jax.hessian(fn))(z), jax.jit(jax.hessian(ref))(z),
                             rtol=1e-9, atol=1e-12)


def test_check_grads_float64_in_logits_alpha_and_gamma(gpu):
  z, t = _data(n=4, seed=4)
  fn = jax.jit(lambda z, alpha, gamma: focal_jax.softmax_focal(
      z, t, alpha=alpha, gamma=gamma, label_smoothing=0.2, reduction="mean"))
  args = (z, ALPHA, GAMMA + 0.25)
  check_grads(fn, args, order=1, modes=["fwd", "rev"])
  check_grads(fn, args, order=2, modes=["rev"])


MARGINS = np.array([30.0, -30.0, 100.0, -100.0, 1e4, -1e4])


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_extreme_margins_are_finite_and_float32_matches_float64(refs, gpu, eps, dtype):
  z = np.zeros((len(MARGINS), 3))
  z[:, 0] = MARGINS  # label 0: right by the margin (> 0) or wrong by it (< 0)
  t = np.zeros(len(MARGINS), np.int32)
  zd = jnp.asarray(z, dtype)

  @jax.jit
  def f(x, gamma):
    fn = lambda x: focal_jax.softmax_focal(x, t, gamma=gamma, alpha=0.25, label_smoothing=eps,
                                           reduction="sum")
    value, grad = jax.value_and_grad(fn)(x)
    return value, grad, jax.hessian(fn)(x)

  for gamma in (0.0, 0.5, 2.0):
    value, grad, hess = f(zd, jnp.float32(gamma))
    assert value.dtype == dtype and grad.dtype == dtype
    for what, v in (("loss", value), ("gradient", grad), ("Hessian", hess)):
      assert np.all(np.isfinite(np.asarray(v, np.float32))), (dtype, gamma, what)
    if dtype == jnp.float32:
      f64 = lambda x: np.sum(0.25 * focal_reference.softmax_focal(x, t, gamma=gamma,
                                                                 label_smoothing=eps))
      np.testing.assert_allclose(value, f64(z), rtol=2e-6)
      np.testing.assert_allclose(grad, refs.central_differences(f64, z, 1e-3), rtol=1e-4,
                                 atol=1e-5)


def test_non_finite_logits(monkeypatch):
  z, t = _data(n=6, seed=5)
  t[:] = [0, 1, 2, 3, 4, 0]
  z[0, 3] = np.nan  # a NaN logit: no defined loss
  z[1, [0, 4]] = -np.inf  # masked classes: the loss of the others, 0 gradient there
  z[2, 2] = -np.inf  # the target at -inf: +inf, with the gradient of the limit p -> 0
  z[3, 1] = np.inf  # a non-target logit at +inf: +inf
  z[4] = np.nan  # masked row: never looked at
  where = np.array([True, True, True, True, False, True])

  def run():
    fn = lambda z: focal_jax.softmax_focal(z, t, alpha=0.25, gamma=0.5, where=where)
    return (np.asarray(jax.jit(fn)(z)),
            np.asarray(jax.jit(jax.grad(lambda z: jnp.sum(fn(z))))(z)))

  default = run()
  monkeypatch.setattr(_softmax, "_platform_rows", _softmax.column_focal_rows)
  loss, grad = run()
  # Rows 0 and 3: the default form's NaN / inf pattern, exactly.
  for got, want in zip((loss, grad), default):
    np.testing.assert_array_equal(got[[0, 3]], want[[0, 3]])
  assert np.isnan(loss[0]) and np.isnan(grad[0, 3]) and loss[3] == np.inf
  assert loss[4] == 0.0 and np.all(grad[4] == 0.0)
  live = [1, 2, 3]
  np.testing.assert_allclose(
      loss[1], focal_reference.softmax_focal(z[1:2, live], np.array([0]), alpha=0.25,
                                             gamma=0.5)[0], rtol=1e-12)
  want1 = jax.grad(lambda zz: _ref(zz, np.array([0]), alpha=0.25, gamma=0.5,
                                   reduction="sum"))(z[1:2, live])
  np.testing.assert_allclose(grad[1, live], want1[0], rtol=1e-11, atol=1e-14)
  np.testing.assert_array_equal(grad[1, [0, 4]], 0.0)
  assert loss[2] == np.inf
  s = np.exp(z[2] - np.max(z[2]))
  s /= s.sum()
  np.testing.assert_allclose(grad[2], 0.25 * (s - np.eye(C)[2]), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(loss[5], focal_reference.softmax_focal(
      z[5:], t[5:], alpha=0.25, gamma=0.5)[0], rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_low_precision_inputs_match_float64_on_the_rounded_inputs(gpu, dtype):
  z, t = _data(seed=6)
  zd = jnp.asarray(z, dtype)
  z64 = np.asarray(zd, np.float64)
  kw = dict(alpha=ALPHA, gamma=0.5)
  got = jax.jit(lambda z: focal_jax.softmax_focal(z, t, **kw))(zd)
  assert got.dtype == dtype
  rtol = {jnp.float16: 1e-3, jnp.bfloat16: 8e-3, jnp.float32: 2e-6}[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float64), focal_reference.softmax_focal(
      z64, t, **kw), rtol=rtol, atol=1e-6)
  grad = jax.jit(jax.grad(lambda z: focal_jax.softmax_focal(z, t, reduction="sum", **kw)))(zd)
  assert grad.dtype == dtype
  want = jax.grad(lambda z: _ref(z, t, reduction="sum", **kw))(z64)
  np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=rtol,
                             atol=rtol * np.max(np.abs(want)))


def test_vmap_of_grad_and_class_axis_one(gpu):
  rng = np.random.default_rng(7)
  z = rng.normal(size=(3, 4, C))
  t = rng.integers(0, C, size=(3, 4))
  loss = lambda z, t: focal_jax.softmax_focal(z, t, gamma=1.5, reduction="mean")
  grads = jax.jit(jax.vmap(jax.grad(loss)))(z, t)
  for i in range(3):
    want = jax.grad(lambda zz: _ref(zz, t[i], gamma=1.5, reduction="mean"))(z[i])
    np.testing.assert_allclose(grads[i], want, rtol=1e-11, atol=1e-14)
  zi = rng.normal(size=(2, C, 3, 4)) * 2
  ti = rng.integers(0, C, size=(2, 3, 4))
  kw = dict(alpha=ALPHA, gamma=GAMMA, label_smoothing=0.05, axis=1)
  got = jax.jit(lambda z: focal_jax.softmax_focal(z, ti, **kw))(zi)
  np.testing.assert_allclose(got, focal_reference.softmax_focal(zi, ti, **kw), rtol=1e-12)
  grad = jax.jit(jax.grad(lambda z: focal_jax.softmax_focal(z, ti, reduction="sum", **kw)))(zi)
  want = jax.grad(lambda z: _ref(z, ti, reduction="sum", **kw))(zi)
  np.testing.assert_allclose(grad, want, rtol=1e-11, atol=1e-14)


def test_one_class_gives_zero_loss_and_grad(gpu):
  z, t = np.array([[3.0], [-2.0]]), np.array([0, 0])
  for gamma in (0.0, 0.5):
    fn = lambda z: focal_jax.softmax_focal(z, t, gamma=gamma, label_smoothing=0.1,
                                           reduction="sum")
    assert jax.jit(fn)(z) == 0.0
    np.testing.assert_array_equal(jax.jit(jax.grad(fn))(z), 0.0)
