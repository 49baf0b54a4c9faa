"""README "Migrating" rows: each documented call of ours reproduces the other library's numbers.

Every row is checked in both packages (``focal_jax`` and ``focal_torch``, the same keywords
apart from ``axis``/``dim``), in float64, value and gradient, against a float64 NumPy formula
of that library's own convention (``parity_tests.migration_refs``, written from its
documentation and source; gradients by central finite differences of that formula). Where a
row has a documented caveat (kornia's one-hot epsilon, kornia's and 004's per-term factors on
soft labels, the blog's broadcast of ``weights[target]``), a test shows the divergence is real
and as small or as narrow as the README says.

Rows that need ``sample_weight=`` (a scalar with ``alpha=None`` for the one-alpha-on-both-terms
binary losses of seeds 001 and 004; per-entry weights for kornia's ``weight``/``pos_weight``,
mmcv's ``weight`` and the blog's literal broadcast) have ``sample_weight`` in their names;
mmdet's weighted cases (its (N,) ``weight``) pass it too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import focal_jax
import focal_torch
from parity_tests import migration_refs as refs

RTOL = 1e-10  # float64 value against a float64 formula
GRAD_RTOL, GRAD_ATOL = 1e-6, 1e-8  # against central differences (h = 1e-6) of the formula


class Fw:
  """One package, with the little that differs in spelling between the two."""

  def __init__(self, name: str):
    self.name = name
    self.mod = focal_jax if name == "jax" else focal_torch

  def arr(self, a):
    if self.name == "jax":
      return jnp.asarray(a)
    return torch.as_tensor(np.asarray(a))

  def cls(self, k: int) -> dict:
    return {"axis": k} if self.name == "jax" else {"dim": k}

  def one_hot(self, labels, num_classes: int, like):
    """Integer labels in [0, C] -> (N, C) float targets; the label C gives an all-zero row."""
    if self.name == "jax":
      return jax.nn.one_hot(labels, num_classes, dtype=like.dtype)
    return F.one_hot(labels, num_classes + 1)[:, :num_classes].to(like.dtype)

  def __repr__(self):
    return self.name


FWS = [Fw("jax"), Fw("torch")]
fws = pytest.mark.parametrize("fw", FWS, ids=str)


def _value_and_grad(fw: Fw, call, x: np.ndarray, cot: np.ndarray):
  """Our value and d(sum(value * cot))/dx, as float64 NumPy arrays."""
  if fw.name == "jax":
    c = jnp.asarray(cot)

    def f(z):
      out = call(fw, z)
      return jnp.sum(out * c), out

    # One jit per call: compiling the whole graph once is far faster than eager op-by-op.
    (_, out), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(x))
    assert out.dtype == jnp.float64 and g.dtype == jnp.float64
    return np.asarray(out), np.asarray(g)
  z = torch.tensor(x, requires_grad=True)
  out = call(fw, z)
  (out * torch.as_tensor(cot)).sum().backward()
  assert out.dtype == torch.float64 and z.grad.dtype == torch.float64
  return out.detach().numpy(), z.grad.numpy()


def _check(fw: Fw, call, ref, x: np.ndarray, seed: int = 0):
  """Value and gradient of ``call`` (ours) against ``ref`` (the other library's formula)."""
  want = np.asarray(ref(x))
  cot = np.random.default_rng(seed).normal(size=want.shape) if want.ndim else np.float64(1.0)
  got, got_grad = _value_and_grad(fw, call, x, cot)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-14)
  want_grad = refs.fd_grad(lambda z: np.sum(np.asarray(ref(z)) * cot), x)
  np.testing.assert_allclose(got_grad, want_grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)
  return got, got_grad


def _logits(shape, seed=0, scale=1.5):
  return np.random.default_rng(seed).normal(size=shape) * scale


# ----------------------------------------------------------------------------------------------
# kornia focal_loss (multi-class)


