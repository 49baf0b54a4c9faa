"""softmax_focal's CUDA gradient as categorical_focal's Triton kernel with the labels as
targets (`focal_jax._softmax._kernel_focal`, `_categorical_kernel.labels_form`), on the CPU.

On CUDA, for 2-D logits (class axis last) with int32 labels, no label smoothing and at most
`_COLUMN_CLASSES` classes, the logits' tangent of softmax_focal is `_categorical_kernel`'s
primitive with the labels as (N, 1) targets; its transpose, the gradient, is the Triton kernel
building the one-hot targets in registers. Here that path runs on the CPU with the kernel in
Pallas' interpret mode (`_KERNEL_INTERPRET = ["gpu"]`) and is checked against the float64
references (`focal_reference`: values; float64 autodiff of the textbook formula: gradients,
Hessians): alpha / gamma scalars and class vectors, where / ignore_index, every reduction,
sample weights, partial last programs, out-of-range labels and non-finite logits (NaN rows,
as the other forms), float32 / bfloat16 inputs, vmap. The CUDA program is only lowered here.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax
import focal_reference
from focal_jax import _categorical
from focal_jax import _softmax

C = 16
RNG = np.random.default_rng(0)
ALPHA = RNG.uniform(0.1, 1.0, C)
GAMMA = RNG.uniform(0.0, 3.0, C)


@pytest.fixture
def kernel(monkeypatch):
  """softmax_focal with the kernel form on every platform (the GPU kernel interpreted)."""
  monkeypatch.setattr(_softmax, "_KERNEL_INTERPRET", ["gpu"])


def _data(n=37, c=C, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, c)) * scale, rng.integers(0, c, size=n).astype(np.int32)


def _ref_sum(z, t, **kw):
  """float64 jnp reference (differentiable): the textbook formula, summed."""
  return focal_reference.softmax_focal(z, t, compute=None, stable=False, reduction="sum",
                                       **kw)


def _takes_kernel(fn, *args):
  return "categorical_focal_ct_times_grad" in str(jax.make_jaxpr(jax.grad(fn))(*args))


@pytest.mark.parametrize("alpha, gamma, reduction", [
    (None, 2.0, "mean"), (0.25, 0.5, "sum"), (ALPHA, GAMMA, "mean"), (ALPHA, 0.0, "none"),
    (None, GAMMA, "mean_positive"), (0.5, 0.0, "mean"), (ALPHA, GAMMA, "none"),
    (0.25, 0.5, "mean_positive")])
def test_values_and_gradients_match_float64_reference(kernel, alpha, gamma, reduction):
  with jax.enable_x64(True):
    z, t = _data(seed=1)
    t[:3] = 0  # background rows
    where = np.ones(len(t), bool)
    where[[3, 7]] = False
    t[11] = -100  # ignored
    kw = dict(alpha=alpha, gamma=gamma, where=where, ignore_index=-100, background_class=0,
              reduction=reduction)
    got = focal_jax.softmax_focal(jnp.asarray(z), jnp.asarray(t), **kw)
    np.testing.assert_allclose(got, focal_reference.softmax_focal(z, t, **kw), rtol=1e-12,
                               atol=1e-14)
    gkw = dict(kw, reduction="sum") if reduction == "none" else kw
    fn = lambda z: focal_jax.softmax_focal(z, jnp.asarray(t), **gkw)
    assert _takes_kernel(fn, jnp.asarray(z))
    got = np.asarray(jax.grad(fn)(jnp.asarray(z)))
    want = jax.grad(lambda z: focal_reference.softmax_focal(z, t, compute=None, stable=False,
                                                            **gkw))(jnp.asarray(z))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(got[[3, 7, 11]], 0.0)


@pytest.mark.parametrize("n, c", [(1, 2), (37, 5), (512, 16), (1500, 32), (1500, 2), (37, 32)])
def test_shapes_and_partial_programs(kernel, n, c):
  with jax.enable_x64(True):
    z, t = _data(n, c, seed=n + c)
    fn = lambda z: focal_jax.softmax_focal(z, jnp.asarray(t), gamma=2.0, reduction="mean")
    assert _takes_kernel(fn, jnp.asarray(z))
    got = np.asarray(jax.grad(fn)(jnp.asarray(z)))
    want = np.asarray(jax.grad(lambda z: _ref_sum(z, t, gamma=2.0) / n)(jnp.asarray(z)))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


def test_sample_weight_and_per_row_losses(kernel):
  with jax.enable_x64(True):
    z, t = _data(seed=3)
    w = np.random.default_rng(4).uniform(0.0, 2.0, len(t))
    fn = lambda z: focal_jax.softmax_focal(z, jnp.asarray(t), alpha=ALPHA, gamma=1.5,
                                           sample_weight=w, reduction="mean")
    assert _takes_kernel(fn, jnp.asarray(z))
    got = np.asarray(jax.grad(fn)(jnp.asarray(z)))
    ref = lambda z: jnp.sum(w * focal_reference.softmax_focal(
        z, t, alpha=ALPHA, gamma=1.5, compute=None, stable=False)) / len(t)
    np.testing.assert_allclose(got, np.asarray(jax.grad(ref)(jnp.asarray(z))), rtol=1e-10,
                               atol=1e-15)
    # Cotangents of the per-row losses.
    ct = np.linspace(-1.0, 2.0, len(t))
    fn = lambda z: jnp.sum(ct * focal_jax.softmax_focal(z, jnp.asarray(t), gamma=2.0))
    ref = lambda z: jnp.sum(ct * focal_reference.softmax_focal(z, t, gamma=2.0, compute=None,
                                                               stable=False))
    np.testing.assert_allclose(np.asarray(jax.grad(fn)(jnp.asarray(z))),
                               np.asarray(jax.grad(ref)(jnp.asarray(z))), rtol=1e-10,
                               atol=1e-15)


def test_hyperparameter_gradients_and_hessian(kernel):
  with jax.enable_x64(True):
    z, t = _data(n=6, c=5, seed=5, scale=1.5)
    alpha, gamma = ALPHA[:5], GAMMA[:5]
    fn = lambda z, a, g: focal_jax.softmax_focal(z, jnp.asarray(t), alpha=a, gamma=g,
                                                 reduction="sum")
    ref = lambda z, a, g: _ref_sum(z, t, alpha=a, gamma=g)
    args = tuple(jnp.asarray(x) for x in (z, alpha, gamma))
    assert _takes_kernel(lambda z: fn(z, *args[1:]), args[0])
    for got, want in zip(jax.grad(fn, argnums=(0, 1, 2))(*args),
                         jax.grad(ref, argnums=(0, 1, 2))(*args)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-14)
    got = jax.hessian(fn)(*args)
    want = jax.hessian(ref)(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-8, atol=1e-13)
    # Mixed second derivative (the class vectors reach the kernel primitive's JVP).
    got = jax.jacfwd(jax.grad(fn), argnums=1)(*args)
    want = jax.jacfwd(jax.grad(ref), argnums=1)(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-8, atol=1e-13)


def test_out_of_range_labels_and_non_finite_logits(kernel):
  # NaN loss and NaN gradient rows where the loss is undefined (an
  # unmasked out-of-range label, a NaN or +inf logit, no finite logit); masked rows exactly 0;
  # a -inf non-target logit is a masked class, a -inf target gives +inf with a finite gradient.
  with jax.enable_x64(True):
    z, t = _data(n=12, seed=6)
    t[0], t[1] = -1, C  # out of range
    z[2, 4] = np.nan
    z[3, 5] = np.inf
    z[4, :] = -np.inf
    z[5, (t[5] + 1) % C] = -np.inf
    z[6, t[6]] = -np.inf
    z[7, :] = np.nan  # masked
    t[8] = 99  # masked
    where = np.arange(12) < 7
    where[9:] = True
    fn = lambda z: focal_jax.softmax_focal(z, jnp.asarray(t), where=where, gamma=2.0,
                                           reduction="sum")
    assert _takes_kernel(fn, jnp.asarray(z))
    got = np.asarray(jax.grad(fn)(jnp.asarray(z)))
    for row in range(5):
      assert np.all(np.isnan(got[row])), row
    assert np.all(got[7:9] == 0.0)
    assert np.all(np.isfinite(got[5])) and got[5, (t[5] + 1) % C] == 0.0
    assert np.all(np.isfinite(got[6]))
    # Finite rows (and the -inf limits) match the column form's gradient.
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(_softmax, "_KERNEL_INTERPRET", [None])
      mp.setattr(_softmax, "_platform_rows", _softmax.column_focal_rows)
      want = np.asarray(jax.grad(fn)(jnp.asarray(z)))
    np.testing.assert_allclose(got[5:], want[5:], rtol=1e-10, atol=1e-15)
    # The other forms give those rows NaN at the target (and at NaN / inf logits) at least;
    # the kernel form the whole row, as categorical_focal's kernels.
    assert np.all(np.isnan(want[:5]).any(axis=1))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_low_precision_inputs_match_float64(kernel, dtype, tol):
  z, t = _data(n=300, seed=7)
  z = np.asarray(jnp.asarray(z, dtype).astype(jnp.float32), np.float64)  # representable
  fn = lambda z: focal_jax.softmax_focal(z, jnp.asarray(t), alpha=ALPHA, gamma=GAMMA,
                                         reduction="mean")
  assert _takes_kernel(fn, jnp.asarray(z, dtype))
  got = np.asarray(jax.grad(fn)(jnp.asarray(z, dtype)).astype(jnp.float32), np.float64)
  with jax.enable_x64(True):
    want = np.asarray(jax.grad(lambda z: _ref_sum(z, t, alpha=ALPHA, gamma=GAMMA) / len(t))(
        jnp.asarray(z)))
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_vmap_of_grad(kernel):
  with jax.enable_x64(True):
    z = np.stack([_data(seed=s)[0] for s in (8, 9)])
    t = np.stack([_data(seed=s)[1] for s in (8, 9)])
    fn = lambda z, t: focal_jax.softmax_focal(z, t, gamma=2.0, reduction="mean")
    got = np.asarray(jax.vmap(jax.grad(fn))(jnp.asarray(z), jnp.asarray(t)))
    for i in range(2):
      want = jax.grad(lambda z: _ref_sum(z, t[i], gamma=2.0) / len(t[i]))(jnp.asarray(z[i]))
      np.testing.assert_allclose(got[i], np.asarray(want), rtol=1e-10, atol=1e-15)


def _custom_calls(text: str, target: str) -> list[str]:
  return re.findall(r"custom_call @" + re.escape(target) + r"\(.*?: \((.*?)\) -> ", text)


def test_the_cuda_program_takes_the_triton_kernel(monkeypatch):
  # For CUDA the gradient of a mean is the Triton kernel reading the logits, the int32 labels
  # and three scalars (no (N, C) targets, no per-row vector); elsewhere, with label smoothing,
  # other labels' dtypes, more classes than the column form's, or FOCAL_JAX_GPU_KERNEL=0, no
  # kernel.
  triton = "__gpu$xla.gpu.triton"

  def lower(platform, c=16, dtype=jnp.int32, **kw):
    fn = lambda z, t: focal_jax.softmax_focal(z, t, reduction="mean", **kw)
    return jax.jit(jax.grad(fn)).trace(
        jax.ShapeDtypeStruct((256, c), jnp.bfloat16), jax.ShapeDtypeStruct((256,), dtype)
    ).lower(lowering_platforms=(platform,)).as_text()

  assert _custom_calls(lower("cuda"), triton) == [
      "tensor<3xf32>, tensor<256x16xbf16>, tensor<256x1xi32>"]
  assert _custom_calls(lower("cuda", where=jnp.arange(256) > 3), triton) == [
      "tensor<3xf32>, tensor<256x16xbf16>, tensor<256x1xi32>, tensor<256x1xi1>"]
  for platform in ("cpu", "tpu"):
    assert triton not in lower(platform)
  assert triton not in lower("cuda", label_smoothing=0.1)
  assert triton not in lower("cuda", c=33)
  assert triton not in lower("cuda", dtype=jnp.int8)
  monkeypatch.setenv(_categorical.GPU_KERNEL_ENV, "0")
  assert triton not in lower("cuda", gamma=1.0)
