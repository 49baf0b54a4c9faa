"""Comparisons with libraries users already trust, on the ground they share with ours.

- torchvision ``sigmoid_focal_loss``: recorded values (``data/torchvision_sigmoid_focal.npz``;
  its PyPI wheel does not import under CPU torch), sigmoid_focal with no mask or smoothing;
- ``optax.sigmoid_focal_loss``: per-element sigmoid focal, live;
- cross-entropy at gamma = 0 (alpha None): ``F.cross_entropy`` (``ignore_index``, label
  smoothing, every reduction; and ``weight=alpha`` with the sum, where it means the same),
  ``optax.softmax_cross_entropy[_with_integer_labels]`` (smoothed one-hot via
  ``optax.smooth_labels``) for softmax_focal and categorical_focal, and
  ``F.binary_cross_entropy_with_logits`` / ``optax.sigmoid_binary_cross_entropy`` on the
  smoothed labels ``y (1 - eps) + eps / 2`` for sigmoid_focal;
- imbalanced-losses ``SoftmaxFocalLoss`` (alpha, ``ignore_index``, label smoothing,
  ``mean_positive`` with ``background_class``, on (N, C) and (N, C, H, W) with dim 1) and
  ``SigmoidFocalLoss``.

Log-space anchors (cross-entropies, optax's focal) are held to ``2 * budget``
(``Tolerance.doubled``); probability-space ones (torchvision, imbalanced-losses) to
``prob_tolerance`` with the unit floor (see ``parity_tests.tolerances``).
"""

from __future__ import annotations

import numpy as np

from parity_tests.cases import IGNORE_INDEX, NUMPY_DTYPES, Case, Inputs, make_inputs
from parity_tests.compare import (Check, Output, measure, run_jax, run_torch, _dtype_name, _np)
from parity_tests.golden import TorchvisionCase
from parity_tests.tolerances import prob_tolerance, tolerance, units

TORCHVISION = "torchvision sigmoid_focal_loss (recorded)"
OPTAX_FOCAL = "optax.sigmoid_focal_loss"
TORCH_CE = "F.cross_entropy (gamma=0)"
OPTAX_CE = "optax.softmax_cross_entropy (gamma=0)"
TORCH_BCE = "F.binary_cross_entropy_with_logits (gamma=0)"
OPTAX_BCE = "optax.sigmoid_binary_cross_entropy (gamma=0)"
IMB_SOFTMAX = "imbalanced-losses SoftmaxFocalLoss"
IMB_SIGMOID = "imbalanced-losses SigmoidFocalLoss"


def _row(pkg: str, anchor: str) -> str:
  return f"{pkg} vs {anchor}"


def _both(case: Case, inputs: Inputs) -> dict[str, Output]:
  args = (case.fn, inputs.logits, inputs.labels, inputs.kwargs, case.dtype, inputs.cotangent)
  return {"JAX": run_jax(*args), "torch": run_torch(*args)}


def _torch_anchor(fn, logits: np.ndarray, dtype: str, cotangent: np.ndarray) -> Output:
  """Run a torch function of the logits; VJP with ``cotangent``."""
  import torch
  x = torch.tensor(logits, dtype=torch.float64).to(getattr(torch, dtype)).requires_grad_(True)
  out = fn(x)
  out.backward(torch.as_tensor(cotangent).to(out.dtype))
  return Output(_np(out), _np(x.grad), _dtype_name(out.dtype), _dtype_name(x.grad.dtype))


def _jax_anchor(fn, logits: np.ndarray, dtype: str, cotangent: np.ndarray) -> Output:
  """Run a JAX function of the logits (jitted, like the project's side); VJP with
  ``cotangent``."""
  import jax
  import jax.numpy as jnp
  x = jnp.asarray(logits.astype(NUMPY_DTYPES[dtype]))

  @jax.jit
  def value_and_vjp(x, cot):
    out, pullback = jax.vjp(fn, x)
    return out, pullback(cot.astype(out.dtype))[0]
  out, g = value_and_vjp(x, jnp.asarray(cotangent))
  return Output(np.asarray(out, np.float64), np.asarray(g, np.float64), str(out.dtype),
                str(g.dtype))


def _counts(case: Case, inputs: Inputs) -> tuple[int, int]:
  """(valid, positive) counts of a case, for the unit floor."""
  labels = inputs.labels
  valid = np.ones(labels.shape if case.fn != "categorical_focal" else
                  np.delete(np.array(labels.shape), case.axis), bool)
  w = inputs.kwargs.get("where")
  if w is not None:
    valid &= w
  if case.fn == "softmax_focal":
    valid &= labels != IGNORE_INDEX
    positive = valid & (labels != case.background_class)
  elif case.fn == "sigmoid_focal":
    positive = valid & (labels > 0)
  else:
    positive = valid & (np.argmax(labels, axis=case.axis) != case.background_class)
  return int(valid.sum()), int(positive.sum())