def _kornia_alpha(fw: Fw, alpha, weight, num_classes):
  """kornia's scalar alpha means class weights [1 - a, a, ..., a]; its ``weight`` multiplies."""
  a = None
  if alpha is not None:
    a = np.array([1.0 - alpha] + [alpha] * (num_classes - 1))
  if weight is not None:
    a = np.asarray(weight, np.float64) * (1.0 if a is None else a)
  return None if a is None else fw.arr(a)


def _kornia_focal_ours(alpha, gamma, reduction, weight=None, ignore_index=-100):
  """The README row: kornia "mean" (over N x C x positions, ignored included) is our "sum"
  divided by the logits' size; kornia "none" (N, C, *) summed over C is our "none"."""

  def call(fw: Fw, x, labels):
    out = fw.mod.softmax_focal(
        x, fw.arr(labels), alpha=_kornia_alpha(fw, alpha, weight, x.shape[1]), gamma=gamma,
        ignore_index=ignore_index, reduction="sum" if reduction == "mean" else reduction,
        **fw.cls(1))
    return out / math.prod(x.shape) if reduction == "mean" else out

  return call


KORNIA_FOCAL_CASES = [
    # shape, alpha, gamma, reduction, weight, ignored positions
    ((6, 4), 0.25, 2.0, "mean", None, False),
    ((6, 4), None, 2.0, "sum", None, False),
    ((2, 3, 5), 0.75, 0.5, "none", None, True),
    ((2, 4, 3, 2), 0.5, 2.0, "mean", None, True),
    ((2, 4, 3, 2), 0.25, 0.0, "sum", (0.5, 2.0, 1.0, 0.25), True),
    ((5, 3), None, 3.0, "mean", (1.0, 0.2, 3.0), False),
]


def _kornia_labels(shape, ignored, seed=1):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, shape[1], size=(shape[0],) + shape[2:])
  if ignored:
    labels.reshape(-1)[::4] = -100
  return labels


@fws
@pytest.mark.parametrize("case", KORNIA_FOCAL_CASES, ids=str)
def test_kornia_focal_loss(fw, case):
  shape, alpha, gamma, reduction, weight, ignored = case
  x, labels = _logits(shape), _kornia_labels(shape, ignored)
  ours = _kornia_focal_ours(alpha, gamma, reduction, weight)

  def ref(z):
    out = refs.kornia_focal_loss(z, labels, alpha, gamma, reduction, weight=weight,
                                 ignore_index=-100, one_hot_eps=0.0)
    return out.sum(axis=1) if reduction == "none" else out

  _check(fw, lambda fw_, z: ours(fw_, z, labels), ref, x)


@fws
def test_kornia_focal_loss_ignore_index_is_our_where(fw):
  """kornia's ignore_index written as ``where=labels != ignore_index`` (labels cleaned)."""
  shape = (2, 4, 3, 2)
  x, labels = _logits(shape, seed=4), _kornia_labels(shape, True, seed=5)
  labels = np.where(labels == -100, 255, labels)  # an ignore_index above the classes
  valid = labels != 255

  def ours(fw_, z):
    out = fw_.mod.softmax_focal(z, fw_.arr(np.where(valid, labels, 0)),
                                alpha=_kornia_alpha(fw_, 0.25, None, 4), gamma=2.0,
                                where=fw_.arr(valid), ignore_index=None, reduction="sum",
                                **fw_.cls(1))
    return out / math.prod(z.shape)

  _check(fw, ours, lambda z: refs.kornia_focal_loss(z, labels, 0.25, 2.0, "mean",
                                                     ignore_index=255, one_hot_eps=0.0), x)


