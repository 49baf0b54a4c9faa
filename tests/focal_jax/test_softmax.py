"""softmax_focal against float64 NumPy references, optax, and float64 autodiff."""

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
ALPHAS = {"none": None, "scalar": 0.25, "vector": np.array([0.1, 0.2, 0.3, 0.25, 0.15])}
GAMMAS = {"0": 0.0, "0.5": 0.5, "2": 2.0, "vector": np.array([0.0, 0.5, 1.0, 2.0, 3.0])}
REDUCTIONS = ("none", "sum", "mean", "mean_positive")
TOLERANCES = {"float64": (1e-12, 1e-12), "float32": (2e-5, 2e-5), "bfloat16": (1e-2, 1e-3),
              "float16": (2e-3, 1e-4)}


def _data(n=12, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, C)) * scale, rng.integers(0, C, size=n)


@pytest.mark.parametrize("alpha,gamma,label_smoothing", [
    ("none", "2", 0.0), ("scalar", "0.5", 0.1), ("vector", "vector", 0.0),
    ("vector", "0", 0.1), ("scalar", "vector", 0.3), ("none", "0", 0.0)])
def test_values_match_float64_reference(refs, jc, alpha, gamma, label_smoothing):
  z, t = _data()
  kw = dict(alpha=ALPHAS[alpha], gamma=GAMMAS[gamma], label_smoothing=label_smoothing)
  got = jc.loss(focal_jax.softmax_focal, z, t, **kw)
  assert got.dtype == jnp.float64 and got.shape == t.shape
  np.testing.assert_allclose(got, refs.softmax_focal(z, t, **kw), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_match_reference_with_masks(refs, jc, reduction):
  z, t = _data(n=12, seed=1)
  t[:5] = 0  # background rows
  where = np.ones(12, bool)
  where[[3, 7]] = False
  t[11] = -100  # ignored
  kw = dict(alpha=ALPHAS["vector"], gamma=0.5, where=where, ignore_index=-100,
            reduction=reduction, background_class=0)
  got = jc.loss(focal_jax.softmax_focal, z, t, **kw)
  want = refs.softmax_focal(z, t, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  if reduction == "mean_positive":  # the denominator, spelled out
    valid = where & (t != -100)
    n_pos = int(np.sum(valid & (t != 0)))
    full = refs.softmax_focal(z, t, alpha=ALPHAS["vector"], gamma=0.5, where=where,
                              ignore_index=-100)
    np.testing.assert_allclose(got, full.sum() / n_pos, rtol=1e-12)


def test_gamma_zero_equals_optax_cross_entropy(jc):
  z, t = _data(seed=2)
  got = jc.loss(focal_jax.softmax_focal, z, t, gamma=0.0)
  np.testing.assert_allclose(got, optax.softmax_cross_entropy_with_integer_labels(z, t),
                             rtol=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_gamma_zero_with_label_smoothing_equals_optax_smoothed_cross_entropy(jc, eps):
  z, t = _data(seed=3)
  want = optax.softmax_cross_entropy(z, optax.smooth_labels(jax.nn.one_hot(t, C), eps))
  got = jc.loss(focal_jax.softmax_focal, z, t, gamma=0.0, label_smoothing=eps)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_class_axis_one_for_images(refs, jc):
  rng = np.random.default_rng(4)
  z = rng.normal(size=(2, C, 3, 4)) * 2
  t = rng.integers(0, C, size=(2, 3, 4))
  kw = dict(alpha=ALPHAS["vector"], gamma=GAMMAS["vector"], label_smoothing=0.05)
  got = jc.loss(focal_jax.softmax_focal, z, t, axis=1, **kw)
  assert got.shape == (2, 3, 4)
  np.testing.assert_allclose(got, refs.softmax_focal(z, t, axis=1, **kw), rtol=1e-12)
  _, (grad,) = jc.vg(focal_jax.softmax_focal, z, t, axis=1, reduction="sum", **kw)
  want = jax.jit(jax.grad(lambda z: refs.jnp_softmax_focal_sum(
      jnp.moveaxis(z, 1, -1), jnp.asarray(t), jnp.asarray(kw["alpha"]),
      jnp.asarray(kw["gamma"]), 0.05)))(z)
  np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-14)


def test_masked_entries_have_zero_loss_and_grad(jc):
  z, t = _data(n=12, seed=5)
  z[2] = np.nan  # a masked row's logits are never looked at
  t[4] = 99  # an out-of-range label on a masked row is not an error either
  where = np.ones(12, bool)
  where[[2, 4]] = False
  t[5] = -100
  kw = dict(where=where, ignore_index=-100, gamma=0.5)
  value, (grad,) = jc.vg(focal_jax.softmax_focal, z, t, reduction="sum", **kw)
  assert np.isfinite(value)
  masked = np.array([2, 4, 5])
  np.testing.assert_array_equal(grad[masked], 0.0)
  assert np.all(np.delete(np.asarray(grad), masked, axis=0) != 0.0)
  per_row = jc.loss(focal_jax.softmax_focal, z, t, **kw)
  np.testing.assert_array_equal(per_row[masked], 0.0)


def test_out_of_range_labels_give_nan_and_never_wrap(refs, jc):
  z, t = _data(seed=6)
  t[1], t[3] = -1, C
  got = np.asarray(jc.loss(focal_jax.softmax_focal, z, t))
  # -1 is not label C - 1: the entry is NaN, never the loss of the last class.
  assert np.isnan(got[1]) and np.isnan(got[3])
  ok = np.delete(np.arange(12), [1, 3])
  np.testing.assert_allclose(got[ok], refs.softmax_focal_rows(z[ok], t[ok]), rtol=1e-12)
  assert np.isnan(jc.loss(focal_jax.softmax_focal, z, t, reduction="mean"))
  _, (grad,) = jc.vg(focal_jax.softmax_focal, z, t, reduction="sum")
  grad = np.asarray(grad)
  assert np.all(np.isnan(grad[[1, 3]])) and np.all(np.isfinite(grad[ok]))
  # ... unless -1 is the ignore_index.
  t[3] = 0
  got = jc.loss(focal_jax.softmax_focal, z, t, ignore_index=-1)
  assert got[1] == 0.0 and np.all(np.isfinite(got))


@pytest.mark.parametrize("reduction", ["mean", "mean_positive"])
def test_empty_denominator_gives_zero_not_nan(jc, reduction):
  z, t = _data(seed=7)
  all_masked, (grad,) = jc.vg(focal_jax.softmax_focal, z, t, where=np.zeros(12, bool),
                              reduction=reduction)
  assert all_masked == 0.0
  np.testing.assert_array_equal(grad, 0.0)
  empty = focal_jax.softmax_focal(np.zeros((0, C)), np.zeros((0,), int), reduction=reduction)
  assert empty == 0.0


def test_no_positive_rows_mean_positive_is_the_sum(refs, jc):
  z, _ = _data(seed=8)
  t = np.zeros(12, int)  # background only
  got = jc.loss(focal_jax.softmax_focal, z, t, reduction="mean_positive")
  np.testing.assert_allclose(got, refs.softmax_focal_rows(z, t).sum(), rtol=1e-12)


def test_check_grads_float64_in_logits_alpha_and_gamma():
  z, t = _data(n=4, seed=9)
  fn = jax.jit(lambda z, alpha, gamma: focal_jax.softmax_focal(
      z, t, alpha=alpha, gamma=gamma, label_smoothing=0.2, reduction="mean"))
  # gamma stays away from 0 where d/dgamma of (1 - p)**gamma is smooth in both directions.
  args = (z, ALPHAS["vector"], GAMMAS["vector"] + 0.25)
  check_grads(fn, args, order=1, modes=["fwd", "rev"])
  check_grads(fn, args, order=2, modes=["rev"])


def test_gradient_and_hessian_match_naive_float64_autodiff(refs):
  label_smoothing = 0.3
  z, t = _data(n=3, seed=10, scale=2.0)
  alpha, gamma = ALPHAS["vector"], np.array([0.5, 1.0, 2.0, 3.0, 1.5])
  fn = lambda z: focal_jax.softmax_focal(z, t, alpha=alpha, gamma=gamma,
                                         label_smoothing=label_smoothing, reduction="sum")
  ref = lambda z: refs.jnp_softmax_focal_sum(z, jnp.asarray(t), jnp.asarray(alpha),
                                             jnp.asarray(gamma), label_smoothing)
  np.testing.assert_allclose(jax.jit(jax.grad(fn))(z), jax.jit(jax.grad(ref))(z), rtol=1e-11,
                             atol=1e-14)
  np.testing.assert_allclose(jax.jit(jax.hessian(fn))(z), jax.jit(jax.hessian(ref))(z),
                             rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_output_and_gradient_keep_the_input_dtype(refs, jc, dtype):
  reduction = "none"
  z, t = _data(seed=11)
  zd = jnp.asarray(z, dtype)
  got = jc.loss(focal_jax.softmax_focal, zd, t, alpha=ALPHAS["vector"], gamma=0.5,
                reduction=reduction)
  assert got.dtype == dtype
  _, (grad,) = jc.vg(focal_jax.softmax_focal, zd, t, reduction="sum")
  assert grad.dtype == dtype
  # Math runs in float32 at least: the result is the float64 truth on the rounded inputs,
  # rounded once to the output dtype.
  want = refs.softmax_focal(np.asarray(zd, np.float64), t, alpha=ALPHAS["vector"], gamma=0.5,
                            reduction=reduction)
  rtol = {jnp.float16: 1e-3, jnp.bfloat16: 8e-3, jnp.float32: 2e-6, jnp.float64: 1e-12}[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-6)


def test_jit_and_vmap_match_reference(refs):
  rng = np.random.default_rng(12)
  z = rng.normal(size=(3, 4, C))
  t = rng.integers(0, C, size=(3, 4))
  fn = jax.jit(jax.vmap(lambda z, t: focal_jax.softmax_focal(z, t, gamma=1.5, reduction="mean")))
  want = [refs.softmax_focal(z[i], t[i], gamma=1.5, reduction="mean") for i in range(3)]
  np.testing.assert_allclose(fn(z, t), want, rtol=1e-12)
  grads = jax.jit(jax.vmap(jax.grad(
      lambda z, t: focal_jax.softmax_focal(z, t, gamma=1.5, reduction="mean"))))(z, t)
  for i in range(3):
    ref = jax.grad(lambda z: refs.jnp_softmax_focal_sum(z, jnp.asarray(t[i]), None, 1.5) / 4)
    np.testing.assert_allclose(grads[i], ref(z[i]), rtol=1e-11, atol=1e-14)


def test_one_class_gives_zero_loss_and_grad(jc):
  z = np.array([[3.0], [-2.0]])
  t = np.array([0, 0])
  for gamma in (0.0, 0.5):
    value, (grad,) = jc.vg(focal_jax.softmax_focal, z, t, gamma=gamma, label_smoothing=0.1,
                           reduction="sum")
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@st.composite
def _cases(draw):
  batch = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
  num_classes = draw(st.integers(2, 6))
  ndim = len(batch) + 1
  axis = draw(st.integers(-ndim, ndim - 1))
  shape = list(batch)
  shape.insert(axis % ndim, num_classes)
  dtype = draw(st.sampled_from([np.float32, np.float64, jnp.bfloat16, np.float16]))
  logits = draw(hnp.arrays(np.float64, shape, elements=st.floats(-20, 20)))
  labels = draw(hnp.arrays(np.int64, tuple(batch), elements=st.integers(0, num_classes - 1)))
  alpha_form = draw(st.sampled_from(["none", "scalar", "vector"]))
  alpha = {"none": None, "scalar": draw(st.floats(0.05, 1.0)),
           "vector": draw(hnp.arrays(np.float64, (num_classes,), elements=st.floats(0.05, 1.0)))
           }[alpha_form]
  gamma = draw(st.one_of(
      st.floats(0.0, 4.0),
      hnp.arrays(np.float64, (num_classes,), elements=st.floats(0.0, 4.0))))
  where = draw(st.one_of(st.none(), hnp.arrays(np.bool_, tuple(batch))))
  kw = dict(alpha=alpha, gamma=gamma, axis=axis, where=where,
            label_smoothing=draw(st.sampled_from([0.0, 0.1])),
            reduction=draw(st.sampled_from(REDUCTIONS)),
            background_class=draw(st.integers(0, num_classes - 1)))
  return logits.astype(dtype), labels, kw


@hypothesis.given(_cases())
def test_hypothesis_shapes_axes_forms_masks_dtypes_match_reference(refs, jc, case):
  logits, labels, kw = case
  got = jc.loss(focal_jax.softmax_focal, logits, labels, **kw)
  assert got.dtype == logits.dtype
  assert got.shape == (labels.shape if kw["reduction"] == "none" else ())
  want = refs.softmax_focal(logits, labels, **kw)
  # The reference sees the same (rounded) inputs; the result is rounded once to the dtype.
  rtol, atol = TOLERANCES[np.dtype(logits.dtype).name]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)
