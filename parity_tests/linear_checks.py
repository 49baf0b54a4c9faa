"""Parity of the fused ``linear_softmax_focal`` (issue 6).

JAX takes ``kernel`` ``(H, V)`` (flax ``Dense``), torch ``weight`` ``(V, H)`` (``nn.Linear``);
the one kwargs dict is the same otherwise (``bias``, ``chunk_size`` and every
``softmax_focal`` keyword). The float64 reference is ``reference.softmax_focal`` of
``hidden @ kernel + bias``. Compared: the value and the gradient with respect to ``hidden``,
``kernel`` (torch's ``weight.grad`` transposed) and ``bias``, concatenated; each part is
scaled by its own largest reference magnitude first, so a small part is not hidden behind a
large one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

import focal_reference as reference
from parity_tests.cases import IGNORE_INDEX, NUMPY_DTYPES, quantize
from parity_tests.compare import Check, Output, measure, _dtype_name, _np
from parity_tests.tolerances import linear_tolerance

JAX_VS_TORCH = "JAX vs torch linear_softmax_focal"
JAX_VS_REF = "JAX linear_softmax_focal vs float64 reference"
TORCH_VS_REF = "torch linear_softmax_focal vs float64 reference"


@dataclasses.dataclass(frozen=True)
class LinearCase:
  """``(n, h)`` hidden, ``(h, v)`` kernel, ``(n,)`` labels; ``chunk_size`` rows at a time."""

  n: int = 24
  h: int = 16
  v: int = 50
  dtype: str = "float32"
  alpha: Any = None
  gamma: Any = 2.0
  label_smoothing: float = 0.0
  mask: str = "none"  # none | where | ignore | both
  reduction: str = "mean"
  background_class: int = 0
  bias: bool = True
  chunk_size: int | None = 7
  seed: int = 0

  def describe(self) -> str:
    a = "None" if self.alpha is None else ("(V,)" if isinstance(self.alpha, tuple)
                                           else f"{self.alpha:g}")
    g = "(V,)" if isinstance(self.gamma, tuple) else f"{self.gamma:g}"
    return (f"linear_softmax_focal(n={self.n}, h={self.h}, v={self.v}) {self.dtype} "
            f"alpha={a} gamma={g} eps={self.label_smoothing:g} {self.reduction} "
            f"mask={self.mask} bias={self.bias} chunk={self.chunk_size} seed={self.seed}")


def make_linear_inputs(case: LinearCase):
  """(arrays dict of float64 dtype-exact values, int64 labels, cotangent, kwargs)."""
  rng = np.random.default_rng(case.seed)
  hidden = quantize(rng.standard_normal((case.n, case.h)), case.dtype)
  kernel = quantize(rng.standard_normal((case.h, case.v)) * 3 / np.sqrt(case.h), case.dtype)
  bias = quantize(rng.standard_normal(case.v) * 0.5, case.dtype) if case.bias else None
  labels = rng.integers(0, case.v, case.n).astype(np.int64)
  where = rng.random(case.n) < 0.75 if case.mask in ("where", "both") else None
  if case.mask in ("ignore", "both"):
    labels[rng.random(case.n) < 0.25] = IGNORE_INDEX
  cot = (np.round(rng.uniform(0.5, 1.5, case.n) * 32) / 32 if case.reduction == "none"
         else np.ones(()))
  hyper = lambda x: (None if x is None else np.asarray(x, np.float32)
                     if isinstance(x, tuple) else float(x))
  kwargs = {"chunk_size": case.chunk_size, "alpha": hyper(case.alpha),
            "gamma": hyper(case.gamma), "label_smoothing": case.label_smoothing,
            "where": where, "ignore_index": IGNORE_INDEX, "reduction": case.reduction,
            "background_class": case.background_class}
  return {"hidden": hidden, "kernel": kernel, "bias": bias}, labels, cot, kwargs


def _pack(parts: list[np.ndarray]) -> np.ndarray:
  return np.concatenate([np.asarray(p, np.float64).ravel() for p in parts])


def run_jax_linear(arrays, labels, cot, kwargs, dtype: str) -> Output:
  import jax.numpy as jnp
  d = NUMPY_DTYPES[dtype]
  params = {k: jnp.asarray(v.astype(d)) for k, v in arrays.items() if v is not None}
  kw_arrays = {k: jnp.asarray(v) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, np.ndarray)))
  out, grads = _jax_linear(static)(params, jnp.asarray(labels), kw_arrays, jnp.asarray(cot))
  parts = [grads["hidden"], grads["kernel"]] + ([grads["bias"]] if "bias" in grads else [])
  dtypes = {str(p.dtype) for p in parts}
  return Output(np.asarray(out, np.float64), _pack(parts), str(out.dtype),
                dtypes.pop() if len(dtypes) == 1 else str(sorted(dtypes)))


@functools.lru_cache(maxsize=None)
def _jax_linear(static: tuple):
  import jax
  import focal_jax

  @jax.jit
  def value_and_vjp(params, labels, kw_arrays, cot):
    def f(p):
      return focal_jax.linear_softmax_focal(p["hidden"], p["kernel"], labels,
                                            bias=p.get("bias"), **dict(static), **kw_arrays)
    out, pullback = jax.vjp(f, params)
    return out, pullback(cot.astype(out.dtype))[0]
  return value_and_vjp


def run_torch_linear(arrays, labels, cot, kwargs, dtype: str) -> Output:
  import torch
  import focal_torch
  td = getattr(torch, dtype)
  t = lambda x: torch.tensor(x, dtype=torch.float64).to(td).requires_grad_(True)
  hidden, weight = t(arrays["hidden"]), t(arrays["kernel"].T.copy())
  bias = None if arrays["bias"] is None else t(arrays["bias"])
  kw = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
  out = focal_torch.linear_softmax_focal(hidden, weight, torch.from_numpy(labels), bias=bias,
                                         **kw)
  out.backward(torch.as_tensor(cot).to(out.dtype))
  parts = [hidden.grad, weight.grad.T] + ([] if bias is None else [bias.grad])
  dtypes = {_dtype_name(p.dtype) for p in parts}
  return Output(_np(out), _pack([_np(p) for p in parts]), _dtype_name(out.dtype),
                dtypes.pop() if len(dtypes) == 1 else str(sorted(dtypes)))


def run_reference_linear(arrays, labels, cot, kwargs) -> tuple[Output, float]:
  """The float64 reference and ``kappa``, the condition number of the gradient products."""
  import torch
  t = lambda x: torch.tensor(x, dtype=torch.float64, requires_grad=True)
  hidden, kernel = t(arrays["hidden"]), t(arrays["kernel"])
  bias = None if arrays["bias"] is None else t(arrays["bias"])
  z = hidden @ kernel + (0 if bias is None else bias)
  z.retain_grad()
  kw = {k: v for k, v in kwargs.items() if k != "chunk_size"}
  out = reference.softmax_focal(z, labels, axis=-1, **kw)
  out.backward(torch.as_tensor(cot, dtype=torch.float64))
  parts = [hidden.grad, kernel.grad] + ([] if bias is None else [bias.grad])
  dz, h, k = _np(z.grad), np.abs(arrays["hidden"]), np.abs(arrays["kernel"])
  bounds = [np.abs(dz) @ k.T, h.T @ np.abs(dz)] + ([] if bias is None else
                                                    [np.abs(dz).sum(0)])
  kappa = max(float(np.max(b) / max(np.max(np.abs(_np(p))), 1e-300))
              for b, p in zip(bounds, parts))
  return Output(_np(out), _pack([_np(p) for p in parts]), "float64", "float64"), kappa


def _normalize(o: Output, ref_parts_scale: np.ndarray) -> Output:
  return dataclasses.replace(o, grad=o.grad / ref_parts_scale)


def checks_linear(case: LinearCase, with_torch: bool = True) -> list[Check]:
  """JAX vs torch (if ``with_torch``), and each vs float64, for one fused call."""
  arrays, labels, cot, kwargs = make_linear_inputs(case)
  ref, kappa = run_reference_linear(arrays, labels, cot, kwargs)
  # Per-part scales: each gradient part divided by its largest reference magnitude.
  sizes = [case.n * case.h, case.h * case.v] + ([case.v] if case.bias else [])
  bounds = np.cumsum([0] + sizes)
  scale = np.ones_like(ref.grad)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    m = np.max(np.abs(ref.grad[lo:hi]), initial=0.0)
    scale[lo:hi] = m if m > 0 else 1.0
  ref = _normalize(ref, scale)
  outs = {"JAX": _normalize(run_jax_linear(arrays, labels, cot, kwargs, case.dtype), scale)}
  if with_torch:
    outs["torch"] = _normalize(run_torch_linear(arrays, labels, cot, kwargs, case.dtype), scale)
  tol = linear_tolerance(case.dtype, case.h, kappa)
  d = case.describe()
  checks = [measure(JAX_VS_REF, case.dtype, d, outs["JAX"], ref, tol, expect_dtype=case.dtype)]
  if with_torch:
    checks.insert(0, measure(JAX_VS_TORCH, case.dtype, d, outs["JAX"], outs["torch"],
                             tol.doubled(), ref, expect_dtype=case.dtype))
    checks.append(measure(TORCH_VS_REF, case.dtype, d, outs["torch"], ref, tol,
                          expect_dtype=case.dtype))
  return checks


def torch_has_linear() -> bool:
  import focal_torch
  return hasattr(focal_torch, "linear_softmax_focal")


def checks_linear_both(case: LinearCase) -> list[Check]:
  """``checks_linear`` with torch when ``focal_torch`` has the function (the report's form)."""
  return checks_linear(case, with_torch=torch_has_linear())
