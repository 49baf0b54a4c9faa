"""Argument checks shared by the focal_torch losses and modules.

Static checks (types, dtypes, shapes, Python-number hyperparameters) always run. Checks that
read tensor *values* (labels in range, a tensor ``gamma`` >= 0, a tensor ``alpha`` in range)
synchronize a CUDA device; they run unless turned off with :class:`value_checks`.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Any

import numpy as np
import torch

REDUCTIONS = ("none", "sum", "mean", "mean_positive")
SIGMOID_ALPHA_HINT = " (alpha=None means no weighting)"
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Values shown in full in a message up to this many entries (a larger tensor: the bad one).
_SHOW = 64

_state = threading.local()


def checks_enabled() -> bool:
  """Whether the value checks (see :class:`value_checks`) are on: in this thread, and not
  while torch.compile traces (a data-dependent ``if`` would break the graph)."""
  if torch.compiler.is_compiling():
    return False
  return getattr(_state, "enabled", True)


class value_checks:
  """Turns the checks that read tensor values on or off (a switch and a context manager).

  The losses check that every label not ignored lies in ``[0, C)`` (softmax), that sigmoid
  labels lie in ``[0, 1]``, and that tensor hyperparameters are in range (``gamma >= 0``; a
  sigmoid ``alpha`` in ``[0, 1]``). Reading those values synchronizes a CUDA device once per
  call, and a check's ``if`` is a graph break under ``torch.compile``. In a hot loop whose
  inputs are known to be good, turn the checks off; the loss keywords stay the same, so one
  kwargs dict still drives ``focal_jax`` and ``focal_torch``. With the checks off, an
  out-of-range softmax label gives a NaN loss for its entry (as ``focal_jax`` does), never a
  wrapped index.

  Under ``torch.compile`` the value checks are always skipped (their ``if`` on tensor data
  would break the graph), so a compiled loss gives NaN for a bad label, like ``focal_jax``
  under ``jit``. Used as a function the switch is set for the current thread; used as a
  context manager it restores the previous setting on exit.

  Args:
    enabled: True to check (the default state), False to skip the value checks.

  Examples:
    >>> logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 7, 1])  # 7: a bad label
    >>> with focal_torch.value_checks(False):
    ...   loss = focal_torch.softmax_focal(logits, labels, reduction="none")
    >>> bool(loss[2].isnan())
    True
    >>> _ = focal_torch.value_checks(False)  # for the rest of the thread
    >>> _ = focal_torch.value_checks(True)  # and back on
  """

  def __init__(self, enabled: bool) -> None:
    if not isinstance(enabled, bool):
      raise TypeError(f"value_checks: enabled must be a bool, got {type(enabled).__name__}")
    self._previous = checks_enabled()
    _state.enabled = enabled

  def __enter__(self) -> None:
    return None

  def __exit__(self, *exc: Any) -> None:
    _state.enabled = self._previous


def _shape(shape: Any) -> str:
  return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def shape_str(shape: Any) -> str:
  """A shape as ``(4, 5)``, ``(4,)`` or ``()``."""
  return _shape(tuple(shape))


def floating_array(fn: str, arg: str, x: Any, *, scalar_ok: bool = False) -> torch.Tensor:
  """``x`` must be a float16/bfloat16/float32/float64 tensor (with at least one dimension
  unless ``scalar_ok``)."""
  if not isinstance(x, torch.Tensor):
    raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(x).__name__}")
  if not x.is_floating_point():
    raise TypeError(f"{fn}: {arg} must be a floating-point tensor, got dtype {x.dtype}")
  if x.dtype not in FLOATING:
    raise TypeError(f"{fn}: {arg} must be float16, bfloat16, float32 or float64, got dtype "
                    f"{x.dtype}")
  if x.ndim == 0 and not scalar_ok:
    raise ValueError(f"{fn}: {arg} must have at least one dimension, got shape ()")
  return x


def axis(fn: str, dim: Any, ndim: int) -> int:
  """``dim`` as a non-negative axis of a tensor with ``ndim`` dimensions."""
  if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
    raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
  if not -ndim <= dim < ndim:
    raise ValueError(
        f"{fn}: dim must be in [{-ndim}, {ndim}) for logits with {ndim} dimension(s), "
        f"got dim={dim}")
  return int(dim) % ndim


def reduction(fn: str, reduction: Any) -> str:
  if not isinstance(reduction, str) or reduction not in REDUCTIONS:
    raise ValueError(
        f"{fn}: reduction must be one of {', '.join(repr(r) for r in REDUCTIONS)}, "
        f"got {reduction!r}")
  return reduction


def label_smoothing(fn: str, eps: Any) -> float:
  if isinstance(eps, torch.Tensor):
    if eps.numel() != 1:
      raise ValueError(
          f"{fn}: label_smoothing must be a number in [0, 1], got a tensor of shape "
          f"{shape_str(eps.shape)}")
    eps = eps.item()
  if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
    raise TypeError(f"{fn}: label_smoothing must be a Python float in [0, 1], got "
                    f"{type(eps).__name__}")
  eps = float(eps)
  if not 0.0 <= eps <= 1.0:
    raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {eps}")
  return eps


def optional_int(fn: str, arg: str, value: Any, allow_none: bool = False) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    kind = "an int or None" if allow_none else "an int"
    raise TypeError(f"{fn}: {arg} must be {kind}, got {type(value).__name__}")
  return int(value)


def _bounds_str(low: float | None, high: float | None) -> str:
  if low is not None and high is not None:
    return f"in [{low:g}, {high:g}]"
  if low is not None:
    return f">= {low:g}"
  if high is not None:
    return f"<= {high:g}"
  return "a number"


def _shown(values: Any) -> str:
  """Values for a message: a float, or the list of a small array."""
  arr = np.asarray(values, dtype=np.float64)
  return str(arr.item() if arr.ndim == 0 else arr.tolist())


def _check_values(fn: str, name: str, lo: float, hi: float, low: float | None,
                  high: float | None, hint: str, shown: Any) -> None:
  """Raises for non-finite values or values outside [low, high]; ``lo``/``hi`` are the
  smallest and largest value (NaN when there is one); ``shown()`` the values to print."""
  if not (lo > -math.inf and hi < math.inf):  # NaN fails both comparisons
    raise ValueError(f"{fn}: {name} must be finite, got {shown()}")
  if (low is not None and lo < low) or (high is not None and hi > high):
    raise ValueError(f"{fn}: {name} must be {_bounds_str(low, high)}{hint}, got {shown()}")


def _tensor_shown(t: torch.Tensor) -> Any:
  def shown():
    if t.numel() <= _SHOW:
      return _shown(t.detach().to("cpu", torch.float64).numpy())
    return f"a tensor of shape {shape_str(t.shape)}"
  return shown


def class_param(fn: str, arg: str, value: Any, num_classes: int | None, *,
                low: float | None = 0.0, high: float | None = None, allow_none: bool = True,
                hint: str = "", what_classes: str = "",
                device: torch.device | None = None) -> float | torch.Tensor | None:
  """A hyperparameter: None, a Python number, a list / tuple / NumPy array, or a 0-d or
  ``(C,)`` tensor.

  Python numbers come back as ``float``; lists, tuples and NumPy arrays as float64 CPU
  tensors; tensors as they are (never copied). Values must be finite and within
  ``[low, high]``: checked for numbers, lists and NumPy arrays always, for tensors while the
  value checks are on. ``num_classes`` None (module construction) accepts any 1-D length.
  ``device`` (the logits' device at call; None at construction) refuses a tensor on the meta
  device when the logits are not there.
  """
  # Messages only (built on error: a symbolic C under torch.compile cannot become a string).
  c = "C" if num_classes is None else num_classes
  if value is None:
    if allow_none:
      return None
    raise TypeError(f"{fn}: {arg} must be a real scalar or a shape ({c},) array, got NoneType")
  if isinstance(value, bool) or isinstance(value, np.bool_):
    raise TypeError(f"{fn}: {arg} must be a real scalar or a shape ({c},) array, got bool")
  if isinstance(value, numbers.Real):
    v = float(value)
    _check_values(fn, arg, v, v, low, high, hint, lambda: str(v))
    return v
  if isinstance(value, (list, tuple, np.ndarray)):
    try:
      arr = np.asarray(value)
    except ValueError as e:
      raise ValueError(f"{fn}: {arg} must be a scalar or shape ({c},), got a ragged "
                       "sequence") from e
    if arr.dtype.kind not in "iuf":
      raise TypeError(f"{fn}: {arg} must be a real scalar or a shape ({c},) array, got dtype "
                      f"{arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim > 1 or (arr.ndim == 1 and num_classes is not None
                        and arr.shape[0] != num_classes):
      raise ValueError(f"{fn}: {arg} must be a scalar or shape ({c},){what_classes}, got shape "
                       f"{shape_str(arr.shape)}")
    if arr.size:
      with np.errstate(invalid="ignore"):
        _check_values(fn, arg, float(np.min(arr)), float(np.max(arr)), low, high, hint,
                      lambda: _shown(arr))
    return torch.from_numpy(arr)
  if not isinstance(value, torch.Tensor):
    raise TypeError(f"{fn}: {arg} must be a real scalar or a shape ({c},) array, got "
                    f"{type(value).__name__}")
  if not value.is_floating_point():
    raise TypeError(f"{fn}: {arg} must be a floating-point tensor, got dtype {value.dtype}")
  if value.requires_grad:
    raise ValueError(
        f"{fn}: {arg} gets no gradient from this loss; pass {arg}.detach(), got a tensor "
        "that requires grad")
  if device is not None and value.is_meta and device.type != "meta":
    raise ValueError(f"{fn}: {arg} must be on the logits' device {device} (or the CPU), got "
                     "meta")
  if value.ndim > 1 or (value.ndim == 1 and num_classes is not None
                        and value.shape[0] != num_classes):
    raise ValueError(f"{fn}: {arg} must be a scalar or shape ({c},){what_classes}, got shape "
                     f"{shape_str(value.shape)}")
  if checks_enabled() and value.numel() and not value.is_meta:
    lo, hi = torch.stack([value.min(), value.max()]).tolist()  # one synchronization
    _check_values(fn, arg, lo, hi, low, high, hint, _tensor_shown(value))
  return value


def same_device(fn: str, name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
  """``x`` must be on ``ref``'s (the logits') device."""
  if x.device != ref.device:
    raise ValueError(f"{fn}: {name} must be on the logits' device {ref.device}, got {x.device}")


def labels(fn: str, labels: Any, expected_shape: tuple[int, ...], what: Any,
           logits: torch.Tensor, *, integer: bool) -> torch.Tensor:
  """Labels: a tensor of ``expected_shape`` (integer dtype if ``integer``)."""
  if not isinstance(labels, torch.Tensor):
    raise TypeError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
  if integer and (labels.is_floating_point() or labels.is_complex()
                  or labels.dtype == torch.bool):
    raise TypeError(f"{fn}: labels must be an integer tensor of class indices, got dtype "
                    f"{labels.dtype}")
  if tuple(labels.shape) != tuple(expected_shape):
    what = what() if callable(what) else what
    raise ValueError(f"{fn}: labels must have shape {shape_str(expected_shape)} ({what}), got "
                     f"shape {shape_str(labels.shape)}")
  same_device(fn, "labels", labels, logits)
  return labels


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  try:
    return tuple(torch.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
  except RuntimeError:
    return False


def where_mask(fn: str, where: Any, shape: tuple[int, ...], what: Any,
               logits: torch.Tensor) -> torch.Tensor | None:
  """``where`` as a bool tensor of ``shape`` (a broadcast view); it may come in any shape
  that broadcasts to it, and as a list, tuple or NumPy array."""
  if where is None:
    return None
  if isinstance(where, (list, tuple, np.ndarray, np.bool_)):
    arr = np.asarray(where)
    if arr.dtype != np.bool_:
      raise TypeError(f"{fn}: where must be a boolean tensor, got dtype {arr.dtype}")
    where = torch.from_numpy(np.ascontiguousarray(arr)).to(logits.device)
  elif not isinstance(where, torch.Tensor):
    raise TypeError(f"{fn}: where must be None or a boolean tensor, got "
                    f"{type(where).__name__}")
  if where.dtype != torch.bool:
    raise TypeError(f"{fn}: where must be a boolean tensor, got dtype {where.dtype}")
  if not _broadcasts_to(where.shape, shape):
    what = what() if callable(what) else what  # built on error only (symbolic shapes)
    raise ValueError(f"{fn}: where must have shape {shape_str(shape)} ({what}) or broadcast "
                     f"to it, got shape {shape_str(where.shape)}")
  same_device(fn, "where", where, logits)
  return where if tuple(where.shape) == tuple(shape) else where.expand(shape)


def sample_weight(fn: str, weight: Any, shape: tuple[int, ...], logits: torch.Tensor,
                  cdt: torch.dtype) -> float | torch.Tensor | None:
  """Per-entry weights: None, a finite number >= 0, or a bool / integer / float tensor (or
  list, tuple, NumPy array) that broadcasts to ``shape``; returned as a float or a detached
  tensor of the compute dtype ``cdt`` on the logits' device (not expanded). Values are
  checked for numbers, lists and NumPy arrays always, for tensors while the value checks
  are on."""
  name = "sample_weight"
  if weight is None:
    return None
  if isinstance(weight, (bool, np.bool_)):
    return float(weight)
  if isinstance(weight, numbers.Real):
    v = float(weight)
    _check_values(fn, name, v, v, 0.0, None, "", lambda: str(v))
    return v
  if isinstance(weight, (list, tuple, np.ndarray)):
    arr = np.asarray(weight)
    if arr.dtype.kind not in "biuf":
      raise TypeError(f"{fn}: {name} must be None, a real scalar or an array, got dtype "
                      f"{arr.dtype}")
    if not _broadcasts_to(arr.shape, shape):
      raise ValueError(f"{fn}: {name} must be a scalar or broadcast to shape "
                       f"{shape_str(shape)}, got shape {shape_str(arr.shape)}")
    arr = arr.astype(np.float64)
    if arr.size:
      with np.errstate(invalid="ignore"):
        _check_values(fn, name, float(np.min(arr)), float(np.max(arr)), 0.0, None, "",
                      lambda: _shown(arr))
    return torch.from_numpy(arr).to(device=logits.device, dtype=cdt)
  if not isinstance(weight, torch.Tensor):
    raise TypeError(f"{fn}: {name} must be None, a real scalar or an array, got "
                    f"{type(weight).__name__}")
  if weight.is_complex():
    raise TypeError(f"{fn}: {name} must be a real (bool, integer or floating) tensor, got "
                    f"dtype {weight.dtype}")
  if not _broadcasts_to(weight.shape, shape):
    raise ValueError(f"{fn}: {name} must be a scalar or broadcast to shape "
                     f"{shape_str(shape)}, got shape {shape_str(weight.shape)}")
  if weight.ndim and weight.device != logits.device:
    same_device(fn, name, weight, logits)
  w = weight.detach().to(device=logits.device, dtype=cdt)
  if checks_enabled() and w.numel():
    lo, hi = torch.stack([w.min(), w.max()]).tolist()  # one synchronization
    _check_values(fn, name, lo, hi, 0.0, None, "", _tensor_shown(w))
  return w


def apply_sample_weight(loss: torch.Tensor, weight: float | torch.Tensor | None,
                        valid: torch.Tensor | None) -> torch.Tensor:
  """``loss * weight`` with masked entries exactly 0 (the loss of a masked entry is already
  0; the weight is masked too, so that a non-finite weight there cannot make it NaN)."""
  if weight is None:
    return loss
  if isinstance(weight, torch.Tensor) and valid is not None:
    weight = torch.where(valid, weight, torch.zeros((), dtype=weight.dtype,
                                                   device=weight.device))
  return loss * weight


class LabelValues:
  """Integer labels of any dtype, compared with Python ints without wrapping.

  ``values`` is an int64 tensor holding every label exactly, except uint64 labels of
  2**63 or more, which it holds as ``label - 2**64`` (negative: out of range, as they are).
  """

  def __init__(self, labels: torch.Tensor) -> None:
    self.dtype = labels.dtype
    if labels.dtype == torch.int64:
      self.values = labels
    elif labels.dtype == torch.uint64:
      self.values = labels.view(torch.int64)
    else:
      self.values = labels.to(torch.int64)

  def equals(self, value: int) -> torch.Tensor | None:
    """``labels == value`` without wrapping; None where no label can equal it."""
    info = torch.iinfo(self.dtype)
    if not info.min <= value <= info.max:
      return None
    if self.dtype == torch.uint64 and value >= 2 ** 63:
      value -= 2 ** 64
    return self.values == value

  def shown(self, value: int) -> int:
    """A label as the user wrote it (uint64 labels of 2**63 or more are stored negative)."""
    return value + 2 ** 64 if self.dtype == torch.uint64 and value < 0 else value


def label_range(fn: str, labels: LabelValues, valid: torch.Tensor,
                num_classes: int, ignore_index: int | None) -> None:
  """Every valid label must lie in ``[0, C)`` (reads values: call while checks are on)."""
  values = labels.values
  if values.numel() == 0:
    return
  out_of_range = valid & ((values < 0) | (values >= num_classes))
  if bool(out_of_range.any()):
    label = labels.shown(int(values[out_of_range].reshape(-1)[0]))
    allowed = f"[0, {num_classes})"
    if ignore_index is not None:
      allowed += f" or ignore_index={ignore_index}"
    raise ValueError(
        f"{fn}: labels must be in {allowed}, got label {label} (C={num_classes}); turn this "
        "check off with focal_torch.value_checks(False) to get NaN for such entries instead")


def unit_interval(fn: str, name: str, x: torch.Tensor,
                  valid: torch.Tensor | None) -> None:
  """Soft labels must lie in [0, 1] (reads values: gated by value_checks)."""
  if not checks_enabled() or x.numel() == 0:
    return
  bad = (x < 0) | (x > 1)
  if x.is_floating_point():
    bad = bad | torch.isnan(x)
  if valid is not None:
    bad = bad & valid
  if bool(bad.any()):
    value = x[bad].reshape(-1)[0].item()
    raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}")


WORLD = "world"


def process_group(fn: str, group: Any, *, at_call: bool = True,
                  name: str = "process_group") -> Any:
  """None, ``"world"`` (the default group, resolved at each call: a module built before
  ``init_process_group`` still works) or a ``torch.distributed.ProcessGroup``.

  At module construction (``at_call=False``) ``"world"`` is kept as it is. ``name`` is the
  argument's name in messages (``process_group`` or ``class_process_group``)."""
  if group is None:
    return None
  import torch.distributed as dist  # pylint: disable=import-outside-toplevel
  if isinstance(group, str):
    if group != WORLD:
      raise ValueError(f"{fn}: {name} must be None, 'world' or a "
                       f"torch.distributed.ProcessGroup, got {group!r}")
    if not at_call:
      return WORLD
    if not dist.is_available() or not dist.is_initialized():
      raise ValueError(f"{fn}: {name}='world' needs torch.distributed to be "
                       "initialized when the loss is called; call "
                       "torch.distributed.init_process_group first or pass "
                       f"{name}=None")
    return dist.group.WORLD
  if not dist.is_available() or not dist.is_initialized():
    raise ValueError(f"{fn}: {name} was given but torch.distributed is not "
                     "initialized; call torch.distributed.init_process_group first, pass "
                     f"{name}='world' (resolved at each call) or {name}=None")
  if not isinstance(group, dist.ProcessGroup):
    raise TypeError(f"{fn}: {name} must be None, 'world' or a "
                    "torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD), "
                    f"got {type(group).__name__}")
  return group