@fws
def test_kornia_focal_loss_one_hot_eps_is_the_only_difference(fw):
  """kornia's one_hot adds 1e-6 to every off-target class (``onehot * (1 - eps) + eps``): its
  numbers sit ~1e-6 x C relative from ours, and the difference is really there."""
  shape = (4, 5, 3)
  x, labels = _logits(shape, seed=2), _kornia_labels(shape, False, seed=3)
  ours = _kornia_focal_ours(0.25, 2.0, "mean")
  got, got_grad = _value_and_grad(fw, lambda fw_, z: ours(fw_, z, labels), x, np.float64(1.0))
  kornia = refs.kornia_focal_loss(x, labels, 0.25, 2.0, "mean")  # eps = 1e-6, as kornia
  kornia_grad = refs.fd_grad(lambda z: refs.kornia_focal_loss(z, labels, 0.25, 2.0, "mean"), x)
  np.testing.assert_allclose(got, kornia, rtol=2e-5)
  np.testing.assert_allclose(got_grad, kornia_grad, rtol=0, atol=2e-6 * np.abs(kornia_grad).max())
  assert not np.isclose(got, kornia, rtol=1e-8, atol=0)


# ----------------------------------------------------------------------------------------------
# kornia binary_focal_loss_with_logits


def _kornia_binary_ours(alpha, gamma, reduction, masked):
  """The README row: kornia's ignore_index -> ``where`` (masked labels replaced by 0); kornia
  "mean" over every entry (ignored included) -> our "sum" / size when entries are masked."""

  def call(fw: Fw, x, labels):
    kw = {}
    red = reduction
    if masked:
      valid = labels != -100
      labels = np.where(valid, labels, 0.0)
      kw["where"] = fw.arr(valid)
      red = "sum" if reduction == "mean" else reduction
    out = fw.mod.sigmoid_focal(x, fw.arr(labels), alpha=alpha, gamma=gamma, reduction=red, **kw)
    return out / math.prod(x.shape) if (masked and reduction == "mean") else out

  return call


KORNIA_BINARY_CASES = [
    # shape, alpha, gamma, reduction, masked
    ((6, 3), 0.25, 2.0, "mean", False),
    ((6, 3), None, 2.0, "sum", False),
    ((2, 3, 5), 0.8, 0.5, "none", False),
    ((2, 2, 3, 3), 0.25, 2.0, "mean", True),
    ((2, 2, 3, 3), 0.6, 0.0, "none", True),
    ((4, 1, 5), 0.25, 3.0, "sum", True),
]


def _binary_labels(shape, masked, seed=1):
  labels = np.random.default_rng(seed).integers(0, 2, size=shape).astype(np.float64)
  if masked:
    labels.reshape(-1)[1::5] = -100
  return labels


@fws
@pytest.mark.parametrize("case", KORNIA_BINARY_CASES, ids=str)
def test_kornia_binary_focal_loss_with_logits(fw, case):
  shape, alpha, gamma, reduction, masked = case
  x, labels = _logits(shape), _binary_labels(shape, masked)
  ours = _kornia_binary_ours(alpha, gamma, reduction, masked)
  _check(fw, lambda fw_, z: ours(fw_, z, labels),
         lambda z: refs.kornia_binary_focal_loss_with_logits(z, labels, alpha, gamma, reduction),
         x)


@fws
@pytest.mark.parametrize("with_weight,with_pos_weight", [(True, False), (False, True),
                                                         (True, True)])
def test_kornia_binary_weight_and_pos_weight_are_sample_weight(fw, with_weight, with_pos_weight):
  """kornia's per-class ``weight`` and ``pos_weight`` (class axis 1), for hard labels:
  ``sample_weight = weight[c] * (1 + (pos_weight[c] - 1) * y)`` shaped (C, 1, ...)."""
  shape = (3, 4, 5)
  x, labels = _logits(shape, seed=6), _binary_labels(shape, False, seed=7)
  weight = np.array([0.5, 1.0, 2.0, 0.1]) if with_weight else None
  pos_weight = np.array([3.0, 1.0, 0.5, 2.0]) if with_pos_weight else None
  sw = np.ones(shape)
  if weight is not None:
    sw = sw * weight.reshape(4, 1)
  if pos_weight is not None:
    sw = sw * (1.0 + (pos_weight.reshape(4, 1) - 1.0) * labels)

  def ours(fw_, z):
    return fw_.mod.sigmoid_focal(z, fw_.arr(labels), alpha=0.25, gamma=2.0, reduction="mean",
                                 sample_weight=fw_.arr(sw))

  _check(fw, ours, lambda z: refs.kornia_binary_focal_loss_with_logits(
      z, labels, 0.25, 2.0, "mean", pos_weight=pos_weight, weight=weight), x)


