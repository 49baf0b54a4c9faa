"""Issue 12, case 17: one table of argument cases runs through focal_jax and focal_torch.

For every row of ``parity_tests.argument_table.TABLE`` both packages accept with equal numbers,
or both raise the same exception type with the same message apart from framework words; the
rows that differ by design (bad labels: NaN in JAX, ValueError in torch) say what each side must
do. Accepted float64 rows are also checked against a float64 NumPy reference written from the
formulas of DESIGN.md, so that a keyword both packages ignored alike (``sample_weight``, say)
cannot pass.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")

from parity_tests import argument_table as at  # noqa: E402
from parity_tests.argument_table import TABLE, Row  # noqa: E402

OK_ROWS = [r for r in TABLE if r.expect == "ok"]
_OUTCOMES: dict[tuple[str, str], at.Outcome] = {}


def _outcome(framework: str, row: Row) -> at.Outcome:
  """Each package's outcome of a row, computed once for both tests of this module."""
  key = (framework, row.id)
  if key not in _OUTCOMES:
    _OUTCOMES[key] = (at.call_jax if framework == "jax" else at.call_torch)(row)
  return _OUTCOMES[key]


@pytest.fixture(scope="module", autouse=True)
def _write_status():
  """With FOCAL_TABLE_STATUS=<path>, writes the row-by-row status (markdown) of this run."""
  yield
  path = os.environ.get("FOCAL_TABLE_STATUS")
  if path:
    with open(path, "w", encoding="utf-8") as f:
      f.write(at.status_markdown(outcome=_outcome))


@pytest.mark.parametrize("row", TABLE, ids=[r.id for r in TABLE])
def test_argument_row_same_outcome_in_jax_and_torch(row: Row):
  problems = at.check_row(row, _outcome("jax", row), _outcome("torch", row))
  assert not problems, f"{row.id}:\n" + "\n".join(problems)


@pytest.mark.parametrize("row", OK_ROWS, ids=[r.id for r in OK_ROWS])
def test_accepted_row_matches_numpy_reference(row: Row):
  expected = reference(row)
  problems = []
  for name in ("jax", "torch"):
    out = _outcome(name, row)
    if not out.ok:
      problems.append(f"{name} raised {out}")
      continue
    diff = at._close(out.value, expected, row.dtype)  # pylint: disable=protected-access
    if diff:
      problems.append(f"{name} vs the NumPy reference: {diff}")
  assert not problems, f"{row.id}:\n" + "\n".join(problems)


def test_table_covers_every_function_and_keyword():
  have = {(r.fn, r.arg) for r in TABLE}
  keywords = ("alpha", "gamma", "label_smoothing", "reduction", "where", "sample_weight")
  for fn in at.FUNCTIONS:
    for kw in keywords:
      assert (fn, kw) in have, (fn, kw)
  for fn in (at.SOFTMAX, at.CATEGORICAL, at.LINEAR):
    assert (fn, "background_class") in have
  for fn in (at.SOFTMAX, at.LINEAR):
    assert (fn, "ignore_index") in have
  # good and bad rows for every function, and the by-design rows
  for fn in at.FUNCTIONS:
    kinds = {r.expect if isinstance(r.expect, str) else "raise" for r in TABLE if r.fn == fn}
    assert {"ok", "raise"} <= kinds, fn
  assert {r.fn for r in TABLE if r.expect == at.BAD_LABEL} == {at.SOFTMAX, at.SIGMOID,
                                                                at.LINEAR}


@pytest.mark.parametrize("jax_msg, torch_msg", [
    ("f: where must be a boolean array, got dtype float32",
     "f: where must be a boolean tensor, got dtype torch.float32"),
    ("f: labels must be a jax.Array, got list", "f: labels must be a torch.Tensor, got list"),
    ("f: x must have shape (4,) (the shape of logits (4, 3) without axis 1)",
     "f: x must have shape (4,) (the shape of logits (4, 3) without dim 1)"),
    ("f: kernel must have shape (H, V)", "f: weight must have shape (H, V)"),
    ("f: Arrays of dtype bfloat16", "f: Tensors of dtype torch.bfloat16"),
])
def test_normalize_message_removes_framework_words(jax_msg, torch_msg):
  assert at.normalize_message(jax_msg) == at.normalize_message(torch_msg)


