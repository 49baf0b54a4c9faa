"""The GPU form of categorical_focal (focal_jax._categorical.gpu_focal_rows) on the CPU.

`categorical_focal` selects that form with `lax.platform_dependent` for CUDA only, so the
ordinary CPU tests never run it. Here it is called directly, and through `categorical_focal`
with the platform choice replaced by it (the `gpu` fixture), against the float64 references
(`focal_reference`), float64 autodiff of the textbook formula, optax and central differences:
values, gradients and Hessians, ties, margins to 1e4, -inf classes, NaN rows, masks,
alpha / gamma vectors, and float32 / bfloat16 / float16 inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import focal_jax
from focal_jax import _categorical

C = 5
NAN, INF = np.nan, np.inf
REDUCTIONS = ("none", "sum", "mean", "mean_positive")


@pytest.fixture
def gpu(monkeypatch):
  """categorical_focal with the GPU form on every platform (classes not split)."""
  monkeypatch.setattr(_categorical, "_platform_rows", _categorical.gpu_focal_rows)


def _data(n=8, seed=0, c=C):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, c)) * 3, rng.dirichlet(np.ones(c) * 0.5, size=n)


def _rows(z, y, alpha=1.0, gamma=2.0, where=None):
  """The GPU form itself, float64 (alpha, gamma: scalars or (C,) vectors)."""
  z, y = jnp.asarray(z), jnp.asarray(y)
  alpha, gamma = (jnp.asarray(v, z.dtype).reshape((1,) * (z.ndim - 1) + np.shape(v)) if np.ndim(v)
                  else jnp.asarray(v, z.dtype) for v in (alpha, gamma))
  valid = jnp.ones(z.shape[:-1], bool) if where is None else jnp.asarray(where)
  return _categorical.gpu_focal_rows(z, y, alpha, gamma, valid)


@pytest.mark.parametrize("alpha,gamma", [
    (1.0, 2.0), (0.25, 0.5), (1.0, 0.0),
    (np.linspace(0.1, 0.9, C), np.array([0.0, 0.5, 1.0, 2.0, 3.0]))])
def test_rows_match_float64_reference(refs, alpha, gamma):
  z, y = _data(seed=1)
  z[2] = [1.0, 1.0, 0.0, -1.0, 1.0]  # a three-way tie for the max
  z[3] = [4.0, 4.0, -800.0, -900.0, -800.0]  # a two-way tie, s = 1/2 exactly (underflow)
  y[3] = [0.3, 0.7, 0.0, 0.0, 0.0]
  got = jax.jit(_rows)(z, y, alpha, gamma)
  want = refs.categorical_focal(z, y, alpha=None if np.ndim(alpha) == 0 else alpha,
                                gamma=gamma) * (alpha if np.ndim(alpha) == 0 else 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_gamma_zero_equals_optax_soft_cross_entropy():
  z, y = _data(seed=2)
  np.testing.assert_allclose(jax.jit(_rows)(z, y, 1.0, 0.0), optax.softmax_cross_entropy(z, y),
                             rtol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_categorical_focal_with_the_gpu_form_matches_reference(refs, gpu, reduction):
  z, y = _data(seed=3)
  where = np.array([True] * 6 + [False, True])
  kw = dict(alpha=np.linspace(0.1, 0.9, C), gamma=np.array([0.0, 0.5, 1.0, 2.0, 3.0]),
            where=where, reduction=reduction, background_class=2)
  got = jax.jit(lambda z, y: focal_jax.categorical_focal(z, y, **kw))(z, y)
  np.testing.assert_allclose(got, refs.categorical_focal(z, y, **kw), rtol=1e-12, atol=1e-15)


def test_class_axis_one(refs, gpu):
  rng = np.random.default_rng(4)
  z = rng.normal(size=(2, C, 3))
  y = np.moveaxis(rng.dirichlet(np.ones(C), size=(2, 3)), -1, 1)
  got = focal_jax.categorical_focal(z, y, axis=1, gamma=1.5)
  np.testing.assert_allclose(got, refs.categorical_focal(z, y, axis=1, gamma=1.5), rtol=1e-12)


@pytest.mark.parametrize("tie", ["none", "three", "two_exact_half"])
def test_gradients_and_hessian_match_naive_float64_autodiff(refs, gpu, tie):
  z, y = _data(n=3, seed=5)
  if tie == "three":
    z[1] = [1.0, 1.0, 0.0, -1.0, 1.0]
  elif tie == "two_exact_half":  # the rest underflows: s = 1/2 at both maxima
    z[1] = [2.0, -800.0, 2.0, -900.0, -800.0]
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


def test_check_grads_float64_in_logits_targets_alpha_and_gamma(gpu):
  z, y = _data(n=3, seed=6)
  fn = jax.jit(lambda z, y, a, g: focal_jax.categorical_focal(
      z, y, alpha=a, gamma=g, reduction="mean"))
  args = (z, y, np.linspace(0.1, 0.9, C), np.array([0.75, 1.0, 2.0, 3.0, 1.5]))
  check_grads(fn, args, order=1, modes=["fwd", "rev"])
  check_grads(fn, args, order=2, modes=["rev"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_extreme_margins_finite_and_float32_equal_to_float64_truth(refs, gpu, dtype):
  margins = np.array([30.0, -30.0, 100.0, -100.0, 1e4, -1e4])
  z = np.zeros((len(margins), 3))
  z[:, 0] = margins
  onehot = np.eye(3)[np.zeros(len(margins), int)]
  z = np.concatenate([z, z])
  y = np.concatenate([onehot, 0.9 * onehot + 0.1 / 3])
  zd, yd = jnp.asarray(z, dtype), jnp.asarray(y, dtype)

  def f(z, y, gamma):
    fn = lambda z: focal_jax.categorical_focal(z, y, gamma=gamma, alpha=0.25, reduction="sum")
    value, grad = jax.value_and_grad(fn)(z)
    return value, grad, jax.hessian(fn)(z)
  f = jax.jit(f)
  for gamma in (0.0, 0.5, 2.0):
    value, grad, hess = f(zd, yd, jnp.float32(gamma))
    assert value.dtype == dtype and grad.dtype == dtype
    for v in (value, grad, hess):
      assert np.all(np.isfinite(np.asarray(v, np.float32))), (dtype, gamma)
    if dtype == jnp.float32:
      z64, y64 = np.asarray(zd, np.float64), np.asarray(yd, np.float64)
      f64 = lambda z: 0.25 * np.sum(refs.categorical_focal(z, y64, gamma=gamma))
      np.testing.assert_allclose(value, f64(z64), rtol=2e-6)
      np.testing.assert_allclose(grad, refs.central_differences(f64, z64, 1e-3), rtol=1e-4,
                                 atol=1e-5)


def test_nan_and_no_finite_logit_give_nan_masked_rows_exact_zero(gpu):
  z = np.array([[0.2, NAN, -0.5], [NAN, 0.0, 1.0], [-INF, -INF, -INF], [NAN, INF, -INF],
                [0.2, INF, -0.5]])
  y = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0],
                [0.2, 0.3, 0.5]])
  where = np.array([True, True, True, False, True])
  loss = np.asarray(focal_jax.categorical_focal(z, y, where=where))
  assert np.all(np.isnan(loss[[0, 1, 2, 4]])) and loss[3] == 0.0, loss
  grad = jax.grad(lambda z: focal_jax.categorical_focal(
      z, y, where=np.zeros(5, bool), reduction="sum"))(jnp.asarray(z))
  assert np.all(np.asarray(grad) == 0.0)
  # Masked rows among valid ones: their gradient exactly 0, the others finite.
  z2, y2 = _data(seed=7)
  z2[3] = NAN
  keep = np.ones(8, bool)
  keep[3] = False
  value, (gz, gy) = jax.value_and_grad(lambda z, y: focal_jax.categorical_focal(
      z, y, where=keep, reduction="mean"), argnums=(0, 1))(z2, y2)
  assert np.isfinite(value)
  np.testing.assert_array_equal(gz[3], 0.0)
  np.testing.assert_array_equal(gy[3], 0.0)
  assert np.all(np.isfinite(gz)) and np.all(np.isfinite(gy))


def test_minus_inf_logit_without_target_mass_is_a_masked_class(refs, gpu):
  z = np.array([[-INF, 0.0, 0.0], [-INF, 1.0, -INF], [3.0, -INF, 1.0]])
  y = np.array([[0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.6, 0.0, 0.4]])
  alpha = np.array([0.3, 0.5, 0.9])
  value, grad = jax.value_and_grad(lambda z: focal_jax.categorical_focal(
      z, y, gamma=2.0, alpha=alpha, reduction="sum"))(jnp.asarray(z))
  want = sum(refs.categorical_focal(z[i:i + 1, c], y[i:i + 1, c], gamma=2.0, alpha=alpha[c])[0]
             for i, c in enumerate([[1, 2], [1], [0, 2]]))
  np.testing.assert_allclose(value, want, rtol=1e-12)
  assert np.all(np.asarray(grad)[np.isneginf(z)] == 0.0)
  assert np.all(np.isfinite(np.asarray(grad)))
  for i, c in enumerate([[1, 2], [1], [0, 2]]):
    want_g = jax.grad(lambda zz: refs.jnp_categorical_focal_sum(
        zz, jnp.asarray(y[i:i + 1, c]), jnp.asarray(alpha[c]), jnp.asarray(2.0)))(
            jnp.asarray(z[i:i + 1, c]))
    np.testing.assert_allclose(np.asarray(grad)[i:i + 1, c], want_g, rtol=1e-11, atol=1e-15)
  # Target mass on a -inf logit: +inf loss, finite gradient.
  value, grad = jax.value_and_grad(lambda z: focal_jax.categorical_focal(
      z, np.array([[0.2, 0.4, 0.4]]), gamma=2.0, reduction="sum"))(jnp.asarray(z[:1]))
  assert value == INF and np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_output_and_gradient_keep_the_input_dtype(refs, gpu, dtype):
  z, y = _data(seed=8)
  zd, yd = jnp.asarray(z, dtype), jnp.asarray(y, dtype)
  got = focal_jax.categorical_focal(zd, yd, gamma=0.5)
  assert got.dtype == dtype
  gz, gy = jax.grad(lambda z, y: focal_jax.categorical_focal(z, y, reduction="sum"),
                    argnums=(0, 1))(zd, yd)
  assert gz.dtype == dtype and gy.dtype == dtype
  z64, y64 = np.asarray(zd, np.float64), np.asarray(yd, np.float64)
  want = refs.categorical_focal(z64, y64, gamma=0.5)
  rtol = {jnp.float16: 1e-3, jnp.bfloat16: 8e-3, jnp.float32: 2e-6}[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-6)
  want_g = jax.grad(lambda z: refs.jnp_categorical_focal_sum(z, jnp.asarray(y64), None, 2.0))(
      jnp.asarray(z64))
  gtol = {jnp.float16: 5e-3, jnp.bfloat16: 3e-2, jnp.float32: 1e-5}[dtype]
  np.testing.assert_allclose(np.asarray(gz, np.float64), want_g, rtol=gtol, atol=gtol)


def test_random_shapes_axes_and_large_margins_match_reference(refs, gpu):
  rng = np.random.default_rng(9)
  for num_classes, shape, axis, scale in [(2, (6,), -1, 3.0), (7, (2, 3), 1, 20.0),
                                          (91, (4,), -1, 5.0), (16, (3, 2), 0, 50.0)]:
    full = list(shape)
    full.insert(axis % (len(shape) + 1), num_classes)
    z = rng.normal(size=full) * scale
    y = np.moveaxis(rng.dirichlet(np.ones(num_classes) * 0.3, size=shape), -1, axis)
    gamma = rng.uniform(0.0, 4.0, size=num_classes)
    got = jax.jit(lambda z, y: focal_jax.categorical_focal(z, y, gamma=gamma, axis=axis))(z, y)
    np.testing.assert_allclose(got, refs.categorical_focal(z, y, gamma=gamma, axis=axis),
                               rtol=1e-11, atol=1e-14)


def test_cuda_lowering_uses_the_gpu_form_and_cpu_keeps_the_default(monkeypatch):
  """The platform choice: lowered for CUDA no class index (the default form's variadic reduce
  and its top-class tests use an int32 iota over the classes) and no gradient kernel; lowered
  for the CPU the default form. Where the GPU form does not fit, CUDA takes the kernel."""
  monkeypatch.setattr(_categorical, "_gpu_form_fits", lambda c: True)
  z = jax.ShapeDtypeStruct((8, 1000), jnp.float32)
  lowered = lambda platform: jax.jit(jax.grad(lambda z, y: focal_jax.categorical_focal(
      z, y, reduction="mean"))).trace(z, z).lower(lowering_platforms=(platform,)).as_text()
  cuda, cpu = lowered("cuda"), lowered("cpu")
  iota = "tensor<8x1000xi32>"
  triton = "__gpu$xla.gpu.triton"
  assert iota in cpu and iota not in cuda and triton not in cuda
  monkeypatch.setattr(_categorical, "_gpu_form_fits", lambda c: False)
  assert triton in lowered("cuda")  # a class count where the GPU form does not fit


@pytest.mark.parametrize("margin", [10.0, 20.0, 60.0])
def test_top_class_gradient_without_cancellation_in_float32(gpu, margin):
  # One-hot target on the top class, gamma 0: dloss/dz_top = -alpha (1 - s_top), about
  # 2 alpha exp(-margin), where s_top rounds to 1 in float32; s_top W - w_top would give 0.
  z = np.array([[margin, 0.0, 0.0, -1.0]])
  y = np.array([[1.0, 0.0, 0.0, 0.0]])
  grad = jax.grad(lambda z: focal_jax.categorical_focal(z, y, gamma=0.0, alpha=0.25,
                                                        reduction="sum"))(
      jnp.asarray(z, jnp.float32))
  s_rest = np.sum(np.exp(z[0, 1:] - z[0, 0]))
  want = -0.25 * s_rest / (1.0 + s_rest)
  np.testing.assert_allclose(np.asarray(grad, np.float64)[0, 0], want, rtol=1e-5)
