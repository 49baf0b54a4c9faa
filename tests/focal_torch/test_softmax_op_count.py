"""The eager long-row softmax path (C > RECOMPUTE_MAX_CLASSES): how many operators over
logits-sized tensors one forward + backward issues, that its per-row math opens no parallel
region, and its values against float64.

On a loaded machine each parallel region waits for a descheduled thread, so the step's time
follows their number (BENCHMARKS.md, "torch eager softmax: short rows, and (16384, 91) under
load"). The reference checks force every class count onto the long-row path
(``RECOMPUTE_MAX_CLASSES = 0``), which the other modules reach only at C > 32, and cover the
CPU softmax form's exact fallback (extreme margins, non-finite rows, a single class).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

import focal_torch
from focal_torch import _chunking
from focal_torch import _softmax

# Operators whose work scales with the logits in one eager forward + backward at (16384, 91),
# float32, gamma 2, mean. At f2f449a (before the fused row statistics and gradient) there were
# 20: per chunk (two: 11522 and 4862 rows) copy_, amax, sub_, mul_, exp2_, sum and sub,
# mul_, exp2_, mul_. At 3b54b1b 4: _softmax and sum (one chunk), add and exp2_. Now 3: the
# forward's softmax is kept and becomes the gradient (_softmax, sum, mul_). F.cross_entropy
# has 2 by this count (_log_softmax and its backward) plus the zero fill inside
# nll_loss_backward.
MAX_LOGITS_SIZED_OPS = 3
# Tensor operations that touch no element (views, allocations) are not counted.
_NOT_COUNTED = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh"}


class _CountLarge(TorchDispatchMode):
  """Records each ATen operator that reads or writes a tensor of at least ``threshold``
  elements, except views, allocations and index-driven ones (an integer index of fewer
  elements: gathers and scatters of one entry a row, whose work scales with the rows)."""

  def __init__(self, threshold: int):
    super().__init__()
    self.threshold = threshold
    self.ops: list[str] = []

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    out = func(*args, **(kwargs or {}))
    name = func.overloadpacket.__name__
    if not func.is_view and name not in _NOT_COUNTED:
      tensors = [x for x in _pytree.tree_leaves((args, kwargs, out))
                 if isinstance(x, torch.Tensor)]
      large = any(x.numel() >= self.threshold for x in tensors)
      indexed = any(not x.is_floating_point() and x.dtype != torch.bool
                    and x.numel() < self.threshold for x in tensors)
      if large and not indexed:
        self.ops.append(str(func))
    return out


def _logits_sized_ops(fn, z: torch.Tensor) -> list[str]:
  counter = _CountLarge(z.numel() // 4)
  with counter:
    loss = fn(z)
    torch.autograd.grad(loss, z)
  return counter.ops


# ATen's CPU kernels of these open a parallel region from 2048 elements on (the rest from
# 32768), so a per-row exponential of a 16384-row batch waits like a logits-sized operator.
# At f2f449a one forward + backward at (16384, 91) ran 5 of them (exp of log p, log q and
# gamma log q; log of each of the two chunks' sums); now none.
_PARALLEL_FROM_2048 = {"exp", "exp_", "log", "log_", "log1p", "log1p_", "expm1", "expm1_",
                       "log2", "log2_", "log10", "log10_", "log_sigmoid_forward"}


class _CountPerRowTranscendentals(TorchDispatchMode):
  """Records each of :data:`_PARALLEL_FROM_2048` over at least 2048 elements."""

  def __init__(self):
    super().__init__()
    self.ops: list[str] = []

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    out = func(*args, **(kwargs or {}))
    if func.overloadpacket.__name__ in _PARALLEL_FROM_2048:
      tensors = [x for x in _pytree.tree_leaves((args, kwargs, out))
                 if isinstance(x, torch.Tensor)]
      if any(x.numel() >= 2048 for x in tensors):
        self.ops.append(str(func))
    return out


def test_long_rows_per_row_math_opens_no_parallel_region():
  g = torch.Generator().manual_seed(0)
  n, c = 16384, 91
  z = (2 * torch.randn(n, c, generator=g)).requires_grad_()
  t = torch.randint(0, c, (n,), generator=g)
  counter = _CountPerRowTranscendentals()
  with counter:
    loss = focal_torch.softmax_focal(z, t, gamma=2.0)
    torch.autograd.grad(loss, z)
  assert not counter.ops, counter.ops


def test_long_rows_forward_backward_issue_few_logits_sized_operators():
  g = torch.Generator().manual_seed(0)
  n, c = 16384, 91
  assert c > _softmax.RECOMPUTE_MAX_CLASSES  # the long-row path
  z = (2 * torch.randn(n, c, generator=g)).requires_grad_()
  t = torch.randint(0, c, (n,), generator=g)
  ops = _logits_sized_ops(lambda x: focal_torch.softmax_focal(x, t, gamma=2.0), z)
  assert len(ops) <= MAX_LOGITS_SIZED_OPS, ops


def test_long_rows_at_16384x91_match_float64(ref):
  g = torch.Generator().manual_seed(1)
  n, c = 16384, 91
  z64 = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
  z64[:64] *= 40  # margins in the hundreds: p rounds to 1 or to 0
  t = torch.randint(0, c, (n,), generator=g)
  z = z64.float().requires_grad_()
  loss = focal_torch.softmax_focal(z, t, gamma=2.0)
  grad = torch.autograd.grad(loss, z)[0].double().numpy()
  value, grad_ref = ref.softmax_focal(z.detach().double().numpy(), t.numpy(), gamma=2.0)
  np.testing.assert_allclose(loss.item(), value, rtol=1e-6)
  # The per-row scale rides in exp2's argument, held in float32 next to lse_rest: rows whose
  # logits reach a few hundred lose about one rounding of that size (1.5e-5 relative; the
  # logits themselves are held to 2e-5 there), the others a few 1e-6.
  np.testing.assert_allclose(grad[64:], grad_ref[64:], rtol=4e-6,
                             atol=1e-6 * np.abs(grad_ref).max())
  np.testing.assert_allclose(grad[:64], grad_ref[:64], rtol=3e-5,
                             atol=1e-6 * np.abs(grad_ref).max())


@pytest.fixture
def long_rows(monkeypatch):
  """Every class count on the long-row path, in chunks of 7 rows of 6 classes (several
  chunks, one ending short)."""
  monkeypatch.setattr(_softmax, "RECOMPUTE_MAX_CLASSES", 0)
  monkeypatch.setattr(_chunking, "CHUNK_ELEMENTS", 42)


def _check(ref, z64, labels, dtype, rtol, **kw):
  """Loss and gradient of ``softmax_focal`` in ``dtype`` against the float64 reference on
  the same (rounded) logits; the ``"none"`` gradient is that of the sum."""
  z = z64.to(dtype).requires_grad_()
  loss = focal_torch.softmax_focal(z, labels, **kw)
  (grad,) = torch.autograd.grad(loss.sum(), z)
  assert loss.dtype == dtype and grad.dtype == dtype
  value, grad_ref = ref.softmax_focal(z.detach().double().numpy(), labels.numpy(), **kw)
  loss, grad = loss.detach().double().numpy(), grad.double().numpy()
  np.testing.assert_allclose(loss, value, rtol=rtol, atol=rtol * np.abs(value).max())
  np.testing.assert_allclose(grad, grad_ref, rtol=rtol, atol=rtol * np.abs(grad_ref).max())


CASES = {
    "gamma2": dict(gamma=2.0),
    "gamma0": dict(gamma=0.0),
    "gamma_half_smoothed": dict(gamma=0.5, label_smoothing=0.1),
    "vectors_sum": dict(alpha=[0.25, 1.0, 0.5, 2.0, 0.75, 1.5],
                        gamma=[0.0, 0.5, 1.0, 2.0, 3.0, 0.3], reduction="sum",
                        label_smoothing=0.2),
    "none_ignore": dict(gamma=1.5, reduction="none", ignore_index=3),
}


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spatial", [False, True], ids=["rows", "spatial"])
def test_long_row_path_matches_float64_reference(ref, long_rows, case, dtype, rtol, spatial):
  g = torch.Generator().manual_seed(2)
  shape = (5, 6, 3, 2) if spatial else (23, 6)
  z64 = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
  labels = torch.randint(0, 6, shape[:1] + shape[2:], generator=g)
  labels.view(-1)[::4] = 3  # some ignored where ignore_index=3
  _check(ref, z64, labels, dtype, rtol, **CASES[case])


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -9)],
                         ids=["bf16", "f16"])
def test_long_row_path_half_precision_computes_in_float32(ref, long_rows, dtype, rtol):
  g = torch.Generator().manual_seed(3)
  z64 = 3 * torch.randn(31, 6, generator=g, dtype=torch.float64)
  labels = torch.randint(0, 6, (31,), generator=g)
  _check(ref, z64, labels, dtype, rtol, gamma=2.0, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("margin", [30.0, 100.0, 1e4])
def test_long_row_path_finite_and_accurate_at_extreme_margins(ref, long_rows, dtype, gamma,
                                                              margin):
  m = min(margin, torch.finfo(dtype).max / 4)
  z64 = torch.tensor([[m, 0.0, -m], [-m, m, 0.0], [0.0, 0.0, m], [m, m, -m]],
                     dtype=torch.float64)
  labels = torch.tensor([0, 0, 1, 1])
  for eps in (0.0, 0.1):
    z = z64.to(dtype).requires_grad_()
    loss = focal_torch.softmax_focal(z, labels, gamma=gamma, label_smoothing=eps,
                                     reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), z)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    value, grad_ref = ref.softmax_focal(z64.numpy(), labels.numpy(), gamma=gamma,
                                        label_smoothing=eps, reduction="none")
    rounded = torch.tensor(value).to(dtype).double().numpy()
    # (The float64 formula loses losses below 1e-16 of the row's scale: atol.)
    np.testing.assert_allclose(loss.detach().double().numpy(), rounded, rtol=2 ** -7,
                               atol=1e-12 * np.abs(value).max())
    np.testing.assert_allclose(grad.double().numpy(), grad_ref, rtol=2 ** -7,
                               atol=2 ** -7 * max(1.0, np.abs(grad_ref).max()))


def test_long_row_path_negative_upstream_gradient(ref, long_rows):
  # -loss: every row's scale a is negative (its sign is not in exp2's argument).
  g = torch.Generator().manual_seed(4)
  z64 = 2 * torch.randn(19, 6, generator=g, dtype=torch.float64)
  labels = torch.randint(0, 6, (19,), generator=g)
  weights = torch.linspace(-1.0, 1.0, 19, dtype=torch.float64)
  z = z64.float().requires_grad_()
  loss = focal_torch.softmax_focal(z, labels, gamma=2.0, label_smoothing=0.1, reduction="none")
  (grad,) = torch.autograd.grad((loss * weights.float()).sum(), z)
  _, grad_ref = ref.softmax_focal(z64.numpy(), labels.numpy(), gamma=2.0, label_smoothing=0.1,
                                  reduction="none")
  expected = grad_ref * weights.numpy()[:, None]
  np.testing.assert_allclose(grad.double().numpy(), expected, rtol=2e-5,
                             atol=2e-5 * np.abs(expected).max())


def test_long_row_path_non_finite_rows(long_rows):
  inf, nan = float("inf"), float("nan")
  z = torch.tensor([
      [1.0, 2.0, 0.5, -1.0],         # ordinary row
      [nan, 2.0, 0.5, -1.0],         # NaN logit: NaN loss and gradient
      [3.0, -inf, -inf, -inf],       # no other finite class: p = 1 exactly
      [1.0, nan, inf, -inf],         # masked (where False): 0 whatever the logits
      [-inf, 1.0, 0.0, 2.0],         # target logit -inf: loss inf
  ], requires_grad=True)
  labels = torch.tensor([1, 2, 0, 0, 0])
  where = torch.tensor([True, True, True, False, True])
  for gamma in (0.0, 0.5, 2.0):
    loss = focal_torch.softmax_focal(z, labels, gamma=gamma, where=where, reduction="none")
    (grad,) = torch.autograd.grad(loss[[0, 1, 2, 3]].sum(), z)
    assert torch.isfinite(loss[[0, 2, 3]]).all() and torch.isnan(loss[1])
    assert loss[2] == 0 and loss[3] == 0 and loss[4] == inf
    assert torch.isfinite(grad[[0, 2, 3]]).all() and torch.isnan(grad[1]).any()
    assert (grad[2] == 0).all() and (grad[3] == 0).all() and (grad[4] == 0).all()


def test_long_row_path_gradcheck(long_rows):
  g = torch.Generator().manual_seed(5)
  z = (2 * torch.randn(9, 6, generator=g, dtype=torch.float64)).requires_grad_()
  labels = torch.randint(0, 6, (9,), generator=g)
  for kw in (dict(gamma=2.0), dict(gamma=0.5, label_smoothing=0.1, alpha=0.3)):
    fn = lambda x: focal_torch.softmax_focal(x, labels, **kw)  # pylint: disable=W0640
    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))


def test_long_row_path_single_class_gives_zero(long_rows):
  z = torch.randn(4, 1, requires_grad=True)
  loss = focal_torch.softmax_focal(z, torch.zeros(4, dtype=torch.int64), gamma=2.0)
  (grad,) = torch.autograd.grad(loss, z)
  assert loss.item() == 0.0 and (grad == 0).all()


def test_long_rows_second_backward_of_a_retained_graph_matches_the_first(ref):
  # The forward's softmax becomes the first backward's gradient in place; a second backward
  # of the same graph (retain_graph=True) recomputes it.
  g = torch.Generator().manual_seed(6)
  z64 = 3 * torch.randn(37, 40, generator=g, dtype=torch.float64)
  labels = torch.randint(0, 40, (37,), generator=g)
  for kw in (dict(gamma=2.0), dict(gamma=0.5, label_smoothing=0.1, alpha=0.25)):
    z = z64.float().requires_grad_()
    loss = focal_torch.softmax_focal(z, labels, **kw)
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    (second,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    _, grad_ref = ref.softmax_focal(z64.numpy(), labels.numpy(), **kw)
    np.testing.assert_allclose(first.double().numpy(), grad_ref, rtol=1e-5,
                               atol=1e-6 * np.abs(grad_ref).max())


def _mp_loss_and_grad(z: np.ndarray, labels: np.ndarray, gamma: float
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Per-row ``-(1 - p)^gamma log p`` and its gradient in 150-digit arithmetic (log p = z_t - lse
  cancels to about 1e-52 at margin 120), the gradient by
  the chain rule through ``p`` (``dp/dz_c = p (1[c = t] - s_c)``)."""
  mpmath = pytest.importorskip("mpmath")
  loss, grad = [], []
  with mpmath.workdps(150):
    for row, t in zip(z.tolist(), labels.tolist()):
      row = [mpmath.mpf(v) for v in row]
      lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in row))
      s = [mpmath.exp(v - lse) for v in row]
      q = mpmath.fsum(x for i, x in enumerate(s) if i != t)  # 1 - p without cancellation
      p, log_p = s[t], row[t] - lse
      loss.append(float(-(q ** gamma) * log_p))
      dl_dp = -(q ** gamma) / p + (gamma * q ** (gamma - 1) * log_p if gamma else 0)
      grad.append([float(dl_dp * p * ((1 if c == t else 0) - s[c])) for c in range(len(row))])
  return np.array(loss), np.array(grad)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_long_rows_probability_near_one_keeps_relative_precision(dtype, rtol, gamma):
  # Margins 5 to 120 on 40 classes: 1 - p from about 1e-2 down to far below float32's
  # smallest normal number. The loss (about (1 - p)^(gamma + 1)) and the gradient hold their
  # relative precision per entry where log p itself rounds to 0, on both sides of the
  # exact-math threshold (margins beyond about 80 in float32).
  margins = torch.tensor([5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 85.0, 90.0, 120.0],
                         dtype=torch.float64)
  n, c = margins.numel(), 40
  z64 = torch.linspace(-1.0, 1.0, c, dtype=torch.float64).repeat(n, 1)
  labels = torch.arange(n) % c
  z64[torch.arange(n), labels] = margins
  z = z64.to(dtype, copy=True).requires_grad_()
  loss = focal_torch.softmax_focal(z, labels, gamma=gamma, reduction="none")
  (grad,) = torch.autograd.grad(loss.sum(), z)
  value, grad_ref = _mp_loss_and_grad(z64.numpy(), labels.numpy(), gamma)
  # Values below the dtype's normal range are compared in absolute terms.
  tiny = torch.finfo(dtype).tiny
  np.testing.assert_allclose(loss.detach().double().numpy(), value, rtol=rtol, atol=tiny)
  np.testing.assert_allclose(grad.double().numpy(), grad_ref, rtol=rtol, atol=tiny)


