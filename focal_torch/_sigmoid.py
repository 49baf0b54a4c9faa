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
(``create_graph=True``) differentiates the same quantities written in log space.
"""

from __future__ import annotations

from typing import Any

import torch

from focal_torch import _chunking
from focal_torch._numerics import compute_dtype
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
    omp = one_minus_y * p + y * q
    if isinstance(gamma, torch.Tensor):  # may hold 0: pow gives 0 ** 0 = 1 (exp2 log2: NaN)
      focal = torch.pow(omp, gamma)
    else:
      focal = torch.exp2(torch.log2(omp).mul_(gamma))
  weight = focal
  if alpha is not None:
    alpha_t = alpha * y + (1.0 - alpha) * one_minus_y if not plain or with_grad else (
        alpha * y + (1.0 - alpha) * (1.0 - y))
    weight = alpha_t if weight is None else alpha_t * weight
  loss = bce if weight is None else weight * bce
  if not with_grad:
    return loss, None
  # p - y without cancellation at y in {0, 1}.
  inner = one_minus_y * p - y * q
  if not plain:
    # R = (1 - 2y) p q / (1 - p_t), bounded by 1; where 1 - p_t underflows, focal = 0.
    r = (1.0 - 2.0 * y) * p * q / omp.clamp_min(torch.finfo(omp.dtype).tiny)
    inner = inner + gamma * r * bce
  grad = inner if weight is None else weight * inner
  return loss, grad


def terms_autodiff(x: torch.Tensor, y: torch.Tensor, alpha: Any, gamma: Any,
                   eps: float) -> torch.Tensor:
  """dloss/dx from differentiable log-space ops, for the double backward: the same values
  as :func:`terms`, and a derivative that stays finite where ``1 - p_t`` underflows."""
  y = y.to(x.dtype)
  if eps:
    y = y * (1.0 - eps) + eps / 2
  sp_pos = softplus(x)   # -log(1 - p)
  sp_neg = softplus(-x)  # -log p
  bce = y * sp_neg + (1.0 - y) * sp_pos
  p_minus_y = (1.0 - y) * torch.sigmoid(x) - y * torch.sigmoid(-x)
  if isinstance(gamma, float) and gamma == 0.0:
    weight, inner = None, p_minus_y
  else:
    # log(1 - p_t) = logaddexp(log y + log(1 - p), log(1 - y) + log p).
    log_1m_pt = torch.logaddexp(torch.log(y) - sp_pos, torch.log1p(-y) - sp_neg)
    weight = torch.exp(gamma * log_1m_pt)
    r = (1.0 - 2.0 * y) * torch.exp(-(sp_neg + sp_pos) - log_1m_pt)
    inner = gamma * r * bce + p_minus_y
  if alpha is not None:
    alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
    weight = alpha_t if weight is None else alpha_t * weight
  return inner if weight is None else weight * inner


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


class SigmoidFocalFunction(torch.autograd.Function):
  """Per-entry sigmoid focal loss of a rows view ``x3`` with a chunked analytic backward.

  It exists because autograd through the formula saves about ten temporaries of the
  logits' size; this saves the logits and labels (inputs anyway) and recomputes per chunk.
  With ``create_graph=True`` the backward is built from differentiable ops (double backward).
  ``alpha``/``gamma``: None, floats, 0-d tensors or class vectors shaped by
  ``_chunking.class_shape``.
  """

  @staticmethod
  def forward(ctx, x3, y3, valid, alpha, gamma, eps, elements):  # pylint: disable=W0221
    cdt = compute_dtype(x3.dtype)
    elements = _chunk_elements(elements)
    loss = torch.empty(x3.shape, dtype=cdt, device=x3.device)
    for idx in _chunking.chunks(x3.shape, elements):
      part, _ = terms(x3[idx].to(cdt), y3[idx], alpha, gamma, eps,
                      with_grad=False)
      loss[idx] = _mask(part, None if valid is None else valid[idx])
    hyper = [x if isinstance(x, torch.Tensor) else None for x in (alpha, gamma)]
    ctx.save_for_backward(x3, y3, valid, *hyper)
    ctx.floats = tuple(None if isinstance(x, torch.Tensor) else x for x in (alpha, gamma))
    ctx.eps = eps
    ctx.elements = elements
    return loss

  @staticmethod
  def backward(ctx, go):  # pylint: disable=W0221
    x3, y3, valid, alpha_t, gamma_t = ctx.saved_tensors
    alpha = alpha_t if alpha_t is not None else ctx.floats[0]
    gamma = gamma_t if gamma_t is not None else ctx.floats[1]
    cdt = compute_dtype(x3.dtype)
    if torch.is_grad_enabled():
      # create_graph=True: differentiable formulas, so that the gradient has a gradient.
      grad = terms_autodiff(x3.to(cdt), y3, alpha, gamma, ctx.eps)
      return (_mask(grad * go, valid).to(x3.dtype),) + (None,) * 6
    out = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
    for idx in _chunking.chunks(x3.shape, ctx.elements):
      _, part = terms(x3[idx].to(cdt), y3[idx], alpha, gamma, ctx.eps,
                      with_grad=True)
      part = part * go[idx]
      out[idx] = _mask(part, None if valid is None else valid[idx])
    return (out,) + (None,) * 6