@fws
def test_kornia_binary_soft_labels_diverge(fw):
  """Caveat of the row: kornia puts ``(1 - p) ** gamma`` on the positive and ``p ** gamma`` on
  the negative term; ours ``(1 - p_t) ** gamma`` on both. Equal for hard labels only."""
  shape = (4, 3)
  x = _logits(shape, seed=8)
  soft = np.random.default_rng(9).uniform(0.1, 0.9, size=shape)
  ours = _kornia_binary_ours(0.25, 2.0, "none", False)
  got, _ = _value_and_grad(fw, lambda fw_, z: ours(fw_, z, soft), x, np.ones(shape))
  kornia = refs.kornia_binary_focal_loss_with_logits(x, soft, 0.25, 2.0, "none")
  assert not np.allclose(got, kornia, rtol=1e-3)
  hard = (soft > 0.5).astype(np.float64)
  got, _ = _value_and_grad(fw, lambda fw_, z: ours(fw_, z, hard), x, np.ones(shape))
  np.testing.assert_allclose(
      got, refs.kornia_binary_focal_loss_with_logits(x, hard, 0.25, 2.0, "none"), rtol=RTOL)


# ----------------------------------------------------------------------------------------------
# mmcv ops.sigmoid_focal_loss and mmdet py_sigmoid_focal_loss (integer labels, C = background)


def _mmcv_ours(alpha, gamma, reduction, weight=None):
  """The README row: one-hot targets with the label C as an all-zero row; mmcv's "mean" is the
  sum divided by N."""

  def call(fw: Fw, x, labels):
    kw = {}
    if weight is not None:  # mmcv's (C,) weight, taken at the row's label
      kw["sample_weight"] = fw.arr(np.asarray(weight)[labels][:, None])
    y = fw.one_hot(fw.arr(labels), x.shape[1], x)
    out = fw.mod.sigmoid_focal(x, y, alpha=alpha, gamma=gamma,
                               reduction="sum" if reduction == "mean" else reduction, **kw)
    return out / x.shape[0] if reduction == "mean" else out

  return call


MMCV_CASES = [
    # (N, C), alpha, gamma, reduction
    ((6, 4), 0.25, 2.0, "mean"),
    ((6, 4), 0.5, 0.5, "sum"),
    ((5, 3), 0.75, 0.0, "none"),
    ((8, 2), 0.25, 3.0, "mean"),
]


def _mmcv_labels(n, c, seed=1):
  labels = np.random.default_rng(seed).integers(0, c + 1, size=n)  # c: background
  labels[0], labels[1] = c, 0  # at least one background row and one positive
  return labels


@fws
@pytest.mark.parametrize("case", MMCV_CASES, ids=str)
def test_mmcv_sigmoid_focal_loss(fw, case):
  (n, c), alpha, gamma, reduction = case
  x, labels = _logits((n, c)), _mmcv_labels(n, c)
  _, got_grad = _check(fw, lambda fw_, z: _mmcv_ours(alpha, gamma, reduction)(fw_, z, labels),
                       lambda z: refs.mmcv_sigmoid_focal_loss(z, labels, gamma, alpha, None,
                                                              reduction), x)
  if reduction != "none":  # mmcv's own backward kernel, in closed form
    np.testing.assert_allclose(
        got_grad, refs.mmcv_sigmoid_focal_loss_grad(x, labels, gamma, alpha, None, reduction),
        rtol=1e-9, atol=1e-14)


