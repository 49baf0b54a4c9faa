"""Configurations and their inputs: one ``Case`` describes one call of a focal loss.

A ``Case`` is plain data (hashable, printable); ``make_inputs`` turns it into arrays and into
the ONE kwargs dict that drives both packages. That dict uses the JAX spelling (``axis``);
``torch_kwargs`` renames ``axis`` to ``dim`` and turns arrays into tensors, nothing else.
Every default is passed explicitly (JAX ``ignore_index=None`` / torch ``-100``, JAX
``reduction="none"`` / torch ``"mean"``), so the two packages never fall back on their
different defaults.

Inputs are drawn in float64 and rounded to the case's dtype once; both packages and the float64
reference then see exactly the same numbers, so input rounding is not an error source in any
comparison. Labels, masks, cotangents and hyperparameters use values that every dtype holds
exactly (multiples of 1/64 in [1/64, 4]).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

FUNCTIONS = ("softmax_focal", "sigmoid_focal", "categorical_focal")
REDUCTIONS = ("none", "sum", "mean", "mean_positive")
DTYPES = ("float64", "float32", "bfloat16", "float16")
SAMPLE_WEIGHTS = ("none", "scalar", "entry")
IGNORE_INDEX = -100
# The shapes every sweep draws from: (N, C) with the class axis last, (N, C, H, W) with it at 1,
# and many classes at axis 1 of a 2-D array. Few distinct shapes keep JAX's per-shape compile
# cost (about a second each on a busy 2-core machine) from dominating the run.
LAYOUTS = (((16, 7), -1), ((2, 5, 3, 3), 1), ((8, 91), 1))

NUMPY_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def quantize(x: np.ndarray, dtype: str) -> np.ndarray:
  """Round ``x`` to ``dtype`` and return it as float64 (the values the dtype holds)."""
  return np.asarray(x, np.float64).astype(NUMPY_DTYPES[dtype]).astype(np.float64)


def exact(x: np.ndarray) -> np.ndarray:
  """Round to a multiple of 1/64 in [1/64, 4]: held exactly by every dtype, float16 included."""
  return np.clip(np.round(np.asarray(x, np.float64) * 64) / 64, 1 / 64, 4.0)


@dataclasses.dataclass(frozen=True)
class Case:
  """One call of ``fn``: shapes, dtype, hyperparameters and which masks are present.

  ``alpha`` and ``gamma`` are None / a float / a tuple (a per-class vector); ``mask`` is
  ``"none"``, ``"where"``, ``"ignore"`` (some labels set to ``ignore_index``, softmax only) or
  ``"both"``. ``soft`` draws soft labels (sigmoid) or soft targets (categorical: Dirichlet
  rows instead of smoothed one-hot). ``scale`` is the logits' standard deviation.
  ``sample_weight`` is ``"none"``, ``"scalar"`` (one weight for every entry) or ``"entry"``
  (one exact weight per entry, drawn from its own generator so the other inputs stay as they
  are without it).
  """

  fn: str
  shape: tuple[int, ...]
  axis: int = -1
  dtype: str = "float32"
  alpha: Any = None
  gamma: Any = 2.0
  label_smoothing: float = 0.0
  reduction: str = "mean"
  mask: str = "none"
  background_class: int = 0
  soft: bool = False
  scale: float = 3.0
  seed: int = 0
  sample_weight: str = "none"

  def __post_init__(self):
    if self.fn not in FUNCTIONS:
      raise ValueError(f"Case: fn must be one of {FUNCTIONS}, got {self.fn!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"Case: dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.reduction not in REDUCTIONS:
      raise ValueError(f"Case: reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
    if self.sample_weight not in SAMPLE_WEIGHTS:
      raise ValueError(
          f"Case: sample_weight must be one of {SAMPLE_WEIGHTS}, got {self.sample_weight!r}")

  @property
  def num_classes(self) -> int:
    return self.shape[self.axis]

  def describe(self) -> str:
    parts = [f"{self.fn}{self.shape}", self.dtype]
    if self.fn != "sigmoid_focal":
      parts.append(f"axis={self.axis}")
    parts += [f"alpha={_fmt(self.alpha)}", f"gamma={_fmt(self.gamma)}"]
    if self.label_smoothing:
      parts.append(f"eps={self.label_smoothing:g}")
    parts += [self.reduction, f"mask={self.mask}", f"scale={self.scale:g}", f"seed={self.seed}"]
    if self.soft:
      parts.append("soft")
    if self.sample_weight != "none":
      parts.append(f"sample_weight={self.sample_weight}")
    return " ".join(parts)


def _fmt(v: Any) -> str:
  if v is None:
    return "None"
  if isinstance(v, tuple):
    return "(" + ",".join(f"{x:g}" for x in v[:3]) + (",..)" if len(v) > 3 else ")")
  return f"{v:g}"


@dataclasses.dataclass
class Inputs:
  """Arrays for one case (all NumPy; logits as float64 holding dtype-exact values)."""

  logits: np.ndarray
  labels: np.ndarray  # int64 (softmax) or float64 (sigmoid labels, categorical targets)
  cotangent: np.ndarray  # the output's shape; 1 for scalar reductions
  kwargs: dict  # the one kwargs dict, JAX spelling


def _label_shape(case: Case) -> tuple[int, ...]:
  shape = list(case.shape)
  if case.fn == "sigmoid_focal":
    return tuple(shape)
  del shape[case.axis]
  return tuple(shape)


def make_inputs(case: Case) -> Inputs:
  """Draw the arrays of ``case`` and build its kwargs dict (JAX spelling)."""
  rng = np.random.default_rng(case.seed)
  logits = quantize(rng.standard_normal(case.shape) * case.scale, case.dtype)
  lshape = _label_shape(case)
  where = None
  if case.mask in ("where", "both"):
    where = rng.random(lshape) < 0.75
  if case.fn == "softmax_focal":
    labels = rng.integers(0, case.num_classes, lshape).astype(np.int64)
    if case.mask in ("ignore", "both"):
      labels[rng.random(lshape) < 0.25] = IGNORE_INDEX
  elif case.fn == "sigmoid_focal":
    if case.soft:
      labels = np.round(rng.random(lshape) * 8) / 8
    else:
      labels = (rng.random(lshape) < 0.3).astype(np.float64)
  else:
    c = case.num_classes
    if case.soft:
      y = rng.dirichlet(np.ones(c), size=lshape)
    else:
      y = np.eye(c)[rng.integers(0, c, lshape)] * (1 - 0.1) + 0.1 / c
    y = np.moveaxis(y, -1, case.axis)
    labels = quantize(y, case.dtype)
  if case.reduction == "none":
    cotangent = np.round(rng.uniform(0.5, 1.5, lshape) * 32) / 32
  else:
    cotangent = np.ones(())

  kw: dict[str, Any] = {"alpha": _hyper(case.alpha), "gamma": _hyper(case.gamma)}
  if case.fn != "categorical_focal":
    kw["label_smoothing"] = case.label_smoothing
  if case.fn != "sigmoid_focal":
    kw["axis"] = case.axis
  kw["where"] = where
  if case.fn == "softmax_focal":
    kw["ignore_index"] = IGNORE_INDEX
  kw["reduction"] = case.reduction
  if case.fn != "sigmoid_focal":
    kw["background_class"] = case.background_class
  kw["sample_weight"] = _sample_weight(case, lshape)
  return Inputs(logits=logits, labels=labels, cotangent=cotangent, kwargs=kw)


def _sample_weight(case: Case, shape: tuple[int, ...]) -> Any:
  """None, a Python float, or per-entry weights in [0, 4] (0 included) exact in every dtype."""
  if case.sample_weight == "none":
    return None
  if case.sample_weight == "scalar":
    return 0.75
  rng = np.random.default_rng(case.seed + 10_000)
  w = exact(rng.uniform(0.0, 3.0, shape))
  w[rng.random(shape) < 0.1] = 0.0  # zero-weight entries still count in the denominators
  return w


def _hyper(v: Any) -> Any:
  """A hyperparameter as the packages receive it: None, a Python float, or a float32 vector."""
  if v is None:
    return None
  if isinstance(v, tuple):
    return np.asarray(v, np.float32)
  return float(v)


def jax_kwargs(kwargs: dict) -> dict:
  """The kwargs dict for ``focal_jax``: arrays become ``jax.Array``; names unchanged."""
  import jax.numpy as jnp
  return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}


def torch_kwargs(kwargs: dict) -> dict:
  """The kwargs dict for ``focal_torch``: ``axis`` -> ``dim``, arrays become tensors."""
  import torch
  out = {}
  for k, v in kwargs.items():
    out["dim" if k == "axis" else k] = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
  return out
