"""Every bad argument raises ValueError/TypeError naming the function, the argument, what was
expected and what came: at call for the functions, at construction for the modules."""

from __future__ import annotations

import re

import pytest
import torch

import focal_torch

Z = torch.randn(4, 3)
T = torch.tensor([0, 1, 2, 0])
Y = torch.rand(4, 3)


def _softmax(**kw):
  args = dict(logits=Z, labels=T)
  args.update(kw)
  return focal_torch.softmax_focal(args.pop("logits"), args.pop("labels"), **args)


def _sigmoid(**kw):
  args = dict(logits=Z, labels=Y)
  args.update(kw)
  return focal_torch.sigmoid_focal(args.pop("logits"), args.pop("labels"), **args)


def _categorical(**kw):
  args = dict(logits=Z, targets=torch.softmax(Y, 1))
  args.update(kw)
  return focal_torch.categorical_focal(args.pop("logits"), args.pop("targets"), **args)


SOFTMAX_ERRORS = [
    (dict(logits=Z.long()), TypeError,
     "softmax_focal: logits must be a floating-point tensor, got dtype torch.int64"),
    (dict(logits=Z.numpy()), TypeError,
     "softmax_focal: logits must be a torch.Tensor, got ndarray"),
    (dict(logits=torch.tensor(1.0)), ValueError,
     "softmax_focal: logits must have at least one dimension, got shape ()"),
    (dict(logits=torch.zeros(4, 0)), ValueError,
     "softmax_focal: logits must have at least one class, got C = 0 (shape (4, 0), class dim "
     "1)"),
    (dict(gamma=-0.5), ValueError, "softmax_focal: gamma must be >= 0, got -0.5"),
    (dict(gamma=torch.tensor([1.0, -1.0, 2.0])), ValueError,
     "softmax_focal: gamma must be >= 0, got [1.0, -1.0, 2.0]"),
    (dict(gamma=torch.ones(4)), ValueError,
     "softmax_focal: gamma must be a scalar or shape (3,) (one exponent per class), got shape "
     "(4,)"),
    (dict(gamma=None), TypeError,
     "softmax_focal: gamma must be a real scalar or a shape (3,) array, got NoneType"),
    (dict(alpha=torch.ones(8)), ValueError,
     "softmax_focal: alpha must be a scalar or shape (3,) (one weight per class), got shape "
     "(8,)"),
    (dict(alpha=torch.ones(3, 1)), ValueError,
     "softmax_focal: alpha must be a scalar or shape (3,) (one weight per class), got shape "
     "(3, 1)"),
    (dict(alpha=torch.ones(3, dtype=torch.long)), TypeError,
     "softmax_focal: alpha must be a floating-point tensor, got dtype torch.int64"),
    (dict(alpha=torch.ones(3, requires_grad=True)), ValueError,
     "softmax_focal: alpha gets no gradient from this loss; pass alpha.detach()"),
    (dict(alpha="0.25"), TypeError,
     "softmax_focal: alpha must be a real scalar or a shape (3,) array, got str"),
    (dict(reduction="avg"), ValueError,
     "softmax_focal: reduction must be one of 'none', 'sum', 'mean', 'mean_positive', got "
     "'avg'"),
    (dict(label_smoothing=-0.1), ValueError,
     "softmax_focal: label_smoothing must be in [0, 1], got -0.1"),
    (dict(label_smoothing=1.5), ValueError,
     "softmax_focal: label_smoothing must be in [0, 1], got 1.5"),
    (dict(label_smoothing="0.1"), TypeError,
     "softmax_focal: label_smoothing must be a Python float in [0, 1], got str"),
    (dict(labels=T.float()), TypeError,
     "softmax_focal: labels must be an integer tensor of class indices, got dtype "
     "torch.float32"),
    (dict(labels=T[:3]), ValueError,
     "softmax_focal: labels must have shape (4,) (the shape of logits (4, 3) without dim 1), "
     "got shape (3,)"),
    (dict(labels=T[:, None]), ValueError,
     "softmax_focal: labels must have shape (4,) (the shape of logits (4, 3) without dim 1), "
     "got shape (4, 1)"),
    (dict(labels=[0, 1, 2, 0]), TypeError,
     "softmax_focal: labels must be a torch.Tensor, got list"),
    (dict(where=torch.ones(4)), TypeError,
     "softmax_focal: where must be a boolean tensor, got dtype torch.float32"),
    (dict(where=torch.ones(3, dtype=torch.bool)), ValueError,
     "softmax_focal: where must have shape (4,) (the shape of labels) or broadcast to it, got "
     "shape (3,)"),
    (dict(dim=2), ValueError,
     "softmax_focal: dim must be in [-2, 2) for logits with 2 dimension(s), got dim=2"),
    (dict(dim=1.0), TypeError, "softmax_focal: dim must be an int, got float"),
    (dict(ignore_index=0.5), TypeError,
     "softmax_focal: ignore_index must be an int or None, got float"),
    (dict(background_class=None), TypeError,
     "softmax_focal: background_class must be an int, got NoneType"),
    (dict(process_group=object()), ValueError,
     "softmax_focal: process_group was given but torch.distributed is not initialized"),
    (dict(labels=torch.tensor([0, 1, 3, 0])), ValueError,
     "softmax_focal: labels must be in [0, 3) or ignore_index=-100, got label 3 (C=3)"),
]


