"""Fused linear + softmax focal loss: ``softmax_focal(hidden @ weight.T + bias, labels)``
without ever building the ``(N, V)`` logits.

Rows of ``hidden`` are processed in chunks. Each chunk's logits go to one ``(rows, V)``
float buffer; the per-row math is the softmax focal loss's (``_softmax.exp_others_`` and
``_softmax.row_terms``), and the chunk's logit gradient is formed in the same buffer
(``exp(z_c - lse_rest) = buffer_c / s_rest``: no second exponential), then multiplied into the
gradients of ``hidden``, ``weight`` and ``bias``.

Two schedules, chosen by measurement:

- reductions to a scalar (``"sum"``, ``"mean"``, ``"mean_positive"``): the gradients are
  computed in the forward pass (3 matrix products per chunk, as many as the materialized
  path) and the backward only scales them by the incoming scalar (none of this work is done
  when no input needs a gradient);
- ``"none"``: the backward gets one cotangent per row, so it recomputes each chunk's logits
  (4 matrix products in all).

At (4096 x 512) @ (512 x 32768), float32, one CPU thread, forward + backward: materialized
7.7-7.9 s, gradients-in-forward 6.3-7.0 s, recompute-in-backward 9.2-9.6 s.

Peak memory: one ``(rows, V)`` buffer, ``hidden``'s gradient and the ``weight``/``bias``
gradients. Half-precision inputs are multiplied and accumulated in float32 (as ``focal_jax``
does), which adds a float32 copy of the weight and float32 gradient accumulators.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from focal_torch import _checks
from focal_torch import _class_split
from focal_torch import _numerics
from focal_torch import _reduce
from focal_torch import _softmax

# --- engine (torch-specific: row chunks, one logits buffer per chunk, gradients formed in
# place; the per-row math is _softmax.row_terms, docs/math.md "Softmax") ---

# Elements of the per-chunk logits buffer when chunk_size is not given (16 MiB of float32).
# At (4096 x 512) @ (512 x 32768) that is 128 rows. Measured there on a 2-core CPU (one
# thread, forward + backward against the materialized path): 64-row chunks 1.05x its time,
# 128 rows 0.87-0.94x, 256 rows 0.9x (thin chunks make the weight-gradient product
# memory-bound); extra peak 0.21x the logits with 128 rows (0.24x with 256).
CHUNK_ELEMENTS = 1 << 22


def default_chunk_rows(n: int, v: int) -> int:
  """Rows per chunk for ``n`` rows and ``v`` classes."""
  return max(1, min(n, CHUNK_ELEMENTS // max(v, 1)))


def _rows(x: Any, r: slice) -> Any:
  """The rows ``r`` of a per-row tensor; numbers and 0-d tensors as they are."""
  return x[r] if isinstance(x, torch.Tensor) and x.ndim == 2 else x


class _Chunker:
  """Computes one chunk's logits into the float buffer (its logit gradient is then formed in
  place). Half-precision inputs are multiplied in float32, like ``focal_jax`` (its matmuls
  use ``preferred_element_type=float32``): one float32 copy of the weight per pass."""

  def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               rows: int, cdt: torch.dtype) -> None:
    self.cdt = cdt
    self.hidden = hidden
    self.weight = weight.to(self.cdt)
    self.bias = None if bias is None else bias.to(self.cdt)
    self.buf = torch.empty(rows * weight.shape[0], dtype=self.cdt, device=hidden.device)

  def logits(self, r: slice) -> torch.Tensor:
    """``hidden[r] @ weight.T + bias`` in the compute dtype, a view of the buffer."""
    h = self.hidden[r].to(self.cdt)
    out = self.buf[:h.shape[0] * self.weight.shape[0]].view(h.shape[0], self.weight.shape[0])
    if self.bias is None:
      return torch.mm(h, self.weight.t(), out=out)
    return torch.addmm(self.bias, h, self.weight.t(), out=out)


def _chunk_terms(z: torch.Tensor, t: torch.Tensor, eps: float, num_classes: int, alpha: Any,
                 gamma: Any, valid: torch.Tensor, in_range: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                            torch.Tensor]:
  """Loss and gradient scalars of a chunk of logits ``z``, which is overwritten with
  ``exp(z - m)`` (0 at the target). Returns ``(loss, s_rest, a, b_over_c, grad_t)``."""
  zt = z.gather(1, t)
  sum_z = z.sum(1, keepdim=True) if eps else None
  m, s_rest = _softmax.exp_others_(z, t)
  loss, a, b_over_c, grad_t = _softmax.row_terms(zt, _softmax.lse_from(m, s_rest), sum_z,
                                                 num_classes, alpha, gamma, eps, valid,
                                                 in_range)
  return loss, s_rest, a, b_over_c, grad_t


def _grad_in_place(e: torch.Tensor, t: torch.Tensor, s_rest: torch.Tensor, a: torch.Tensor,
                   b_over_c: torch.Tensor | None, grad_t: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
  """Turns ``e = exp(z - m)`` (0 at the target) into dL/dz: ``a e / s_rest - b_over_c`` off
  the target, ``grad_t`` at it; rows not ``valid`` exactly 0 (whatever their logits)."""
  # s_rest >= 1 unless no other class is finite; then a = 0 and the clamp keeps 0 / 0 out.
  scale = a / s_rest.clamp_min(torch.finfo(s_rest.dtype).tiny)
  if valid is not None:
    scale = torch.where(valid, scale, torch.zeros((), dtype=scale.dtype, device=scale.device))
    fix = _softmax.masked_rows(valid, s_rest)
    if fix is not None:
      e.masked_fill_(fix, 0.0)
  e.mul_(scale)
  if b_over_c is not None:
    e.sub_(b_over_c)
  return e.scatter_(1, t, grad_t)


class _Grads:
  """Accumulates the gradients of hidden, weight and bias from chunks of dL/dlogits, in the
  compute dtype (float32 for half inputs: many chunks would each round)."""

  def __init__(self, chunker: _Chunker, bias: torch.Tensor | None,
               needs: tuple[bool, bool, bool]) -> None:
    self.chunker = chunker
    hidden, weight = chunker.hidden, chunker.weight
    self.dh = (torch.empty(hidden.shape, dtype=chunker.cdt, device=hidden.device)
               if needs[0] else None)
    self.dw = (torch.zeros(weight.shape, dtype=chunker.cdt, device=weight.device)
               if needs[1] else None)
    self.db = (torch.zeros(weight.shape[0], dtype=chunker.cdt, device=weight.device)
               if bias is not None and needs[2] else None)

  def add(self, r: slice, dz: torch.Tensor, valid: torch.Tensor) -> None:
    if self.dh is not None:
      torch.mm(dz, self.chunker.weight, out=self.dh[r])
    if self.dw is not None:
      # Masked rows' features left out (their dz is 0, but 0 * NaN features would be NaN).
      h = torch.where(valid, self.chunker.hidden[r], 0).to(self.dw.dtype)
      self.dw.addmm_(dz.t(), h)
    if self.db is not None:
      self.db.add_(dz.sum(0))

  def tensors(self) -> tuple[torch.Tensor | None, ...]:
    return self.dh, self.dw, self.db


def _keep_graph() -> bool:
  """Whether the running backward keeps the graph (``retain_graph=True``): then the saved
  gradients are read again and must not be scaled in place. True when unknown."""
  if torch.compiler.is_compiling():
    return True
  try:
    return bool(torch._C._autograd._get_current_graph_task_keep_graph())  # pylint: disable=protected-access
  except (AttributeError, RuntimeError):
    return True


def _finish(grads: tuple[torch.Tensor | None, ...], dtypes: tuple[torch.dtype | None, ...],
            scale: torch.Tensor | None = None, in_place: bool = False
            ) -> tuple[torch.Tensor | None, ...]:
  """The gradients, scaled by the incoming scalar (in place only when the saved gradients
  are never read again), in their parameters' dtypes."""
  out = []
  for grad, dtype in zip(grads, dtypes):
    if grad is not None and scale is not None:
      factor = scale.to(grad.dtype)
      grad = grad.mul_(factor) if in_place else grad * factor
    out.append(None if grad is None else grad.to(dtype))
  return tuple(out)


