"""The report's grid of configurations: built-in defaults, ``--quick``, or a user's own values.

``Settings`` holds the user's overrides (each None or a list of values); ``tasks`` expands them
into ``(family, config)`` pairs: the family is a function from ``parity_tests.compare``,
``deepspeed_checks`` or ``anchors`` that returns checks. Configurations are deterministic
(seeds fixed), so two runs of the report print the same table.

The built-in grid is a rotation (a Latin square), not a full product: every function meets
every dtype, layout, reduction and hyperparameter variant, without running all combinations.
Most of the run time is JAX compiling each new (shape, dtype, structure) on first use, so the
grid draws its shapes from ``cases.LAYOUTS`` and the recorded cases' shapes.
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
from parity_tests.linear_checks import LinearCase, checks_linear_both


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

# Hyperparameter variants of the built-in grid ("vector": per class, sized to C).
VARIANTS = (
    dict(gamma=2.0, alpha=None, label_smoothing=0.0, mask="none", sample_weight="none"),
    dict(gamma=0.5, alpha=0.25, label_smoothing=0.1, mask="where", sample_weight="entry"),
    dict(gamma="vector", alpha="vector", label_smoothing=0.0, mask="ignore",
         sample_weight="none"),
    dict(gamma=3.0, alpha="vector", label_smoothing=0.2, mask="both", sample_weight="scalar"),
)


def _alpha_for(alpha: Any, c: int) -> Any:
  """"vector" becomes C exact per-class weights; a user's tuple must have C entries."""
  if alpha == "vector":
    return tuple(0.25 + (i % 7) / 4 for i in range(c))
  if isinstance(alpha, tuple) and len(alpha) != c:
    raise ValueError(f"--alpha: {len(alpha)} values given for {c} classes")
  return alpha


def _gamma_vector(c: int) -> tuple:
  return tuple(float(i % 4) * 0.75 for i in range(c))


def _rows(c: int) -> tuple[int, int]:
  """A 2-D (N, C) shape for C classes, reusing the sweep's shapes where C matches."""
  return {7: (16, 7), 91: (8, 91), 1000: (5, 1000)}.get(c, (16, c))


def _case(fn: str, shape, axis: int, dtype: str, reduction: str, v: dict, seed: int) -> Case:
  """A case of ``fn`` from a variant, adapted to what ``fn`` takes."""
  c = shape[axis]
  alpha, gamma, mask, eps = v["alpha"], v["gamma"], v["mask"], v["label_smoothing"]
  if fn == "sigmoid_focal":
    # Scalar alpha in [0, 1] and scalar gamma; examples masked with where only.
    if alpha is not None and not (isinstance(alpha, float) and 0 <= alpha <= 1):
      alpha = 0.25
    gamma = 2.0 if not isinstance(gamma, float) else gamma
    mask = "where" if mask in ("where", "both") else "none"
  else:
    alpha = _alpha_for(alpha, c)
    gamma = _gamma_vector(c) if gamma == "vector" else gamma
  if fn == "categorical_focal":
    eps = 0.0
    mask = "where" if mask in ("where", "both") else "none"
  return Case(fn, tuple(shape), axis=axis, dtype=dtype, alpha=alpha, gamma=gamma,
              label_smoothing=eps, reduction=reduction, mask=mask, soft=bool(seed % 2),
              scale=3.0, seed=seed, sample_weight=v.get("sample_weight", "none"))