@fws
def test_mmcv_sigmoid_focal_loss_weight_is_sample_weight(fw):
  """mmcv's (C,) ``weight`` is read at the row's label (labels < C: at C it reads past the
  end): ``sample_weight=weight[labels][:, None]``."""
  n, c = 6, 4
  x = _logits((n, c), seed=3)
  labels = np.random.default_rng(4).integers(0, c, size=n)
  weight = np.array([0.5, 2.0, 1.0, 0.25])
  _check(fw, lambda fw_, z: _mmcv_ours(0.25, 2.0, "mean", weight)(fw_, z, labels),
         lambda z: refs.mmcv_sigmoid_focal_loss(z, labels, 2.0, 0.25, weight, "mean"), x)


# mmcv's own tests (tests/test_ops/test_focal_loss.py): inputs, labels and the float32 loss and
# gradient its sigmoid_focal_loss gives (alpha 0.25, gamma 2, "mean").
MMCV_RECORDED = [
    ([[1., 0], [0, 1.]], [0, 1],
     0.13562961, [[-0.00657264, 0.11185755], [0.11185755, -0.00657264]]),
    ([[1., 0, -1.], [0, 1., 2.]], [2, 1],
     1.10251057, [[0.28808805, 0.11185755, -0.09602935], [0.11185755, -0.00657264, 0.40376765]]),
    ([[1e-6, 2e-6, 3e-6], [4e-6, 5e-5, 6e-4], [7e-3, 8e-2, 9e-1]], [1, 2, 0],
     0.42287254, [[0.07457182, -0.02485716, 0.07457201], [0.07457211, 0.07457669, -0.02483728],
                  [-0.02462499, 0.08277918, 0.18050370]]),
]


@fws
@pytest.mark.parametrize("k", range(len(MMCV_RECORDED)))
def test_mmcv_recorded_values(fw, k):
  """The row against numbers mmcv itself produced (float32, 8 digits)."""
  x, labels, loss, grad = MMCV_RECORDED[k]
  x, labels = np.asarray(x, np.float64), np.asarray(labels)
  got, got_grad = _value_and_grad(fw, lambda fw_, z: _mmcv_ours(0.25, 2.0, "mean")(fw_, z, labels),
                                  x, np.float64(1.0))
  np.testing.assert_allclose(got, loss, rtol=1e-6)
  np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-7)


MMDET_CASES = [
    # (N, C), reduction, avg_factor ("pos": the number of positive rows), row weights
    ((6, 4), "mean", None, False),
    ((6, 4), "mean", "pos", False),
    ((5, 3), "sum", None, True),
    ((7, 3), "mean", "pos", True),
]


@fws
@pytest.mark.parametrize("case", MMDET_CASES, ids=str)
def test_mmdet_py_sigmoid_focal_loss(fw, case):
  """mmdet's python reference: its "mean" is over N x C (ours "mean"); with
  ``avg_factor=num_pos`` it is ours "mean_positive" (mmdet adds float32 eps, 1.2e-7, to the
  denominator: rtol 1e-6); its (N,) ``weight`` is ``sample_weight=weight[:, None]``."""
  (n, c), reduction, avg, weighted = case
  x, labels = _logits((n, c), seed=5), _mmcv_labels(n, c, seed=6)
  weight = np.random.default_rng(7).uniform(0.0, 2.0, size=n) if weighted else None
  avg_factor = float(np.sum(labels < c)) if avg == "pos" else None

  def ours(fw_, z):
    kw = {} if weight is None else {"sample_weight": fw_.arr(weight[:, None])}
    red = "mean_positive" if avg == "pos" else reduction
    return fw_.mod.sigmoid_focal(z, fw_.one_hot(fw_.arr(labels), c, z), alpha=0.25, gamma=2.0,
                                 reduction=red, **kw)

  def ref(z):
    return refs.mmdet_py_sigmoid_focal_loss(z, labels, weight, 2.0, 0.25, reduction, avg_factor)

  if avg is None:
    _check(fw, ours, ref, x)
    return
  got, got_grad = _value_and_grad(fw, ours, x, np.float64(1.0))
  np.testing.assert_allclose(got, ref(x), rtol=1e-6)
  np.testing.assert_allclose(got_grad, refs.fd_grad(ref, x), rtol=1e-6, atol=GRAD_ATOL)


