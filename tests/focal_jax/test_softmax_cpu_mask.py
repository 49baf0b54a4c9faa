"""The target mask of softmax_focal's CPU forms (`focal_jax._softmax.target_mask`).

XLA:CPU compares an int32 class iota with a broadcast label in 64-bit vector lanes, which
doubled the time of the masked exp pass at (16384, 91) on an Intel Xeon (issue 11: JAX
1.39-1.69x optax's cross-entropy there); compared as float32 it costs about nothing. Here: the
compiled CPU training step compares the classes as float32 (no int32 class iota), and the mask
equals the integer compare, also for split classes (an offset first class) and beyond 2**24
classes, where float32 no longer holds every class id (the integer compare is kept there).
The values themselves are the float64 tests' (test_softmax.py, test_numerics.py, ...).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax
from focal_jax import _softmax


def _cpu_step_hlo(n, c, **kw):
  step = jax.jit(jax.value_and_grad(
      lambda z, y: focal_jax.softmax_focal(z, y, reduction="mean", **kw)))
  z = jax.ShapeDtypeStruct((n, c), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)
  return step.trace(z, y).lower(lowering_platforms=("cpu",)).compile().as_text()


def _class_iotas(hlo, dtype, c):
  """The iotas of `dtype` whose last dimension is the class axis (`c` long) and counts it."""
  pattern = rf"{dtype}\[[\d,]*,{c}\]\{{[\d,]*\}} iota\(\), iota_dimension=(\d+)"
  return [m for m in re.finditer(pattern, hlo)
          if int(m.group(1)) == m.group(0).split("{")[0].count(",")]


@pytest.mark.parametrize("n,c,kw", [
    (64, 91, {}),  # the fused form
    (64, 91, {"gamma": 0.0, "label_smoothing": 0.1}),
    (64, 1000, {}),
    (65536, 3, {}),  # the blocked form (a scan over blocks of rows)
])
def test_cpu_step_compares_classes_as_float32(n, c, kw):
  hlo = _cpu_step_hlo(n, c, **kw)
  assert not _class_iotas(hlo, "s32", c), "an int32 class iota in the CPU step"
  assert _class_iotas(hlo, "f32", c), "no float32 class iota in the CPU step"


@pytest.mark.parametrize("first_class", [0, 5, "traced"])
def test_target_mask_equals_the_integer_compare(first_class):
  rng = np.random.default_rng(0)
  c_local, c_total, n = 7, 28, 40
  first = 10 if first_class == "traced" else first_class
  t = rng.integers(0, c_total, size=n).astype(np.int32)
  t[:c_local] = first + np.arange(c_local)  # every local column is some row's target

  def mask(t, first):
    return _softmax.target_mask(t, (n, c_local), first_class=first, num_classes=c_total)

  if first_class == "traced":
    got = jax.jit(mask)(t, jnp.int32(first))
  else:
    got = jax.jit(mask, static_argnums=1)(t, first)
  want = first + np.arange(c_local)[None, :] == t[:, None]
  np.testing.assert_array_equal(np.asarray(got), want)


def test_target_mask_beyond_float32_class_ids_compares_integers():
  # Classes 2**24 - 2 .. 2**24 + 1: in float32 2**24 + 1 rounds to 2**24.
  big = 1 << 24
  t = np.array([big + 1, big, big - 2], np.int32)
  got = jax.jit(lambda t: _softmax.target_mask(t, (3, 4), first_class=big - 2,
                                               num_classes=big + 8))(t)
  want = np.array([[0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(got), want)
