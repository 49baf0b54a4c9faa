"""Issue 12, case 17: one table of argument cases runs through focal_jax and focal_torch.

For every row of ``parity_tests.argument_table.TABLE`` both packages accept with equal numbers,
or both raise the same exception type with the same message apart from framework words; the
rows that differ by design (bad labels: NaN in JAX, ValueError in torch) say what each side must
do. Accepted rows are also checked against the float64 reference formulas (``focal_reference``,
the project's one copy), so that a keyword both packages ignored alike (``sample_weight``, say)
cannot pass.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")

import focal_reference  # noqa: E402
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

def _float64(v: Any) -> Any:
  """A row's value as focal_reference takes it: Arr -> NumPy (bfloat16 widened exactly)."""
  if not isinstance(v, at.Arr):
    return v
  x = v.numpy()
  return np.asarray(x.astype(np.float32) if v.dtype == "bfloat16" else x,
                    bool if x.dtype == bool else None)


def reference(row: Row) -> np.ndarray:
  """The loss of an accepted row in float64 from the one copy of the formulas
  (``focal_reference``), on the inputs as the packages get them (already rounded to the row's
  dtype); labels as exact int64 values, so nothing wraps."""
  a = {k: _float64(v) for k, v in row.arrays().items()}
  kw = {k: _float64(v) for k, v in row.kwargs.items()}
  kw.setdefault("reduction", "none")
  if row.fn in (at.SOFTMAX, at.LINEAR):
    labels = np.array([int(x) for x in np.asarray(a["labels"]).reshape(-1)],
                      np.int64).reshape(np.shape(a["labels"]))
    z = (np.asarray(a["hidden"], np.float64) @ np.asarray(a["kernel"], np.float64)
         if row.fn == at.LINEAR else a["logits"])
    out = focal_reference.softmax_focal(np.asarray(z, np.float64), labels, **kw)
  elif row.fn == at.SIGMOID:
    out = focal_reference.sigmoid_focal(np.asarray(a["logits"], np.float64),
                                        np.asarray(a["labels"], np.float64), **kw)
  else:
    out = focal_reference.categorical_focal(np.asarray(a["logits"], np.float64),
                                            np.asarray(a["targets"], np.float64), **kw)
  return np.asarray(out, np.float64)
