"""softmax_focal's compiled memory on CPU, and the blocked form that keeps it low.

The budget is read from XLA's own buffer assignment (``compiled.memory_analysis()``,
deterministic for a given jax/XLA): temporaries beyond the step's outputs, over the logits'
size. Before the CPU blocked form (``_softmax._blocked_focal``) XLA on CPU wrote about nine
(N,) per-row arrays to memory: 4.6x the logits under ``jit(value_and_grad)`` at C = 2, 0.58x at
C = 16, 0.10x at C = 91, 9.2x for bfloat16 logits at C = 2. The blocked form's values,
gradients and Hessian-vector products are checked against float64 NumPy written from the
formula, with a block small enough that every test shape takes it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax
from focal_jax import _softmax

ELEMENTS = 1 << 22
CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the budget is XLA:CPU's")


def _temp_ratio(fn, shape, dtype=jnp.float32, *, mode="value_and_grad"):
  z = jax.ShapeDtypeStruct(shape, dtype)
  t = jax.ShapeDtypeStruct(shape[:-1], jnp.int32)
  if mode == "value_and_grad":
    step, args = jax.jit(jax.value_and_grad(fn)), (z, t)
  else:  # the per-row losses with a cotangent (reduction="none")
    def step(z, t, ct):
      out, vjp = jax.vjp(lambda z: fn(z, t), z)
      return out, vjp(ct)[0]
    step, args = jax.jit(step), (z, t, jax.ShapeDtypeStruct(shape[:-1], jnp.float32))
  analysis = step.lower(*args).compile().memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  return analysis.temp_size_in_bytes / (np.prod(shape) * jnp.dtype(dtype).itemsize)


def _shape(classes):
  rows = ELEMENTS // classes
  return (rows - rows % 64, classes)  # rows with divisors near a block's (a view, no copy)


# Measured (2**22-entry float32 logits): 0.06x at C = 2, 0.01x at 16; before: 4.6x, 0.58x. C = 91
# takes the fused form (more than _softmax._BLOCKED_CLASSES): 0.10x.
@CPU_ONLY
@pytest.mark.parametrize("classes,budget,reduction", [
    (2, 0.25, "mean"), (16, 0.05, "mean"), (91, 0.15, "mean"), (2, 0.25, "sum"),
    (2, 0.25, "none")])
def test_step_keeps_no_per_row_arrays(classes, budget, reduction):
  fn = lambda z, t: focal_jax.softmax_focal(z, t, gamma=2.0, reduction=reduction)
  ratio = _temp_ratio(fn, _shape(classes), mode="vjp" if reduction == "none" else
                      "value_and_grad")
  assert ratio <= budget, f"compiled temporaries {ratio:.3f}x the logits at C = {classes}"


@CPU_ONLY
def test_grad_only_and_options_keep_no_per_row_arrays():
  shape = _shape(16)
  rows = shape[0]
  where = jnp.arange(rows) % 7 != 3
  weight = jnp.linspace(0.5, 2.0, rows)
  fn = lambda z, t: focal_jax.softmax_focal(
      z, t, alpha=jnp.linspace(0.1, 1.0, 16), gamma=jnp.linspace(0.0, 3.0, 16),
      label_smoothing=0.1, where=where, sample_weight=weight, reduction="sum")
  args = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.int32))
  temp = jax.jit(jax.grad(fn)).lower(*args).compile().memory_analysis().temp_size_in_bytes
  # 0.0x measured (where and weight are constants of the program here); before: 0.77x.
  assert temp / (rows * 16 * 4) <= 0.1


@CPU_ONLY
@pytest.mark.parametrize("classes", [2, 16])
def test_bfloat16_step_has_no_float32_copy_of_the_logits(classes):
  # 1.13x (C = 2) measured: one uint16 copy (the gradient blocks, stacked as their bits);
  # before: 9.2x. C = 16 takes the fused form (1.16x). A float32 copy alone would be 2.0x.
  fn = lambda z, t: focal_jax.softmax_focal(z, t, gamma=2.0, reduction="mean")
  assert _temp_ratio(fn, _shape(classes), jnp.bfloat16) <= 1.25


@CPU_ONLY
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("classes", [2, 4])
def test_16_bit_gradient_is_not_widened_in_the_loop(classes, dtype):
  # XLA on CPU converts a bfloat16 array that a loop updates to float32 whole, at every step
  # (quadratic time): the blocked tangent stacks the gradient blocks as uint16 instead. No
  # float32 array as large as the logits may appear in the compiled step.
  shape = _shape(classes)
  fn = lambda z, t: focal_jax.softmax_focal(z, t, gamma=2.0, reduction="mean")
  args = (jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape[:-1], jnp.int32))
  text = jax.jit(jax.grad(fn)).lower(*args).compile().as_text()
  sizes = [np.prod([int(d) for d in dims.split(",")])
           for dims in re.findall(r"f32\[(\d+(?:,\d+)*)\]", text)]
  assert "while" in text and max(sizes) < np.prod(shape) // 4, max(sizes)


@CPU_ONLY
def test_float16_step_has_no_copy_of_the_logits():
  # 0.13x measured: float16 blocks are read and the gradient stacked as they are; before:
  # 1.13x (a uint16 copy of the logits).
  fn = lambda z, t: focal_jax.softmax_focal(z, t, gamma=2.0, reduction="mean")
  assert _temp_ratio(fn, _shape(2), jnp.float16) <= 0.25


# --- the blocked form against float64 NumPy ---------------------------------------------------

C = 5


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(_softmax, "_BLOCK", 16 * C)  # 16 rows a block at most
  monkeypatch.setattr(_softmax, "_BLOCKED_CLASSES_16BIT", C)  # 16-bit logits blocked too


def _np_softmax_focal(z, t, alpha, gamma, eps, valid, weight):
  """Per-row loss and dloss/dz (float64, class axis last), written from the formula:
  loss = alpha_t (1 - p)**gamma_t [-(1 - eps) log p - eps/C sum_c log s_c]."""
  z = np.asarray(z, np.float64)
  num_classes = z.shape[-1]
  log_s = z - z.max(-1, keepdims=True)
  log_s = log_s - np.log(np.exp(log_s).sum(-1, keepdims=True))
  s = np.exp(log_s)
  onehot = np.eye(num_classes)[t]
  log_p = np.take_along_axis(log_s, t[..., None], -1)[..., 0]
  p = np.exp(log_p)
  a, g = alpha[t], gamma[t]
  ce = -(1 - eps) * log_p - eps / num_classes * log_s.sum(-1)
  loss = a * (1 - p) ** g * ce
  # d(1 - p)**g/dz = -g (1 - p)**(g - 1) p (onehot - s); dCE/dz = (1 - eps)(s - onehot)
  # + eps (s - 1/C).
  dfocal = (-g * (1 - p) ** (g - 1) * p)[..., None] * (onehot - s)
  dce = (1 - eps) * (s - onehot) + eps * (s - 1 / num_classes)
  grad = a[..., None] * (dfocal * ce[..., None] + ((1 - p) ** g)[..., None] * dce)
  w = np.where(valid, weight, 0.0)
  return loss * w, grad * w[..., None]


def _data(rows, seed):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(rows, C)) * 2.0
  t = rng.integers(0, C, size=rows)
  return z, t


def _uses_blocks(fn, *args):
  return "stablehlo.while" in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("rows,eps", [(48, 0.0), (40, 0.2)])  # 3 blocks of 16; 4 of 10
def test_blocked_values_gradients_and_hvp_match_float64(small_blocks, rows, eps):
  z, t = _data(rows, seed=rows + int(10 * eps))
  alpha = np.linspace(0.2, 1.0, C)
  gamma = np.array([0.0, 0.5, 1.0, 2.0, 3.5])
  where = np.arange(rows) % 5 != 2
  weight = np.linspace(0.5, 1.5, rows)
  kw = dict(alpha=alpha, gamma=gamma, label_smoothing=eps, where=where, sample_weight=weight)
  want_loss, want_grad = _np_softmax_focal(z, t, alpha, gamma, eps, where, weight)
  fn = lambda z: focal_jax.softmax_focal(z, t, reduction="sum", **kw)
  assert _uses_blocks(fn, z)

  rows_fn = jax.jit(lambda z: focal_jax.softmax_focal(z, t, **kw))
  np.testing.assert_allclose(rows_fn(z), want_loss, rtol=1e-12, atol=1e-15)
  value, grad = jax.jit(jax.value_and_grad(fn))(z)
  np.testing.assert_allclose(value, want_loss.sum(), rtol=1e-12)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-13)
  # reduction="none" with a cotangent, and "mean": the same per-row terms.
  ct = np.linspace(-1.0, 2.0, rows)
  got = jax.jit(lambda z: jax.vjp(lambda z: focal_jax.softmax_focal(z, t, **kw), z)[1](ct))(z)[0]
  np.testing.assert_allclose(got, want_grad * ct[:, None], rtol=1e-10, atol=1e-13)
  mean = jax.jit(jax.grad(lambda z: focal_jax.softmax_focal(z, t, reduction="mean", **kw)))(z)
  np.testing.assert_allclose(mean, want_grad / where.sum(), rtol=1e-10, atol=1e-13)

  # Hessian-vector product (forward over reverse, through the transposed scan) against central
  # differences of the float64 gradient.
  v = np.random.default_rng(1).normal(size=z.shape)
  hvp = jax.jit(lambda z, v: jax.jvp(jax.grad(fn), (z,), (v,))[1])(z, v)
  h = 1e-5
  fd = (_np_softmax_focal(z + h * v, t, alpha, gamma, eps, where, weight)[1]
        - _np_softmax_focal(z - h * v, t, alpha, gamma, eps, where, weight)[1]) / (2 * h)
  np.testing.assert_allclose(hvp, fd, rtol=1e-6, atol=1e-8)


def test_blocked_hyperparameter_gradients_and_hessian(small_blocks, refs):
  rows = 48
  z, t = _data(rows, seed=7)
  alpha, gamma = np.linspace(0.2, 1.0, C), np.array([0.5, 1.0, 2.0, 3.0, 1.5])
  fn = lambda z, a, g: focal_jax.softmax_focal(z, t, alpha=a, gamma=g, reduction="sum")
  assert _uses_blocks(fn, z, alpha, gamma)
  _, want = _np_softmax_focal(z, t, alpha, gamma, 0.0, np.ones(rows, bool), np.ones(rows))
  dz, da, dg = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(z, alpha, gamma)
  np.testing.assert_allclose(dz, want, rtol=1e-10, atol=1e-13)
  # dloss/dalpha_c = sum over rows of label c of (1 - p)**gamma_c CE; dloss/dgamma_c = sum of
  # loss * log(1 - p): from the float64 per-row values.
  loss, _ = _np_softmax_focal(z, t, alpha, gamma, 0.0, np.ones(rows, bool), np.ones(rows))
  log_s = z - z.max(-1, keepdims=True)
  log_s = log_s - np.log(np.exp(log_s).sum(-1, keepdims=True))
  p = np.exp(np.take_along_axis(log_s, t[:, None], -1)[:, 0])
  np.testing.assert_allclose(da, np.bincount(t, loss / alpha[t], C), rtol=1e-10)
  np.testing.assert_allclose(dg, np.bincount(t, loss * np.log1p(-p), C), rtol=1e-10)
  ref = lambda z: refs.jnp_softmax_focal_sum(z, t, alpha=jnp.asarray(alpha),
                                             gamma=jnp.asarray(gamma))
  z, t = z[:32], t[:32]  # two blocks
  hess = jax.jit(jax.hessian(lambda z: fn(z, alpha, gamma)))(z)
  np.testing.assert_allclose(hess, jax.jit(jax.hessian(ref))(z), rtol=1e-8, atol=1e-11)


def test_blocked_masks_class_axis_and_bad_rows(small_blocks, refs):
  z, t = _data(48, seed=11)
  t[3] = C  # out of range: NaN, never wrapped
  t[9] = -1  # ignored
  z[20, 1] = np.nan  # NaN logit: NaN loss
  z[30] = -np.inf  # no finite logit, masked below: 0
  where = np.ones(48, bool)
  where[30] = False
  kw = dict(gamma=2.0, where=where, ignore_index=-1)
  fn = lambda z: focal_jax.softmax_focal(z, t, **kw)
  assert _uses_blocks(fn, z)
  loss = np.asarray(jax.jit(fn)(z))
  assert np.isnan(loss[3]) and np.isnan(loss[20]) and loss[9] == 0.0 and loss[30] == 0.0
  keep = np.ones(48, bool)
  keep[[3, 9, 20, 30]] = False
  np.testing.assert_allclose(loss[keep], refs.softmax_focal(z[keep], t[keep], gamma=2.0),
                             rtol=1e-12)
  g = np.asarray(jax.grad(lambda z: jnp.sum(fn(z) * keep))(z))
  assert np.all(g[[9, 30]] == 0.0) and np.all(np.isfinite(np.delete(g, [3, 20], axis=0)))
  # Class axis 1 of (N, C, H) logits, mean_positive.
  z3 = np.moveaxis(z.reshape(4, 12, C), -1, 1)
  t3 = np.abs(t.reshape(4, 12)) % C
  kw3 = dict(axis=1, gamma=1.5, reduction="mean_positive")
  got = jax.jit(lambda z: focal_jax.softmax_focal(z, t3, **kw3))(np.nan_to_num(z3, neginf=0.0))
  np.testing.assert_allclose(got, refs.softmax_focal(np.nan_to_num(z3, neginf=0.0), t3, **kw3),
                             rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_blocked_16_bit_logits(small_blocks, dtype):
  z, t = _data(48, seed=5)
  zd = jnp.asarray(z, dtype)
  fn = lambda z: focal_jax.softmax_focal(z, t, gamma=2.0, label_smoothing=0.1, reduction="sum")
  assert _uses_blocks(fn, zd)
  value, grad = jax.jit(jax.value_and_grad(fn))(zd)
  assert value.dtype == dtype and grad.dtype == dtype
  z64 = np.asarray(zd, np.float64)
  ones = np.ones(48)
  want_loss, want_grad = _np_softmax_focal(z64, t, ones[:C], np.full(C, 2.0), 0.1,
                                           ones.astype(bool), ones)
  tol = {jnp.float16: 2e-3, jnp.bfloat16: 1e-2, jnp.float32: 2e-6}[dtype]
  np.testing.assert_allclose(np.float64(value), want_loss.sum(), rtol=tol)
  np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=4 * tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_blocked_16_bit_gradient_under_vmap_and_hvp(small_blocks, dtype):
  # The 16-bit gradient goes through the blocked tangent as uint16 (a linear bitcast): batched
  # gradients and forward-over-reverse must see it as the plain gradient.
  z, t = _data(96, seed=7)
  zb = jnp.asarray(z.reshape(2, 48, C), dtype)
  tb = t.reshape(2, 48)
  fn = lambda z, t: focal_jax.softmax_focal(z, t, gamma=2.0, reduction="sum")
  assert _uses_blocks(jax.vmap(jax.grad(fn)), zb, tb)
  grads = jax.jit(jax.vmap(jax.grad(fn)))(zb, tb)
  ones = np.ones(48)
  tol = {jnp.float16: 2e-3, jnp.bfloat16: 1e-2}[dtype]
  for i in range(2):
    want = _np_softmax_focal(np.asarray(zb[i], np.float64), tb[i], ones[:C], np.full(C, 2.0),
                             0.0, ones.astype(bool), ones)[1]
    np.testing.assert_allclose(np.asarray(grads[i], np.float64), want, rtol=4 * tol, atol=tol)
  # Hessian-vector product along v vs central differences of the float32 gradient.
  v = np.random.default_rng(8).normal(size=(48, C))
  hvp = jax.jit(lambda z, v: jax.jvp(jax.grad(lambda z: fn(z, tb[0])), (z,), (v,))[1])(
      zb[0], jnp.asarray(v, dtype))
  z32 = np.asarray(zb[0], np.float64)
  h = 1e-3
  grad64 = lambda z: _np_softmax_focal(z, tb[0], ones[:C], np.full(C, 2.0), 0.0,
                                       ones.astype(bool), ones)[1]
  vq = np.asarray(jnp.asarray(v, dtype), np.float64)
  want = (grad64(z32 + h * vq) - grad64(z32 - h * vq)) / (2 * h)
  np.testing.assert_allclose(np.asarray(hvp, np.float64), want, rtol=0.05, atol=0.05)
