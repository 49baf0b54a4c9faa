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

import torch

REDUCTIONS = ("none", "sum", "mean", "mean_positive")
SIGMOID_ALPHA_HINT = " or None (torchvision's alpha < 0 means no weighting: pass alpha=None)"

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
    >>> with focal_torch.value_checks(False):
    ...   loss = focal_torch.softmax_focal(logits, labels)
    >>> focal_torch.value_checks(False)  # for the rest of the thread
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


def check_floating(fn: str, name: str, x: Any) -> torch.Tensor:
  """``x`` must be a floating-point tensor with at least one dimension."""
  if not isinstance(x, torch.Tensor):
    raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
  if not x.is_floating_point():
    raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
  if x.ndim == 0:
    raise ValueError(f"{fn}: {name} must have at least one dimension, got shape ()")
  return x


def normalize_dim(fn: str, dim: Any, ndim: int) -> int:
  """``dim`` as a non-negative axis of a tensor with ``ndim`` dimensions."""
  if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
    raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
  if not -ndim <= dim < ndim:
    raise ValueError(
        f"{fn}: dim must be in [{-ndim}, {ndim}) for logits with {ndim} dimension(s), "
        f"got dim={dim}")
  return int(dim) % ndim


def check_reduction(fn: str, reduction: Any) -> str:
  if reduction not in REDUCTIONS:
    raise ValueError(
        f"{fn}: reduction must be one of {', '.join(repr(r) for r in REDUCTIONS)}, "
        f"got {reduction!r}")
  return reduction


def check_label_smoothing(fn: str, eps: Any) -> float:
  if isinstance(eps, torch.Tensor):
    if eps.numel() != 1:
      raise ValueError(
          f"{fn}: label_smoothing must be a number in [0, 1], got a tensor of shape "
          f"{shape_str(eps.shape)}")
    eps = eps.item()
  if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
    raise TypeError(f"{fn}: label_smoothing must be a number in [0, 1], got "
                    f"{type(eps).__name__}")
  eps = float(eps)
  if not 0.0 <= eps <= 1.0:
    raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {eps}")
  return eps


def check_int(fn: str, name: str, value: Any, allow_none: bool = False) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    kind = "an int or None" if allow_none else "an int"
    raise TypeError(f"{fn}: {name} must be {kind}, got {type(value).__name__}")
  return int(value)


def check_hyper(fn: str, name: str, value: Any, num_classes: int | None, *,
                low: float | None = 0.0, high: float | None = None,
                allow_none: bool = True, hint: str = "") -> float | torch.Tensor | None:
  """A hyperparameter: None, a Python number, a 0-d tensor or a ``(C,)`` tensor.

  Python numbers come back as ``float``; tensors as they are (never copied). ``low`` and
  ``high`` bound the values (numbers always; tensors while value checks are on).
  ``num_classes`` None (module construction) accepts any 1-D length. ``hint`` is added to
  the out-of-range message.
  """
  bounds = _bounds_str(low, high) + hint
  if value is None:
    if allow_none:
      return None
    raise TypeError(f"{fn}: {name} must be a number or a tensor, got None")
  if isinstance(value, bool):
    raise TypeError(f"{fn}: {name} must be a number or a tensor, got bool")
  if isinstance(value, numbers.Real):
    v = float(value)
    if math.isnan(v) or (low is not None and v < low) or (high is not None and v > high):
      raise ValueError(f"{fn}: {name} must be {bounds}, got {value}")
    return v
  if not isinstance(value, torch.Tensor):
    raise TypeError(
        f"{fn}: {name} must be None, a number or a torch.Tensor, got {type(value).__name__}")
  if not value.is_floating_point():
    raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {value.dtype}")
  if value.requires_grad:
    raise ValueError(
        f"{fn}: {name} gets no gradient from this loss; pass {name}.detach(), got a tensor "
        "that requires grad")
  expected = "a scalar or shape (C,)" if num_classes is None else (
      f"a scalar or shape ({num_classes},)")
  if value.ndim > 1 or (value.ndim == 1 and num_classes is not None
                        and value.shape[0] != num_classes):
    raise ValueError(f"{fn}: {name} must be {expected}, got shape {shape_str(value.shape)}")
  if checks_enabled() and (low is not None or high is not None) and value.numel():
    lo, hi = value.min().item(), value.max().item()
    if (low is not None and lo < low) or (high is not None and hi > high) or math.isnan(lo):
      bad = lo if (low is not None and lo < low) or math.isnan(lo) else hi
      raise ValueError(f"{fn}: {name} must be {bounds}, got a value {bad}")
  return value


def _bounds_str(low: float | None, high: float | None) -> str:
  if low is not None and high is not None:
    return f"in [{low:g}, {high:g}]"
  if low is not None:
    return f">= {low:g}"
  if high is not None:
    return f"<= {high:g}"
  return "a number"


