"""sigmoid_focal against optax.sigmoid_focal_loss, float64 NumPy references and autodiff."""

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

REDUCTIONS = ("none", "sum", "mean", "mean_positive")
TOLERANCES = {"float64": (1e-12, 1e-12), "float32": (2e-5, 2e-5), "bfloat16": (1e-2, 1e-3),
              "float16": (2e-3, 1e-4)}


def _data(shape=(6, 4), seed=0, soft=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 3
  y = rng.uniform(size=shape) if soft else (rng.uniform(size=shape) < 0.3).astype(np.float64)
  return x, y


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("alpha,gamma", [(None, 2.0), (0.25, 2.0), (0.25, 0.5), (0.75, 0.0)])
def test_equals_optax_sigmoid_focal_loss(jc, soft, alpha, gamma):
  x, y = _data(seed=1, soft=soft)
  got = jc.loss(focal_jax.sigmoid_focal, x, y, alpha=alpha, gamma=gamma)
  want = optax.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)
  assert got.shape == y.shape and got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smoothing_masks_and_reductions_match_reference(refs, jc, reduction):
  x, y = _data(seed=2)
  y[0] = 0.0  # a row with no positive
  where = np.ones(y.shape, bool)
  where[1, :2] = False
  kw = dict(alpha=0.25, gamma=1.5, label_smoothing=0.1, where=where, reduction=reduction)
  got = jc.loss(focal_jax.sigmoid_focal, x, y, **kw)
  np.testing.assert_allclose(got, refs.sigmoid_focal(x, y, **kw), rtol=1e-12, atol=1e-15)
  if reduction == "mean_positive":  # divided by the valid entries whose unsmoothed label > 0
    total = refs.sigmoid_focal(x, y, **{**kw, "reduction": "sum"})
    np.testing.assert_allclose(got, total / np.sum(where & (y > 0)), rtol=1e-12)


def test_per_label_alpha_and_gamma_act_on_the_last_axis(refs, jc):
  x, y = _data(seed=3, soft=True)
  alpha = np.array([0.1, 0.25, 0.5, 0.9])
  gamma = np.array([0.0, 0.5, 2.0, 3.0])
  got = jc.loss(focal_jax.sigmoid_focal, x, y, alpha=alpha, gamma=gamma)
  cols = [refs.sigmoid_focal(x[:, c], y[:, c], alpha=alpha[c], gamma=gamma[c]) for c in range(4)]
  np.testing.assert_allclose(got, np.stack(cols, axis=1), rtol=1e-12, atol=1e-15)


def test_hard_labels_of_any_numeric_dtype(jc):
  x, y = _data(seed=4)
  want = jc.loss(focal_jax.sigmoid_focal, x, y, alpha=0.25)
  for labels in (y.astype(bool), y.astype(np.int32)):
    np.testing.assert_array_equal(jc.loss(focal_jax.sigmoid_focal, x, labels, alpha=0.25), want)


def test_masked_entries_have_zero_loss_and_grad(jc):
  x, y = _data(seed=5)
  x[2, 1] = np.nan
  where = np.ones(y.shape, bool)
  where[2, 1] = where[4, 3] = False
  value, (grad,) = jc.vg(focal_jax.sigmoid_focal, x, y, where=where, reduction="mean")
  assert np.isfinite(value)
  assert grad[2, 1] == 0.0 and grad[4, 3] == 0.0
  assert np.count_nonzero(np.asarray(grad)) == y.size - 2


def test_gradients_and_hessian_match_naive_float64_autodiff(refs):
  x, y = _data(shape=(3, 2), seed=6, soft=True)
  alpha, gamma = 0.3, 1.5
  fn = lambda x, y: focal_jax.sigmoid_focal(x, y, alpha=alpha, gamma=gamma, reduction="sum")
  ref = lambda x, y: refs.jnp_sigmoid_focal_sum(x, y, alpha, gamma)
  got = jax.jit(jax.grad(fn, argnums=(0, 1)))(x, y)
  want = jax.jit(jax.grad(ref, argnums=(0, 1)))(x, y)
  for g, w in zip(got, want):  # logits and soft labels
    np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-14)
  np.testing.assert_allclose(jax.jit(jax.hessian(fn))(x, y), jax.jit(jax.hessian(ref))(x, y),
                             rtol=1e-9, atol=1e-12)


