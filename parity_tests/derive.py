"""Measure the error multipliers of ``parity_tests.tolerances`` (``K_VALUE``, ``K_GRAD``,
``K_PROB``): ``python -m parity_tests.derive``.

``derive`` evaluates the reference formulas (``focal_reference``) in float32 / from half inputs
over a grid wider than the suite's and takes the largest norm-wise error against float64, in
units of the compute precision's roundoff; ``derive_deepspeed`` does the same for the DeepSpeed
oracle in float32 and float64. The constants in ``tolerances`` are 4x the measured maxima,
rounded up to a power of two; they are fixed there, never widened to make a run pass.

Kept apart from ``tolerances`` so that the import graph has no cycle: this module uses the
runners of ``compare``, which use the tolerances.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import focal_reference
from parity_tests.cases import Case, make_inputs
from parity_tests.compare import _errors, run_reference
from parity_tests.tolerances import COMPUTE, U, units


def derive_cases():
  """The derivation grid (wider than the suite's): every function, reduction and mask."""
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
  import torch
  from focal_reference.deepspeed import deepspeed_focal_loss
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
      ref = focal_reference.softmax_focal(xr, t, alpha=a, gamma=gamma,
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
