"""Unusual input (issue 12): non-finite logits, -inf masked classes, bad soft labels, narrow and
unsigned label dtypes, ignore_index outside the label dtype, empty class axes and batches, and
counts beyond 2**31. References are float64 NumPy formulas (conftest) or optax.

Most losses and gradients run under `jax.jit` (`_jit`): an eager call dispatches op by op, and
an eager linear_softmax_focal traces and compiles its scan again at every call. Keywords are
closed over, so alpha and gamma stay concrete and their values are still checked at trace time.
Argument errors (raised while tracing) are checked by eager calls.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import focal_jax
from focal_jax import _reduce

INF = np.inf
NAN = np.nan


def _linear_from_logits(z, labels, **kw):
  """linear_softmax_focal whose logits are exactly `z` (identity kernel, z as hidden)."""
  z = jnp.asarray(z)
  return focal_jax.linear_softmax_focal(z, jnp.eye(z.shape[-1], dtype=z.dtype), labels,
                                        chunk_size=2, **kw)


SOFTMAX_LIKE = {"softmax": focal_jax.softmax_focal, "linear": _linear_from_logits}


def _jit(fn, *args, **kw):
  """fn(*args, **kw) as one compiled program: the arrays in args traced, the keywords fixed."""
  return jax.jit(lambda *a: fn(*a, **kw))(*args)


def _loss_of_logits(name, z, t, **kw):
  """(f, x): f(x) is the loss of logits `z` ("none" reduction unless given).

  For linear_softmax_focal, x is the hidden input of an identity kernel (its gradient is the
  logits' gradient) and the columns of `z` that are -inf in every row go to the bias (a -inf
  can only come from the bias: -inf * 0 = NaN in a matmul)."""
  z = np.asarray(z, np.float64)
  if name == "categorical":
    return (lambda x: focal_jax.categorical_focal(x, np.eye(z.shape[-1])[t], **kw)), z
  if name == "softmax":
    return (lambda x: focal_jax.softmax_focal(x, t, **kw)), z
  cols = np.all(z == -INF, axis=0)
  hidden = np.where(cols, 0.0, z)
  bias = np.where(cols, -INF, 0.0)
  kernel = np.eye(z.shape[-1])
  return (lambda x: focal_jax.linear_softmax_focal(x, kernel, t, bias=bias, chunk_size=2,
                                                   **kw)), hidden


# -- 1. non-finite logits -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOFTMAX_LIKE))
def test_nan_logit_or_all_minus_inf_row_gives_nan_masked_rows_give_exact_zero(refs, name):
  fn = SOFTMAX_LIKE[name]
  z = np.array([[0.2, 2.0, -0.5, NAN],  # NaN off the target
                [0.2, NAN, -0.5, 1.0],  # NaN at the target
                [-INF, -INF, -INF, -INF],  # no finite logit
                [0.2, 2.0, -0.5, 1.0],  # finite
                [NAN, NAN, NAN, NAN],  # masked by where
                [INF, NAN, -INF, 1.0],  # masked by ignore_index
                [-INF, -INF, -INF, -INF]])  # masked by where
  t = np.array([1, 1, 0, 2, 0, -100, 3])
  where = np.array([True, True, True, True, False, True, False])
  kw = dict(alpha=0.25, gamma=0.5, where=where, ignore_index=-100)
  loss = np.asarray(_jit(fn, z, t, **kw))
  assert np.all(np.isnan(loss[:3])), loss
  np.testing.assert_allclose(loss[3], refs.softmax_focal(z[3:4], t[3:4], alpha=0.25,
                                                         gamma=0.5)[0], rtol=1e-12)
  assert np.all(loss[4:] == 0.0), loss
  # A single non-finite row poisons the reductions (a "skip non-finite steps" guard fires).
  assert np.isnan(_jit(fn, z, t, reduction="mean", **kw))
  # Masked rows: exactly 0 gradient whatever their logits; the finite row's gradient is right.
  keep = np.arange(7) >= 3
  grad = jax.jit(jax.grad(lambda z: fn(z, t, reduction="sum", alpha=0.25, gamma=0.5,
                                       ignore_index=-100, where=where & keep)))(jnp.asarray(z))
  assert np.all(np.asarray(grad)[4:] == 0.0), grad
  want = jax.jit(jax.grad(lambda z: refs.jnp_softmax_focal_sum(z, jnp.asarray(t[3:4]), 0.25,
                                                                0.5)))(jnp.asarray(z[3:4]))
  np.testing.assert_allclose(grad[3:4], want, rtol=1e-10, atol=1e-14)


def test_categorical_nan_logit_gives_nan_and_masked_rows_exact_zero():
  z = np.array([[0.2, NAN, -0.5], [NAN, 0.0, 1.0], [-INF, -INF, -INF], [NAN, INF, -INF]])
  y = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
  where = np.array([True, True, True, False])
  loss = np.asarray(_jit(focal_jax.categorical_focal, z, y, where=where))
  assert np.all(np.isnan(loss[:3])) and loss[3] == 0.0, loss
  grad = jax.jit(jax.grad(lambda z: focal_jax.categorical_focal(
      z, y, where=np.array([False, False, False, False]), reduction="sum")))(jnp.asarray(z))
  assert np.all(np.asarray(grad) == 0.0)


# -- 14. -inf logits on classes without target mass; -inf target logits -------------------------


def test_categorical_minus_inf_logit_without_target_mass_is_a_masked_class(refs):
  z = np.array([[-INF, 0.0, 0.0]])
  y = np.array([[0.0, 0.5, 0.5]])
  value, grad = jax.jit(jax.value_and_grad(lambda z: focal_jax.categorical_focal(
      z, y, gamma=0.0, reduction="sum")))(jnp.asarray(z))
  np.testing.assert_allclose(value, math.log(2.0), rtol=1e-12)
  np.testing.assert_allclose(value, optax.safe_softmax_cross_entropy(z, y)[0], rtol=1e-12)
  assert np.all(np.isfinite(grad)) and grad[0, 0] == 0.0, grad
  np.testing.assert_allclose(grad[0, 1:], [0.0, 0.0], atol=1e-15)
  # gamma > 0, alpha: the loss of the remaining classes, their gradient, 0 at the masked class.
  z = np.array([[-INF, 0.3, -1.0, 2.0], [1.0, -INF, 0.5, -INF]])
  y = np.array([[0.0, 0.2, 0.3, 0.5], [0.6, 0.0, 0.4, 0.0]])
  alpha = np.array([0.3, 0.2, 0.25, 0.25])
  value, grad = jax.jit(jax.value_and_grad(lambda z: focal_jax.categorical_focal(
      z, y, gamma=2.0, alpha=alpha, reduction="sum")))(jnp.asarray(z))
  live = [np.array([1, 2, 3]), np.array([0, 2])]
  want = sum(refs.categorical_focal(z[i:i + 1, c], y[i:i + 1, c], gamma=2.0, alpha=alpha[c])[0]
             for i, c in enumerate(live))
  np.testing.assert_allclose(value, want, rtol=1e-12)
  assert np.all(np.isfinite(grad)) and grad[0, 0] == 0.0 and grad[1, 1] == grad[1, 3] == 0.0
  for i, c in enumerate(live):
    want_g = jax.jit(jax.grad(lambda zz: refs.jnp_categorical_focal_sum(
        zz, jnp.asarray(y[i:i + 1, c]), jnp.asarray(alpha[c]), 2.0)))(jnp.asarray(z[i:i + 1, c]))
    np.testing.assert_allclose(grad[i:i + 1, c], want_g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["softmax", "linear", "categorical"])
def test_one_hot_target_on_a_row_with_minus_inf_classes(refs, name):
  z = np.array([[-INF, 0.3, -1.0, -INF, 2.0], [-INF, 1.0, 0.5, -INF, -0.2]])
  t = np.array([2, 1])
  alpha = np.array([0.3, 0.2, 0.25, 0.25, 0.4])
  f, x = _loss_of_logits(name, z, t, alpha=alpha, gamma=2.0, reduction="sum")
  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(x))
  live = np.array([1, 2, 4])
  sub_t = np.array([1, 0])  # the labels within the remaining classes
  want = refs.softmax_focal_rows(z[:, live], sub_t, alpha[live], 2.0).sum()
  np.testing.assert_allclose(value, want, rtol=1e-12)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[:, [0, 3]] == 0.0), grad
  want_g = jax.jit(jax.grad(lambda zz: refs.jnp_softmax_focal_sum(
      zz, jnp.asarray(sub_t), jnp.asarray(alpha[live]), 2.0)))(jnp.asarray(z[:, live]))
  np.testing.assert_allclose(grad[:, live], want_g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("name", ["softmax", "linear", "categorical"])
def test_minus_inf_target_logit_gives_inf_loss_and_the_p_to_zero_gradient(name, gamma):
  z = np.array([[-INF, 0.3, -1.0], [-INF, 1.0, -2.0]])
  t = np.array([0, 1])
  alpha = np.array([0.3, 0.2, 0.5])
  f, x = _loss_of_logits(name, z, t, alpha=alpha, gamma=gamma)
  loss = jax.jit(f)(jnp.asarray(x))
  assert loss[0] == np.inf and np.isfinite(loss[1]), loss
  grad = jax.jit(jax.grad(lambda x: f(x)[0]))(jnp.asarray(x))
  s = np.exp(z[0] - np.log(np.sum(np.exp(z[0]))))
  np.testing.assert_allclose(grad[0], alpha[0] * (s - np.eye(3)[0]), rtol=1e-12, atol=1e-15)
  assert np.all(np.asarray(grad[1]) == 0.0)


def test_linear_bias_of_minus_inf_everywhere_gives_nan_on_unmasked_rows():
  h = np.ones((3, 2))
  kernel = np.ones((2, 4))
  bias = np.full(4, -INF)
  where = np.array([True, False, True])
  f = lambda h: focal_jax.linear_softmax_focal(h, kernel, np.array([0, 1, 2]), bias=bias,
                                               where=where, chunk_size=2)
  loss = jax.jit(f)(h)
  assert np.isnan(loss[0]) and loss[1] == 0.0 and np.isnan(loss[2]), loss
  # A masked row of NaN features: loss 0, and exactly 0 in every gradient (also the kernel's).
  h = np.array([[0.5, -1.0], [NAN, INF], [1.0, 0.2]])
  grads = jax.jit(jax.grad(lambda h, w: focal_jax.linear_softmax_focal(
      h, w, np.array([0, 1, 2]), where=where, reduction="sum", chunk_size=2), argnums=(0, 1)))(
          jnp.asarray(h), jnp.asarray(kernel))
  want = jax.jit(jax.grad(lambda h, w: focal_jax.linear_softmax_focal(
      h, w, np.array([0, 2]), reduction="sum"), argnums=(0, 1)))(
          jnp.asarray(h[[0, 2]]), jnp.asarray(kernel))
  assert np.all(np.asarray(grads[0])[1] == 0.0)
  np.testing.assert_allclose(np.asarray(grads[0])[[0, 2]], want[0], rtol=1e-12)
  np.testing.assert_allclose(grads[1], want[1], rtol=1e-12)


# -- 4. sigmoid labels outside [0, 1] -----------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_sigmoid_labels_outside_unit_interval_give_nan(refs, label_smoothing):
  x = np.array([0.5, -1.0, 2.0, 0.3, -0.7, 1.5, 0.1])
  y = np.array([2.0, -0.5, NAN, 1.0, 0.3, 3.0, 0.0])
  where = np.array([True, True, True, True, True, False, True])
  kw = dict(alpha=0.25, gamma=2.0, label_smoothing=label_smoothing)
  loss = np.asarray(_jit(focal_jax.sigmoid_focal, x, y, where=where, **kw))
  assert np.all(np.isnan(loss[:3])), loss
  np.testing.assert_allclose(loss[[3, 4, 6]], refs.sigmoid_focal(x, y, **kw)[[3, 4, 6]],
                             rtol=1e-12)
  assert loss[5] == 0.0
  # Integer class ids passed by mistake.
  loss = _jit(focal_jax.sigmoid_focal, np.zeros(3), np.array([0, 1, 2]))
  assert np.isfinite(loss[0]) and np.isfinite(loss[1]) and np.isnan(loss[2])
  # Masked bad labels: exactly 0 gradient.
  keep = ~np.isin(np.arange(7), [0, 1, 2, 5])
  grad = jax.jit(jax.grad(lambda x: focal_jax.sigmoid_focal(x, y, where=keep, reduction="sum",
                                                          **kw)))(jnp.asarray(x))
  assert np.all(np.asarray(grad)[[0, 1, 2, 5]] == 0.0) and np.all(np.isfinite(grad))


# -- 5 / 6. label dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOFTMAX_LIKE))
def test_ignore_index_outside_the_label_dtype_ignores_nothing(refs, name):
  # Eager: five calls, each with other static keywords, so jit would compile five programs;
  # measured slower than eager for the linear head.
  fn = SOFTMAX_LIKE[name]
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 200))
  t = np.array([156, 3, 0, 199], np.uint8)
  want = refs.softmax_focal(z, t.astype(np.int64), gamma=2.0)
  np.testing.assert_allclose(fn(z, t, ignore_index=-100), want, rtol=1e-12)
  # A representable ignore_index still ignores.
  got = fn(z, t, ignore_index=156)
  assert got[0] == 0.0
  np.testing.assert_allclose(got[1:], want[1:], rtol=1e-12)
  # int32 labels, ignore_index = 2**40: class 0 (2**40 mod 2**32) is not dropped.
  np.testing.assert_allclose(fn(z, t.astype(np.int32), ignore_index=2**40), want, rtol=1e-12)
  # background_class outside the dtype: every valid entry is positive.
  np.testing.assert_allclose(fn(z, t, background_class=-200, reduction="mean_positive"),
                             want.sum() / 4, rtol=1e-12)
  np.testing.assert_allclose(fn(z, t, background_class=0, reduction="mean_positive"),
                             want.sum() / 3, rtol=1e-12)


@pytest.mark.parametrize("dtype,num_classes", [
    (np.int8, 200), (np.uint8, 300), (np.uint8, 200), (np.int16, 300), (np.uint16, 70000),
    (np.uint32, 300), (np.uint64, 300), (np.int64, 300)])
@pytest.mark.parametrize("name", list(SOFTMAX_LIKE))
def test_label_dtypes_narrower_than_the_class_count_and_unsigned(refs, name, dtype, num_classes):
  if name == "linear" and num_classes > 1000:
    pytest.skip("the identity kernel would be (V, V)")
  fn = SOFTMAX_LIKE[name]
  info = np.iinfo(dtype)
  top = min(info.max, num_classes - 1)
  t = np.array([top, 0, 7, top // 2, 5], dtype)
  rng = np.random.default_rng(1)
  z = rng.normal(size=(5, num_classes)).astype(np.float32)
  alpha = rng.uniform(0.1, 1.0, size=num_classes).astype(np.float32)
  want = refs.softmax_focal(z, t.astype(np.int64), alpha=alpha, gamma=0.5)
  got = _jit(fn, z, t, alpha=alpha, gamma=0.5)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  if top < info.max:  # a label >= C that the dtype holds: NaN, no wrap
    bad = np.array([top + 1], dtype)
    assert np.isnan(_jit(fn, z[:1], bad, alpha=alpha, gamma=0.5)[0])


# -- 15 / 11. empty class axis and empty batch --------------------------------------------------


def test_zero_classes_raise_a_value_error_naming_the_function():
  with pytest.raises(ValueError, match=r"softmax_focal: logits must have at least one class, "
                                       r"got C = 0"):
    focal_jax.softmax_focal(np.zeros((2, 0)), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"softmax_focal: logits must have at least one class, "
                                       r"got C = 0"):
    focal_jax.softmax_focal(np.zeros((2, 0, 3)), np.zeros((2, 3), np.int32), axis=1)
  with pytest.raises(ValueError, match=r"categorical_focal: logits must have at least one "
                                       r"class, got C = 0"):
    focal_jax.categorical_focal(np.zeros((2, 0)), np.zeros((2, 0)))
  with pytest.raises(ValueError, match=r"linear_softmax_focal: kernel must have at least one "
                                       r"class, got V = 0"):
    focal_jax.linear_softmax_focal(np.zeros((2, 3)), np.zeros((3, 0)), np.zeros(2, np.int32))
  # Sigmoid has no class axis: an empty last axis is an empty batch.
  assert focal_jax.sigmoid_focal(np.zeros((2, 0)), np.zeros((2, 0))).shape == (2, 0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "mean_positive"])
def test_linear_with_no_rows_gives_zero_loss_and_zero_gradients(reduction):
  h = jnp.zeros((0, 3))
  w = jnp.ones((3, 5))
  b = jnp.ones((5,))
  t = jnp.zeros((0,), jnp.int32)

  def f(h, w, b):
    out = focal_jax.linear_softmax_focal(h, w, t, bias=b, reduction=reduction)
    return jnp.sum(out)

  value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, b)
  assert value == 0.0
  assert grads[0].shape == (0, 3)
  assert np.all(np.asarray(grads[1]) == 0.0) and np.all(np.asarray(grads[2]) == 0.0)
  out = _jit(focal_jax.linear_softmax_focal, jnp.zeros((2, 0, 3)), w,
             jnp.zeros((2, 0), jnp.int32), reduction=reduction)
  assert out.shape == ((2, 0) if reduction == "none" else ())


# -- 7. counts beyond 2**31 ---------------------------------------------------------------------

BIG = 2**31 + 8


def test_static_count_beyond_int32_traces():
  # No mask: the count is the static size; tracing it used to overflow int32.
  rows = jax.ShapeDtypeStruct((2**16, 2**15 + 1), jnp.float32)
  for reduction in ("mean", "mean_positive"):
    out = jax.eval_shape(lambda z: focal_jax.sigmoid_focal(z, z, reduction=reduction), rows)
    assert out.shape == ()
  logits = jax.ShapeDtypeStruct((2**16, 2**15 + 1, 2), jnp.float32)
  labels = jax.ShapeDtypeStruct((2**16, 2**15 + 1), jnp.int32)
  out = jax.eval_shape(lambda z, t: focal_jax.softmax_focal(z, t, reduction="mean"), logits,
                       labels)
  assert out.shape == ()


@pytest.mark.parametrize("wide", [True, False])
def test_counts_beyond_int32_do_not_wrap(wide):
  # A broadcast mask: XLA never materializes it, so 2**31 + 8 entries cost nothing.
  def count():
    return _reduce._count(jnp.broadcast_to(True, (BIG,)), (BIG,), wide=wide)
  got = jax.jit(count)()
  np.testing.assert_allclose(float(got), BIG, rtol=1e-7)
  got = _reduce._count(None, (2**16, 2**15 + 1), wide=wide)
  np.testing.assert_allclose(float(got), 2**31 + 2**16, rtol=1e-7)
  # The mean over them.
  def mean():
    loss = jnp.broadcast_to(jnp.float64(3.0), (BIG,))
    valid = jnp.broadcast_to(True, (BIG,))
    return _reduce.reduce_loss(loss, valid=valid, positive=valid, reduction="mean",
                               axis_name=None, dtype=jnp.float64)
  np.testing.assert_allclose(jax.jit(mean)(), 3.0, rtol=1e-6)


def test_counts_summed_over_devices_do_not_wrap():
  if jax.device_count() < 4:
    pytest.skip("needs 4 (CPU) devices")
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P
  per_device = 2**29 + 2  # 4 of them: more than 2**31

  def shard(x):
    loss = jnp.broadcast_to(x, (per_device,))
    valid = jnp.broadcast_to(True, (per_device,))
    out = _reduce.reduce_loss(loss, valid=valid, positive=valid, reduction="mean",
                              axis_name="d", dtype=jnp.float64)
    return jax.lax.pmean(out, "d")

  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  f = jax.shard_map(shard, mesh=mesh, in_specs=P("d"), out_specs=P())
  got = jax.jit(f)(jnp.full((4,), 3.0, jnp.float64))
  np.testing.assert_allclose(got, 3.0, rtol=1e-6)


_X64_OFF_COUNTS = """
import json
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from focal_jax import _reduce
assert not jax.config.jax_enable_x64
big = 2**31 + 8
out = {}
def mean():
  loss = jnp.broadcast_to(jnp.float32(3.0), (big,))
  valid = jnp.broadcast_to(True, (big,))
  return _reduce.reduce_loss(loss, valid=valid, positive=valid, reduction="mean",
                             axis_name=None, dtype=jnp.float32)
