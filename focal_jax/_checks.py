"""Static argument checks shared by the focal_jax losses.

Every check runs at trace time on shapes, dtypes and Python values; the values of traced arrays
are never inspected (that would fail under `jit`). Messages name the function, the argument,
what was expected and what came.

The names are focal_torch._checks' for the same checks (nouns for what is checked): `axis`,
`labels`, `apply_sample_weight`, `softmax_hypers`, `softmax_masks`, `floating_array`,
`reduction`, `label_smoothing`, `optional_int`, `class_param`, `where_mask`, `sample_weight`.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from focal_jax import _rowreduce

REDUCTIONS = ("none", "sum", "mean", "mean_positive")


def _describe_dtype(x: Any) -> str:
  dtype = getattr(x, "dtype", None)
  return str(dtype) if dtype is not None else type(x).__name__


def floating_array(fn: str, arg: str, x: Any) -> jax.Array:
  """Returns `x` as a jax array, raising TypeError unless it is floating point."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    x = jnp.asarray(x)
    dtype = x.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{fn}: {arg} must be a floating-point array, got dtype {_describe_dtype(x)}")
  return jnp.asarray(x)


def integer_array(fn: str, arg: str, x: Any) -> jax.Array:
  """Returns `x` as a jax array, raising TypeError unless it has an integer dtype."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    raise TypeError(f"{fn}: {arg} must be an integer array of class indices, got dtype {x.dtype}")
  return x


def labels(fn: str, labels: Any, expected_shape: tuple[int, ...], what: str) -> jax.Array:
  """Class-index labels: `labels` as an integer jax array of `expected_shape` (`what` says what
  that shape is). TypeError for a non-integer dtype, ValueError for another shape."""
  labels = integer_array(fn, "labels", labels)
  same_shape(fn, "labels", labels.shape, expected_shape, what)
  return labels


def real_array(fn: str, arg: str, x: Any) -> jax.Array:
  """Returns `x` as a jax array, raising TypeError unless it is bool, integer or floating."""
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
          or x.dtype == jnp.bool_):
    raise TypeError(
        f"{fn}: {arg} must be a real (bool, integer or floating) array, got dtype {x.dtype}")
  return x


def compute_dtype(dtype: Any) -> Any:
  """float32 at least: half-precision inputs are computed in float32, float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


def axis(fn: str, axis: Any, ndim: int) -> int:
  """Canonical (non-negative) class axis of an array of rank `ndim`."""
  if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
    raise TypeError(f"{fn}: axis must be an int, got {type(axis).__name__} {axis!r}")
  if ndim == 0:
    raise ValueError(f"{fn}: logits must have at least one dimension (the class axis), got a "
                     "scalar")
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"{fn}: axis must be in [-{ndim}, {ndim}) for logits of rank {ndim}, got {axis}")
  return int(axis) % ndim


def same_shape(fn: str, arg: str, shape: tuple[int, ...], expected: tuple[int, ...],
               what: str) -> None:
  if tuple(shape) != tuple(expected):
    raise ValueError(
        f"{fn}: {arg} must have shape {tuple(expected)} ({what}), got shape {tuple(shape)}")


