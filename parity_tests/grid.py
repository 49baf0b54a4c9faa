"""The report's grid of configurations: built-in defaults, ``--quick``, or a user's own values.

``Settings`` holds the user's overrides (each None or a list of values); ``tasks`` expands them
into ``(family, config)`` pairs: the family is a function from ``parity_tests.compare``,
``deepspeed_checks`` or ``anchors`` that returns checks. Configurations are deterministic
(seeds fixed), so two runs of the report print the same table.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

from parity_tests import anchors, deepspeed_checks
from parity_tests.cases import DTYPES, LAYOUTS, REDUCTIONS, Case
from parity_tests.compare import checks_cross_framework
from parity_tests.deepspeed_checks import DSConfig
from parity_tests.golden import load_deepspeed_cases, load_torchvision_cases


@dataclasses.dataclass
class Settings:
  """User overrides; None keeps the built-in values of that dimension."""

  quick: bool = False
  gamma: list[float] | None = None
  alpha: list[Any] | None = None  # None (no weighting), a float, or a tuple of C floats
  classes: list[int] | None = None
  reduction: list[str] | None = None
  dtype: list[str] | None = None

  @property
  def custom(self) -> bool:
    return any(v is not None for v in (self.gamma, self.alpha, self.classes, self.reduction,
                                       self.dtype))


Task = tuple[Callable, Any]


def _alpha_for(alpha: Any, c: int) -> Any:
  """A (C,)-vector alpha stands for "per class": resized to C with exact values."""
  if alpha == "vector":
    return tuple(0.25 + (i % 7) / 4 for i in range(c))
  if isinstance(alpha, tuple) and len(alpha) != c:
    raise ValueError(f"--alpha: {len(alpha)} values given for {c} classes")
  return alpha


def _rows(c: int) -> tuple[int, int]:
  """A 2-D (N, C) shape for C classes, reusing the sweep's shapes where C matches."""
  return {7: (16, 7), 91: (8, 91), 1000: (5, 1000)}.get(c, (16, c))


def _gamma_vector(c: int) -> tuple:
  return tuple(float(i % 4) * 0.75 for i in range(c))


def cross_framework_cases(s: Settings) -> list[Case]:
  """Functions x dtypes x reductions x (shape, axis) x hyperparameter variants."""
  dtypes = s.dtype or list(DTYPES)
  reductions = s.reduction or list(REDUCTIONS)
  if s.classes:
    layouts = [(_rows(c), -1) for c in s.classes] + [((2, c, 3, 3), 1) for c in s.classes]
  elif s.quick:
    layouts = list(LAYOUTS[:2])
  else:
    layouts = list(LAYOUTS)
  if s.custom:
    # The user's configuration on the defaults of the rest: one variant per value.
    gammas = s.gamma or [2.0]
    alphas = s.alpha or [None, "vector"]
    variants = [dict(gamma=g, alpha=a, label_smoothing=e, mask=m)
                for g, a in itertools.product(gammas, alphas)
                for e, m in ((0.0, "none"), (0.1, "both"))]
  elif s.quick:
    variants = [dict(gamma=2.0, alpha=None, label_smoothing=0.0, mask="none"),
                dict(gamma="vector", alpha="vector", label_smoothing=0.1, mask="both")]
  else:
    variants = [dict(gamma=2.0, alpha=None, label_smoothing=0.0, mask="none"),
                dict(gamma=0.5, alpha=0.25, label_smoothing=0.1, mask="where"),
                dict(gamma="vector", alpha="vector", label_smoothing=0.0, mask="ignore"),
                dict(gamma=3.0, alpha="vector", label_smoothing=0.2, mask="both")]
  cases = []
  seed = 0
  for fn in ("softmax_focal", "sigmoid_focal", "categorical_focal"):
    for dtype, (li, (shape, axis)), (ri, reduction) in itertools.product(
        dtypes, enumerate(layouts), enumerate(reductions)):
      # Every reduction on every layout, with the variants taken in turn (a Latin square, not
      # the full product: each variant still meets every reduction, layout and dtype).
      chosen = variants if s.custom else [variants[(li + ri) % len(variants)]]
      for v in chosen:
        seed += 1
        cases.append(_case(fn, shape, axis, dtype, reduction, v, seed))
  if s.quick and not s.custom:
    cases = cases[::3]
  return cases


