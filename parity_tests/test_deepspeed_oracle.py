"""The DeepSpeed oracle reproduces every case recorded from the real DeepSpeed module."""

import numpy as np
import pytest
import torch

from focal_reference.deepspeed import DeepSpeedFocalLoss, implicit_softmax_dim
from parity_tests.golden import load_deepspeed_cases

CASES = load_deepspeed_cases()
# Same ops in the same order as the recorded module: only the CPU's vector width may move the
# last bits of a softmax sum, so a few ulps of each dtype.
_RTOL = {np.dtype(np.float32): 4e-6, np.dtype(np.float64): 1e-13}


def _run_oracle(case):
  x = torch.tensor(case.logits, requires_grad=True)
  alpha = None if case.alpha is None else torch.tensor(case.alpha)
  module = DeepSpeedFocalLoss(case.logits.shape[1], alpha, case.gamma, case.size_average)
  loss = module(x, torch.tensor(case.targets))
  loss.backward()
  return loss.detach().numpy(), x.grad.numpy()


def test_all_recorded_cases_are_loaded():
  assert len(CASES) == 42
  assert {c.alpha_kind for c in CASES} == {"none", "col", "vec"}
  assert any(not c.finite for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"case{c.case}-{c.alpha_kind}-{c.dtype}")
def test_oracle_reproduces_recorded_loss_and_grad(case):
  loss, grad = _run_oracle(case)
  assert loss.dtype == case.loss.dtype and grad.dtype == case.grad.dtype
  # The same entries are non-finite (inf loss, NaN gradients at large margins) ...
  np.testing.assert_array_equal(np.isfinite(loss), np.isfinite(case.loss))
  np.testing.assert_array_equal(np.isnan(grad), np.isnan(case.grad))
  assert bool(np.isfinite(loss)) == case.loss_finite
  assert bool(np.isfinite(grad).all()) == case.grad_finite
  # ... and the rest agree to a few ulps (inf compares equal to inf).
  rtol = _RTOL[case.dtype]
  np.testing.assert_allclose(loss, case.loss, rtol=rtol, atol=0)
  ok = np.isfinite(case.grad)
  scale = max(1.0, float(np.abs(case.grad[ok]).max(initial=0.0)))
  np.testing.assert_allclose(grad[ok], case.grad[ok], rtol=rtol, atol=rtol * scale)


def test_vector_alpha_broadcasts_to_n_by_n_like_the_recorded_module():
  case = next(c for c in CASES if c.alpha_kind == "vec" and c.logits.shape[0] > 1)
  x = torch.tensor(case.logits)
  t = torch.tensor(case.targets)
  col = DeepSpeedFocalLoss(x.shape[1], torch.tensor(case.alpha).view(-1, 1), case.gamma,
                           case.size_average)(x, t)
  vec = DeepSpeedFocalLoss(x.shape[1], torch.tensor(case.alpha), case.gamma,
                           case.size_average)(x, t)
  # The recorded value is the broadcast one, not the per-class one.
  np.testing.assert_allclose(vec.numpy(), case.loss, rtol=_RTOL[case.dtype])
  assert not np.isclose(col.numpy(), case.loss, rtol=1e-3)


@pytest.mark.parametrize("ndim,expected", [(0, 0), (1, 0), (2, 1), (3, 0), (4, 1)])
def test_implicit_softmax_dim_matches_torch_legacy_rule(ndim, expected):
  assert implicit_softmax_dim(ndim) == expected
  x = torch.randn([3] * ndim, dtype=torch.float64)
  with pytest.warns(UserWarning, match="Implicit dimension"):
    legacy = torch.nn.functional.softmax(x)  # no dim: the call DeepSpeed makes
  torch.testing.assert_close(legacy, torch.softmax(x, dim=expected), rtol=0, atol=0)
