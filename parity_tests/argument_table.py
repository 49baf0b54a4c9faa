"""One table of argument cases, good and bad, that runs through focal_jax and focal_torch.

Issue 12, case 17 (rules: ``docs/design.md``, "One rule per argument"). Each :class:`Row` is one
call of one public function (``softmax_focal``, ``sigmoid_focal``, ``categorical_focal``,
``linear_softmax_focal``) with NumPy inputs and keyword arguments. The two adapters
(:func:`call_jax`, :func:`call_torch`) convert the inputs to each framework, call the function
and return an :class:`Outcome`: the value (as float64 NumPy) or the exception (type and
message). A row expects one of:

- ``"ok"``: both accept, with equal numbers;
- an exception type: both raise it, with the same message apart from framework words
  (:func:`normalize_message`), a message that names the function and the argument;
- ``BAD_LABEL``: the case that differs by design (an out-of-range class label, a sigmoid label
  outside [0, 1]): JAX gives NaN for the bad entries (the others equal torch's numbers with
  those entries masked), torch raises ValueError naming the labels.

Inputs are NumPy float64 unless a row says otherwise; the adapters pass ``reduction`` and
``ignore_index`` explicitly (the two packages' defaults differ), ``axis=-1`` (JAX) and
``dim=1`` (torch) on ``(N, C)`` softmax and categorical inputs, and hand torch the transpose
of the JAX kernel (``(H, V)`` -> ``weight (V, H)``).

Run ``python -m parity_tests.argument_table`` for a markdown table of what each package does
today, row by row (or set ``FOCAL_TABLE_STATUS=<path>`` while running the test module: it writes
the same table from the outcomes it computed).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

SOFTMAX = "softmax_focal"
SIGMOID = "sigmoid_focal"
CATEGORICAL = "categorical_focal"
LINEAR = "linear_softmax_focal"
FUNCTIONS = (SOFTMAX, SIGMOID, CATEGORICAL, LINEAR)
BAD_LABEL = "bad_label"  # the by-design difference: NaN entry in JAX, ValueError in torch

N, C, H = 4, 3, 5


@dataclasses.dataclass(frozen=True)
class Arr:
  """A NumPy value that each adapter converts to its framework's array (jax.Array, Tensor).

  Plain ``np.ndarray`` values, lists and tuples in a row's kwargs are passed as they are.
  """
  values: Any
  dtype: str = "float64"

  def numpy(self) -> np.ndarray:
    if self.dtype == "bfloat16":
      import ml_dtypes  # pylint: disable=import-outside-toplevel
      return np.asarray(self.values, np.float64).astype(ml_dtypes.bfloat16)
    return np.asarray(self.values).astype(self.dtype)


def _base_inputs() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(17)
  logits = rng.normal(size=(N, C)) * 2.0
  targets = np.exp(rng.normal(size=(N, C)))
  return {
      "logits": logits,
      "labels": np.array([0, 2, 1, 2]),
      "sig_labels": np.array([[1.0, 0.0, 0.3], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0],
                              [0.7, 1.0, 0.0]]),
      "targets": targets / targets.sum(-1, keepdims=True),
      "hidden": rng.normal(size=(N, H)),
      "kernel": rng.normal(size=(H, C)) * 0.7,
  }


BASE = _base_inputs()


@dataclasses.dataclass(frozen=True)
class Row:
  """One call: ``fn`` on ``inputs`` (base inputs unless overridden) with ``kwargs``.

  ``inputs`` may set ``logits``, ``labels`` (``targets`` for categorical), ``hidden``,
  ``kernel`` (as :class:`Arr` for another dtype, or NumPy float64 / int64 arrays). ``bad``
  marks the entries that are bad labels (for ``expect=BAD_LABEL``).
  """
  fn: str
  arg: str          # the argument the row is about (the message must name it)
  case: str         # short description
  kwargs: dict = dataclasses.field(default_factory=dict)
  inputs: dict = dataclasses.field(default_factory=dict)
  expect: Any = "ok"
  bad: Any = None

  @property
  def id(self) -> str:
    short = {SOFTMAX: "softmax", SIGMOID: "sigmoid", CATEGORICAL: "categorical",
             LINEAR: "linear"}[self.fn]
    return f"{short}-{self.arg}-{self.case}"

  @property
  def dtype(self) -> str:
    x = self.inputs.get("hidden" if self.fn == LINEAR else "logits")
    return x.dtype if isinstance(x, Arr) else "float64"

  def arrays(self) -> dict[str, Any]:
    """The positional inputs, by name: logits/labels, logits/targets or hidden/kernel/labels."""
    if self.fn == LINEAR:
      names = {"hidden": BASE["hidden"], "kernel": BASE["kernel"], "labels": BASE["labels"]}
    elif self.fn == SIGMOID:
      names = {"logits": BASE["logits"], "labels": BASE["sig_labels"]}
    elif self.fn == CATEGORICAL:
      names = {"logits": BASE["logits"], "targets": BASE["targets"]}
    else:
      names = {"logits": BASE["logits"], "labels": BASE["labels"]}
    out = dict(names)
    out.update(self.inputs)
    return {k: v if isinstance(v, Arr) else Arr(v, np.asarray(v).dtype.name)
            for k, v in out.items()}

  def label_shape(self) -> tuple[int, ...]:
    a = self.arrays()
    if self.fn == LINEAR:
      return a["hidden"].numpy().shape[:-1]
    if self.fn == SIGMOID:
      return a["logits"].numpy().shape
    return a["logits"].numpy().shape[:-1]


@dataclasses.dataclass
class Outcome:
  value: np.ndarray | None = None
  dtype: str | None = None
  error: type | None = None
  message: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None

  def __str__(self) -> str:
    if self.ok:
      v = np.asarray(self.value)
      shown = np.array2string(v, precision=5, max_line_width=1000, threshold=12)
      return f"ok {self.dtype} {shown}"
    return f"{self.error.__name__}: {self.message}"


# --------------------------------------------------------------------------- the table

def _alpha_rows(fn: str) -> list[Row]:
  sig = fn == SIGMOID
  vec = [0.2, 0.5, 0.9] if sig else [0.25, 1.0, 2.0]
  rows = [
      Row(fn, "alpha", "None", {"alpha": None}),
      Row(fn, "alpha", "scalar", {"alpha": 0.25}),
      Row(fn, "alpha", "zero", {"alpha": 0.0}),
      Row(fn, "alpha", "vector", {"alpha": Arr(vec)}),
      Row(fn, "alpha", "list", {"alpha": list(vec)}),
      Row(fn, "alpha", "tuple", {"alpha": tuple(vec)}),
      Row(fn, "alpha", "numpy", {"alpha": np.array(vec)}),
      Row(fn, "alpha", "numpy_float32", {"alpha": np.array(vec, np.float32)}),
      Row(fn, "alpha", "0d_array", {"alpha": Arr(0.25)}),
      Row(fn, "alpha", "wrong_shape", {"alpha": Arr(vec + [0.5])}, expect=ValueError),
      Row(fn, "alpha", "wrong_shape_list", {"alpha": vec[:2]}, expect=ValueError),
      Row(fn, "alpha", "2d", {"alpha": Arr([vec])}, expect=ValueError),
      Row(fn, "alpha", "negative", {"alpha": -0.5}, expect=ValueError),
      Row(fn, "alpha", "negative_in_vector", {"alpha": Arr([0.5, -0.1, 0.5])},
          expect=ValueError),
      Row(fn, "alpha", "inf", {"alpha": float("inf")}, expect=ValueError),
      Row(fn, "alpha", "inf_in_vector", {"alpha": Arr([0.5, np.inf, 0.5])}, expect=ValueError),
      Row(fn, "alpha", "nan", {"alpha": float("nan")}, expect=ValueError),
      Row(fn, "alpha", "nan_in_vector", {"alpha": Arr([0.5, np.nan, 0.5])}, expect=ValueError),
      Row(fn, "alpha", "nan_in_list", {"alpha": [0.5, float("nan"), 0.5]}, expect=ValueError),
      Row(fn, "alpha", "string", {"alpha": "0.25"}, expect=TypeError),
      Row(fn, "alpha", "bool", {"alpha": True}, expect=TypeError),
  ]
  if sig:
    rows += [
        Row(fn, "alpha", "one", {"alpha": 1.0}),
        Row(fn, "alpha", "torchvision_minus_1", {"alpha": -1.0}, expect=ValueError),
        Row(fn, "alpha", "1.5", {"alpha": 1.5}, expect=ValueError),
        Row(fn, "alpha", "1.5_in_vector", {"alpha": Arr([0.5, 1.5, 0.5])}, expect=ValueError),
    ]
  else:
    rows += [Row(fn, "alpha", "above_one", {"alpha": 3.0})]
  return rows


def _gamma_rows(fn: str) -> list[Row]:
  return [
      Row(fn, "gamma", "0", {"gamma": 0.0}),
      Row(fn, "gamma", "0.5", {"gamma": 0.5}),
      Row(fn, "gamma", "int", {"gamma": 2}),
      Row(fn, "gamma", "vector", {"gamma": Arr([0.0, 0.5, 2.0])}),
      Row(fn, "gamma", "list", {"gamma": [0.0, 0.5, 2.0]}),
      Row(fn, "gamma", "tuple", {"gamma": (0.0, 0.5, 2.0)}),
      Row(fn, "gamma", "numpy", {"gamma": np.array([0.0, 0.5, 2.0])}),
      Row(fn, "gamma", "negative", {"gamma": -1.0}, expect=ValueError),
      Row(fn, "gamma", "negative_in_vector", {"gamma": Arr([1.0, -0.5, 2.0])},
          expect=ValueError),
      Row(fn, "gamma", "inf", {"gamma": float("inf")}, expect=ValueError),
      Row(fn, "gamma", "inf_in_vector", {"gamma": Arr([1.0, np.inf, 2.0])}, expect=ValueError),
      Row(fn, "gamma", "nan", {"gamma": float("nan")}, expect=ValueError),
      Row(fn, "gamma", "wrong_shape", {"gamma": Arr([1.0, 2.0])}, expect=ValueError),
      Row(fn, "gamma", "None", {"gamma": None}, expect=TypeError),
  ]


def _smoothing_rows(fn: str) -> list[Row]:
  if fn == CATEGORICAL:  # no label_smoothing keyword: smooth the targets
    return [Row(fn, "label_smoothing", "not_a_keyword", {"label_smoothing": 0.1},
                expect=TypeError)]
  return [
      Row(fn, "label_smoothing", "0", {"label_smoothing": 0.0}),
      Row(fn, "label_smoothing", "0.1", {"label_smoothing": 0.1}),
      Row(fn, "label_smoothing", "1", {"label_smoothing": 1.0}),
      Row(fn, "label_smoothing", "int_0", {"label_smoothing": 0}),
      Row(fn, "label_smoothing", "-0.1", {"label_smoothing": -0.1}, expect=ValueError),
      Row(fn, "label_smoothing", "1.5", {"label_smoothing": 1.5}, expect=ValueError),
      Row(fn, "label_smoothing", "string", {"label_smoothing": "0.1"}, expect=TypeError),
      Row(fn, "label_smoothing", "None", {"label_smoothing": None}, expect=TypeError),
  ]


def _reduction_rows(fn: str) -> list[Row]:
  rows = [Row(fn, "reduction", r, {"reduction": r})
          for r in ("none", "sum", "mean", "mean_positive")]
  rows += [
      Row(fn, "reduction", "unknown", {"reduction": "avg"}, expect=ValueError),
      Row(fn, "reduction", "upper_case", {"reduction": "MEAN"}, expect=ValueError),
      Row(fn, "reduction", "None", {"reduction": None}, expect=ValueError),
  ]
  return rows


def _where_rows(fn: str) -> list[Row]:
  if fn == SIGMOID:  # labels (N, C)
    exact = np.array([[True, False, True], [True, True, True], [False, True, True],
                      [True, True, False]])
    bcast = {"last_axis": np.array([True, False, True]),
             "column": np.array([[True], [False], [True], [True]])}
    wrong = np.ones((N, C + 1), bool)
  else:  # labels / rows (N,)
    exact = np.array([True, False, True, True])
    bcast = {"size_1": np.array([True]), "scalar": np.array(False)}
    wrong = np.ones((N + 1,), bool)
  rows = [
      Row(fn, "where", "None", {"where": None}),
      Row(fn, "where", "exact", {"where": Arr(exact, "bool")}),
      Row(fn, "where", "exact_reduction_mean", {"where": Arr(exact, "bool"),
                                                "reduction": "mean"}),
      Row(fn, "where", "list", {"where": exact.tolist()}),
      Row(fn, "where", "numpy", {"where": exact}),
      Row(fn, "where", "wrong_shape", {"where": Arr(wrong, "bool")}, expect=ValueError),
      Row(fn, "where", "broadcasts_beyond", {"where": Arr(np.ones((2,) + exact.shape), "bool")},
          expect=ValueError),
      Row(fn, "where", "float", {"where": Arr(exact, "float64")}, expect=TypeError),
      Row(fn, "where", "int", {"where": Arr(exact, "int64")}, expect=TypeError),
  ]
  rows += [Row(fn, "where", f"broadcast_{k}", {"where": Arr(v, "bool"), "reduction": "mean"})
           for k, v in bcast.items()]
  return rows


def _ignore_rows(fn: str) -> list[Row]:
  if fn not in (SOFTMAX, LINEAR):
    return []
  big = np.random.default_rng(5).normal(size=(N, 300))
  hidden = BASE["hidden"]
  kernel300 = np.random.default_rng(6).normal(size=(H, 300)) * 0.3

  def wide(labels, dtype, num_classes):
    if fn == LINEAR:
      return {"kernel": kernel300[:, :num_classes], "labels": Arr(labels, dtype),
              "hidden": hidden}
    return {"logits": big[:, :num_classes], "labels": Arr(labels, dtype)}

  lab = lambda values, dtype: {"labels": Arr(values, dtype)}  # noqa: E731
  rows = [
      Row(fn, "ignore_index", "None", {"ignore_index": None}),
      Row(fn, "ignore_index", "in_range", {"ignore_index": 1}),
      Row(fn, "ignore_index", "in_range_mean", {"ignore_index": 2, "reduction": "mean"}),
      Row(fn, "ignore_index", "-100_present", {"ignore_index": -100, "reduction": "mean"},
          inputs=lab([0, -100, 1, 2], "int64")),
      Row(fn, "ignore_index", "-100_absent", {"ignore_index": -100}),
      Row(fn, "ignore_index", "huge_2**40", {"ignore_index": 2 ** 40}),
      Row(fn, "ignore_index", "int32_labels_2**40", {"ignore_index": 2 ** 40,
                                                      "reduction": "mean"},
          inputs=lab([0, 2, 1, 0], "int32")),
      Row(fn, "ignore_index", "uint8_labels_-100_C200", {"ignore_index": -100},
          inputs=wide([156, 0, 199, 3], "uint8", 200)),
      Row(fn, "ignore_index", "uint8_labels_in_range", {"ignore_index": 2},
          inputs=lab([0, 2, 1, 2], "uint8")),
      Row(fn, "ignore_index", "int8_labels_-100_present", {"ignore_index": -100},
          inputs=lab([0, -100, 1, 2], "int8")),
      Row(fn, "ignore_index", "int8_labels_300", {"ignore_index": 300},
          inputs=lab([0, 2, 1, 2], "int8")),
      Row(fn, "ignore_index", "uint16_labels_-100", {"ignore_index": -100},
          inputs=lab([0, 2, 1, 2], "uint16")),
      Row(fn, "ignore_index", "uint16_labels_65535", {"ignore_index": 65535},
          inputs=lab([0, 65535, 1, 2], "uint16")),
      Row(fn, "ignore_index", "int32_labels_-100", {"ignore_index": -100},
          inputs=lab([0, -100, 1, 2], "int32")),
      Row(fn, "ignore_index", "uint64_labels_2**40", {"ignore_index": 2 ** 40},
          inputs=lab([0, 2, 1, 2], "uint64")),
      Row(fn, "ignore_index", "float", {"ignore_index": 1.0}, expect=TypeError),
      Row(fn, "ignore_index", "bool", {"ignore_index": True}, expect=TypeError),
      Row(fn, "ignore_index", "string", {"ignore_index": "-100"}, expect=TypeError),
      Row(fn, "labels", "int8_C200", {}, inputs=wide([0, 127, 100, 5], "int8", 200)),
      Row(fn, "labels", "uint8_C300", {}, inputs=wide([0, 255, 200, 7], "uint8", 300)),
  ]
  return rows


def _background_rows(fn: str) -> list[Row]:
  if fn == SIGMOID:
    return [Row(fn, "background_class", "not_a_keyword", {"background_class": 0},
                expect=TypeError)]
  mp = {"reduction": "mean_positive"}
  return [
      Row(fn, "background_class", "0", {"background_class": 0, **mp}),
      Row(fn, "background_class", "2", {"background_class": 2, **mp}),
      Row(fn, "background_class", "-1", {"background_class": -1, **mp}),
      Row(fn, "background_class", "huge_2**40", {"background_class": 2 ** 40, **mp}),
      Row(fn, "background_class", "float", {"background_class": 1.0, **mp}, expect=TypeError),
      Row(fn, "background_class", "None", {"background_class": None, **mp}, expect=TypeError),
      Row(fn, "background_class", "string", {"background_class": "0", **mp},
          expect=TypeError),
  ]


def _sample_weight_rows(fn: str) -> list[Row]:
  if fn == SIGMOID:
    per_entry = np.array([[1.0, 2.0, 0.5], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0], [0.5, 0.0, 2.0]])
    bcast = np.array([0.5, 1.0, 2.0])
    wrong = np.ones((N, C + 1))
  else:
    per_entry = np.array([1.0, 2.0, 0.5, 0.0])
    bcast = np.array([2.0])
    wrong = np.ones((N + 1,))
  neg = per_entry.copy()
  neg.flat[1] = -1.0
  inf = per_entry.copy()
  inf.flat[1] = np.inf
  return [
      Row(fn, "sample_weight", "None", {"sample_weight": None}),
      Row(fn, "sample_weight", "scalar", {"sample_weight": 2.0}),
      Row(fn, "sample_weight", "scalar_mean", {"sample_weight": 2.0, "reduction": "mean"}),
      Row(fn, "sample_weight", "per_entry", {"sample_weight": Arr(per_entry)}),
      Row(fn, "sample_weight", "per_entry_mean", {"sample_weight": Arr(per_entry),
                                                  "reduction": "mean"}),
      Row(fn, "sample_weight", "per_entry_mean_positive",
          {"sample_weight": Arr(per_entry), "reduction": "mean_positive"}),
      Row(fn, "sample_weight", "broadcast", {"sample_weight": Arr(bcast),
                                             "reduction": "sum"}),
      Row(fn, "sample_weight", "list", {"sample_weight": per_entry.tolist()}),
      Row(fn, "sample_weight", "numpy", {"sample_weight": per_entry}),
      Row(fn, "sample_weight", "bool", {"sample_weight": Arr(per_entry > 0.6, "bool")}),
      Row(fn, "sample_weight", "int", {"sample_weight": Arr(per_entry.round(), "int64")}),
      Row(fn, "sample_weight", "with_where", {"sample_weight": Arr(per_entry),
                                              "where": Arr(per_entry != 1.0, "bool"),
                                              "reduction": "mean"}),
      Row(fn, "sample_weight", "negative", {"sample_weight": Arr(neg)}, expect=ValueError),
      Row(fn, "sample_weight", "negative_scalar", {"sample_weight": -1.0}, expect=ValueError),
      Row(fn, "sample_weight", "inf", {"sample_weight": Arr(inf)}, expect=ValueError),
      Row(fn, "sample_weight", "nan", {"sample_weight": Arr(np.where(np.isinf(inf), np.nan,
                                                                     inf))},
          expect=ValueError),
      Row(fn, "sample_weight", "wrong_shape", {"sample_weight": Arr(wrong)}, expect=ValueError),
      Row(fn, "sample_weight", "string", {"sample_weight": "1"}, expect=TypeError),
  ]


def _label_rows(fn: str) -> list[Row]:
  """Label dtypes and shapes, logits dtypes, C = 0, bad labels (by design)."""
  rows = []
  if fn in (SOFTMAX, LINEAR):
    for dt in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
      rows.append(Row(fn, "labels", dt, {"reduction": "mean"},
                      inputs={"labels": Arr([0, 2, 1, 2], dt)}))
    rows += [
        Row(fn, "labels", "bool", {}, inputs={"labels": Arr([0, 1, 1, 0], "bool")},
            expect=TypeError),
        Row(fn, "labels", "float", {}, inputs={"labels": Arr([0, 2, 1, 2], "float64")},
            expect=TypeError),
        Row(fn, "labels", "wrong_shape", {}, inputs={"labels": Arr([0, 2, 1], "int64")},
            expect=ValueError),
        Row(fn, "labels", "wrong_rank", {}, inputs={"labels": Arr([[0, 2, 1, 2]], "int64")},
            expect=ValueError),
        Row(fn, "labels", "out_of_range_C", {}, inputs={"labels": Arr([0, 3, 1, 2], "int64")},
            expect=BAD_LABEL, bad=[False, True, False, False]),
        Row(fn, "labels", "out_of_range_-1", {}, inputs={"labels": Arr([0, 2, -1, 2], "int64")},
            expect=BAD_LABEL, bad=[False, False, True, False]),
        Row(fn, "labels", "out_of_range_mean", {"reduction": "mean"},
            inputs={"labels": Arr([0, 3, 1, 2], "int64")}, expect=BAD_LABEL,
            bad=[False, True, False, False]),
        Row(fn, "labels", "out_of_range_masked_by_where", {"where": Arr([1, 0, 1, 1], "bool")},
            inputs={"labels": Arr([0, 3, 1, 2], "int64")}),
    ]
  elif fn == SIGMOID:
    hard = (BASE["sig_labels"] > 0.5)
    for dt in ("bool", "int8", "uint8", "int32", "int64", "float32"):
      rows.append(Row(fn, "labels", dt, {}, inputs={"labels": Arr(hard, dt)}))
    bad = np.zeros((N, C), bool)
    bad[1, 2] = True
    for name, v in (("2", 2.0), ("-0.5", -0.5), ("nan", np.nan)):
      y = BASE["sig_labels"].copy()
      y[1, 2] = v
      rows.append(Row(fn, "labels", f"outside_0_1_{name}", {}, inputs={"labels": y},
                      expect=BAD_LABEL, bad=bad))
    y = BASE["sig_labels"].copy()
    y[1, 2] = 2.0
    rows += [
        Row(fn, "labels", "outside_0_1_mean", {"reduction": "mean"}, inputs={"labels": y},
            expect=BAD_LABEL, bad=bad),
        Row(fn, "labels", "int_class_id_2", {}, inputs={"labels": Arr(np.where(bad, 2, hard),
                                                                     "int64")},
            expect=BAD_LABEL, bad=bad),
        Row(fn, "labels", "outside_0_1_masked_by_where", {"where": Arr(~bad, "bool")},
            inputs={"labels": y}),
        Row(fn, "labels", "wrong_shape", {}, inputs={"labels": BASE["sig_labels"][:, :2]},
            expect=ValueError),
    ]
  else:
    rows += [
        Row(fn, "targets", "float32", {}, inputs={"targets": Arr(BASE["targets"], "float32")}),
        Row(fn, "targets", "int", {}, inputs={"targets": Arr(np.eye(C)[[0, 2, 1, 2]], "int64")},
            expect=TypeError),
        Row(fn, "targets", "wrong_shape", {}, inputs={"targets": BASE["targets"][:, :2]},
            expect=ValueError),
    ]
  # Logits dtypes (hidden and kernel for linear).
  main = "hidden" if fn == LINEAR else "logits"
  for dt in ("float16", "bfloat16", "float32", "float64"):
    inputs = {main: Arr(BASE[main], dt)}
    if fn == LINEAR:
      inputs["kernel"] = Arr(BASE["kernel"], dt)
    rows.append(Row(fn, main, dt, {"reduction": "none"}, inputs=inputs))
  rows.append(Row(fn, main, "int", {}, inputs={main: Arr(np.round(BASE[main] * 3), "int64")},
                  expect=TypeError))
  rows.append(Row(fn, main, "bool", {}, inputs={main: Arr(BASE[main] > 0, "bool")},
                  expect=TypeError))
  # C = 0.
  if fn == LINEAR:
    rows.append(Row(fn, "kernel", "V_0", {}, inputs={"kernel": np.zeros((H, 0))},
                    expect=ValueError))
  elif fn == SIGMOID:  # no class axis: an empty batch of entries, loss 0 (none: empty)
    rows.append(Row(fn, "logits", "empty_last_axis", {"reduction": "mean"},
                    inputs={"logits": np.zeros((N, 0)), "labels": np.zeros((N, 0))}))
  else:
    inputs = {"logits": np.zeros((N, 0))}
    if fn == CATEGORICAL:
      inputs["targets"] = np.zeros((N, 0))
    rows.append(Row(fn, "logits", "C_0", {}, inputs=inputs, expect=ValueError))
  return rows


def _sigmoid_nchw_rows() -> list[Row]:
  rng = np.random.default_rng(4)
  fn = SIGMOID
  rows = []
  for tag, shape in (("W5", (2, 3, 4, 5)), ("C_equals_W", (2, 3, 4, 3))):
    logits = rng.normal(size=shape) * 2
    labels = (rng.uniform(size=shape) > 0.7).astype(np.float64)
    w = shape[-1]
    vec = np.linspace(0.1, 0.9, w)
    inputs = {"logits": logits, "labels": labels}
    rows += [
        Row(fn, "alpha", f"nchw_{tag}_last_axis_vector", {"alpha": Arr(vec)}, inputs=inputs),
        Row(fn, "gamma", f"nchw_{tag}_last_axis_vector", {"gamma": Arr(vec * 3)},
            inputs=inputs),
        Row(fn, "alpha", f"nchw_{tag}_list", {"alpha": vec.tolist(), "reduction": "sum"},
            inputs=inputs),
    ]
  logits = rng.normal(size=(2, 3, 4, 5))
  labels = (rng.uniform(size=(2, 3, 4, 5)) > 0.7).astype(np.float64)
  inputs = {"logits": logits, "labels": labels}
  rows += [
      Row(fn, "alpha", "nchw_channel_vector_C3", {"alpha": Arr([0.2, 0.5, 0.8])}, inputs=inputs,
          expect=ValueError),
      Row(fn, "gamma", "nchw_channel_vector_C3", {"gamma": Arr([0.0, 1.0, 2.0])}, inputs=inputs,
          expect=ValueError),
      Row(fn, "where", "nchw_broadcast_hw", {"where": Arr(np.eye(4, 5) > 0, "bool"),
                                             "reduction": "mean"}, inputs=inputs),
      Row(fn, "sample_weight", "nchw_broadcast_c11", {"sample_weight": Arr(
          np.array([1.0, 2.0, 0.5]).reshape(3, 1, 1)), "reduction": "sum"}, inputs=inputs),
  ]
  return rows


def build_table() -> list[Row]:
  rows: list[Row] = []
  for fn in FUNCTIONS:
    rows += [Row(fn, "defaults", "explicit_none_reduction", {})]
    rows += _alpha_rows(fn)
    rows += _gamma_rows(fn)
    rows += _smoothing_rows(fn)
    rows += _reduction_rows(fn)
    rows += _where_rows(fn)
    rows += _ignore_rows(fn)
    rows += _background_rows(fn)
    rows += _sample_weight_rows(fn)
    rows += _label_rows(fn)
  rows += _sigmoid_nchw_rows()
  ids = [r.id for r in rows]
  dup = {i for i in ids if ids.count(i) > 1}
  assert not dup, f"duplicate row ids: {sorted(dup)}"
  return rows


TABLE = build_table()


# --------------------------------------------------------------------------- adapters

def _jax_value(v: Any) -> Any:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jnp.asarray(v.numpy()) if isinstance(v, Arr) else v


def _torch_value(v: Any, transpose: bool = False) -> Any:
  import torch  # pylint: disable=import-outside-toplevel
  if not isinstance(v, Arr):
    return v
  if v.dtype == "bfloat16":
    x = np.asarray(v.numpy(), np.float32)
    x = x.T if transpose else x
    return torch.from_numpy(np.array(x, order="C")).to(torch.bfloat16)
  x = v.numpy()
  x = x.T if transpose else x
  return torch.from_numpy(np.array(x, order="C"))


def _kwargs(row: Row, framework: str, extra: dict | None = None) -> dict:
  kw = {"reduction": "none"}
  if row.fn in (SOFTMAX, LINEAR):
    kw["ignore_index"] = None
  kw.update(row.kwargs)
  kw.update(extra or {})
  if row.fn in (SOFTMAX, CATEGORICAL):
    kw["axis" if framework == "jax" else "dim"] = -1 if framework == "jax" else 1
  convert = _jax_value if framework == "jax" else _torch_value
  return {k: convert(v) for k, v in kw.items()}


def _outcome_from(out: Any, framework: str) -> Outcome:
  if framework == "jax":
    dtype = str(out.dtype)
    value = np.asarray(out.astype("float32") if dtype == "bfloat16" else out, np.float64)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    dtype = str(out.dtype).replace("torch.", "")
    value = out.detach().to(torch.float64).cpu().numpy()
  return Outcome(value=value, dtype=dtype)


def call_jax(row: Row, *, extra: dict | None = None, arrays: dict | None = None) -> Outcome:
  """Calls ``focal_jax.<fn>`` on the row; the value or the exception raised."""
  import focal_jax  # pylint: disable=import-outside-toplevel
  a = arrays or row.arrays()
  try:
    fn = getattr(focal_jax, row.fn)
    kw = _kwargs(row, "jax", extra)
    if row.fn == LINEAR:
      out = fn(_jax_value(a["hidden"]), _jax_value(a["kernel"]), _jax_value(a["labels"]), **kw)
    else:
      second = a["targets"] if row.fn == CATEGORICAL else a["labels"]
      out = fn(_jax_value(a["logits"]), _jax_value(second), **kw)
    return _outcome_from(out, "jax")
  except Exception as e:  # noqa: BLE001 -- the outcome is the exception
    return Outcome(error=type(e), message=str(e))


def call_torch(row: Row, *, extra: dict | None = None, arrays: dict | None = None) -> Outcome:
  """Calls ``focal_torch.<fn>`` on the row (kernel transposed to weight); value or exception."""
  import focal_torch  # pylint: disable=import-outside-toplevel
  a = arrays or row.arrays()
  try:
    fn = getattr(focal_torch, row.fn)
    kw = _kwargs(row, "torch", extra)
    if row.fn == LINEAR:
      out = fn(_torch_value(a["hidden"]), _torch_value(a["kernel"], transpose=True),
               _torch_value(a["labels"]), **kw)
    else:
      second = a["targets"] if row.fn == CATEGORICAL else a["labels"]
      out = fn(_torch_value(a["logits"]), _torch_value(second), **kw)
    return _outcome_from(out, "torch")
  except Exception as e:  # noqa: BLE001 -- the outcome is the exception
    return Outcome(error=type(e), message=str(e))


# --------------------------------------------------------------------------- messages

_FRAMEWORK_WORDS = [
    # whole type names first
    (r"\btorch\.Tensor\b|\bjax\.Array\b|\bjnp\.ndarray\b|\bArrayImpl\b", "ARRAY"),
    # dtype spellings: torch.float32 -> float32 (also torch.bool, torch.uint8, ...)
    (r"\btorch\.(?=(?:b?float|u?int|bool|complex|half|double|long)\w*\b)", ""),
    (r"\b(?:[Tt]ensor|[Aa]rray)s\b", "ARRAYS"),
    (r"\b(?:[Tt]ensor|[Aa]rray)\b", "ARRAY"),
    (r"\b(?:axes|dims)\b", "AXES"),
    (r"\b(?:axis|dim)\b", "AXIS"),
    (r"\b(?:kernel|weight)\b", "KERNEL"),
]


def normalize_message(message: str) -> str:
  """The message without its framework words: array/tensor, jax.Array/torch.Tensor, dtype
  spellings (``torch.float32`` -> ``float32``), axis/dim, kernel/weight. Nothing else."""
  for pattern, repl in _FRAMEWORK_WORDS:
    message = re.sub(pattern, repl, message)
  return message


# --------------------------------------------------------------------------- the checks

RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
ATOL = {"float64": 1e-300, "float32": 1e-30, "float16": 1e-4, "bfloat16": 1e-3}


def _close(a: np.ndarray, b: np.ndarray, dtype: str) -> str | None:
  """None if equal within the dtype's tolerance (NaN where NaN), else what differs."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    return f"shapes differ: {a.shape} vs {b.shape}"
  if not np.allclose(a, b, rtol=RTOL[dtype], atol=ATOL[dtype], equal_nan=True):
    with np.errstate(invalid="ignore"):
      err = np.abs(a - b) / np.maximum(np.abs(b), 1e-300)
    worst = np.max(np.where(np.isnan(err), np.inf, err))
    return f"values differ (max rel err {worst:.3g}): {a} vs {b}"
  return None