def test_long_rows_masked_and_out_of_range_rows(ref):
  # The softmax form's masks: masked rows (ignore_index, where) are 0 whatever their
  # logits, a counted row whose label is out of range (value checks off) is NaN, the others
  # match the reference.
  nan = float("nan")
  g = torch.Generator().manual_seed(7)
  z64 = 2 * torch.randn(8, 40, generator=g, dtype=torch.float64)
  z64[1, 3] = nan   # ignored
  z64[2, 5] = nan   # where False
  labels = torch.tensor([1, -100, 4, 45, 7, 0, 39, 2])
  where = torch.tensor([True, True, False, True, True, True, True, True])
  z = z64.float().requires_grad_()
  with focal_torch.value_checks(False):
    loss = focal_torch.softmax_focal(z, labels, where=where, gamma=2.0, reduction="none")
  counted = [0, 4, 5, 6, 7]
  assert torch.isnan(loss[3]) and (loss[[1, 2]] == 0).all()
  (grad,) = torch.autograd.grad(loss[counted].sum() + loss[[1, 2]].sum(), z)
  assert (grad[[1, 2]] == 0).all()
  value, grad_ref = ref.softmax_focal(z64[counted].numpy(), labels[counted].numpy(),
                                      gamma=2.0, reduction="none")
  np.testing.assert_allclose(loss[counted].detach().double().numpy(), value, rtol=1e-5)
  np.testing.assert_allclose(grad[counted].double().numpy(), grad_ref, rtol=1e-5,
                             atol=1e-6 * np.abs(grad_ref).max())
