"""Comparisons with DeepSpeed: the recorded values, the oracle, and the documented divergences.

The project's ``softmax_focal`` (both packages) and the torch drop-in ``FocalLoss`` are run on
DeepSpeed's inputs with the one kwargs dict ``deepspeed_kwargs`` (alpha flattened to (C,),
``reduction`` "mean"/"sum" from ``size_average``, every other default explicit).

Where DeepSpeed is finite and per-class (alpha None or (C, 1)) they must agree within
``prob_tolerance``. The three documented divergences are checked both ways: DeepSpeed does the
odd thing (so the divergence has not disappeared) and the project equals the float64 truth (so
it has not grown):

- 1-D alpha: DeepSpeed's loss is ``mean(alpha_t) * mean(f)`` (``sum * sum`` for the sum); the
  project's is per class;
- saturation (wrong by a margin >= ~89 in float32): DeepSpeed inf / NaN; the project finite;
- 0 < gamma < 1 with p rounding to 1 (right by >= ~17 in float32): DeepSpeed NaN gradients; the
  project finite.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from parity_tests.cases import IGNORE_INDEX, NUMPY_DTYPES, quantize
from parity_tests.compare import (Check, Output, measure, run_jax, run_reference, run_torch,
                                  _dtype_name, _np)
from parity_tests.golden import DeepSpeedCase
from parity_tests.tolerances import Tolerance, prob_tolerance, tolerance, units

DIVERGES = "differ"  # Check.note marker: this row passes when the two sides differ

# Row names.
JAX_VS_DS = "JAX vs DeepSpeed (recorded)"
TORCH_VS_DS = "torch vs DeepSpeed (recorded)"
DROPIN_VS_DS = "torch FocalLoss vs DeepSpeed (recorded)"
JAX_VS_ORACLE = "JAX vs DeepSpeed oracle"
TORCH_VS_ORACLE = "torch vs DeepSpeed oracle"
DROPIN_VS_ORACLE = "torch FocalLoss vs DeepSpeed oracle"
DS_VEC_BROADCAST = "DeepSpeed 1-D alpha = mean(alpha_t)*mean(f) [divergence]"
DS_VEC_NOT_PER_CLASS = "DeepSpeed 1-D alpha != per-class [divergence]"
VEC_PER_CLASS = "{} 1-D alpha per class vs float64 [divergence]"
DS_NONFINITE = "DeepSpeed non-finite where saturated [divergence]"
SAT_FINITE = "{} saturated vs float64 [divergence]"
DS_NAN_GRAD = "DeepSpeed NaN grad, 0<gamma<1, p->1 [divergence]"
SMALL_GAMMA = "{} 0<gamma<1, p->1 vs float64 [divergence]"

PROJECT = ("JAX", "torch", "torch FocalLoss")


@dataclasses.dataclass(frozen=True)
class DSConfig:
  """A DeepSpeed-style call: (n, c) logits, (n,) targets, alpha as the module stores it.

  ``margin`` (if set) places every row's target logit ``margin`` above the largest other
  logit: negative is a confident wrong prediction, positive a confident right one.
  """

  n: int
  c: int
  dtype: str = "float32"
  alpha_kind: str = "none"  # "none" | "col" (C, 1) | "vec" (C,)
  gamma: float = 2.0
  size_average: bool = True
  scale: float = 3.0
  margin: float | None = None
  seed: int = 0

  def describe(self) -> str:
    m = "" if self.margin is None else f" margin={self.margin:g}"
    return (f"FocalLoss(n={self.n}, c={self.c}) {self.dtype} alpha={self.alpha_kind} "
            f"gamma={self.gamma:g} size_average={self.size_average} scale={self.scale:g}{m} "
            f"seed={self.seed}")


def make_ds_inputs(cfg: DSConfig):
  """(logits as float64 holding dtype values, int64 targets, alpha or None) for ``cfg``."""
  rng = np.random.default_rng(cfg.seed)
  z = rng.standard_normal((cfg.n, cfg.c)) * cfg.scale
  t = rng.integers(0, cfg.c, cfg.n).astype(np.int64)
  if cfg.margin is not None:
    rows = np.arange(cfg.n)
    others = np.where(np.eye(cfg.c, dtype=bool)[t], -np.inf, z)
    z[rows, t] = others.max(axis=1) + cfg.margin
  alpha = None
  if cfg.alpha_kind != "none":
    alpha = np.round(rng.uniform(0.25, 2.0, cfg.c) * 64) / 64  # exact in every dtype
    alpha = alpha.astype(np.float64 if cfg.dtype == "float64" else np.float32)
    if cfg.alpha_kind == "col":
      alpha = alpha[:, None]
  return quantize(z, cfg.dtype), t, alpha


def deepspeed_kwargs(alpha: np.ndarray | None, gamma: float, size_average: bool) -> dict:
  """The one kwargs dict (JAX spelling) that reproduces a per-class DeepSpeed call.

  alpha keeps its recorded dtype (float64 alphas of the float64 cases are not representable
  in float32).
  """
  return {"alpha": None if alpha is None else np.asarray(alpha).reshape(-1),
          "gamma": float(gamma), "label_smoothing": 0.0, "axis": -1, "where": None,
          "ignore_index": IGNORE_INDEX, "reduction": "mean" if size_average else "sum",
          "background_class": 0}


def run_oracle(logits, targets, alpha, gamma, size_average, dtype) -> Output:
  import torch
  from focal_reference.deepspeed import DeepSpeedFocalLoss
  x = torch.tensor(logits, dtype=torch.float64).to(getattr(torch, dtype)).requires_grad_(True)
  a = None if alpha is None else torch.tensor(alpha, dtype=x.dtype)
  out = DeepSpeedFocalLoss(logits.shape[1], a, gamma, size_average)(x, torch.from_numpy(targets))
  out.backward()
  return Output(_np(out), _np(x.grad), _dtype_name(out.dtype), _dtype_name(x.grad.dtype))


def run_dropin(logits, targets, alpha, gamma, size_average, dtype) -> Output:
  """``focal_torch.FocalLoss`` (the DeepSpeed drop-in), called like DeepSpeed's module."""
  import torch
  import focal_torch
  x = torch.tensor(logits, dtype=torch.float64).to(getattr(torch, dtype)).requires_grad_(True)
  a = None if alpha is None else torch.tensor(alpha)  # as given to DeepSpeed's module
  module = focal_torch.FocalLoss(logits.shape[1], alpha=a, gamma=gamma, size_average=size_average)
  out = module(x, torch.from_numpy(targets))
  out.backward()
  return Output(_np(out), _np(x.grad), _dtype_name(out.dtype), _dtype_name(x.grad.dtype))


