"""References and helpers of the focal_torch tests.

The float64 references are ``focal_reference``'s, the one copy of the formulas shared with the
JAX tests, the parity suite and the benchmarks (written from docs/design.md, no code shared with
focal_torch). Here they take torch's defaults (``reduction="mean"``, ``ignore_index=-100``,
class axis ``dim=1``) and return ``(value, grad)`` as float64 NumPy arrays: the value, and the
gradient with respect to the logits by float64 autograd of the formula (for ``"none"``, the
gradient of the sum of the per-entry losses).

Exposed as the session fixture ``ref`` (test modules cannot import each other).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import focal_reference
import focal_torch

F64 = np.float64


def log_softmax(z: np.ndarray) -> np.ndarray:
  return focal_reference.log_softmax(np.asarray(z, F64))


def _value_and_grad(fn, z, *args, **kwargs):
  x = torch.tensor(np.asarray(z, F64), requires_grad=True)
  out = fn(x, *args, **kwargs)
  (grad,) = torch.autograd.grad(out.sum(), x)
  return out.detach().numpy()[()], grad.numpy()


def softmax_focal(z, labels, *, alpha=None, gamma=2.0, label_smoothing=0.0,
                  reduction="mean", where=None, ignore_index=-100, background_class=0,
                  dim=1):
  """``alpha[t] (1 - p)^gamma[t] (-(1-eps) log p - eps/C sum_c log s_c)`` and its gradient."""
  return _value_and_grad(focal_reference.softmax_focal, z, np.asarray(labels), alpha=alpha,
                         gamma=gamma, label_smoothing=label_smoothing, axis=dim, where=where,
                         ignore_index=ignore_index, reduction=reduction,
                         background_class=background_class)


def sigmoid_focal(x, y, *, alpha=None, gamma=2.0, label_smoothing=0.0, reduction="mean",
                  where=None, dim=1):
  """torchvision's ``sigmoid_focal_loss`` formula (``alpha=None``: no weighting), labels
  smoothed toward 1/2 first, with per-class ``(C,)`` alpha/gamma along ``dim``."""
  ndim = np.ndim(x)

  def along_dim(v):
    v = np.asarray(v, F64)
    if v.ndim == 1:
      shape = [1] * ndim
      shape[dim] = -1
      v = v.reshape(shape)
    return v

  return _value_and_grad(focal_reference.sigmoid_focal, x, np.asarray(y, F64),
                         alpha=None if alpha is None else along_dim(alpha),
                         gamma=along_dim(gamma), label_smoothing=label_smoothing, where=where,
                         reduction=reduction)


def categorical_focal(z, y, *, alpha=None, gamma=2.0, reduction="mean", where=None,
                      background_class=0, dim=1):
  """keras' ``CategoricalFocalCrossentropy``: ``-sum_c alpha_c y_c (1-s_c)^gamma_c log s_c``."""
  return _value_and_grad(focal_reference.categorical_focal, z, np.asarray(y, F64), alpha=alpha,
                         gamma=gamma, axis=dim, where=where, reduction=reduction,
                         background_class=background_class)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def spawn_ranks(script: Path | str, world: int, tmp_path: Path, timeout_s: float) -> list:
  """Runs ``python SCRIPT RANK WORLD PORT OUT`` for each of ``world`` ranks (one torch thread
  each, a free loopback port) and waits for all of them; fails with the tail of their output
  unless every rank exits 0. Returns what each rank saved to its OUT file, by rank."""
  port = free_port()
  outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
  env = dict(os.environ, OMP_NUM_THREADS="1")
  procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(port),
                             str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for r, out in enumerate(outs)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout_s)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-6000:]
  return [torch.load(out) for out in outs]


_PROBE_HEAD = """\
import gc, json, sys
import torch, focal_torch
from focal_bench import memory
n, c = int(sys.argv[1]), int(sys.argv[2])
"""

_PROBE_TAIL = """
peaks = []
for _ in range(2):
  gc.collect()
  before = memory.rss_bytes()
  memory.reset_peak_rss()
  torch.autograd.grad(step(z, y), z)
  peaks.append((memory.peak_rss_bytes() - before) / (z.numel() * 4))
print(json.dumps({"works": memory.rss_peak_works(), "peaks": peaks}))
"""


