"""torchvision's ``ops.sigmoid_focal_loss`` algorithm, for where torchvision cannot be imported.

torchvision's Linux wheels need a matching (CUDA) torch, so next to a CPU-only torch from PyPI
the package does not import. This is its algorithm, written from its documentation: in
probability space and in the input's precision, as torchvision computes it (so that a benchmark
times the same work):

1. ``p = sigmoid(inputs)``, ``ce = binary_cross_entropy_with_logits(inputs, targets)``;
2. ``p_t = p * targets + (1 - p) * (1 - targets)``, ``loss = ce * (1 - p_t) ** gamma``;
3. if ``alpha >= 0``: ``loss *= alpha * targets + (1 - alpha) * (1 - targets)``;
4. ``"none"``, ``"mean"`` or ``"sum"``.

The formula (not the algorithm) is ``focal_reference.sigmoid_focal``; the parity suite checks
both against values recorded from torchvision itself (``parity_tests/data``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0, reduction: str = "none") -> torch.Tensor:
  """torchvision's ``sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)``."""
  p = torch.sigmoid(inputs)
  ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  if reduction == "none":
    return loss
  if reduction == "mean":
    return loss.mean()
  if reduction == "sum":
    return loss.sum()
  raise ValueError(f"sigmoid_focal_loss: reduction must be 'none', 'mean' or 'sum', got "
                   f"{reduction!r}")
