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
logits' magnitude to the result's scale. ``K`` is measured, not guessed:
``parity_tests.derive.derive()`` evaluates the same formulas (``focal_reference``) in float32 /
from half inputs over a grid wider than the one the suite draws from (classes up to 1000,
logits of standard deviation up to 8, every reduction, masks, smoothing, per-class alpha and
gamma) and takes the largest norm-wise error against float64; ``K`` is that maximum over
``u_c``, rounded up to a power of two, times 4 for headroom. Run
``python -m parity_tests.derive`` to re-measure.

Two implementations each within ``budget`` of the truth are within ``2 * budget`` of each
other: that is the JAX-vs-torch tolerance (``Tolerance.doubled``); each package against the
float64 reference uses ``budget``.

DeepSpeed computes a probability and then its log, in the input precision (as do torchvision's
``sigmoid_focal_loss`` and imbalanced-losses, which form ``1 - p_t`` from a probability), so its
error is absolute: about ``u`` per entry in ``log p`` however small the loss (an easy example's
loss rounds to exactly 0). Comparisons with these probability-space implementations
(DeepSpeed's recorded values and oracle, torchvision, imbalanced-losses) therefore measure
errors against ``max(max|ref|, unit)``, where the unit is what a loss of 1 per example would
give: ``max(alpha)`` for the mean (``N * max(alpha)`` for the sum) and that over N for the
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

# Error multipliers of the compute precision (see the derivation above; ``derive.derive``
# measured value K_max and grad K_max on the grid, these are 4x that, rounded up to a power of two).
K_VALUE = 32
K_GRAD = 256
# Probability-space implementations (DeepSpeed, torchvision, imbalanced-losses): a probability
# in the input precision, then log and pow on it (measured 88 by
# ``parity_tests.derive.derive_deepspeed``).
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
