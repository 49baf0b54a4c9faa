"""The package surface: exports, docstring examples, and use with jax x64 disabled."""

import doctest
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax
from focal_jax import _categorical
from focal_jax import _linear
from focal_jax import _sigmoid
from focal_jax import _softmax


def test_public_api_is_exactly_the_losses():
  public = sorted(n for n in dir(focal_jax) if not n.startswith("_"))
  assert sorted(focal_jax.__all__) == public
  assert public == ["categorical_focal", "linear_softmax_focal", "sigmoid_focal",
                    "softmax_focal"]


def test_py_typed_marker_ships_with_the_package():
  assert os.path.isfile(os.path.join(os.path.dirname(focal_jax.__file__), "py.typed"))


@pytest.mark.parametrize("module", [_softmax, _sigmoid, _categorical, _linear])
def test_docstring_examples_print_what_they_say(module):
  options = jnp.get_printoptions()
  try:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  finally:
    jnp.set_printoptions(**options)
  assert result.attempted > 0
  assert result.failed == 0


_X64_OFF_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    import focal_jax
    assert not jax.config.jax_enable_x64
    z = jnp.asarray(json.loads(sys.argv[1]), jnp.float32)
    t = jnp.asarray([0, 2, 1], jnp.int32)
    y = jax.nn.one_hot(t, 3, dtype=jnp.float32)
    def losses(z):
      return (focal_jax.softmax_focal(z, t, alpha=jnp.array([0.2, 0.3, 0.5]), gamma=0.5,
                                      label_smoothing=0.1, reduction="mean"),
              focal_jax.sigmoid_focal(z, y, alpha=0.25, reduction="mean_positive"),
              focal_jax.categorical_focal(z, 0.9 * y + 0.1 / 3, gamma=2.0, reduction="sum"))
    values = jax.jit(losses)(z)
    grads = [jax.jit(jax.grad(lambda z, i=i: losses(z)[i]))(z) for i in range(3)]
    hess = jax.jit(jax.hessian(lambda z: losses(z)[0]))(z)
    kernel = jnp.eye(3, dtype=jnp.float32)
    linear = jax.jit(jax.value_and_grad(lambda z: focal_jax.linear_softmax_focal(
        z, kernel, t, alpha=jnp.array([0.2, 0.3, 0.5]), gamma=0.5, label_smoothing=0.1,
        reduction="mean", chunk_size=2)))(z)
    print(json.dumps({
        "dtypes": [str(v.dtype) for v in values + linear] + [str(g.dtype) for g in grads],
        "values": [float(v) for v in values] + [float(linear[0])],
        "grads": [np.asarray(g).tolist() for g in grads] + [np.asarray(linear[1]).tolist()],
        "hessian_finite": bool(np.all(np.isfinite(hess)))}))
""")


def test_float32_works_with_x64_disabled(refs, tmp_path):
  # The users' default: no jax_enable_x64 (this test process has it on, so run a fresh one).
  z = np.array([[2.0, -1.0, 0.5], [0.3, 0.1, 20.0], [-3.0, 1.0, 2.0]], np.float32)
  env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _X64_OFF_SCRIPT, json.dumps(z.tolist())],
                        capture_output=True, text=True, env=env, timeout=300, check=False,
                        cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["dtypes"] == ["float32"] * 8
  assert out["hessian_finite"]
  t = np.array([0, 2, 1])
  y = np.eye(3)[t]
  want = [
      refs.softmax_focal(z, t, alpha=np.array([0.2, 0.3, 0.5]), gamma=0.5,
                         label_smoothing=0.1, reduction="mean"),
      refs.sigmoid_focal(z, y, alpha=0.25, reduction="mean_positive"),
      refs.categorical_focal(z, 0.9 * y + 0.1 / 3, gamma=2.0, reduction="sum")]
  want.append(want[0])  # linear_softmax_focal with an identity kernel: the softmax case
  np.testing.assert_allclose(out["values"], want, rtol=2e-6)
  assert all(np.all(np.isfinite(g)) for g in out["grads"])
  want_grad = jax.grad(lambda z: refs.jnp_softmax_focal_sum(
      z, jnp.asarray(t), jnp.array([0.2, 0.3, 0.5]), 0.5, 0.1) / 3)(z.astype(np.float64))
  np.testing.assert_allclose(out["grads"][0], want_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out["grads"][3], want_grad, rtol=1e-5, atol=1e-7)


def _residual_shapes(fn, *args):
  """Shapes and dtypes of what reverse mode keeps for the backward pass (jax's own report)."""
  import contextlib
  import io
  from jax.ad_checkpoint import print_saved_residuals
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(fn, *args)
  lines = [line for line in out.getvalue().splitlines() if line.strip()]
  return [(line.split()[0], " ".join(line.split()[1:])) for line in lines]


def test_reverse_mode_keeps_only_the_logits_and_per_row_scalars():
  z = jnp.zeros((64, 91), jnp.bfloat16)
  t = jnp.zeros((64,), jnp.int32)
  kept = _residual_shapes(lambda z: focal_jax.softmax_focal(
      z, t, alpha=0.25, gamma=0.5, label_smoothing=0.1, reduction="mean"), z)
  big = [(shape, what) for shape, what in kept if "91" in shape]
  # One (N, C) array: the logits as they came (bfloat16, not an upcast float32 copy).
  assert big == [("bf16[64,91]", "from the argument z")], kept
  assert all(shape.endswith("[64]") or shape.endswith("[]") for shape, _ in kept
             if (shape, _) not in big), kept


def test_linear_reverse_mode_keeps_nothing_of_size_rows_by_vocab():
  h = jnp.zeros((64, 8), jnp.float32)
  w = jnp.zeros((8, 91), jnp.float32)
  t = jnp.zeros((64,), jnp.int32)
  kept = _residual_shapes(lambda h, w: focal_jax.linear_softmax_focal(
      h, w, t, chunk_size=16, reduction="mean"), h, w)
  assert kept and not [s for s, _ in kept if "64,91" in s or "16,91" in s], kept