def _split_chunk_terms(z: torch.Tensor, t: torch.Tensor, owned: torch.Tensor, eps: float,
                       split: Any, alpha: Any, gamma: Any, valid: torch.Tensor,
                       in_range: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
  """:func:`_chunk_terms` when ``z`` holds this rank's slice of the classes (``t`` labels
  local to it, ``owned`` the rows whose target it holds): the per-row statistics are
  all-reduced over the class group (one MAX, one SUM). ``z`` is overwritten with
  ``exp(z - m)`` (0 at owned targets), ``m`` this rank's largest non-target logit. Returns
  ``(loss, m, lse_rest, a, b_over_c, grad_t)``."""
  zero = torch.zeros((), dtype=z.dtype, device=z.device)
  zt = torch.where(owned, z.gather(1, t), zero)
  sum_z = z.sum(1, keepdim=True) if eps else None
  m, s_rest = _softmax.exp_others_(z, t, owned)
  zt, lse_rest, sum_z = _softmax.combine_split(m, s_rest, zt, sum_z, split)
  loss, a, b_over_c, grad_t = _softmax.row_terms(zt, lse_rest, sum_z, split.num_classes, alpha,
                                                 gamma, eps, valid, in_range)
  return loss, m, lse_rest, a, b_over_c, grad_t


def _split_grad_in_place(e: torch.Tensor, t: torch.Tensor, owned: torch.Tensor,
                         m: torch.Tensor, lse_rest: torch.Tensor, a: torch.Tensor,
                         b_over_c: torch.Tensor | None, grad_t: torch.Tensor,
                         valid: torch.Tensor) -> torch.Tensor:
  """:func:`_grad_in_place` for a slice of the classes: ``e = exp(z - m)`` becomes
  ``a exp(z - lse_rest) - b_over_c`` (``exp(m - lse_rest) <= 1`` per row), ``grad_t`` at the
  owned targets; rows not ``valid`` exactly 0."""
  zero = torch.zeros((), dtype=a.dtype, device=a.device)
  scale = torch.where(valid, a * torch.exp(m - lse_rest), zero)
  fix = _softmax.masked_rows(valid, lse_rest)
  if fix is not None:
    e.masked_fill_(fix, 0.0)
  e.mul_(scale)
  if b_over_c is not None:
    e.sub_(b_over_c)
  return e.scatter_(1, t, torch.where(owned, grad_t, e.gather(1, t)))


def _double_backward(ctx, go: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, t: torch.Tensor, valid: torch.Tensor,
                     in_range: torch.Tensor | None, sw: torch.Tensor | None, alpha: Any,
                     gamma: Any) -> tuple[torch.Tensor | None, ...]:
  """The gradients from differentiable whole-tensor ops (``create_graph=True``): they
  materialize the ``(N, V)`` logits, and have gradients themselves (double backward)."""
  cdt = ctx.options.compute_dtype
  h, w = hidden.to(cdt), weight.to(cdt)
  z = h @ w.t()
  if bias is not None:
    z = z + bias.to(cdt)
  go = go.to(cdt)
  if sw is not None:
    go = go * sw
  dz = _softmax.grad_autodiff(z, t, valid, in_range, alpha, gamma, ctx.options.label_smoothing,
                              go)
  needs = ctx.needs_input_grad
  h_valid = torch.where(valid, h, 0)  # masked rows' features out of the weight gradient
  grads = (dz @ w if needs[0] else None, dz.t() @ h_valid if needs[1] else None,
           dz.sum(0) if bias is not None and needs[2] else None)
  return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))


