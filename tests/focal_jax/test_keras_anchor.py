"""focal_jax.categorical_focal against keras' CategoricalFocalCrossentropy (jax backend).

The README's migration table maps keras' loss, label smoothing included, to
``categorical_focal(logits, y * (1 - eps) + eps / C, alpha=..., gamma=..., reduction="mean")``;
this is the check that the mapping gives keras' numbers (keras clips probabilities to
[1e-7, 1 - 1e-7], so logits stay moderate here).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import focal_jax  # noqa: E402

keras = pytest.importorskip("keras")


@pytest.mark.parametrize("alpha", [0.25, (0.1, 0.2, 0.3, 0.4, 0.5)])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_keras_categorical_focal_mapping_gives_same_numbers(alpha, gamma, eps):
  if keras.backend.backend() != "jax":
    pytest.skip("keras is configured for another backend")
  rng = np.random.default_rng(7)
  num_classes = 5
  logits = (rng.normal(size=(32, num_classes)) * 2).astype(np.float32)
  onehot = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, 32)]
  loss = keras.losses.CategoricalFocalCrossentropy(
      alpha=list(alpha) if isinstance(alpha, tuple) else alpha, gamma=gamma,
      from_logits=True, label_smoothing=eps)
  with jax.numpy_rank_promotion("allow"):  # keras broadcasts implicitly
    want = float(loss(onehot, logits))
  smoothed = onehot * (1 - eps) + eps / num_classes
  got = focal_jax.categorical_focal(
      jnp.asarray(logits), jnp.asarray(smoothed), alpha=jnp.asarray(alpha, jnp.float32),
      gamma=gamma, reduction="mean")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=2e-6)
