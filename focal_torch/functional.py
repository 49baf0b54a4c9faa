"""Focal losses for PyTorch: the functional API.

The functions mirror ``focal_jax`` (same names, same keywords, same numbers) with torch's
conventions: the class axis is ``dim`` (default 1, like ``F.cross_entropy``), the default
reduction is ``"mean"`` and softmax labels equal to ``ignore_index`` (default -100) are left
out. Math runs in float32 (float64 stays float64); the result has the logits' dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from focal_torch import _categorical
from focal_torch import _checks
from focal_torch import _class_split
from focal_torch import _chunking
from focal_torch import _numerics
from focal_torch import _reduce
from focal_torch import _sigmoid
from focal_torch import _softmax

from focal_torch._linear import linear_softmax_focal  # the fused head, in its own module

__all__ = ["softmax_focal", "sigmoid_focal", "categorical_focal", "linear_softmax_focal"]


def softmax_focal(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: Any = None,
    gamma: Any = 2.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    where: Any = None,
    ignore_index: int | None = -100,
    background_class: int = 0,
    dim: int = 1,
    process_group: Any = None,
    sample_weight: Any = None,
    class_process_group: Any = None,
) -> torch.Tensor:
  r"""Softmax focal loss for integer class labels.

  .. math::
    \ell = \alpha_t (1 - p_t)^{\gamma_t} \Big( -(1 - \varepsilon) \log p_t
           - \frac{\varepsilon}{C} \sum_c \log s_c \Big), \quad s = \mathrm{softmax}(z)

  with ``p_t = s[t]`` the unsmoothed probability of the label ``t``: smoothing acts on the
  cross-entropy term only, as in ``F.cross_entropy(label_smoothing=...)``. With
  ``gamma=0`` and ``alpha=None`` this is ``F.cross_entropy``. The backward is analytic
  (a ``torch.autograd.Function``): it keeps the logits and a few numbers per row, and
  writes the gradient chunk by chunk without other temporaries of the logits' size.
  Log space throughout: finite losses and gradients at any margin and any ``gamma >= 0``.

  Args:
    logits: floating-point scores, class axis at ``dim``.
    labels: integer class indices in ``[0, C)`` (or ``ignore_index``); shape of ``logits``
      without ``dim``.
    alpha: None (no weighting), a number ``>= 0``, or a ``(C,)`` tensor of class weights
      (taken at the label). Lists, tuples and NumPy arrays are taken as tensors.
    gamma: finite focusing exponent ``>= 0``: a number, or a ``(C,)`` tensor (taken at the
      label).
    label_smoothing: ``eps`` in ``[0, 1]``.
    reduction: ``"none"``, ``"sum"``, ``"mean"`` (over valid entries) or ``"mean_positive"``
      (sum over valid entries divided by the number of valid entries whose label is not
      ``background_class``; RetinaNet's normalization).
    where: optional bool mask of ``labels``' shape, or broadcastable to it; False entries
      give 0 loss and 0 gradient (whatever their logits) and are left out of every
      denominator.
    ignore_index: label value treated as masked; None to mask nothing.
    background_class: the label that does not count as positive for ``"mean_positive"``.
    dim: the class axis of ``logits``.
    process_group: None (no cross-process reduction, the default), ``"world"`` (the
      default group, looked up at each call: a loss built before ``init_process_group``
      works), or a ``torch.distributed`` group whose denominators are summed. Each rank then
      returns ``n * local_sum / global_denominator`` (``n`` the group size; for ``"sum"``
      the denominator is 1), so DDP's gradient averaging gives exactly the single-process
      value and gradient of the whole batch. Ignored for ``"none"``.
    sample_weight: None, a number, or a tensor broadcastable to ``labels``' shape (bool,
      integer or float; finite, ``>= 0``; never differentiated): multiplies each entry's
      loss and gradient before the reduction. Denominators are unchanged (``"mean"`` still
      divides by the number of valid entries).
    class_process_group: None (the default), ``"world"`` (resolved at each call) or a
      ``torch.distributed`` group over which the classes are split (vocabulary
      parallelism, as Megatron's vocab-parallel cross-entropy): rank ``r`` of the ``k``
      ranks of the group holds the contiguous slice ``[r C/k, (r + 1) C/k)`` of the ``C``
      classes, so ``logits`` has ``C/k`` entries along ``dim``. ``labels`` are global class
      ids and ``alpha``/``gamma`` vectors the global ``(C,)`` ones, the same on every rank.
      Only per-row numbers cross the group (a MAX and a SUM all-reduce in the forward);
      every rank returns the whole loss, and its backward writes the gradient of its own
      slice with no communication. Combines with ``process_group`` (the data group) on a
      2-D layout. ``create_graph=True`` is not supported with it.

  Returns:
    Per-entry losses of ``labels``' shape for ``reduction="none"``, else a scalar; in the
    logits' dtype.

  Raises:
    TypeError: non-tensor, integer or float8 ``logits``; non-integer ``labels``; a non-bool
      ``where``; arguments of the wrong type.
    ValueError: ``gamma < 0``, ``alpha < 0`` or either not finite; ``alpha``/``gamma`` not
      a scalar or ``(C,)``; a negative or non-finite ``sample_weight``; an unknown
      ``reduction``; ``label_smoothing`` outside ``[0, 1]``; ``labels`` or ``where`` of the
      wrong shape; a label outside ``[0, C)`` that is not ``ignore_index`` (see
      :class:`focal_torch.value_checks` to skip this check in hot loops); with
      ``class_process_group``, ``(C,)`` ``alpha``/``gamma`` whose length the group size
      does not divide, or ranks holding different numbers of classes.
    RuntimeError: ``create_graph=True`` with ``class_process_group``.

  Shape:
    - logits: ``(N, C)`` or ``(N, C, d1, ...)`` (``dim=1``), or any shape with the class
      axis at ``dim``.
    - labels, where: ``(N,)`` or ``(N, d1, ...)``.
    - output: scalar, or ``labels``' shape for ``reduction="none"``.

  Examples:
    >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    >>> focal_torch.softmax_focal(logits, torch.tensor([0, 1]), gamma=2.0)
    tensor(1.1477)

  References:
    Lin et al., Focal Loss for Dense Object Detection, ICCV 2017.
  """
  return softmax_focal_impl(
      "softmax_focal", logits, labels, alpha=alpha, gamma=gamma,
      label_smoothing=label_smoothing, reduction=reduction, where=where,
      ignore_index=ignore_index, background_class=background_class, dim=dim,
      process_group=process_group, sample_weight=sample_weight,
      class_process_group=class_process_group)


def softmax_focal_impl(fn: str, logits: torch.Tensor, labels: torch.Tensor, *, alpha: Any,
                       gamma: Any, label_smoothing: Any, reduction: Any, where: Any,
                       ignore_index: Any, background_class: Any, dim: Any,
                       process_group: Any, sample_weight: Any = None,
                       out_dtype: torch.dtype | None = None,
                       chunk_elements: int | None = None,
                       class_process_group: Any = None) -> torch.Tensor:
  """:func:`softmax_focal` with the name used in messages and the output dtype as options
  (the DeepSpeed drop-in returns float32 for half inputs, as DeepSpeed does)."""
  _checks.floating_array(fn, "logits", logits)
  dim = _checks.normalize_dim(fn, dim, logits.ndim)
  num_classes = logits.shape[dim]
  if num_classes == 0:
    raise ValueError(f"{fn}: logits must have at least one class, got C = 0 (shape "
                     f"{_checks.shape_str(logits.shape)}, class dim {dim})")
  split = None
  if class_process_group is not None:
    split = _class_split.resolve(fn, class_process_group, num_classes, alpha=alpha,
                                 gamma=gamma)
    num_classes = split.num_classes
  alpha, gamma, eps, reduction, ignore_index, background_class, process_group = (
      _checks.check_softmax_hypers(fn, num_classes, alpha=alpha, gamma=gamma,
                                   label_smoothing=label_smoothing, reduction=reduction,
                                   ignore_index=ignore_index,
                                   background_class=background_class,
                                   process_group=process_group, device=logits.device))
  expected = logits.shape[:dim] + logits.shape[dim + 1:]
  _checks.check_labels(
      fn, labels, expected,
      lambda: f"the shape of logits {_checks.shape_str(logits.shape)} without dim {dim}",
      logits, integer=True)
  _checks.check_no_grad(fn, "labels", labels)
  where = _checks.where_mask(fn, where, expected, "the shape of labels", logits)
  cdt = _numerics.compute_dtype(logits.dtype)
  weight = _checks.sample_weight(fn, sample_weight, expected, logits, cdt)
  valid, bad, safe, positive = _checks.softmax_masks(
      fn, labels, where, num_classes, ignore_index,
      background_class if reduction == "mean_positive" else None)

  z3 = _chunking.as_rows(logits, dim)
  rows = _chunking.row_shape(z3.shape)
  t3 = safe.reshape(rows)
  elements = _chunking.chunk_elements(z3.numel(), chunk_elements)
  args = (z3, t3, valid.reshape(rows), None if bad is None else bad.reshape(rows),
          _numerics.per_row(_traced(alpha, cdt, logits), t3, cdt),
          _numerics.per_row(_traced(gamma, cdt, logits), t3, cdt), eps, elements)
  if split is None:
    loss = _softmax.SoftmaxFocalFunction.apply(*args)
  else:
    loss = _softmax.ClassSplitSoftmaxFocalFunction.apply(*args, split)
  loss = loss.reshape(labels.shape)
  loss = _checks.weigh(loss, weight, valid)
  return _reduce.reduce_loss(loss, reduction, valid=valid, positive=positive,
                             process_group=process_group,
                             out_dtype=out_dtype or logits.dtype)


def _class_vector(value: Any, cdt: torch.dtype, device: torch.device,
                  shape3: tuple[int, ...]) -> Any:
  """A ``(C,)`` hyperparameter shaped to broadcast against a rows view (see
  ``_chunking.class_shape``); scalars as they are."""
  if isinstance(value, torch.Tensor):
    value = value.to(device=device, dtype=cdt)
    if value.ndim == 1:
      return value.reshape(_chunking.class_shape(shape3))
  return value


def sigmoid_focal(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: Any = None,
    gamma: Any = 2.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    where: Any = None,
    dim: int = -1,
    process_group: Any = None,
    sample_weight: Any = None,
) -> torch.Tensor:
  r"""Sigmoid focal loss for binary and multi-label problems, hard or soft labels.

  .. math::
    \ell = \alpha_t (1 - p_t)^\gamma \mathrm{BCE}(x, y), \quad p = \sigma(x),\;
    p_t = p y + (1 - p)(1 - y),\; \alpha_t = \alpha y + (1 - \alpha)(1 - y)

  torchvision's ``sigmoid_focal_loss`` formula (``alpha=None`` for no weighting, where
  torchvision uses ``alpha < 0``). ``label_smoothing`` first moves ``y`` toward 1/2:
  ``y (1 - eps) + eps / 2``. Analytic, chunked backward; log space throughout.

  Args:
    logits: floating-point scores, any shape (0-d included).
    labels: targets in ``[0, 1]`` (float, int or bool) of ``logits``' shape. They get no
      gradient.
    alpha: None, a number in ``[0, 1]`` (weight of the positive class), or a ``(C,)``
      tensor of weights along ``dim`` (the last axis by default, as ``focal_jax``: for
      channels-first ``(N, C, H, W)`` logits move the class axis last, pass ``dim=1``, or
      pass a scalar). Lists, tuples and NumPy arrays are taken as tensors.
    gamma: finite focusing exponent ``>= 0``: a number or a ``(C,)`` tensor along ``dim``.
    label_smoothing: ``eps`` in ``[0, 1]``.
    reduction: ``"none"``, ``"sum"``, ``"mean"`` (over valid entries) or ``"mean_positive"``
      (sum divided by the number of valid entries whose unsmoothed label is > 0).
    where: optional bool mask of ``logits``' shape, or broadcastable to it.
    dim: the axis that ``(C,)`` ``alpha``/``gamma`` run along (default -1, the last).
    process_group: as in :func:`softmax_focal`. Each entry's loss depends on its own logit
      only, so entries split over ranks in any way need nothing more than the group of all
      the ranks that hold entries (e.g. ``"world"``). With the classes split over a class
      group too (its slices' parameters averaged over the data group only, as DDP over the
      data group does), divide the loss by the class group's size before ``backward``;
      the whole loss is then the sum of the values over the class group.
    sample_weight: as in :func:`softmax_focal`, broadcastable to ``logits``' shape.

  Returns:
    Per-entry losses of ``logits``' shape for ``"none"``, else a scalar; logits' dtype.

  Raises:
    TypeError: non-tensor or integer ``logits``; a non-bool ``where``.
    ValueError: ``gamma < 0``; ``alpha`` outside ``[0, 1]`` or of the wrong shape; an
      unknown ``reduction``; ``label_smoothing`` outside ``[0, 1]``; ``labels``/``where``
      of the wrong shape; labels outside ``[0, 1]`` (a value check).

  Shape:
    - logits, labels, where: ``(*)``, e.g. ``(N, C)`` or ``(N, C, H, W)``.
    - output: scalar, or ``(*)`` for ``reduction="none"``.

  Examples:
    >>> focal_torch.sigmoid_focal(torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, 0.0]]),
    ...                           alpha=0.25, reduction="sum")
    tensor(0.0170)

  References:
    Lin et al., Focal Loss for Dense Object Detection, ICCV 2017.
  """
  fn = "sigmoid_focal"
  _checks.floating_array(fn, "logits", logits, scalar_ok=True)
  reduction = _checks.reduction(fn, reduction)
  eps = _checks.label_smoothing(fn, label_smoothing)
  process_group = _checks.process_group(fn, process_group)
  if logits.ndim and any(_ndim(v) >= 1 for v in (alpha, gamma)):
    dim = _checks.normalize_dim(fn, dim, logits.ndim)
    num_classes = logits.shape[dim]
    what = (" (one per entry of the last axis of logits)" if dim == logits.ndim - 1
            else f" (one per entry of dim {dim} of logits)")
  else:
    _checks.optional_int(fn, "dim", dim)
    dim, what = None, " (one per entry of the last axis of logits)"
    num_classes = logits.shape[-1] if logits.ndim else 1  # for messages only
  alpha = _checks.class_param(fn, "alpha", alpha, num_classes, low=0.0, high=1.0,
                              hint=_checks.SIGMOID_ALPHA_HINT, what_classes=what,
                              device=logits.device)
  gamma = _checks.class_param(fn, "gamma", gamma, num_classes, allow_none=False,
                              what_classes=what, device=logits.device)
  if not isinstance(labels, torch.Tensor):
    raise TypeError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
  if labels.is_complex():
    raise TypeError(f"{fn}: labels must be real numbers in [0, 1], got dtype {labels.dtype}")
  _checks.check_labels(fn, labels, logits.shape, "the shape of logits", logits, integer=False)
  _checks.check_no_grad(fn, "labels", labels)
  cdt = _numerics.compute_dtype(logits.dtype)
  if labels.dtype in _WIDE_UNSIGNED:  # torch has no comparisons for these
    labels = labels.to(cdt)
  where = _checks.where_mask(fn, where, logits.shape, "the shape of labels", logits)
  weight = _checks.sample_weight(fn, sample_weight, logits.shape, logits, cdt)
  _checks.check_unit_interval(fn, "labels", labels, where)

  if dim is None:
    x3 = logits.reshape(-1, 1)
  else:
    x3 = _chunking.as_rows(logits, dim)
  y3 = labels.reshape(x3.shape)
  valid3 = None if where is None else where.reshape(x3.shape)
  elements = _chunking.chunk_elements(x3.numel())
  loss = _sigmoid.SigmoidFocalFunction.apply(
      x3, y3, valid3, _class_vector(_traced(alpha, cdt, logits), cdt, logits.device, x3.shape),
      _class_vector(_traced(gamma, cdt, logits), cdt, logits.device, x3.shape), eps,
      elements).reshape(logits.shape)
  loss = _checks.weigh(loss, weight, where)
  positive = None
  if reduction == "mean_positive":
    positive = labels > 0 if where is None else (labels > 0) & where
  return _reduce.reduce_loss(loss, reduction, valid=where, positive=positive,
                             process_group=process_group, out_dtype=logits.dtype)


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _traced(value: Any, cdt: torch.dtype, logits: torch.Tensor) -> Any:
  """Under torch.compile, a Python-number hyperparameter as a 0-d tensor: a number that
  changes between calls (a gamma schedule) is symbolic there, and dynamo cannot pass a
  symbolic float into the autograd.Function. Eager: as it is."""
  if isinstance(value, float) and torch.compiler.is_compiling():
    return torch.full((), value, dtype=cdt, device=logits.device)
  return value


def _ndim(value: Any) -> int:
  """The number of dimensions of a hyperparameter (numbers: 0; ragged lists: 1)."""
  if isinstance(value, torch.Tensor):
    return value.ndim
  if isinstance(value, (list, tuple, np.ndarray)):
    try:
      return np.ndim(value)
    except ValueError:
      return 1
  return 0


_PER_CLASS = " (one per class)"


def categorical_focal(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: Any = None,
    gamma: Any = 2.0,
    reduction: str = "mean",
    where: Any = None,
    background_class: int = 0,
    dim: int = 1,
    process_group: Any = None,
    sample_weight: Any = None,
    class_process_group: Any = None,
) -> torch.Tensor:
  r"""Softmax focal loss for probability targets (smoothed one-hot, mixup, distillation).

  .. math::
    \ell = -\sum_c \alpha_c\, y_c\, (1 - s_c)^{\gamma_c} \log s_c, \quad
    s = \mathrm{softmax}(z)

  keras' ``CategoricalFocalCrossentropy``; with one-hot ``y`` it equals
  :func:`softmax_focal`. To smooth labels, smooth the targets first. Analytic, chunked
  backward.

  Args:
    logits: floating-point scores, class axis at ``dim``.
    targets: floating-point target probabilities of ``logits``' shape. They get no
      gradient.
    alpha: None, a number, or a ``(C,)`` tensor of per-class weights.
    gamma: focusing exponent ``>= 0``: a number or a ``(C,)`` tensor (per class).
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"`` (a row is positive
      iff ``argmax(targets) != background_class``).
    where: optional bool mask of the rows (``logits``' shape without ``dim``), or
      broadcastable to it.
    background_class: see ``reduction``.
    dim: the class axis.
    process_group: as in :func:`softmax_focal`.
    sample_weight: as in :func:`softmax_focal`, one weight per row (broadcastable to
      ``logits``' shape without ``dim``).
    class_process_group: as in :func:`softmax_focal`: each rank's ``logits`` and
      ``targets`` hold its contiguous slice of the ``C`` classes along ``dim``;
      ``alpha``/``gamma`` vectors are the global ``(C,)`` ones. The forward all-reduces
      per-row numbers only (a MAX and two SUMs; ``"mean_positive"`` adds a MAX and a MIN
      for the global argmax of the targets); the backward has no communication.

  Returns:
    Per-row losses (``logits``' shape without ``dim``) for ``"none"``, else a scalar; in
    the logits' dtype.

  Raises:
    TypeError: non-tensor or integer ``logits`` or ``targets``; a non-bool ``where``.
    ValueError: ``gamma < 0``; ``alpha``/``gamma`` of the wrong shape; an unknown
      ``reduction``; ``targets``/``where`` of the wrong shape; with
      ``class_process_group``, ``(C,)`` ``alpha``/``gamma`` whose length the group size
      does not divide, or ranks holding different numbers of classes.
    RuntimeError: ``create_graph=True`` with ``class_process_group``.

  Shape:
    - logits, targets: ``(N, C)`` or ``(N, C, d1, ...)``.
    - where, output (``"none"``): ``(N,)`` or ``(N, d1, ...)``; otherwise a scalar.

  Examples:
    >>> focal_torch.categorical_focal(torch.tensor([[2.0, 0.0]]),
    ...                               torch.tensor([[0.9, 0.1]]))
    tensor(0.1666)
  """
  fn = "categorical_focal"
  _checks.floating_array(fn, "logits", logits)
  dim = _checks.normalize_dim(fn, dim, logits.ndim)
  num_classes = logits.shape[dim]
  if num_classes == 0:
    raise ValueError(f"{fn}: logits must have at least one class, got C = 0 (shape "
                     f"{_checks.shape_str(logits.shape)}, class dim {dim})")
  split = None
  if class_process_group is not None:
    split = _class_split.resolve(fn, class_process_group, num_classes, alpha=alpha,
                                 gamma=gamma)
    num_classes = split.num_classes
  reduction = _checks.reduction(fn, reduction)
  background_class = _checks.optional_int(fn, "background_class", background_class)
  alpha = _checks.class_param(fn, "alpha", alpha, num_classes, what_classes=_PER_CLASS,
                              device=logits.device)
  gamma = _checks.class_param(fn, "gamma", gamma, num_classes, allow_none=False,
                              what_classes=_PER_CLASS, device=logits.device)
  process_group = _checks.process_group(fn, process_group)
  if not isinstance(targets, torch.Tensor):
    raise TypeError(f"{fn}: targets must be a torch.Tensor, got {type(targets).__name__}")
  if not targets.is_floating_point():
    raise TypeError(f"{fn}: targets must be a floating-point tensor, got dtype "
                    f"{targets.dtype}")
  if tuple(targets.shape) != tuple(logits.shape):
    raise ValueError(f"{fn}: targets must have shape {_checks.shape_str(logits.shape)} (the "
                     f"shape of logits), got shape {_checks.shape_str(targets.shape)}")
  _checks.check_same_device(fn, "targets", targets, logits)
  _checks.check_no_grad(fn, "targets", targets)
  row_shape = logits.shape[:dim] + logits.shape[dim + 1:]
  where = _checks.where_mask(
      fn, where, row_shape,
      lambda: f"the shape of logits {_checks.shape_str(logits.shape)} without dim {dim}",
      logits)
  cdt = _numerics.compute_dtype(logits.dtype)
  weight = _checks.sample_weight(fn, sample_weight, row_shape, logits, cdt)

  z3 = _chunking.as_rows(logits, dim)
  y3 = _chunking.as_rows(targets, dim)
  valid3 = None if where is None else where.reshape(_chunking.row_shape(z3.shape))
  elements = _chunking.chunk_elements(z3.numel())
  if split is None:
    loss = _categorical.CategoricalFocalFunction.apply(
        z3, y3, valid3,
        _class_vector(_traced(alpha, cdt, logits), cdt, logits.device, z3.shape),
        _class_vector(_traced(gamma, cdt, logits), cdt, logits.device, z3.shape), elements)
  else:
    loss = _categorical.ClassSplitCategoricalFocalFunction.apply(
        z3, y3, valid3,
        _class_vector(split.class_slice(alpha), cdt, logits.device, z3.shape),
        _class_vector(split.class_slice(gamma), cdt, logits.device, z3.shape), elements,
        split)
  loss = _checks.weigh(loss.reshape(row_shape), weight, where)
  positive = None
  if reduction == "mean_positive":
    top = targets.argmax(dim) if split is None else split.argmax(targets, dim)
    positive = top != background_class
    if where is not None:
      positive = positive & where
  return _reduce.reduce_loss(loss, reduction, valid=where, positive=positive,
                             process_group=process_group, out_dtype=logits.dtype)