def _case(fn, shape, axis, dtype, reduction, v, seed) -> Case:
  c = shape[axis]
  alpha, gamma, mask = v["alpha"], v["gamma"], v["mask"]
  eps = v["label_smoothing"]
  if fn == "sigmoid_focal":
    # Sigmoid: scalar alpha in [0, 1] and scalar gamma; masks via where only.
    alpha = None if alpha is None else (alpha if isinstance(alpha, float) else 0.25)
    gamma = 2.0 if gamma == "vector" else gamma
    mask = "where" if mask in ("where", "both") else "none"
  else:
    alpha = _alpha_for(alpha, c)
    gamma = _gamma_vector(c) if gamma == "vector" else gamma
  if fn == "categorical_focal":
    eps = 0.0
    mask = "where" if mask in ("where", "both") else "none"
    gamma = gamma if not isinstance(gamma, tuple) else 2.0
  return Case(fn, shape, axis=axis, dtype=dtype, alpha=alpha, gamma=gamma,
              label_smoothing=eps, reduction=reduction, mask=mask, soft=bool(seed % 2),
              scale=3.0, seed=seed)


def deepspeed_oracle_configs(s: Settings) -> list[DSConfig]:
  dtypes = [d for d in (s.dtype or ["float32", "float64"]) if d in ("float32", "float64")]
  reductions = [r for r in (s.reduction or ["mean", "sum"]) if r in ("mean", "sum")]
  classes = s.classes or ([7, 91] if s.quick else [7, 91, 1000])
  gammas = s.gamma or ([0.0, 2.0] if s.quick else [0.0, 0.5, 2.0, 5.0])
  alpha_kinds = ["none", "col", "vec"]
  if s.alpha is not None:
    alpha_kinds = sorted({"none" if a is None else "col" for a in s.alpha})
  out = []
  seed = 1000
  for i, (dtype, red, c, ak) in enumerate(itertools.product(dtypes, reductions, classes,
                                                            alpha_kinds)):
    # Each gamma in turn (all of them when the user named some).
    chosen = gammas if s.gamma else [gammas[i % len(gammas)]]
    for g in chosen:
      seed += 1
      # The sweep's shapes (16, 7), (8, 91), and the recorded (5, 1000).
      out.append(DSConfig(n=_rows(c)[0], c=c, dtype=dtype, alpha_kind=ak, gamma=g,
                          size_average=(red == "mean"), scale=3.0, seed=seed))
  if s.quick and not s.custom:
    out = out[::2]
  return out


def saturation_configs(s: Settings) -> list[DSConfig]:
  """float32, wrong by 100, 1e3, 1e4: past DeepSpeed's overflow (NaN grad >= ~89)."""
  margins = [-100.0, -1e4] if s.quick else [-100.0, -1e3, -1e4]
  gammas = s.gamma or [0.0, 2.0]
  return [DSConfig(n=16, c=7, dtype="float32", alpha_kind="col", gamma=g, scale=1.0,
                   margin=m, seed=2000 + i)
          for i, (m, g) in enumerate(itertools.product(margins, gammas))]


def small_gamma_configs(s: Settings) -> list[DSConfig]:
  """float32, 0 < gamma < 1, right by 20, 100, 1e4: p rounds to 1 (from ~17)."""
  gammas = [g for g in (s.gamma or [0.25, 0.5, 0.75]) if 0 < g < 1] or [0.5]
  margins = [20.0, 1e4] if s.quick else [20.0, 100.0, 1e4]
  return [DSConfig(n=16, c=7, dtype="float32", alpha_kind="none", gamma=g, scale=1.0,
                   margin=m, seed=3000 + i)
          for i, (m, g) in enumerate(itertools.product(margins, gammas))]