def _prob_floor(case: Case, inputs: Inputs) -> tuple[float, float]:
  n_valid, n_pos = _counts(case, inputs)
  a = inputs.kwargs.get("alpha")
  a_max = 1.0 if a is None else float(np.max(a))
  if case.fn == "sigmoid_focal" and a is not None:
    a_max = max(a_max, 1 - a_max)
  return units(case.reduction, n_valid, n_pos, a_max, float(np.max(inputs.cotangent)))


# ----------------------------------------------------------------------------- torchvision


def torchvision_case(rec: TorchvisionCase) -> tuple[Case, Inputs]:
  """The project's sigmoid_focal call equivalent to one recorded torchvision call."""
  dtype = str(rec.dtype)
  alpha = None if rec.alpha < 0 else rec.alpha
  case = Case("sigmoid_focal", tuple(rec.logits.shape), dtype=dtype, alpha=alpha,
              gamma=rec.gamma, reduction=rec.reduction, soft=rec.soft, seed=rec.case)
  kw = {"alpha": alpha, "gamma": rec.gamma, "label_smoothing": 0.0, "where": None,
        "reduction": rec.reduction}
  inputs = Inputs(rec.logits.astype(np.float64), rec.labels.astype(np.float64),
                  rec.cotangent.astype(np.float64), kw)
  return case, inputs


def checks_torchvision(rec: TorchvisionCase) -> list[Check]:
  case, inputs = torchvision_case(rec)
  anchor = Output(rec.loss.astype(np.float64), rec.grad.astype(np.float64), case.dtype,
                  case.dtype)
  floor = _prob_floor(case, inputs)
  desc = f"recorded case {rec.case}: " + case.describe()
  return [measure(_row(p, TORCHVISION), case.dtype, desc, o, anchor,
                  prob_tolerance(case.dtype), floor=floor, expect_dtype=case.dtype)
          for p, o in _both(case, inputs).items()]


# ----------------------------------------------------------------------------- optax focal


def checks_optax_sigmoid(case: Case) -> list[Check]:
  """sigmoid_focal (reduction none, no mask, no smoothing) vs ``optax.sigmoid_focal_loss``."""
  import optax
  assert case.fn == "sigmoid_focal" and case.reduction == "none" and case.mask == "none"
  assert not case.label_smoothing
  inputs = make_inputs(case)
  y = inputs.labels.astype(NUMPY_DTYPES[case.dtype])
  a = inputs.kwargs["alpha"]
  anchor = _jax_anchor(lambda x: optax.sigmoid_focal_loss(x, y, alpha=a, gamma=case.gamma),
                       inputs.logits, case.dtype, inputs.cotangent)
  tol = tolerance(case.dtype).doubled()
  return [measure(_row(p, OPTAX_FOCAL), case.dtype, case.describe(), o, anchor, tol,
                  expect_dtype=case.dtype) for p, o in _both(case, inputs).items()]


# ----------------------------------------------------------------------------- cross-entropy


def checks_cross_entropy(case: Case) -> list[Check]:
  """gamma = 0: softmax_focal vs torch and optax cross-entropy; categorical_focal vs optax.

  torch: reductions none / sum / mean, ``ignore_index`` and smoothing (alpha None), or
  ``weight=alpha`` with the sum and no smoothing. optax: reduction none, no mask (optax's ``where`` masks classes,
  ours masks examples).
  """
  import jax.numpy as jnp
  import optax
  import torch
  import torch.nn.functional as F
  assert case.gamma == 0 and case.fn in ("softmax_focal", "categorical_focal")
  inputs = make_inputs(case)
  tol = tolerance(case.dtype).doubled()
  outs = _both(case, inputs)
  checks = []
  desc = case.describe()
  axis = case.axis % len(case.shape)
  eps = case.label_smoothing
  if (case.fn == "softmax_focal" and case.mask in ("none", "ignore")
      and case.reduction != "mean_positive"):
    alpha = inputs.kwargs["alpha"]
    weight = None if alpha is None else torch.from_numpy(alpha)
    assert alpha is None or (case.reduction == "sum" and eps == 0)
    labels = torch.from_numpy(inputs.labels)

    def ce(x):
      xs = torch.movedim(x, axis, 1)
      return F.cross_entropy(xs, labels, weight=None if weight is None else weight.to(x.dtype),
                             ignore_index=IGNORE_INDEX, reduction=case.reduction,
                             label_smoothing=eps)
    anchor = _torch_anchor(ce, inputs.logits, case.dtype, inputs.cotangent)
    checks += [measure(_row(p, TORCH_CE), case.dtype, desc, o, anchor, tol,
                       expect_dtype=case.dtype) for p, o in outs.items()]
  if case.reduction == "none" and case.mask == "none" and inputs.kwargs["alpha"] is None:
    c = case.num_classes
    if case.fn == "softmax_focal":
      lab = jnp.asarray(inputs.labels)
      if eps == 0:
        fn = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, lab, axis=axis)
      else:
        def fn(x):
          # smooth_labels takes the last axis as the classes: smooth, then move the axis.
          smoothed = optax.smooth_labels(jax_one_hot(lab, c, x.dtype), eps)
          return optax.softmax_cross_entropy(x, jnp.moveaxis(smoothed, -1, axis), axis=axis)
    else:
      tgt = jnp.asarray(inputs.labels.astype(NUMPY_DTYPES[case.dtype]))
      fn = lambda x: optax.softmax_cross_entropy(x, tgt, axis=axis)
    anchor = _jax_anchor(fn, inputs.logits, case.dtype, inputs.cotangent)
    checks += [measure(_row(p, OPTAX_CE), case.dtype, desc, o, anchor, tol,
                       expect_dtype=case.dtype) for p, o in outs.items()]
  return checks