out["mean"] = float(jax.jit(mean)())
out["static"] = float(_reduce._count(None, (2**16, 2**15 + 1)))
per_device = 2**29 + 2
def shard(x):
  loss = jnp.broadcast_to(x, (per_device,))
  valid = jnp.broadcast_to(True, (per_device,))
  out = _reduce.reduce_loss(loss, valid=valid, positive=valid, reduction="mean",
                            axis_name="d", dtype=jnp.float32)
  return jax.lax.pmean(out, "d")
mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
f = jax.shard_map(shard, mesh=mesh, in_specs=P("d"), out_specs=P())
out["psum"] = float(jax.jit(f)(jnp.full((4,), 3.0, jnp.float32)))
print(json.dumps(out))
"""


def test_counts_do_not_wrap_with_x64_disabled(tmp_path):
  # The users' default (no jax_enable_x64): int32 counts in blocks, summed exactly.
  import json
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
  env["JAX_PLATFORMS"] = "cpu"
  if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", _X64_OFF_COUNTS], capture_output=True, text=True,
                        env=env, timeout=600, check=False, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(out["mean"], 3.0, rtol=1e-5)
  np.testing.assert_allclose(out["static"], 2**31 + 2**16, rtol=1e-7)
  np.testing.assert_allclose(out["psum"], 3.0, rtol=1e-5)
