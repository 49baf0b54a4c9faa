"""`axis_name` on 4 CPU devices: pmap, shard_map and sharded jit equal the single-device value
and gradient on the whole batch, with positives spread unevenly over the shards.

Convention under test: each shard returns ``n * local_sum / global_denominator``; averaging the
value and the gradients over the devices (`lax.pmean`) gives the single-device result.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import focal_jax

N_DEV = 4
C = 5
H = 3
AXIS = "d"

pytestmark = pytest.mark.skipif(jax.device_count() < N_DEV, reason="needs 4 (CPU) devices")

# 4 rows per device. Positives (label != 0) spread unevenly: 4, 1, 0 and 2 per shard; one
# ignored label (-1) and two masked rows.
LABELS = np.array([1, 2, 3, 4, 0, 0, 2, 0, 0, 0, 0, 0, 3, -1, 0, 1], np.int32)
WHERE = np.ones(16, bool)
WHERE[[5, 15]] = False
ALPHA = np.array([0.1, 0.2, 0.3, 0.25, 0.15])


def _data(dtype=np.float64):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, H))
  w = rng.normal(size=(H, C))
  b = rng.normal(size=(C,))
  return tuple(a.astype(dtype) for a in (x, w, b))


def _targets(name, dtype):
  """Labels, mask and alpha of each loss, on the whole batch."""
  if name == "softmax":
    return LABELS, WHERE, ALPHA.astype(dtype)
  onehot = np.eye(C)[np.where(LABELS < 0, 0, LABELS)]
  if name == "sigmoid":  # multi-label: the class's bit and, for every 3rd row, class 4 as well
    multi = onehot.copy()
    multi[::3, 4] = 1.0
    multi[:, 0] = 0.0  # class 0 is background: rows of shard 2 have no positive at all
    return multi.astype(dtype), np.broadcast_to(WHERE[:, None], (16, C)).copy(), dtype(0.25)
  smoothed = 0.9 * onehot + 0.1 / C
  return smoothed.astype(dtype), WHERE, ALPHA.astype(dtype)


def _loss(name, z, y, where, alpha, reduction, axis_name=None):
  if name == "softmax":
    return focal_jax.softmax_focal(z, y, alpha=alpha, gamma=2.0, where=where, ignore_index=-1,
                                   reduction=reduction, axis_name=axis_name)
  if name == "sigmoid":
    return focal_jax.sigmoid_focal(z, y, alpha=alpha, gamma=2.0, where=where,
                                   reduction=reduction, axis_name=axis_name)
  return focal_jax.categorical_focal(z, y, alpha=alpha, gamma=2.0, where=where,
                                     reduction=reduction, axis_name=axis_name)


CASES = [("softmax", "mean_positive"), ("softmax", "mean"), ("softmax", "sum"),
         ("sigmoid", "mean_positive"), ("categorical", "mean_positive")]


@functools.lru_cache(maxsize=None)
def _single_device(name, reduction):
  def f(w, b, x, y, where, alpha):
    return _loss(name, x @ w + b[None], y, where, alpha, reduction)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


@functools.lru_cache(maxsize=None)
def _single_device_logits(name, reduction):
  return jax.jit(jax.value_and_grad(
      lambda z, y, where, alpha: _loss(name, z, y, where, alpha, reduction)))


def _mesh():
  return Mesh(np.array(jax.devices()[:N_DEV]), (AXIS,))


def _shard(a):
  return a.reshape((N_DEV, -1) + a.shape[1:])


@pytest.mark.parametrize("name,reduction", CASES)
def test_pmap_with_pmean_equals_single_device(refs, name, reduction):
  x, w, b = _data()
  y, where, alpha = _targets(name, np.float64)

  def per_device(w, b, x, y, where, alpha):
    value, grads = jax.value_and_grad(
        lambda w, b: _loss(name, x @ w + b[None], y, where, alpha, reduction, axis_name=AXIS),
        argnums=(0, 1))(w, b)
    return lax.pmean(value, AXIS), lax.pmean(grads, AXIS)

  value, (gw, gb) = jax.pmap(per_device, axis_name=AXIS, in_axes=(None, None, 0, 0, 0, None))(
      w, b, _shard(x), _shard(y), _shard(where), alpha)
  want_value, (want_gw, want_gb) = _single_device(name, reduction)(w, b, x, y, where, alpha)
  for got, want in ((value, want_value), (gw, want_gw), (gb, want_gb)):
    for shard in np.asarray(got):  # every device holds the same result
      np.testing.assert_allclose(shard, want, rtol=1e-12, atol=1e-15)
  if name == "softmax":  # and the single-device value is the float64 reference
    np.testing.assert_allclose(want_value, refs.softmax_focal(
        x @ w + b[None], LABELS, alpha=ALPHA, where=WHERE, ignore_index=-1, reduction=reduction),
        rtol=1e-12)


@pytest.mark.parametrize("name,reduction", CASES)
def test_shard_map_mean_of_shards_equals_single_device_value_and_grad(name, reduction):
  x, w, b = _data()
  y, where, alpha = _targets(name, np.float64)
  z = x @ w + b[None]
  mesh = _mesh()

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS), P()),
                     out_specs=P())
  def mean_of_shards(z, y, where, alpha):
    return lax.pmean(_loss(name, z, y, where, alpha, reduction, axis_name=AXIS), AXIS)

  value, grad = jax.jit(jax.value_and_grad(mean_of_shards))(z, y, where, alpha)
  want_value, want_grad = _single_device_logits(name, reduction)(z, y, where, alpha)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name,reduction", CASES)
def test_jit_over_sharded_arrays_needs_no_axis_name(name, reduction):
  x, w, b = _data()
  y, where, alpha = _targets(name, np.float64)
  z = x @ w + b[None]
  rows = NamedSharding(_mesh(), P(AXIS))
  sharded = [jax.device_put(a, rows) for a in (z, y, where)]
  value, grad = _single_device_logits(name, reduction)(*sharded, alpha)
  assert grad.sharding.is_equivalent_to(rows, grad.ndim)
  want_value, want_grad = _single_device_logits(name, reduction)(z, y, where, alpha)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "categorical"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_shard_map_cotangents_keep_their_types(name, dtype):
  # Inside shard_map (vma checking on): gradients w.r.t. replicated parameters and alpha and
  # w.r.t. the device-varying logits come back with the primals' dtypes and replication, and
  # equal the single-device gradients.
  x, w, b = _data(dtype)
  y, where, alpha = _targets(name, np.float32)
  alpha = jnp.asarray(alpha, jnp.float32)
  mesh = _mesh()

  def loss(w, b, alpha, z_extra, x, y, where, axis_name):
    return _loss(name, x @ w + b[None] + z_extra, y, where, alpha, "mean_positive", axis_name)

  @functools.partial(jax.shard_map, mesh=mesh, out_specs=(P(), P(), P(), P(), P(AXIS)),
                     in_specs=(P(), P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS)))
  def step(w, b, alpha, z_extra, x, y, where):
    fn = lambda *p: lax.pmean(loss(*p, x, y, where, AXIS), AXIS)
    value, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(w, b, alpha, z_extra)
    return (value,) + grads

  z_extra = jnp.zeros((16, C), dtype)
  out = jax.jit(step)(w, b, alpha, z_extra, x, y, where)
  value, gw, gb, galpha, gz = out
  assert value.dtype == dtype
  assert (gw.dtype, gb.dtype, galpha.dtype, gz.dtype) == (dtype, dtype, jnp.float32, dtype)
  assert gz.shape == (16, C)
  want_value, want = jax.jit(jax.value_and_grad(
      lambda *p: loss(*p, x, y, where, None), argnums=(0, 1, 2, 3)))(w, b, alpha, z_extra)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  for got, ref in zip((value, gw, gb, galpha, gz), (want_value,) + want):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol)


# sample_weight with axis_name: per-entry weights multiply the loss and gradient, the
# denominators (summed over the devices) are unchanged.
WEIGHT = np.linspace(0.0, 3.0, 16)


def _weight(name):
  return np.broadcast_to(WEIGHT[:, None], (16, C)).copy() if name == "sigmoid" else WEIGHT


def _weighted_loss(name, z, y, where, alpha, weight, reduction, axis_name=None):
  if name == "softmax":
    return focal_jax.softmax_focal(z, y, alpha=alpha, gamma=2.0, where=where, ignore_index=-1,
                                   reduction=reduction, axis_name=axis_name,
                                   sample_weight=weight)
  if name == "sigmoid":
    return focal_jax.sigmoid_focal(z, y, alpha=alpha, gamma=2.0, where=where,
                                   reduction=reduction, axis_name=axis_name,
                                   sample_weight=weight)
  if name == "linear":  # z is the hidden input here, with the kernel and bias of _data
    _, w, b = _data()
    return focal_jax.linear_softmax_focal(z, w, y, bias=b, alpha=alpha, gamma=2.0, where=where,
                                          ignore_index=-1, reduction=reduction,
                                          axis_name=axis_name, sample_weight=weight,
                                          chunk_size=2)
  return focal_jax.categorical_focal(z, y, alpha=alpha, gamma=2.0, where=where,
                                     reduction=reduction, axis_name=axis_name,
                                     sample_weight=weight)


WEIGHTED_CASES = [("softmax", "mean_positive"), ("softmax", "mean"), ("sigmoid", "mean"),
                  ("categorical", "mean_positive"), ("linear", "mean")]


@pytest.mark.parametrize("name,reduction", WEIGHTED_CASES)
def test_sample_weight_with_axis_name_equals_single_device_and_reference(refs, name, reduction):
  x, w, b = _data()
  y, where, alpha = _targets("softmax" if name == "linear" else name, np.float64)
  z = x if name == "linear" else x @ w + b[None]
  weight = _weight(name)
  mesh = _mesh()

  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(AXIS), P(AXIS), P(AXIS), P(), P(AXIS)), out_specs=P())
  def mean_of_shards(z, y, where, alpha, weight):
    return lax.pmean(_weighted_loss(name, z, y, where, alpha, weight, reduction, AXIS), AXIS)

  value, grad = jax.jit(jax.value_and_grad(mean_of_shards))(z, y, where, alpha, weight)
  want_value, want_grad = jax.jit(jax.value_and_grad(
      lambda z: _weighted_loss(name, z, y, where, alpha, weight, reduction)))(z)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)

  # pmap with the same convention.
  def per_device(z, y, where, weight):
    v, g = jax.value_and_grad(
        lambda z: _weighted_loss(name, z, y, where, alpha, weight, reduction, AXIS))(z)
    return lax.pmean(v, AXIS), g
  pv, pg = jax.pmap(per_device, axis_name=AXIS)(_shard(z), _shard(y), _shard(where),
                                                _shard(weight))
  np.testing.assert_allclose(np.asarray(pv), np.full(N_DEV, want_value), rtol=1e-12)
  # Per-device gradients are the local shard's share times the axis size (pmean -> whole).
  np.testing.assert_allclose(np.asarray(pg).reshape(z.shape) / N_DEV, want_grad, rtol=1e-12,
                             atol=1e-15)

  # The single-device value: the float64 reference times the weights, reduced here.
  zz = x @ w + b[None]
  if name in ("softmax", "linear"):
    valid = WHERE & (LABELS != -1)
    per_entry = refs.softmax_focal(zz, LABELS, alpha=ALPHA, where=valid)
    positive = LABELS != 0
  elif name == "sigmoid":
    valid = where
    per_entry = refs.sigmoid_focal(zz, y, alpha=0.25)
    positive = y > 0
  else:
    valid = WHERE
    per_entry = refs.categorical_focal(zz, y, alpha=ALPHA)
    positive = y.argmax(-1) != 0
  total = np.where(valid, per_entry * weight, 0.0).sum()
  count = valid.sum() if reduction == "mean" else (valid & positive).sum()
  np.testing.assert_allclose(want_value, total / count, rtol=1e-12)


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "categorical"])
@pytest.mark.parametrize("n,c", [(65536, 16), (16384, 91), (8192, 1000)])
def test_shard_map_checks_vma_at_sizes_with_blocked_loops(name, n, c):
  # Per device 2^14 to 2^21 float32 entries: the CPU forms' loops over blocks of rows (traced
  # on every platform by lax.platform_dependent) start from constant zeros, which shard_map's
  # default check_vma rejected ("carry input and carry output must have equal types": the
  # body reads the sharded logits) before their carries took the logits' mesh axes.
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(0, 2, (n, c)), jnp.float32)
  labels = rng.integers(0, c, n)
  y = labels if name == "softmax" else np.eye(c, dtype=np.float32)[labels]
  where = np.ones(n, bool) if name != "sigmoid" else np.ones((n, c), bool)
  where[::7] = False
  alpha = np.float32(0.25)

  @functools.partial(jax.shard_map, mesh=_mesh(), in_specs=(P(AXIS), P(AXIS), P(AXIS)),
                     out_specs=P())
  def mean_of_shards(z, y, where):
    return lax.pmean(_loss(name, z, y, where, alpha, "mean", axis_name=AXIS), AXIS)

  value, grad = jax.jit(jax.value_and_grad(mean_of_shards))(z, y, where)
  want_value, want_grad = _single_device_logits(name, "mean")(z, y, where, alpha)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-9)
