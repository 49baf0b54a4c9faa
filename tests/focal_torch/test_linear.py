"""linear_softmax_focal against the materialized path ``softmax_focal(hidden @ weight.T +
bias)`` and against the float64 NumPy reference: value and gradients with respect to hidden,
weight and bias, every keyword, chunkings, dtypes, and the shape-agreement errors."""

from __future__ import annotations

import re

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch

import focal_torch

REDUCTIONS = ["none", "sum", "mean", "mean_positive"]


def _grads(loss, params):
  out = loss if loss.ndim == 0 else loss.sum()
  return torch.autograd.grad(out, params)


def _setup(rng, lead, h, v, dtype, with_bias=True):
  hidden = torch.tensor(rng.normal(0, 1, lead + (h,)), dtype=dtype, requires_grad=True)
  weight = torch.tensor(rng.normal(0, 1.5 / np.sqrt(h), (v, h)), dtype=dtype,
                        requires_grad=True)
  bias = (torch.tensor(rng.normal(0, 0.5, v), dtype=dtype, requires_grad=True)
          if with_bias else None)
  return hidden, weight, bias


@st.composite
def linear_cases(draw):
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  lead = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
  v = draw(st.integers(2, 9))
  alpha = draw(st.sampled_from([None, 0.5, "vector"]))
  gamma = draw(st.sampled_from([0.0, 0.5, 2.0, "vector"]))
  labels = rng.integers(0, v, lead)
  labels = np.where(rng.random(lead) < 0.2, -100, labels)
  return dict(
      rng=rng, lead=lead, h=draw(st.integers(1, 5)), v=v, labels=labels,
      alpha=rng.uniform(0.2, 2, v) if alpha == "vector" else alpha,
      gamma=rng.choice([0.0, 0.5, 2.0], v) if gamma == "vector" else gamma,
      label_smoothing=draw(st.sampled_from([0.0, 0.2])),
      reduction=draw(st.sampled_from(REDUCTIONS)),
      where=rng.random(lead) < 0.8 if draw(st.booleans()) else None,
      ignore_index=draw(st.sampled_from([-100, None])),
      background_class=draw(st.integers(0, v - 1)),
      bias=draw(st.booleans()),
      chunk_size=draw(st.sampled_from([None, 1, 2, 5])))