def no_grad_needed(fn: str, name: str, x: torch.Tensor) -> None:
  """``x`` gets no gradient from the loss, so it must not require one."""
  if x.requires_grad:
    raise ValueError(f"{fn}: {name} gets no gradient from this loss; pass {name}.detach(), "
                     "got a tensor that requires grad")


# The checks under names that the keyword arguments below do not shadow.
_reduction = reduction
_label_smoothing = label_smoothing
_process_group = process_group

SOFTMAX_ALPHA = " (one weight per class)"
SOFTMAX_GAMMA = " (one exponent per class)"


def softmax_hypers(fn: str, num_classes: int | None, *, alpha: Any, gamma: Any,
                   label_smoothing: Any, reduction: Any, ignore_index: Any,
                   background_class: Any, process_group: Any,
                   device: torch.device | None = None, at_call: bool = True
                   ) -> tuple[Any, Any, float, str, int | None, int, Any]:
  """Checks the softmax hyperparameters; returns them normalized."""
  reduction_ = _reduction(fn, reduction)
  eps = _label_smoothing(fn, label_smoothing)
  ignore_index = optional_int(fn, "ignore_index", ignore_index, allow_none=True)
  background_class = optional_int(fn, "background_class", background_class)
  alpha = class_param(fn, "alpha", alpha, num_classes, what_classes=SOFTMAX_ALPHA,
                      device=device)
  gamma = class_param(fn, "gamma", gamma, num_classes, allow_none=False,
                      what_classes=SOFTMAX_GAMMA, device=device)
  group = _process_group(fn, process_group, at_call=at_call)
  return alpha, gamma, eps, reduction_, ignore_index, background_class, group


