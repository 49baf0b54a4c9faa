"""Issue 12 on the torch side: label dtypes and comparisons without wrapping, finite
hyperparameters, lists / NumPy arguments, ``where`` broadcasting, sigmoid vectors on the last
axis, masked rows with non-finite logits, -inf logits, ``sample_weight``, and small edge cases.

Every expected number comes from the float64 NumPy references of ``conftest.py`` (or a formula
written here), never from the code under test.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import focal_torch

F64 = torch.float64


def _z(rng, shape, scale=2.0):
  return torch.tensor(rng.normal(0, scale, shape), dtype=F64, requires_grad=True)


# --------------------------------------------------------------------------- label dtypes

def test_uint8_labels_with_default_ignore_index_keep_class_156(ref):
  # -100 wrapped into uint8 is 156: it must not mask the real class 156.
  rng = np.random.default_rng(0)
  z = _z(rng, (4, 200))
  labels = np.array([156, 0, 199, 3])
  got = focal_torch.softmax_focal(z, torch.tensor(labels, dtype=torch.uint8), reduction="none")
  want, want_grad = ref.softmax_focal(z.detach().numpy(), labels, reduction="none")
  assert got[0] > 0
  np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)
  np.testing.assert_allclose(ref.grad(got, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)


def test_int32_labels_with_an_unrepresentable_ignore_index_ignore_nothing(ref):
  rng = np.random.default_rng(1)
  z = _z(rng, (4, 3))
  labels = np.array([0, 2, 1, 0])
  got = focal_torch.softmax_focal(z, torch.tensor(labels, dtype=torch.int32),
                                  ignore_index=2 ** 40, reduction="none")
  want, _ = ref.softmax_focal(z.detach().numpy(), labels, ignore_index=None, reduction="none")
  assert (got > 0).all()
  np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)
  # int64 labels: 2**40 is representable, and still no label equals it.
  got64 = focal_torch.softmax_focal(z, torch.tensor(labels), ignore_index=2 ** 40,
                                    reduction="mean")
  np.testing.assert_allclose(got64.item(), want.mean(), rtol=1e-10)


@pytest.mark.parametrize("fn", ["softmax", "linear"])
@pytest.mark.parametrize("dtype,labels,num_classes", [
    (torch.int8, [0, 127, 100, 5], 200),
    (torch.uint8, [0, 255, 200, 7], 300),
    (torch.int16, [0, 299, 1, 2], 300),
], ids=["int8_C200", "uint8_C300", "int16_C300"])
def test_label_dtypes_narrower_than_c(ref, fn, dtype, labels, num_classes):
  rng = np.random.default_rng(2)
  labels = np.array(labels)
  if fn == "softmax":
    z = _z(rng, (4, num_classes))
    got = focal_torch.softmax_focal(z, torch.tensor(labels, dtype=dtype), reduction="none")
    want, want_grad = ref.softmax_focal(z.detach().numpy(), labels, reduction="none")
    np.testing.assert_allclose(ref.grad(got, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)
  else:
    h = torch.tensor(rng.normal(0, 1, (4, 5)), dtype=F64)
    w = torch.tensor(rng.normal(0, 0.5, (num_classes, 5)), dtype=F64)
    got = focal_torch.linear_softmax_focal(h, w, torch.tensor(labels, dtype=dtype),
                                           reduction="none")
    want, _ = ref.softmax_focal((h @ w.T).numpy(), labels, reduction="none", dim=-1)
  np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("fn", ["softmax", "linear"])
def test_unsigned_wide_label_dtypes_are_accepted(ref, dtype, fn):
  rng = np.random.default_rng(3)
  labels = np.array([0, 2, 1, 2])
  t = torch.tensor(labels).to(dtype)
  if fn == "softmax":
    z = _z(rng, (4, 3))
    got = focal_torch.softmax_focal(z, t, reduction="mean_positive", gamma=0.5)
    want, want_grad = ref.softmax_focal(z.detach().numpy(), labels, gamma=0.5,
                                        reduction="mean_positive")
    np.testing.assert_allclose(ref.grad(got, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)
  else:
    h = torch.tensor(rng.normal(0, 1, (4, 5)), dtype=F64)
    w = torch.tensor(rng.normal(0, 0.5, (3, 5)), dtype=F64)
    got = focal_torch.linear_softmax_focal(h, w, t, reduction="mean_positive", gamma=0.5)
    want, _ = ref.softmax_focal((h @ w.T).numpy(), labels, gamma=0.5, dim=-1,
                                reduction="mean_positive")
  np.testing.assert_allclose(got.item(), want, rtol=1e-10)


def test_uint16_ignore_index_at_the_dtype_maximum_and_uint64_beyond_int64(ref):
  rng = np.random.default_rng(4)
  z = _z(rng, (4, 3))
  got = focal_torch.softmax_focal(z, torch.tensor([0, 65535, 1, 2]).to(torch.uint16),
                                  ignore_index=65535, reduction="none")
  want, _ = ref.softmax_focal(z.detach().numpy(), np.array([0, 0, 1, 2]),
                              where=[True, False, True, True], reduction="none")
  np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)
  # 2**64 - 1 is a bad label (not -1): ignore_index=-1 must not mask it.
  t = torch.tensor([0, -1, 1, 2]).to(torch.uint64)
  with pytest.raises(ValueError, match=re.escape("got label 18446744073709551615 (C=3)")):
    focal_torch.softmax_focal(z, t, ignore_index=-1)
  with focal_torch.value_checks(False):
    out = focal_torch.softmax_focal(z, t, ignore_index=-1, reduction="none")
  assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


def test_background_class_is_compared_without_wrapping(ref):
  rng = np.random.default_rng(5)
  z = _z(rng, (4, 200))
  labels = np.array([156, 0, 3, 156])
  got = focal_torch.softmax_focal(z, torch.tensor(labels, dtype=torch.uint8),
                                  background_class=-100, reduction="mean_positive",
                                  ignore_index=None)
  want, _ = ref.softmax_focal(z.detach().numpy(), labels, background_class=-100,
                              reduction="mean_positive", ignore_index=None)
  np.testing.assert_allclose(got.item(), want, rtol=1e-10)


# --------------------------------------------------------------------------- hyperparameters

_FUNCTIONS = {
    "softmax_focal": lambda **kw: focal_torch.softmax_focal(torch.randn(4, 3),
                                                            torch.tensor([0, 1, 2, 0]), **kw),
    "categorical_focal": lambda **kw: focal_torch.categorical_focal(
        torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1), **kw),
    "sigmoid_focal": lambda **kw: focal_torch.sigmoid_focal(torch.randn(4, 3),
                                                            torch.rand(4, 3), **kw),
    "linear_softmax_focal": lambda **kw: focal_torch.linear_softmax_focal(
        torch.randn(4, 5), torch.randn(3, 5), torch.tensor([0, 1, 2, 0]), **kw),
}
_MODULES = {"SoftmaxFocalLoss": focal_torch.SoftmaxFocalLoss,
            "SigmoidFocalLoss": focal_torch.SigmoidFocalLoss,
            "CategoricalFocalLoss": focal_torch.CategoricalFocalLoss}


@pytest.mark.parametrize("name", list(_FUNCTIONS) + list(_MODULES))
@pytest.mark.parametrize("kw,shown", [
    (dict(gamma=math.inf), "inf"),
    (dict(gamma=math.nan), "nan"),
    (dict(alpha=math.inf), "inf"),
    (dict(alpha=torch.tensor([0.5, math.nan, 0.5])), "[0.5, nan, 0.5]"),
    (dict(alpha=torch.tensor([0.5, math.inf, 0.5])), "[0.5, inf, 0.5]"),
    (dict(gamma=torch.tensor([1.0, math.inf, 2.0])), "[1.0, inf, 2.0]"),
    (dict(alpha=[0.5, math.nan, 0.5]), "[0.5, nan, 0.5]"),
], ids=["gamma_inf", "gamma_nan", "alpha_inf", "alpha_nan_in_tensor", "alpha_inf_in_tensor",
        "gamma_inf_in_tensor", "alpha_nan_in_list"])
def test_non_finite_hyperparameters_raise(name, kw, shown):
  arg = next(iter(kw))
  message = f"{name}: {arg} must be finite, got {shown}"
  with pytest.raises(ValueError, match=re.escape(message)):
    if name in _FUNCTIONS:
      _FUNCTIONS[name](**kw)
    else:
      _MODULES[name](**kw)


@pytest.mark.parametrize("name", ["softmax_focal", "categorical_focal", "linear_softmax_focal"])
def test_softmax_alpha_must_be_non_negative(name):
  with pytest.raises(ValueError, match=re.escape(f"{name}: alpha must be >= 0, got -0.5")):
    _FUNCTIONS[name](alpha=-0.5)


def test_sigmoid_alpha_message_follows_the_contract():
  with pytest.raises(ValueError, match=re.escape(
      "sigmoid_focal: alpha must be in [0, 1] (alpha=None means no weighting), got -1.0")):
    _FUNCTIONS["sigmoid_focal"](alpha=-1)


@pytest.mark.parametrize("kind", ["list", "tuple", "numpy"])
def test_lists_tuples_and_numpy_arrays_are_accepted_everywhere(ref, kind):
  rng = np.random.default_rng(6)
  z = _z(rng, (5, 3))
  labels = np.array([0, 2, 1, 2, 0])
  y = rng.random((5, 3))
  probs = rng.dirichlet(np.ones(3), 5)
  alpha, gamma = [0.25, 0.5, 0.75], [0.0, 0.5, 2.0]
  sw = [1.0, 2.0, 0.5, 0.0, 3.0]
  where = [True, True, False, True, True]
  conv = {"list": list, "tuple": tuple, "numpy": np.array}[kind]
  kw = dict(alpha=conv(alpha), gamma=conv(gamma), where=conv(where), sample_weight=conv(sw),
            reduction="sum")
  np_w = np.asarray(where)
  checks = [
      (focal_torch.softmax_focal(z, torch.tensor(labels), **kw),
       ref.softmax_focal(z.detach().numpy(), labels, alpha=alpha, gamma=np.array(gamma),
                         where=np_w, reduction="none"), np.asarray(sw)),
      (focal_torch.categorical_focal(z, torch.tensor(probs), **kw),
       ref.categorical_focal(z.detach().numpy(), probs, alpha=alpha, gamma=np.array(gamma),
                             where=np_w, reduction="none"), np.asarray(sw)),
  ]
  for got, (want, _), weight in checks:
    np.testing.assert_allclose(got.item(), (want * weight).sum(), rtol=1e-10)
  got = focal_torch.sigmoid_focal(z, torch.tensor(y), alpha=conv(alpha), gamma=conv(gamma),
                                  where=conv(where[:3]), sample_weight=conv(sw[:3]),
                                  reduction="sum")
  want, _ = ref.sigmoid_focal(z.detach().numpy(), y, alpha=np.array(alpha),
                              gamma=np.array(gamma), dim=-1,
                              where=np.broadcast_to(np_w[:3], (5, 3)), reduction="none")
  np.testing.assert_allclose(got.item(), (want * np.asarray(sw[:3])).sum(), rtol=1e-10)
  # Modules take them too (imbalanced-losses' RetinaNet example: alpha=[0.25] * 10).
  module = focal_torch.SoftmaxFocalLoss(alpha=conv([0.25] * 10), gamma=conv([2.0] * 10))
  z10 = _z(rng, (6, 10))
  t10 = rng.integers(0, 10, 6)
  want, _ = ref.softmax_focal(z10.detach().numpy(), t10, alpha=0.25)
  np.testing.assert_allclose(module(z10, torch.tensor(t10)).item(), want, rtol=1e-6)
  for cls in (focal_torch.SigmoidFocalLoss, focal_torch.CategoricalFocalLoss):
    assert torch.isfinite(cls(alpha=conv(alpha), gamma=conv(gamma))(
        z, torch.tensor(probs)))


# --------------------------------------------------------------------------- where, sigmoid axis

def test_where_broadcasts_to_the_labels_shape(ref):
  rng = np.random.default_rng(7)
  z = _z(rng, (4, 3, 5))
  labels = rng.integers(0, 3, (4, 5))
  where = np.array([True, False, True, True, False])  # (5,) -> (4, 5)
  got = focal_torch.softmax_focal(z, torch.tensor(labels), where=torch.tensor(where))
  want, want_grad = ref.softmax_focal(z.detach().numpy(), labels,
                                      where=np.broadcast_to(where, (4, 5)))
  np.testing.assert_allclose(got.item(), want, rtol=1e-10)
  np.testing.assert_allclose(ref.grad(got, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)
  x = _z(rng, (4, 3))
  y = rng.random((4, 3))
  col = np.array([[True], [False], [True], [True]])
  got = focal_torch.sigmoid_focal(x, torch.tensor(y), where=torch.tensor(col))
  want, _ = ref.sigmoid_focal(x.detach().numpy(), y, where=np.broadcast_to(col, (4, 3)))
  np.testing.assert_allclose(got.item(), want, rtol=1e-10)
  with pytest.raises(ValueError, match=re.escape(
      "softmax_focal: where must have shape (4, 5) (the shape of labels) or broadcast to it, "
      "got shape (2, 4, 5)")):
    focal_torch.softmax_focal(z, torch.tensor(labels), where=torch.ones(2, 4, 5, dtype=bool))


def test_sigmoid_vectors_apply_along_the_last_axis(ref):
  # (N, C, H, W) with C == W: the numbers differ silently if the vector goes along dim 1.
  rng = np.random.default_rng(8)
  x = _z(rng, (2, 3, 4, 3))
  y = (rng.random((2, 3, 4, 3)) < 0.3).astype(np.float64)
  alpha, gamma = np.array([0.1, 0.5, 0.9]), np.array([0.0, 1.0, 2.0])
  got = focal_torch.sigmoid_focal(x, torch.tensor(y), alpha=torch.tensor(alpha),
                                  gamma=torch.tensor(gamma), reduction="sum")
  want, want_grad = ref.sigmoid_focal(x.detach().numpy(), y, alpha=alpha, gamma=gamma, dim=-1,
                                      reduction="sum")
  np.testing.assert_allclose(got.item(), want, rtol=1e-10)
  np.testing.assert_allclose(ref.grad(got, x).numpy(), want_grad, rtol=1e-10, atol=1e-14)
  module = focal_torch.SigmoidFocalLoss(alpha=torch.tensor(alpha), gamma=torch.tensor(gamma),
                                        reduction="sum")
  np.testing.assert_allclose(module(x, torch.tensor(y)).item(), want, rtol=1e-10)
  with pytest.raises(ValueError, match=re.escape(
      "sigmoid_focal: alpha must be a scalar or shape (5,) (one per entry of the last axis of "
      "logits), got shape (3,)")):
    focal_torch.sigmoid_focal(torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5),
                              alpha=torch.tensor(alpha))


# --------------------------------------------------------------------------- non-finite logits

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mask", ["ignore_index", "where"])
def test_masked_softmax_rows_with_non_finite_logits_are_exactly_zero(ref, bad, mask):
  rng = np.random.default_rng(9)
  logits = rng.normal(0, 2, (4, 3))
  logits[1, :] = bad
  logits[2, 0] = bad
  labels = np.array([0, 1, 2, 1])
  z = torch.tensor(logits, requires_grad=True)
  keep = np.array([True, False, False, True])
  if mask == "where":
    kw = dict(where=torch.tensor(keep))
    t = torch.tensor(labels)
  else:
    kw = dict(ignore_index=-100)
    t = torch.tensor(np.where(keep, labels, -100))
  for reduction in ("none", "mean"):
    got = focal_torch.softmax_focal(z, t, gamma=0.5, label_smoothing=0.1, reduction=reduction,
                                    **kw)
    grad = ref.grad(got, z)
    safe = np.where(keep[:, None], logits, 0.0)
    want, want_grad = ref.softmax_focal(safe, labels, gamma=0.5, label_smoothing=0.1,
                                        where=keep, reduction=reduction)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)
    assert (grad[~torch.tensor(keep)] == 0).all()
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_masked_sigmoid_and_categorical_entries_with_non_finite_logits_are_zero(ref, bad):
  rng = np.random.default_rng(10)
  logits = rng.normal(0, 2, (4, 3))
  logits[1, :] = bad
  keep_rows = np.array([True, False, True, True])
  probs = rng.dirichlet(np.ones(3), 4)
  z = torch.tensor(logits, requires_grad=True)
  got = focal_torch.categorical_focal(z, torch.tensor(probs), where=torch.tensor(keep_rows),
                                      reduction="sum")
  grad = ref.grad(got, z)
  want, want_grad = ref.categorical_focal(np.where(keep_rows[:, None], logits, 0), probs,
                                          where=keep_rows, reduction="sum")
  np.testing.assert_allclose(got.item(), want, rtol=1e-10)
  np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)
  y = rng.random((4, 3))
  keep = np.broadcast_to(keep_rows[:, None], (4, 3))
  got = focal_torch.sigmoid_focal(z, torch.tensor(y), where=torch.tensor(keep), reduction="sum")
  grad = ref.grad(got, z)
  want, want_grad = ref.sigmoid_focal(np.where(keep, logits, 0), y, where=keep, reduction="sum")
  np.testing.assert_allclose(got.item(), want, rtol=1e-10)
  np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_minus_inf_logit_on_a_class_without_target_mass_is_a_masked_class(dtype):
  inf = math.inf
  z = torch.tensor([[-inf, 0.0, 0.0]], dtype=dtype, requires_grad=True)
  y = torch.tensor([[0.0, 0.5, 0.5]], dtype=dtype)
  got = focal_torch.categorical_focal(z, y, gamma=0.0)
  np.testing.assert_allclose(got.item(), math.log(2), rtol=1e-6)
  # The float64 formula on the remaining classes: -sum_c y_c log s_c with s = (1/2, 1/2).
  np.testing.assert_allclose(-(0.5 * np.log([0.5, 0.5])).sum(), math.log(2), rtol=1e-15)
  grad = torch.autograd.grad(got, z)[0]
  np.testing.assert_allclose(grad.numpy(), [[0.0, 0.0, 0.0]], atol=1e-7)
  for gamma in (0.5, 2.0):
    got = focal_torch.categorical_focal(z, y, gamma=gamma)
    # s = (0, 1/2, 1/2): loss = 2 * 0.5 * 0.5**gamma * log 2
    np.testing.assert_allclose(got.item(), 0.5 ** gamma * math.log(2), rtol=1e-6)
    grad = torch.autograd.grad(got, z)[0]
    assert torch.isfinite(grad).all() and grad[0, 0] == 0
  # One-hot targets on a -inf-masked row: as softmax_focal, a float64 formula.
  z2 = torch.tensor([[-inf, 1.0, -0.5]], dtype=dtype, requires_grad=True)
  s = np.exp([1.0, -0.5]) / np.exp([1.0, -0.5]).sum()
  want = (1 - s[0]) ** 2 * -math.log(s[0])
  for got in (focal_torch.categorical_focal(z2, torch.tensor([[0.0, 1.0, 0.0]], dtype=dtype)),
              focal_torch.softmax_focal(z2, torch.tensor([1]))):
    np.testing.assert_allclose(got.item(), want, rtol=1e-6)
    grad = torch.autograd.grad(got, z2)[0]
    assert torch.isfinite(grad).all() and grad[0, 0] == 0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("fn", ["softmax", "categorical", "linear"])
def test_target_logit_minus_inf_gives_inf_loss_and_a_finite_gradient(fn, gamma):
  # The limit p -> 0: focal factor 1, gradient alpha * (softmax - onehot).
  inf = math.inf
  alpha = 0.75
  s = np.array([0.0, 0.5, 0.5])
  want_grad = alpha * (s - np.array([1.0, 0.0, 0.0]))
  if fn == "linear":
    h = torch.ones(1, 1, dtype=F64, requires_grad=True)
    w = torch.zeros(3, 1, dtype=F64, requires_grad=True)
    b = torch.tensor([-inf, 0.0, 0.0], dtype=F64, requires_grad=True)
    got = focal_torch.linear_softmax_focal(h, w, torch.tensor([0]), bias=b, alpha=alpha,
                                           gamma=gamma, reduction="sum")
    grads = torch.autograd.grad(got, (h, w, b))
    assert got.item() == inf
    assert all(torch.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(grads[2].numpy(), want_grad, atol=1e-12)
    return
  z = torch.tensor([[-inf, 0.0, 0.0]], dtype=F64, requires_grad=True)
  if fn == "softmax":
    got = focal_torch.softmax_focal(z, torch.tensor([0]), alpha=alpha, gamma=gamma)
  else:
    got = focal_torch.categorical_focal(z, torch.tensor([[1.0, 0.0, 0.0]], dtype=F64),
                                        alpha=alpha, gamma=gamma)
  assert got.item() == inf
  grad = torch.autograd.grad(got, z)[0]
  np.testing.assert_allclose(grad.numpy(), [want_grad], atol=1e-12)


# --------------------------------------------------------------------------- small edge cases

def test_sigmoid_takes_0d_logits(ref):
  x = torch.tensor(1.5, dtype=F64, requires_grad=True)
  got = focal_torch.sigmoid_focal(x, torch.tensor(1.0, dtype=F64), alpha=0.25, reduction="none")
  want, want_grad = ref.sigmoid_focal(np.array(1.5), np.array(1.0), alpha=0.25,
                                      reduction="none", dim=0)
  assert got.shape == ()
  np.testing.assert_allclose(got.item(), want, rtol=1e-12)
  np.testing.assert_allclose(ref.grad(got, x).item(), want_grad, rtol=1e-12)


def test_alpha_on_the_meta_device_is_a_clear_error():
  with pytest.raises(ValueError, match=re.escape(
      "softmax_focal: alpha must be on the logits' device cpu (or the CPU), got meta")):
    focal_torch.softmax_focal(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]),
                              alpha=torch.ones(3, device="meta"))


@pytest.mark.parametrize("name", list(_FUNCTIONS))
def test_float8_logits_are_a_type_error_naming_the_argument(name):
  arg = "hidden" if name == "linear_softmax_focal" else "logits"
  z8 = torch.randn(4, 3).to(torch.float8_e4m3fn)
  with pytest.raises(TypeError, match=re.escape(
      f"{name}: {arg} must be float16, bfloat16, float32 or float64, got dtype "
      "torch.float8_e4m3fn")):
    if name == "linear_softmax_focal":
      focal_torch.linear_softmax_focal(torch.randn(4, 5).to(torch.float8_e4m3fn),
                                       torch.randn(3, 5).to(torch.float8_e4m3fn),
                                       torch.tensor([0, 1, 2, 0]))
    elif name == "categorical_focal":
      focal_torch.categorical_focal(z8, torch.softmax(torch.randn(4, 3), 1))
    elif name == "sigmoid_focal":
      focal_torch.sigmoid_focal(z8, torch.rand(4, 3))
    else:
      focal_torch.softmax_focal(z8, torch.tensor([0, 1, 2, 0]))


# --------------------------------------------------------------------------- sample_weight

def _weighted(loss, grad, weight, valid, positive, reduction, grad_axis):
  """Reduce weighted per-entry reference losses; ``grad`` rows are per-entry gradients."""
  w = np.broadcast_to(weight, loss.shape)
  wg = np.expand_dims(w, grad_axis) if grad_axis is not None else w
  loss, grad = loss * w, grad * wg
  if reduction == "none":
    return loss, grad
  denom = {"sum": 1, "mean": max(int(valid.sum()), 1),
           "mean_positive": max(int(positive.sum()), 1)}[reduction]
  return loss.sum() / denom, grad / denom


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "mean_positive"])
@pytest.mark.parametrize("weight_kind", ["per_entry", "scalar", "broadcast", "bool"])
def test_softmax_sample_weight(ref, reduction, weight_kind):
  rng = np.random.default_rng(11)
  z = _z(rng, (6, 4))
  labels = np.array([0, 1, -100, 3, 0, 2])
  where = np.array([True, True, True, False, True, True])
  weights = {"per_entry": rng.uniform(0, 3, 6), "scalar": np.array(2.5),
             "broadcast": np.array([0.5]), "bool": rng.random(6) < 0.5}[weight_kind]
  sw = weights.item() if weight_kind == "scalar" else torch.tensor(weights)
  kw = dict(alpha=0.5, gamma=1.5, label_smoothing=0.1)
  got = focal_torch.softmax_focal(z, torch.tensor(labels), where=torch.tensor(where),
                                  sample_weight=sw, reduction=reduction, **kw)
  loss, grad = ref.softmax_focal(z.detach().numpy(), labels, where=where, reduction="none",
                                 **kw)
  valid = where & (labels != -100)
  want, want_grad = _weighted(loss, grad, weights.astype(np.float64), valid,
                              valid & (labels != 0), reduction, -1)
  np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(ref.grad(got, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "mean_positive"])
def test_sigmoid_and_categorical_sample_weight(ref, reduction):
  rng = np.random.default_rng(12)
  z = _z(rng, (5, 3))
  y = (rng.random((5, 3)) < 0.4).astype(np.float64)
  sw = rng.uniform(0, 2, (5, 3))
  where = rng.random((5, 3)) < 0.8
  got = focal_torch.sigmoid_focal(z, torch.tensor(y), alpha=0.25, where=torch.tensor(where),
                                  sample_weight=torch.tensor(sw), reduction=reduction)
  loss, grad = ref.sigmoid_focal(z.detach().numpy(), y, alpha=0.25, where=where,
                                 reduction="none")
  want, want_grad = _weighted(loss, grad, sw, where, where & (y > 0), reduction, None)
  np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(ref.grad(got, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)

  probs = rng.dirichlet(np.ones(3), 5)
  row_w = rng.uniform(0, 2, 5)
  rows = np.array([True, False, True, True, True])
  got = focal_torch.categorical_focal(z, torch.tensor(probs), gamma=1.5,
                                      where=torch.tensor(rows),
                                      sample_weight=torch.tensor(row_w), reduction=reduction)
  loss, grad = ref.categorical_focal(z.detach().numpy(), probs, gamma=1.5, where=rows,
                                     reduction="none")
  want, want_grad = _weighted(loss, grad, row_w, rows, rows & (probs.argmax(-1) != 0),
                              reduction, -1)
  np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(ref.grad(got, z).numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "mean_positive"])
def test_linear_sample_weight(ref, reduction):
  rng = np.random.default_rng(13)
  h = torch.tensor(rng.normal(0, 1, (7, 4)), dtype=F64, requires_grad=True)
  w = torch.tensor(rng.normal(0, 0.7, (5, 4)), dtype=F64, requires_grad=True)
  b = torch.tensor(rng.normal(0, 0.5, 5), dtype=F64, requires_grad=True)
  labels = np.array([0, 4, -100, 3, 1, 0, 2])
  sw = rng.uniform(0, 2, 7)
  kw = dict(alpha=0.5, gamma=0.5, label_smoothing=0.1)
  got = focal_torch.linear_softmax_focal(h, w, torch.tensor(labels), bias=b, chunk_size=3,
                                         sample_weight=torch.tensor(sw), reduction=reduction,
                                         **kw)
  z = (h @ w.T + b).detach().numpy()
  loss, dz = ref.softmax_focal(z, labels, reduction="none", dim=-1, **kw)
  valid = labels != -100
  want, want_dz = _weighted(loss, dz, sw, valid, valid & (labels != 0), reduction, -1)
  np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-15)
  grads = torch.autograd.grad(got.sum(), (h, w, b))
  for g, expected in zip(grads, (want_dz @ w.detach().numpy(), want_dz.T @ h.detach().numpy(),
                                 want_dz.sum(0))):
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-10, atol=1e-13)


def test_sample_weight_gradcheck_and_masked_entries_stay_zero():
  rng = np.random.default_rng(14)
  z = _z(rng, (4, 3))
  sw = torch.tensor([1.0, 2.0, math.inf, 0.5], dtype=F64)
  labels = torch.tensor([0, 1, -100, 2])
  # A masked entry with an infinite weight still gives exactly 0 (inf is refused with the
  # value checks on).
  with focal_torch.value_checks(False):
    out = focal_torch.softmax_focal(z, labels, sample_weight=sw, reduction="none")
  assert out[2] == 0
  sw[2] = 3.0
  y = torch.tensor(rng.random((4, 3)))
  for fn in (lambda x: focal_torch.softmax_focal(x, labels, sample_weight=sw, gamma=0.5),
             lambda x: focal_torch.sigmoid_focal(x, y, sample_weight=sw[:, None]),
             lambda x: focal_torch.categorical_focal(
                 x, torch.softmax(torch.ones(4, 3, dtype=F64), 1), sample_weight=sw)):
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("sw,error,message", [
    (-1.0, ValueError, "softmax_focal: sample_weight must be >= 0, got -1.0"),
    (torch.tensor([1.0, -1.0, 1.0, 1.0]), ValueError,
     "softmax_focal: sample_weight must be >= 0, got [1.0, -1.0, 1.0, 1.0]"),
    (torch.tensor([1.0, math.inf, 1.0, 1.0]), ValueError,
     "softmax_focal: sample_weight must be finite, got [1.0, inf, 1.0, 1.0]"),
    (torch.ones(5), ValueError,
     "softmax_focal: sample_weight must be a scalar or broadcast to shape (4,), got shape "
     "(5,)"),
    ("1", TypeError, "softmax_focal: sample_weight must be None, a real scalar or an array, got str"),
])
def test_sample_weight_bad_values(sw, error, message):
  with pytest.raises(error, match=re.escape(message)):
    focal_torch.softmax_focal(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), sample_weight=sw)


def test_modules_take_sample_weight_in_forward(ref):
  rng = np.random.default_rng(15)
  z = _z(rng, (4, 3))
  labels = np.array([0, 1, 2, 0])
  sw = np.array([1.0, 0.0, 2.0, 0.5])
  got = focal_torch.SoftmaxFocalLoss(reduction="sum")(z, torch.tensor(labels),
                                                      sample_weight=torch.tensor(sw))
  loss, _ = ref.softmax_focal(z.detach().numpy(), labels, reduction="none")
  np.testing.assert_allclose(got.item(), (loss * sw).sum(), rtol=1e-10)
  y = rng.random((4, 3))
  got = focal_torch.SigmoidFocalLoss(reduction="sum")(z, torch.tensor(y),
                                                      sample_weight=torch.tensor(sw[:, None]))
  loss, _ = ref.sigmoid_focal(z.detach().numpy(), y, reduction="none")
  np.testing.assert_allclose(got.item(), (loss * sw[:, None]).sum(), rtol=1e-10)
  probs = rng.dirichlet(np.ones(3), 4)
  got = focal_torch.CategoricalFocalLoss(reduction="sum")(z, torch.tensor(probs),
                                                          sample_weight=torch.tensor(sw))
  loss, _ = ref.categorical_focal(z.detach().numpy(), probs, reduction="none")
  np.testing.assert_allclose(got.item(), (loss * sw).sum(), rtol=1e-10)


def test_process_group_world_needs_an_initialized_default_group():
  module = focal_torch.SoftmaxFocalLoss(process_group="world")  # fine before init
  with pytest.raises(ValueError, match=re.escape(
      "softmax_focal: process_group='world' needs torch.distributed to be initialized")):
    module(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
  with pytest.raises(ValueError, match=re.escape(
      "softmax_focal: process_group='world' needs torch.distributed to be initialized")):
    focal_torch.softmax_focal(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]),
                              process_group="world")


@pytest.mark.parametrize("chunk_size", [2, None])
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_linear_masked_rows_with_non_finite_features_leave_the_gradients_finite(
    ref, bad, create_graph, chunk_size):
  # Case 13 for the fused head: a masked row's non-finite features must not reach the weight
  # gradient through 0 * NaN (focal_jax gives exactly the unmasked rows' gradient too).
  rng = np.random.default_rng(21)
  h_np = rng.normal(0, 1, (6, 4))
  h_np[2] = bad
  w_np = rng.normal(0, 0.7, (5, 4))
  labels = np.array([0, 4, -100, 3, 1, 2])
  h = torch.tensor(h_np, dtype=F64, requires_grad=True)
  w = torch.tensor(w_np, dtype=F64, requires_grad=True)
  got = focal_torch.linear_softmax_focal(h, w, torch.tensor(labels), gamma=0.5,
                                         chunk_size=chunk_size, reduction="mean")
  gh, gw = torch.autograd.grad(got, (h, w), create_graph=create_graph)
  valid = labels != -100
  loss, dz = ref.softmax_focal(h_np[valid] @ w_np.T, labels[valid], gamma=0.5,
                               reduction="mean", dim=-1)
  np.testing.assert_allclose(got.detach().numpy(), loss, rtol=1e-10)
  want_gh = np.zeros_like(h_np)
  want_gh[valid] = dz @ w_np
  np.testing.assert_allclose(gh.detach().numpy(), want_gh, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(gw.detach().numpy(), dz.T @ h_np[valid], rtol=1e-10, atol=1e-14)
