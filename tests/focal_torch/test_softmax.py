"""softmax_focal against F.cross_entropy, the float64 NumPy reference, gradcheck and
gradgradcheck, and at extreme margins in every dtype."""

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
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("spatial", [False, True])
def test_gamma_zero_equals_cross_entropy(ref, reduction, label_smoothing, spatial):
  g = torch.Generator().manual_seed(0)
  shape = (5, 4, 3, 2) if spatial else (7, 6)
  z = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
  labels = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
  labels[0] = -100  # ignored, as F.cross_entropy's default ignore_index
  ours = focal_torch.softmax_focal(z, labels, gamma=0.0, label_smoothing=label_smoothing,
                                   reduction=reduction)
  theirs = F.cross_entropy(z, labels, label_smoothing=label_smoothing, reduction=reduction)
  torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
  torch.testing.assert_close(ref.grad(ours, z), ref.grad(theirs, z), rtol=1e-12, atol=1e-12)


def test_gamma_zero_equals_cross_entropy_float32_large_classes(ref):
  g = torch.Generator().manual_seed(1)
  z = (4 * torch.randn(64, 1000, generator=g)).requires_grad_()
  labels = torch.randint(0, 1000, (64,), generator=g)
  ours = focal_torch.softmax_focal(z, labels, gamma=0.0, label_smoothing=0.05)
  theirs = F.cross_entropy(z, labels, label_smoothing=0.05)
  torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-6)
  torch.testing.assert_close(ref.grad(ours, z), ref.grad(theirs, z), rtol=1e-5, atol=1e-9)


@st.composite
def softmax_cases(draw):
  ndim = draw(st.integers(1, 4))
  shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
  dim = draw(st.integers(-ndim, ndim - 1))
  shape[dim] = draw(st.integers(2, 7))
  c = shape[dim]
  kind = draw(st.sampled_from(["none", "scalar", "vector"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  alpha = {"none": None, "scalar": float(rng.uniform(0.1, 2)),
           "vector": rng.uniform(0.1, 2, c)}[kind]
  gamma = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.7, "vector"]))
  if gamma == "vector":
    gamma = rng.choice([0.0, 0.5, 2.0, 3.0], c)
  label_shape = tuple(s for i, s in enumerate(shape) if i != dim % ndim)
  labels = rng.integers(0, c, label_shape)
  ignore_index = draw(st.sampled_from([-100, None, 1]))
  if ignore_index == -100:
    labels = np.where(rng.random(label_shape) < 0.2, -100, labels)
  return dict(
      logits=rng.normal(0, draw(st.sampled_from([0.5, 3.0, 10.0])), shape), labels=labels,
      alpha=alpha, gamma=gamma, dim=dim, ignore_index=ignore_index,
      label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.7])),
      where=rng.random(label_shape) < 0.8 if draw(st.booleans()) else None,
      reduction=draw(st.sampled_from(REDUCTIONS)),
      background_class=draw(st.integers(0, c - 1)),
      dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])))


def _torch_kwargs(case, dtype):
  kw = {k: case[k] for k in ("gamma", "alpha", "dim", "ignore_index", "label_smoothing",
                             "reduction", "background_class")}
  for k in ("gamma", "alpha"):
    if isinstance(kw[k], np.ndarray):
      kw[k] = torch.tensor(kw[k], dtype=dtype)
  if case["where"] is not None:
    kw["where"] = torch.tensor(case["where"])
  return kw


@hypothesis.given(softmax_cases())
def test_matches_numpy_reference(ref, case):
  dtype = case["dtype"]
  z = torch.tensor(case["logits"], dtype=dtype, requires_grad=True)
  labels = torch.tensor(case["labels"])
  loss = focal_torch.softmax_focal(z, labels, **_torch_kwargs(case, dtype))
  kw = {k: case[k] for k in ("gamma", "alpha", "dim", "ignore_index", "label_smoothing",
                             "reduction", "background_class", "where")}
  want, want_grad = ref.softmax_focal(z.detach().double().numpy(), case["labels"], **kw)
  assert loss.dtype == dtype
  assert loss.shape == (labels.shape if case["reduction"] == "none" else ())
  np.testing.assert_allclose(loss.detach().double().numpy(), want, **ref.TOL[dtype])
  np.testing.assert_allclose(ref.grad(loss, z).double().numpy(), want_grad, **ref.TOL[dtype])


@pytest.mark.parametrize("elements", [1, 7, 40])
@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (9, 6)], ids=["spatial", "rows"])
def test_small_chunks_match_numpy_reference(ref, monkeypatch, elements, shape):
  # Tiny chunks run the row loop and the inner-slice loop (a class slice larger than a chunk).
  monkeypatch.setattr(_chunking, "CHUNK_ELEMENTS", elements)
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, shape)
  labels = rng.integers(0, 6, shape[:1] + shape[2:])
  alpha = rng.uniform(0.2, 1, 6)
  for kw in [dict(gamma=2.0, label_smoothing=0.2), dict(gamma=0.5, alpha=alpha)]:
    tkw = dict(kw, alpha=torch.tensor(alpha)) if "alpha" in kw else kw
    for dtype, tol in ((torch.float64, 1e-10), (torch.bfloat16, 2 ** -7)):
      z = torch.tensor(logits, dtype=dtype, requires_grad=True)
      loss = focal_torch.softmax_focal(z, torch.tensor(labels), **tkw)
      want, want_grad = ref.softmax_focal(z.detach().double().numpy(), labels, **kw)
      np.testing.assert_allclose(loss.double().item(), want, rtol=tol)
      np.testing.assert_allclose(ref.grad(loss, z).double().numpy(), want_grad, rtol=tol,
                                 atol=tol * 1e-2)