# --- the autograd.Function and the loss ---


@dataclasses.dataclass(frozen=True)
class LinearOptions:
  """The checked settings of one fused linear softmax focal loss call that are not tensors,
  passed whole to :class:`LinearSoftmaxFocalFunction` (frozen and hashable).

  Attributes:
    label_smoothing: ``eps`` in ``[0, 1]``.
    reduction: ``"none"`` (per-row losses, gradients recomputed in the backward) or a
      reduction to a scalar (the Function returns the sum; gradients formed in the forward).
    chunk_size: rows per chunk (at least 1).
    split: the ``_class_split.ClassSplit`` of ``class_process_group`` (this rank holds a
      slice of the weight's rows), or None.
    compute_dtype: the dtype of the products and the math (float32, or float64 for float64
      inputs).
  """
  label_smoothing: float
  reduction: str
  chunk_size: int
  split: _class_split.ClassSplit | None
  compute_dtype: torch.dtype


class LinearSoftmaxFocalFunction(torch.autograd.Function):
  """Per-row losses (``reduction="none"``) or their sum (any other reduction) of
  ``softmax_focal(hidden @ weight.T + bias)``, chunk by chunk; see the module docstring.

  With ``options.split`` ``weight``/``bias`` hold this rank's rows of the ``(V, H)`` weight
  (``t``: global labels). Each chunk's per-row statistics are all-reduced over the class
  group in the forward (a MAX and a SUM per chunk); every rank returns the whole loss. The
  gradients of this rank's ``weight`` and ``bias`` rows are its own; the gradient of
  ``hidden`` is this rank's contribution (the sum over its classes), which the caller sums
  over the class group. No communication in the backward, and no double backward.
  """

  @staticmethod
  def forward(ctx, hidden, weight, bias, t, valid, in_range,  # pylint: disable=W0221
              alpha, gamma, sw, options):
    eps, rows, split = options.label_smoothing, options.chunk_size, options.split
    summed = options.reduction != "none"
    n = hidden.shape[0]
    owned = None
    if split is not None:
      t, owned = split.localize(t)
    chunker = _Chunker(hidden, weight, bias, rows, options.compute_dtype)
    loss = torch.empty((n, 1), dtype=chunker.cdt, device=hidden.device)
    needs = tuple(ctx.needs_input_grad[:3])
    grads = _Grads(chunker, bias, needs) if summed and any(needs) else None
    # Per row: a, b_over_c, grad_t (and lse_rest with the split) for the backward to recompute.
    per_row = None if summed else [
        torch.empty((n, 1), dtype=chunker.cdt, device=hidden.device)
        for _ in range(3 if split is None else 4)]
    with_b = bool(eps)
    for start in range(0, n, rows):
      r = slice(start, min(n, start + rows))
      z = chunker.logits(r)
      in_range_r = None if in_range is None else in_range[r]
      if split is None:
        lr, s_rest, a, b_over_c, grad_t = _chunk_terms(
            z, t[r], eps, weight.shape[0], _rows(alpha, r), _rows(gamma, r), valid[r],
            in_range_r)
      else:
        lr, m, lse_rest, a, b_over_c, grad_t = _split_chunk_terms(
            z, t[r], owned[r], eps, split, _rows(alpha, r), _rows(gamma, r), valid[r],
            in_range_r)
      if sw is not None:  # per-row weights scale the loss and its gradient
        wr = sw[r]
        lr, a, grad_t = lr * wr, a * wr, grad_t * wr
        b_over_c = None if b_over_c is None else b_over_c * wr
      loss[r] = lr
      if grads is not None:
        if split is None:
          dz = _grad_in_place(z, t[r], s_rest, a, b_over_c, grad_t, valid[r])
        else:
          dz = _split_grad_in_place(z, t[r], owned[r], m, lse_rest, a, b_over_c, grad_t,
                                    valid[r])
        grads.add(r, dz, valid[r])
      elif per_row is not None:
        per_row[0][r], per_row[2][r] = a, grad_t
        if with_b:
          per_row[1][r] = b_over_c
        if split is not None:
          per_row[3][r] = lse_rest
    ctx.options = options
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    # The inputs (no copies) for the double backward (no split) or the recompute ("none"),
    # then the schedule's own tensors.
    inputs = (hidden, weight, bias) if split is None or not summed else (None,) * 3
    core = (*inputs, t, owned, valid, in_range, sw)
    if summed:
      # The gradients for a unit cotangent; backward scales them by the incoming scalar.
      tail = grads.tensors() if grads is not None else (None,) * 3
      _numerics.save_hypers(ctx, core + tuple(tail), alpha, gamma)
      return loss.sum()
    if not with_b:
      per_row[1] = None
    _numerics.save_hypers(ctx, core + tuple(per_row), alpha, gamma)
    return loss

  @staticmethod
  def backward(ctx, go):  # pylint: disable=W0221
    nones = (None,) * 7
    options = ctx.options
    split = options.split
    if torch.is_grad_enabled() and split is not None:
      raise _class_split.no_double_backward(split.fn)
    saved, alpha, gamma = _numerics.saved_hypers(ctx)
    hidden, weight, bias, t, owned, valid, in_range, sw = saved[:8]
    tail = saved[8:]
    if torch.is_grad_enabled():
      # create_graph=True: differentiable formulas, so that the gradients have gradients.
      return _double_backward(ctx, go, hidden, weight, bias, t, valid, in_range, sw, alpha,
                              gamma) + nones
    if options.reduction != "none":
      # In place only when this backward is the last (retain_graph=False): a second
      # backward reads the saved gradients again.
      return _finish(tail, ctx.dtypes, scale=go, in_place=not _keep_graph()) + nones
    a, b_over_c, grad_t = tail[:3]
    go = go.to(a.dtype)
    n = hidden.shape[0]
    rows = options.chunk_size
    chunker = _Chunker(hidden, weight, bias, rows, options.compute_dtype)
    grads = _Grads(chunker, bias, tuple(ctx.needs_input_grad[:3]))
    for start in range(0, n, rows):
      r = slice(start, min(n, start + rows))
      z = chunker.logits(r)
      b_r = None if b_over_c is None else b_over_c[r] * go[r]
      if split is None:
        _, s_rest = _softmax.exp_others_(z, t[r])
        dz = _grad_in_place(z, t[r], s_rest, a[r] * go[r], b_r, grad_t[r] * go[r], valid[r])
      else:
        lse_rest = tail[3]
        _softmax.chunk_grad(z, t[r], lse_rest[r], a[r] * go[r], b_r, grad_t[r] * go[r], z, None,
                            _softmax.masked_rows(valid[r], lse_rest[r]), owned[r])
        dz = z
      grads.add(r, dz, valid[r])
    return _finish(grads.tensors(), ctx.dtypes) + nones


