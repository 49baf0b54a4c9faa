"""Both packages agree with libraries users already trust, where the ground is common:
torchvision's ``sigmoid_focal_loss`` (recorded), ``optax.sigmoid_focal_loss``, torch and optax
cross-entropy at gamma = 0 (label smoothing included), BCE-with-logits on smoothed labels, and
imbalanced-losses' ``SoftmaxFocalLoss`` / ``SigmoidFocalLoss``."""

import dataclasses

import pytest
from hypothesis import given, strategies as st

from parity_tests import anchors, strategies
from parity_tests.cases import Case
from parity_tests.golden import load_torchvision_cases

TORCHVISION = load_torchvision_cases()
FLOATS = ("float32", "float64")


def _assert_all_ok(checks, expected_rows: int | None = None):
  assert checks, "no comparison ran"
  if expected_rows is not None:
    assert len(checks) == expected_rows
  bad = [c.message() for c in checks if not c.ok]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("rec", TORCHVISION[::6], ids=lambda r: f"case{r.case}")
def test_sigmoid_focal_matches_recorded_torchvision(rec):
  _assert_all_ok(anchors.checks_torchvision(rec), 2)


@given(strategies.cases(fns=("sigmoid_focal",), dtypes=FLOATS, reductions=("none",)))
def test_sigmoid_focal_matches_optax_sigmoid_focal_loss(case):
  case = dataclasses.replace(case, mask="none", label_smoothing=0.0)
  _assert_all_ok(anchors.checks_optax_sigmoid(case), 2)


@given(strategies.cases(fns=("softmax_focal",), dtypes=FLOATS,
                        reductions=("none", "sum", "mean")))
def test_gamma_zero_equals_torch_cross_entropy(case):
  mask = "ignore" if case.mask in ("ignore", "both") else "none"
  case = dataclasses.replace(case, gamma=0.0, alpha=None, mask=mask)
  _assert_all_ok(anchors.checks_cross_entropy(case))


@pytest.mark.parametrize("dtype", FLOATS)
def test_gamma_zero_with_alpha_equals_weighted_cross_entropy_sum(dtype):
  case = Case("softmax_focal", (16, 7), dtype=dtype, gamma=0.0,
              alpha=tuple(0.25 * (i + 1) for i in range(7)), reduction="sum", mask="ignore")
  _assert_all_ok(anchors.checks_cross_entropy(case), 2)


@given(strategies.cases(fns=("softmax_focal", "categorical_focal"), dtypes=FLOATS,
                        reductions=("none",)))
def test_gamma_zero_equals_optax_cross_entropy_with_smoothing(case):
  case = dataclasses.replace(case, gamma=0.0, alpha=None, mask="none")
  checks = anchors.checks_cross_entropy(case)
  assert any(anchors.OPTAX_CE in c.comparison for c in checks)
  _assert_all_ok(checks)


@given(strategies.cases(fns=("sigmoid_focal",), dtypes=FLOATS,
                        reductions=("none", "sum", "mean")))
def test_sigmoid_gamma_zero_equals_bce_on_labels_smoothed_toward_half(case):
  case = dataclasses.replace(case, gamma=0.0, alpha=None, mask="none")
  _assert_all_ok(anchors.checks_bce(case))


@given(strategies.cases(fns=("softmax_focal",), dtypes=FLOATS, scales=(0.5, 3.0)),
       st.sampled_from([((16, 7), 1), ((2, 5, 3, 3), 1)]))
def test_softmax_focal_matches_imbalanced_losses(case, layout):
  """(N, C) and (N, C, H, W) with dim 1; ignore_index, smoothing, mean_positive with a
  background class. imbalanced-losses forms (1 - p)**gamma from p (NaN gradients as p -> 1
  for gamma < 1), so gamma is 0 or >= 1 and the logits moderate."""
  shape, axis = layout
  c = shape[1]
  gamma = case.gamma if not isinstance(case.gamma, tuple) else 2.0
  gamma = gamma if gamma == 0 or gamma >= 1 else gamma + 1
  alpha = case.alpha if isinstance(case.alpha, tuple) and len(case.alpha) == c else None
  mask = "ignore" if case.mask in ("ignore", "both") else "none"
  case = dataclasses.replace(case, shape=shape, axis=axis, gamma=gamma, alpha=alpha, mask=mask,
                             background_class=min(case.background_class, c - 1))
  _assert_all_ok(anchors.checks_imbalanced(case), 2)


@given(strategies.cases(fns=("sigmoid_focal",), dtypes=FLOATS,
                        reductions=("none", "sum", "mean"), scales=(0.5, 3.0)))
def test_sigmoid_focal_matches_imbalanced_losses(case):
  gamma = case.gamma if case.gamma == 0 or case.gamma >= 1 else case.gamma + 1
  case = dataclasses.replace(case, mask="none", label_smoothing=0.0, gamma=gamma)
  _assert_all_ok(anchors.checks_imbalanced(case), 2)