def memory_probe(setup: str, n: int, c: int, timeout_s: float) -> list[float]:
  """The extra peaks (over the float32 logits' size) of two calls of
  ``torch.autograd.grad(step(z, y), z)``, measured in a fresh process as the harness measures
  (focal_bench.memory: every large buffer its own mapping, so freed memory leaves the RSS).
  ``setup`` is the probe's own code: given ``n`` and ``c`` (and ``torch``, ``focal_torch``)
  it defines ``z``, ``y`` and ``step`` (and makes any warm-up call). Skips the test where
  resetting the peak RSS does not work."""
  import json  # pylint: disable=import-outside-toplevel
  import textwrap  # pylint: disable=import-outside-toplevel
  script = _PROBE_HEAD + textwrap.dedent(setup) + _PROBE_TAIL
  root = Path(__file__).resolve().parents[2]
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(root))
  out = subprocess.run([sys.executable, "-c", script, str(n), str(c)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=timeout_s, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  if not result["works"]:
    pytest.skip("resetting the peak RSS does not work here")
  return result["peaks"]


# Tolerances of the loss tests against the float64 references, per input dtype.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -8),
       torch.float16: dict(rtol=2 ** -10, atol=2 ** -11)}


def grad(loss: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
  """d(loss)/dx, summing a non-scalar loss first."""
  out = loss if loss.ndim == 0 else loss.sum()
  return torch.autograd.grad(out, x, create_graph=create_graph)[0]


def compiled_softmax_rows(cases) -> list[tuple]:
  """softmax_focal (reduction "none") of every case in one ``torch.compile(fullgraph=True)``
  graph, float32, and its gradient of the NaN-zeroed sum, beside the NumPy reference.

  ``cases``: (logits, labels, where, alpha, gamma, label_smoothing) with the class axis 1
  (alpha / gamma: None, a number or a NumPy class vector). Returns per case (values, reference
  values), both flat, and (gradient, reference gradient) as rows of C classes.
  """
  def losses(*args):
    return [focal_torch.softmax_focal(z, t, where=w, alpha=a, gamma=g, label_smoothing=eps,
                                      reduction="none")
            for z, t, w, a, g, eps in zip(*[iter(args)] * 5, [x[5] for x in cases])]

  def tensor(x):
    return torch.tensor(x, dtype=torch.float32) if isinstance(x, np.ndarray) else x

  inputs = [torch.tensor(logits, dtype=torch.float32, requires_grad=True)
            for logits, *_ in cases]
  args = []
  for z, (_, labels, where, alpha, gamma, _) in zip(inputs, cases):
    args += [z, torch.tensor(labels), torch.tensor(where), tensor(alpha), tensor(gamma)]
  out = torch.compile(losses, fullgraph=True, dynamic=False)(*args)
  grads = torch.autograd.grad(sum(x.nan_to_num(0.0).sum() for x in out), inputs)
  results = []
  for value, grad_, (logits, labels, where, alpha, gamma, eps) in zip(out, grads, cases):
    c = logits.shape[1]
    want, want_grad = softmax_focal(logits, labels, where=where, alpha=alpha, gamma=gamma,
                                    label_smoothing=eps, reduction="none")
    rows = lambda x: np.moveaxis(x, 1, -1).reshape(-1, c) if x.ndim == 3 else x
    results.append((value.detach().numpy().reshape(-1), want.reshape(-1),
                    rows(grad_.numpy()), rows(want_grad)))
  return results


def edge_rows(rng, n: int, c: int, margin: float, no_other_class: bool = False):
  """``(logits, labels, where)``: ``n`` rows of ``c`` logits with labels, an ignored label
  (row 1), a where mask, rows right and wrong by ``margin`` (2, 3), masked rows of NaN and inf
  logits (4, 5), a -inf logit off the target in a counted row (6) and a counted row with a
  NaN (7); with ``no_other_class``, row 9 has no finite logit but its target's (p = 1)."""
  logits = rng.normal(0, 3, (n, c))
  labels = rng.integers(0, c, n)
  where = rng.random(n) < 0.9
  labels[1] = -100
  logits[2] = -margin / 2
  logits[2, labels[2]] = margin / 2      # right by margin: p rounds to 1
  logits[3] = margin / 2
  logits[3, labels[3]] = -margin / 2     # wrong by margin
  logits[4, 0], logits[5, -1] = np.nan, np.inf
  labels[4], where[5] = -100, False      # masked rows of non-finite logits: 0, 0 gradient
  logits[6, -1], labels[6] = -np.inf, 0  # a -inf logit off the target in a counted row
  where[[2, 3, 6]] = True
  if no_other_class:
    logits[9], labels[9] = -np.inf, 1
    logits[9, 1] = 0.5
    where[9] = True
  logits[7, 0], where[7] = np.nan, True  # counted NaN row: NaN for that row only
  return logits, labels, where


def check_edge_rows(got, want, g, wg) -> None:
  """The checks every :func:`edge_rows` case takes (reduction "none"; ``got``/``want`` flat
  values, ``g``/``wg`` gradients as rows of C): NaN for the counted NaN row (7) and the label
  out of range (8, which the tests set), values within float32's rounding elsewhere, finite
  gradients where the reference value is finite, matching the reference (rows 2 and 3, right
  and wrong by 1e4: within float32's rounding of a log-sum-exp of about 5000, 2.4e-4), and 0
  for the ignored and masked rows (1, 4, 5)."""
  assert np.isnan(got[[7, 8]]).all(), got[[7, 8]]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  finite = np.isfinite(want)
  assert np.isfinite(g[finite]).all()
  near = finite.copy()
  near[[2, 3]] = False
  np.testing.assert_allclose(g[near], wg[near], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(g[[2, 3]], wg[[2, 3]], rtol=5e-4, atol=2e-6)
  assert (g[[1, 4, 5]] == 0).all()

def check_compiled_smoothed_mean(cases) -> None:
  """softmax_focal (mean, gamma 2, alpha 0.25, label smoothing 0.05) of every case in one
  ``torch.compile(fullgraph=True)`` graph in the logits' dtype: value and gradient of the sum
  of the losses against the float64 reference at ``TOL[dtype]``, the gradient finite.
  ``cases``: (logits as float64 NumPy, labels, where, the logits as a tensor of the dtype)."""
  def losses(*args):
    return [focal_torch.softmax_focal(z, t, where=w, gamma=2.0, alpha=0.25,
                                      label_smoothing=0.05)
            for z, t, w in zip(*[iter(args)] * 3)]

  inputs = [z.clone().requires_grad_() for *_, z in cases]
  args = []
  for z, (_, labels, where, _) in zip(inputs, cases):
    args += [z, torch.tensor(labels), torch.tensor(where)]
  out = torch.compile(losses, fullgraph=True, dynamic=False)(*args)
  grads = torch.autograd.grad(sum(x.double() for x in out), inputs)
  for value, grad_, (logits, labels, where, z) in zip(out, grads, cases):
    want, want_grad = softmax_focal(logits, labels, where=where, gamma=2.0, alpha=0.25,
                                    label_smoothing=0.05)
    assert value.dtype == z.dtype and grad_.dtype == z.dtype
    tol = TOL[z.dtype]
    np.testing.assert_allclose(value.double().item(), want, **tol)
    assert torch.isfinite(grad_).all()
    np.testing.assert_allclose(grad_.double().numpy(), want_grad, **tol)


@pytest.fixture(scope="session")
def ref():
  """The NumPy references: ``ref.softmax_focal``, ``ref.sigmoid_focal``,
  ``ref.categorical_focal``, ``ref.log_softmax``, ``ref.free_port``; and three test helpers,
  ``ref.TOL`` (tolerances per dtype), ``ref.grad``, ``ref.spawn_ranks`` (the gloo tests'
  worker processes), ``ref.memory_probe`` (a fresh process's extra peak memory) and
  ``ref.compiled_softmax_rows`` (compiled softmax values and gradients beside the reference),
  ``ref.edge_rows`` (rows of edge cases), ``ref.check_edge_rows`` and
  ``ref.check_compiled_smoothed_mean``.
  """
  return types.SimpleNamespace(
      softmax_focal=softmax_focal, sigmoid_focal=sigmoid_focal,
      categorical_focal=categorical_focal, log_softmax=log_softmax,
      free_port=free_port, TOL=TOL, grad=grad, spawn_ranks=spawn_ranks,
      memory_probe=memory_probe, compiled_softmax_rows=compiled_softmax_rows,
      edge_rows=edge_rows, check_edge_rows=check_edge_rows,
      check_compiled_smoothed_mean=check_compiled_smoothed_mean)
