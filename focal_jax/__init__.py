"""Focal losses in JAX: softmax (integer labels), sigmoid (binary / multi-label) and categorical
(probability targets), with closed-form gradients that stay finite at any logit margin."""

from focal_jax._categorical import categorical_focal
from focal_jax._linear import linear_softmax_focal
from focal_jax._sigmoid import sigmoid_focal
from focal_jax._softmax import softmax_focal

__all__ = ["categorical_focal", "linear_softmax_focal", "sigmoid_focal", "softmax_focal"]