@hypothesis.given(linear_cases())
def test_matches_materialized_path_float64(case):
  hidden, weight, bias = _setup(case["rng"], case["lead"], case["h"], case["v"], torch.float64,
                                case["bias"])
  labels = torch.tensor(case["labels"])
  if case["ignore_index"] is None:  # -100 is then an out-of-range label: mask it instead
    labels = labels.clamp_min(0)
  kw = dict(gamma=case["gamma"], alpha=case["alpha"], label_smoothing=case["label_smoothing"],
            reduction=case["reduction"], ignore_index=case["ignore_index"],
            background_class=case["background_class"])
  for k in ("gamma", "alpha"):
    if isinstance(kw[k], np.ndarray):
      kw[k] = torch.tensor(kw[k])
  if case["where"] is not None:
    kw["where"] = torch.tensor(case["where"])
  params = [p for p in (hidden, weight, bias) if p is not None]
  fused = focal_torch.linear_softmax_focal(hidden, weight, labels, bias=bias,
                                           chunk_size=case["chunk_size"], **kw)
  logits = hidden @ weight.T + (0 if bias is None else bias)
  materialized = focal_torch.softmax_focal(logits, labels, dim=-1, **kw)
  assert fused.shape == materialized.shape and fused.dtype == torch.float64
  torch.testing.assert_close(fused, materialized, rtol=1e-12, atol=1e-13)
  for g_fused, g_mat in zip(_grads(fused, params), _grads(materialized, params)):
    torch.testing.assert_close(g_fused, g_mat, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_numpy_reference_with_chain_rule(ref, reduction):
  rng = np.random.default_rng(1)
  hidden, weight, bias = _setup(rng, (13,), 4, 7, torch.float64)
  labels = rng.integers(0, 7, 13)
  labels[2] = -100
  kw = dict(gamma=0.5, label_smoothing=0.1, alpha=rng.uniform(0.5, 1.5, 7))
  fused = focal_torch.linear_softmax_focal(hidden, weight, torch.tensor(labels), bias=bias,
                                           chunk_size=3, reduction=reduction,
                                           **dict(kw, alpha=torch.tensor(kw["alpha"])))
  h, w, b = (p.detach().numpy() for p in (hidden, weight, bias))
  want, dz = ref.softmax_focal(h @ w.T + b, labels, dim=-1, reduction=reduction, **kw)
  np.testing.assert_allclose(fused.detach().numpy(), want, rtol=1e-12, atol=1e-15)
  d_hidden, d_weight, d_bias = _grads(fused, [hidden, weight, bias])
  # Chain rule through the linear layer: dz is d(value)/d(logits) from the reference.
  np.testing.assert_allclose(d_hidden.numpy(), dz @ w, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(d_weight.numpy(), dz.T @ h, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(d_bias.numpy(), dz.sum(0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_within_tolerance_of_materialized_path(dtype, rtol, reduction):
  rng = np.random.default_rng(2)
  hidden, weight, bias = _setup(rng, (4, 9), 16, 300, dtype)
  labels = torch.tensor(rng.integers(0, 300, (4, 9)))
  kw = dict(gamma=2.0, label_smoothing=0.1, reduction=reduction)
  params = [hidden, weight, bias]
  fused = focal_torch.linear_softmax_focal(hidden, weight, labels, bias=bias, chunk_size=5,
                                           **kw)
  materialized = focal_torch.softmax_focal(hidden @ weight.T + bias, labels, dim=-1, **kw)
  assert fused.dtype == dtype
  torch.testing.assert_close(fused.float(), materialized.float(), rtol=rtol, atol=rtol)
  for g_fused, g_mat in zip(_grads(fused, params), _grads(materialized, params)):
    assert g_fused.dtype == dtype
    scale = g_mat.float().abs().max()
    torch.testing.assert_close(g_fused.float(), g_mat.float(), rtol=rtol, atol=rtol * scale)


def test_weighted_per_row_cotangent_recomputes_correctly():
  # reduction="none" with an arbitrary per-row cotangent: the backward recomputes chunks.
  rng = np.random.default_rng(3)
  hidden, weight, bias = _setup(rng, (11,), 5, 6, torch.float64)
  labels = torch.tensor(rng.integers(0, 6, 11))
  row_weights = torch.tensor(rng.normal(0, 1, 11))
  fused = focal_torch.linear_softmax_focal(hidden, weight, labels, bias=bias, chunk_size=4,
                                           reduction="none", gamma=1.5)
  materialized = focal_torch.softmax_focal(hidden @ weight.T + bias, labels, dim=-1,
                                           reduction="none", gamma=1.5)
  params = [hidden, weight, bias]
  for g_fused, g_mat in zip(torch.autograd.grad((fused * row_weights).sum(), params),
                            torch.autograd.grad((materialized * row_weights).sum(), params)):
    torch.testing.assert_close(g_fused, g_mat, rtol=1e-11, atol=1e-13)


def test_frozen_weight_and_no_grad():
  rng = np.random.default_rng(4)
  hidden, weight, _ = _setup(rng, (8,), 3, 5, torch.float64, with_bias=False)
  weight = weight.detach()
  labels = torch.tensor(rng.integers(0, 5, 8))
  fused = focal_torch.linear_softmax_focal(hidden, weight, labels)
  d_hidden, = torch.autograd.grad(fused, hidden)
  want, = torch.autograd.grad(focal_torch.softmax_focal(hidden @ weight.T, labels), hidden)
  torch.testing.assert_close(d_hidden, want, rtol=1e-12, atol=1e-14)
  with torch.no_grad():
    value = focal_torch.linear_softmax_focal(hidden, weight, labels)
  torch.testing.assert_close(value, fused.detach(), rtol=1e-14, atol=0)


def test_all_ignored_gives_zero_and_out_of_range_label_raises():
  hidden, weight, bias = _setup(np.random.default_rng(5), (4,), 3, 5, torch.float64)
  loss = focal_torch.linear_softmax_focal(hidden, weight, torch.full((4,), -100), bias=bias)
  assert loss.item() == 0.0
  assert all((g == 0).all() for g in _grads(loss, [hidden, weight, bias]))
  with pytest.raises(ValueError, match=re.escape(
      "linear_softmax_focal: labels must be in [0, 5) or ignore_index=-100, got label 5 "
      "(C=5)")):
    focal_torch.linear_softmax_focal(hidden, weight, torch.tensor([0, 5, 1, 2]))
  with focal_torch.value_checks(False):
    loss = focal_torch.linear_softmax_focal(hidden, weight, torch.tensor([0, 5, 1, 2]),
                                            reduction="none")
  assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


H = torch.randn(4, 3)
W = torch.randn(5, 3)
T = torch.tensor([0, 1, 2, 3])
ERRORS = [
    (dict(weight=torch.randn(3, 5)), ValueError,
     "linear_softmax_focal: weight must have shape (V, 3) (nn.Linear's layout, H = "
     "hidden.shape[-1] = 3), got (3, 5)"),
    (dict(weight=torch.randn(5, 3, 1)), ValueError,
     "linear_softmax_focal: weight must have shape (V, 3)"),
    (dict(weight=W.double()), TypeError,
     "linear_softmax_focal: weight must have hidden's dtype torch.float32, got torch.float64"),
    (dict(hidden=H.long()), TypeError,
     "linear_softmax_focal: hidden must be a floating-point tensor, got dtype torch.int64"),
    (dict(bias=torch.zeros(4)), ValueError,
     "linear_softmax_focal: bias must have shape (5,) (V = weight.shape[0]), got (4,)"),
    (dict(bias=torch.zeros(5, dtype=torch.float64)), TypeError,
     "linear_softmax_focal: bias must have hidden's dtype torch.float32, got torch.float64"),
    (dict(chunk_size=0), ValueError, "linear_softmax_focal: chunk_size must be None or >= 1, "
                                     "got 0"),
    (dict(chunk_size=2.5), TypeError,
     "linear_softmax_focal: chunk_size must be an int or None, got float"),
    (dict(labels=T[:3]), ValueError,
     "linear_softmax_focal: labels must have shape (4,) (the shape of hidden (4, 3) without "
     "its last axis), got shape (3,)"),
    (dict(where=torch.ones(4, 5, dtype=torch.bool)), ValueError,
     "linear_softmax_focal: where must have shape (4,)"),
    (dict(gamma=-1.0), ValueError, "linear_softmax_focal: gamma must be >= 0, got -1.0"),
    (dict(alpha=torch.ones(4)), ValueError,
     "linear_softmax_focal: alpha must be a scalar or shape (5,) (one weight per class), got "
     "shape (4,)"),
    (dict(reduction="avg"), ValueError, "linear_softmax_focal: reduction must be one of"),
    (dict(label_smoothing=2.0), ValueError,
     "linear_softmax_focal: label_smoothing must be in [0, 1], got 2.0"),
]


@pytest.mark.parametrize("kw,error,message", ERRORS, ids=[m[22:70] for _, _, m in ERRORS])
def test_bad_arguments_raise_clear_errors(kw, error, message):
  args = dict(hidden=H, weight=W, labels=T)
  args.update(kw)
  with pytest.raises(error, match=re.escape(message)):
    focal_torch.linear_softmax_focal(args.pop("hidden"), args.pop("weight"), args.pop("labels"),
                                     **args)


def test_non_contiguous_hidden_and_weight():
  rng = np.random.default_rng(6)
  hidden_t = torch.tensor(rng.normal(0, 1, (4, 9)), requires_grad=True)  # (H, N) storage
  weight_t = torch.tensor(rng.normal(0, 0.5, (4, 6)), requires_grad=True)  # (H, V) storage
  labels = torch.tensor(rng.integers(0, 6, 9))
  fused = focal_torch.linear_softmax_focal(hidden_t.t(), weight_t.t(), labels, chunk_size=2)
  materialized = focal_torch.softmax_focal(hidden_t.t() @ weight_t, labels)
  torch.testing.assert_close(fused, materialized, rtol=1e-12, atol=1e-14)
  for g_fused, g_mat in zip(_grads(fused, [hidden_t, weight_t]),
                            _grads(materialized, [hidden_t, weight_t])):
    torch.testing.assert_close(g_fused, g_mat, rtol=1e-11, atol=1e-13)


def test_second_backward_with_retained_graph_and_double_backward():
  # Issue 12, case 9: the backward must not scale saved tensors in place (a second backward
  # through a retained graph gave wrong or failing results), and create_graph=True must give
  # a gradient that has a gradient (a gradient penalty), checked by finite differences.
  rng = np.random.default_rng(21)
  hidden, weight, bias = _setup(rng, (5,), 3, 4, torch.float64)
  labels = torch.tensor([0, 3, -100, 1, 2])
  params = (hidden, weight, bias)
  for reduction in ("mean", "none"):
    loss = focal_torch.linear_softmax_focal(hidden, weight, labels, bias=bias, chunk_size=2,
                                            gamma=0.5, label_smoothing=0.1,
                                            reduction=reduction)
    out = loss if loss.ndim == 0 else loss.sum()
    first = torch.autograd.grad(out, params, retain_graph=True)
    second = torch.autograd.grad(out, params, retain_graph=True)
    third = torch.autograd.grad(2.0 * out, params)
    for a, b, c in zip(first, second, third):
      torch.testing.assert_close(a, b, rtol=0, atol=0)
      torch.testing.assert_close(c, 2 * a, rtol=1e-14, atol=1e-15)
    loss = focal_torch.linear_softmax_focal(hidden, weight, labels, bias=bias, chunk_size=2,
                                            gamma=0.5, label_smoothing=0.1,
                                            reduction=reduction)
    out = loss if loss.ndim == 0 else loss.sum()
    g = torch.autograd.grad(out, params, create_graph=True)
    assert all(x.requires_grad for x in g)
    penalty = sum((x ** 2).sum() for x in g)
    assert all(x is not None for x in torch.autograd.grad(penalty, params))

  def fn(h, w, b):
    return focal_torch.linear_softmax_focal(h, w, labels, bias=b, chunk_size=2, gamma=0.5,
                                            alpha=0.7, label_smoothing=0.1,
                                            reduction="mean")
  assert torch.autograd.gradgradcheck(fn, params)
  assert torch.autograd.gradgradcheck(
      lambda h, w: focal_torch.linear_softmax_focal(h, w, labels, gamma=2.0, chunk_size=3,
                                                    reduction="none"), (hidden, weight))
