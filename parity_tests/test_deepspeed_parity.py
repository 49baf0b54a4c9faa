"""Both packages (and the torch drop-in ``FocalLoss``) agree with DeepSpeed's ``FocalLoss``:
on every recorded case where DeepSpeed is finite and per-class, and, through the oracle, on
arbitrary inputs where DeepSpeed is finite. Divergent cases are in test_divergences.py."""

import pytest
from hypothesis import assume, given

from parity_tests import strategies
from parity_tests.deepspeed_checks import (DROPIN_VS_DS, DROPIN_VS_ORACLE, JAX_VS_DS,
                                           JAX_VS_ORACLE, TORCH_VS_DS, TORCH_VS_ORACLE,
                                           checks_oracle, checks_recorded)
from parity_tests.golden import load_deepspeed_cases

AGREEING = [c for c in load_deepspeed_cases() if c.finite and c.alpha_kind != "vec"]


def _assert_all_ok(checks):
  bad = [c.message() for c in checks if not c.ok]
  assert not bad, "\n".join(bad)


def test_recorded_cases_split_into_agreeing_and_divergent():
  assert len(AGREEING) == 28  # 42 minus 12 with 1-D alpha minus 2 overflows


@pytest.mark.parametrize("case", AGREEING, ids=lambda c: f"case{c.case}-{c.alpha_kind}-{c.dtype}")
def test_project_matches_recorded_deepspeed_loss_and_grad(case):
  checks = checks_recorded(case)
  assert [c.comparison for c in checks] == [JAX_VS_DS, TORCH_VS_DS, DROPIN_VS_DS]
  _assert_all_ok(checks)


@given(strategies.deepspeed_configs())
def test_project_matches_deepspeed_oracle_where_deepspeed_is_finite(cfg):
  checks = checks_oracle(cfg)
  assume(checks)  # [] where the oracle is not finite (the divergences cover that region)
  assert [c.comparison for c in checks] == [JAX_VS_ORACLE, TORCH_VS_ORACLE, DROPIN_VS_ORACLE]
  _assert_all_ok(checks)
