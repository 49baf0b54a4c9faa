"""Focal losses for PyTorch: the functional API.

The functions mirror ``focal_jax`` (same names, same keywords, same numbers) with torch's
conventions: the class axis is ``dim`` (default 1, like ``F.cross_entropy``), the default
reduction is ``"mean"`` and softmax labels equal to ``ignore_index`` (default -100) are left
out. Math runs in float32 (float64 stays float64); the result has the logits' dtype.
"""

from __future__ import annotations

from focal_torch._categorical import categorical_focal
from focal_torch._linear import linear_softmax_focal
from focal_torch._sigmoid import sigmoid_focal
from focal_torch._softmax import softmax_focal

__all__ = ["softmax_focal", "sigmoid_focal", "categorical_focal", "linear_softmax_focal"]

# The functions live next to their autograd.Functions; doctest skips names imported from other
# modules, so their docstring examples are listed here (tests/focal_torch/test_doctests.py).
__test__ = {"softmax_focal": softmax_focal, "sigmoid_focal": sigmoid_focal,
            "categorical_focal": categorical_focal}
