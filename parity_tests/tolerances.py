"""Tolerances per dtype, derived from float64 references.

What is compared: a value (the loss, or per-example losses) and a gradient (the VJP with
respect to the logits). Errors are norm-wise: ``max|a - b| / max|ref|`` over the array, with
``ref`` the float64 reference evaluated on the same (already rounded) inputs, so input rounding
is no error source.

Derivation. An implementation that works in log space in a compute precision with unit
roundoff ``u_c`` (float64: 2^-53; float32 and the half types, which are computed in float32:
2^-24) and rounds its result once to the output dtype (unit roundoff ``u_o``: float32 2^-24,
bfloat16 2^-8, float16 2^-11) lies within

    budget = u_o + K * u_c          (norm-wise, against float64)

of the float64 truth. The rounding to the output dtype contributes at most ``u_o`` relative to
each entry; ``K`` collects the few roundings of the log-softmax (shift, sum of exponentials,
log) and of the focal factor and the reductions, each amplified by at most the ratio of the
logits' magnitude to the result's scale. ``K`` is measured, not guessed: ``derive()`` evaluates
the same formulas (``parity_tests.reference``) in float32 / from half inputs over a grid wider
than the one the suite draws from (classes up to 1000, logits of standard deviation up to 8,
every reduction, masks, smoothing, per-class alpha and gamma) and takes the largest norm-wise
error against float64; ``K`` is that maximum over ``u_c``, rounded up to a power of two, times 4
for headroom. Run ``python -m parity_tests.tolerances`` to re-measure.

Two implementations each within ``budget`` of the truth are within ``2 * budget`` of each
other: that is the JAX-vs-torch tolerance (``Tolerance.doubled``); each package against the
float64 reference uses ``budget``.

DeepSpeed computes a probability and then its log, in the input precision (as do torchvision's
``sigmoid_focal_loss`` and imbalanced-losses, which form ``1 - p_t`` from a probability), so its
error is absolute: about ``u`` per entry in ``log p`` however small the loss (an easy example's loss
rounds to exactly 0). Comparisons with these probability-space implementations (DeepSpeed's recorded values and
oracle, torchvision, imbalanced-losses) therefore measure errors against ``max(max|ref|, unit)``, where the unit is what a loss of 1 per example
would give: ``max(alpha)`` for the mean (``N * max(alpha)`` for the sum) and that over N for the
gradient (``units``), and add their own budget ``K_PROB * u`` to the project's
(``prob_tolerance``); ``K_PROB`` is measured like ``K``, with the DeepSpeed oracle in float32
and float64 against the float64 reference on random inputs where it is finite.

``linear_softmax_focal`` adds the matrix products: a length-``H`` dot product in the compute
precision is within ``H * u_c`` of exact, relative to the product of magnitudes; the value
sees one product (the logits), the gradients two (the logits, recomputed, and the gradient's
own product), so its budget adds ``2 * H * u_c`` to both. The gradient products take the
logits' gradient ``dZ`` as an operand in the input dtype (as ``nn.Linear`` and a half-precision
``jnp.dot`` do), which rounds it by ``u_o``: that adds ``u_o * kappa`` to the gradient budget,
with ``kappa`` the condition number of the products (``max(|H|^T |dZ|) / max|H^T dZ|``, and
likewise for ``dZ K^T`` and the bias sum), computed from the float64 reference of each case
(``linear_tolerance``).

The constants are fixed here and published in the README; they are never widened to make a
failing comparison pass.
"""

from __future__ import annotations

import dataclasses
import math

# Unit roundoffs.
U = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
# Compute precision of each input dtype (half inputs are computed in float32).
COMPUTE = {"float64": "float64", "float32": "float32", "bfloat16": "float32",
           "float16": "float32"}

# Error multipliers of the compute precision (see the derivation above; ``derive`` measured
# value K_max and grad K_max on the grid, these are 4x that, rounded up to a power of two).
K_VALUE = 32
K_GRAD = 256
# Probability-space implementations (DeepSpeed, torchvision, imbalanced-losses): a probability
# in the input precision, then log and pow on it (measured 88 by ``derive_deepspeed``).
K_PROB = 512


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """Norm-wise relative tolerances for the value and the gradient."""

  value: float
  grad: float

  def doubled(self) -> "Tolerance":
    return Tolerance(2 * self.value, 2 * self.grad)

  def plus(self, other: "Tolerance") -> "Tolerance":
    return Tolerance(self.value + other.value, self.grad + other.grad)

  def __str__(self) -> str:
    return f"{self.value:.1e} / {self.grad:.1e}"


def tolerance(dtype: str) -> Tolerance:
  """One implementation against the float64 reference, for inputs of ``dtype``."""
  uc, uo = U[COMPUTE[dtype]], U[dtype]
  return Tolerance(uo + K_VALUE * uc, uo + K_GRAD * uc)


def linear_tolerance(dtype: str, hidden: int, kappa: float = 1.0) -> Tolerance:
  """``linear_softmax_focal`` against float64: the loss budget, two length-H products, and
  the rounding of the gradient products' operand (condition number ``kappa``)."""
  extra = 2 * hidden * U[COMPUTE[dtype]]
  return tolerance(dtype).plus(Tolerance(extra, extra + U[dtype] * kappa))


def prob_tolerance(dtype: str) -> Tolerance:
  """The project against a probability-space implementation: both budgets added."""
  u = U[dtype]
  return tolerance(dtype).plus(Tolerance(K_PROB * u, K_PROB * u))