def check_row(row: Row, j: Outcome | None = None, t: Outcome | None = None) -> list[str]:
  """The problems of a row (empty when it holds): both outcomes against the row's expectation."""
  j = call_jax(row) if j is None else j
  t = call_torch(row) if t is None else t
  problems = []
  if row.expect == "ok":
    for name, o in (("jax", j), ("torch", t)):
      if not o.ok:
        problems.append(f"{name} raised {o}, expected to accept")
    if j.ok and t.ok:
      if j.dtype != t.dtype:
        problems.append(f"result dtypes differ: jax {j.dtype}, torch {t.dtype}")
      diff = _close(j.value, t.value, row.dtype)
      if diff:
        problems.append(diff)
  elif row.expect == BAD_LABEL:
    problems += _check_bad_label(row, j, t)
  else:
    exc = row.expect
    for name, o in (("jax", j), ("torch", t)):
      if o.ok:
        problems.append(f"{name} accepted ({o}), expected {exc.__name__}")
      elif o.error is not exc:
        problems.append(f"{name} raised {o.error.__name__} ({o.message}), expected "
                        f"{exc.__name__}")
      else:
        msg = normalize_message(o.message)
        if row.fn not in msg or normalize_message(row.arg) not in msg:
          problems.append(f"{name} message does not name {row.fn} and {row.arg}: {o.message}")
    if not j.ok and not t.ok:
      nj, nt = normalize_message(j.message), normalize_message(t.message)
      if nj != nt:
        problems.append(f"normalized messages differ:\n  jax:   {nj}\n  torch: {nt}")
  return problems


