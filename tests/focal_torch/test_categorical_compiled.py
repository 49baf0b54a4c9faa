"""categorical_focal under torch.compile against the float64 reference: margins to 1e4,
NaN / inf rows, a -inf logit, where, sample_weight, per-class alpha and gamma, 16-bit logits,
the class axis in the middle.

Inductor computes a vectorized ``expm1`` as ``exp(x) - 1``, which is 0 for ``|x|`` below
about 1e-8: where a class's probability rounds to 1, ``q = 1 - s`` became 0 and the gradient
NaN under compile only (eager was right). Compiling is slow on small CI machines: one graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import focal_reference
import focal_torch


def _rows(rng, n, c, margin):
  """``n`` rows of ``c`` logits with targets and a where mask: rows right and wrong by
  ``margin``, masked rows of NaN and inf logits, a -inf logit without target mass, a counted
  NaN row."""
  logits = rng.normal(0, 3, (n, c))
  targets = rng.dirichlet(np.ones(c), n)
  where = rng.random(n) < 0.9
  logits[2] = -margin / 2
  logits[2, 0] = margin / 2              # right by margin: s_0 rounds to 1
  targets[2] = np.eye(c)[0] * 0.9 + 0.1 / c
  logits[3] = margin / 2
  logits[3, 0] = -margin / 2             # wrong by margin
  logits[4, 0], logits[5, -1] = np.nan, np.inf
  where[4] = where[5] = False            # masked rows of non-finite logits: 0, 0 gradient
  logits[6, -1] = -np.inf                # a -inf logit, no target mass there
  targets[6] = np.eye(c)[0]
  logits[7, 0] = np.nan                  # counted NaN row: NaN for that row only
  where[2:4] = where[6] = where[7] = True
  return logits, targets, where


def _reference(logits, targets, where, alpha, gamma, weight):
  """Float64 per-row losses (times ``weight``) and the gradient of their sum. A -inf logit
  is given as -1e4 (its softmax is 0 either way), where the formula's ``0 * log 0`` is NaN and
  the loss is its limit."""
  logits = np.where(logits == -np.inf, -1e4, logits)
  x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  out = focal_reference.categorical_focal(
      x, torch.tensor(targets, dtype=torch.float64), alpha=alpha, gamma=gamma, axis=1,
      where=torch.tensor(where), reduction="none",
      sample_weight=torch.tensor(weight, dtype=torch.float64).reshape(where.shape))
  (grad,) = torch.autograd.grad(out.nan_to_num(0.0).sum(), x)
  return out.detach().numpy(), grad.numpy()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals
def test_compiled_short_rows_match_float64_reference():
  # One graph: C = 2, 3 (as an (N, C, d) view), 4 and 6 (as an (N, C, d) view) column by
  # column, and C = 16 (whole rows, two statistics per row kept), per-class and scalar
  # alpha/gamma, where, sample_weight, margins to 1e4, NaN/inf rows; then float16 and
  # bfloat16 logits at C = 2, 3 and 16.
  torch._dynamo.reset()  # pylint: disable=protected-access
  rng = np.random.default_rng(21)
  cases = []
  for c, per_class, dtype in ((2, True, torch.float32), (3, False, torch.float32),
                              (4, True, torch.float32), (6, False, torch.float32),
                              (16, True, torch.float32), (2, False, torch.float16),
                              (3, True, torch.bfloat16), (16, False, torch.bfloat16)):
    logits, targets, where = _rows(rng, 24, c, 1e4 if dtype == torch.float32 else 1e3)
    if dtype != torch.float32:
      logits[7, 0] = 0.0  # a NaN would round the same in any dtype; keep the others finite
    alpha = rng.uniform(0.2, 1.5, c) if per_class else 0.25
    gamma = rng.uniform(0, 3, c) if per_class else 0.5
    weight = rng.uniform(0.5, 2.0, 24)
    if c in (3, 6) and dtype == torch.float32:  # the class axis in the middle: (4, C, 6)
      logits = logits.reshape(4, 6, c).transpose(0, 2, 1)
      targets = targets.reshape(4, 6, c).transpose(0, 2, 1)
      where, weight = where.reshape(4, 6), weight.reshape(4, 6)
    # The reference sees the logits as rounded to their dtype.
    logits = torch.tensor(logits, dtype=dtype).double().numpy()
    cases.append((logits, targets, where, alpha, gamma, weight, dtype))

  def tensor(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype) if isinstance(x, np.ndarray) else x

  def losses(*args):
    return [focal_torch.categorical_focal(z, y, where=w, alpha=a, gamma=g, sample_weight=sw,
                                          reduction="none")
            for z, y, w, a, g, sw in zip(*[iter(args)] * 6)]

  inputs = [torch.tensor(logits, dtype=dtype, requires_grad=True)
            for logits, *_, dtype in cases]
  args = []
  for z, (_, targets, where, alpha, gamma, weight, dtype) in zip(inputs, cases):
    args += [z, torch.tensor(targets, dtype=dtype), torch.tensor(where), tensor(alpha),
             tensor(gamma), tensor(weight)]
  out = torch.compile(losses, fullgraph=True, dynamic=False)(*args)
  grads = torch.autograd.grad(sum(x.float().nan_to_num(0.0).sum() for x in out), inputs)
  for value, grad, (logits, targets, where, alpha, gamma, weight, dtype) in zip(
      out, grads, cases):
    c = logits.shape[1]
    # Targets as rounded to the dtype, as the loss sees them.
    targets = torch.tensor(targets, dtype=dtype).double().numpy()
    want, want_grad = _reference(logits, targets, where, alpha, gamma, weight)
    assert value.dtype == dtype and grad.dtype == dtype
    rows = lambda x: np.moveaxis(x, 1, -1).reshape(-1, c) if x.ndim == 3 else x
    got, want = value.detach().double().numpy().reshape(-1), want.reshape(-1)
    g, wg = rows(grad.double().numpy()), rows(want_grad)
    if dtype == torch.float32:
      assert np.isnan(got[7]) and np.isnan(g[7]).all()
      assert np.isfinite(want).sum() == want.size - 1  # all rows but 7, row 6 included
      rtol, atol = 2e-5, 2e-6
    else:
      rtol, atol = (1e-2, 1e-3) if dtype == torch.float16 else (2e-2, 2e-3)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=atol)
    assert np.isfinite(g[finite]).all()
    np.testing.assert_allclose(g[finite], wg[finite], rtol=rtol, atol=atol)
    assert (g[[4, 5]] == 0).all() and (got[[4, 5]] == 0).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals
@pytest.mark.parametrize("per_class", [True, False])
@pytest.mark.parametrize("n,c", [(8, 4096), (24, 7), (24, 8)])
def test_compiled_w_from_a_product_matches_float64_reference(per_class, n, c):
  # 8 rows of 4096 classes (more than CPU_LONG_ROWS times as long as there are rows) and
  # rows of 7 to UNROLLED_CLASSES classes, where the compiled backward takes W from a matrix
  # product (w @ 1); margins to 1e4, NaN/inf rows.
  torch._dynamo.reset()  # pylint: disable=protected-access
  rng = np.random.default_rng(22)
  cat = focal_torch._categorical  # pylint: disable=protected-access
  assert c > cat.CPU_LONG_ROWS * n or cat.COLUMN_MAX_CLASSES < c <= cat.UNROLLED_CLASSES
  logits, targets, where = _rows(rng, n, c, 1e4)
  alpha = rng.uniform(0.2, 1.5, c) if per_class else 0.25
  gamma = rng.uniform(0, 3, c) if per_class else 2.0
  weight = rng.uniform(0.5, 2.0, n)
  z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
  tensor = lambda x: torch.tensor(x, dtype=torch.float32) if isinstance(x, np.ndarray) else x
  loss = lambda z, y, w, a, g, sw: focal_torch.categorical_focal(
      z, y, where=w, alpha=a, gamma=g, sample_weight=sw, reduction="none")
  value = torch.compile(loss, fullgraph=True, dynamic=False)(
      z, torch.tensor(targets, dtype=torch.float32), torch.tensor(where), tensor(alpha),
      tensor(gamma), torch.tensor(weight, dtype=torch.float32))
  (grad,) = torch.autograd.grad(value.nan_to_num(0.0).sum(), z)
  want, want_grad = _reference(torch.tensor(logits, dtype=torch.float32).double().numpy(),
                               torch.tensor(targets, dtype=torch.float32).double().numpy(),
                               where, alpha, gamma, weight)
  got, g = value.detach().double().numpy(), grad.double().numpy()
  assert np.isnan(got[7]) and np.isnan(g[7]).all()
  finite = np.isfinite(want)
  assert finite.sum() == n - 1
  np.testing.assert_allclose(got[finite], want[finite], rtol=2e-5, atol=2e-6)
  assert np.isfinite(g[finite]).all()
  np.testing.assert_allclose(g[finite], want_grad[finite], rtol=2e-5, atol=2e-6)
  assert (g[[4, 5]] == 0).all() and (got[[4, 5]] == 0).all()