def units(reduction: str, n_valid: int, n_positive: int, alpha_max: float = 1.0,
          cotangent_max: float = 1.0) -> tuple[float, float]:
  """(value, gradient) magnitudes that a loss of 1 on every valid example would give.

  The floor of the error scale in comparisons with probability-space implementations.
  """
  denominator = {"none": 1, "sum": 1, "mean": max(n_valid, 1),
                 "mean_positive": max(n_positive, 1)}[reduction]
  count = 1 if reduction == "none" else max(n_valid, 1)
  return alpha_max * count / denominator, alpha_max * cotangent_max / denominator


def derive_cases():
  """The derivation grid (wider than the suite's): every function, reduction and mask."""
  from parity_tests.cases import Case
  cases = []
  seed = 0
  for fn in ("softmax_focal", "sigmoid_focal", "categorical_focal"):
    for shape, axis in (((64, 10), -1), ((4, 7, 3, 3), 1), ((8, 1000), -1), ((256, 3), 1)):
      for scale in (0.5, 3.0, 8.0):
        for reduction in ("none", "sum", "mean", "mean_positive"):
          seed += 1
          c = shape[axis]
          if fn == "sigmoid_focal":
            alpha, gamma = (0.25 if seed % 2 else None), (0.5, 2.0, 5.0)[seed % 3]
          else:
            alpha = tuple(0.25 + (i % 7) / 4 for i in range(c)) if seed % 2 else None
            gamma = tuple(float(i % 5) for i in range(c)) if seed % 3 == 0 else 2.0
          cases.append(Case(
              fn=fn, shape=shape, axis=axis, alpha=alpha, gamma=gamma,
              label_smoothing=(0.1 if seed % 4 == 0 and fn != "categorical_focal" else 0.0),
              reduction=reduction,
              mask=(("none", "where", "ignore", "both")[seed % 4] if fn == "softmax_focal"
                    else ("none", "where")[seed % 2]),
              soft=bool(seed % 2), scale=scale, seed=seed))
  return cases


def derive(dtypes=("float32", "bfloat16", "float16")) -> dict:
  """Measure the norm-wise error of the plain low-precision evaluation against float64."""
  from parity_tests.cases import make_inputs
  from parity_tests.compare import _errors, run_reference
  worst = {}
  for dtype in dtypes:
    kv = kg = 0.0
    for case in derive_cases():
      case = dataclasses.replace(case, dtype=dtype)
      inputs = make_inputs(case)
      args = (case.fn, inputs.logits, inputs.labels, inputs.kwargs)
      ref = run_reference(*args, "float64", inputs.cotangent)
      low = run_reference(*args, dtype, inputs.cotangent)
      uc, uo = U[COMPUTE[dtype]], U[dtype]
      _, vr = _errors(low.value, ref.value, None)
      _, gr = _errors(low.grad, ref.grad, None)
      kv = max(kv, max(vr - uo, 0.0) / uc)
      kg = max(kg, max(gr - uo, 0.0) / uc)
    worst[dtype] = (kv, kg)
  return worst


def derive_deepspeed(draws: int = 400, seed: int = 0) -> float:
  """Largest norm-wise error (in ``u``, unit-floored) of the oracle against float64."""
  import numpy as np
  import torch
  from parity_tests import reference
  from parity_tests.deepspeed_oracle import deepspeed_focal_loss
  from parity_tests.compare import _errors
  rng = np.random.default_rng(seed)
  worst = 0.0
  for dtype, td in (("float32", torch.float32), ("float64", torch.float64)):
    for _ in range(draws):
      n = int(rng.choice([1, 4, 16, 64]))
      c = int(rng.choice([2, 3, 10, 91, 1000]))
      scale = float(rng.choice([0.5, 1.0, 3.0, 8.0, 12.0]))
      gamma = float(rng.choice([0.0, 0.5, 1.0, 2.0, 3.7, 5.0]))
      size_average = bool(rng.integers(2))
      # float32-representable inputs for both dtypes: the float64 reference sees the same.
      x = (rng.standard_normal((n, c)) * scale).astype(np.float32).astype(np.float64)
      t = rng.integers(0, c, n)
      a = np.round(rng.uniform(0.25, 2.0, c) * 64) / 64
      xt = torch.tensor(x, dtype=td, requires_grad=True)
      loss = deepspeed_focal_loss(xt, torch.from_numpy(t), torch.tensor(a, dtype=td).view(-1, 1),
                                  gamma, size_average)
      loss.backward()
      if not (torch.isfinite(loss) and torch.isfinite(xt.grad).all()):
        continue
      xr = torch.tensor(x, dtype=torch.float64, requires_grad=True)
      ref = reference.softmax_focal(xr, t, alpha=a, gamma=gamma,
                                    reduction="mean" if size_average else "sum")
      ref.backward()
      uv, ug = units("mean" if size_average else "sum", n, n, float(a.max()))
      u = U[dtype]
      vr = _errors(loss.detach().double().numpy(), ref.detach().numpy(), None, uv)[1]
      gr = _errors(xt.grad.double().numpy(), xr.grad.numpy(), None, ug)[1]
      worst = max(worst, vr / u, gr / u)
  return worst


def _pow2_ceil(x: float) -> int:
  return 1 if x <= 1 else 2 ** math.ceil(math.log2(x))


if __name__ == "__main__":
  for dt, (kv, kg) in derive().items():
    print(f"{dt:9s} measured K value {kv:8.1f} -> {4 * _pow2_ceil(kv):5d};"
          f"  K grad {kg:8.1f} -> {4 * _pow2_ceil(kg):5d}")
  kd = derive_deepspeed()
  print(f"DeepSpeed measured K {kd:8.1f} -> {4 * _pow2_ceil(kd):5d}")
