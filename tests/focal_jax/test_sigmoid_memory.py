"""sigmoid_focal's compiled memory on CPU, and the blocked forward sum that keeps it low.

The memory budget is read from XLA's own buffer assignment (``compiled.memory_analysis()``,
deterministic for a given jax/XLA): under ``jit(value_and_grad)`` the step may use at most
``TEMP_BUDGET`` times the logits' size in temporaries beyond its outputs (float32 logits).
Before the blocked sum the same programs took 6.0x (XLA on CPU materialized every
intermediate shared by the forward sum and the gradient). The blocked path's values and
gradients are checked against float64 references, with a block size small enough that every
test shape takes it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax
from focal_jax import _sigmoid

# Temporaries of the compiled step over the logits' size. Measured: 0.09x at these shapes
# (a few blocks of 2**16 entries; 2**22-entry logits), 6.0x before the blocked sum.
TEMP_BUDGET = 0.25
ELEMENTS = 1 << 22


def _temp_ratio(fn, shape, dtype=jnp.float32, label_dtype=jnp.float32, extra=(),
                grad_only=False):
  """Compiled temporaries of jit(value_and_grad(fn)) (or jit(grad)) over the logits' bytes."""
  args = [jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape, label_dtype)]
  args += [jax.ShapeDtypeStruct(s, d) for s, d in extra]  # traced: no constant folding
  step = jax.grad(fn) if grad_only else jax.value_and_grad(fn)
  compiled = jax.jit(step).lower(*args).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  logits_bytes = np.prod(shape) * jnp.dtype(dtype).itemsize
  return analysis.temp_size_in_bytes / logits_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the budget is XLA:CPU's")