def anchor_tasks(s: Settings) -> list[Task]:
  dtypes = [d for d in (s.dtype or ["float32", "float64"]) if d in ("float32", "float64")]
  reductions = s.reduction or list(REDUCTIONS)
  tasks: list[Task] = []
  # torchvision, recorded: every case (filtered by the user's values).
  tv = [r for r in load_torchvision_cases()
        if str(r.dtype) in dtypes and r.reduction in reductions
        and (s.gamma is None or r.gamma in s.gamma)
        and (s.alpha is None or (None if r.alpha < 0 else r.alpha) in s.alpha)]
  tasks += [(anchors.checks_torchvision, r) for r in (tv[::4] if s.quick else tv)]
  seed = 4000
  classes = s.classes or [7, 91]
  gammas = s.gamma or [0.0, 0.5, 2.0]
  scalar_alphas = [a for a in (s.alpha or [None, 0.25]) if a is None or isinstance(a, float)]
  for dtype in dtypes:
    # optax.sigmoid_focal_loss: per element.
    if "none" in reductions:
      for g, a, soft in itertools.product(gammas, scalar_alphas, (False, True)):
        seed += 1
        tasks.append((anchors.checks_optax_sigmoid,
                      Case("sigmoid_focal", (8, 5), dtype=dtype, alpha=a, gamma=g,
                           reduction="none", soft=soft, seed=seed)))
    if s.gamma is None or 0.0 in s.gamma:
      # Cross-entropy at gamma = 0.
      for c, red, (eps, mask) in itertools.product(
          classes, reductions, ((0.0, "none"), (0.1, "ignore"), (0.2, "none"))):
        seed += 1
        shape, axis = (_rows(c), -1) if seed % 2 else ((2, 5, 3, 3), 1)
        tasks.append((anchors.checks_cross_entropy,
                      Case("softmax_focal", shape, axis=axis, dtype=dtype, gamma=0.0,
                           label_smoothing=eps, reduction=red, mask=mask, seed=seed)))
      if "sum" in reductions:
        for c in classes:
          seed += 1
          tasks.append((anchors.checks_cross_entropy,
                        Case("softmax_focal", _rows(c), dtype=dtype, gamma=0.0,
                             alpha=_alpha_for("vector", c), reduction="sum", mask="ignore",
                             seed=seed)))
      if "none" in reductions:
        for c, soft in itertools.product(classes, (False, True)):
          seed += 1
          tasks.append((anchors.checks_cross_entropy,
                        Case("categorical_focal", (16, 7), dtype=dtype, gamma=0.0,
                             reduction="none", soft=soft, seed=seed)))
      for red, eps in itertools.product([r for r in reductions if r != "mean_positive"],
                                        (0.0, 0.1)):
        seed += 1
        tasks.append((anchors.checks_bce,
                      Case("sigmoid_focal", (8, 5), dtype=dtype, gamma=0.0,
                           label_smoothing=eps, reduction=red, soft=bool(seed % 2),
                           seed=seed)))
    # imbalanced-losses: softmax on (N, C) and (N, C, H, W), dim 1; sigmoid.
    alphas = [None if a is None else "vector" for a in (s.alpha or [None, "vector"])]
    imb_gammas = [g for g in gammas if g >= 1 or g == 0] or [2.0]
    variants = list(itertools.product(((0.0, "none"), (0.1, "ignore")), alphas, imb_gammas))
    for i, (c, red) in enumerate(itertools.product(classes, reductions)):
      for (eps, mask), a, g in (variants if s.custom else [variants[i % len(variants)]]):
        seed += 1
        shape = _rows(c) if seed % 2 else (2, 5, 3, 3)
        tasks.append((anchors.checks_imbalanced,
                      Case("softmax_focal", shape, axis=1, dtype=dtype,
                           alpha=None if a is None else _alpha_for("vector", shape[1]), gamma=g,
                           label_smoothing=eps, reduction=red, mask=mask,
                           background_class=seed % 2, seed=seed)))
    for red, a in itertools.product([r for r in reductions if r != "mean_positive"],
                                    scalar_alphas):
      seed += 1
      tasks.append((anchors.checks_imbalanced,
                    Case("sigmoid_focal", (8, 5), dtype=dtype, alpha=a, gamma=2.0,
                         reduction=red, soft=bool(seed % 2), seed=seed)))
  if s.quick and not s.custom:
    keep = tasks[: len(tv[::4])]
    keep += tasks[len(tv[::4])::5]
    tasks = keep
  return tasks


def tasks(s: Settings) -> list[Task]:
  """Everything the report runs, in order."""
  out: list[Task] = [(checks_cross_framework, c) for c in cross_framework_cases(s)]
  recorded = load_deepspeed_cases()
  if s.dtype is not None:
    recorded = [r for r in recorded if str(r.dtype) in s.dtype]
  out += [(deepspeed_checks.checks_recorded, r) for r in recorded]
  out += [(deepspeed_checks.checks_oracle, c) for c in deepspeed_oracle_configs(s)]
  if s.dtype is None or "float32" in s.dtype:
    out += [(deepspeed_checks.checks_saturation, c) for c in saturation_configs(s)]
    out += [(deepspeed_checks.checks_small_gamma, c) for c in small_gamma_configs(s)]
  out += anchor_tasks(s)
  return out