# ----------------------------------------------------------------------------------------------
# seed 001: the blog's FocalLossBinary, FocalLossMultiClass, WeightedFocalLoss


@fws
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.6, 0.5), (1.0, 3.0)])
def test_seed001_binary_sample_weight(fw, alpha, gamma):
  """One alpha on both terms: ``alpha=None, sample_weight=alpha``, "mean"."""
  x = _logits((12,), seed=10)
  labels = np.random.default_rng(11).integers(0, 2, size=12).astype(np.float64)
  _check(fw, lambda fw_, z: fw_.mod.sigmoid_focal(z, fw_.arr(labels), alpha=None, gamma=gamma,
                                                  sample_weight=alpha, reduction="mean"),
         lambda z: refs.blog001_binary(z, labels, gamma, alpha), x)


@fws
@pytest.mark.parametrize("alpha,gamma", [(None, 2.0), ((0.1, 0.9, 0.8, 0.7, 0.6), 2.0),
                                         ((1.0, 2.0, 0.5, 1.0, 0.25), 0.5)])
def test_seed001_multiclass(fw, alpha, gamma):
  n, c = 7, 5
  x = _logits((n, c), seed=12)
  labels = np.random.default_rng(13).integers(0, c, size=n)
  a = None if alpha is None else np.asarray(alpha)

  def ours(fw_, z):
    return fw_.mod.softmax_focal(z, fw_.arr(labels), alpha=None if a is None else fw_.arr(a),
                                 gamma=gamma, ignore_index=None, reduction="mean", **fw_.cls(1))

  _check(fw, ours, lambda z: refs.blog001_multiclass(z, labels, gamma, alpha, c), x)


WEIGHTS_001 = (0.1, 0.9, 0.8, 0.7, 0.6)


@fws
def test_seed001_weighted_intent_is_alpha(fw):
  """``WeightedFocalLoss(weights=w)`` as the blog describes it (class weights at the label):
  ``alpha=w``, "mean"; the blog's FocalLossMultiClass(alpha=w) is that formula."""
  n, c = 7, 5
  x = _logits((n, c), seed=14)
  labels = np.random.default_rng(15).integers(0, c, size=n)
  with pytest.raises(ValueError):  # N != C: the blog's own broadcast fails (so does torch's)
    refs.blog001_weighted(x, labels, 2.0, WEIGHTS_001, c)

  def ours(fw_, z):
    return fw_.mod.softmax_focal(z, fw_.arr(labels), alpha=fw_.arr(np.asarray(WEIGHTS_001)),
                                 gamma=2.0, ignore_index=None, reduction="mean", **fw_.cls(1))

  _check(fw, ours, lambda z: refs.blog001_multiclass(z, labels, 2.0, WEIGHTS_001, c), x)


@fws
def test_seed001_weighted_literal_broadcast_sample_weight(fw):
  """The blog's code as it runs (N == C): row i weighted by ``w[t[t[i]]]``; reproduced with
  ``sample_weight=w[t][t]`` (and shown to differ from the intended ``alpha=w``)."""
  c = 5
  x = _logits((c, c), seed=16)
  labels = np.array([3, 0, 4, 4, 1])
  w = np.asarray(WEIGHTS_001)

  def ours(fw_, z):
    return fw_.mod.softmax_focal(z, fw_.arr(labels), gamma=2.0,
                                 sample_weight=fw_.arr(w[labels][labels]), ignore_index=None,
                                 reduction="mean", **fw_.cls(1))

  literal = refs.blog001_weighted(x, labels, 2.0, w, c)
  assert not np.isclose(literal, refs.blog001_multiclass(x, labels, 2.0, w, c), rtol=1e-3)
  _check(fw, ours, lambda z: refs.blog001_weighted(z, labels, 2.0, w, c), x)