def _check_bad_label(row: Row, j: Outcome, t: Outcome) -> list[str]:
  """JAX: NaN for the bad entries (NaN if reduced), the others equal torch's numbers with the
  bad entries replaced by a good label and masked. torch: ValueError naming the labels."""
  problems = []
  if t.ok or t.error is not ValueError or "labels" not in t.message or row.fn not in t.message:
    problems.append(f"torch: expected ValueError naming {row.fn} and labels, got {t}")
  if not j.ok:
    return problems + [f"jax: expected NaN for the bad entries, raised {j}"]
  bad = np.asarray(row.bad, bool)
  arrays = row.arrays()
  labels = arrays["labels"]
  fixed = np.where(bad, 0, labels.numpy()).astype(labels.numpy().dtype)
  arrays = dict(arrays, labels=Arr(fixed, labels.dtype))
  where = row.kwargs.get("where")
  keep = ~bad if where is None else (~bad & np.asarray(where.numpy(), bool))
  reduction = row.kwargs.get("reduction", "none")
  masked = call_torch(row, extra={"where": Arr(keep, "bool"), "reduction": "none"},
                      arrays=arrays)
  if reduction != "none":
    if not np.isnan(j.value).all():
      problems.append(f"jax: expected a NaN {reduction}, got {j.value}")
    return problems
  if not np.array_equal(np.isnan(j.value), bad):
    problems.append(f"jax: expected NaN exactly at {bad.tolist()}, got {j.value}")
  if not masked.ok:
    problems.append(f"torch with the bad entries masked raised {masked}")
  else:
    diff = _close(np.where(bad, 0.0, j.value), masked.value, row.dtype)
    if diff:
      problems.append(f"jax's good entries vs torch with the bad entries masked: {diff}")
  return problems