@pytest.mark.parametrize("classes", [2, 91, 30522])
def test_value_and_grad_needs_no_temporaries_of_the_logits_size(classes):
  # The benchmark's step: alpha 0.25, gamma 2, mean over every entry, 0/1 float labels.
  shape = (ELEMENTS // classes, classes)
  loss = lambda x, y: focal_jax.sigmoid_focal(x, y, alpha=0.25, gamma=2.0, reduction="mean")
  ratio = _temp_ratio(loss, shape)
  assert ratio <= TEMP_BUDGET, f"compiled temporaries {ratio:.2f}x the logits at {shape}"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the budget is XLA:CPU's")
def test_masked_weighted_smoothed_step_needs_no_temporaries_of_the_logits_size():
  shape = (ELEMENTS // 1000, 1000)
  extra = [((shape[0], 1), jnp.bool_), ((shape[1],), jnp.float32)]  # row mask, alpha vector
  # "sum" here; the count of a broadcast mask ("mean") has its own test below.
  loss = lambda x, y, rows, alpha: focal_jax.sigmoid_focal(
      x, y, alpha=alpha, gamma=0.5, label_smoothing=0.1, where=rows, sample_weight=2.0,
      reduction="sum")
  for grad_only in (False, True):
    ratio = _temp_ratio(loss, shape, label_dtype=jnp.bool_, extra=extra, grad_only=grad_only)
    assert ratio <= TEMP_BUDGET, f"grad_only={grad_only}: {ratio:.2f}x the logits"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the budget is XLA:CPU's")
@pytest.mark.parametrize("reduction", ["mean", "mean_positive"])
def test_counting_a_broadcast_mask_needs_no_temporaries_of_the_logits_size(reduction):
  # The denominator counts the (N, 1) row mask broadcast over the (N, C) entries. Summed over
  # every entry at once, XLA on CPU wrote the converted mask to memory: an (N, C) int64 array
  # under jax_enable_x64, 2.0x the float32 logits. Counted row by row, it is a product.
  shape = (ELEMENTS // 1000, 1000)
  extra = [((shape[0], 1), jnp.bool_)]
  loss = lambda x, y, rows: focal_jax.sigmoid_focal(x, y, alpha=0.25, gamma=2.0, where=rows,
                                                    reduction=reduction)
  for grad_only in (False, True):
    ratio = _temp_ratio(loss, shape, label_dtype=jnp.bool_, extra=extra, grad_only=grad_only)
    assert ratio <= TEMP_BUDGET, f"grad_only={grad_only}: {ratio:.2f}x the logits"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the budget is XLA:CPU's")
def test_bfloat16_step_keeps_at_most_one_copy_of_the_logits_bits():
  # XLA on CPU hands a loop over 16-bit floats a converted copy of the whole array (float32:
  # 2x the bfloat16 logits); the blocked sum passes their bits instead (one uint16 copy, 1x).
  # Before the blocked sum: 14x.
  shape = (ELEMENTS // 1000, 1000)
  loss = lambda x, y: focal_jax.sigmoid_focal(x, y, alpha=0.25, gamma=2.0, reduction="mean")
  ratio = _temp_ratio(loss, shape, dtype=jnp.bfloat16)
  assert ratio <= 1.0 + 2 * TEMP_BUDGET, f"compiled temporaries {ratio:.2f}x the logits"


# --- the blocked sum's numerics ----------------------------------------------------------

@pytest.fixture
def small_blocks(monkeypatch):
  # Blocks of 8 entries: every shape below takes the loop, with a remainder block.
  monkeypatch.setattr(_sigmoid, "_BLOCK", 8)


def _case(shape, seed, soft):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 3
  y = rng.uniform(size=shape) if soft else (rng.uniform(size=shape) < 0.3).astype(np.float64)
  return x, y


CASES = [
    # shape, keywords (arrays broadcast against the logits)
    ((13, 3), dict(alpha=0.25, gamma=2.0, reduction="mean")),
    ((29,), dict(alpha=0.75, gamma=0.5, reduction="sum")),  # 1-D: one entry per row
    ((5, 4, 3), dict(alpha=[0.1, 0.5, 0.9], gamma=[0.0, 1.0, 2.5], label_smoothing=0.1,
                     reduction="mean_positive")),
    ((11, 20), dict(gamma=1.5, where="rows", sample_weight="columns", reduction="mean")),
    ((3, 40), dict(alpha=0.3, gamma=2.0, where="entries", sample_weight=0.5,
                   reduction="sum")),  # rows longer than a block
]


def _arrays(shape, kw, seed):
  rng = np.random.default_rng(seed)
  kw = dict(kw)
  if kw.get("where") == "rows":
    kw["where"] = rng.uniform(size=shape[:-1] + (1,)) < 0.7
  elif kw.get("where") == "entries":
    kw["where"] = rng.uniform(size=shape) < 0.7
  if kw.get("sample_weight") == "columns":
    kw["sample_weight"] = rng.uniform(0.0, 2.0, size=shape[-1:])
  return kw


@pytest.mark.parametrize("shape,kw", CASES)
@pytest.mark.parametrize("soft", [False, True])
def test_blocked_sum_value_and_gradients_match_float64_reference(small_blocks, refs, shape, kw,
                                                                 soft):
  x, y = _case(shape, seed=len(shape) + shape[-1], soft=soft)
  kw = _arrays(shape, kw, seed=shape[0])
  fn = lambda x, y: focal_jax.sigmoid_focal(x, y, **kw)
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(x, y)
  ref_kw = {k: np.asarray(v) if isinstance(v, list) else v for k, v in kw.items()}
  np.testing.assert_allclose(value, refs.sigmoid_focal(x, y, **ref_kw), rtol=1e-12)
  # Gradients: plain float64 autodiff of the textbook formula (moderate margins here).
  red = kw["reduction"]
  where = kw.get("where")
  valid = np.ones(shape, bool) if where is None else np.broadcast_to(where, shape)
  weight = np.broadcast_to(np.asarray(kw.get("sample_weight", 1.0)), shape)
  count = {"sum": 1.0, "mean": max(valid.sum(), 1),
           "mean_positive": max((valid & (y > 0)).sum(), 1)}[red]
  alpha = None if "alpha" not in kw else np.broadcast_to(np.asarray(kw["alpha"]), shape)
  gamma = np.broadcast_to(np.asarray(kw["gamma"]), shape)
  eps = kw.get("label_smoothing", 0.0)

  def ref(x, y):
    ys = y * (1 - eps) + eps / 2
    p = jax.nn.sigmoid(x)
    bce = -(ys * jnp.log(p) + (1 - ys) * jnp.log1p(-p))
    loss = jnp.where(gamma == 0, 1.0, (1 - (p * ys + (1 - p) * (1 - ys))) ** gamma) * bce
    if alpha is not None:
      loss = (alpha * ys + (1 - alpha) * (1 - ys)) * loss
    return jnp.sum(jnp.where(valid, loss * weight, 0.0)) / count

  want = jax.grad(ref, argnums=(0, 1))(x, y)
  np.testing.assert_allclose(grads[0], want[0], rtol=1e-10, atol=1e-14)
  if soft:  # soft labels are differentiable; hard ones get the same closed form
    np.testing.assert_allclose(grads[1], want[1], rtol=1e-10, atol=1e-14)


def test_blocked_sum_hessian_matches_unblocked(small_blocks, refs):
  x, y = _case((7, 3), seed=3, soft=True)
  fn = lambda x, y: focal_jax.sigmoid_focal(x, y, alpha=0.3, gamma=1.5, reduction="sum")
  ref = lambda x, y: refs.jnp_sigmoid_focal_sum(x, y, 0.3, 1.5)
  np.testing.assert_allclose(jax.jit(jax.hessian(fn))(x, y), jax.jit(jax.hessian(ref))(x, y),
                             rtol=1e-9, atol=1e-12)


def test_blocked_sum_at_a_shape_past_the_real_block_size(refs):
  # 90000 entries: one block of 218 rows of 300 and a remainder block of 82 rows.
  x, y = _case((300, 300), seed=8, soft=False)
  x32, y32 = x.astype(np.float32), y.astype(np.float32)
  value, grad = jax.jit(jax.value_and_grad(lambda x, y: focal_jax.sigmoid_focal(
      x, y, alpha=0.25, reduction="sum")))(x32, y32)
  np.testing.assert_allclose(value, refs.sigmoid_focal(x32.astype(np.float64), y, alpha=0.25,
                                                       reduction="sum"), rtol=1e-5)
  want = jax.grad(lambda x: refs.jnp_sigmoid_focal_sum(x, y, 0.25, 2.0))(
      x32.astype(np.float64))
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
