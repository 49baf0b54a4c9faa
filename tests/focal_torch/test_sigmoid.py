"""sigmoid_focal against torchvision's formula written out in NumPy (float64), BCE at
gamma=0, gradcheck/gradgradcheck, and extreme margins in every dtype."""

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
def test_gamma_zero_no_alpha_equals_bce_with_logits(ref, reduction):
  g = torch.Generator().manual_seed(0)
  x = (4 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
  y = torch.rand(6, 5, generator=g, dtype=torch.float64)
  ours = focal_torch.sigmoid_focal(x, y, gamma=0.0, reduction=reduction)
  theirs = F.binary_cross_entropy_with_logits(x, y, reduction=reduction)
  torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
  torch.testing.assert_close(ref.grad(ours, x), ref.grad(theirs, x), rtol=1e-12, atol=1e-12)


@st.composite
def sigmoid_cases(draw):
  ndim = draw(st.integers(1, 4))
  shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  dim = draw(st.integers(-ndim, ndim - 1))
  c = shape[dim]
  alpha = draw(st.sampled_from([None, 0.25, 0.9, "vector"]))
  if alpha == "vector":
    alpha = rng.uniform(0, 1, c)
  gamma = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.7, "vector"]))
  if gamma == "vector":
    gamma = rng.choice([0.0, 0.5, 2.0], c)
  hard = draw(st.booleans())
  labels = (rng.random(shape) < 0.3).astype(np.float64) if hard else rng.random(shape)
  return dict(
      logits=rng.normal(0, draw(st.sampled_from([0.5, 3.0, 10.0])), shape), labels=labels,
      alpha=alpha, gamma=gamma, dim=dim,
      label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.6])),
      where=rng.random(shape) < 0.8 if draw(st.booleans()) else None,
      reduction=draw(st.sampled_from(REDUCTIONS)),
      dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
      label_dtype=draw(st.sampled_from(["float", "int", "bool"])) if hard else "float")


@hypothesis.given(sigmoid_cases())
def test_matches_torchvision_formula_in_numpy(ref, case):
  dtype = case["dtype"]
  x = torch.tensor(case["logits"], dtype=dtype, requires_grad=True)
  y = torch.tensor(case["labels"])
  y = {"float": y.to(dtype), "int": y.long(), "bool": y.bool()}[case["label_dtype"]]
  kw = {k: case[k] for k in ("alpha", "gamma", "dim", "label_smoothing", "reduction")}
  tkw = {k: torch.tensor(v, dtype=dtype) if isinstance(v, np.ndarray) else v
         for k, v in kw.items()}
  if case["where"] is not None:
    tkw["where"] = torch.tensor(case["where"])
  loss = focal_torch.sigmoid_focal(x, y, **tkw)
  want, want_grad = ref.sigmoid_focal(x.detach().double().numpy(),
                                      y.double().numpy(), where=case["where"], **kw)
  assert loss.dtype == dtype
  assert loss.shape == (x.shape if case["reduction"] == "none" else ())
  np.testing.assert_allclose(loss.detach().double().numpy(), want, **ref.TOL[dtype])
  np.testing.assert_allclose(ref.grad(loss, x).double().numpy(), want_grad, **ref.TOL[dtype])


@pytest.mark.parametrize("kw", [
    dict(gamma=2.0, alpha=0.25),
    dict(gamma=0.5, label_smoothing=0.2),
    dict(gamma=torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64),
         alpha=torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)),
], ids=["torchvision_default", "gamma05_smooth", "per_class"])
def test_gradcheck_and_gradgradcheck_float64(kw):
  g = torch.Generator().manual_seed(1)
  x = (2 * torch.randn(4, 3, generator=g, dtype=torch.float64)).requires_grad_()
  y = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.0, 1.0], [0.5, 1.0, 0.0], [0.9, 0.1, 1.0]],
                   dtype=torch.float64)
  where = torch.ones(4, 3, dtype=torch.bool)
  where[1, 1] = False
  for reduction in ("none", "mean_positive"):
    fn = lambda x: focal_torch.sigmoid_focal(x, y, where=where, reduction=reduction, **kw)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_create_graph_gradient_matches_numpy_reference(ref):
  rng = np.random.default_rng(2)
  logits, labels = rng.normal(0, 3, (5, 4)), rng.random((5, 4))
  x = torch.tensor(logits, requires_grad=True)
  kw = dict(gamma=0.5, alpha=0.3, label_smoothing=0.1)
  grad = ref.grad(focal_torch.sigmoid_focal(x, torch.tensor(labels), **kw), x, create_graph=True)
  np.testing.assert_allclose(grad.detach().numpy(), ref.sigmoid_focal(logits, labels, **kw)[1],
                             rtol=1e-10, atol=1e-14)


