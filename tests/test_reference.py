"""The shared references (``focal_reference``) against what they stand for.

The loss formulas are checked where they are used (every test of focal_jax and focal_torch
compares with them, and the parity suite checks the DeepSpeed oracle against the recorded
module); this file checks what is checked nowhere else: torchvision's algorithm as written out
for the benchmarks reproduces the values recorded from torchvision itself, and one formula gives
the same numbers in NumPy, torch and jax.numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import focal_reference
from focal_reference.torchvision import sigmoid_focal_loss
from parity_tests.golden import load_torchvision_cases

CASES = load_torchvision_cases()
TOL = {np.dtype(np.float64): dict(rtol=1e-12, atol=1e-15),
       np.dtype(np.float32): dict(rtol=1e-5, atol=1e-7)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"case{c.case}-{c.dtype}")
def test_torchvision_algorithm_reproduces_recorded_torchvision(case):
  x = torch.tensor(case.logits, requires_grad=True)
  y = torch.tensor(case.labels, dtype=x.dtype)
  out = sigmoid_focal_loss(x, y, alpha=case.alpha, gamma=case.gamma, reduction=case.reduction)
  out.backward(torch.tensor(case.cotangent, dtype=x.dtype))
  np.testing.assert_allclose(out.detach().numpy(), case.loss, **TOL[case.dtype])
  np.testing.assert_allclose(x.grad.numpy(), case.grad, **TOL[case.dtype])


def test_torchvision_algorithm_rejects_an_unknown_reduction():
  with pytest.raises(ValueError, match="reduction"):
    sigmoid_focal_loss(torch.zeros(2), torch.zeros(2), reduction="mean_positive")


@pytest.mark.parametrize("name", sorted(focal_reference.FUNCTIONS))
def test_one_formula_in_numpy_torch_and_jax(name):
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 5)) * 3
  if name == "softmax_focal":
    y = rng.integers(0, 5, 6)
  elif name == "sigmoid_focal":
    y = rng.random((6, 5))
  else:
    y = rng.dirichlet(np.ones(5), 6)
  fn = focal_reference.FUNCTIONS[name]
  kw = dict(gamma=0.5, reduction="none")
  want = fn(z, y, **kw)
  assert isinstance(want, np.ndarray) and want.dtype == np.float64
  got_torch = fn(torch.tensor(z), y, **kw)
  assert isinstance(got_torch, torch.Tensor)
  np.testing.assert_allclose(got_torch.numpy(), want, rtol=1e-14)
  np.testing.assert_allclose(np.asarray(fn(jnp.asarray(z), y, **kw)), want, rtol=1e-14)


def test_out_of_range_label_gives_nan_and_masked_rows_give_zero():
  z = np.array([[1.0, 2.0, 3.0], [np.nan, 0.0, 0.0], [0.0, 1.0, 0.0]])
  t = np.array([3, 0, -100])
  got = focal_reference.softmax_focal(z, t, where=np.array([True, False, True]),
                                      ignore_index=-100)
  assert np.isnan(got[0]) and got[1] == 0.0 and got[2] == 0.0
  x = torch.tensor(z, requires_grad=True)
  focal_reference.softmax_focal(x, t, where=np.array([True, False, True]), ignore_index=-100,
                                reduction="none")[1:].sum().backward()
  np.testing.assert_array_equal(x.grad.numpy()[1:], 0.0)
