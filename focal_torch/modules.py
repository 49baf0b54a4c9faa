"""``nn.Module`` wrappers of the focal losses: validate at construction, call the functional.

``alpha`` (when given) and a tensor ``gamma`` are registered buffers: they appear in
``state_dict`` and follow ``.to()``, ``.cuda()`` and ``.double()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from focal_torch import _checks
from focal_torch import _class_split
from focal_torch import functional

__all__ = ["SoftmaxFocalLoss", "SigmoidFocalLoss", "CategoricalFocalLoss"]


def _register(module: nn.Module, name: str, value: Any) -> Any:
  """Tensors (and numbers, as 0-d float32 tensors, for ``alpha``) become buffers."""
  if isinstance(value, torch.Tensor):
    module.register_buffer(name, value)
    return None
  if name == "alpha":
    module.register_buffer(name, None if value is None else torch.tensor(float(value)))
    return None
  return value


class _FocalBase(nn.Module):
  """Holds the shared hyperparameters; subclasses call one functional in ``forward``."""

  alpha: torch.Tensor | None

  def _set_hypers(self, alpha: Any, gamma: Any) -> None:
    _register(self, "alpha", alpha)
    gamma_float = _register(self, "gamma", gamma)
    if gamma_float is not None:
      self.gamma = gamma_float

  def extra_repr(self) -> str:
    parts = []
    if isinstance(self.gamma, float):
      parts.append(f"gamma={self.gamma}")
    for name in ("label_smoothing", "reduction", "ignore_index", "background_class", "dim"):
      if hasattr(self, name):
        parts.append(f"{name}={getattr(self, name)!r}")
    return ", ".join(parts)


class SoftmaxFocalLoss(_FocalBase):
  r"""Softmax focal loss for integer labels; see :func:`focal_torch.softmax_focal`.

  Args:
    alpha: None, a number, or a ``(C,)`` tensor of class weights (a buffer).
    gamma: a number ``>= 0`` or a ``(C,)`` tensor (a buffer).
    label_smoothing: in ``[0, 1]``.
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"``.
    ignore_index: label value left out (None: none).
    background_class: the non-positive label for ``"mean_positive"``.
    dim: the class axis.
    process_group: None, ``"world"`` (the default group, looked up at each call: the module
      may be built before ``init_process_group``), or a ``torch.distributed`` group over
      which the denominators are summed.
    class_process_group: None, ``"world"`` (looked up at each call) or the
      ``torch.distributed`` group over which the classes are split; each rank's logits hold
      its contiguous slice of the ``C`` classes, ``alpha``/``gamma`` vectors are the global
      ``(C,)`` ones (see :func:`focal_torch.softmax_focal`).

  ``forward(logits, labels, where=None, *, sample_weight=None)``; see the functional.

  Raises:
    TypeError, ValueError: at construction, for the hyperparameters (as the functional).

  Shape:
    - logits: ``(N, C)`` or ``(N, C, d1, ...)``; labels, where: ``(N,)`` or ``(N, d1, ...)``.
    - output: scalar, or ``labels``' shape for ``reduction="none"``.

  Examples:
    >>> loss_fn = focal_torch.SoftmaxFocalLoss(gamma=2.0, alpha=torch.ones(3))
    >>> loss = loss_fn(torch.randn(8, 3), torch.randint(0, 3, (8,)))
  """

  def __init__(self, *, alpha: Any = None, gamma: Any = 2.0, label_smoothing: float = 0.0,
               reduction: str = "mean", ignore_index: int | None = -100,
               background_class: int = 0, dim: int = 1, process_group: Any = None,
               class_process_group: Any = None) -> None:
    super().__init__()
    fn = type(self).__name__
    self.class_process_group = _class_split.check_at_construction(
        fn, class_process_group, alpha=alpha, gamma=gamma)
    alpha, gamma, eps, reduction, ignore_index, background_class, process_group = (
        _checks.softmax_hypers(
            fn, None, alpha=alpha, gamma=gamma, label_smoothing=label_smoothing,
            reduction=reduction, ignore_index=ignore_index,
            background_class=background_class, process_group=process_group, at_call=False))
    self._set_hypers(alpha, gamma)
    self.label_smoothing = eps
    self.reduction = reduction
    self.ignore_index = ignore_index
    self.background_class = background_class
    self.dim = _checks.optional_int(fn, "dim", dim)
    self.process_group = process_group

  def forward(self, logits: torch.Tensor, labels: torch.Tensor, where: Any = None, *,
              sample_weight: Any = None) -> torch.Tensor:
    return functional.softmax_focal(
        logits, labels, alpha=self.alpha, gamma=self.gamma,
        label_smoothing=self.label_smoothing, reduction=self.reduction, where=where,
        ignore_index=self.ignore_index, background_class=self.background_class, dim=self.dim,
        process_group=self.process_group, sample_weight=sample_weight,
        class_process_group=self.class_process_group)


class SigmoidFocalLoss(_FocalBase):
  r"""Sigmoid focal loss (binary / multi-label); see :func:`focal_torch.sigmoid_focal`.

  Args:
    alpha: None, a number in ``[0, 1]``, or a ``(C,)`` tensor (or list) along ``dim`` (a
      buffer).
    gamma: a number ``>= 0`` or a ``(C,)`` tensor along ``dim`` (a buffer).
    label_smoothing: in ``[0, 1]``; moves the labels toward 1/2.
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"``.
    dim: the axis of ``(C,)`` hyperparameters (default -1, the last).
    process_group: as in :class:`SoftmaxFocalLoss`.

  Raises:
    TypeError, ValueError: at construction, for the hyperparameters (as the functional).

  Shape:
    - logits, labels, where: ``(*)``.
    - output: scalar, or ``(*)`` for ``reduction="none"``.

  Examples:
    >>> loss_fn = focal_torch.SigmoidFocalLoss(alpha=0.25, gamma=2.0, reduction="sum")
    >>> loss = loss_fn(torch.randn(8, 4), torch.randint(0, 2, (8, 4)).float())
  """

  def __init__(self, *, alpha: Any = None, gamma: Any = 2.0, label_smoothing: float = 0.0,
               reduction: str = "mean", dim: int = -1, process_group: Any = None) -> None:
    super().__init__()
    fn = type(self).__name__
    alpha = _checks.class_param(fn, "alpha", alpha, None, low=0.0, high=1.0,
                                hint=_checks.SIGMOID_ALPHA_HINT)
    gamma = _checks.class_param(fn, "gamma", gamma, None, allow_none=False)
    self._set_hypers(alpha, gamma)
    self.label_smoothing = _checks.label_smoothing(fn, label_smoothing)
    self.reduction = _checks.reduction(fn, reduction)
    self.dim = _checks.optional_int(fn, "dim", dim)
    self.process_group = _checks.process_group(fn, process_group, at_call=False)

  def forward(self, logits: torch.Tensor, labels: torch.Tensor, where: Any = None, *,
              sample_weight: Any = None) -> torch.Tensor:
    return functional.sigmoid_focal(
        logits, labels, alpha=self.alpha, gamma=self.gamma,
        label_smoothing=self.label_smoothing, reduction=self.reduction, where=where,
        dim=self.dim, process_group=self.process_group, sample_weight=sample_weight)


class CategoricalFocalLoss(_FocalBase):
  r"""Focal loss for probability targets; see :func:`focal_torch.categorical_focal`.

  Args:
    alpha: None, a number, or a ``(C,)`` tensor of per-class weights (a buffer).
    gamma: a number ``>= 0`` or a ``(C,)`` tensor (a buffer).
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"``.
    background_class: a row is positive iff ``argmax(targets) != background_class``.
    dim: the class axis.
    process_group: as in :class:`SoftmaxFocalLoss`.
    class_process_group: as in :class:`SoftmaxFocalLoss` (``targets`` sliced like the
      logits); see :func:`focal_torch.categorical_focal`.

  Raises:
    TypeError, ValueError: at construction, for the hyperparameters (as the functional).

  Shape:
    - logits, targets: ``(N, C)`` or ``(N, C, d1, ...)``; where: ``(N,)`` or ``(N, d1, ...)``.
    - output: scalar, or ``(N,)`` / ``(N, d1, ...)`` for ``reduction="none"``.

  Examples:
    >>> loss_fn = focal_torch.CategoricalFocalLoss(gamma=2.0)
    >>> loss = loss_fn(torch.randn(8, 3), torch.softmax(torch.randn(8, 3), dim=1))
  """

  def __init__(self, *, alpha: Any = None, gamma: Any = 2.0, reduction: str = "mean",
               background_class: int = 0, dim: int = 1, process_group: Any = None,
               class_process_group: Any = None) -> None:
    super().__init__()
    fn = type(self).__name__
    self.class_process_group = _class_split.check_at_construction(
        fn, class_process_group, alpha=alpha, gamma=gamma)
    alpha = _checks.class_param(fn, "alpha", alpha, None)
    gamma = _checks.class_param(fn, "gamma", gamma, None, allow_none=False)
    self._set_hypers(alpha, gamma)
    self.reduction = _checks.reduction(fn, reduction)
    self.background_class = _checks.optional_int(fn, "background_class", background_class)
    self.dim = _checks.optional_int(fn, "dim", dim)
    self.process_group = _checks.process_group(fn, process_group, at_call=False)

  def forward(self, logits: torch.Tensor, targets: torch.Tensor, where: Any = None, *,
              sample_weight: Any = None) -> torch.Tensor:
    return functional.categorical_focal(
        logits, targets, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction,
        where=where, background_class=self.background_class, dim=self.dim,
        process_group=self.process_group, sample_weight=sample_weight,
        class_process_group=self.class_process_group)