def check_same_device(fn: str, name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
  if x.device != ref.device:
    raise ValueError(f"{fn}: {name} must be on the logits' device {ref.device}, got {x.device}")


def check_labels(fn: str, labels: Any, expected_shape: tuple[int, ...], what: str,
                 logits: torch.Tensor, *, integer: bool) -> torch.Tensor:
  """Labels: a tensor of ``expected_shape`` (integer dtype if ``integer``)."""
  if not isinstance(labels, torch.Tensor):
    raise TypeError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
  if integer and (labels.is_floating_point() or labels.is_complex()
                  or labels.dtype == torch.bool):
    raise TypeError(f"{fn}: labels must be an integer tensor of class indices, got dtype "
                    f"{labels.dtype}")
  if tuple(labels.shape) != tuple(expected_shape):
    raise ValueError(f"{fn}: labels must have shape {shape_str(expected_shape)} ({what}), got "
                     f"{shape_str(labels.shape)}")
  check_same_device(fn, "labels", labels, logits)
  return labels


def check_where(fn: str, where: Any, expected_shape: tuple[int, ...], what: str,
                logits: torch.Tensor) -> torch.Tensor | None:
  if where is None:
    return None
  if not isinstance(where, torch.Tensor):
    raise TypeError(f"{fn}: where must be None or a bool torch.Tensor, got "
                    f"{type(where).__name__}")
  if where.dtype != torch.bool:
    raise TypeError(f"{fn}: where must be a bool tensor, got dtype {where.dtype}")
  if tuple(where.shape) != tuple(expected_shape):
    raise ValueError(f"{fn}: where must have shape {shape_str(expected_shape)} ({what}), got "
                     f"{shape_str(where.shape)}")
  check_same_device(fn, "where", where, logits)
  return where


def check_label_range(fn: str, labels: torch.Tensor, valid: torch.Tensor,
                      num_classes: int, ignore_index: int | None) -> None:
  """Every valid label must lie in ``[0, C)`` (reads values: call while checks are on)."""
  if labels.numel() == 0:
    return
  bad = valid & ((labels < 0) | (labels >= num_classes))
  if bool(bad.any()):
    label = int(labels[bad].reshape(-1)[0])
    allowed = f"[0, {num_classes})"
    if ignore_index is not None:
      allowed += f" or ignore_index={ignore_index}"
    raise ValueError(
        f"{fn}: labels must be in {allowed}, got label {label} (C={num_classes}); turn this "
        "check off with focal_torch.value_checks(False) to get NaN for such entries instead")


def check_unit_interval(fn: str, name: str, x: torch.Tensor,
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


def check_process_group(fn: str, group: Any) -> Any:
  if group is None:
    return None
  import torch.distributed as dist  # pylint: disable=import-outside-toplevel
  if not dist.is_available() or not dist.is_initialized():
    raise ValueError(f"{fn}: process_group was given but torch.distributed is not "
                     "initialized; call torch.distributed.init_process_group first or pass "
                     "process_group=None")
  if not isinstance(group, dist.ProcessGroup):
    raise TypeError(f"{fn}: process_group must be None or a torch.distributed.ProcessGroup "
                    f"(e.g. torch.distributed.group.WORLD), got {type(group).__name__}")
  return group


def check_no_grad(fn: str, name: str, x: torch.Tensor) -> None:
  if x.requires_grad:
    raise ValueError(f"{fn}: {name} gets no gradient from this loss; pass {name}.detach(), "
                     "got a tensor that requires grad")


def check_softmax_hypers(fn: str, num_classes: int | None, *, alpha: Any, gamma: Any,
                         label_smoothing: Any, reduction: Any, ignore_index: Any,
                         background_class: Any, process_group: Any
                         ) -> tuple[Any, Any, float, str, int | None, int, Any]:
  """Checks the softmax hyperparameters; returns them normalized."""
  reduction = check_reduction(fn, reduction)
  eps = check_label_smoothing(fn, label_smoothing)
  ignore_index = check_int(fn, "ignore_index", ignore_index, allow_none=True)
  background_class = check_int(fn, "background_class", background_class)
  alpha = check_hyper(fn, "alpha", alpha, num_classes, low=None)
  gamma = check_hyper(fn, "gamma", gamma, num_classes, low=0.0, allow_none=False)
  process_group = check_process_group(fn, process_group)
  return alpha, gamma, eps, reduction, ignore_index, background_class, process_group


def softmax_masks(fn: str, labels: torch.Tensor, where: torch.Tensor | None,
                  num_classes: int, ignore_index: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
  """``(valid, bad, safe_labels)``: the entries that count; with the value checks off, the
  valid labels outside ``[0, C)`` (their loss is NaN; with the checks on they raise and
  ``bad`` is None); and labels that are safe to index with."""
  valid = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
  if ignore_index is not None:
    valid = labels != ignore_index
  if where is not None:
    valid = valid & where
  zero = torch.zeros((), dtype=labels.dtype, device=labels.device)
  if checks_enabled():
    check_label_range(fn, labels, valid, num_classes, ignore_index)
    return valid, None, torch.where(valid, labels, zero).to(torch.int64)
  bad = valid & ((labels < 0) | (labels >= num_classes))
  return valid, bad, torch.where(valid & ~bad, labels, zero).to(torch.int64)
