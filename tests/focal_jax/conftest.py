"""The references and compiled-call helpers of the focal_jax tests.

The float64 references are ``focal_reference``'s, the one copy of the formulas shared with the
torch tests, the parity suite and the benchmarks (written from docs/design.md, no code shared
with focal_jax). They are handed to test modules through the ``refs`` fixture (pytest runs with
--import-mode=importlib, so test modules cannot import each other), under the names and
signatures these tests use:

- ``softmax_focal``, ``sigmoid_focal``, ``categorical_focal``, ``reduce``: NumPy float64 values,
  JAX's defaults (``reduction="none"``, ``ignore_index=None``, class axis -1);
- ``softmax_focal_rows(z, t, alpha, gamma, label_smoothing)``: per-row losses, class axis last,
  labels in range;
- ``jnp_*_sum``: the same formulas evaluated textbook-style (``stable=False``: ``1 - p`` from
  ``p`` and a plain power, in the input's dtype) in jax.numpy, so that plain autodiff of them is
  an independent reference for gradients and Hessians at moderate margins (and shows the NaN
  gradient the library avoids).

The ``class_mesh`` fixture gives the 4-device meshes of the class-sharding tests
(test_class_axis.py, test_class_sharded.py), one copy for both.
"""

from __future__ import annotations

import functools
import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import focal_reference


def softmax_focal_rows(z, t, alpha=None, gamma=2.0, label_smoothing=0.0):
  """Per-row loss, class axis last, labels in range: alpha_t (1 - p)^gamma_t CE_eps."""
  return focal_reference.softmax_focal(z, t, alpha=alpha, gamma=gamma,
                                       label_smoothing=label_smoothing)


def jnp_softmax_focal_sum(z, t, alpha=None, gamma=2.0, label_smoothing=0.0):
  return focal_reference.softmax_focal(z, t, alpha=alpha, gamma=gamma,
                                       label_smoothing=label_smoothing, reduction="sum",
                                       compute=None, stable=False)


def jnp_sigmoid_focal_sum(x, y, alpha=None, gamma=2.0):
  return focal_reference.sigmoid_focal(x, y, alpha=alpha, gamma=gamma, reduction="sum",
                                       compute=None, stable=False)


def jnp_categorical_focal_sum(z, y, alpha=None, gamma=2.0):
  return focal_reference.categorical_focal(z, y, alpha=alpha, gamma=gamma, reduction="sum",
                                           compute=None, stable=False)


@functools.lru_cache(maxsize=None)
def _class_mesh(kind: str) -> Mesh:
  devices = np.array(jax.devices()[:4])
  if kind == "v":
    return Mesh(devices, ("v",))
  if kind == "dv":
    return Mesh(devices.reshape(2, 2), ("d", "v"))
  raise ValueError(f"mesh kind must be 'v' or 'dv', got {kind!r}")


@pytest.fixture(scope="session")
def class_mesh():
  """`class_mesh(kind)`: 4 devices as a mesh, one per kind (cached). "v": one axis "v" of 4
  class shards; "dv": 2 x 2, axes ("d", "v") (data x class)."""
  return _class_mesh


def central_differences(f, x, h):
  """The gradient of the scalar NumPy function ``f`` at ``x`` by central differences of step
  ``h`` (float64 truth for finite-margin checks)."""
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[i] = h
    grad[i] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


@pytest.fixture(scope="session")
def refs() -> types.SimpleNamespace:
  return types.SimpleNamespace(
      softmax_focal=focal_reference.softmax_focal, softmax_focal_rows=softmax_focal_rows,
      sigmoid_focal=focal_reference.sigmoid_focal,
      categorical_focal=focal_reference.categorical_focal, reduce=focal_reference.reduce,
      jnp_softmax_focal_sum=jnp_softmax_focal_sum, jnp_sigmoid_focal_sum=jnp_sigmoid_focal_sum,
      jnp_categorical_focal_sum=jnp_categorical_focal_sum,
      central_differences=central_differences)


# Compiled calls. Eager dispatch compiles every primitive for every new shape, which makes
# eager tests slow; these helpers jit the loss once per (function, static keywords, array
# keyword names) and let jit's own cache handle shapes and dtypes, so tests that share a
# configuration share the compiled program.

_COMPILED: dict = {}


def _split(kwargs):
  static, dynamic = [], {}
  for key, value in sorted(kwargs.items()):
    if isinstance(value, (np.ndarray, jax.Array)):
      dynamic[key] = value
    else:
      static.append((key, value if not isinstance(value, list) else tuple(value)))
  return tuple(static), dynamic


def _compiled(fn, mode, static, dyn_names, argnums):
  key = (fn, mode, static, dyn_names, argnums)
  if key not in _COMPILED:
    def loss(args, dyn):
      return fn(*args, **dict(static), **dyn)
    if mode == "value":
      f = loss
    else:
      def f(args, dyn):
        def of(*diff):
          full = list(args)
          for i, v in zip(argnums, diff):
            full[i] = v
          return loss(tuple(full), dyn)
        return jax.value_and_grad(of, argnums=tuple(range(len(argnums))))(
            *(args[i] for i in argnums))
    _COMPILED[key] = jax.jit(f)
  return _COMPILED[key]


def jit_loss(fn, *args, **kwargs):
  """fn(*args, **kwargs) under a cached jit (array keywords traced, others static)."""
  static, dyn = _split(kwargs)
  return _compiled(fn, "value", static, tuple(dyn), None)(args, dyn)


def jit_value_and_grad(fn, *args, argnums=(0,), **kwargs):
  """(value, grads w.r.t. args[argnums]) of a scalar-valued fn, under a cached jit."""
  static, dyn = _split(kwargs)
  return _compiled(fn, "vg", static, tuple(dyn), tuple(argnums))(args, dyn)


@pytest.fixture(scope="session")
def jc() -> types.SimpleNamespace:
  """`jc.loss(fn, *args, **kw)` and `jc.vg(fn, *args, argnums=(0,), **kw)`, jitted and cached."""
  return types.SimpleNamespace(loss=jit_loss, vg=jit_value_and_grad)
