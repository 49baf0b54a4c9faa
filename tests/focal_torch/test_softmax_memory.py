"""softmax_focal's memory at short rows (C = 2, 16): what it saves for backward and its peak.

At C = 2 a float32 per-row tensor is half the logits and int64 labels as large as them, so
the loss must save nothing of per-row size but its inputs (and the bool mask) and recompute
the rest in backward (issue 11: extra peak <= 1.5x the logits). Also the values of that
recompute path, chunk by chunk, against the float64 NumPy reference.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import focal_torch
from focal_torch import _softmax


def _saved_bytes(fn, z: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> int:
  """Bytes of the distinct storages autograd saves for backward while ``fn()`` builds its
  graph, leaving out those of ``inputs`` (saving an input costs no memory)."""
  own = {x.untyped_storage().data_ptr() for x in inputs}
  seen: dict[int, int] = {}

  def pack(t: torch.Tensor) -> torch.Tensor:
    storage = t.untyped_storage()
    if storage.data_ptr() not in own:
      seen[storage.data_ptr()] = storage.nbytes()
    return t

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = fn()
  torch.autograd.grad(loss, z)
  return sum(seen.values())


@pytest.mark.parametrize("c", [2, 16])
@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1, ignore_index=1)],
                         ids=["plain", "smooth_ignore"])
def test_saved_for_backward_is_small_at_short_rows(c, kw):
  # Before: the safe int64 labels and lse_rest, a, grad_t were saved: about 2.6x the logits at
  # C = 2. Now only the bool mask (1 byte a row: 0.125x at C = 2) besides the inputs.
  n = 4096
  g = torch.Generator().manual_seed(0)
  z = torch.randn(n, c, generator=g).requires_grad_()
  labels = torch.randint(0, c, (n,), generator=g)
  saved = _saved_bytes(lambda: focal_torch.softmax_focal(z, labels, gamma=2.0, **kw), z,
                       (z, labels))
  assert saved <= 0.25 * z.numel() * 4, saved / (z.numel() * 4)


_PROBE = """
    torch.manual_seed(0)
    z = torch.randn(n, c, requires_grad=True)
    y = torch.randint(0, c, (n,))
    step = lambda z, y: focal_torch.softmax_focal(z, y, gamma=2.0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_extra_peak_at_two_classes_is_at_most_1_5x_the_logits(ref):
  # The harness's measure (focal_bench.memory: VmHWM - VmRSS(before) in a fresh process with
  # every large buffer its own mapping) at the sweep's shape (2^23, 2): 64 MiB of float32
  # logits. Before: about 9x.
  peaks = ref.memory_probe(_PROBE, 1 << 23, 2, timeout_s=300)
  assert peaks[1] <= 1.5, peaks


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("checks", [True, False])
def test_recompute_path_matches_numpy_reference_chunk_by_chunk(ref, label_dtype, checks):
  # Many chunks (4 rows each) of the short-row path, with labels of several dtypes, ignored
  # labels, a where mask, per-class alpha and gamma, label smoothing, and (checks off) a label
  # out of range, which gives NaN for its row only.
  rng = np.random.default_rng(5)
  n, c = 37, 5
  logits = rng.normal(0, 3, (n, c))
  labels = rng.integers(0, c, n)
  where = rng.random(n) < 0.8
  alpha = rng.uniform(0.2, 1, c)
  gamma = rng.uniform(0, 3, c)
  ignore = 2
  kw = dict(alpha=alpha, gamma=gamma, label_smoothing=0.1, ignore_index=ignore,
            reduction="none", where=where)
  want, want_grad = ref.softmax_focal(logits, labels, **kw)
  torch_labels = torch.tensor(labels).to(label_dtype)
  bad_row = None
  if not checks:
    bad_row = 7
    where[bad_row] = True
    torch_labels[bad_row] = c  # out of range
  z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  with focal_torch.value_checks(checks):
    loss = _softmax.softmax_focal_with_options(
        "softmax_focal", z, torch_labels, alpha=torch.tensor(alpha),
        gamma=torch.tensor(gamma), label_smoothing=0.1, reduction="none",
        where=torch.tensor(where), ignore_index=ignore, background_class=0, dim=1,
        process_group=None, chunk_elements=4 * c)
  got = loss.detach().numpy()
  if bad_row is not None:
    assert np.isnan(got[bad_row])
    keep = np.arange(n) != bad_row
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-10, atol=1e-12)
    # The NaN row's gradient is NaN; the others match.
    g = torch.autograd.grad(loss[torch.tensor(keep)].sum(), z)[0].numpy()
    np.testing.assert_allclose(g[keep], want_grad[keep], rtol=1e-10, atol=1e-12)
    return
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(ref.grad(loss, z).numpy(), want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("n,c", [(16384, 91), (512, 30522)])
def test_extra_peak_of_kept_softmax_long_rows_is_at_most_1_5x_the_logits(ref, n, c):
  # Eager long rows on the CPU keep the forward's softmax (a logits-sized tensor) until the
  # backward, which writes the gradient into it: the peak stays the gradient's (about 1.0x to
  # 1.1x). A backward that wrote a new tensor beside it reaches about 2.0x (checked by
  # mutation). The first call's peak holds one-time allocations (about 2.7x at (16384, 91)):
  # the second is the step's, as in the test above.
  peaks = ref.memory_probe(_PROBE, n, c, timeout_s=300)
  assert peaks[1] <= 1.5, peaks


def test_kept_softmax_only_when_a_gradient_is_wanted(ref, monkeypatch):
  # The kept-softmax form holds a logits-sized softmax for the backward: a forward without a
  # gradient (torch.no_grad, inference_mode, logits that do not require grad; evaluation)
  # takes the chunked forward, which has no logits-sized temporary.
  taken = []
  real = _softmax.kept_forward

  def spy(*args, **kwargs):
    taken.append(True)
    return real(*args, **kwargs)
  monkeypatch.setattr(_softmax, "kept_forward", spy)
  z = torch.randn(64, 40, dtype=torch.float32)
  t = torch.randint(0, 40, (64,))
  want, _ = ref.softmax_focal(z.double().numpy(), t.numpy(), reduction="none")
  d = focal_torch.softmax_focal(z, t, reduction="none")
  with torch.no_grad():
    a = focal_torch.softmax_focal(z.clone().requires_grad_(), t, reduction="none")
  with torch.inference_mode():
    b = focal_torch.softmax_focal(z.clone().requires_grad_(), t, reduction="none")
  assert not taken
  zg = z.clone().requires_grad_()
  c = focal_torch.softmax_focal(zg, t, reduction="none")
  assert taken == [True]  # the eager CPU path at C = 40 with a gradient wanted
  for got in (a, b, c, d):
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=2e-6, atol=1e-7)