@pytest.mark.parametrize("kw", [
    dict(gamma=2.0),
    dict(gamma=0.5, label_smoothing=0.3),
    dict(gamma=0.0, alpha=0.25),
    dict(gamma=torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64),
         alpha=torch.tensor([0.1, 0.2, 0.3, 0.4, 1.5], dtype=torch.float64),
         label_smoothing=0.1),
], ids=["gamma2", "gamma05_smooth", "gamma0_alpha", "per_class"])
def test_gradcheck_and_gradgradcheck_float64(kw):
  g = torch.Generator().manual_seed(4)
  z = (2 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
  labels = torch.tensor([0, 1, 2, 3, 4, -100])
  where = torch.tensor([True, True, False, True, True, True])
  for reduction in ("none", "mean"):
    fn = lambda z: focal_torch.softmax_focal(z, labels, where=where, reduction=reduction, **kw)
    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))


def test_gradgradcheck_spatial_and_negative_dim():
  g = torch.Generator().manual_seed(5)
  z = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
  labels = torch.randint(0, 3, (2, 4), generator=g)
  fn = lambda z: focal_torch.softmax_focal(z, labels, gamma=1.5, reduction="none")
  assert torch.autograd.gradgradcheck(fn, (z,))
  labels_last = torch.randint(0, 4, (2, 3), generator=g)
  fn = lambda z: focal_torch.softmax_focal(z, labels_last, gamma=0.5, dim=-1)
  assert torch.autograd.gradgradcheck(fn, (z,))


def test_create_graph_gradient_matches_numpy_reference(ref):
  # The differentiable backward (create_graph=True) must give the same first derivative.
  rng = np.random.default_rng(6)
  logits, labels = rng.normal(0, 3, (8, 5)), rng.integers(0, 5, 8)
  z = torch.tensor(logits, requires_grad=True)
  kw = dict(gamma=0.5, label_smoothing=0.2, alpha=0.7)
  grad = ref.grad(focal_torch.softmax_focal(z, torch.tensor(labels), **kw), z, create_graph=True)
  assert grad.requires_grad
  np.testing.assert_allclose(grad.detach().numpy(), ref.softmax_focal(logits, labels, **kw)[1],
                             rtol=1e-10, atol=1e-14)


def _mp_truth(z: np.ndarray, t: np.ndarray, gamma: float, eps: float) -> np.ndarray:
  """Per-row loss from the formula in 50-digit arithmetic (mpmath ships with torch's sympy)."""
  mpmath = pytest.importorskip("mpmath")
  out = []
  with mpmath.workdps(50):
    for row, label in zip(z.tolist(), t.tolist()):
      row = [mpmath.mpf(v) for v in row]
      lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in row))
      log_p = row[label] - lse
      q = mpmath.fsum(mpmath.exp(v - lse) for i, v in enumerate(row) if i != label)
      ce = -(1 - eps) * log_p - eps / len(row) * mpmath.fsum(v - lse for v in row)
      out.append(float((q ** gamma if gamma else 1) * ce))
  return np.array(out)


