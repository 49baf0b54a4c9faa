"""linear_softmax_focal against the materialized path softmax_focal(hidden @ kernel + bias).

float64: equal to float64 precision, value and gradients w.r.t. hidden, kernel and bias (and
alpha, gamma). float32: rtol 1e-5. bfloat16: both paths against the float64 truth on the same
(rounded) inputs, the fused one within 1e-2 (it accumulates the logits in float32; the
materialized path rounds them to bfloat16 first).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import focal_jax
from focal_jax import _linear

N, H, V = 13, 6, 11
REDUCTIONS = ("none", "sum", "mean", "mean_positive")


def _data(dtype=np.float64, seed=0, shape=(N,)):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=shape + (H,))
  w = rng.normal(size=(H, V)) / np.sqrt(H) * 3
  b = rng.normal(size=(V,))
  t = rng.integers(0, V, size=shape)
  t.reshape(-1)[[0, 5, 9]] = 0  # some background rows
  return h.astype(dtype), w.astype(dtype), b.astype(dtype), t


def _materialized(h, w, t, bias=None, **kw):
  z = h @ w if bias is None else h @ w + bias[(None,) * (h.ndim - 1)]
  return focal_jax.softmax_focal(z, t, **kw)


@functools.lru_cache(maxsize=None)
def _value_and_grads(path, static):
  """jit(value_and_grad) w.r.t. hidden, kernel, bias, alpha, gamma; static keywords fixed."""
  kw = dict(static)
  def f(h, w, b, alpha, gamma, t, where):
    if path == "fused":
      return focal_jax.linear_softmax_focal(h, w, t, bias=b, alpha=alpha, gamma=gamma,
                                            where=where, **kw)
    kw.pop("chunk_size", None)
    return _materialized(h, w, t, bias=b, alpha=alpha, gamma=gamma, where=where, **kw)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))


KEYWORD_CASES = [
    dict(reduction="mean", chunk_size=4),  # 13 rows: 4 chunks, the last one padded
    dict(reduction="mean_positive", chunk_size=5, label_smoothing=0.1, ignore_index=-100),
    dict(reduction="sum", chunk_size=13, label_smoothing=0.2),
    dict(reduction="mean", chunk_size=None, ignore_index=-100),  # automatic chunk size
    dict(reduction="mean_positive", chunk_size=64, background_class=3),  # one short chunk
]


@pytest.mark.parametrize("case", range(len(KEYWORD_CASES)))
def test_value_and_all_gradients_match_materialized_path_in_float64(case):
  kw = KEYWORD_CASES[case]
  h, w, b, t = _data(seed=case)
  t[[2, 7]] = -100 if kw.get("ignore_index") == -100 else t[[2, 7]]
  where = np.ones(N, bool)
  where[11] = False
  alpha = np.linspace(0.1, 1.0, V)
  gamma = np.linspace(0.5, 3.0, V)
  static = tuple(sorted(kw.items()))
  got_v, got_g = _value_and_grads("fused", static)(h, w, b, alpha, gamma, t, where)
  want_v, want_g = _value_and_grads("materialized", static)(h, w, b, alpha, gamma, t, where)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-13)
  for name, g, wg in zip(("hidden", "kernel", "bias", "alpha", "gamma"), got_g, want_g):
    assert g.shape == wg.shape, name
    np.testing.assert_allclose(g, wg, rtol=1e-11, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_reduction_matches_materialized_path(refs, reduction):
  h, w, b, t = _data(seed=10, shape=(2, 7))  # (B, T, H) hidden
  kw = dict(gamma=2.0, reduction=reduction)
  got = jax.jit(lambda h, w: focal_jax.linear_softmax_focal(h, w, t, chunk_size=3, **kw))(h, w)
  assert got.shape == (t.shape if reduction == "none" else ())
  np.testing.assert_allclose(got, refs.softmax_focal(h @ w, t, **kw), rtol=1e-12)


def test_float32_matches_materialized_path():
  h, w, b, t = _data(np.float32, seed=11)
  static = (("chunk_size", 4), ("label_smoothing", 0.1), ("reduction", "mean"))
  args = (h, w, b, np.float32(0.25), np.float32(2.0), t, np.ones(N, bool))
  got_v, got_g = _value_and_grads("fused", static)(*args)
  want_v, want_g = _value_and_grads("materialized", static)(*args)
  assert got_v.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in got_g)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  for g, wg in zip(got_g[:3], want_g[:3]):
    np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-5 * np.abs(wg).max())


def test_bfloat16_is_within_1e_2_of_the_float64_truth():
  h, w, b, t = _data(seed=12)
  hb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (h, w, b))
  static = (("chunk_size", 4), ("reduction", "mean"))
  args = (np.float32(1.0), np.float32(2.0), t, np.ones(N, bool))
  got_v, got_g = _value_and_grads("fused", static)(hb, wb, bb, *args)
  assert got_v.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_g[:3])
  exact = [np.asarray(a, np.float64) for a in (hb, wb, bb)]
  want_v, want_g = _value_and_grads("materialized", static)(*exact, *args)
  np.testing.assert_allclose(np.float64(got_v), want_v, rtol=1e-2)
  for g, wg in zip(got_g[:3], want_g[:3]):
    np.testing.assert_allclose(np.asarray(g, np.float64), wg, rtol=0, atol=1e-2 * np.abs(wg).max())


def test_forward_mode_matches_materialized_path():
  h, w, b, t = _data(seed=13)
  dh, dw = np.ones_like(h) * 0.1, np.ones_like(w) * 0.2
  fused = lambda h, w: focal_jax.linear_softmax_focal(h, w, t, bias=b, chunk_size=5,
                                                      reduction="mean")
  mat = lambda h, w: _materialized(h, w, t, bias=b, reduction="mean")
  got = jax.jit(lambda: jax.jvp(fused, (h, w), (dh, dw)))()
  want = jax.jit(lambda: jax.jvp(mat, (h, w), (dh, dw)))()
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("tile", [(1, 1), (5, 3), (8, 4), (16, V)])
def test_every_tiling_of_the_derivative_matches_materialized_path(monkeypatch, tile):
  # The derivative works on (tile_rows, block) tiles of the logits; here on 16 rows (13 padded
  # to chunks of 4) and V = 11 columns. Block 4 gives columns 0-3, 4-7 and a last block 7-10
  # that starts at V - block and must skip column 7, already done; block 3 skips column 8.
  # Row tiles of 5 give rows 0-4, 5-9, 10-14 and 11-15, which must skip rows 11-14.
  monkeypatch.setattr(_linear, "_auto_tile", lambda rows, vocab, size, chunk: tile)
  h, w, b, t = _data(seed=16)
  t[:V] = np.arange(V)  # a target in every column, the shared ones included
  kw = dict(alpha=np.linspace(0.1, 1.0, V), gamma=np.linspace(0.5, 3.0, V),
            label_smoothing=0.1, reduction="mean_positive")
  fused = lambda h, w, b: focal_jax.linear_softmax_focal(h, w, t, bias=b, chunk_size=4, **kw)
  mat = lambda h, w, b: _materialized(h, w, t, bias=b, **kw)
  got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, w, b)
  want = jax.jit(jax.value_and_grad(mat, argnums=(0, 1, 2)))(h, w, b)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
  for name, g, wg in zip(("hidden", "kernel", "bias"), got[1], want[1]):
    np.testing.assert_allclose(g, wg, rtol=1e-11, atol=1e-14, err_msg=name)
  tangents = (np.full_like(h, 0.1), np.full_like(w, -0.2), np.full_like(b, 0.3))
  got = jax.jit(lambda: jax.jvp(fused, (h, w, b), tangents))()
  want = jax.jit(lambda: jax.jvp(mat, (h, w, b), tangents))()
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_automatic_tiles_on_an_odd_shape_match_materialized_path():
  # No monkeypatching: 200 rows, V = 5000 and chunk_size 8 give automatic tiles of 64 rows by
  # 1024 columns, so both the last row tile and the last column block overlap the ones before.
  rows, size, vocab, chunk = 200, 64, 5000, 8
  assert _linear._auto_tile(rows, vocab, size, chunk) == (64, 1024)
  rng = np.random.default_rng(19)
  h = rng.normal(size=(rows, size))
  w = rng.normal(size=(size, vocab)) / np.sqrt(size) * 3
  b = rng.normal(size=(vocab,))
  t = rng.integers(0, vocab, rows)
  t[:5] = [0, 1023, 1024, 3976, vocab - 1]  # targets at the block edges
  kw = dict(gamma=2.0, label_smoothing=0.05, reduction="mean")
  fused = lambda h, w, b: focal_jax.linear_softmax_focal(h, w, t, bias=b, chunk_size=chunk,
                                                         **kw)
  mat = lambda h, w, b: _materialized(h, w, t, bias=b, **kw)
  got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, w, b)
  want = jax.jit(jax.value_and_grad(mat, argnums=(0, 1, 2)))(h, w, b)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
  for name, g, wg in zip(("hidden", "kernel", "bias"), got[1], want[1]):
    np.testing.assert_allclose(g, wg, rtol=1e-10, atol=1e-15 * np.abs(wg).max(), err_msg=name)


def test_vmap_of_value_and_grad_matches_materialized_path():
  # Per-sequence losses and gradients over a batch of hidden states (shared kernel), and over
  # a batch of kernels (shared hidden states): the loops and the custom_jvp batch.
  h, w, _, t = _data(seed=18, shape=(3, N))
  kernels = np.stack([w, -2.0 * w])
  kw = dict(label_smoothing=0.1, reduction="mean")
  fused = jax.value_and_grad(
      lambda h, w, t: focal_jax.linear_softmax_focal(h, w, t, chunk_size=4, **kw),
      argnums=(0, 1))
  mat = jax.value_and_grad(lambda h, w, t: _materialized(h, w, t, **kw), argnums=(0, 1))
  for in_axes, args in (((0, None, 0), (h, w, t)), ((None, 0, None), (h[1], kernels, t[1]))):
    got = jax.jit(jax.vmap(fused, in_axes))(*args)
    want = jax.jit(jax.vmap(mat, in_axes))(*args)
    for g, wg in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, wg, rtol=1e-11, atol=1e-14)


def test_second_derivatives_match_materialized_path(monkeypatch):
  # jax.hessian is forward over reverse; the gradient of a gradient norm is reverse over
  # reverse. Both go through the derivative's own loops, which must stay differentiable.
  monkeypatch.setattr(_linear, "_auto_tile", lambda rows, vocab, size, chunk: (4, 4))
  h, w, b, t = _data(seed=17)
  kw = dict(gamma=1.5, label_smoothing=0.1, reduction="mean")
  fused = lambda h, w: focal_jax.linear_softmax_focal(h, w, t, bias=b, chunk_size=5, **kw)
  mat = lambda h, w: _materialized(h, w, t, bias=b, **kw)
  got = jax.jit(jax.hessian(fused, argnums=(0, 1)))(h, w)
  want = jax.jit(jax.hessian(mat, argnums=(0, 1)))(h, w)
  for got_row, want_row in zip(got, want):
    for g, wg in zip(got_row, want_row):
      np.testing.assert_allclose(g, wg, rtol=1e-10, atol=1e-13)

  def grad_norm(f):
    return lambda h, w: sum(jnp.sum(g**2) for g in jax.grad(f, argnums=(0, 1))(h, w))
  got = jax.jit(jax.grad(grad_norm(fused), argnums=(0, 1)))(h, w)
  want = jax.jit(jax.grad(grad_norm(mat), argnums=(0, 1)))(h, w)
  for g, wg in zip(got, want):
    np.testing.assert_allclose(g, wg, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("size,chunk,limit", [
    # A wide kernel and small chunks: the temporaries take about 2 MiB, and one more
    # kernel-sized (H, V) buffer, 8 MiB, would exceed the limit on its own.
    (256, 64, "kernel"),
    # A narrow kernel and big chunks: one (chunk, V) block of logits, 8 MiB, is the largest;
    # the loop-invariant (chunk, V) constants hoisted out of a partially evaluated scan would
    # add two more.
    (64, 256, "two chunks"),
])
def test_compiled_gradient_holds_no_kernel_sized_or_extra_chunk_sized_temporary(size, chunk,
                                                                                limit):
  # XLA's own buffer assignment of jit(value_and_grad), from shapes alone (nothing runs); the
  # gradients are outputs, not temporaries. The logits would be 64 MiB.
  rows, vocab = 2048, 8192
  spec = jax.ShapeDtypeStruct
  args = (spec((rows, size), jnp.float32), spec((size, vocab), jnp.float32),
          spec((rows,), jnp.int32))
  loss = lambda h, w, t: focal_jax.linear_softmax_focal(h, w, t, chunk_size=chunk,
                                                        reduction="mean")
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  bound = size * vocab * 4 if limit == "kernel" else 2 * chunk * vocab * 4
  assert temp < bound, f"{temp / 2**20:.1f} MiB of temporaries, limit {bound / 2**20:.0f} MiB"


def test_out_of_range_label_gives_nan_for_its_row_only():
  h, w, b, t = _data(seed=14)
  t[4] = V
  t[6] = -1
  got = np.asarray(jax.jit(lambda h: focal_jax.linear_softmax_focal(h, w, t, chunk_size=4))(h))
  assert np.isnan(got[4]) and np.isnan(got[6])
  assert np.all(np.isfinite(np.delete(got, [4, 6])))


def test_pmap_and_shard_map_equal_single_device():
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  h, w, b, t = _data(seed=15, shape=(16,))
  t[:4] = [1, 2, 3, 4]  # uneven positives: 4, then fewer, shard 2 none
  t[8:12] = 0
  where = np.ones(16, bool)
  where[13] = False
  kw = dict(gamma=2.0, reduction="mean_positive", chunk_size=3)

  def loss(w, b, h, t, where, axis_name):
    return focal_jax.linear_softmax_focal(h, w, t, bias=b, where=where, axis_name=axis_name,
                                          **kw)

  want = jax.jit(jax.value_and_grad(
      lambda w, b, h: loss(w, b, h, t, where, None), argnums=(0, 1, 2)))(w, b, h)

  def per_device(w, b, h, t, where):
    value, grads = jax.value_and_grad(lambda w, b: loss(w, b, h, t, where, "d"),
                                      argnums=(0, 1))(w, b)
    return lax.pmean(value, "d"), lax.pmean(grads, "d")

  shard = lambda a: a.reshape((4, 4) + a.shape[1:])
  value, (gw, gb) = jax.pmap(per_device, axis_name="d", in_axes=(None, None, 0, 0, 0))(
      w, b, shard(h), shard(t), shard(where))
  np.testing.assert_allclose(value[0], want[0], rtol=1e-12)
  np.testing.assert_allclose(gw[3], want[1][0], rtol=1e-11, atol=1e-14)
  np.testing.assert_allclose(gb[1], want[1][1], rtol=1e-11, atol=1e-14)

  # shard_map: gradients inside, w.r.t. the replicated kernel and bias (their cotangents keep
  # the replicated type) and the row-sharded hidden.
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("d"), P("d"), P("d")),
                     out_specs=(P(), (P(), P(), P("d"))))
  def step(w, b, h, t, where):
    return jax.value_and_grad(lambda w, b, h: lax.pmean(loss(w, b, h, t, where, "d"), "d"),
                              argnums=(0, 1, 2))(w, b, h)

  value, grads = jax.jit(step)(w, b, h, t, where)
  np.testing.assert_allclose(value, want[0], rtol=1e-12)
  for g, wg in zip(grads, want[1]):
    np.testing.assert_allclose(g, wg, rtol=1e-11, atol=1e-14)


SHAPE_ERRORS = [
    (dict(kernel=np.zeros((H + 1, V))), ValueError,
     "linear_softmax_focal: kernel must have shape (H, V) with H = 6 (the last axis of hidden "
     "(13, 6)), got shape (7, 11)"),
    (dict(kernel=np.zeros((H,))), ValueError, "kernel must have shape (H, V) with H = 6"),
    (dict(bias=np.zeros(V + 1)), ValueError,
     "linear_softmax_focal: bias must have shape (11,) (V, the last axis of kernel (6, 11)), "
     "got shape (12,)"),
    (dict(labels=np.zeros(N + 1, np.int32)), ValueError,
     "linear_softmax_focal: labels must have shape (13,) (the shape of hidden (13, 6) without "
     "its last axis), got shape (14,)"),
    (dict(hidden=np.zeros((N, H), np.int32)), TypeError,
     "linear_softmax_focal: hidden must be a floating-point array, got dtype int32"),
    (dict(kernel=np.zeros((H, V), np.int32)), TypeError,
     "linear_softmax_focal: kernel must be a floating-point array, got dtype int32"),
    (dict(chunk_size=0), ValueError,
     "linear_softmax_focal: chunk_size must be a positive int or None, got 0"),
    (dict(chunk_size=2.5), TypeError,
     "linear_softmax_focal: chunk_size must be a positive int or None, got float"),
    (dict(gamma=-1.0), ValueError, "linear_softmax_focal: gamma must be >= 0, got -1.0"),
    (dict(alpha=np.ones(V - 1)), ValueError,
     "linear_softmax_focal: alpha must be a scalar or shape (11,)"),
    (dict(reduction="avg"), ValueError, "linear_softmax_focal: reduction must be one of"),
    (dict(label_smoothing=1.1), ValueError,
     "linear_softmax_focal: label_smoothing must be in [0, 1], got 1.1"),
]


@pytest.mark.parametrize("kw,error,message", SHAPE_ERRORS,
                         ids=[f"{list(c[0])[0]}-{i}" for i, c in enumerate(SHAPE_ERRORS)])
def test_bad_input_raises_with_clear_message(kw, error, message):
  kw = dict(kw)
  args = dict(hidden=np.zeros((N, H)), kernel=np.zeros((H, V)), labels=np.zeros(N, np.int32))
  for name in args:
    if name in kw:
      args[name] = kw.pop(name)
  with pytest.raises(error) as info:
    focal_jax.linear_softmax_focal(args["hidden"], args["kernel"], args["labels"], **kw)
  assert message in str(info.value), str(info.value)
