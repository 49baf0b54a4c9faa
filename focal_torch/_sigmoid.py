"""Sigmoid focal loss per entry, and its analytic backward (an autograd.Function).

With ``p = sigmoid(x)`` and ``q = sigmoid(-x) = 1 - p`` (each computed directly, no
cancellation):

    BCE          = relu(x) - x y + log1p(exp(-|x|))
    1 - p_t      = (1 - y) p + y q                 (a sum of two non-negative terms)
    loss         = alpha_t (1 - p_t)^gamma BCE
    dloss/dx     = alpha_t (1 - p_t)^gamma (gamma R BCE + (1 - y) p - y q),
    R            = (1 - 2y) p q / (1 - p_t)        (|R| <= 1)

``R`` is ``d(1 - p_t)/dx / (1 - p_t)``, so no ``(1 - p_t)^(gamma - 1)`` (infinite for
``gamma < 1`` where ``p_t`` rounds to 1) is ever formed. The double backward
(``create_graph=True``) differentiates the same quantities written in log space. The names
(``bce``, ``one_m_pt``, ``log_1m_pt``, ``focal``, ``alpha_t``, ``r``, ``p_minus_y``, ...) are
docs/math.md's ("Sigmoid", "Names"), as in ``focal_jax._sigmoid``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import torch

from focal_torch import _checks
from focal_torch import _chunking
from focal_torch import _numerics
from focal_torch import _reduce
from focal_torch._numerics import exp_
from focal_torch._numerics import softplus


def terms(x: torch.Tensor, y: torch.Tensor, alpha: Any, gamma: Any, eps: float,
          with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
  """Loss and (optionally) dloss/dx per entry of a chunk; ``x`` in the compute dtype.

  Built for speed on CPU (torch's ``where``, ``log`` of 0 and ``exp`` are slow there):
  direct sigmoids, ``exp`` as ``exp2``, ``(1 - p_t)^gamma`` as ``exp2(gamma log2(.))``.
  """
  y = y.to(x.dtype)
  if eps:
    # Label smoothing moves y toward 1/2 before everything else.
    y = y * (1.0 - eps) + eps / 2
  # BCE with logits, as torch computes it: relu(x) - x y + log1p(exp(-|x|)).
  bce = torch.relu(x).sub_(x * y).add_(exp_(x.abs().neg_()).log1p_())
  plain = isinstance(gamma, float) and gamma == 0.0
  if not plain or with_grad:
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    one_minus_y = 1.0 - y
  focal = None
  if not plain:
    # 1 - p_t = (1 - y) p + y (1 - p): exact where p_t rounds to 1.
    one_m_pt = one_minus_y * p + y * q
    if isinstance(gamma, torch.Tensor):  # may hold 0: pow gives 0 ** 0 = 1 (exp2 log2: NaN)
      focal = torch.pow(one_m_pt, gamma)
    else:
      focal = torch.exp2(torch.log2(one_m_pt).mul_(gamma))
  alpha_focal = focal  # alpha_t * focal, None when both are 1
  if alpha is not None:
    alpha_t = alpha * y + (1.0 - alpha) * one_minus_y if not plain or with_grad else (
        alpha * y + (1.0 - alpha) * (1.0 - y))
    alpha_focal = alpha_t if alpha_focal is None else alpha_t * alpha_focal
  loss = bce if alpha_focal is None else alpha_focal * bce
  if not with_grad:
    return loss, None
  # p - y without cancellation at y in {0, 1}.
  p_minus_y = one_minus_y * p - y * q
  bracket = p_minus_y  # dloss/dx = alpha_t focal (gamma r bce + p_minus_y)
  if not plain:
    # r = (1 - 2y) p q / (1 - p_t), bounded by 1; where 1 - p_t underflows, focal = 0.
    r = (1.0 - 2.0 * y) * p * q / one_m_pt.clamp_min(torch.finfo(one_m_pt.dtype).tiny)
    bracket = p_minus_y + gamma * r * bce
  dloss_dx = bracket if alpha_focal is None else alpha_focal * bracket
  return loss, dloss_dx


def terms_autodiff(x: torch.Tensor, y: torch.Tensor, alpha: Any, gamma: Any,
                   eps: float) -> torch.Tensor:
  """dloss/dx from differentiable log-space ops, for the double backward: the same values
  as :func:`terms`, and a derivative that stays finite where ``1 - p_t`` underflows."""
  y = y.to(x.dtype)
  if eps:
    y = y * (1.0 - eps) + eps / 2
  neg_log_q = softplus(x)   # -log q = -log(1 - p)
  neg_log_p = softplus(-x)  # -log p
  bce = y * neg_log_p + (1.0 - y) * neg_log_q
  p_minus_y = (1.0 - y) * torch.sigmoid(x) - y * torch.sigmoid(-x)
  if isinstance(gamma, float) and gamma == 0.0:
    alpha_focal, bracket = None, p_minus_y
  else:
    # log(1 - p_t) = logaddexp(log y + log(1 - p), log(1 - y) + log p).
    log_1m_pt = torch.logaddexp(torch.log(y) - neg_log_q, torch.log1p(-y) - neg_log_p)
    alpha_focal = torch.exp(gamma * log_1m_pt)  # focal; alpha_t below
    r = (1.0 - 2.0 * y) * torch.exp(-(neg_log_p + neg_log_q) - log_1m_pt)
    bracket = gamma * r * bce + p_minus_y
  if alpha is not None:
    alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
    alpha_focal = alpha_t if alpha_focal is None else alpha_t * alpha_focal
  return bracket if alpha_focal is None else alpha_focal * bracket


# --- engine (torch-specific: chunking; exp as exp2 in terms above) ---


def _mask(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
  if valid is None:
    return x
  return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


# At most this many entries per chunk here (1 MiB of float32), below the shared chunk size:
# the backward keeps about fourteen chunk-sized temporaries alive at once next to its
# (N, C) output, so 2**20-entry chunks of 2**24-entry logits added 0.87x their size to the
# peak and these add about 0.2x. Still large enough that per-op dispatch costs little.
MAX_CHUNK_ELEMENTS = 1 << 18


def _chunk_elements(elements: int | None) -> int | None:
  return None if elements is None else min(elements, MAX_CHUNK_ELEMENTS)


# --- the autograd.Function and the loss ---


@dataclasses.dataclass(frozen=True)
class SigmoidOptions:
  """The checked settings of one sigmoid focal loss call that are not tensors, passed whole
  to :class:`SigmoidFocalFunction` (frozen and hashable).

  Attributes:
    label_smoothing: ``eps`` in ``[0, 1]``.
    chunk_elements: elements per chunk of the logits, at most ``MAX_CHUNK_ELEMENTS`` (None:
      one chunk, under torch.compile).
    compute_dtype: the dtype of the math (float32, or float64 for float64 logits).
  """
  label_smoothing: float
  chunk_elements: int | None
  compute_dtype: torch.dtype


class SigmoidFocalFunction(torch.autograd.Function):
  """Per-entry sigmoid focal loss of a rows view ``x3`` with a chunked analytic backward.

  It exists because autograd through the formula saves about ten temporaries of the
  logits' size; this saves the logits and labels (inputs anyway) and recomputes per chunk.
  With ``create_graph=True`` the backward is built from differentiable ops (double backward).
  ``alpha``/``gamma``: None, floats, 0-d tensors or class vectors shaped by
  ``_chunking.class_shape``.
  """

  @staticmethod
  def forward(ctx, x3, y3, valid, alpha, gamma, options):  # pylint: disable=W0221
    cdt, eps = options.compute_dtype, options.label_smoothing
    loss = torch.empty(x3.shape, dtype=cdt, device=x3.device)
    for idx in _chunking.chunks(x3.shape, options.chunk_elements):
      part, _ = terms(x3[idx].to(cdt), y3[idx], alpha, gamma, eps,
                      with_grad=False)
      loss[idx] = _mask(part, None if valid is None else valid[idx])
    _numerics.save_hypers(ctx, (x3, y3, valid), alpha, gamma)
    ctx.options = options
    return loss

  @staticmethod
  def backward(ctx, go):  # pylint: disable=W0221
    (x3, y3, valid), alpha, gamma = _numerics.saved_hypers(ctx)
    options = ctx.options
    cdt, eps = options.compute_dtype, options.label_smoothing
    if torch.is_grad_enabled():
      # create_graph=True: differentiable formulas, so that the gradient has a gradient.
      grad = terms_autodiff(x3.to(cdt), y3, alpha, gamma, eps)
      return (_mask(grad * go, valid).to(x3.dtype),) + (None,) * 5
    out = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
    for idx in _chunking.chunks(x3.shape, options.chunk_elements):
      _, part = terms(x3[idx].to(cdt), y3[idx], alpha, gamma, eps,
                      with_grad=True)
      part = part * go[idx]
      out[idx] = _mask(part, None if valid is None else valid[idx])
    return (out,) + (None,) * 5


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


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
    dim = _checks.axis(fn, dim, logits.ndim)
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
  _checks.labels(fn, labels, logits.shape, "the shape of logits", logits, integer=False)
  _checks.no_grad_needed(fn, "labels", labels)
  cdt = _numerics.compute_dtype(logits.dtype)
  if labels.dtype in _WIDE_UNSIGNED:  # torch has no comparisons for these
    labels = labels.to(cdt)
  where = _checks.where_mask(fn, where, logits.shape, "the shape of labels", logits)
  weight = _checks.sample_weight(fn, sample_weight, logits.shape, logits, cdt)
  _checks.unit_interval(fn, "labels", labels, where)

  if dim is None:
    x3 = logits.reshape(-1, 1)
  else:
    x3 = _chunking.as_rows(logits, dim)
  y3 = labels.reshape(x3.shape)
  valid3 = None if where is None else where.reshape(x3.shape)
  options = SigmoidOptions(label_smoothing=eps,
                           chunk_elements=_chunk_elements(_chunking.chunk_elements(x3.numel())),
                           compute_dtype=cdt)
  loss = SigmoidFocalFunction.apply(
      x3, y3, valid3,
      _chunking.class_vector(_numerics.traced(alpha, cdt, logits), cdt, logits.device, x3.shape),
      _chunking.class_vector(_numerics.traced(gamma, cdt, logits), cdt, logits.device, x3.shape),
      options).reshape(logits.shape)
  loss = _checks.apply_sample_weight(loss, weight, where)
  positive = None
  if reduction == "mean_positive":
    positive = labels > 0 if where is None else (labels > 0) & where
  return _reduce.reduce_loss(loss, reduction, valid=where, positive=positive,
                             process_group=process_group, out_dtype=logits.dtype)