def _project(logits, targets, alpha, gamma, size_average, dtype) -> dict[str, Output]:
  kw = deepspeed_kwargs(alpha, gamma, size_average)
  return {
      "JAX": run_jax("softmax_focal", logits, targets, kw, dtype),
      "torch": run_torch("softmax_focal", logits, targets, kw, dtype),
      "torch FocalLoss": run_dropin(logits, targets, alpha, gamma, size_average, dtype),
  }


def _truth(logits, targets, alpha, gamma, size_average) -> Output:
  return run_reference("softmax_focal", logits, targets,
                       deepspeed_kwargs(alpha, gamma, size_average))


def _floor(n: int, alpha, size_average: bool) -> tuple[float, float]:
  a = 1.0 if alpha is None else float(np.max(alpha))
  return units("mean" if size_average else "sum", n, n, a)


def _is_finite(o: Output) -> bool:
  return bool(np.isfinite(o.value).all() and np.isfinite(o.grad).all())


def broadcast_value(logits, targets, alpha, gamma, size_average) -> float:
  """DeepSpeed's 1-D alpha value in float64: ``mean(alpha_t) * mean(f)`` (or sum * sum)."""
  import torch
  import focal_reference as reference
  per_example = reference.softmax_focal(torch.tensor(logits, dtype=torch.float64), targets,
                                        gamma=gamma).numpy()
  alpha_t = np.asarray(alpha, np.float64).reshape(-1)[targets]
  agg = np.mean if size_average else np.sum
  return float(agg(alpha_t) * agg(per_example))


def checks_recorded(case: DeepSpeedCase) -> list[Check]:
  """Every project path against one recorded DeepSpeed case (or its divergence)."""
  logits = case.logits.astype(np.float64)
  dtype = str(case.dtype)
  args = (logits, case.targets, case.alpha, case.gamma, case.size_average)
  outs = _project(*args, dtype)
  recorded = Output(case.loss.astype(np.float64), case.grad.astype(np.float64), dtype, dtype)
  desc = f"recorded case {case.case}: n={logits.shape[0]} c={logits.shape[1]} " \
         f"alpha={case.alpha_kind} gamma={case.gamma:g} size_average={case.size_average}"
  checks = []
  if case.alpha_kind == "vec":
    return _vector_alpha_checks(recorded, outs, args, dtype, desc)
  if not case.finite:
    return _saturation_checks(recorded, outs, args, dtype, desc)
  floor = _floor(logits.shape[0], case.alpha, case.size_average)
  for name, row in zip(PROJECT, (JAX_VS_DS, TORCH_VS_DS, DROPIN_VS_DS)):
    checks.append(measure(row, dtype, desc, outs[name], recorded, prob_tolerance(dtype),
                          floor=floor, expect_dtype=dtype))
  return checks


