"""The comparison logic shared by the pytest suite and ``python -m parity_tests``.

Three layers, one way to do each thing:

- runners (``run_jax``, ``run_torch``, ``run_reference``) evaluate one ``Case`` and return an
  ``Output``: the value and the vector-Jacobian product with the case's cotangent (the gradient
  with respect to the logits for scalar reductions), both as float64 NumPy arrays, plus the
  dtypes the framework returned them in;
- ``measure`` turns two outputs and a float64 reference into a ``Check``: max abs and relative
  error of value and gradient, the tolerance, pass/fail;
- ``checks_*`` functions run one comparison family (cross-framework, DeepSpeed, anchors) and
  return their checks. Tests assert on them; the report aggregates them into rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable

import numpy as np

import focal_reference
from parity_tests.cases import NUMPY_DTYPES, Case, Inputs, jax_kwargs, make_inputs, torch_kwargs
from parity_tests.tolerances import Tolerance, tolerance


@dataclasses.dataclass
class Output:
  """A loss value and its VJP w.r.t. the logits, as float64 arrays, with returned dtypes."""

  value: np.ndarray
  grad: np.ndarray | None
  value_dtype: str
  grad_dtype: str | None


@dataclasses.dataclass
class Check:
  """The outcome of comparing one output with another on one configuration.

  ``*_rel`` is norm-wise: ``max|a - b| / max|reference|`` over the array (the reference's
  largest magnitude, so an error is measured against the scale of the result; see
  ``parity_tests.tolerances``). A mismatch in non-finite entries makes the error ``inf``.
  """

  comparison: str
  dtype: str
  config: str
  value_abs: float
  value_rel: float
  grad_abs: float
  grad_rel: float
  tol: Tolerance
  ok: bool
  note: str = ""

  def message(self) -> str:
    return (f"{self.comparison} [{self.dtype}] {self.config}: value rel {self.value_rel:.3g} "
            f"(abs {self.value_abs:.3g}), grad rel {self.grad_rel:.3g} (abs {self.grad_abs:.3g}); "
            f"tolerance value {self.tol.value:.3g}, grad {self.tol.grad:.3g}"
            + (f"; {self.note}" if self.note else ""))


# ----------------------------------------------------------------------------- runners


def _torch_dtype(name: str):
  import torch
  return getattr(torch, name)


def run_jax(fn: str | Callable, logits: np.ndarray, labels: np.ndarray, kwargs: dict,
            dtype: str, cotangent: np.ndarray | None = None) -> Output:
  """``focal_jax.<fn>(logits, labels, **kwargs)`` and its VJP, via ``jax.vjp`` under ``jit``.

  Arrays (logits, labels, masks, per-class alpha / gamma, cotangent) are traced arguments;
  Python scalars in ``kwargs`` are static, as a caller's ``jit`` would see them.
  """
  import jax
  import jax.numpy as jnp
  if dtype == "float64" and not jax.config.jax_enable_x64:
    raise RuntimeError("parity_tests: float64 cases need jax_enable_x64 (set JAX_ENABLE_X64=1)")
  if isinstance(fn, str):
    import focal_jax
    fn = getattr(focal_jax, fn)
  x = jnp.asarray(logits.astype(NUMPY_DTYPES[dtype]))
  y = jnp.asarray(labels if labels.dtype.kind == "i" else labels.astype(NUMPY_DTYPES[dtype]))
  kw = jax_kwargs(kwargs)
  arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
  static = tuple(sorted((k, v) for k, v in kw.items() if not isinstance(v, jax.Array)))
  cot = jnp.asarray(np.ones(()) if cotangent is None else cotangent)
  out, g = _jax_value_and_vjp(fn, static)(x, y, arrays, cot)
  return Output(np.asarray(out, np.float64), np.asarray(g, np.float64), str(out.dtype),
                str(g.dtype))


@functools.lru_cache(maxsize=None)
def _jax_value_and_vjp(fn: Callable, static: tuple):
  """A jitted (value, VJP) of ``fn`` with the static kwargs baked in (cached per structure)."""
  import jax

  @jax.jit
  def value_and_vjp(x, y, arrays, cot):
    out, pullback = jax.vjp(lambda x_: fn(x_, y, **dict(static), **arrays), x)
    (g,) = pullback(cot.astype(out.dtype))
    return out, g
  return value_and_vjp


def run_torch(fn: str | Callable, logits: np.ndarray, labels: np.ndarray, kwargs: dict,
              dtype: str, cotangent: np.ndarray | None = None) -> Output:
  """``focal_torch.<fn>(logits, labels, **kwargs)`` and ``.backward(cotangent)``."""
  import torch
  if isinstance(fn, str):
    import focal_torch
    fn = getattr(focal_torch, fn)
  td = _torch_dtype(dtype)
  x = torch.tensor(logits, dtype=torch.float64).to(td).requires_grad_(True)
  y = torch.from_numpy(labels) if labels.dtype.kind == "i" else torch.tensor(labels).to(td)
  out = fn(x, y, **torch_kwargs(kwargs))
  cot = torch.as_tensor(np.ones(()) if cotangent is None else cotangent).to(out.dtype)
  out.backward(cot)
  g = x.grad
  return Output(_np(out), None if g is None else _np(g), _dtype_name(out.dtype),
                None if g is None else _dtype_name(g.dtype))


def run_reference(fn: str, logits: np.ndarray, labels: np.ndarray, kwargs: dict,
                  dtype: str = "float64", cotangent: np.ndarray | None = None) -> Output:
  """The float64 reference (``focal_reference``, under torch autograd); ``dtype`` other
  than float64 evaluates the same formula on ``dtype`` inputs in max(float32, dtype) and rounds
  the result to ``dtype`` (the plain low-precision evaluation the tolerances are derived
  from)."""
  import torch
  td = _torch_dtype(dtype)
  compute = "float64" if dtype == "float64" else "float32"
  x = torch.tensor(logits, dtype=torch.float64).to(td).requires_grad_(True)
  kw = dict(kwargs)
  out = focal_reference.FUNCTIONS[fn](x, labels, compute=compute, **kw).to(td)
  cot = torch.as_tensor(np.ones(()) if cotangent is None else cotangent).to(td)
  out.backward(cot)
  return Output(_np(out), _np(x.grad), _dtype_name(out.dtype), _dtype_name(x.grad.dtype))


def _np(t) -> np.ndarray:
  import torch
  return t.detach().to(torch.float64).cpu().numpy()


def _dtype_name(d) -> str:
  return str(d).replace("torch.", "")


def run_case(runner: Callable, case: Case, inputs: Inputs | None = None) -> Output:
  """Run ``case`` with ``runner``; the reference always runs in float64 (the truth)."""
  inputs = make_inputs(case) if inputs is None else inputs
  dtype = "float64" if runner is run_reference else case.dtype
  return runner(case.fn, inputs.logits, inputs.labels, inputs.kwargs, dtype, inputs.cotangent)


# ----------------------------------------------------------------------------- measuring


def _errors(a: np.ndarray | None, b: np.ndarray | None, ref: np.ndarray | None,
            floor: float = 0.0):
  """(max abs error, norm-wise relative error) of ``a`` against ``b``: the error over
  ``max(max|ref|, floor)`` (``ref`` defaults to ``b``)."""
  if a is None or b is None:
    return (0.0, 0.0) if a is None and b is None else (np.inf, np.inf)
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    return np.inf, np.inf
  fa, fb = np.isfinite(a), np.isfinite(b)
  if not np.array_equal(fa, fb) or not np.array_equal(a[~fa], b[~fb]):
    return np.inf, np.inf
  if not fa.any():
    return 0.0, 0.0
  err = float(np.max(np.abs(a[fa] - b[fa]), initial=0.0))
  r = np.asarray(b if ref is None else ref, np.float64)
  scale = max(float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0)), floor)
  if err == 0.0:
    return 0.0, 0.0
  return err, (err / scale if scale > 0 else np.inf)


def measure(comparison: str, dtype: str, config: str, a: Output, b: Output, tol: Tolerance,
            ref: Output | None = None, check_grad: bool = True,
            expect_dtype: str | None = None, floor: tuple[float, float] = (0.0, 0.0)) -> Check:
  """Compare ``a`` with ``b`` (errors scaled by ``ref``, default ``b``, floored at ``floor``
  for value and gradient) under ``tol``."""
  va, vr = _errors(a.value, b.value, None if ref is None else ref.value, floor[0])
  if check_grad:
    ga, gr = _errors(a.grad, b.grad, None if ref is None else ref.grad, floor[1])
  else:
    ga = gr = 0.0
  ok = bool(vr <= tol.value and gr <= tol.grad)
  note = ""
  if expect_dtype is not None:
    got = {a.value_dtype, a.grad_dtype if check_grad else a.value_dtype}
    if got != {expect_dtype}:
      ok = False
      note = f"returned dtypes {sorted(got)}, expected {expect_dtype}"
  return Check(comparison, dtype, config, va, vr, ga, gr, tol, ok, note)


# ----------------------------------------------------------------------------- families


JAX_VS_TORCH = "JAX vs torch"
JAX_VS_REF = "JAX vs float64 reference"
TORCH_VS_REF = "torch vs float64 reference"


def checks_cross_framework(case: Case) -> list[Check]:
  """JAX vs torch, and each vs the float64 reference, on one case (value and VJP)."""
  inputs = make_inputs(case)
  ref = run_case(run_reference, case, inputs)
  outs = {"jax": run_case(run_jax, case, inputs), "torch": run_case(run_torch, case, inputs)}
  tol = tolerance(case.dtype)
  d = case.describe()
  return [
      measure(JAX_VS_TORCH, case.dtype, d, outs["jax"], outs["torch"], tol.doubled(), ref,
              expect_dtype=case.dtype),
      measure(JAX_VS_REF, case.dtype, d, outs["jax"], ref, tol, expect_dtype=case.dtype),
      measure(TORCH_VS_REF, case.dtype, d, outs["torch"], ref, tol, expect_dtype=case.dtype),
  ]


def run_all(cases: Iterable[Case], family: Callable[[Case], list[Check]],
            progress: Callable[[int], None] | None = None) -> list[Check]:
  out: list[Check] = []
  for case in cases:
    out.extend(family(case))
    if progress is not None:
      progress(1)
  return out