@fws
def test_seed001_weighted_without_weights(fw):
  """``WeightedFocalLoss(weights=None)`` returns the unreduced (N, C) matrix, the loss in the
  label's column: its row sums are our ``reduction="none"``."""
  n, c = 6, 4
  x = _logits((n, c), seed=17)
  labels = np.random.default_rng(18).integers(0, c, size=n)
  _check(fw, lambda fw_, z: fw_.mod.softmax_focal(z, fw_.arr(labels), gamma=2.0,
                                                  ignore_index=None, reduction="none",
                                                  **fw_.cls(1)),
         lambda z: refs.blog001_weighted(z, labels, 2.0, None, c).sum(axis=1), x)


# ----------------------------------------------------------------------------------------------
# seed 003: the AD-conversion model's FocalLoss (alpha for the positive class, smoothed targets)


@fws
@pytest.mark.parametrize("alpha,gamma,eps,reduction", [
    (0.90, 3.0, 0.05, "mean"), (0.75, 2.0, 0.0, "mean"), (0.5, 2.0, 0.1, "sum"),
    (0.25, 2.0, 0.05, "none")])
def test_seed003_focal_loss(fw, alpha, gamma, eps, reduction):
  """``categorical_focal(logits, onehot * (1 - eps) + eps / 2, alpha=[1 - a, a])``."""
  n = 8
  x = _logits((n, 2), seed=19)
  labels = np.random.default_rng(20).integers(0, 2, size=n)
  targets = np.eye(2)[labels] * (1.0 - eps) + eps / 2

  def ours(fw_, z):
    return fw_.mod.categorical_focal(z, fw_.arr(targets),
                                     alpha=fw_.arr(np.array([1 - alpha, alpha])), gamma=gamma,
                                     reduction=reduction, **fw_.cls(1))

  _check(fw, ours, lambda z: refs.ad003_focal(z, labels, alpha, gamma, reduction, eps), x)


@fws
def test_seed003_without_smoothing_is_softmax_focal(fw):
  n = 8
  x = _logits((n, 2), seed=21)
  labels = np.random.default_rng(22).integers(0, 2, size=n)

  def ours(fw_, z):
    return fw_.mod.softmax_focal(z, fw_.arr(labels), alpha=fw_.arr(np.array([0.1, 0.9])),
                                 gamma=3.0, ignore_index=None, reduction="mean", **fw_.cls(1))

  _check(fw, ours, lambda z: refs.ad003_focal(z, labels, 0.9, 3.0, "mean", 0.0), x)


# ----------------------------------------------------------------------------------------------
# seed 004: the focal_loss repository's task types


def _fl004_sigmoid_ours(alpha, gamma, reduction, convention):
  """README formula (one alpha on both terms): ``alpha=None, sample_weight=alpha``;
  its code (torchvision's alpha_t): ``alpha=alpha``."""

  def call(fw: Fw, x, labels):
    kw = {"alpha": alpha}
    if convention == "readme":
      kw = {"alpha": None}
      if alpha is not None:
        kw["sample_weight"] = alpha
    return fw.mod.sigmoid_focal(x, fw.arr(labels), gamma=gamma, reduction=reduction, **kw)

  return call


FL004_SIGMOID_CASES = [
    # task type, alpha, gamma, reduction
    ("binary", 0.25, 2.0, "mean"),
    ("binary", None, 2.0, "sum"),
    ("binary", 0.75, 0.5, "none"),
    ("multi-label", 0.25, 2.0, "mean"),
    ("multi-label", None, 3.0, "none"),
]