@pytest.mark.parametrize("kw,error,message", SOFTMAX_ERRORS,
                         ids=[m.split(": ")[1][:40] for _, _, m in SOFTMAX_ERRORS])
def test_softmax_focal_bad_arguments(kw, error, message):
  with pytest.raises(error, match=re.escape(message)):
    _softmax(**kw)


def test_labels_that_require_grad_are_rejected():
  with pytest.raises(ValueError, match=re.escape(
      "sigmoid_focal: labels gets no gradient from this loss; pass labels.detach()")):
    _sigmoid(labels=Y.clone().requires_grad_())
  with pytest.raises(ValueError, match=re.escape(
      "categorical_focal: targets gets no gradient from this loss; pass targets.detach()")):
    _categorical(targets=Y.clone().requires_grad_())


SIGMOID_ERRORS = [
    (dict(logits=Z.int()), TypeError,
     "sigmoid_focal: logits must be a floating-point tensor, got dtype torch.int32"),
    (dict(alpha=-1), ValueError,
     "sigmoid_focal: alpha must be in [0, 1] (alpha=None means no weighting), got -1.0"),
    (dict(alpha=1.5), ValueError, "sigmoid_focal: alpha must be in [0, 1]"),
    (dict(alpha=torch.ones(4)), ValueError,
     "sigmoid_focal: alpha must be a scalar or shape (3,) (one per entry of the last axis of "
     "logits), got shape (4,)"),
    (dict(gamma=-2.0), ValueError, "sigmoid_focal: gamma must be >= 0, got -2.0"),
    (dict(reduction="mean_negative"), ValueError, "sigmoid_focal: reduction must be one of"),
    (dict(label_smoothing=2.0), ValueError,
     "sigmoid_focal: label_smoothing must be in [0, 1], got 2.0"),
    (dict(labels=Y[:, :2]), ValueError,
     "sigmoid_focal: labels must have shape (4, 3) (the shape of logits), got shape (4, 2)"),
    (dict(labels=torch.ones(4, 3, dtype=torch.complex64)), TypeError,
     "sigmoid_focal: labels must be real numbers in [0, 1], got dtype torch.complex64"),
    (dict(where=torch.ones(4, dtype=torch.bool)), ValueError,
     "sigmoid_focal: where must have shape (4, 3) (the shape of labels) or broadcast to it, got "
     "shape (4,)"),
    (dict(alpha=torch.ones(3) / 2, dim=3), ValueError,
     "sigmoid_focal: dim must be in [-2, 2) for logits with 2 dimension(s), got dim=3"),
    (dict(labels=-Y), ValueError, "sigmoid_focal: labels must be in [0, 1], got -"),
]


@pytest.mark.parametrize("kw,error,message", SIGMOID_ERRORS,
                         ids=[m.split(": ")[1][:40] for _, _, m in SIGMOID_ERRORS])
def test_sigmoid_focal_bad_arguments(kw, error, message):
  with pytest.raises(error, match=re.escape(message)):
    _sigmoid(**kw)