def _vector_alpha_checks(ds: Output, outs, args, dtype, desc) -> list[Check]:
  logits, targets, alpha, gamma, size_average = args
  truth = _truth(*args)  # per class
  broadcast = broadcast_value(*args)
  floor = _floor(logits.shape[0], alpha, size_average)
  bro = Output(np.asarray(broadcast), None, "float64", None)
  checks = [measure(DS_VEC_BROADCAST, dtype, desc, ds, bro, prob_tolerance(dtype),
                    check_grad=False, floor=floor)]
  if logits.shape[0] > 1:  # with one example the N x N broadcast is 1 x 1: no divergence
    gap = measure(DS_VEC_NOT_PER_CLASS, dtype, desc, ds, truth, prob_tolerance(dtype),
                  check_grad=False, floor=floor)
    checks.append(_differs(gap))
  for name in PROJECT:
    checks.append(measure(VEC_PER_CLASS.format(name), dtype, desc, outs[name], truth,
                          tolerance(dtype), expect_dtype=dtype))
  return checks


def _differs(check: Check) -> Check:
  """Turn an agreement check into a divergence check: it passes when the sides differ."""
  return dataclasses.replace(check, ok=bool(check.value_rel > check.tol.value
                                            or check.grad_rel > check.tol.grad),
                             note=DIVERGES)


def _saturation_checks(ds: Output, outs, args, dtype, desc) -> list[Check]:
  truth = _truth(*args)
  nonfinite = not _is_finite(ds)
  checks = [Check(DS_NONFINITE, dtype, desc, np.inf if nonfinite else 0.0,
                  np.inf if nonfinite else 0.0, 0.0, 0.0, Tolerance(0.0, 0.0), nonfinite,
                  DIVERGES)]
  for name in PROJECT:
    checks.append(measure(SAT_FINITE.format(name), dtype, desc, outs[name], truth,
                          tolerance(dtype), expect_dtype=dtype))
  return checks


def checks_oracle(cfg: DSConfig) -> list[Check]:
  """The project against the oracle on ``cfg`` where the oracle is finite (else no checks)."""
  logits, targets, alpha = make_ds_inputs(cfg)
  args = (logits, targets, alpha, cfg.gamma, cfg.size_average)
  ds = run_oracle(*args, cfg.dtype)
  outs = _project(*args, cfg.dtype)
  if cfg.alpha_kind == "vec":
    return _vector_alpha_checks(ds, outs, args, cfg.dtype, cfg.describe())
  if not _is_finite(ds):
    return []
  floor = _floor(cfg.n, alpha, cfg.size_average)
  return [measure(row, cfg.dtype, cfg.describe(), outs[name], ds, prob_tolerance(cfg.dtype),
                  floor=floor, expect_dtype=cfg.dtype)
          for name, row in zip(PROJECT, (JAX_VS_ORACLE, TORCH_VS_ORACLE, DROPIN_VS_ORACLE))]


def checks_saturation(cfg: DSConfig) -> list[Check]:
  """Wrong by ``-cfg.margin``: the oracle must overflow, the project must equal float64."""
  logits, targets, alpha = make_ds_inputs(cfg)
  args = (logits, targets, alpha, cfg.gamma, cfg.size_average)
  return _saturation_checks(run_oracle(*args, cfg.dtype), _project(*args, cfg.dtype), args,
                            cfg.dtype, cfg.describe())


def checks_small_gamma(cfg: DSConfig) -> list[Check]:
  """0 < gamma < 1, right by ``cfg.margin``: oracle NaN gradient, project finite and true."""
  logits, targets, alpha = make_ds_inputs(cfg)
  args = (logits, targets, alpha, cfg.gamma, cfg.size_average)
  ds = run_oracle(*args, cfg.dtype)
  outs = _project(*args, cfg.dtype)
  truth = _truth(*args)
  nan_grad = bool(np.isnan(ds.grad).any())
  checks = [Check(DS_NAN_GRAD, cfg.dtype, cfg.describe(), 0.0, 0.0,
                  np.inf if nan_grad else 0.0, np.inf if nan_grad else 0.0,
                  Tolerance(0.0, 0.0), nan_grad, DIVERGES)]
  for name in PROJECT:
    checks.append(measure(SMALL_GAMMA.format(name), cfg.dtype, cfg.describe(), outs[name],
                          truth, tolerance(cfg.dtype), expect_dtype=cfg.dtype))
  return checks