def test_check_grads_float64_in_logits_labels_alpha_and_gamma():
  x, y = _data(shape=(3, 2), seed=7, soft=True)
  fn = jax.jit(lambda x, y, a, g: focal_jax.sigmoid_focal(
      x, y, alpha=a, gamma=g, label_smoothing=0.1, reduction="mean"))
  args = (x, y, np.array([0.3, 0.6]), np.array([0.75, 2.0]))
  check_grads(fn, args, order=1, modes=["fwd", "rev"])
  check_grads(fn, args, order=2, modes=["rev"])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_output_and_gradient_keep_the_input_dtype(refs, jc, dtype):
  x, y = _data(seed=8, soft=True)
  xd = jnp.asarray(x, dtype)
  got = jc.loss(focal_jax.sigmoid_focal, xd, y, alpha=0.25, gamma=0.5)
  assert got.dtype == dtype
  _, (grad,) = jc.vg(focal_jax.sigmoid_focal, xd, y, reduction="sum")
  assert grad.dtype == dtype
  want = refs.sigmoid_focal(np.asarray(xd, np.float64), y, alpha=0.25, gamma=0.5)
  rtol = {jnp.float16: 1e-3, jnp.bfloat16: 8e-3, jnp.float32: 2e-6}[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-6)


@st.composite
def _cases(draw):
  shape = draw(st.sampled_from([(5,), (3, 4), (2, 2, 3)]))
  dtype = draw(st.sampled_from([np.float32, np.float64, jnp.bfloat16, np.float16]))
  logits = draw(hnp.arrays(np.float64, shape, elements=st.floats(-30, 30)))
  soft = draw(st.booleans())
  # No subnormal labels: XLA on CPU flushes subnormals to zero, so `label > 0` (the
  # mean_positive count) is False for 1e-308 in JAX and True in the NumPy reference.
  labels = draw(hnp.arrays(np.float64, shape,
                           elements=st.floats(0, 1, allow_subnormal=False) if soft
                           else st.sampled_from([0.0, 1.0])))
  num = shape[-1]
  alpha = draw(st.one_of(st.none(), st.floats(0.0, 1.0),
                         hnp.arrays(np.float64, (num,), elements=st.floats(0.0, 1.0))))
  gamma = draw(st.one_of(st.floats(0.0, 4.0),
                         hnp.arrays(np.float64, (num,), elements=st.floats(0.0, 4.0))))
  where = draw(st.one_of(st.none(), hnp.arrays(np.bool_, shape)))
  kw = dict(alpha=alpha, gamma=gamma, where=where,
            label_smoothing=draw(st.sampled_from([0.0, 0.2])),
            reduction=draw(st.sampled_from(REDUCTIONS)))
  return logits.astype(dtype), labels, kw


@hypothesis.given(_cases())
def test_hypothesis_shapes_forms_masks_dtypes_match_reference(refs, jc, case):
  logits, labels, kw = case
  got = jc.loss(focal_jax.sigmoid_focal, logits, labels, **kw)
  assert got.dtype == logits.dtype
  assert got.shape == (labels.shape if kw["reduction"] == "none" else ())
  ref_kw = dict(kw)
  if np.ndim(kw["alpha"]) or np.ndim(kw["gamma"]):  # (C,) vectors broadcast on the last axis
    ref_kw["alpha"] = None if kw["alpha"] is None else np.broadcast_to(kw["alpha"], labels.shape)
    ref_kw["gamma"] = np.broadcast_to(kw["gamma"], labels.shape)
  want = refs.sigmoid_focal(logits, labels, **ref_kw)
  # The reference sees the same (rounded) inputs; the result is rounded once to the dtype.
  rtol, atol = TOLERANCES[np.dtype(logits.dtype).name]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)