def _mp_truth(x: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
  mpmath = pytest.importorskip("mpmath")
  out = []
  with mpmath.workdps(50):
    for xi, yi in zip(x.ravel().tolist(), y.ravel().tolist()):
      xi = mpmath.mpf(xi)
      p, one_minus_p = 1 / (1 + mpmath.exp(-xi)), 1 / (1 + mpmath.exp(xi))  # no 1 - p
      bce = -(yi * mpmath.log(p) + (1 - yi) * mpmath.log(one_minus_p))
      one_minus_pt = yi * one_minus_p + (1 - yi) * p
      out.append(float((one_minus_pt ** gamma if gamma else 1) * bce))
  return np.array(out).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("margin", [30.0, 100.0, 1e4])
def test_finite_and_accurate_at_extreme_margins(ref, dtype, gamma, margin):
  x = torch.tensor([[margin, -margin, margin, -margin, 0.0]], dtype=dtype)
  y = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]], dtype=dtype)
  xx = x.clone().requires_grad_()
  loss = focal_torch.sigmoid_focal(xx, y, gamma=gamma, alpha=0.25, reduction="none")
  grad = ref.grad(loss, xx)
  assert loss.dtype == dtype and grad.dtype == dtype
  assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
  alpha_t = np.where(y.double().numpy() == 1, 0.25, 0.75)
  truth = alpha_t * _mp_truth(x.double().numpy(), y.double().numpy(), gamma)
  rounded = torch.tensor(truth).to(dtype).double().numpy()
  # Subnormal results (float32 margin 100) carry an absolute error of a few subnormal ulps.
  np.testing.assert_allclose(loss.detach().double().numpy(), rounded, rtol=2 ** -7,
                             atol=8 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_hessian_finite_at_extreme_margins(gamma):
  x = torch.tensor([30.0, -100.0, 1e4, -1e4, 0.0], requires_grad=True)
  y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.3])
  hess = torch.autograd.functional.hessian(
      lambda x: focal_torch.sigmoid_focal(x, y, gamma=gamma, label_smoothing=0.1), x)
  assert torch.isfinite(hess).all()


def test_mean_positive_counts_unsmoothed_positive_labels(ref):
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (4, 6))
  labels = np.zeros((4, 6))
  labels[0, 1] = labels[2, 3] = 1.0
  labels[3, 5] = 0.4  # soft, still > 0
  loss = focal_torch.sigmoid_focal(torch.tensor(logits), torch.tensor(labels),
                                   reduction="mean_positive", label_smoothing=0.2)
  per_entry = ref.sigmoid_focal(logits, labels, reduction="none", label_smoothing=0.2)[0]
  np.testing.assert_allclose(loss.item(), per_entry.sum() / 3, rtol=1e-12)


def test_masked_entries_have_zero_grad_and_no_positives_gives_zero(ref):
  x = torch.randn(3, 4, requires_grad=True)
  where = torch.rand(3, 4) < 0.5
  loss = focal_torch.sigmoid_focal(x, torch.ones(3, 4), where=where, reduction="none")
  assert (loss[~where] == 0).all()
  assert (ref.grad(loss, x)[~where] == 0).all()
  loss = focal_torch.sigmoid_focal(x, torch.zeros(3, 4), reduction="mean_positive")
  assert torch.isfinite(loss) and loss.item() > 0  # denominator 0 is taken as 1


def test_labels_outside_unit_interval_raise_unless_checks_off():
  x = torch.randn(2, 2)
  with pytest.raises(ValueError, match=r"sigmoid_focal: labels must be in \[0, 1\], got 2.0"):
    focal_torch.sigmoid_focal(x, torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
  with focal_torch.value_checks(False):
    focal_torch.sigmoid_focal(x, torch.tensor([[0.0, 2.0], [1.0, 0.0]]))


@pytest.mark.parametrize("shape", [(3, 4, 5), (7, 3)], ids=["spatial", "rows"])
def test_small_chunks_match_reference(ref, monkeypatch, shape):
  monkeypatch.setattr(_chunking, "CHUNK_ELEMENTS", 5)
  rng = np.random.default_rng(4)
  logits, labels = rng.normal(0, 3, shape), rng.random(shape)
  alpha = rng.uniform(0, 1, shape[1])
  x = torch.tensor(logits, requires_grad=True)
  loss = focal_torch.sigmoid_focal(x, torch.tensor(labels), alpha=torch.tensor(alpha),
                                   gamma=0.5, label_smoothing=0.1, dim=1)
  want, want_grad = ref.sigmoid_focal(logits, labels, alpha=alpha, gamma=0.5,
                                      label_smoothing=0.1)
  np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
  np.testing.assert_allclose(ref.grad(loss, x).numpy(), want_grad, rtol=1e-10, atol=1e-14)
