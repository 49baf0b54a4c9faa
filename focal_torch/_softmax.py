"""Softmax focal loss per row, and its analytic backward (an autograd.Function).

Everything is written around three per-row numbers: the target logit ``z_t``, the
log-sum-exp of the *other* classes ``lse_rest = log sum_{c != t} exp(z_c)`` and (with label
smoothing) the row sum of the logits. With the margin ``u = z_t - lse_rest``,
``log p = -softplus(-u)`` and ``log q = log(1 - p) = -softplus(u)`` (exact even where ``p``
rounds to 1), so the loss, its gradient and (through autograd of these formulas) its Hessian
stay finite and accurate at any margin. The gradient is, for ``c != t`` and at ``t``,

    dL/dz_c = a * exp(z_c - lse_rest) - b_over_c,        dL/dz_t = grad_t,

with per-row scalars ``a``, ``b_over_c = b / C`` and ``grad_t = b (1 - 1/C) - a``.
``exp(z_c - lse_rest) = s_c / q <= 1``: the ``q^(gamma - 1)`` that makes the naive gradient
NaN for ``0 < gamma < 1`` never appears. Backward needs the logits and these scalars only.

The derivation and the names (``u``, ``lse_rest``, ``log_p``, ``log_q``, ``ce``, ``focal``,
``h``, ``a``, ``b_over_c``, ``grad_t``, ``valid``, ``in_range``, ``m``, ``s_rest``, ``z_t``)
are docs/math.md's ("Softmax", "Names"); ``focal_jax._softmax`` uses the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint

from focal_torch import _checks
from focal_torch import _chunking
from focal_torch import _class_split
from focal_torch import _numerics
from focal_torch import _reduce
from focal_torch._numerics import compute_dtype
from focal_torch._numerics import exp_
from focal_torch._numerics import softplus


def exp_nonpositive(y: torch.Tensor) -> torch.Tensor:
  """``exp(y)`` for ``y <= 0`` (or -inf, or NaN) as ``sigmoid(y) / sigmoid(-y)``, to a few ulp.

  On the CPU ``torch.exp`` (also ``log``, ``log1p``) opens a parallel region from 2048
  elements on, so every per-row exponential of a batch would wait on a loaded machine for a
  descheduled thread, as each logits-sized operator does (BENCHMARKS.md, "torch eager softmax:
  short rows, and (16384, 91) under load"); ``sigmoid`` and division stay serial below 32768
  elements. ``sigmoid(-y)`` lies in [1/2, 1]: no cancellation, no overflow; differentiable.
  """
  return torch.sigmoid(y) / torch.sigmoid(-y)


def log_serial(x: torch.Tensor) -> torch.Tensor:
  """``log(x)`` as ``xlogy(1, x)`` (exactly ``log``; serial at per-row sizes, see
  :func:`exp_nonpositive`)."""
  return torch.special.xlogy(1.0, x)


def row_terms(zt: torch.Tensor, lse_rest: torch.Tensor, sum_z: torch.Tensor | None,
              num_classes: int, alpha: Any, gamma: Any, eps: float,
              valid: torch.Tensor, in_range: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
  """Per-row loss and gradient scalars ``(loss, a, b_over_c, grad_t)`` (docs/math.md,
  "Softmax"); ``b_over_c`` is None without label smoothing.

  Differentiable torch ops only: the same code serves the forward pass and, under autograd,
  the double backward. Rows not ``valid`` give 0; valid rows not ``in_range`` (a label out
  of range with the value checks off) give NaN; ``in_range`` None: every label is in range.
  """
  u = zt - lse_rest
  log_p = -softplus(-u)
  # log(1 - p) from the other classes' log-sum-exp: finite and exact where p rounds to 1.
  log_q = (-softplus(u)).clamp_min(torch.finfo(u.dtype).min)
  # sigmoid(u) = exp(log p) and sigmoid(-u) = exp(log q), each to a few ulp; serial at
  # per-row sizes on the CPU (see exp_nonpositive).
  p = torch.sigmoid(u)
  q = torch.sigmoid(-u)
  if eps:
    # Label smoothing acts on the cross-entropy only: eps * (lse - mean_c z_c). The
    # log-sum-exp from the larger of z_t and lse_rest: no inf - inf when z_t = -inf.
    lse = torch.where(u < 0, lse_rest + softplus(u), zt + softplus(-u))
    ce = (1.0 - eps) * (-log_p) + eps * (lse - sum_z / num_classes)
    del lse
  else:
    ce = -log_p
  zero = torch.zeros((), dtype=u.dtype, device=u.device)
  nan = torch.full((), float("nan"), dtype=u.dtype, device=u.device)
  # The `del`s free per-row temporaries as soon as they are dead (the chunked paths hold
  # a dozen of them per chunk otherwise); under autograd they change nothing.
  del u, log_p
  if isinstance(gamma, float) and gamma == 0.0:
    focal = torch.ones_like(q)
    h = q
  else:
    # (1 - p)^gamma in log space: 0^0 = 1 and no inf * 0 in the derivative.
    focal = exp_nonpositive(gamma * log_q)
    # p * CE -> 0 as p -> 0 (a target logit of -inf: CE = inf, p = 0).
    pce = p * ce
    h = q + gamma * torch.where(p > 0, pce, zero)
    del pce
  del log_q, p, q
  alpha_focal = focal if alpha is None else alpha * focal
  del focal
  loss = alpha_focal * ce
  del ce
  a = alpha_focal * h
  b_over_c = alpha_focal * (eps / num_classes) if eps else None
  grad_t = alpha_focal * (eps * (1.0 - 1.0 / num_classes) - h) if eps else -a
  del alpha_focal, h

  def mask(x):
    # Masked rows: 0. Counted rows with a label out of range: NaN (never a wrapped index).
    x = x if in_range is None else torch.where(in_range, x, nan)
    return torch.where(valid, x, zero)

  loss = mask(loss)
  a = mask(a)
  b_over_c = None if b_over_c is None else mask(b_over_c)
  return loss, a, b_over_c, mask(grad_t)


def row_stats_autodiff(zf: torch.Tensor, t3: torch.Tensor, with_sum: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                  torch.Tensor]:
  """:func:`row_stats` from differentiable whole-tensor ops (for double backward); also
  returns the logits with the target masked to -inf."""
  zt = zf.gather(1, t3)
  # A select against the class index, not a scatter: elementwise, so it fuses when compiled.
  classes = torch.arange(zf.shape[1], device=zf.device).view(_chunking.class_shape(zf.shape))
  masked = torch.where(classes == t3, float("-inf"), zf)
  lse_rest = torch.logsumexp(masked, 1, keepdim=True).clamp_min(torch.finfo(zf.dtype).min)
  sum_z = zf.sum(1, keepdim=True) if with_sum else None
  return zt, lse_rest, sum_z, masked


def grad_autodiff(z3: torch.Tensor, t3: torch.Tensor, valid: torch.Tensor,
                  in_range: torch.Tensor | None, alpha: Any, gamma: Any, eps: float,
                  go: torch.Tensor) -> torch.Tensor:
  """The gradient from differentiable whole-tensor ops: the backward of the backward."""
  zf = z3.to(compute_dtype(z3.dtype))
  zt, lse_rest, sum_z, masked = row_stats_autodiff(zf, t3, bool(eps))
  _, a, b_over_c, grad_t = row_terms(zt, lse_rest, sum_z, z3.shape[1], alpha, gamma, eps,
                                     valid, in_range)
  # exp(masked - lse_rest) is 0 at the target (masked to -inf) and <= 1 elsewhere.
  grad = (a * go) * torch.exp(masked - lse_rest)
  if b_over_c is not None:
    grad = grad - b_over_c * go
  grad = grad.scatter(1, t3, grad_t * go)
  grad = torch.where(valid, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
  return grad.to(z3.dtype)


# --- engine (torch-specific: chunking, exp2, fused ATen kernels, in-place buffers) ---


def exp_others_(e: torch.Tensor, t: torch.Tensor, owned: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
  """Overwrites a scratch chunk ``e`` (compute dtype) with ``exp(e - m)``, 0 at the target,
  and returns the per-row ``(m, s_rest)``: ``m`` the largest other logit (at least the
  lowest finite number) and ``s_rest`` the row sums, so that ``lse_rest = m + log s_rest``
  and ``exp(e_c - lse_rest) = e_c / s_rest``. ``s_rest >= 1`` unless no other class is
  finite (then 0). ``owned`` (classes split over ranks): the rows whose target this slice
  holds; the other rows have no target here and keep every entry."""
  if owned is None:
    e.scatter_(1, t, float("-inf"))
  else:
    e.scatter_(1, t, torch.where(owned, float("-inf"), e.gather(1, t)))
  m = e.amax(1, keepdim=True).clamp_min_(torch.finfo(e.dtype).min)
  exp_(e.sub_(m))
  return m, e.sum(1, keepdim=True)


def lse_from(m: torch.Tensor, s_rest: torch.Tensor) -> torch.Tensor:
  """``lse_rest = m + log s_rest``, the log-sum-exp of the other classes, kept finite (no
  other class: the lowest finite number, so that no inf - inf occurs later)."""
  return (m + s_rest.log()).clamp_min_(torch.finfo(m.dtype).min)


def chunk_lse_others(w: torch.Tensor, t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
  """``log sum_{c != t} exp(w_c)`` per row of a chunk (2-D or 3-D), in ``buf``'s dtype.

  The target is left out, so that ``log(1 - p)`` comes out exact where ``p`` rounds to 1.
  (The short-row path's, for rows whose length suits ``amax``: 3-D, or C a multiple of 16.)
  """
  e = buf[:w.numel()].view(w.shape)
  e.copy_(w)
  return lse_from(*exp_others_(e, t))


def fewer_chunks(z3: torch.Tensor, elements: int) -> int:
  """Elements per chunk for the long-row path: ``elements`` rounded up so that the logits
  split into whole chunks with no short tail (at most 2x ``elements`` each). Each operator
  over a chunk is one parallel region, and on a loaded machine each region waits for a
  descheduled thread (BENCHMARKS.md, "torch eager softmax: short rows, and (16384, 91) under
  load"). Half-precision logits keep ``elements``: their backward needs a float32 chunk.
  None (one chunk) stays None."""
  if elements is None or z3.dtype != compute_dtype(z3.dtype):
    return elements
  return -(-z3.numel() // max(1, z3.numel() // elements))


def fused_lse_others(w: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
  """:func:`chunk_lse_others` in three parallel operators: a masked copy into the scratch
  chunk ``e`` (compute dtype, ``w``'s shape), one fused log-softmax over it, one max.

  The log-softmax leaves ``e_c - lse_rest`` in ``e`` (``-inf`` at the target); at the row's
  largest other logit ``j`` it is ``-log s_rest`` (``s_rest = sum_{c != t} exp(e_c - e_j)``),
  so ``lse_rest = z_j - e[j] = m + log s_rest``, :func:`lse_from`'s value.
  """
  lowest = torch.finfo(e.dtype).min
  if w.shape[1] == 1:  # no other class (a softmax over nothing is NaN)
    return torch.full(_chunking.row_shape(w.shape), lowest, dtype=e.dtype, device=e.device)
  # -inf logits as the lowest finite number: a row with no finite other class then has a
  # finite maximum, and lse_rest comes out as that number, not NaN (exp(-inf - -inf)).
  if w.dtype == e.dtype:
    torch.clamp(w, min=lowest, out=e)
  else:
    e.copy_(w).clamp_min_(lowest)
  e.scatter_(1, t, float("-inf"))
  torch.ops.aten._log_softmax.out(e, 1, False, out=e)
  # The largest entry, not any one: z_j - e[j] is exact to a rounding only where e[j] is
  # small (e[j] = -log s_rest, at most log C in size).
  top, j = torch.max(e, 1, keepdim=True)
  return w.gather(1, j).to(e.dtype).clamp_min_(lowest) - top


def softmax_lse_others(w: torch.Tensor, t: torch.Tensor, zt: torch.Tensor, e: torch.Tensor
                       ) -> torch.Tensor:
  """:func:`fused_lse_others` of a 2-D chunk on the CPU in two parallel operators: one fused
  softmax of the whole rows into the scratch chunk ``e`` and one row sum of it with the
  target zeroed, the non-target mass ``q`` (``zt``: the target logits, compute dtype).

  ``p`` (the softmax at the target) and ``q`` each hold full relative precision, so their
  logs do, and the margin ``u = log p - log q`` comes to within a rounding of its size:
  ``lse_rest = z_t - u``. Rows where ``p`` or ``q`` is below ``C`` times the smallest normal
  number (their underflowed terms could weigh more than a rounding: a margin beyond about 80
  in float32), or not finite, are recomputed by :func:`fused_lse_others`, alone: small
  operators, but ATen's log-softmax and max split even a few rows over the threads, so on a
  loaded machine those two still wait like logits-sized ones (a looser test that sent the 5
  rows of p < 2^-20 at the bench's (16384, 91) there cost about as much as the rest).
  """
  if w.dtype == e.dtype:
    torch.ops.aten._softmax.out(w, 1, False, out=e)
  else:
    torch.ops.aten._softmax.out(e.copy_(w), 1, False, out=e)
  p = e.gather(1, t)
  e.scatter_(1, t, 0.0)
  q = e.sum(1, keepdim=True)
  lse_rest = zt - (log_serial(p) - log_serial(q))
  # NaN fails the test: such rows take the exact path too.
  ok = torch.minimum(p, q) >= w.shape[1] * torch.finfo(e.dtype).tiny
  if not bool(ok.all()):
    rows = (~ok).view(-1).nonzero().view(-1)
    w_bad = w.index_select(0, rows)
    lse_rest[rows] = fused_lse_others(w_bad, t.index_select(0, rows),
                                      e[:w_bad.shape[0]].view(w_bad.shape))
  return lse_rest


def row_stats(z3: torch.Tensor, t3: torch.Tensor, with_sum: bool, elements: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
  """``(z_t, lse_rest, sum_c z_c)`` per row of the rows view ``z3``, chunk by chunk.

  The only temporary is one chunk buffer, never a full ``(N, C)`` tensor. Under
  torch.compile the whole-tensor formulas instead: inductor fuses them into row reductions
  that read the logits and write nothing of their size, where the chunk buffer's in-place
  ops would make it materialize a full ``(N, C)`` scratch tensor (a much slower compiled
  forward: BENCHMARKS.md, "Engine choices in focal_torch").
  """
  cdt = compute_dtype(z3.dtype)
  if torch.compiler.is_compiling():
    zt, lse_rest, sum_z, _ = row_stats_autodiff(z3.to(cdt), t3, with_sum)
    return zt, lse_rest, sum_z
  zt = z3.gather(1, t3).to(cdt)
  rows = _chunking.row_shape(z3.shape)
  lse_rest = torch.empty(rows, dtype=cdt, device=z3.device)
  sum_z = torch.empty(rows, dtype=cdt, device=z3.device) if with_sum else None
  elements = fewer_chunks(z3, elements)
  buf = torch.empty(_chunking.max_chunk_rows(z3.shape, elements) * z3.shape[1], dtype=cdt,
                    device=z3.device)
  # The softmax form needs a per-row test (a device synchronization elsewhere).
  cpu_rows = z3.ndim == 2 and z3.device.type == "cpu"
  for idx in _chunking.chunks(z3.shape, elements):
    w = z3[idx]
    if sum_z is not None:
      sum_z[idx] = w.sum(1, keepdim=True, dtype=cdt)
    e = buf[:w.numel()].view(w.shape)
    lse_rest[idx] = (softmax_lse_others(w, t3[idx], zt[idx], e) if cpu_rows
                     else fused_lse_others(w, t3[idx], e))
  return zt, lse_rest, sum_z


def masked_rows(valid: torch.Tensor, lse_rest: torch.Tensor) -> torch.Tensor | None:
  """The rows whose gradient must be forced to 0: masked rows, when some of them have
  non-finite logits (``a = b_over_c = grad_t = 0`` there, but ``0 * exp(nan - nan)`` is
  NaN). On the CPU, None unless such a row exists (a cheap per-row test); elsewhere, and
  under torch.compile, every masked row (no device synchronization)."""
  if torch.compiler.is_compiling() or lse_rest.device.type != "cpu":
    return ~valid
  fix = ~valid & ~torch.isfinite(lse_rest)
  return fix if bool(fix.any()) else None


def rows_where(mask: torch.Tensor) -> torch.Tensor | None:
  """``mask`` (per row), or None where no row is set: on the CPU a cheap per-row test, so
  that the fix-up it guards costs nothing in the common case; elsewhere, and under
  torch.compile, ``mask`` itself (no device synchronization)."""
  if torch.compiler.is_compiling() or mask.device.type != "cpu":
    return mask
  return mask if bool(mask.any()) else None


def chunk_grad(w: torch.Tensor, t: torch.Tensor, lse_rest: torch.Tensor, a: torch.Tensor,
               b_over_c: torch.Tensor | None, grad_t: torch.Tensor, out: torch.Tensor,
               buf: torch.Tensor | None, fix: torch.Tensor | None = None,
               owned: torch.Tensor | None = None) -> None:
  """Writes ``a exp(w - lse_rest) - b_over_c`` off the target and ``grad_t`` at it into
  ``out`` (a chunk of the gradient). Computes in place in ``out`` when it has ``lse_rest``'s
  dtype, else in ``buf`` (half-precision gradients: the math stays in float32). Rows of
  ``fix`` get 0 (masked rows, whatever their logits). ``owned`` (classes split over ranks):
  the rows whose target lies in this slice; the others get no ``grad_t``."""
  e = out if buf is None else buf[:w.numel()].view(w.shape)
  # w - lse_rest <= 0 off the target: exp never overflows; the target entry is overwritten.
  torch.sub(w, lse_rest, out=e)
  if fix is not None:
    e.masked_fill_(fix, float("-inf"))  # exp(-inf) = 0, and a = b_over_c = grad_t = 0 here
  exp_(e)
  e.mul_(a)
  if b_over_c is not None:
    e.sub_(b_over_c)
  if owned is not None:
    grad_t = torch.where(owned, grad_t, e.gather(1, t))
  e.scatter_(1, t, grad_t)
  if buf is not None:
    out.copy_(e)


def grad_chunked(z3: torch.Tensor, t3: torch.Tensor, lse_rest: torch.Tensor, a: torch.Tensor,
                 b_over_c: torch.Tensor | None, grad_t: torch.Tensor, elements: int,
                 valid: torch.Tensor | None = None, owned: torch.Tensor | None = None
                 ) -> torch.Tensor:
  """The gradient, chunk by chunk: :func:`chunk_grad`'s values in two parallel operators
  per chunk, written straight into the gradient (half inputs: into one float32 chunk, then
  copied). No temporary beyond it. Rows not ``valid`` are exactly 0. ``owned``: as in
  :func:`chunk_grad`."""
  out = torch.empty(z3.shape, dtype=z3.dtype, device=z3.device)
  cdt = compute_dtype(z3.dtype)
  fix = None if valid is None else masked_rows(valid, lse_rest)
  if torch.compiler.is_compiling():
    # Inductor fuses chunk_grad's elementwise steps into one loop whatever their number.
    buf = None if z3.dtype == cdt else torch.empty(z3.numel(), dtype=cdt, device=z3.device)
    chunk_grad(z3, t3, lse_rest, a, b_over_c, grad_t, out, buf, fix, owned)
    return out
  elements = fewer_chunks(z3, elements)
  buf = None if z3.dtype == cdt else torch.empty(
      _chunking.max_chunk_rows(z3.shape, elements) * z3.shape[1], dtype=cdt, device=z3.device)
  for idx in _chunking.chunks(z3.shape, elements):
    w, a_c = z3[idx], a[idx]
    e = out[idx] if buf is None else buf[:w.numel()].view(w.shape)
    # a exp(z - lse_rest) = sign(a) exp(z - (lse_rest - log|a|)): the scale folded into the
    # exponent, so that the chunk takes one fused multiply-add and one exp2 (base 2: exp2 is
    # the faster kernel); a = 0 gives exp(-inf) = 0. The per-row shift in float64, rounded
    # once (per chunk: no per-row temporary of the whole batch beside the gradient).
    shift = ((lse_rest[idx].double() - log_serial(a_c.double().abs())) * -1.4426950408889634
             ).to(cdt)
    torch.add(shift, w, alpha=1.4426950408889634, out=e)  # (z - lse_rest + log|a|) log2 e
    e.exp2_()
    flip = rows_where(a_c < 0)
    if flip is not None:
      e.mul_(torch.where(flip, -1.0, 1.0).to(e.dtype))
    if fix is not None:
      e.masked_fill_(fix[idx], 0.0)  # a = b_over_c = grad_t = 0 there, whatever the logits
    if b_over_c is not None:
      e.sub_(b_over_c[idx])
    g = grad_t[idx]
    if owned is not None:
      g = torch.where(owned[idx], g, e.gather(1, t3[idx]))
    e.scatter_(1, t3[idx], g)
    if buf is not None:
      out[idx].copy_(e)
  return out


def split_row_stats(z3: torch.Tensor, t3: torch.Tensor, owned: torch.Tensor, with_sum: bool,
                    elements: int | None, split: Any
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
  """:func:`row_stats` of the whole rows when ``z3`` holds this rank's slice of the classes
  (``t3``: labels local to the slice, ``owned``: the rows whose target it holds).

  Each rank reduces its slice chunk by chunk to ``(m, s_rest)`` (its largest non-target logit and
  its sum of ``exp(z - m)``), the target logit (0 where not owned) and the row sum; then one
  MAX all-reduce of ``m`` and one SUM all-reduce of ``s_rest exp(m - M)``, ``z_t`` and the row
  sum give every rank the statistics of the whole rows. ``s_rest exp(m - M)`` cannot overflow
  (``m <= M``, both finite unless a logit is ``+inf`` or NaN, which then gives NaN as
  without the split).
  """
  cdt = compute_dtype(z3.dtype)
  rows = _chunking.row_shape(z3.shape)
  zero = torch.zeros((), dtype=cdt, device=z3.device)
  zt = torch.where(owned, z3.gather(1, t3).to(cdt), zero)
  m = torch.empty(rows, dtype=cdt, device=z3.device)
  s_rest = torch.empty(rows, dtype=cdt, device=z3.device)
  sum_z = torch.empty(rows, dtype=cdt, device=z3.device) if with_sum else None
  buf = torch.empty(_chunking.max_chunk_rows(z3.shape, elements) * z3.shape[1], dtype=cdt,
                    device=z3.device)
  for idx in _chunking.chunks(z3.shape, elements):
    w = z3[idx]
    if sum_z is not None:
      sum_z[idx] = w.sum(1, keepdim=True, dtype=cdt)
    e = buf[:w.numel()].view(w.shape)
    e.copy_(w)
    m[idx], s_rest[idx] = exp_others_(e, t3[idx], owned[idx])
  return combine_split(m, s_rest, zt, sum_z, split)


def combine_split(m: torch.Tensor, s_rest: torch.Tensor, zt: torch.Tensor,
                  sum_z: torch.Tensor | None, split: Any
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
  """``(z_t, lse_rest, sum_z)`` of the whole rows from each rank's ``(m, s_rest, z_t, sum_z)``:
  one MAX and one SUM all-reduce of per-row numbers."""
  big_m = split.row_max(m)
  s_rest = s_rest * torch.exp(m - big_m)
  s_rest, zt, sum_z = split.row_sum(s_rest, zt, sum_z)
  return zt, lse_from(big_m, s_rest), sum_z


# --- long rows in eager mode on the CPU: one softmax, kept for the backward ---


def kept_softmax_applies(z3: torch.Tensor, options: Any) -> bool:
  """Whether :class:`SoftmaxFocalFunction` takes the kept-softmax form (:func:`kept_forward`):
  eager, on the CPU, 2-D rows, logits in their compute dtype (half logits would keep a float32
  softmax, 2x their size), no class split."""
  return (options.kept and not torch.compiler.is_compiling() and z3.ndim == 2
          and z3.device.type == "cpu" and z3.dtype == options.compute_dtype
          and options.split is None)


def _rows(x: Any, rows: torch.Tensor) -> Any:
  """The ``rows`` of a per-row tensor; numbers, None and 0-d tensors as they are."""
  if isinstance(x, torch.Tensor) and x.ndim > 0:
    return x.index_select(0, rows)
  return x


def target_entries(t3: torch.Tensor, num_classes: int) -> torch.Tensor:
  """Flat indices ``row * C + t`` of each row's target entry in a contiguous ``(N, C)``
  tensor, for ``torch.take`` and ``put_``: on the CPU 3x and 4x to 7x faster than ``gather``
  and ``scatter_`` along the classes at (16384, 91) (35 against 97 us, 60 against 230 to
  430 us: single-threaded loops, where those spent about 15 % of a step)."""
  rows = torch.arange(t3.shape[0], device=t3.device)
  return torch.add(t3.view(-1), rows, alpha=num_classes)


class KeptRows(NamedTuple):
  """Rows the kept-softmax form hands to the exact per-row math (:func:`row_terms` on
  :func:`fused_lse_others`, and :func:`grad_chunked` in the backward): their indices and
  per-row scalars."""
  rows: torch.Tensor
  lse_rest: torch.Tensor
  a: torch.Tensor
  b_over_c: torch.Tensor | None
  grad_t: torch.Tensor
  valid: torch.Tensor


def kept_forward(z3: torch.Tensor, t3: torch.Tensor, valid: torch.Tensor,
                 in_range: torch.Tensor | None, alpha: Any, gamma: Any, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor | None, torch.Tensor, KeptRows | None]:
  """``(loss, e, at, rate, b_over_c, grad_t, exact)`` of 2-D rows from one softmax ``e`` of
  the logits, which the backward turns into the gradient in place (:func:`kept_grad`); ``at``
  the flat indices of the target entries (:func:`target_entries`).

  ``e`` is the softmax with the target entry zeroed: ``p`` (the target's) and ``q = sum_c e_c``
  (the other classes') each hold full relative precision, so ``-log p = log1p(q / p)``,
  ``(1 - p)^gamma = q^gamma`` and, off the target, ``exp(z_c - lse_rest) = e_c / q``: the
  gradient is ``rate e_c - b_over_c`` with ``rate = a / q``. Two parallel operators over the
  logits here (the softmax and the row sum; with label smoothing also the sum of the logits)
  and one in the backward, against ``F.cross_entropy``'s three; the per-row math is about a
  dozen serial operators (no ``exp`` or ``log``: see :func:`exp_nonpositive`). A whole
  forward + backward at (16384, 91), gamma 2, mean issues 50 ATen operators, the chunked
  path 108 (each costs microseconds to a hundred, on a step of a few milliseconds). Rows
  where ``p`` or ``q`` is below ``C`` times the smallest normal number (underflowed terms
  could weigh more than a rounding: margins beyond about 80 in float32), not finite, or with
  a label out of range, take the exact math (``exact``: :class:`KeptRows`, None if no row
  does). Rows not ``valid`` are 0.

  The softmax is held from the forward to the backward and becomes the gradient: the peak is
  the gradient's, as on the chunked path, but a logits-sized tensor lives between the two.
  """
  cdt = z3.dtype
  num_classes = z3.shape[1]
  e = torch.empty(z3.shape, dtype=cdt, device=z3.device)
  torch.ops.aten._softmax.out(z3, 1, False, out=e)
  at = target_entries(t3, num_classes)
  p = torch.take(e, at).view(t3.shape)
  e.put_(at, torch.zeros(at.shape, dtype=cdt, device=z3.device))
  q = e.sum(1, keepdim=True)
  lowest = torch.minimum(p, q)
  # NaN fails the test: such rows take the exact math.
  all_ok = lowest.numel() == 0 or bool(lowest.amin() >= num_classes * torch.finfo(cdt).tiny)
  bad = None
  if not all_ok:
    bad = ~(lowest >= num_classes * torch.finfo(cdt).tiny)
  if in_range is not None:
    out_of_range = valid & ~in_range
    bad = out_of_range if bad is None else bad | out_of_range
  # log(q / p) (serial: xlogy), then -log p = log(1 + q / p) = softplus(log(q / p)): full
  # relative precision where p rounds to 1 (there log(p) itself would be 0).
  log_r = log_serial(q / p)
  ce = softplus(log_r)
  if eps:
    # eps (lse - mean_c z_c) with lse = z_t - log p.
    zt = z3.gather(1, t3)
    ce = ce + eps * (zt - z3.sum(1, keepdim=True) / num_classes)
    del zt
  if isinstance(gamma, float) and gamma == 0.0:
    focal = None
    h = q
  else:
    focal = torch.pow(q, gamma)
    # h = q + gamma p ce (p ce -> 0 as p -> 0; here p is a normal number).
    h = (torch.addcmul(q, p, ce, value=gamma) if isinstance(gamma, float)
         else q + gamma * (p * ce))
  if alpha is not None:
    focal = alpha if focal is None else alpha * focal
  loss = ce if focal is None else focal * ce
  a = h if focal is None else focal * h
  rate = a / q
  b_over_c = None
  if eps:
    share = eps / num_classes
    b_over_c = torch.full_like(q, share) if focal is None else focal * share
    grad_t = (eps - share) - h
    grad_t = grad_t if focal is None else focal * grad_t
  else:
    grad_t = -a
  if not bool(valid.all()):
    # Finite on every row the exact math does not redo: a multiply by 0 or 1 masks.
    keep = valid.to(cdt)
    loss, rate, grad_t = loss * keep, rate * keep, grad_t * keep
    b_over_c = None if b_over_c is None else b_over_c * keep
  exact = None
  if bad is not None and bool(bad.any()):
    rows = bad.view(-1).nonzero().view(-1)
    w, t = z3.index_select(0, rows), t3.index_select(0, rows)
    v = valid.index_select(0, rows)
    lse_rest = fused_lse_others(w, t, torch.empty_like(w))
    terms = row_terms(w.gather(1, t), lse_rest, w.sum(1, keepdim=True) if eps else None,
                      num_classes, _rows(alpha, rows), _rows(gamma, rows), eps, v,
                      _rows(in_range, rows))
    loss = loss.index_copy(0, rows, terms[0])
    exact = KeptRows(rows, lse_rest, terms[1], terms[2], terms[3], v)
  return loss, e, at, rate, b_over_c, grad_t, exact


def kept_grad(z3: torch.Tensor, t3: torch.Tensor, at: torch.Tensor, e: torch.Tensor | None,
              rate: torch.Tensor, b_over_c: torch.Tensor | None, grad_t: torch.Tensor,
              exact: KeptRows | None, elements: int | None, go: torch.Tensor
              ) -> torch.Tensor:
  """The gradient of :func:`kept_forward`, written in place into its softmax ``e`` (None: it
  was used up by an earlier backward of the same graph, ``retain_graph=True``, and is
  recomputed): one multiply (with label smoothing, one multiply-add) per entry, the target's
  entries by ``put_`` at ``at`` (:func:`target_entries`), and the ``exact`` rows by
  :func:`grad_chunked`."""
  if e is None:
    e = torch.ops.aten._softmax(z3, 1, False)
    e.put_(at, torch.zeros(at.shape, dtype=e.dtype, device=e.device))
  if b_over_c is None:
    e.mul_(rate * go)
  else:
    torch.addcmul(b_over_c * go.neg(), e, rate * go, out=e)
  e.put_(at, (grad_t * go).view(-1))
  if exact is not None:
    rows = exact.rows
    g = go.index_select(0, rows)
    b = None if exact.b_over_c is None else exact.b_over_c * g
    e.index_copy_(0, rows, grad_chunked(
        z3.index_select(0, rows), t3.index_select(0, rows), exact.lse_rest, exact.a * g, b,
        exact.grad_t * g, elements, exact.valid))
  return e


# --- short rows: save the inputs only, recompute the per-row scalars in backward ---

# Rows of at most this many classes are "short": the per-row scalars (``lse_rest``, ``a``,
# ``grad_t``, ... each 4 bytes a row) and the safe int64 labels would weigh as much as the
# logits themselves (at C = 2 a float32 per-row tensor is half the logits, int64 labels all of
# them), so the Function saves only its inputs and recomputes them chunk by chunk in backward.
RECOMPUTE_MAX_CLASSES = 32
# Rows per chunk on that path: the per-row temporaries of a chunk stay near 0.2x the logits
# at C = 2 (1 MiB each), and there are few enough chunks that the per-operator cost (large on
# a loaded machine, where each parallel region waits for a descheduled thread) stays small.
RECOMPUTE_CHUNK_ROWS = 1 << 18
# Under torch.compile, only rows of at most this many classes take that path, their loss and
# gradient written column by column (:func:`column_terms`); longer rows keep the saved per-row
# scalars, which weigh little there, where recomputing them costs a second pass over the
# logits in the backward.
COLUMN_MAX_CLASSES = 4


def safe_labels(labels: torch.Tensor, valid: torch.Tensor, in_range: torch.Tensor | None
                ) -> torch.Tensor:
  """Labels of any integer dtype (a chunk) as int64 indices that are safe to index with: 0
  where not ``valid`` or not ``in_range``, as ``_checks.softmax_masks`` makes them."""
  values = (labels.view(torch.int64) if labels.dtype == torch.uint64
            else labels.to(torch.int64))
  ok = valid if in_range is None else valid & in_range
  return torch.where(ok, values, torch.zeros((), dtype=torch.int64, device=values.device))


def short_lse_others(w: torch.Tensor, t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
  """:func:`chunk_lse_others` of a 2-D chunk of short rows, reduced across a transposed
  ``(C, rows)`` copy: the reductions then run along contiguous rows of ``rows`` entries,
  without the padding (8x the chunk at C = 2) that short rows need otherwise."""
  r, c = w.shape
  e = buf[:w.numel()].view(c, r)
  e.copy_(w.t())
  e.scatter_(0, t.view(1, r), float("-inf"))
  m = e.amax(0, keepdim=True).clamp_min_(torch.finfo(e.dtype).min)
  exp_(e.sub_(m))
  return lse_from(m, e.sum(0, keepdim=True)).view(r, 1)


def chunk_terms(w: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                in_range: torch.Tensor | None, alpha: Any, gamma: Any, eps: float,
                cdt: torch.dtype, buf: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
  """``(t, lse_rest, row_terms(...))`` of one chunk ``w`` of the logits, from its raw
  labels and masks, as :func:`row_stats` and the per-row gather of ``alpha``/``gamma``
  compute them for the whole tensor."""
  t = safe_labels(labels, valid, in_range)
  zt = w.gather(1, t).to(cdt)
  sum_z = w.sum(1, keepdim=True, dtype=cdt) if eps else None
  lse_rest = (chunk_lse_others(w, t, buf) if w.ndim == 3 or w.shape[1] % 16 == 0
              else short_lse_others(w, t, buf))
  alpha, gamma = _numerics.per_row(alpha, t, cdt), _numerics.per_row(gamma, t, cdt)
  return t, lse_rest, row_terms(zt, lse_rest, sum_z, w.shape[1], alpha, gamma, eps, valid,
                                in_range)


def _short_buffer(shape: tuple[int, ...], elements: int, cdt: torch.dtype,
                  device: torch.device) -> torch.Tensor:
  """Scratch for one chunk on the recompute path (no padding: :func:`short_lse_others`)."""
  return torch.empty(_chunking.max_chunk_rows(shape, elements) * shape[1], dtype=cdt,
                     device=device)


def recomputed_loss(z3: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                    in_range: torch.Tensor | None, alpha: Any, gamma: Any,
                    options: SoftmaxOptions) -> torch.Tensor:
  """The per-row loss chunk by chunk: nothing of more than a chunk's size but the output."""
  cdt = options.compute_dtype
  loss = torch.empty(_chunking.row_shape(z3.shape), dtype=cdt, device=z3.device)
  buf = _short_buffer(z3.shape, options.chunk_elements, cdt, z3.device)
  for idx in _chunking.chunks(z3.shape, options.chunk_elements):
    _, _, terms = chunk_terms(z3[idx], labels[idx], valid[idx],
                              None if in_range is None else in_range[idx], alpha, gamma,
                              options.label_smoothing, cdt, buf)
    loss[idx] = terms[0]
    del terms
  return loss


def masked_column_exps(cols: list, target: list) -> tuple[list, torch.Tensor, list]:
  """``(masked, m, exps)`` of very short rows given as columns (torch.compile: elementwise,
  so that inductor fuses them): ``masked[c]`` the column ``cols[c]`` with -inf where
  ``target[c]`` (the label's), ``m`` the largest other logit as a log-sum-exp's shift (as
  torch.logsumexp takes it: 0 where infinite) and ``exps[c] = exp(masked[c] - m)`` (0 at
  the target). Shared by :func:`column_terms` and :func:`scaled_column_grad`."""
  masked = [torch.where(k, float("-inf"), w) for k, w in zip(target, cols)]
  m = masked[0]
  for w in masked[1:]:
    m = torch.maximum(m, w)
  m = _numerics.lse_shift(m)
  return masked, m, [torch.exp(w - m) for w in masked]


def column_terms(z3: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                 in_range: torch.Tensor | None, alpha: Any, gamma: Any,
                 options: SoftmaxOptions) -> tuple[list, list, torch.Tensor, tuple]:
  """``(target, masked, lse_rest, row_terms(...))`` of very short rows (torch.compile) from
  their ``C`` columns: ``target[c]`` whether column ``c`` holds the label, ``masked[c]`` that
  column (compute dtype) with the target at -inf.

  The row statistics are elementwise functions of the columns, not row reductions, so
  inductor computes them inside the one loop that writes the loss or the gradient, and no
  per-row vector is stored between two loops (at C = 2 each is half the logits): the
  compiled backward recomputes them from the inputs alone.
  """
  cdt, eps = options.compute_dtype, options.label_smoothing
  t3 = safe_labels(labels, valid, in_range)
  num_classes = z3.shape[1]
  cols = [z3[:, c:c + 1].to(cdt) for c in range(num_classes)]
  target = [t3 == c for c in range(num_classes)]
  zero = torch.zeros((), dtype=cdt, device=z3.device)
  # z_t as a sum of selects (0 + z_t is z_t exactly; a NaN or inf elsewhere is not read).
  zt = torch.where(target[0], cols[0], zero)
  for k, w in zip(target[1:], cols[1:]):
    zt = zt + torch.where(k, w, zero)
  masked, m, exps = masked_column_exps(cols, target)
  s_rest = exps[0]
  for x in exps[1:]:
    s_rest = s_rest + x
  del exps
  lse_rest = (torch.log(s_rest) + m).clamp_min(torch.finfo(cdt).min)
  sum_z = None
  if eps:
    sum_z = cols[0]
    for w in cols[1:]:
      sum_z = sum_z + w
  terms = row_terms(zt, lse_rest, sum_z, num_classes, _numerics.per_row(alpha, t3, cdt),
                    _numerics.per_row(gamma, t3, cdt), eps, valid, in_range)
  return target, masked, lse_rest, terms


def column_grad(z3: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                in_range: torch.Tensor | None, alpha: Any, gamma: Any,
                options: SoftmaxOptions, go: torch.Tensor) -> torch.Tensor:
  """The gradient of :func:`recomputed_grad` from :func:`column_terms` (torch.compile):
  selects, not a scatter, and one column at a time, so that it fuses into one loop."""
  target, masked, lse_rest, (_, a, b_over_c, grad_t) = column_terms(
      z3, labels, valid, in_range, alpha, gamma, options)
  zero = torch.zeros((), dtype=lse_rest.dtype, device=z3.device)
  a, grad_t = a * go, grad_t * go
  b_over_c = None if b_over_c is None else b_over_c * go
  out = []
  for k, w in zip(target, masked):
    # exp(w - lse_rest) is 0 at the target (masked to -inf) and <= 1 elsewhere.
    g = a * torch.exp(w - lse_rest)
    if b_over_c is not None:
      g = g - b_over_c
    g = torch.where(k, grad_t, g)
    out.append(torch.where(valid, g, zero))
  return torch.cat(out, 1).to(z3.dtype)


# Under torch.compile on the CPU, rows of ``COLUMN_MAX_CLASSES`` + 1 to this many classes save
# the logits, the labels as given and one number per row (:func:`scaled_terms`), and the
# backward writes the gradient column by column from them (:func:`scaled_column_grad`). The
# other compiled path saves int64 safe labels, two masks and two per-row vectors, 0.9x the
# logits at C = 5 (extra peak 1.90x); the column form of shorter rows recomputes all the
# per-row scalars in the backward, which at C = 8 inductor no longer vectorizes (too many
# strided loads and stores: CppKernel's tiling heuristics) and ran 1.4x slower.
SCALED_MAX_CLASSES = 9


def scaled_terms(z3: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                 in_range: torch.Tensor | None, alpha: Any, gamma: Any,
                 options: SoftmaxOptions
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
  """``(loss, scale, b_over_c)`` of short rows under torch.compile, from their columns
  (:func:`column_terms`: inductor vectorizes the loop across rows; as row reductions over 8
  or 9 classes it took one row at a time, and ran 2x slower): ``scale`` is the gradient's
  per-row ``a``, -1 on rows not ``valid`` (``a >= 0`` elsewhere, or NaN), so that the
  backward needs no mask of its own."""
  loss, a, b_over_c, _ = column_terms(z3, labels, valid, in_range, alpha, gamma, options)[3]
  return loss, torch.where(valid, a, -1.0), b_over_c


def scaled_column_grad(z3: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                       b_over_c: torch.Tensor | None, options: SoftmaxOptions,
                       go: torch.Tensor) -> torch.Tensor:
  """The gradient from :func:`scaled_terms`' ``scale`` (and ``b_over_c``), column by column.

  Off the target ``a exp(z_c - lse_rest) = a e_c / s_rest`` with ``e_c = exp(z_c - m)`` (``m``
  the largest other logit) and ``s_rest = sum_{c != t} e_c``, as the eager chunks compute it;
  at the target ``grad_t = (C - 1) b_over_c - a``: a softmax loss's gradient sums to 0 over
  the classes. The columns are made to depend on ``go`` (:func:`_numerics.after`), so that
  the compiled step's partitioner cannot compute any of this in the forward and save it.
  """
  cdt = options.compute_dtype
  num_classes = z3.shape[1]
  zero = torch.zeros((), dtype=cdt, device=z3.device)
  cols = [_numerics.after(go, z3[:, c:c + 1].to(cdt)) for c in range(num_classes)]
  values = (labels.view(torch.int64) if labels.dtype == torch.uint64 else labels)
  # Masked rows and labels out of range match no column: their rows are 0 (scale -1) or NaN.
  target = [values == c for c in range(num_classes)]
  _, _, e = masked_column_exps(cols, target)
  s_rest = e[0]
  for x in e[1:]:
    s_rest = s_rest + x
  # s_rest >= 1 where the largest other logit is finite; 0 where no other class is (a = 0
  # there, and so is every e_c): 1 keeps 0 / 0 out.
  a_go = scale * go
  rate = a_go / s_rest.clamp_min(1.0)
  if b_over_c is None:
    grad_t = -a_go
  else:
    b_go = b_over_c * go
    grad_t = (num_classes - 1) * b_go - a_go
  out = []
  for k, x in zip(target, e):
    g = rate * x
    if b_over_c is not None:
      g = g - b_go
    g = torch.where(k, grad_t, g)
    out.append(torch.where(scale < 0, zero, g))
  return torch.cat(out, 1).to(z3.dtype)


def recomputed_grad(z3: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                    in_range: torch.Tensor | None, alpha: Any, gamma: Any,
                    options: SoftmaxOptions, go: torch.Tensor) -> torch.Tensor:
  """The gradient chunk by chunk, each chunk's per-row scalars recomputed from its logits
  (:func:`chunk_terms`): no temporary beyond the gradient but chunk-sized ones."""
  cdt = options.compute_dtype
  out = torch.empty(z3.shape, dtype=z3.dtype, device=z3.device)
  buf = _short_buffer(z3.shape, options.chunk_elements, cdt, z3.device)
  for idx in _chunking.chunks(z3.shape, options.chunk_elements):
    w, v = z3[idx], valid[idx]
    t, lse_rest, (_, a, b_over_c, grad_t) = chunk_terms(
        w, labels[idx], v, None if in_range is None else in_range[idx], alpha, gamma,
        options.label_smoothing, cdt, buf)
    g = go[idx]
    # buf is free again: lse_rest and the scalars are tensors of their own.
    chunk_grad(w, t, lse_rest, a * g, None if b_over_c is None else b_over_c * g, grad_t * g,
               out[idx], None if z3.dtype == cdt else buf, masked_rows(v, lse_rest))
    # Freed before the next chunk's are made, not after.
    del t, lse_rest, a, b_over_c, grad_t
  return out


# --- the autograd.Function and the loss ---


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
  """The checked settings of one softmax focal loss call that are not tensors, passed whole
  to :class:`SoftmaxFocalFunction` (frozen and hashable).

  Attributes:
    label_smoothing: ``eps`` in ``[0, 1]``.
    chunk_elements: elements per chunk of the logits (None: one chunk, under torch.compile).
    split: the ``_class_split.ClassSplit`` of ``class_process_group`` (this rank holds a
      slice of the classes), or None.
    compute_dtype: the dtype of the per-row math (float32, or float64 for float64 logits).
    recompute: short rows (see ``RECOMPUTE_MAX_CLASSES``, under torch.compile
      ``COLUMN_MAX_CLASSES``; no ``split``): the labels are passed as given (not made safe),
      only the inputs are saved, and the backward recomputes the per-row scalars (chunk by
      chunk in eager mode, column by column when compiled).
    scaled: rows of ``COLUMN_MAX_CLASSES`` + 1 to ``SCALED_MAX_CLASSES`` under torch.compile on
      the CPU (no ``split``): the labels are passed as given, the logits, the labels and the
      gradient's per-row scale are saved (:func:`scaled_terms`), and the backward writes the
      gradient column by column (:func:`scaled_column_grad`).
    kept: the kept-softmax form may be taken (:func:`kept_softmax_applies`): a gradient is
      wanted (grad mode on and the logits require it). Without one, the forward's softmax would
      be a logits-sized temporary for nothing; the chunked forward has none.
  """
  label_smoothing: float
  chunk_elements: int | None
  split: _class_split.ClassSplit | None
  compute_dtype: torch.dtype
  recompute: bool = False
  scaled: bool = False
  kept: bool = False


class SoftmaxFocalFunction(torch.autograd.Function):
  """Per-row softmax focal loss of a rows view ``z3`` with an analytic, memory-light backward.

  It exists because autograd through the formula saves several ``(N, C)`` tensors; this
  saves the logits and five per-row scalars, and writes the gradient chunk by chunk. With
  ``options.recompute`` (short rows, where per-row tensors are as large as the logits) it
  saves only its inputs (``t3`` then holds the labels as given) and recomputes the per-row
  scalars chunk by chunk in backward; with ``options.scaled`` (torch.compile on the CPU, 5 to
  ``SCALED_MAX_CLASSES`` classes) it saves the logits, the labels as given and the gradient's
  per-row scale, and the backward writes the gradient column by column. Eager on the CPU, 2-D
  logits in their compute dtype keep the forward's softmax (on ``ctx``, not saved: the
  backward writes the gradient into it) and three per-row scalars (:func:`kept_forward`).
  ``alpha``/``gamma``:
  None, a number, or a 0-d or ``(C,)`` tensor (gathered at each row's label here). With
  ``create_graph=True`` the backward is built from differentiable ops instead, so double
  backward (Hessian-vector products) works.

  With ``options.split`` ``z3`` holds this rank's slice of the classes (``t3``: global
  labels): the forward all-reduces per-row statistics (:func:`split_row_stats`) and returns
  the whole rows' losses on every rank; the backward writes the gradient of this rank's
  slice from the saved per-row scalars, with no communication (and no double backward).
  """

  @staticmethod
  def forward(ctx, z3, t3, valid, in_range, alpha, gamma, options):  # pylint: disable=W0221
    ctx.options = options
    if options.scaled:
      # The inputs for the double backward; under torch.compile the partitioner keeps only
      # what the traced backward reads: z3, t3 (the labels as given) and the per-row terms.
      loss, scale, b_over_c = scaled_terms(z3, t3, valid, in_range, alpha, gamma, options)
      _numerics.save_hypers(ctx, (z3, t3, valid, in_range, scale, b_over_c), alpha, gamma)
      return loss
    if options.recompute:
      _numerics.save_hypers(ctx, (z3, t3, valid, in_range), alpha, gamma)
      if torch.compiler.is_compiling():
        return column_terms(z3, t3, valid, in_range, alpha, gamma, options)[3][0]
      return recomputed_loss(z3, t3, valid, in_range, alpha, gamma, options)
    eps, elements, split = options.label_smoothing, options.chunk_elements, options.split
    cdt = options.compute_dtype
    alpha, gamma = _numerics.per_row(alpha, t3, cdt), _numerics.per_row(gamma, t3, cdt)
    if kept_softmax_applies(z3, options):
      loss, e, at, rate, b_over_c, grad_t, exact = kept_forward(z3, t3, valid, in_range,
                                                                alpha, gamma, eps)
      # On ctx, not saved: the backward writes the gradient into it (see kept_grad).
      ctx.kept, ctx.exact = e, exact
      _numerics.save_hypers(ctx, (z3, t3, at, valid, in_range, rate, b_over_c, grad_t),
                            alpha, gamma)
      return loss
    if split is None:
      owned = None
      zt, lse_rest, sum_z = row_stats(z3, t3, bool(eps), elements)
      num_classes = z3.shape[1]
    else:
      t3, owned = split.localize(t3)
      zt, lse_rest, sum_z = split_row_stats(z3, t3, owned, bool(eps), elements, split)
      num_classes = split.num_classes
    loss, a, b_over_c, grad_t = row_terms(zt, lse_rest, sum_z, num_classes, alpha, gamma, eps,
                                          valid, in_range)
    _numerics.save_hypers(ctx, (z3, t3, owned, valid, in_range, lse_rest, a, b_over_c, grad_t),
                          alpha, gamma)
    return loss

  @staticmethod
  def backward(ctx, go):  # pylint: disable=W0221
    options = ctx.options
    if torch.is_grad_enabled() and options.split is not None:
      raise _class_split.no_double_backward(options.split.fn)
    go = go.to(options.compute_dtype)
    if options.scaled:
      (z3, labels, valid, in_range, scale, b_over_c), alpha, gamma = _numerics.saved_hypers(ctx)
      if torch.is_grad_enabled():
        t3 = safe_labels(labels, valid, in_range)
        cdt = options.compute_dtype
        grad = grad_autodiff(z3, t3, valid, in_range, _numerics.per_row(alpha, t3, cdt),
                             _numerics.per_row(gamma, t3, cdt), options.label_smoothing, go)
      else:
        grad = scaled_column_grad(z3, labels, scale, b_over_c, options, go)
      return grad, None, None, None, None, None, None
    if options.recompute:
      (z3, labels, valid, in_range), alpha, gamma = _numerics.saved_hypers(ctx)
      if torch.is_grad_enabled():
        t3 = safe_labels(labels, valid, in_range)
        cdt = options.compute_dtype
        grad = grad_autodiff(z3, t3, valid, in_range, _numerics.per_row(alpha, t3, cdt),
                             _numerics.per_row(gamma, t3, cdt), options.label_smoothing, go)
      elif torch.compiler.is_compiling():
        grad = column_grad(z3, labels, valid, in_range, alpha, gamma, options, go)
      else:
        grad = recomputed_grad(z3, labels, valid, in_range, alpha, gamma, options, go)
      return grad, None, None, None, None, None, None
    if hasattr(ctx, "kept"):  # the kept-softmax form
      (z3, t3, at, valid, in_range, rate, b_over_c, grad_t), alpha, gamma = (
          _numerics.saved_hypers(ctx))
      if torch.is_grad_enabled():
        grad = grad_autodiff(z3, t3, valid, in_range, alpha, gamma, options.label_smoothing,
                             go)
      else:
        e, ctx.kept = ctx.kept, None
        grad = kept_grad(z3, t3, at, e, rate, b_over_c, grad_t, ctx.exact,
                         options.chunk_elements, go)
      return grad, None, None, None, None, None, None
    (z3, t3, owned, valid, in_range, lse_rest, a, b_over_c, grad_t), alpha, gamma = (
        _numerics.saved_hypers(ctx))
    if torch.is_grad_enabled():
      # create_graph=True: differentiable formulas, so that the gradient has a gradient.
      grad = grad_autodiff(z3, t3, valid, in_range, alpha, gamma, options.label_smoothing, go)
    else:
      grad = grad_chunked(z3, t3, lse_rest, a * go, None if b_over_c is None else b_over_c * go,
                          grad_t * go, options.chunk_elements, valid, owned)
    return grad, None, None, None, None, None, None


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
  (a ``torch.autograd.Function``): it keeps the logits and a few numbers per row (for
  ``C <= 32`` in eager mode and ``C <= 4`` under torch.compile, only its inputs: the per-row
  numbers are recomputed; for ``C <= 9`` compiled on the CPU, its inputs and one number per
  row), and writes the gradient chunk by chunk without other temporaries of the logits' size
  (for ``C > 32`` in eager mode on the CPU, float32 or float64 logits of shape ``(N, C)``, it
  also keeps the forward's softmax, which its backward turns into the gradient in place).
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
  return softmax_focal_with_options(
      "softmax_focal", logits, labels, alpha=alpha, gamma=gamma,
      label_smoothing=label_smoothing, reduction=reduction, where=where,
      ignore_index=ignore_index, background_class=background_class, dim=dim,
      process_group=process_group, sample_weight=sample_weight,
      class_process_group=class_process_group)


class Prepared(NamedTuple):
  """The checked keywords and per-row masks of a softmax focal loss (see
  :func:`prepare_labels`)."""
  alpha: Any
  gamma: Any
  eps: float
  reduction: str
  process_group: Any
  split: Any                    # a _class_split.ClassSplit, or None
  cdt: torch.dtype              # the compute dtype
  weight: Any                   # the checked sample_weight, or None
  valid: torch.Tensor           # rows that count
  in_range: torch.Tensor | None  # labels in [0, C) (None: all; counted rows outside: NaN)
  t: torch.Tensor               # safe class indices (0 where masked or out of range), or the labels
  positive: torch.Tensor | None  # rows of a class other than background (mean_positive)


def prepare_labels(fn: str, labels: Any, num_classes: int, expected: tuple[int, ...],
                   ref: torch.Tensor, what_rows: Callable[[], str], *, alpha: Any, gamma: Any,
                   label_smoothing: Any, reduction: Any, where: Any, ignore_index: Any,
                   background_class: Any, process_group: Any, sample_weight: Any,
                   class_process_group: Any, safe_labels: bool = True) -> Prepared:
  """Checks the labels and keywords of a softmax focal loss, and its per-row masks.

  Shared by :func:`softmax_focal` and ``_linear.linear_softmax_focal`` (as
  ``focal_jax._softmax.prepare_labels`` is in JAX). ``num_classes`` is the class count of
  ``ref`` (this rank's slice with ``class_process_group``), ``expected`` the labels' shape,
  ``ref`` the floating-point input (its device and dtype) and ``what_rows`` names
  ``expected`` in messages. ``safe_labels=False``: ``t`` holds the labels as given, not
  copied into safe indices (the recompute path makes each chunk's safe: :func:`safe_labels`).
  """
  split = None
  if class_process_group is not None:
    split = _class_split.resolve(fn, class_process_group, num_classes, alpha=alpha,
                                 gamma=gamma)
    num_classes = split.num_classes
  alpha, gamma, eps, reduction, ignore_index, background_class, process_group = (
      _checks.softmax_hypers(fn, num_classes, alpha=alpha, gamma=gamma,
                             label_smoothing=label_smoothing, reduction=reduction,
                             ignore_index=ignore_index, background_class=background_class,
                             process_group=process_group, device=ref.device))
  _checks.labels(fn, labels, expected, what_rows, ref, integer=True)
  _checks.no_grad_needed(fn, "labels", labels)
  where = _checks.where_mask(fn, where, expected, "the shape of labels", ref)
  cdt = _numerics.compute_dtype(ref.dtype)
  weight = _checks.sample_weight(fn, sample_weight, expected, ref, cdt)
  valid, in_range, t, positive = _checks.softmax_masks(
      fn, labels, where, num_classes, ignore_index,
      background_class if reduction == "mean_positive" else None, safe_labels)
  return Prepared(alpha, gamma, eps, reduction, process_group, split, cdt, weight, valid,
                  in_range, t, positive)


def softmax_focal_with_options(fn: str, logits: torch.Tensor, labels: torch.Tensor, *,
                               alpha: Any, gamma: Any, label_smoothing: Any, reduction: Any,
                               where: Any, ignore_index: Any, background_class: Any, dim: Any,
                               process_group: Any, sample_weight: Any = None,
                               out_dtype: torch.dtype | None = None,
                               chunk_elements: int | None = None,
                               class_process_group: Any = None) -> torch.Tensor:
  """:func:`softmax_focal` with the name used in messages and the output dtype as options
  (the DeepSpeed drop-in returns float32 for half inputs, as DeepSpeed does)."""
  _checks.floating_array(fn, "logits", logits)
  dim = _checks.axis(fn, dim, logits.ndim)
  num_classes = logits.shape[dim]
  if num_classes == 0:
    raise ValueError(f"{fn}: logits must have at least one class, got C = 0 (shape "
                     f"{_checks.shape_str(logits.shape)}, class dim {dim})")
  expected = logits.shape[:dim] + logits.shape[dim + 1:]
  compiling = torch.compiler.is_compiling()
  recompute = (num_classes <= (COLUMN_MAX_CLASSES if compiling else RECOMPUTE_MAX_CLASSES)
               and class_process_group is None)
  scaled = (compiling and not recompute and num_classes <= SCALED_MAX_CLASSES
            and class_process_group is None and logits.device.type == "cpu")
  pre = prepare_labels(
      fn, labels, num_classes, expected, logits,
      lambda: f"the shape of logits {_checks.shape_str(logits.shape)} without dim {dim}",
      alpha=alpha, gamma=gamma, label_smoothing=label_smoothing, reduction=reduction,
      where=where, ignore_index=ignore_index, background_class=background_class,
      process_group=process_group, sample_weight=sample_weight,
      class_process_group=class_process_group, safe_labels=not (recompute or scaled))
  cdt = pre.cdt

  z3 = _chunking.as_rows(logits, dim)
  rows = _chunking.row_shape(z3.shape)
  elements = _chunking.chunk_elements(z3.numel(), chunk_elements)
  if recompute and elements is not None:
    elements = min(elements, num_classes * RECOMPUTE_CHUNK_ROWS)
  options = SoftmaxOptions(label_smoothing=pre.eps, chunk_elements=elements, split=pre.split,
                           compute_dtype=cdt, recompute=recompute, scaled=scaled,
                           kept=torch.is_grad_enabled() and logits.requires_grad)
  args = (z3, pre.t.reshape(rows), pre.valid.reshape(rows),
          None if pre.in_range is None else pre.in_range.reshape(rows),
          _numerics.traced(pre.alpha, cdt, logits), _numerics.traced(pre.gamma, cdt, logits),
          options)
  if recompute and torch.compiler.is_compiling():
    # Checkpointed, so that the compiled graph's partitioner saves only the inputs for the
    # backward (not the forward's per-row numbers, which the backward recomputes anyway).
    loss = torch.utils.checkpoint.checkpoint(SoftmaxFocalFunction.apply, *args,
                                             use_reentrant=False)
  else:
    loss = SoftmaxFocalFunction.apply(*args)
  loss = loss.reshape(labels.shape)
  loss = _checks.apply_sample_weight(loss, pre.weight, pre.valid)
  return _reduce.reduce_loss(loss, pre.reduction, valid=pre.valid, positive=pre.positive,
                             process_group=pre.process_group,
                             out_dtype=out_dtype or logits.dtype)
