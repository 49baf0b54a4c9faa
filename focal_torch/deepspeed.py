"""A drop-in for DeepSpeed's BingBert ``FocalLoss`` (DeepSpeedExamples,
``training/bing_bert/turing/loss.py``), computed in log space.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from focal_torch import _checks
from focal_torch import _softmax

__all__ = ["FocalLoss"]


class FocalLoss(nn.Module):
  r"""Same constructor, forward and numbers as DeepSpeed's ``FocalLoss``, without its
  overflows.

  .. math::  \ell = -\alpha_t (1 - p_t)^\gamma \log p_t, \quad p = \mathrm{softmax}(z)

  averaged (``size_average=True``) or summed over the batch. The loss and gradient equal
  DeepSpeed's wherever DeepSpeed's are finite. Where they are not, this stays finite and
  equals the float64 value: a wrong prediction by a float32 margin beyond about 89 (DeepSpeed:
  NaN gradient, then an infinite loss from about 104), and ``0 < gamma < 1`` once ``p_t``
  rounds to 1 (DeepSpeed: NaN gradient). Half-precision inputs are computed in float32 and
  the loss is returned in float32, as DeepSpeed returns it.

  Divergence (documented): ``alpha`` of shape ``(C,)`` is a per-class weight here, as
  ``(C, 1)`` is in both. DeepSpeed broadcasts a ``(C,)`` ``alpha[targets]`` against the
  ``(N, 1)`` focal term into an ``N x N`` matrix, so its mean is
  ``mean(alpha_t) * mean(focal term)`` instead of ``mean(alpha_t * focal term)``.

  For more than ``(N, C)`` logits, ignored labels, smoothing or per-class gamma, use
  :func:`focal_torch.softmax_focal`.

  Args:
    class_num: the number of classes ``C``.
    alpha: None (all ones, stored as ``(C, 1)`` like DeepSpeed), or class weights of shape
      ``(C, 1)`` or ``(C,)`` (a tensor or anything ``torch.as_tensor`` takes). Stored as the
      non-persistent buffer ``alpha``: it follows ``.to()``/``.double()`` and, as in
      DeepSpeed (a plain attribute there), is not part of ``state_dict``.
    gamma: the focusing exponent, ``>= 0``.
    size_average: mean over the batch if True, else sum.

  Raises:
    TypeError, ValueError: a non-integer or non-positive ``class_num``; ``alpha`` of another
      shape; ``gamma < 0``; in ``forward``, inputs not ``(N, class_num)``, targets not ``N``
      integers, or a target outside ``[0, C)``.

  Shape:
    - inputs: ``(N, C)`` logits; targets: ``(N,)`` (or ``(N, 1)``) class indices.
    - output: a scalar (float32 for half inputs, else the inputs' dtype).

  Examples:
    >>> loss_fn = focal_torch.FocalLoss(class_num=3, gamma=2)
    >>> loss = loss_fn(torch.randn(8, 3), torch.randint(0, 3, (8,)))
  """

  alpha: torch.Tensor

  def __init__(self, class_num: int, alpha: Any = None, gamma: float = 2,
               size_average: bool = True) -> None:
    super().__init__()
    fn = "FocalLoss"
    if isinstance(class_num, bool) or not isinstance(class_num, numbers.Integral):
      raise TypeError(f"{fn}: class_num must be an int, got {type(class_num).__name__}")
    if class_num < 1:
      raise ValueError(f"{fn}: class_num must be >= 1, got {class_num}")
    if alpha is None:
      alpha = torch.ones(class_num, 1)
    else:
      alpha = torch.as_tensor(alpha).detach()
      if not alpha.is_floating_point():
        alpha = alpha.to(torch.float32)
      if tuple(alpha.shape) not in ((class_num, 1), (class_num,)):
        raise ValueError(f"{fn}: alpha must have shape ({class_num}, 1) or ({class_num},) "
                         f"(class_num={class_num}), got {_checks.shape_str(alpha.shape)}")
    gamma = _checks.class_param(fn, "gamma", gamma, None, allow_none=False)
    if not isinstance(gamma, float):
      raise TypeError(f"{fn}: gamma must be a number, got a tensor")
    if not isinstance(size_average, bool):
      raise TypeError(f"{fn}: size_average must be a bool, got {type(size_average).__name__}")
    self.register_buffer("alpha", alpha, persistent=False)
    self.gamma = gamma
    self.class_num = int(class_num)
    self.size_average = size_average

  def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    fn = "FocalLoss"
    _checks.floating_array(fn, "inputs", inputs)
    if inputs.ndim != 2 or inputs.shape[1] != self.class_num:
      raise ValueError(
          f"{fn}: inputs must have shape (N, class_num) = (N, {self.class_num}), got "
          f"{_checks.shape_str(inputs.shape)}; use focal_torch.softmax_focal for other shapes")
    if not isinstance(targets, torch.Tensor):
      raise TypeError(f"{fn}: targets must be a torch.Tensor, got {type(targets).__name__}")
    n = inputs.shape[0]
    if tuple(targets.shape) not in ((n,), (n, 1)):
      raise ValueError(f"{fn}: targets must have shape ({n},) or ({n}, 1) for inputs of "
                       f"shape {_checks.shape_str(inputs.shape)}, got "
                       f"{_checks.shape_str(targets.shape)}")
    return _softmax.softmax_focal_with_options(
        fn, inputs, targets.reshape(n), alpha=self.alpha.reshape(-1), gamma=self.gamma,
        label_smoothing=0.0, reduction="mean" if self.size_average else "sum", where=None,
        ignore_index=None, background_class=0, dim=1, process_group=None,
        out_dtype=torch.promote_types(inputs.dtype, torch.float32))

  def extra_repr(self) -> str:
    return f"class_num={self.class_num}, gamma={self.gamma}, size_average={self.size_average}"
