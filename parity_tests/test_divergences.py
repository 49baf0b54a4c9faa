"""The documented divergences from DeepSpeed's ``FocalLoss``, each tested both ways: DeepSpeed
still does the odd thing (the test fails if the divergence disappears) and the project equals
the float64 truth (the test fails if the divergence grows).

- 1-D alpha: DeepSpeed broadcasts (N,) against (N, 1) into N x N: mean(alpha_t) * mean(f);
  the project (and the drop-in) weigh per class.
- Saturation: wrong by >= ~89 in float32, DeepSpeed gives inf loss / NaN gradients; the
  project is finite and equal to float64.
- 0 < gamma < 1 and p -> 1 (right by >= ~17 in float32): DeepSpeed's gradient is NaN; the
  project's is finite and equal to float64.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from parity_tests.deepspeed_checks import (DIVERGES, DS_NAN_GRAD, DS_NONFINITE,
                                           DS_VEC_BROADCAST, DS_VEC_NOT_PER_CLASS, DSConfig,
                                           broadcast_value, checks_oracle, checks_recorded,
                                           checks_saturation, checks_small_gamma,
                                           make_ds_inputs, run_oracle)
from parity_tests.golden import load_deepspeed_cases

CASES = load_deepspeed_cases()
VECTOR = [c for c in CASES if c.alpha_kind == "vec"]
OVERFLOW = [c for c in CASES if not c.finite]


def _assert_all_ok(checks):
  bad = [c.message() for c in checks if not c.ok]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("case", VECTOR, ids=lambda c: f"case{c.case}-{c.dtype}")
def test_recorded_vector_alpha_is_broadcast_in_deepspeed_and_per_class_in_project(case):
  checks = checks_recorded(case)
  names = [c.comparison for c in checks]
  assert names[0] == DS_VEC_BROADCAST
  assert (DS_VEC_NOT_PER_CLASS in names) == (case.logits.shape[0] > 1)
  _assert_all_ok(checks)


def test_vector_alpha_divergence_matches_the_documented_numbers():
  """docs/design.md: mean(alpha_t) * mean(f) = 0.364 where per class gives 0.512 (two examples)."""
  logits = np.array([[0.0, 0.0], [0.0, 0.0]])  # p = 1/2, f = (1/2)**2 * log 2 for both rows
  targets = np.array([0, 1])
  alpha = np.array([0.25, 1.75])
  ds = run_oracle(logits, targets, alpha, 2.0, True, "float64").value
  f = 0.25 * np.log(2)
  np.testing.assert_allclose(ds, broadcast_value(logits, targets, alpha, 2.0, True), rtol=1e-15)
  np.testing.assert_allclose(ds, np.mean(alpha) * f, rtol=1e-15)
  # The mean of alpha_t is the same here, so take unequal per-example focal terms:
  logits = np.array([[2.0, 0.0], [0.0, 0.0]])
  ds = run_oracle(logits, targets, alpha, 2.0, True, "float64").value
  p = np.array([1 / (1 + np.exp(-2.0)), 0.5])
  fv = (1 - p) ** 2 * -np.log(p)
  np.testing.assert_allclose(ds, np.mean(alpha) * np.mean(fv), rtol=1e-14)
  assert not np.isclose(ds, np.mean(alpha * fv), rtol=1e-3)


@given(st.integers(0, 2**31 - 1), st.sampled_from(["float32", "float64"]), st.booleans())
def test_vector_alpha_divergence_on_random_inputs(seed, dtype, size_average):
  checks = checks_oracle(DSConfig(n=16, c=7, dtype=dtype, alpha_kind="vec", gamma=2.0,
                                  size_average=size_average, seed=seed))
  assert DS_VEC_NOT_PER_CLASS in [c.comparison for c in checks]
  _assert_all_ok(checks)


@pytest.mark.parametrize("case", OVERFLOW, ids=lambda c: f"case{c.case}")
def test_recorded_overflow_is_nonfinite_in_deepspeed_and_true_in_project(case):
  checks = checks_recorded(case)
  assert checks[0].comparison == DS_NONFINITE and checks[0].note == DIVERGES
  _assert_all_ok(checks)


@pytest.mark.parametrize("margin", [-100.0, -1e3, -1e4])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_saturation_deepspeed_overflows_project_matches_float64(margin, gamma):
  checks = checks_saturation(DSConfig(n=16, c=7, alpha_kind="col", gamma=gamma, scale=1.0,
                                      margin=margin, seed=int(-margin) + int(gamma)))
  assert checks[0].comparison == DS_NONFINITE
  _assert_all_ok(checks)


def test_saturation_onset_is_where_design_says():
  """DeepSpeed float32: finite gradient at a wrong margin of 80, NaN from ~89; loss inf from
  ~104 (so the divergence is where docs/design.md puts it, not somewhere else)."""
  def oracle_at(margin):
    x, t, a = make_ds_inputs(DSConfig(n=1, c=2, margin=margin, scale=0.0))
    return run_oracle(x, t, a, 2.0, True, "float32")
  assert np.isfinite(oracle_at(-80.0).grad).all()
  assert np.isnan(oracle_at(-90.0).grad).any() and np.isfinite(oracle_at(-90.0).value)
  assert np.isinf(oracle_at(-105.0).value)


@pytest.mark.parametrize("margin", [20.0, 100.0, 1e4])
@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.75])
def test_small_gamma_deepspeed_nan_grad_project_finite_and_true(margin, gamma):
  checks = checks_small_gamma(DSConfig(n=16, c=7, alpha_kind="none", gamma=gamma, scale=1.0,
                                       margin=margin, seed=int(margin) % 97))
  assert checks[0].comparison == DS_NAN_GRAD
  _assert_all_ok(checks)


def test_small_gamma_deepspeed_is_finite_before_p_rounds_to_one():
  x, t, a = make_ds_inputs(DSConfig(n=1, c=2, margin=12.0, scale=0.0))
  assert np.isfinite(run_oracle(x, t, a, 0.5, True, "float32").grad).all()
  x, t, a = make_ds_inputs(DSConfig(n=1, c=2, margin=18.0, scale=0.0))
  assert np.isnan(run_oracle(x, t, a, 0.5, True, "float32").grad).any()


def test_dropin_keeps_deepspeed_signature_and_per_class_alpha():
  import focal_torch
  x = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
  t = torch.tensor([0, 1])
  col = focal_torch.FocalLoss(2, alpha=torch.tensor([[0.25], [1.75]], dtype=torch.float64))(x, t)
  vec = focal_torch.FocalLoss(2, alpha=torch.tensor([0.25, 1.75], dtype=torch.float64))(x, t)
  torch.testing.assert_close(col, vec, rtol=1e-15, atol=0)
