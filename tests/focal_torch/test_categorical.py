"""categorical_focal against keras' formula in NumPy (float64), F.cross_entropy with
probability targets at gamma=0, gradcheck/gradgradcheck, extreme margins."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import focal_torch
from focal_torch import _chunking

REDUCTIONS = ["none", "sum", "mean", "mean_positive"]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gamma_zero_equals_cross_entropy_with_probability_targets(ref, reduction):
  g = torch.Generator().manual_seed(0)
  z = (3 * torch.randn(5, 4, 3, generator=g, dtype=torch.float64)).requires_grad_()
  y = torch.softmax(torch.randn(5, 4, 3, generator=g, dtype=torch.float64), dim=1)
  ours = focal_torch.categorical_focal(z, y, gamma=0.0, reduction=reduction)
  theirs = F.cross_entropy(z, y, reduction=reduction)
  torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
  torch.testing.assert_close(ref.grad(ours, z), ref.grad(theirs, z), rtol=1e-12, atol=1e-12)


@st.composite
def categorical_cases(draw):
  ndim = draw(st.integers(1, 4))
  shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
  dim = draw(st.integers(-ndim, ndim - 1))
  shape[dim] = draw(st.integers(2, 6))
  c = shape[dim]
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  alpha = draw(st.sampled_from([None, 0.5, "vector"]))
  if alpha == "vector":
    alpha = rng.uniform(0.1, 2, c)
  gamma = draw(st.sampled_from([0.0, 0.5, 2.0, "vector"]))
  if gamma == "vector":
    gamma = rng.choice([0.0, 0.5, 2.0, 3.0], c)
  targets = np.moveaxis(rng.dirichlet(np.full(c, 0.5), tuple(
      s for i, s in enumerate(shape) if i != dim % ndim)), -1, dim)
  row_shape = tuple(s for i, s in enumerate(shape) if i != dim % ndim)
  return dict(
      logits=rng.normal(0, draw(st.sampled_from([0.5, 3.0, 10.0])), shape), targets=targets,
      alpha=alpha, gamma=gamma, dim=dim,
      where=rng.random(row_shape) < 0.8 if draw(st.booleans()) else None,
      reduction=draw(st.sampled_from(REDUCTIONS)),
      background_class=draw(st.integers(0, c - 1)),
      dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])))


@hypothesis.given(categorical_cases())
def test_matches_keras_formula_in_numpy(ref, case):
  dtype = case["dtype"]
  z = torch.tensor(case["logits"], dtype=dtype, requires_grad=True)
  y = torch.tensor(case["targets"], dtype=dtype)
  kw = {k: case[k] for k in ("alpha", "gamma", "dim", "reduction", "background_class")}
  tkw = {k: torch.tensor(v, dtype=dtype) if isinstance(v, np.ndarray) else v
         for k, v in kw.items()}
  if case["where"] is not None:
    tkw["where"] = torch.tensor(case["where"])
  loss = focal_torch.categorical_focal(z, y, **tkw)
  want, want_grad = ref.categorical_focal(z.detach().double().numpy(), y.double().numpy(),
                                          where=case["where"], **kw)
  assert loss.dtype == dtype
  np.testing.assert_allclose(loss.detach().double().numpy(), want, **ref.TOL[dtype])
  np.testing.assert_allclose(ref.grad(loss, z).double().numpy(), want_grad, **ref.TOL[dtype])


def test_one_hot_targets_match_softmax_focal_reference(ref):
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(0, 3, (7, 5)), rng.integers(0, 5, 7)
  alpha, gamma = rng.uniform(0.2, 1, 5), rng.choice([0.0, 0.5, 2.0], 5)
  z = torch.tensor(logits, requires_grad=True)
  loss = focal_torch.categorical_focal(z, F.one_hot(torch.tensor(labels), 5).double(),
                                       alpha=torch.tensor(alpha), gamma=torch.tensor(gamma))
  want, want_grad = ref.softmax_focal(logits, labels, alpha=alpha, gamma=gamma)
  np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
  np.testing.assert_allclose(ref.grad(loss, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gamma", [2.0, 0.5, "vector"])
def test_gradcheck_and_gradgradcheck_float64(gamma):
  g = torch.Generator().manual_seed(2)
  z = (2 * torch.randn(4, 3, generator=g, dtype=torch.float64)).requires_grad_()
  y = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), 1)
  if gamma == "vector":
    gamma = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
  where = torch.tensor([True, False, True, True])
  for reduction in ("none", "mean"):
    fn = lambda z: focal_torch.categorical_focal(z, y, gamma=gamma, alpha=0.7, where=where,
                                                 reduction=reduction)
    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))


def test_create_graph_gradient_matches_numpy_reference(ref):
  rng = np.random.default_rng(3)
  logits, targets = rng.normal(0, 3, (5, 4)), rng.dirichlet(np.ones(4), 5)
  z = torch.tensor(logits, requires_grad=True)
  grad = ref.grad(focal_torch.categorical_focal(z, torch.tensor(targets), gamma=0.5), z,
               create_graph=True)
  np.testing.assert_allclose(grad.detach().numpy(),
                             ref.categorical_focal(logits, targets, gamma=0.5)[1],
                             rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("margin", [30.0, 100.0, 1e4])
def test_finite_at_extreme_margins(ref, dtype, gamma, margin):
  z = torch.tensor([[margin, 0.0, -margin], [-margin, margin, 0.0]], dtype=dtype)
  y = torch.tensor([[0.9, 0.1, 0.0], [1.0, 0.0, 0.0]], dtype=dtype)
  zz = z.clone().requires_grad_()
  loss = focal_torch.categorical_focal(zz, y, gamma=gamma, reduction="none")
  grad = ref.grad(loss, zz)
  assert loss.dtype == dtype and grad.dtype == dtype
  assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
  want = ref.categorical_focal(z.double().numpy(), y.double().numpy(), gamma=gamma,
                               reduction="none")[0]
  rounded = torch.tensor(want).to(dtype).double().numpy()
  np.testing.assert_allclose(loss.detach().double().numpy(), rounded, rtol=2 ** -7)


def test_mean_positive_uses_argmax_of_targets(ref):
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (6, 3))
  targets = np.eye(3)[[0, 1, 0, 2, 0, 0]] * 0.8 + 0.2 / 3
  z = torch.tensor(logits)
  per_row = ref.categorical_focal(logits, targets, reduction="none")[0]
  loss = focal_torch.categorical_focal(z, torch.tensor(targets), reduction="mean_positive")
  np.testing.assert_allclose(loss.item(), per_row.sum() / 2, rtol=1e-12)
  loss = focal_torch.categorical_focal(z, torch.tensor(targets), reduction="mean_positive",
                                       background_class=2)
  np.testing.assert_allclose(loss.item(), per_row.sum() / 5, rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, 4, 5), (7, 4)], ids=["spatial", "rows"])
def test_small_chunks_match_reference(ref, monkeypatch, shape):
  monkeypatch.setattr(_chunking, "CHUNK_ELEMENTS", 5)
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 3, shape)
  targets = np.moveaxis(rng.dirichlet(np.ones(4), shape[:1] + shape[2:]), -1, 1)
  gamma = np.array([0.0, 0.5, 2.0, 3.0])
  z = torch.tensor(logits, requires_grad=True)
  loss = focal_torch.categorical_focal(z, torch.tensor(targets), gamma=torch.tensor(gamma),
                                       alpha=0.5)
  want, want_grad = ref.categorical_focal(logits, targets, gamma=gamma, alpha=0.5)
  np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
  np.testing.assert_allclose(ref.grad(loss, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_hessian_finite_at_extreme_margins(gamma):
  for margin in (30.0, 100.0, 1e4):
    z = torch.tensor([[margin, 0.0, -margin], [-margin, margin, 0.0]], requires_grad=True)
    y = torch.tensor([[0.9, 0.1, 0.0], [1.0, 0.0, 0.0]])
    hess = torch.autograd.functional.hessian(
        lambda z, y=y: focal_torch.categorical_focal(z, y, gamma=gamma), z)
    assert torch.isfinite(hess).all()
