"""focal_jax and focal_torch agree on the loss and on its gradient w.r.t. the logits, and each
agrees with the float64 reference, for any call both accept (one kwargs dict drives both).

Hypothesis draws the function, layout and class axis (incl. (N, C, H, W) at axis 1), dtype
(float64, float32, bfloat16, float16), alpha (None, scalar, (C,)), gamma (scalar or (C,)),
label smoothing, masks (``where`` and ``ignore_index``), reduction, background class, the
logits' scale and values. Tolerances: ``parity_tests.tolerances``.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given

from parity_tests import strategies
from parity_tests.cases import Case, make_inputs, torch_kwargs
from parity_tests.compare import JAX_VS_REF, JAX_VS_TORCH, TORCH_VS_REF, checks_cross_framework


def _assert_all_ok(checks):
  assert checks, "no comparison ran"
  bad = [c.message() for c in checks if not c.ok]
  assert not bad, "\n".join(bad)


@given(strategies.cases(fns=("softmax_focal",)))
def test_softmax_focal_jax_and_torch_agree_on_loss_and_grad(case):
  _assert_all_ok(checks_cross_framework(case))


@given(strategies.cases(fns=("sigmoid_focal",)))
def test_sigmoid_focal_jax_and_torch_agree_on_loss_and_grad(case):
  _assert_all_ok(checks_cross_framework(case))


@given(strategies.cases(fns=("categorical_focal",)))
def test_categorical_focal_jax_and_torch_agree_on_loss_and_grad(case):
  _assert_all_ok(checks_cross_framework(case))


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("fn", ["softmax_focal", "sigmoid_focal", "categorical_focal"])
def test_both_packages_return_the_input_dtype_for_value_and_grad(fn, dtype):
  case = Case(fn, (2, 5, 3, 3), axis=1, dtype=dtype, reduction="mean", mask="where", seed=3)
  checks = checks_cross_framework(case)
  _assert_all_ok(checks)
  assert [c.comparison for c in checks] == [JAX_VS_TORCH, JAX_VS_REF, TORCH_VS_REF]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_is_float64_whatever_the_input_dtype(dtype):
  from parity_tests.compare import run_case, run_reference
  ref = run_case(run_reference, Case("softmax_focal", (16, 7), dtype=dtype))
  assert ref.value_dtype == ref.grad_dtype == "float64"


def test_one_kwargs_dict_differs_only_in_axis_spelling():
  case = Case("softmax_focal", (2, 5, 3, 3), axis=1, alpha=(0.5,) * 5, mask="both",
              label_smoothing=0.1, reduction="mean_positive", background_class=2)
  kw = make_inputs(case).kwargs
  tkw = torch_kwargs(kw)
  assert set(kw) - {"axis"} == set(tkw) - {"dim"} and kw["axis"] == tkw["dim"] == 1
  # Every keyword is passed explicitly, including the ones whose defaults differ.
  assert {"reduction", "ignore_index", "alpha", "gamma", "where"} <= set(kw)
  for k in set(kw) - {"axis"}:
    a, b = kw[k], tkw[k]
    np.testing.assert_array_equal(np.asarray(a if a is not None else np.nan),
                                  np.asarray(b if b is not None else np.nan))


def test_a_real_difference_fails_the_comparison():
  """The comparison can fail: a 1-ulp-of-bfloat16 nudge to one logit in float64 is caught."""
  from parity_tests.compare import Output, measure, run_case, run_jax, run_reference
  from parity_tests.tolerances import tolerance
  case = Case("softmax_focal", (16, 7), dtype="float64", reduction="none", seed=5)
  inputs = make_inputs(case)
  ref = run_case(run_reference, case, inputs)
  nudged = dataclasses.replace(inputs, logits=inputs.logits * (1 + 2.0**-8))
  jax_out = run_case(run_jax, case, nudged)
  check = measure("nudged", "float64", "", jax_out, ref, tolerance("float64"))
  assert not check.ok and check.value_rel > 1e3 * check.tol.value
  same = measure("same", "float64", "", run_case(run_jax, case, inputs), ref,
                 tolerance("float64"))
  assert same.ok
  assert isinstance(ref, Output)


@pytest.mark.parametrize("reduction", ["mean", "mean_positive"])  # the ones that divide
@pytest.mark.parametrize("fn", ["softmax_focal", "sigmoid_focal", "categorical_focal"])
def test_fully_masked_batch_gives_zero_loss_and_zero_grad_in_both(fn, reduction):
  from parity_tests.compare import run_case, run_jax, run_torch
  case = Case(fn, (16, 7), dtype="float32", reduction=reduction, mask="where", seed=11)
  inputs = make_inputs(case)
  inputs.kwargs["where"] = np.zeros_like(inputs.kwargs["where"])
  for runner in (run_jax, run_torch):
    out = run_case(runner, case, inputs)
    np.testing.assert_array_equal(out.value, 0.0)
    np.testing.assert_array_equal(out.grad, 0.0)
