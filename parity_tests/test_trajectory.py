"""Training-trajectory parity: the same model trained in JAX (Flax NNX + optax) and torch.

Each test builds a two-layer tanh MLP in both frameworks from identical float64 weights, feeds
both the identical sequence of batches (one fresh batch per step, imbalanced classes, a few
ignored rows) and takes STEPS optimizer steps with the same optimizer:

- SGD with momentum 0.9: optax ``sgd(lr, momentum)`` keeps ``t = g + m t`` from ``t = 0``,
  torch ``SGD(momentum)`` starts its buffer at ``g``: the same sequence.
- Adam: optax ``adam(lr, b1, b2, eps, eps_root=0)`` updates by
  ``lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``;
  torch ``Adam`` by ``(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``. Both add eps
  outside the square root of the bias-corrected second moment, so they are the same map; only
  the rounding order differs.

Losses (one kwargs dict drives both packages): softmax focal with ``reduction="mean_positive"``
(per-class alpha, gamma 2, ``ignore_index`` rows in every batch, class 0 as background) and
sigmoid focal (RetinaNet-style one-hot over the foreground classes, alpha 0.25, gamma 2,
``reduction="mean"``). The loss at every step and every parameter after every step are compared.

Tolerances (derived from float64 runs; `python parity_tests/test_trajectory.py` re-measures
them over seeds 0..9 and all four (loss, optimizer) pairs, 60 steps each):

- float64: the two frameworks compute the same real-number map, so any gap is rounding. The
  largest measured gap is 1.0e-15 in the loss (relative) and 1.2e-15 in the parameters
  (absolute; the parameters are O(1)). TOL_F64 = 1e-10 sits far above float64 rounding and far
  below the effect of real differences in the math, measured on seed 0 with Adam: eps inside
  the square root (optax ``eps=0, eps_root=eps**2``) moves the trajectory by 1e-7 to 7e-5,
  ``eps_root=eps`` by 7e-5 to 1e-2, gamma 2.001 instead of 2 by 5e-5 to 3e-4. The float64
  tests are the sharp ones; the float32 tests show the float32 path holds up.
- float32: each framework's float32 run drifts from its own float64 run by at most 6.6e-7
  (loss) and 1.0e-6 (parameters); the two float32 runs differ from each other by at most
  9.5e-7 and 7.2e-7. TOL_F32 = 2e-5 is about 20x the measured float32 noise.
- SGD uses lr 0.05 with momentum 0.9. At lr 0.2 the softmax runs sit at the edge of
  stability and amplify rounding chaotically (float32 gaps up to 6e-2 in both directions
  between the frameworks and against float64): a property of the dynamics, not of the losses,
  so the tests stay in the stable regime.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import focal_jax
import focal_torch

STEPS = 60
BATCH = 32
D_IN, D_HIDDEN, N_CLASSES = 8, 16, 5
CLASS_PROBS = np.array([0.55, 0.2, 0.12, 0.08, 0.05])  # class 0 is background
IGNORE = -100
TOL_F64 = 1e-10
TOL_F32 = 2e-5

# One dict per loss drives both packages (tuples become arrays of the logits' dtype).
LOSSES = {
    "softmax": dict(alpha=(0.25, 1.0, 1.5, 2.0, 3.0), gamma=2.0, label_smoothing=0.0,
                    reduction="mean_positive", ignore_index=IGNORE, background_class=0),
    "sigmoid": dict(alpha=0.25, gamma=2.0, label_smoothing=0.0, reduction="mean"),
}
OPTIMIZERS = {
    "sgd": dict(lr=0.05, momentum=0.9),
    "adam": dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8),
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
  # Tiny matmuls: extra intra-op threads only add overhead (on a busy 2-core box, 30x per step).
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@dataclasses.dataclass
class Trajectory:
  losses: np.ndarray  # (STEPS,) loss at the parameters before each step
  params: np.ndarray  # (STEPS, P) all parameters after each step, flattened in one order


def make_problem(loss: str, seed: int) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
  """float64 initial weights [W1 (in, out), b1, W2, b2] and STEPS batches (x, labels)."""
  rng = np.random.default_rng(seed)
  d_out = N_CLASSES if loss == "softmax" else N_CLASSES - 1
  weights = [rng.normal(size=(D_IN, D_HIDDEN)) / np.sqrt(D_IN), rng.normal(size=D_HIDDEN) * 0.1,
             rng.normal(size=(D_HIDDEN, d_out)) / np.sqrt(D_HIDDEN), rng.normal(size=d_out) * 0.1]
  means = rng.normal(size=(N_CLASSES, D_IN)) * 1.5
  batches = []
  for _ in range(STEPS):
    cls = rng.choice(N_CLASSES, size=BATCH, p=CLASS_PROBS)
    x = means[cls] + rng.normal(size=(BATCH, D_IN))
    if loss == "softmax":
      labels = np.where(rng.random(BATCH) < 0.08, IGNORE, cls).astype(np.int64)
    else:  # one-hot over the foreground classes; background rows are all zeros
      labels = np.eye(N_CLASSES)[cls][:, 1:]
    batches.append((x, labels))
  return weights, batches


def _loss_kwargs(loss: str, convert) -> dict:
  return {k: convert(v) if isinstance(v, tuple) else v for k, v in LOSSES[loss].items()}


class JaxMLP(nnx.Module):

  def __init__(self, weights: list[np.ndarray], dtype):
    rngs = nnx.Rngs(0)
    self.fc1 = nnx.Linear(D_IN, D_HIDDEN, rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.fc2 = nnx.Linear(D_HIDDEN, weights[2].shape[1], rngs=rngs, dtype=dtype, param_dtype=dtype)
    for var, w in zip(self._vars(), weights):
      var[...] = jnp.asarray(w, dtype)

  def _vars(self):
    return [self.fc1.kernel, self.fc1.bias, self.fc2.kernel, self.fc2.bias]

  def flat(self) -> np.ndarray:
    return np.concatenate([np.asarray(v[...], np.float64).ravel() for v in self._vars()])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jnp.tanh(self.fc1(x)))


def run_jax(loss: str, opt: str, dtype: str, weights, batches) -> Trajectory:
  jdtype = jnp.dtype(dtype)
  model = JaxMLP(weights, jdtype)
  o = OPTIMIZERS[opt]
  if opt == "sgd":
    tx = optax.sgd(o["lr"], momentum=o["momentum"])
  else:
    tx = optax.adam(o["lr"], b1=o["b1"], b2=o["b2"], eps=o["eps"], eps_root=0.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss_fn = getattr(focal_jax, f"{loss}_focal")
  kwargs = _loss_kwargs(loss, lambda v: jnp.asarray(v, jdtype))

  @nnx.jit
  def step(model, optimizer, x, labels):
    value, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), labels, **kwargs))(model)
    optimizer.update(model, grads)
    return value

  losses, params = [], []
  for x, labels in batches:
    labels = jnp.asarray(labels, jnp.int32 if loss == "softmax" else jdtype)
    losses.append(float(step(model, optimizer, jnp.asarray(x, jdtype), labels)))
    params.append(model.flat())
  return Trajectory(np.array(losses), np.stack(params))


def run_torch(loss: str, opt: str, dtype: str, weights, batches) -> Trajectory:
  tdtype = getattr(torch, dtype)
  fc1 = torch.nn.Linear(D_IN, D_HIDDEN, dtype=tdtype)
  fc2 = torch.nn.Linear(D_HIDDEN, weights[2].shape[1], dtype=tdtype)
  model = torch.nn.Sequential(fc1, torch.nn.Tanh(), fc2)
  with torch.no_grad():
    for p, w in zip([fc1.weight, fc1.bias, fc2.weight, fc2.bias], weights):
      p.copy_(torch.as_tensor(w.T if w.ndim == 2 else w, dtype=tdtype))  # torch stores (out, in)
  o = OPTIMIZERS[opt]
  if opt == "sgd":
    optimizer = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"])
  else:
    optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"], betas=(o["b1"], o["b2"]),
                                 eps=o["eps"])
  loss_fn = getattr(focal_torch, f"{loss}_focal")
  kwargs = _loss_kwargs(loss, lambda v: torch.tensor(v, dtype=tdtype))

  def flat() -> np.ndarray:
    ps = [fc1.weight.T, fc1.bias, fc2.weight.T, fc2.bias]
    return np.concatenate([p.detach().double().numpy().ravel() for p in ps])

  losses, params = [], []
  for x, labels in batches:
    labels = torch.as_tensor(labels, dtype=torch.int64 if loss == "softmax" else tdtype)
    optimizer.zero_grad()
    value = loss_fn(model(torch.as_tensor(x, dtype=tdtype)), labels, **kwargs)
    value.backward()
    optimizer.step()
    losses.append(value.item())
    params.append(flat())
  return Trajectory(np.array(losses), np.stack(params))


def gaps(a: Trajectory, b: Trajectory) -> tuple[np.ndarray, np.ndarray]:
  """Per-step relative loss gap and largest absolute parameter gap."""
  loss_gap = np.abs(a.losses - b.losses) / np.maximum(1.0, np.abs(b.losses))
  param_gap = np.max(np.abs(a.params - b.params), axis=1)
  return loss_gap, param_gap


def _assert_same_trajectory(j: Trajectory, t: Trajectory, tol: float) -> None:
  loss_gap, param_gap = gaps(j, t)
  bad = np.flatnonzero((loss_gap > tol) | (param_gap > tol))
  assert bad.size == 0, (
      f"trajectories part at step {bad[0]}: loss jax {j.losses[bad[0]]!r} torch "
      f"{t.losses[bad[0]]!r} (relative gap {loss_gap[bad[0]]:.3g}), largest parameter gap "
      f"{param_gap[bad[0]]:.3g}; tolerance {tol:g}")


@pytest.mark.parametrize("dtype,tol", [pytest.param("float64", TOL_F64, id="float64"),
                                       pytest.param("float32", TOL_F32, id="float32")])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_trajectory_jax_equals_torch(loss: str, opt: str, dtype: str, tol: float):
  weights, batches = make_problem(loss, seed=0)
  j = run_jax(loss, opt, dtype, weights, batches)
  t = run_torch(loss, opt, dtype, weights, batches)
  assert len(j.losses) == len(t.losses) == STEPS >= 50
  assert np.all(np.isfinite(j.losses)) and np.all(np.isfinite(t.losses))
  _assert_same_trajectory(j, t, tol)
  # The agreement is not vacuous: the model learns and its parameters move far beyond tol.
  assert t.losses[-10:].mean() < 0.7 * t.losses[:5].mean()
  assert np.max(np.abs(t.params[-1] - np.concatenate([w.ravel() for w in weights]))) > 0.1


@pytest.mark.parametrize("loss", list(LOSSES))
def test_trajectory_float32_stays_near_float64(loss: str):
  # Anchors the float32 tolerance: float32 training follows the float64 trajectory closely in
  # both frameworks, so a float32 gap above TOL_F32 would not be rounding.
  weights, batches = make_problem(loss, seed=1)
  ref = run_torch(loss, "adam", "float64", weights, batches)
  for run in (run_jax, run_torch):
    loss_gap, param_gap = gaps(run(loss, "adam", "float32", weights, batches), ref)
    assert loss_gap.max() < TOL_F32 and param_gap.max() < TOL_F32, run.__name__


def _measure(seeds: range) -> None:
  """Prints the largest gaps behind the tolerances in the module docstring."""
  for loss in LOSSES:
    for opt in OPTIMIZERS:
      worst = {"f64": [0.0, 0.0], "f32": [0.0, 0.0], "drift32": [0.0, 0.0]}
      for seed in seeds:
        weights, batches = make_problem(loss, seed)
        j64, t64 = (run(loss, opt, "float64", weights, batches) for run in (run_jax, run_torch))
        j32, t32 = (run(loss, opt, "float32", weights, batches) for run in (run_jax, run_torch))
        for key, pairs in (("f64", [(j64, t64)]), ("f32", [(j32, t32)]),
                           ("drift32", [(j32, j64), (t32, t64)])):
          for a, b in pairs:
            lg, pg = gaps(a, b)
            worst[key] = [max(worst[key][0], lg.max()), max(worst[key][1], pg.max())]
      print(f"{loss:8s} {opt:5s} " + "  ".join(
          f"{k}: loss {v[0]:.2e} params {v[1]:.2e}" for k, v in worst.items()))


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", True)
  torch.set_num_threads(1)
  _measure(range(10))