CATEGORICAL_ERRORS = [
    (dict(logits=Z.long()), TypeError,
     "categorical_focal: logits must be a floating-point tensor, got dtype torch.int64"),
    (dict(targets=T), TypeError,
     "categorical_focal: targets must be a floating-point tensor, got dtype torch.int64"),
    (dict(targets=Y[:3]), ValueError,
     "categorical_focal: targets must have shape (4, 3) (the shape of logits), got shape "
     "(3, 3)"),
    (dict(gamma=-1.0), ValueError, "categorical_focal: gamma must be >= 0, got -1.0"),
    (dict(alpha=torch.ones(2)), ValueError,
     "categorical_focal: alpha must be a scalar or shape (3,) (one per class), got shape (2,)"),
    (dict(reduction=None), ValueError, "categorical_focal: reduction must be one of"),
    (dict(where=torch.ones(4, 3, dtype=torch.bool)), ValueError,
     "categorical_focal: where must have shape (4,) (the shape of logits (4, 3) without dim 1) "
     "or broadcast to it, got shape (4, 3)"),
    (dict(dim=-3), ValueError,
     "categorical_focal: dim must be in [-2, 2) for logits with 2 dimension(s), got dim=-3"),
]


@pytest.mark.parametrize("kw,error,message", CATEGORICAL_ERRORS,
                         ids=[m.split(": ")[1][:40] for _, _, m in CATEGORICAL_ERRORS])
def test_categorical_focal_bad_arguments(kw, error, message):
  with pytest.raises(error, match=re.escape(message)):
    _categorical(**kw)


MODULE_ERRORS = [
    (focal_torch.SoftmaxFocalLoss, dict(gamma=-1), ValueError,
     "SoftmaxFocalLoss: gamma must be >= 0, got -1"),
    (focal_torch.SoftmaxFocalLoss, dict(alpha=torch.ones(2, 2)), ValueError,
     "SoftmaxFocalLoss: alpha must be a scalar or shape (C,) (one weight per class), got shape "
     "(2, 2)"),
    (focal_torch.SoftmaxFocalLoss, dict(reduction="batchmean"), ValueError,
     "SoftmaxFocalLoss: reduction must be one of"),
    (focal_torch.SoftmaxFocalLoss, dict(label_smoothing=1.01), ValueError,
     "SoftmaxFocalLoss: label_smoothing must be in [0, 1], got 1.01"),
    (focal_torch.SoftmaxFocalLoss, dict(ignore_index="pad"), TypeError,
     "SoftmaxFocalLoss: ignore_index must be an int or None, got str"),
    (focal_torch.SoftmaxFocalLoss, dict(dim="1"), TypeError,
     "SoftmaxFocalLoss: dim must be an int, got str"),
    (focal_torch.SigmoidFocalLoss, dict(alpha=2.0), ValueError,
     "SigmoidFocalLoss: alpha must be in [0, 1]"),
    (focal_torch.SigmoidFocalLoss, dict(gamma=torch.tensor(-1.0)), ValueError,
     "SigmoidFocalLoss: gamma must be >= 0, got -1.0"),
    (focal_torch.SigmoidFocalLoss, dict(reduction="elementwise"), ValueError,
     "SigmoidFocalLoss: reduction must be one of"),
    (focal_torch.CategoricalFocalLoss, dict(gamma=torch.tensor([1.0, -2.0])), ValueError,
     "CategoricalFocalLoss: gamma must be >= 0, got [1.0, -2.0]"),
    (focal_torch.CategoricalFocalLoss, dict(background_class=1.5), TypeError,
     "CategoricalFocalLoss: background_class must be an int, got float"),
]


@pytest.mark.parametrize("cls,kw,error,message", MODULE_ERRORS,
                         ids=[m[:50] for *_, m in MODULE_ERRORS])
def test_modules_check_hyperparameters_at_construction(cls, kw, error, message):
  with pytest.raises(error, match=re.escape(message)):
    cls(**kw)


def test_modules_check_shapes_at_call():
  loss_fn = focal_torch.SoftmaxFocalLoss(alpha=torch.ones(5))
  with pytest.raises(ValueError, match=re.escape(
      "softmax_focal: alpha must be a scalar or shape (3,) (one weight per class), got shape "
      "(5,)")):
    loss_fn(Z, T)


def test_value_checks_takes_a_bool():
  with pytest.raises(TypeError, match="value_checks: enabled must be a bool, got int"):
    focal_torch.value_checks(0)