MARGINS = [30.0, 100.0, 1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_finite_and_accurate_at_extreme_margins(ref, dtype, gamma, margin):
  finfo_max = torch.finfo(dtype).max
  m = min(margin, finfo_max / 4)  # float16 cannot hold 1e4 twice over; stay representable
  # Right by +m, wrong by m, and a three-way tie broken by m, each with and without smoothing.
  z = torch.tensor([[m, 0.0, -m], [-m, m, 0.0], [0.0, 0.0, m], [m, m, -m]], dtype=dtype)
  t = torch.tensor([0, 0, 1, 1])
  for eps in (0.0, 0.1):
    zz = z.clone().requires_grad_()
    loss = focal_torch.softmax_focal(zz, t, gamma=gamma, label_smoothing=eps, reduction="none")
    grad = ref.grad(loss, zz)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    truth = _mp_truth(z.double().numpy(), t.numpy(), gamma, eps)
    # Within two roundings of the truth as the output dtype holds it (float16 underflows 1e-13).
    rounded = torch.tensor(truth).to(dtype).double().numpy()
    np.testing.assert_allclose(loss.detach().double().numpy(), rounded, rtol=2 ** -7, atol=0)
    # Gradient rows sum to zero and the row that is right by +m has (numerically) none.
    np.testing.assert_allclose(grad.double().sum(1).numpy(), 0.0, atol=float(m) * 2 ** -7)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("margin", MARGINS)
def test_hessian_finite_at_extreme_margins(gamma, margin):
  z = torch.tensor([[margin, 0.0, -margin], [-margin, margin, 0.0]], requires_grad=True)
  t = torch.tensor([0, 0])
  fn = lambda z: focal_torch.softmax_focal(z, t, gamma=gamma, label_smoothing=0.1)
  hess = torch.autograd.functional.hessian(fn, z)
  assert torch.isfinite(hess).all()


def test_tiny_probability_of_error_is_exact_not_rounded(ref):
  # p rounds to 1 in float32 at margin 30; the loss is still the float64 value, not 0.
  z = torch.tensor([[30.0, 0.0]], requires_grad=True)
  loss = focal_torch.softmax_focal(z, torch.tensor([0]), gamma=0.5)
  q = np.exp(-30.0) / (1 + np.exp(-30.0))
  truth = q ** 0.5 * -np.log1p(-q)
  np.testing.assert_allclose(loss.item(), truth, rtol=1e-5)
  grad = ref.grad(loss, z).numpy()
  assert grad[0, 0] < 0 < grad[0, 1]


def test_masked_entries_have_zero_grad(ref):
  g = torch.Generator().manual_seed(7)
  z = torch.randn(6, 4, generator=g, requires_grad=True)
  labels = torch.tensor([0, -100, 2, 3, 1, -100])
  where = torch.tensor([True, True, False, True, True, True])
  loss = focal_torch.softmax_focal(z, labels, where=where, reduction="none")
  masked = torch.tensor([False, True, True, False, False, True])
  assert (loss[masked] == 0).all() and (loss[~masked] > 0).all()
  grad = ref.grad(loss, z)
  assert (grad[masked] == 0).all() and (grad[~masked] != 0).any(1).all()


@pytest.mark.parametrize("reduction", ["mean", "mean_positive", "sum"])
def test_all_masked_batch_gives_zero_not_nan(ref, reduction):
  z = torch.randn(3, 4, requires_grad=True)
  loss = focal_torch.softmax_focal(z, torch.full((3,), -100), reduction=reduction)
  assert loss.item() == 0.0
  assert (ref.grad(loss, z) == 0).all()
  empty = torch.zeros(0, 4, requires_grad=True)
  loss = focal_torch.softmax_focal(empty, torch.zeros(0, dtype=torch.long), reduction=reduction)
  assert loss.item() == 0.0 and ref.grad(loss, empty).shape == (0, 4)


def test_mean_positive_divides_by_non_background_count(ref):
  rng = np.random.default_rng(8)
  logits = rng.normal(0, 2, (10, 3))
  labels = np.array([0, 0, 0, 1, 2, 0, -100, 2, 0, 0])
  z = torch.tensor(logits)
  for bg in (0, 2):
    loss = focal_torch.softmax_focal(z, torch.tensor(labels), reduction="mean_positive",
                                     background_class=bg)
    per_row = ref.softmax_focal(logits, labels, reduction="none")[0]
    n_pos = int(((labels != bg) & (labels != -100)).sum())
    np.testing.assert_allclose(loss.item(), per_row.sum() / n_pos, rtol=1e-12)


def test_out_of_range_label_raises_naming_label_and_classes():
  z = torch.randn(3, 5)
  for bad in (5, 7, -1):
    with pytest.raises(ValueError, match=rf"softmax_focal: labels must be in \[0, 5\) or "
                                         rf"ignore_index=-100, got label {bad} \(C=5\)"):
      focal_torch.softmax_focal(z, torch.tensor([0, bad, 1]))
  # A masked (where=False) out-of-range label is fine.
  focal_torch.softmax_focal(z, torch.tensor([0, 9, 1]),
                            where=torch.tensor([True, False, True]))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got label -100 \(C=5\)"):
    focal_torch.softmax_focal(z, torch.tensor([0, -100, 1]), ignore_index=None)


def test_value_checks_off_gives_nan_for_bad_label_only(ref):
  z = torch.randn(3, 5, requires_grad=True)
  labels = torch.tensor([0, 9, 1])
  with focal_torch.value_checks(False):
    loss = focal_torch.softmax_focal(z, labels, reduction="none")
  assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
  grad = ref.grad(loss[[0, 2]].sum() + 0 * loss[1].nan_to_num(), z)
  assert torch.isfinite(grad[[0, 2]]).all()
  # The switch is restored on exit, and can be set for the thread.
  with pytest.raises(ValueError):
    focal_torch.softmax_focal(z, labels)
  focal_torch.value_checks(False)
  try:
    assert torch.isnan(focal_torch.softmax_focal(z, labels))
  finally:
    focal_torch.value_checks(True)
  with pytest.raises(ValueError):
    focal_torch.softmax_focal(z, labels)


def test_single_class_gives_zero(ref):
  z = torch.randn(4, 1, requires_grad=True)
  loss = focal_torch.softmax_focal(z, torch.zeros(4, dtype=torch.long), gamma=0.5,
                                   label_smoothing=0.1)
  assert loss.item() == 0.0 and (ref.grad(loss, z) == 0).all()