@pytest.mark.parametrize("a, b", [
    ("f: alpha must be >= 0, got -1.0", "f: alpha must be >= 0, got -1"),
    ("f: where must be a boolean array", "f: where must be a bool array"),
    ("f: sample_weight must be finite", "f: weight must be finite"),
    ("f: gamma must be finite", "g: gamma must be finite"),
    ("f: labels must have shape (4,)", "f: labels must have shape torch.Size([4])"),
    ("f: dtype float32", "f: dtype float64"),
])
def test_normalize_message_keeps_everything_else(a, b):
  assert at.normalize_message(a) != at.normalize_message(b)


# --------------------------------------------------------------------------- NumPy reference

def _log_softmax(z: np.ndarray) -> np.ndarray:
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _per_class(value, index: np.ndarray | None, default: float) -> np.ndarray:
  """alpha / gamma as float64: a scalar, or a vector taken at ``index`` (None: as is)."""
  if value is None:
    return np.asarray(default)
  v = np.asarray(value.numpy() if isinstance(value, at.Arr) else value, np.float64)
  return v if v.ndim == 0 or index is None else v[index]


def reference(row: Row) -> np.ndarray:
  """The loss of an accepted row in float64, from DESIGN.md's formulas (inputs as the packages
  get them, i.e. already rounded to the row's dtype)."""
  a = {k: np.asarray(v.numpy(), np.float64) if v.dtype != "bfloat16"
       else np.asarray(v.numpy().astype(np.float32), np.float64)
       for k, v in row.arrays().items()}
  kw = row.kwargs
  eps = float(kw.get("label_smoothing", 0.0))
  alpha, gamma = kw.get("alpha"), kw.get("gamma", 2.0)
  shape = row.label_shape()
  where = kw.get("where")
  valid = np.ones(shape, bool) if where is None else np.broadcast_to(
      np.asarray(where.numpy() if isinstance(where, at.Arr) else where, bool), shape)
  background = kw.get("background_class", 0)
  if row.fn in (at.SOFTMAX, at.LINEAR):
    z = a["hidden"] @ a["kernel"] if row.fn == at.LINEAR else a["logits"]
    num_classes = z.shape[-1]
    raw = row.arrays()["labels"].numpy()
    labels = [int(x) for x in raw.reshape(-1)]  # exact Python ints: no wrapping
    ignore = kw.get("ignore_index")
    valid = valid & np.array([x != ignore for x in labels]).reshape(shape)
    t = np.where(valid, np.asarray([x if 0 <= x < num_classes else 0 for x in labels])
                 .reshape(shape), 0)
    logs = _log_softmax(z)
    logp = np.take_along_axis(logs, t[..., None], -1)[..., 0]
    p = np.exp(logp)
    ce = -(1 - eps) * logp - eps / num_classes * logs.sum(-1)
    loss = _per_class(alpha, t, 1.0) * (1 - p) ** _per_class(gamma, t, 2.0) * ce
    positive = valid & np.array([x != background for x in labels]).reshape(shape)
  elif row.fn == at.SIGMOID:
    x, y = a["logits"], a["labels"]
    ys = (1 - eps) * y + eps / 2
    logp, log1mp = -np.logaddexp(0, -x), -np.logaddexp(0, x)
    bce = -(ys * logp + (1 - ys) * log1mp)
    p = np.exp(logp)
    pt = p * ys + (1 - p) * (1 - ys)
    al = _per_class(alpha, None, 1.0)
    at_ = 1.0 if alpha is None else al * ys + (1 - al) * (1 - ys)
    loss = at_ * (1 - pt) ** _per_class(gamma, None, 2.0) * bce
    positive = valid & (y > 0)
  else:
    logs = _log_softmax(a["logits"])
    y = a["targets"]
    loss = -(_per_class(alpha, None, 1.0) * y * (1 - np.exp(logs))
             ** _per_class(gamma, None, 2.0) * logs).sum(-1)
    positive = valid & (np.argmax(y, -1) != background)
  sw = kw.get("sample_weight")
  weight = 1.0 if sw is None else np.broadcast_to(
      np.asarray(sw.numpy() if isinstance(sw, at.Arr) else sw, np.float64), shape)
  loss = np.where(valid, loss * weight, 0.0)
  reduction = kw.get("reduction", "none")
  if reduction == "none":
    return loss
  if reduction == "sum":
    return np.asarray(loss.sum())
  count = valid.sum() if reduction == "mean" else positive.sum()
  return np.asarray(loss.sum() / max(int(count), 1))
