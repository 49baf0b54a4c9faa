"""An independent reference of DeepSpeed's BingBert ``FocalLoss``.

Written from the algorithm's description in the design contract (DeepSpeedExamples,
``training/bing_bert/turing/loss.py``), not copied from it:

1. ``P = softmax(inputs)`` along the dimension torch's legacy implicit rule picks when
   ``F.softmax`` is called with no ``dim`` (dim 1 for 2-D input);
2. a one-hot mask of the targets built with ``scatter_`` in the input's dtype;
3. ``probs = (P * mask).sum(1).view(-1, 1)`` and ``log_p = probs.log()``;
4. ``batch_loss = -alpha[targets] * (1 - probs) ** gamma * log_p``;
5. ``batch_loss.mean()`` (``size_average=True``) or ``batch_loss.sum()``.

Every quirk of the real module follows from these steps and is kept on purpose:

- ``alpha`` defaults to ``ones(class_num, 1)`` (float32), so ``alpha[targets]`` is ``(N, 1)`` and
  the weighting is per class. A 1-D ``(C,)`` alpha gives ``alpha[targets]`` of shape ``(N,)``,
  which broadcasts against the ``(N, 1)`` focal term into an ``N x N`` matrix: the mean is then
  ``mean(alpha_t) * mean(f)`` instead of ``mean(alpha_t * f)``.
- ``probs`` is a probability, not a log-probability: in float32 it underflows to 0 for a wrong
  prediction by a margin of about 104 (``log`` gives ``inf``) and its gradient is NaN from
  about 89; for ``0 < gamma < 1`` the derivative of ``(1 - probs) ** gamma`` is infinite once
  ``probs`` rounds to 1 (NaN gradients).
- half-precision inputs are soft-maxed and logged in half precision; the float32 alpha
  promotes the product to float32.

``parity_tests/test_deepspeed_oracle.py`` checks this module against the 42 cases recorded from
the real module (``parity_tests/data/deepspeed_focal_loss.npz``): loss and gradient, and the
same non-finite entries where the real module overflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_softmax_dim(ndim: int) -> int:
  """The dimension ``F.softmax(x)`` (no ``dim``) uses: 0 for 0-, 1- and 3-D input, else 1."""
  return 0 if ndim in (0, 1, 3) else 1


def deepspeed_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: torch.Tensor,
    gamma: float,
    size_average: bool,
) -> torch.Tensor:
  """The DeepSpeed focal loss as a function; ``alpha`` as the module stores it."""
  n, c = inputs.size(0), inputs.size(1)
  # The legacy implicit-dim softmax, with its dim spelled out (same numbers, no warning).
  probs_all = F.softmax(inputs, dim=implicit_softmax_dim(inputs.dim()))
  mask = inputs.new_zeros(n, c)
  ids = targets.view(-1, 1)
  mask.scatter_(1, ids, 1.0)
  alpha_t = alpha.to(inputs.device)[ids.view(-1)]
  probs = (probs_all * mask).sum(1).view(-1, 1)
  log_p = probs.log()
  batch_loss = -alpha_t * torch.pow(1 - probs, gamma) * log_p
  return batch_loss.mean() if size_average else batch_loss.sum()


class DeepSpeedFocalLoss(torch.nn.Module):
  """Behaves as DeepSpeed's BingBert ``FocalLoss`` (same constructor, same forward).

  Args:
    class_num: number of classes C.
    alpha: None (``ones(class_num, 1)``), or a tensor used as given: ``(C, 1)`` weighs per
      class; ``(C,)`` reproduces DeepSpeed's ``N x N`` broadcast.
    gamma: the focusing exponent.
    size_average: mean over the batch if True, else sum.

  Shape:
    Input: ``(N, C)`` logits and ``(N,)`` integer targets. Output: a scalar.
  """

  def __init__(self, class_num: int, alpha=None, gamma=2, size_average: bool = True):
    super().__init__()
    if alpha is None:
      alpha = torch.ones(class_num, 1)
    elif not isinstance(alpha, torch.Tensor):
      alpha = torch.as_tensor(alpha)
    self.alpha = alpha
    self.gamma = gamma
    self.class_num = class_num
    self.size_average = size_average

  def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return deepspeed_focal_loss(inputs, targets, self.alpha, self.gamma, self.size_average)