def softmax_masks(fn: str, labels: torch.Tensor, where: torch.Tensor | None,
                  num_classes: int, ignore_index: int | None, background_class: int | None,
                  safe_labels: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                             torch.Tensor | None]:
  """``(valid, in_range, t, positive)``: the entries that count; with the value checks off,
  whether each label lies in ``[0, C)`` (a valid entry whose label does not has a NaN loss;
  with the checks on such a label raises and ``in_range`` is None: every label counted is in
  range); the labels as int64 class indices that are safe to index with (0 where masked or
  out of range); and the valid labels not equal to ``background_class`` (None if it is
  None). Labels of any integer dtype are compared with ``ignore_index``,
  ``background_class`` and ``C`` without wrapping. ``safe_labels=False``: ``labels`` as
  given in place of the safe indices (no copy; the caller makes them safe chunk by chunk)."""
  lab = LabelValues(labels)
  values = lab.values
  valid = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
  if ignore_index is not None:
    ignored = lab.equals(ignore_index)
    if ignored is not None:
      valid = ~ignored
  if where is not None:
    valid = valid & where
  positive = None
  if background_class is not None:
    background = lab.equals(background_class)
    positive = valid if background is None else valid & ~background
  zero = torch.zeros((), dtype=torch.int64, device=labels.device)
  if checks_enabled():
    label_range(fn, lab, valid, num_classes, ignore_index)
    return (valid, None, torch.where(valid, values, zero) if safe_labels else labels,
            positive)
  in_range = (values >= 0) & (values < num_classes)
  return (valid, in_range,
          torch.where(valid & in_range, values, zero) if safe_labels else labels, positive)