def status_markdown(rows: list[Row] | None = None, outcome: Any = None) -> str:
  """A markdown table of each row's outcome in each package today.

  ``outcome(framework, row)`` gives the outcomes (``framework`` "jax" or "torch"); by default
  the row is called in each package.
  """
  rows = TABLE if rows is None else rows
  if outcome is None:
    outcome = lambda fw, row: call_jax(row) if fw == "jax" else call_torch(row)  # noqa: E731
  lines = ["| row | expect | holds | focal_jax | focal_torch |", "|---|---|---|---|---|"]
  passed = 0
  failing: dict[tuple[str, str], list[str]] = {}
  for row in rows:
    j, t = outcome("jax", row), outcome("torch", row)
    problems = check_row(row, j, t)
    passed += not problems
    if problems:
      failing.setdefault((row.fn, row.arg), []).append(row.case)
    expect = row.expect if isinstance(row.expect, str) else row.expect.__name__
    cell = lambda o: str(o).replace("|", "\\|").replace("\n", " ")[:300]  # noqa: E731
    lines.append(f"| {row.id} | {expect} | {'yes' if not problems else 'NO'} | {cell(j)} | "
                 f"{cell(t)} |")
  head = [f"{passed} of {len(rows)} rows hold.", "", "Rows that do not hold, by function and "
          "argument:", ""]
  head += [f"- {fn} `{arg}` ({len(cases)}): {', '.join(cases)}"
           for (fn, arg), cases in failing.items()]
  return "\n".join(head) + "\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")
  print(status_markdown())
