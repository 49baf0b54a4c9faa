"""Focal losses for PyTorch: the mirror of ``focal_jax``, plus a DeepSpeed ``FocalLoss``
drop-in. Same names, keywords and numbers as ``focal_jax``, with torch's conventions
(``dim=1``, ``reduction="mean"``, ``ignore_index=-100``)."""

from focal_torch._checks import value_checks
from focal_torch.deepspeed import FocalLoss
from focal_torch.functional import categorical_focal
from focal_torch.functional import linear_softmax_focal
from focal_torch.functional import sigmoid_focal
from focal_torch.functional import softmax_focal
from focal_torch.modules import CategoricalFocalLoss
from focal_torch.modules import SigmoidFocalLoss
from focal_torch.modules import SoftmaxFocalLoss

__all__ = [
    "CategoricalFocalLoss",
    "FocalLoss",
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
    "categorical_focal",
    "linear_softmax_focal",
    "sigmoid_focal",
    "softmax_focal",
    "value_checks",
]
