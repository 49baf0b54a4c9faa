"""torch.compile: one small full-graph compile of the three losses, forward and backward,
against the float64 NumPy references (compiling is slow on small CI machines)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import focal_torch


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals
def test_compiled_losses_match_references_in_one_graph(ref):
  torch._dynamo.reset()  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (8, 5))
  labels = rng.integers(0, 5, 8)
  labels[2] = -100
  soft = rng.random((8, 5))
  probs = rng.dirichlet(np.ones(5), 8)
  alpha = rng.uniform(0.5, 1.5, 5)

  def losses(z, t, y, p, a):
    return (focal_torch.softmax_focal(z, t, alpha=a, gamma=0.5, label_smoothing=0.1),
            focal_torch.sigmoid_focal(z, y, alpha=0.25, gamma=2.0, reduction="sum"),
            focal_torch.categorical_focal(z, p, gamma=2.0, reduction="mean_positive"))

  compiled = torch.compile(losses, fullgraph=True)  # fullgraph: no graph break allowed
  z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
  args = (torch.tensor(labels), torch.tensor(soft, dtype=torch.float32),
          torch.tensor(probs, dtype=torch.float32), torch.tensor(alpha, dtype=torch.float32))
  out = compiled(z, *args)
  refs = [ref.softmax_focal(logits, labels, alpha=alpha, gamma=0.5, label_smoothing=0.1),
          ref.sigmoid_focal(logits, soft, alpha=0.25, gamma=2.0, reduction="sum"),
          ref.categorical_focal(logits, probs, gamma=2.0, reduction="mean_positive")]
  for value, (want, want_grad) in zip(out, refs):
    assert value.dtype == torch.float32
    np.testing.assert_allclose(value.item(), want, rtol=2e-5)
    grad, = torch.autograd.grad(value, z, retain_graph=True)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=2e-5, atol=2e-6)

  # Value checks are skipped while compiling: a bad label gives NaN, as in focal_jax.
  bad = args[0].clone()
  bad[0] = 7
  assert torch.isnan(compiled(z, bad, *args[1:])[0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals
def test_compiled_softmax_focal_on_a_class_axis_in_the_middle_and_at_large_margins(ref):
  # Compiled, the per-row statistics come from whole-tensor formulas (not the eager chunk
  # loop): check them on an (N, C, d) view, where the class mask broadcasts over the inner
  # axis, and at margins where p rounds to 1 in float32 (log(1 - p) from the other classes).
  torch._dynamo.reset()  # pylint: disable=protected-access
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (3, 5, 4))
  labels = rng.integers(0, 5, (3, 4))
  logits[0, :, 0] = -10.0
  logits[0, labels[0, 0], 0] = 10.0  # margin 20: p = 1 in float32, not in float64
  compiled = torch.compile(
      lambda z, t: focal_torch.softmax_focal(z, t, gamma=0.5, label_smoothing=0.1, dim=1,
                                             reduction="none"), fullgraph=True)
  z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
  out = compiled(z, torch.tensor(labels))
  want, want_grad = ref.softmax_focal(logits, labels, gamma=0.5, label_smoothing=0.1, dim=1,
                                      reduction="none")
  np.testing.assert_allclose(out.detach().numpy(), want, rtol=2e-5, atol=1e-30)
  grad, = torch.autograd.grad(out.sum(), z)
  np.testing.assert_allclose(grad.numpy(), want_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals
def test_compiled_linear_softmax_focal_matches_materialized_reference(ref):
  torch._dynamo.reset()  # pylint: disable=protected-access
  rng = np.random.default_rng(1)
  h, w, b = rng.normal(0, 1, (10, 4)), rng.normal(0, 0.7, (7, 4)), rng.normal(0, 0.5, 7)
  labels = rng.integers(0, 7, 10)
  row_weights = rng.normal(0, 1, 10)

  def losses(hidden, weight, bias, t):
    kw = dict(bias=bias, chunk_size=4, gamma=0.5, label_smoothing=0.1)
    return (focal_torch.linear_softmax_focal(hidden, weight, t, **kw),
            focal_torch.linear_softmax_focal(hidden, weight, t, reduction="none", **kw))

  compiled = torch.compile(losses, fullgraph=True)
  params = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (h, w, b)]
  mean, per_row = compiled(*params, torch.tensor(labels))
  kw = dict(gamma=0.5, label_smoothing=0.1, dim=-1)
  want, dz = ref.softmax_focal(h @ w.T + b, labels, **kw)
  want_rows, dz_rows = ref.softmax_focal(h @ w.T + b, labels, reduction="none", **kw)
  np.testing.assert_allclose(mean.item(), want, rtol=2e-5)
  np.testing.assert_allclose(per_row.detach().numpy(), want_rows, rtol=2e-5, atol=1e-6)
  # Mean: gradients computed in the forward pass; weighted rows: recomputed in backward.
  total = mean + (per_row * torch.tensor(row_weights, dtype=torch.float32)).sum()
  dz = dz + dz_rows * row_weights[:, None]
  got = torch.autograd.grad(total, params)
  for g, expected in zip(got, (dz @ w, dz.T @ h, dz.sum(0))):
    np.testing.assert_allclose(g.numpy(), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch internals
@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
def test_compiled_with_a_gamma_schedule_in_one_graph(ref, dynamic):
  # Issue 12, case 10: a gamma that changes between calls (a schedule) and dynamic=True
  # compile without graph breaks (fullgraph=True raises on any), with the right numbers.
  torch._dynamo.reset()  # pylint: disable=protected-access
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (6, 4))
  labels = rng.integers(0, 4, 6)
  soft = rng.random((6, 4))

  def losses(z, t, y, gamma):
    return (focal_torch.softmax_focal(z, t, gamma=gamma, alpha=0.5),
            focal_torch.sigmoid_focal(z, y, gamma=gamma, alpha=0.25),
            focal_torch.categorical_focal(z, torch.softmax(y, 1), gamma=gamma))

  compiled = torch.compile(losses, fullgraph=True, dynamic=dynamic)
  z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
  t, y = torch.tensor(labels), torch.tensor(soft, dtype=torch.float32)
  probs = torch.softmax(y.double(), 1).numpy()
  for gamma in (2.0, 0.5, 0.0):
    out = compiled(z, t, y, gamma)
    refs = [ref.softmax_focal(logits, labels, gamma=gamma, alpha=0.5),
            ref.sigmoid_focal(logits, soft, gamma=gamma, alpha=0.25),
            ref.categorical_focal(logits, probs, gamma=gamma)]
    for value, (want, _) in zip(out, refs):
      np.testing.assert_allclose(value.item(), want, rtol=2e-5)
    # One backward (a compiled backward may not be run twice): the gradient of a weighted
    # sum of the three losses.
    grad, = torch.autograd.grad(out[0] + 2 * out[1] + 3 * out[2], z)
    want_grad = refs[0][1] + 2 * refs[1][1] + 3 * refs[2][1]
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=2e-5, atol=6e-6)
  explain = torch._dynamo.explain(losses)(z, t, y, 1.25)  # pylint: disable=protected-access
  assert explain.graph_break_count == 0, explain.break_reasons