def reduction(fn: str, reduction: Any) -> str:
  if not isinstance(reduction, str) or reduction not in REDUCTIONS:
    raise ValueError(
        f"{fn}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
  return reduction


def label_smoothing(fn: str, eps: Any) -> float:
  """label_smoothing is a static Python number in [0, 1]."""
  if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
    raise TypeError(
        f"{fn}: label_smoothing must be a Python float in [0, 1], got {type(eps).__name__}")
  eps = float(eps)
  if not 0.0 <= eps <= 1.0:
    raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {eps}")
  return eps


def optional_int(fn: str, arg: str, value: Any, *, allow_none: bool = True) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    expected = "an int or None" if allow_none else "an int"
    raise TypeError(f"{fn}: {arg} must be {expected}, got {type(value).__name__}")
  return int(value)


def _concrete_values(x: Any) -> np.ndarray | None:
  """The values of `x` when known at trace time (Python, NumPy, concrete jax); else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # noqa: BLE001 -- anything not convertible is simply not checked
    return None


def class_param(fn: str, arg: str, value: Any, num_classes: int, dtype: Any, *,
                nonnegative: bool, what_classes: str = "",
                unit_interval: bool = False) -> jax.Array:
  """A hyperparameter given as a scalar or a `(num_classes,)` vector, as an array of `dtype`.

  Shapes are always checked. Values are checked (finite; non-negative, or in [0, 1] with
  `unit_interval`) only when they are known at trace time: Python numbers, lists, tuples, NumPy
  arrays and concrete jax arrays, never tracers.
  """
  dtype_of = getattr(value, "dtype", None)
  if isinstance(value, bool) or (dtype_of is None and not isinstance(value, numbers.Real)
                                 and not isinstance(value, (list, tuple))):
    raise TypeError(
        f"{fn}: {arg} must be a real scalar or a shape ({num_classes},) array, got "
        f"{type(value).__name__}")
  arr = jnp.asarray(value)
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise TypeError(
        f"{fn}: {arg} must be a real scalar or a shape ({num_classes},) array, got dtype "
        f"{arr.dtype}")
  if arr.shape not in ((), (num_classes,)):
    raise ValueError(
        f"{fn}: {arg} must be a scalar or shape ({num_classes},){what_classes}, got shape "
        f"{arr.shape}")
  values = _concrete_values(value)
  if values is not None:
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{fn}: {arg} must be finite, got {values.tolist()}")
    shown = values.item() if values.ndim == 0 else values.tolist()
    if unit_interval and np.any((values < 0) | (values > 1)):
      raise ValueError(
          f"{fn}: {arg} must be in [0, 1] ({arg}=None means no weighting), got {shown}")
    if nonnegative and np.any(values < 0):
      raise ValueError(f"{fn}: {arg} must be >= 0, got {shown}")
  return arr.astype(dtype)


def softmax_hypers(fn: str, num_classes: int, dtype: Any, *, alpha: Any,
                   gamma: Any) -> tuple[jax.Array | None, jax.Array]:
  """`(alpha, gamma)` of a softmax focal loss as arrays of `dtype`: each a scalar or one value
  per class, finite and >= 0 (`class_param`); `alpha` None stays None (no weighting)."""
  if alpha is not None:
    alpha = class_param(fn, "alpha", alpha, num_classes, dtype, nonnegative=True,
                        what_classes=" (one weight per class)")
  gamma = class_param(fn, "gamma", gamma, num_classes, dtype, nonnegative=True,
                      what_classes=" (one exponent per class)")
  return alpha, gamma


def where_mask(fn: str, where: Any, shape: tuple[int, ...], what: str) -> jax.Array | None:
  """`where` as a boolean array of `shape`; it may be given in any shape broadcastable to it."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"{fn}: where must be a boolean array, got dtype {where.dtype}")
  try:
    broadcast = np.broadcast_shapes(where.shape, shape)
  except ValueError:
    broadcast = None
  if broadcast != tuple(shape):
    raise ValueError(
        f"{fn}: where must have shape {tuple(shape)} ({what}) or broadcast to it, got shape "
        f"{where.shape}")
  return jnp.broadcast_to(where, shape)


def num_classes(fn: str, arg: str, size: int, what: str) -> int:
  """The class count C (or V) of a softmax loss: at least 1."""
  if size == 0:
    raise ValueError(f"{fn}: {arg} must have at least one class, got {what}")
  return int(size)


def fits(dtype: Any, value: int) -> bool:
  """Whether the integer dtype `dtype` can hold `value` (compare there only if it can)."""
  info = jnp.iinfo(dtype)
  return int(info.min) <= int(value) <= int(info.max)


def not_equal(labels: jax.Array, value: int) -> jax.Array:
  """`labels != value` without wrapping `value` into the labels' dtype."""
  if not fits(labels.dtype, value):
    return jnp.ones(labels.shape, bool)
  return labels != jnp.asarray(value, labels.dtype)


def in_classes(labels: jax.Array, num_classes: int) -> jax.Array:
  """`0 <= labels < num_classes` without wrapping `num_classes` into the labels' dtype."""
  lower = labels >= jnp.asarray(0, labels.dtype)
  if not fits(labels.dtype, num_classes):
    return lower  # every value the dtype holds is below num_classes
  return lower & (labels < jnp.asarray(num_classes, labels.dtype))


def softmax_masks(labels: jax.Array, where: jax.Array | None, num_classes: int,
                  ignore_index: int | None, background_class: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`(valid, in_range, t, positive)` of integer `labels` (`where` of their shape, or None).

  `valid`: the entries that count (`where`, and the label not `ignore_index`); `in_range`: the
  label lies in `[0, num_classes)` (a valid entry whose label does not has a NaN loss; the
  values of traced labels are never checked); `t`: the labels as int32 class indices that are
  safe to index with (0 where out of range); `positive`: the valid entries whose label is not
  `background_class`. Labels of any integer dtype are compared without wrapping a value into
  their dtype.
  """
  valid = jnp.ones(labels.shape, dtype=bool) if where is None else where
  # Comparisons in the labels' dtype only with values it can hold (never wrapped into it).
  if ignore_index is not None:
    valid = valid & not_equal(labels, ignore_index)
  in_range = in_classes(labels, num_classes)
  # Class indices in int32 (C is an array dimension): narrow label dtypes never wrap.
  t = jnp.where(in_range, labels, jnp.zeros((), labels.dtype)).astype(jnp.int32)
  positive = valid & not_equal(labels, background_class)
  return valid, in_range, t, positive


def sample_weight(fn: str, weight: Any, shape: tuple[int, ...], dtype: Any,
                  what: str) -> jax.Array | None:
  """`sample_weight` as a constant (never differentiated) array of `shape` and `dtype`.

  None stays None. A scalar or an array broadcastable to `shape` (bool, integer or floating;
  Python lists, tuples and NumPy arrays too); values finite and >= 0, checked when known.
  `what` (what `shape` is) is not in the message, which is focal_torch's word for word.
  """
  if weight is None:
    return None
  if not (isinstance(weight, (numbers.Real, list, tuple, np.ndarray, np.generic))
          or hasattr(weight, "dtype")):
    raise TypeError(f"{fn}: sample_weight must be None, a real scalar or an array, got "
                    f"{type(weight).__name__}")
  arr = jnp.asarray(weight)
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
          or arr.dtype == jnp.bool_):
    raise TypeError(f"{fn}: sample_weight must be a real (bool, integer or floating) array, "
                    f"got dtype {arr.dtype}")
  try:
    broadcast = np.broadcast_shapes(arr.shape, tuple(shape))
  except ValueError:
    broadcast = None
  if broadcast != tuple(shape):
    raise ValueError(f"{fn}: sample_weight must be a scalar or broadcast to shape "
                     f"{tuple(shape)}, got shape {arr.shape}")
  values = _concrete_values(weight)
  if values is not None:
    values = values.astype(np.float64)
    shown = values.item() if values.ndim == 0 else values.tolist()
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{fn}: sample_weight must be finite, got {shown}")
    if np.any(values < 0):
      raise ValueError(f"{fn}: sample_weight must be >= 0, got {shown}")
  return lax.stop_gradient(jnp.broadcast_to(arr.astype(dtype), tuple(shape)))


def apply_sample_weight(loss: jax.Array, weight: jax.Array | None,
                        valid: jax.Array | None) -> jax.Array:
  """Per-entry losses times the weights; masked entries stay exactly 0 (whatever the weight)."""
  if weight is None:
    return loss
  out = loss * weight
  return out if valid is None else jnp.where(valid, out, 0.0)


def _names(axis_name: Any) -> tuple:
  if axis_name is None:
    return ()
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def class_split(fn: str, class_axis_name: Any, axis_name: Any,
                local: int) -> _rowreduce.ClassSplit | None:
  """The split of the class axis over `class_axis_name` (None: not split).

  `local` is the number of classes this member holds; the whole class count is `local` times
  the axis size. The axis must be bound
  (inside shard_map or pmap) and must not also be a data axis (`axis_name`).
  """
  if class_axis_name is None:
    return None
  names = _names(class_axis_name)
  shared = [n for n in names if n in _names(axis_name)]
  if shared:
    raise ValueError(
        f"{fn}: class_axis_name and axis_name must name different axes (classes are split "
        f"over one, rows over the other), got {shared[0]!r} in both")
  try:
    size = int(lax.axis_size(class_axis_name) if hasattr(lax, "axis_size")
               else lax.psum(1, class_axis_name))
  except NameError:
    raise ValueError(
        f"{fn}: class_axis_name must be a named axis bound here (inside shard_map or pmap), "
        f"got {class_axis_name!r}") from None
  return _rowreduce.ClassSplit(class_axis_name, size, int(local), int(local) * size)


def split_class_vector(fn: str, arg: str, value: Any, split: _rowreduce.ClassSplit | None,
                       what_local: str) -> None:
  """A `(C,)` hyperparameter with split classes is the WHOLE class vector, the same on every
  member: its length must be `split.num_classes` (its other checks are `class_param`'s)."""
  if split is None or value is None:
    return
  shape = tuple(getattr(value, "shape", None) or np.shape(value))
  if len(shape) != 1 or shape[0] == split.num_classes:
    return
  n = shape[0]
  if n % split.size:
    raise ValueError(
        f"{fn}: the class count C must be divisible by the size {split.size} of "
        f"class_axis_name {split.axis_name!r} (each member holds C / {split.size} classes), "
        f"got C = {n} (the length of {arg})")
  raise ValueError(
      f"{fn}: {arg} must be a scalar or the whole ({split.num_classes},) class vector "
      f"({split.local} {what_local} on each of the {split.size} members of class_axis_name "
      f"{split.axis_name!r}), got shape {shape}")