def jax_one_hot(labels, c: int, dtype):
  import jax
  return jax.nn.one_hot(labels, c, dtype=dtype)


def checks_bce(case: Case) -> list[Check]:
  """gamma = 0, alpha None: sigmoid_focal vs BCE-with-logits on ``y (1 - eps) + eps / 2``,
  in torch (any reduction but mean_positive, no mask) and optax (per element).

  The anchors get the smoothed labels rounded to the logits' dtype, so float32 and float64
  only (in half precision that rounding would be an error of the anchor's own).
  """
  import optax
  import torch
  import torch.nn.functional as F
  assert case.fn == "sigmoid_focal" and case.gamma == 0 and case.alpha is None
  assert case.mask == "none" and case.reduction != "mean_positive"
  assert case.dtype in ("float32", "float64")
  inputs = make_inputs(case)
  eps = case.label_smoothing
  y = inputs.labels * (1 - eps) + eps / 2
  tol = tolerance(case.dtype).doubled()
  outs = _both(case, inputs)
  yt = torch.from_numpy(y)
  t_anchor = _torch_anchor(
      lambda x: F.binary_cross_entropy_with_logits(x, yt.to(x.dtype), reduction=case.reduction),
      inputs.logits, case.dtype, inputs.cotangent)
  checks = [measure(_row(p, TORCH_BCE), case.dtype, case.describe(), o, t_anchor, tol,
                    expect_dtype=case.dtype) for p, o in outs.items()]
  if case.reduction == "none":
    o_anchor = _jax_anchor(lambda x: optax.sigmoid_binary_cross_entropy(x, _as(y, x.dtype)),
                           inputs.logits, case.dtype, inputs.cotangent)
    checks += [measure(_row(p, OPTAX_BCE), case.dtype, case.describe(), o, o_anchor, tol,
                       expect_dtype=case.dtype) for p, o in outs.items()]
  return checks


def _as(y: np.ndarray, dtype):
  import jax.numpy as jnp
  return jnp.asarray(y, dtype)


# ----------------------------------------------------------------------------- imbalanced-losses


def checks_imbalanced(case: Case) -> list[Check]:
  """softmax_focal vs ``SoftmaxFocalLoss`` / sigmoid_focal vs ``SigmoidFocalLoss``.

  Class axis 1 (their convention); softmax: mask none or ignore; sigmoid: no mask, no
  smoothing, reduction none / mean / sum. imbalanced-losses stores alpha in float32, so the
  cases use float32-exact alphas.
  """
  import imbalanced_losses as il
  import torch
  inputs = make_inputs(case)
  a = inputs.kwargs["alpha"]
  if case.fn == "softmax_focal":
    assert case.axis in (1, 1 - len(case.shape)) and case.mask in ("none", "ignore")
    assert not isinstance(case.gamma, tuple)
    module = il.SoftmaxFocalLoss(alpha=None if a is None else torch.from_numpy(a),
                                 gamma=case.gamma, reduction=case.reduction,
                                 label_smoothing=case.label_smoothing,
                                 ignore_index=IGNORE_INDEX,
                                 background_class=case.background_class,
                                 gather_distributed=False)
    labels = torch.from_numpy(inputs.labels)
    fn = lambda x: module(x, labels)
    name = IMB_SOFTMAX
  else:
    assert case.fn == "sigmoid_focal" and case.mask == "none" and not case.label_smoothing
    assert case.reduction != "mean_positive"
    module = il.SigmoidFocalLoss(alpha=-1 if a is None else a, gamma=case.gamma,
                                 reduction=case.reduction, gather_distributed=False)
    yt = torch.from_numpy(inputs.labels)
    fn = lambda x: module(x, yt.to(x.dtype))
    name = IMB_SIGMOID
  anchor = _torch_anchor(fn, inputs.logits, case.dtype, inputs.cotangent)
  floor = _prob_floor(case, inputs)
  return [measure(_row(p, name), case.dtype, case.describe(), o, anchor,
                  prob_tolerance(case.dtype), floor=floor, expect_dtype=case.dtype)
          for p, o in _both(case, inputs).items()]
