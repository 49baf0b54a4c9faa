"""The nn.Module wrappers: buffers in state_dict that follow .double()/.to(), forward equal
to the float64 NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import focal_torch


def test_softmax_module_buffers_follow_dtype_and_state_dict(ref):
  alpha = torch.tensor([0.25, 1.0, 2.0])
  gamma = torch.tensor([0.0, 0.5, 2.0])
  loss_fn = focal_torch.SoftmaxFocalLoss(alpha=alpha, gamma=gamma, label_smoothing=0.1)
  state = loss_fn.state_dict()
  assert set(state) == {"alpha", "gamma"}
  torch.testing.assert_close(state["alpha"], alpha)
  torch.testing.assert_close(state["gamma"], gamma)
  loss_fn.double()
  assert loss_fn.alpha.dtype == torch.float64 and loss_fn.gamma.dtype == torch.float64
  loss_fn.to(torch.float32)
  assert loss_fn.alpha.dtype == torch.float32
  loss_fn.to("cpu", torch.float64)
  assert loss_fn.alpha.dtype == torch.float64

  rng = np.random.default_rng(0)
  logits, labels = rng.normal(0, 2, (6, 3, 2)), rng.integers(0, 3, (6, 2))
  z = torch.tensor(logits, requires_grad=True)
  loss = loss_fn(z, torch.tensor(labels))
  loss.backward()
  want, want_grad = ref.softmax_focal(logits, labels, alpha=alpha.numpy(), gamma=gamma.numpy(),
                                      label_smoothing=0.1)
  np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
  np.testing.assert_allclose(z.grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


def test_state_dict_round_trip_changes_the_loss(ref):
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(0, 2, (5, 4)), rng.integers(0, 4, 5)
  source = focal_torch.SoftmaxFocalLoss(
      alpha=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
  target = focal_torch.SoftmaxFocalLoss(alpha=torch.ones(4, dtype=torch.float64))
  target.load_state_dict(source.state_dict())
  loss = target(torch.tensor(logits), torch.tensor(labels))
  want, _ = ref.softmax_focal(logits, labels, alpha=np.array([1.0, 2.0, 3.0, 4.0]))
  np.testing.assert_allclose(loss.item(), want, rtol=1e-12)


def test_scalar_alpha_is_a_buffer_and_none_is_not():
  assert set(focal_torch.SigmoidFocalLoss(alpha=0.25).state_dict()) == {"alpha"}
  assert focal_torch.SigmoidFocalLoss(alpha=0.25).double().alpha.dtype == torch.float64
  assert set(focal_torch.SoftmaxFocalLoss().state_dict()) == set()
  assert focal_torch.SoftmaxFocalLoss().alpha is None
  assert focal_torch.SoftmaxFocalLoss(gamma=1.5).gamma == 1.5  # a number stays a number


def test_sigmoid_module_matches_reference(ref):
  rng = np.random.default_rng(2)
  logits, labels = rng.normal(0, 2, (4, 3, 5)), (rng.random((4, 3, 5)) < 0.3).astype(float)
  where = rng.random((4, 3, 5)) < 0.9
  loss_fn = focal_torch.SigmoidFocalLoss(alpha=0.25, gamma=torch.tensor([0.0, 1.0, 2.0]),
                                         reduction="mean_positive", dim=1).double()
  z = torch.tensor(logits, requires_grad=True)
  loss = loss_fn(z, torch.tensor(labels), where=torch.tensor(where))
  loss.backward()
  want, want_grad = ref.sigmoid_focal(logits, labels, alpha=0.25, gamma=[0.0, 1.0, 2.0],
                                      reduction="mean_positive", where=where)
  np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
  np.testing.assert_allclose(z.grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


def test_categorical_module_matches_reference(ref):
  rng = np.random.default_rng(3)
  logits, targets = rng.normal(0, 2, (6, 4)), rng.dirichlet(np.ones(4), 6)
  alpha = np.array([0.5, 1.0, 1.5, 2.0])
  loss_fn = focal_torch.CategoricalFocalLoss(alpha=torch.tensor(alpha), gamma=0.5,
                                             reduction="sum")
  assert set(loss_fn.state_dict()) == {"alpha"}
  z = torch.tensor(logits, requires_grad=True)
  loss = loss_fn(z, torch.tensor(targets))
  loss.backward()
  want, want_grad = ref.categorical_focal(logits, targets, alpha=alpha, gamma=0.5,
                                          reduction="sum")
  np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
  np.testing.assert_allclose(z.grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_give_half_loss_computed_in_float32(ref, dtype):
  rng = np.random.default_rng(4)
  z = torch.tensor(rng.normal(0, 3, (16, 5))).to(dtype).requires_grad_()
  labels = torch.tensor(rng.integers(0, 5, 16))
  loss = focal_torch.SoftmaxFocalLoss(gamma=0.5)(z, labels)
  loss.backward()
  assert loss.dtype == dtype and z.grad.dtype == dtype
  want, want_grad = ref.softmax_focal(z.detach().double().numpy(), labels.numpy(), gamma=0.5)
  # One rounding of the float32 result to the half dtype.
  np.testing.assert_allclose(loss.double().item(), want, rtol=torch.finfo(dtype).eps)
  np.testing.assert_allclose(z.grad.double().numpy(), want_grad,
                             rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 1e-2)


def test_repr_shows_hyperparameters():
  text = repr(focal_torch.SoftmaxFocalLoss(gamma=1.0, reduction="sum"))
  assert "gamma=1.0" in text and "reduction='sum'" in text