def cross_framework_cases(s: Settings) -> list[Case]:
  """JAX vs torch (and each vs float64) over functions, dtypes, layouts, reductions."""
  fns = ("softmax_focal", "sigmoid_focal", "categorical_focal")
  dtypes = s.dtype or list(DTYPES)
  reductions = s.reduction or list(REDUCTIONS)
  cases = []
  seed = 0
  if s.custom:
    layouts = ([(_rows(c), -1) for c in s.classes] + [((2, c, 3, 3), 1) for c in s.classes]
               if s.classes else list(LAYOUTS[:2]))
    variants = [dict(gamma=g, alpha=a, label_smoothing=e, mask=m, sample_weight=w)
                for g, a in itertools.product(s.gamma or [2.0], s.alpha or [None, "vector"])
                for e, m, w in ((0.0, "none", "none"), (0.1, "both", "entry"))]
    for fn, dtype, (shape, axis), red, v in itertools.product(fns, dtypes, layouts, reductions,
                                                              variants):
      seed += 1
      cases.append(_case(fn, shape, axis, dtype, red, v, seed))
    return cases
  layouts = LAYOUTS[:2] if s.quick else LAYOUTS
  for i, (fn, dtype) in enumerate(itertools.product(fns, dtypes)):
    if s.quick:  # one case per function and dtype, rotating the rest
      picks = [(layouts[i % 2], reductions[i % 4], VARIANTS[(i // 2) % 4])]
    else:  # every reduction, rotating layouts and variants
      picks = [(layouts[(i + k) % len(layouts)], red, VARIANTS[(i + 2 * k) % 4])
               for k, red in enumerate(reductions)]
    for (shape, axis), red, v in picks:
      seed += 1
      cases.append(_case(fn, shape, axis, dtype, red, v, seed))
  return cases


def linear_cases(s: Settings) -> list[LinearCase]:
  """The fused linear_softmax_focal: every dtype and reduction, rotating the variants."""
  dtypes = s.dtype or list(DTYPES)
  reductions = s.reduction or list(REDUCTIONS)
  v = (s.classes or [50])[0]
  out = []
  for i, (dtype, red) in enumerate(itertools.product(dtypes, reductions)):
    if not s.custom and (i + i // len(reductions)) % (8 if s.quick else 2):
      continue  # a rotation: each dtype meets different reductions
    var = VARIANTS[i % len(VARIANTS)] if not s.custom else dict(
        gamma=(s.gamma or [2.0])[0], alpha=(s.alpha or [None])[0], label_smoothing=0.1,
        mask="both")
    gamma = _gamma_vector(v) if var["gamma"] == "vector" else var["gamma"]
    out.append(LinearCase(n=24, h=16, v=v, dtype=dtype, alpha=_alpha_for(var["alpha"], v),
                          gamma=gamma, label_smoothing=var["label_smoothing"],
                          mask=var["mask"], reduction=red, background_class=i % v,
                          bias=bool(i % 2), chunk_size=(7, None)[i % 2], seed=5000 + i))
  return out


def recorded_cases(s: Settings):
  recorded = load_deepspeed_cases()
  if s.dtype is not None:
    recorded = [r for r in recorded if str(r.dtype) in s.dtype]
  if s.reduction is not None:
    recorded = [r for r in recorded if ("mean" if r.size_average else "sum") in s.reduction]
  if s.quick and not s.custom:  # both dtypes, all alpha kinds, an overflow
    recorded = [r for r in recorded if r.case in (8, 16, 24, 40)]
  return recorded


def deepspeed_oracle_configs(s: Settings) -> list[DSConfig]:
  dtypes = [d for d in (s.dtype or ["float32", "float64"]) if d in ("float32", "float64")]
  reductions = [r for r in (s.reduction or ["mean", "sum"]) if r in ("mean", "sum")]
  classes = s.classes or [7, 91, 1000]
  gammas = s.gamma or [0.0, 0.5, 2.0, 5.0]
  kinds = ["none", "col", "vec"]
  if s.alpha is not None:
    kinds = sorted({"none" if a is None else "col" for a in s.alpha})
  out = []
  seed = 1000
  if s.custom:
    for dtype, red, c, g, kind in itertools.product(dtypes, reductions, classes, gammas, kinds):
      seed += 1
      out.append(DSConfig(n=_rows(c)[0], c=c, dtype=dtype, alpha_kind=kind, gamma=g,
                          size_average=(red == "mean"), scale=3.0, seed=seed))
    return out
  rounds = 1
  for r, (i, (dtype, red, kind)) in itertools.product(
      range(rounds), enumerate(itertools.product(dtypes, reductions, kinds))):
    if s.quick and i % 6:
      continue
    seed += 1
    c = classes[(i + r) % len(classes)]
    out.append(DSConfig(n=_rows(c)[0], c=c, dtype=dtype, alpha_kind=kind,
                        gamma=gammas[(i + 2 * r) % len(gammas)], size_average=(red == "mean"),
                        scale=3.0, seed=seed))
  return out


def saturation_configs(s: Settings) -> list[DSConfig]:
  """float32, wrong by 100, 1e3, 1e4: past DeepSpeed's overflow (NaN grad from ~89)."""
  margins = [-1e4] if s.quick else [-100.0, -1e3, -1e4]
  gammas = s.gamma or ([2.0] if s.quick else [0.0, 2.0])
  return [DSConfig(n=16, c=7, dtype="float32", alpha_kind="col", gamma=g, scale=1.0,
                   margin=m, seed=2000 + i)
          for i, (m, g) in enumerate(itertools.product(margins, gammas))]


def small_gamma_configs(s: Settings) -> list[DSConfig]:
  """float32, 0 < gamma < 1, right by 20, 100, 1e4: p rounds to 1 (from ~17)."""
  gammas = [g for g in (s.gamma or [0.25, 0.5]) if 0 < g < 1] or [0.5]
  margins = [20.0] if s.quick else [20.0, 100.0, 1e4]
  if s.quick:
    gammas = gammas[:1]
  return [DSConfig(n=16, c=7, dtype="float32", alpha_kind="none", gamma=g, scale=1.0,
                   margin=m, seed=3000 + i)
          for i, (m, g) in enumerate(itertools.product(margins, gammas))]


def torchvision_records(s: Settings):
  dtypes = [d for d in (s.dtype or ["float32", "float64"]) if d in ("float32", "float64")]
  recs = [r for r in load_torchvision_cases()
          if str(r.dtype) in dtypes and r.reduction in (s.reduction or REDUCTIONS)
          and (s.gamma is None or r.gamma in s.gamma)
          and (s.alpha is None or (None if r.alpha < 0 else r.alpha) in s.alpha)]
  if s.custom:
    return recs
  return recs[::26] if s.quick else recs[::3]


def anchor_configs(s: Settings) -> list[Task]:
  """optax focal, cross-entropies at gamma 0, BCE, imbalanced-losses."""
  dtypes = [d for d in (s.dtype or ["float32", "float64"]) if d in ("float32", "float64")]
  reductions = s.reduction or list(REDUCTIONS)
  classes = s.classes or [7, 91]
  gammas = s.gamma or [0.0, 0.5, 2.0]
  scalar_alphas = [a for a in (s.alpha or [None, 0.25])
                   if a is None or (isinstance(a, float) and 0 <= a <= 1)] or [None]
  tasks: list[Task] = []
  seed = 4000
  for dtype in dtypes:
    if "none" in reductions:  # optax.sigmoid_focal_loss is per element
      for g, a in itertools.product(gammas, scalar_alphas):
        seed += 1
        tasks.append((anchors.checks_optax_sigmoid,
                      Case("sigmoid_focal", (8, 5), dtype=dtype, alpha=a, gamma=g,
                           reduction="none", soft=bool(seed % 2), seed=seed)))
    if s.gamma is None or 0.0 in s.gamma:
      ce_variants = ((0.0, "none"), (0.1, "ignore"), (0.2, "none"), (0.0, "ignore"))
      for i, (c, red) in enumerate(itertools.product(classes, reductions)):
        seed += 1
        eps, mask = ce_variants[i % 4]
        shape, axis = (_rows(c), -1) if i % 2 else ((2, 5, 3, 3), 1)
        tasks.append((anchors.checks_cross_entropy,
                      Case("softmax_focal", shape, axis=axis, dtype=dtype, gamma=0.0,
                           label_smoothing=eps, reduction=red, mask=mask, seed=seed)))
      if "sum" in reductions:  # weight=alpha means alpha[t] with the sum
        seed += 1
        c = classes[0]
        tasks.append((anchors.checks_cross_entropy,
                      Case("softmax_focal", _rows(c), dtype=dtype, gamma=0.0,
                           alpha=_alpha_for("vector", c), reduction="sum", mask="ignore",
                           seed=seed)))
      if "none" in reductions:
        for soft in (False, True):
          seed += 1
          tasks.append((anchors.checks_cross_entropy,
                        Case("categorical_focal", (16, 7), dtype=dtype, gamma=0.0,
                             reduction="none", soft=soft, seed=seed)))
      for i, red in enumerate(r for r in reductions if r != "mean_positive"):
        seed += 1
        tasks.append((anchors.checks_bce,
                      Case("sigmoid_focal", (8, 5), dtype=dtype, gamma=0.0,
                           label_smoothing=(0.0, 0.1)[i % 2], reduction=red,
                           soft=bool(seed % 2), seed=seed)))
    # imbalanced-losses: softmax on (N, C) and (N, C, H, W) with dim 1; sigmoid.
    imb_gammas = [g for g in gammas if g == 0 or g >= 1] or [2.0]
    alphas = [None, "vector"] if s.alpha is None else [
        None if a is None else "vector" for a in s.alpha]
    for i, (c, red) in enumerate(itertools.product(classes, reductions)):
      seed += 1
      shape = _rows(c) if i % 2 else (2, 5, 3, 3)
      eps, mask = ((0.0, "none"), (0.1, "ignore"))[i % 2]
      a = alphas[(i // 2) % len(alphas)]
      tasks.append((anchors.checks_imbalanced,
                    Case("softmax_focal", shape, axis=1, dtype=dtype,
                         alpha=None if a is None else _alpha_for("vector", shape[1]),
                         gamma=imb_gammas[i % len(imb_gammas)], label_smoothing=eps,
                         reduction=red, mask=mask, background_class=i % 2, seed=seed)))
    for i, red in enumerate(r for r in reductions if r != "mean_positive"):
      seed += 1
      tasks.append((anchors.checks_imbalanced,
                    Case("sigmoid_focal", (8, 5), dtype=dtype,
                         alpha=scalar_alphas[i % len(scalar_alphas)], gamma=2.0,
                         reduction=red, soft=bool(seed % 2), seed=seed)))
  if s.quick and not s.custom:
    tasks = tasks[::6]
  return tasks


def tasks(s: Settings) -> list[Task]:
  """Everything the report runs, in order."""
  out: list[Task] = [(checks_cross_framework, c) for c in cross_framework_cases(s)]
  out += [(checks_linear_both, c) for c in linear_cases(s)]
  out += [(deepspeed_checks.checks_recorded, r) for r in recorded_cases(s)]
  out += [(deepspeed_checks.checks_oracle, c) for c in deepspeed_oracle_configs(s)]
  if s.dtype is None or "float32" in s.dtype:
    out += [(deepspeed_checks.checks_saturation, c) for c in saturation_configs(s)]
    out += [(deepspeed_checks.checks_small_gamma, c) for c in small_gamma_configs(s)]
  out += [(anchors.checks_torchvision, r) for r in torchvision_records(s)]
  out += anchor_configs(s)
  return out