def linear_softmax_focal(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    alpha: float | torch.Tensor | None = None,
    gamma: float | torch.Tensor = 2.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    where: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    background_class: int = 0,
    process_group: Any = None,
    sample_weight: Any = None,
    class_process_group: Any = None,
) -> torch.Tensor:
  r"""Softmax focal loss of a linear layer's output, without materializing the logits.

  Equals ``softmax_focal(hidden @ weight.T + bias, labels, dim=-1, ...)`` in value and in
  the gradients with respect to ``hidden``, ``weight`` and ``bias``, but processes rows in
  chunks: no ``(N, V)`` tensor is ever built, so the extra memory is one ``(chunk, V)``
  buffer plus the gradients themselves (for masked-LM and LLM heads the logits are the
  largest tensor in the step). ``weight`` has ``nn.Linear``'s ``(V, H)`` layout.

  Args:
    hidden: floating-point features ``(..., H)``.
    weight: ``(V, H)``, the same dtype and device as ``hidden``.
    labels: integer classes in ``[0, V)`` (or ``ignore_index``), shape ``hidden.shape[:-1]``.
    bias: None or ``(V,)``.
    chunk_size: rows per chunk; None picks one that keeps each chunk's buffer near 16 MiB
      of float32 (``2**22 // V`` rows, at least one).
    alpha: as in :func:`focal_torch.softmax_focal`, with ``(V,)`` vectors.
    gamma: as in :func:`focal_torch.softmax_focal`, with ``(V,)`` vectors.
    label_smoothing: as in :func:`focal_torch.softmax_focal`.
    reduction: as in :func:`focal_torch.softmax_focal`.
    where: as in :func:`focal_torch.softmax_focal` (one per row).
    ignore_index: as in :func:`focal_torch.softmax_focal`.
    background_class: as in :func:`focal_torch.softmax_focal`.
    process_group: as in :func:`focal_torch.softmax_focal`.
    sample_weight: one weight per row, of ``labels``' shape or broadcastable to it.
    class_process_group: None, ``"world"`` (resolved at each call) or the
      ``torch.distributed`` group over which the vocabulary is split (as Megatron's
      column-parallel output layer): rank ``r`` of the ``k`` ranks holds the rows
      ``[r V/k, (r + 1) V/k)`` of the ``(V, H)`` weight (and those entries of the bias),
      so ``weight`` is ``(V/k, H)``; ``hidden`` and ``labels`` (global ids) are the same on
      every rank, ``alpha``/``gamma`` vectors the global ``(V,)`` ones. Each chunk's
      per-row statistics are all-reduced (a MAX and a SUM of ``(chunk,)``-sized tensors);
      every rank returns the whole loss. ``weight.grad`` and ``bias.grad`` are the
      gradients of the rank's own rows. **The gradient of** ``hidden`` **is this rank's
      contribution only** (the sum over its ``V/k`` classes): the caller sums it over the
      class group, ``torch.distributed.all_reduce(hidden.grad, group=class_process_group)``
      for a leaf ``hidden``, or, when ``hidden`` comes from layers replicated over the class
      group, a hook on the tensor passed here that returns the all-reduced gradient (what
      Megatron's ``copy_to_tensor_model_parallel_region`` does in its backward).
      Combines with ``process_group`` (the data group, DDP over it).
      ``create_graph=True`` is not supported with it.

  ``create_graph=True`` works without ``class_process_group`` (the backward of the
  backward materializes the logits).

  Returns:
    Per-row losses of ``labels``' shape for ``reduction="none"``, else a scalar; in
    ``hidden``'s dtype.

  Raises:
    TypeError: non-tensor or integer ``hidden``/``weight``; ``weight``/``bias`` of another
      dtype than ``hidden``; the same argument errors as ``softmax_focal``.
    ValueError: ``weight`` not ``(V, H)`` with ``H = hidden.shape[-1]``; ``bias`` not
      ``(V,)``; ``chunk_size < 1``; ``labels``/``where`` not of shape ``hidden.shape[:-1]``;
      the hyperparameter errors of ``softmax_focal``; with ``class_process_group``,
      ``(V,)`` ``alpha``/``gamma`` whose length the group size does not divide, or ranks
      holding different numbers of rows of the weight.
    RuntimeError: ``create_graph=True`` with ``class_process_group``.

  Shape:
    - hidden: ``(N, H)`` or ``(*, H)``; weight: ``(V, H)``; bias: ``(V,)``.
    - labels, where: ``(N,)`` or ``(*)``.
    - output: scalar, or ``(*)`` for ``reduction="none"``.

  Examples:
    >>> head = torch.nn.Linear(64, 1000)
    >>> hidden, labels = torch.randn(8, 64), torch.randint(0, 1000, (8,))
    >>> loss = focal_torch.linear_softmax_focal(hidden, head.weight, labels, bias=head.bias)
    >>> loss.shape
    torch.Size([])
  """
  fn = "linear_softmax_focal"
  _checks.floating_array(fn, "hidden", hidden)
  _checks.floating_array(fn, "weight", weight)
  h = hidden.shape[-1]
  if weight.ndim != 2 or weight.shape[1] != h:
    raise ValueError(
        f"{fn}: weight must have shape (V, {h}) (nn.Linear's layout, H = hidden.shape[-1] = "
        f"{h}), got {_checks.shape_str(weight.shape)}")
  if weight.dtype != hidden.dtype:
    raise TypeError(f"{fn}: weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
  _checks.same_device(fn, "weight", weight, hidden)
  v = weight.shape[0]
  if v == 0:
    # No shape in the message: the weight is (V, H) here and focal_jax's kernel (H, V).
    raise ValueError(f"{fn}: weight must have at least one class, got V = 0")
  if bias is not None:
    if not isinstance(bias, torch.Tensor):
      raise TypeError(f"{fn}: bias must be None or a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (v,):
      raise ValueError(f"{fn}: bias must have shape ({v},) (V = weight.shape[0]), got "
                       f"{_checks.shape_str(bias.shape)}")
    if bias.dtype != hidden.dtype:
      raise TypeError(f"{fn}: bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    _checks.same_device(fn, "bias", bias, hidden)
  if chunk_size is not None:
    chunk_size = _checks.optional_int(fn, "chunk_size", chunk_size, allow_none=True)
    if chunk_size < 1:
      raise ValueError(f"{fn}: chunk_size must be None or >= 1, got {chunk_size}")
  expected = hidden.shape[:-1]
  pre = _softmax.prepare_labels(
      fn, labels, v, expected, hidden,
      lambda: f"the shape of hidden {_checks.shape_str(hidden.shape)} without its last axis",
      alpha=alpha, gamma=gamma, label_smoothing=label_smoothing, reduction=reduction,
      where=where, ignore_index=ignore_index, background_class=background_class,
      process_group=process_group, sample_weight=sample_weight,
      class_process_group=class_process_group)
  alpha, gamma, eps, reduction, process_group, split = (
      pre.alpha, pre.gamma, pre.eps, pre.reduction, pre.process_group, pre.split)
  cdt, weights, valid, in_range, positive = (
      pre.cdt, pre.weight, pre.valid, pre.in_range, pre.positive)

  h2 = hidden.reshape(-1, h)
  n = h2.shape[0]
  t = pre.t.reshape(n, 1)
  valid2 = valid.reshape(n, 1)
  sw = None
  if weights is not None:  # per-row weights, 0 on masked rows
    sw = torch.as_tensor(weights, dtype=cdt, device=hidden.device).expand(expected)
    sw = torch.where(valid2, sw.reshape(n, 1), torch.zeros((), dtype=cdt,
                                                           device=hidden.device))
  options = LinearOptions(label_smoothing=eps, reduction=reduction,
                          chunk_size=max(1, chunk_size or default_chunk_rows(n, v)), split=split,
                          compute_dtype=cdt)
  out = LinearSoftmaxFocalFunction.apply(
      h2, weight, bias, t, valid2, None if in_range is None else in_range.reshape(n, 1),
      _numerics.per_row(alpha, t, cdt), _numerics.per_row(gamma, t, cdt), sw, options)
  summed = reduction != "none"
  if not summed:
    return out.reshape(labels.shape).to(hidden.dtype)
  return _reduce.finish(out, reduction, count=n, valid=valid, positive=positive,
                        process_group=process_group, out_dtype=hidden.dtype)
