"""Categorical focal loss (probability targets) per row, and its analytic backward.

With ``l = log_softmax(z)``, ``s = exp(l)``, ``q = 1 - s = -expm1(l)``:

    loss    = -sum_c alpha_c y_c q_c^gamma_c l_c
    dL/dz_j = s_j W - w_j,   w_c = alpha_c y_c q_c^gamma_c (1 + gamma_c s_c r_c),
                             W = sum_c w_c,   r_c = -l_c / q_c = l_c / expm1(l_c)

``r`` tends to 1 as ``s_c -> 1``, so ``w`` stays finite where ``q^(gamma - 1)`` would not.
The names (``log_s``, ``s``, ``focal``, ``coef = alpha_c y_c focal_c``, ``r``, ``w``,
``w_sum = W``, ``valid``) are docs/math.md's ("Categorical", "Names").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from focal_torch import _checks
from focal_torch import _chunking
from focal_torch import _class_split
from focal_torch import _numerics
from focal_torch import _reduce
from focal_torch._numerics import compute_dtype
from focal_torch._numerics import exp_


def safe_pow(q: torch.Tensor, gamma: Any) -> torch.Tensor:
  """``q ** gamma`` for ``q >= 0`` with ``0 ** 0 = 1`` and a finite (0) gradient at 0."""
  pos = q > 0
  q_safe = torch.where(pos, q, torch.ones((), dtype=q.dtype, device=q.device))
  at_zero = (torch.as_tensor(gamma, dtype=q.dtype, device=q.device) == 0).to(q.dtype)
  return torch.where(pos, q_safe ** gamma, at_zero)


def _expm1(x: torch.Tensor) -> torch.Tensor:
  """``expm1(x)`` for ``x <= 0``; under torch.compile as ``2 t / (1 - t)``, ``t = tanh(x / 2)``:
  inductor's vectorized ``expm1`` is ``exp(x) - 1``, 0 below ``|x|`` of about 1e-8 (so
  ``q = 0`` and ``r = l / 0`` where ``s`` nears 1), while its ``tanh`` keeps full relative
  precision there."""
  if torch.compiler.is_compiling():
    t = torch.tanh(x * 0.5)
    return 2.0 * t / (1.0 - t)
  return torch.expm1(x)


def _expm1_(x: torch.Tensor) -> torch.Tensor:
  """:func:`_expm1` in ``x``'s buffer where eager."""
  return _expm1(x) if torch.compiler.is_compiling() else x.expm1_()