def _fl004_sigmoid_ids(case):
  return "-".join(str(v) for v in case)


@fws
@pytest.mark.parametrize("case", FL004_SIGMOID_CASES, ids=_fl004_sigmoid_ids)
def test_seed004_sigmoid_readme_formula_sample_weight(fw, case):
  task, alpha, gamma, reduction = case
  shape = (12,) if task == "binary" else (6, 5)
  x = _logits(shape, seed=23)
  labels = np.random.default_rng(24).integers(0, 2, size=shape).astype(np.float64)
  _check(fw, lambda fw_, z: _fl004_sigmoid_ours(alpha, gamma, reduction, "readme")(fw_, z, labels),
         lambda z: refs.fl004(z, labels, gamma, alpha, reduction, task, convention="readme"), x)


@fws
@pytest.mark.parametrize("case", FL004_SIGMOID_CASES, ids=_fl004_sigmoid_ids)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_seed004_sigmoid_code(fw, case, soft):
  """004's focal_loss.py puts alpha_t on the two terms (unlike its README): ``alpha=alpha``;
  exact for soft labels too."""
  task, alpha, gamma, reduction = case
  shape = (12,) if task == "binary" else (6, 5)
  x = _logits(shape, seed=25)
  rng = np.random.default_rng(26)
  labels = rng.uniform(size=shape) if soft else rng.integers(0, 2, size=shape).astype(np.float64)
  _check(fw, lambda fw_, z: _fl004_sigmoid_ours(alpha, gamma, reduction, "code")(fw_, z, labels),
         lambda z: refs.fl004(z, labels, gamma, alpha, reduction, task, convention="code"), x)


@fws
@pytest.mark.parametrize("alpha,gamma,reduction,convention", [
    ((1.0,) * 5, 2.0, "mean", "readme"), ((0.5, 1.0, 2.0, 0.25, 1.0), 0.5, "sum", "readme"),
    (None, 2.0, "none", "readme"), ((0.5, 1.0, 2.0, 0.25, 1.0), 2.0, "mean", "code"),
    (None, 3.0, "none", "code")])
def test_seed004_multiclass(fw, alpha, gamma, reduction, convention):
  """README: summed over classes, averaged over the batch: ``reduction="mean"``; its code's
  ``loss.mean()`` is over N x C: our "mean" / C; its code's "none" is (N, C), the loss in the
  label's column (row sums: our "none")."""
  n, c = 7, 5
  x = _logits((n, c), seed=27)
  labels = np.random.default_rng(28).integers(0, c, size=n)

  def ours(fw_, z):
    out = fw_.mod.softmax_focal(z, fw_.arr(labels),
                                alpha=None if alpha is None else fw_.arr(np.asarray(alpha)),
                                gamma=gamma, ignore_index=None, reduction=reduction, **fw_.cls(1))
    return out / c if (convention == "code" and reduction == "mean") else out

  def ref(z):
    out = refs.fl004(z, labels, gamma, alpha, reduction, "multi-class", c, convention)
    return out.sum(axis=1) if (convention == "code" and reduction == "none") else out

  _check(fw, ours, ref, x)


@fws
def test_seed004_readme_and_code_differ_on_alpha(fw):
  """The two conventions of 004 are really different (so the README row names both)."""
  x = _logits((12,), seed=29)
  labels = np.random.default_rng(30).integers(0, 2, size=12).astype(np.float64)
  readme = refs.fl004(x, labels, 2.0, 0.25, "mean", "binary", convention="readme")
  code = refs.fl004(x, labels, 2.0, 0.25, "mean", "binary", convention="code")
  assert not np.isclose(readme, code, rtol=1e-3)
  ours = _fl004_sigmoid_ours(0.25, 2.0, "mean", "code")
  got, _ = _value_and_grad(fw, lambda fw_, z: ours(fw_, z, labels), x, np.float64(1.0))
  np.testing.assert_allclose(got, code, rtol=RTOL)