def _weighted_log(coef: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
  """``coef * log s`` with 0 where ``coef`` is 0 (no target mass): a class with a logit of
  -inf and no target mass is a masked class, not ``0 * -inf``. A NaN ``coef`` (NaN logits)
  stays NaN."""
  return torch.where(coef == 0, torch.zeros((), dtype=log_s.dtype, device=log_s.device),
                     coef * log_s)


def terms(log_s: torch.Tensor, y: torch.Tensor, alpha: Any, gamma: Any, with_grad: bool,
          differentiable: bool = False, with_loss: bool = True,
          w_sum: torch.Tensor | None = None
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
  """Per-row loss (class axis kept, size 1) and (optionally) dL/dz from a chunk's
  log-softmax.

  The chunked path avoids torch's slow CPU ``where`` and ``exp``: ``l = 0`` (``s`` rounds
  to 1) is moved to ``-tiny``, where ``q = -expm1(l) = tiny`` and ``r = l / expm1(l) = 1``
  are the limits to float precision. ``differentiable=True`` (double backward) uses a
  ``where``-guarded power instead, whose derivative is 0, not NaN, at ``q = 0``.
  ``w_sum``: the per-row ``W`` when this chunk holds a slice of the classes (the sum over
  every rank's slice); None: ``W`` is this chunk's own row sum.
  """
  loss, s, w = loss_and_w(log_s, y, alpha, gamma, with_grad, differentiable, with_loss)
  if not with_grad:
    return loss, None
  w_sum = w.sum(1, keepdim=True) if w_sum is None else w_sum
  # s W - w, in s's buffer unless autograd records it.
  return loss, s * w_sum - w if differentiable else s.mul_(w_sum).sub_(w)


def loss_and_w(log_s: torch.Tensor, y: torch.Tensor, alpha: Any, gamma: Any, with_grad: bool,
               differentiable: bool = False, with_loss: bool = True
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
  """The per-row loss, ``s`` and ``w`` (None unless ``with_grad``) of :func:`terms`.

  Except with ``differentiable``, it works in place: ``log_s`` (a tensor the caller owns and
  gives up) comes back as ``s``, and ``w`` and the focal factor reuse one buffer each, so an
  eager chunk holds at most three chunk-sized buffers at a time.
  """
  if differentiable:
    return _loss_and_w_differentiable(log_s, y, alpha, gamma, with_grad, with_loss)
  y = y.to(log_s.dtype)
  plain = isinstance(gamma, float) and gamma == 0.0
  finfo = torch.finfo(log_s.dtype)
  r = None
  if plain:
    coef = y if alpha is None else alpha * y
  else:
    # Clamped below too: r = l / expm1(l) stays finite (s r = 0) where l = -inf.
    log_c = log_s.clamp(min=finfo.min, max=-finfo.tiny)
    # em1 = expm1(log s) = s - 1 = -(1 - s): 1 - s without cancellation near s = 1.
    em1 = _expm1(log_c) if with_grad else _expm1_(log_c)
    if with_grad:
      r = log_c.div_(em1)  # r = l / expm1(l), in log_c's buffer
    # coef = alpha_c y_c focal_c, focal = (1 - s)^gamma = exp2(gamma log2(-em1)), in em1's.
    coef = em1.neg_().log2_().mul_(gamma).exp2_().mul_(y)
    if alpha is not None:
      coef.mul_(alpha)
  loss = None
  if with_loss:
    # coef * log s, 0 where coef is 0 (as _weighted_log): in log_s's buffer unless s follows.
    prod = coef * log_s if with_grad else log_s.mul_(coef)
    loss = -prod.masked_fill_(coef == 0, 0.0).sum(1, keepdim=True)
    del prod
  if not with_grad:
    return loss, None, None
  s = exp_(log_s)
  w = coef if plain else r.mul_(s).mul_(gamma).add_(1.0).mul_(coef)  # coef (1 + gamma s r)
  return loss, s, w


def _loss_and_w_differentiable(log_s: torch.Tensor, y: torch.Tensor, alpha: Any, gamma: Any,
                               with_grad: bool, with_loss: bool
                               ) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                          torch.Tensor | None]:
  """:func:`loss_and_w` from differentiable operations (double backward)."""
  y = y.to(log_s.dtype)
  coef = y if alpha is None else alpha * y  # alpha_c y_c focal_c once focal is in
  plain = isinstance(gamma, float) and gamma == 0.0
  if not plain:
    # em1 = expm1(log s) = -(1 - s); a where-guarded power: derivative 0, not NaN, at q = 0.
    em1 = torch.expm1(log_s)
    coef = coef * safe_pow(-em1, gamma)
  loss = -_weighted_log(coef, log_s).sum(1, keepdim=True) if with_loss else None
  if not with_grad:
    return loss, None, None
  s = torch.exp(log_s)
  if plain:
    return loss, s, coef
  # r = l / expm1(l) -> 1 as l -> 0 (s -> 1); the where keeps 0/0 out of value and grad.
  at_one = log_s == 0
  l_safe = torch.where(at_one, -torch.ones((), dtype=s.dtype, device=s.device),
                       log_s.clamp_min(torch.finfo(log_s.dtype).min))
  r = torch.where(at_one, torch.ones((), dtype=s.dtype, device=s.device),
                  l_safe / torch.expm1(l_safe))
  return loss, s, coef * (1.0 + gamma * s * r)


# --- engine (torch-specific: chunking, log_softmax per chunk) ---


def _mask(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
  if valid is None:
    return x
  return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _log_softmax_chunk(w: torch.Tensor, cdt: torch.dtype, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
  """``log_softmax(w)`` along the classes in ``cdt``, into ``out`` if given (``cdt``,
  contiguous)."""
  if out is None:
    return torch.log_softmax(w.to(cdt), dim=1)
  return torch.ops.aten._log_softmax.out(w.to(cdt), 1, False, out=out)


def _split_lse(z3: torch.Tensor, elements: int | None, split: Any) -> torch.Tensor:
  """The log-sum-exp of the whole rows when ``z3`` holds this rank's slice of the classes:
  each rank's ``(m, S)`` chunk by chunk (``m`` its row maximum, at least the lowest finite
  number, so that a slice of ``-inf`` adds 0), then a MAX and a SUM all-reduce."""
  cdt = compute_dtype(z3.dtype)
  rows = _chunking.row_shape(z3.shape)
  m = torch.empty(rows, dtype=cdt, device=z3.device)
  s = torch.empty(rows, dtype=cdt, device=z3.device)
  lowest = torch.finfo(cdt).min
  for idx in _chunking.chunks(z3.shape, elements):
    w = z3[idx].to(cdt)
    mi = w.amax(1, keepdim=True).clamp_min(lowest)
    m[idx] = mi
    s[idx] = torch.exp(w - mi).sum(1, keepdim=True)
  big_m = split.row_max(m)
  (s,) = split.row_sum(s * torch.exp(m - big_m))
  return big_m + s.log()


# Under torch.compile rows of at most this many classes are computed column by column. Up to
# 6: with the two row statistics kept and W, three float32 per row are 3/C of the logits (extra
# peak 1.59x at C = 5, 1.50x at C = 6; by columns 0.99x, for about 1.35x / 1.5x the step time
# of the statistics form on a 2-core CPU).
COLUMN_MAX_CLASSES = 6


# Under torch.compile on the CPU, inductor computes the two passes over a row (W = sum w_j,
# then s_j W - w_j) in one loop over the rows, ``w`` in a row-sized buffer per thread, unless a
# row is more than this many times as long as there are rows (torch 2.13,
# CppScheduling.check_outer_fusion_loop_level_attr: then the inner loops are left to be
# parallelized). Its fallback writes ``w`` to an (N, C) buffer beside the gradient's.
CPU_LONG_ROWS = 300
# Inductor writes a row reduction over at most this many classes as that many loads
# (torch._inductor.config.unroll_reductions_threshold), which need ``w`` stored whole too.
UNROLLED_CLASSES = 8


def _w_stored_whole(z3: torch.Tensor) -> bool:
  """Whether a compiled backward on the CPU would store ``w`` whole beside the gradient (see
  ``CPU_LONG_ROWS`` and ``UNROLLED_CLASSES``)."""
  return (z3.device.type == "cpu" and z3.ndim == 2
          and (z3.shape[1] > CPU_LONG_ROWS * z3.shape[0] or z3.shape[1] <= UNROLLED_CLASSES))


def _row_sum_unfused(w: torch.Tensor) -> torch.Tensor:
  """``w.sum(1, keepdim=True)`` of an ``(N, C)`` ``w`` as the product ``w @ 1``, a library call
  inductor does not fuse with the loops around it: ``w`` is then written once, by the loop
  that computes it, and the gradient ``s W - w`` is written into its buffer by a loop of its
  own (inductor reuses a buffer in place only across loops it did not fuse)."""
  return w @ torch.ones((w.shape[1], 1), dtype=w.dtype, device=w.device)


def _row_stats(z: torch.Tensor) -> torch.Tensor:
  """``(m, log sum_c exp(z_c - m))`` per row, stacked: ``log_s = (z - m) - log_total`` keeps
  full precision where ``m + log_total`` would round to the ulp of ``m`` (2.4e-4 at 5000).
  ``m`` is 0 where the row maximum is infinite, as in torch.logsumexp."""
  m = _numerics.lse_shift(z.amax(1, keepdim=True))
  return torch.stack([m, torch.log(torch.exp(z - m).sum(1, keepdim=True))])


def _class_column(x: Any, c: int) -> Any:
  """Column ``c`` of a class vector shaped by ``_chunking.class_shape``; scalars as they are."""
  if isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[1] > 1:
    return x[:, c:c + 1]
  return x


def _column_terms(z3: torch.Tensor, y3: torch.Tensor, alpha: Any, gamma: Any,
                  cdt: torch.dtype, go: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
  """The per-row loss (``go`` None) or the columns of the gradient ``s_j W - w_j`` (given
  ``go``, before its multiply) of very short rows, from their columns.

  The row statistics are elementwise functions of the ``C`` columns, not row reductions, so
  inductor computes them in the loop that writes the loss or the gradient, and no per-row
  vector (half the logits at ``C = 2``) is stored between two loops.
  """
  cols = [z3[:, c:c + 1].to(cdt) for c in range(z3.shape[1])]
  if go is not None:
    cols = [_numerics.after(go, w) for w in cols]
  m = cols[0]
  for w in cols[1:]:
    m = torch.maximum(m, w)
  m = _numerics.lse_shift(m)
  total = torch.exp(cols[0] - m)
  for w in cols[1:]:
    total = total + torch.exp(w - m)
  # (z - m) - log(total), not z - lse: lse rounds to the ulp of m (2.4e-4 at 5000).
  log_total = torch.log(total)
  parts = [loss_and_w((w - m) - log_total, y3[:, c:c + 1], _class_column(alpha, c),
                      _class_column(gamma, c), with_grad=go is not None,
                      with_loss=go is None) for c, w in enumerate(cols)]
  if go is None:
    loss = parts[0][0]
    for part in parts[1:]:
      loss = loss + part[0]
    return loss, None
  w_sum = parts[0][2]
  for part in parts[1:]:
    w_sum = w_sum + part[2]
  return None, [s * w_sum - w for _, s, w in parts]


# --- the autograd.Function and the loss ---


@dataclasses.dataclass(frozen=True)
class CategoricalOptions:
  """The checked settings of one categorical focal loss call that are not tensors, passed
  whole to :class:`CategoricalFocalFunction` (frozen and hashable).

  Attributes:
    chunk_elements: elements per chunk of the logits (None: one chunk, under torch.compile).
    split: the ``_class_split.ClassSplit`` of ``class_process_group`` (this rank holds a
      slice of the classes), or None.
    compute_dtype: the dtype of the math (float32, or float64 for float64 logits).
  """
  chunk_elements: int | None
  split: _class_split.ClassSplit | None
  compute_dtype: torch.dtype


class CategoricalFocalFunction(torch.autograd.Function):
  """Per-row categorical focal loss of a rows view ``z3``, chunked analytic backward.

  It exists because autograd through the formula saves several ``(N, C)`` temporaries;
  this saves the logits and targets (inputs anyway) and recomputes chunk by chunk. With
  ``create_graph=True`` the backward is built from differentiable ops (double backward).
  ``alpha``/``gamma``: None, floats, 0-d tensors or class vectors shaped by
  ``_chunking.class_shape``.

  Under torch.compile (one chunk) the backward starts from inputs made to depend on its
  cotangent (:func:`_numerics.after`: the targets, or the logits' columns), so that the compiled step
  keeps only the inputs and, for rows longer than ``COLUMN_MAX_CLASSES``, two numbers per row
  (:func:`_row_stats`); shorter rows are computed column by column (:func:`_column_terms`).
  On the CPU, rows more than ``CPU_LONG_ROWS`` times as long as there are rows, and rows of
  at most ``UNROLLED_CLASSES``, take ``W`` from :func:`_row_sum_unfused`, so that the gradient
  is written into ``w``'s buffer.

  With ``options.split`` ``z3`` and ``y3`` hold this rank's slice of the classes
  (``alpha``/``gamma`` cut to the slice). Forward: the whole rows' log-sum-exp (a MAX and a
  SUM all-reduce), then each rank's per-row loss and ``w_sum`` (the sum of ``w_c`` over its
  classes) summed over the group in one more SUM all-reduce. Every rank returns the whole
  rows' losses; the backward writes ``s_j W - w_j`` for its own classes from the saved
  log-sum-exp and ``W``, with no communication (and no double backward).
  """

  @staticmethod
  def forward(ctx, z3, y3, valid, alpha, gamma, options):  # pylint: disable=W0221
    cdt, elements, split = options.compute_dtype, options.chunk_elements, options.split
    rows = _chunking.row_shape(z3.shape)
    lse = w_sum = stats = None
    if split is None and elements is None and z3.shape[1] <= COLUMN_MAX_CLASSES:
      loss, _ = _column_terms(z3, y3, alpha, gamma, cdt, None)
    elif split is None and elements is None:
      # torch.compile: the row statistics are kept for the backward (2/C of the logits).
      z = z3.to(cdt)
      stats = _row_stats(z)
      loss, _ = terms((z - stats[0]) - stats[1], y3, alpha, gamma, with_grad=False)
    elif split is None:
      loss = torch.empty(rows, dtype=cdt, device=z3.device)
      for idx in _chunking.chunks(z3.shape, elements):
        part, _ = terms(_log_softmax_chunk(z3[idx], cdt), y3[idx], alpha, gamma,
                        with_grad=False)
        loss[idx] = part
    else:
      loss = torch.empty(rows, dtype=cdt, device=z3.device)
      lse = _split_lse(z3, elements, split)
      w_sum = torch.empty(rows, dtype=cdt, device=z3.device)
      for idx in _chunking.chunks(z3.shape, elements):
        part, _, w = loss_and_w(z3[idx].to(cdt) - lse[idx], y3[idx], alpha, gamma,
                                with_grad=True)
        loss[idx] = part
        w_sum[idx] = w.sum(1, keepdim=True)
      loss, w_sum = split.row_sum(loss, w_sum)
    _numerics.save_hypers(ctx, (z3, y3, valid, lse, w_sum, stats), alpha, gamma)
    ctx.options = options
    return _mask(loss, valid)

  @staticmethod
  def backward(ctx, go):  # pylint: disable=W0221
    options = ctx.options
    if torch.is_grad_enabled() and options.split is not None:
      raise _class_split.no_double_backward(options.split.fn)
    (z3, y3, valid, lse, w_sum, stats), alpha, gamma = _numerics.saved_hypers(ctx)
    cdt = options.compute_dtype
    go_raw = go.to(cdt)
    go = _mask(go_raw, valid)
    if torch.is_grad_enabled():
      # create_graph=True: differentiable formulas, so that the gradient has a gradient.
      _, grad = terms(torch.log_softmax(z3.to(cdt), dim=1), y3, alpha, gamma, with_grad=True,
                      differentiable=True, with_loss=False)
      return _mask(grad * go, valid).to(z3.dtype), None, None, None, None, None
    if options.split is None and options.chunk_elements is None:
      # torch.compile: one chunk, from inputs made to depend on go (see _numerics.after).
      if stats is None:
        # Each column finished before the cat, so that the cat writes the gradient itself.
        _, cols = _column_terms(z3, y3, alpha, gamma, cdt, go)
        return (torch.cat([_mask(g * go, valid).to(z3.dtype) for g in cols], dim=1),
                None, None, None, None, None)
      # go enters through the targets, not the row statistics: log s then reads three
      # buffers (logits, m, log_total) and stays inside the fused row loop. Through the
      # statistics it also read go's parts (with where=, the mask and the mean's count), past
      # inductor's realize_reads_threshold (4), and was written whole: an (N, C) buffer, 2x
      # the logits. The raw go (masked rows are zeroed below whatever it holds): one read fewer.
      log_s = (z3.to(cdt) - stats[0]) - stats[1]
      y_go = _numerics.after(go_raw, y3)
      if _w_stored_whole(z3):
        _, s, w = loss_and_w(log_s, y_go, alpha, gamma, with_grad=True, with_loss=False)
        part = s * _row_sum_unfused(w) - w
      else:
        _, part = terms(log_s, y_go, alpha, gamma, with_grad=True, with_loss=False)
      return _mask(part * go, valid).to(z3.dtype), None, None, None, None, None
    out = torch.empty(z3.shape, dtype=z3.dtype, device=z3.device)
    for idx in _chunking.chunks(z3.shape, options.chunk_elements):
      dst = out[idx]
      # The chunk's math in the gradient's own memory where it can be (terms works in place
      # on log_s): one chunk-sized buffer fewer.
      own = dst.dtype == cdt and dst.is_contiguous()
      if lse is None:
        log_s = _log_softmax_chunk(z3[idx], cdt, dst if own else None)
      elif own:
        log_s = torch.sub(z3[idx], lse[idx], out=dst)
      else:
        log_s = z3[idx].to(cdt) - lse[idx]
      _, part = terms(log_s, y3[idx], alpha, gamma, with_grad=True, with_loss=False,
                      w_sum=None if w_sum is None else w_sum[idx])
      part.mul_(go[idx])
      if valid is not None:
        # Masked rows are exactly 0, whatever their logits (NaN * 0 is NaN).
        part.masked_fill_(~valid[idx], 0.0)
      if not own:
        dst.copy_(part)
    return out, None, None, None, None, None


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
  dim = _checks.axis(fn, dim, logits.ndim)
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
  _checks.same_device(fn, "targets", targets, logits)
  _checks.no_grad_needed(fn, "targets", targets)
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
  options = CategoricalOptions(chunk_elements=_chunking.chunk_elements(z3.numel()), split=split,
                               compute_dtype=cdt)
  if split is None:
    alpha, gamma = _numerics.traced(alpha, cdt, logits), _numerics.traced(gamma, cdt, logits)
  else:
    alpha, gamma = split.class_slice(alpha), split.class_slice(gamma)
  loss = CategoricalFocalFunction.apply(
      z3, y3, valid3, _chunking.class_vector(alpha, cdt, logits.device, z3.shape),
      _chunking.class_vector(gamma, cdt, logits.device, z3.shape), options)
  loss = _checks.apply_sample_weight(loss.reshape(row_shape), weight, where)
  positive = None
  if reduction == "mean_positive":
    top = targets.argmax(dim) if split is None else split.argmax(targets, dim)
    positive = top != background_class
    if where is not None:
      positive = positive & where
  return _reduce.reduce_loss(loss, reduction, valid=where, positive=positive,
                             process_group=process_group, out_dtype=logits.dtype)
