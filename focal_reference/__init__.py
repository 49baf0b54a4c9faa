"""focal_reference: the float64 reference formulas of the focal losses, written once.

Everything that checks ``focal_jax`` or ``focal_torch`` measures it against this package: the
unit tests (``tests/``), the parity suite (``parity_tests``) and the benchmarks
(``focal_bench``). It shares no code with either library, and the dependency runs one way::

    focal_jax, focal_torch  <-  focal_reference  <-  tests, parity_tests, focal_bench

(the arrow points from what is used to its user; ``focal_reference`` imports neither library).

- ``softmax_focal``, ``sigmoid_focal``, ``categorical_focal``, ``reduce``, ``log_softmax``:
  the formulas of docs/design.md, evaluated in NumPy, ``jax.numpy`` or torch according to the
  type of the logits (float64 unless told otherwise), so one copy gives NumPy values, JAX
  autodiff and torch autograd;
- ``focal_reference.deepspeed``: an independent oracle of DeepSpeed's BingBert ``FocalLoss``
  algorithm, quirks included (torch);
- ``focal_reference.torchvision``: torchvision's ``sigmoid_focal_loss`` algorithm (torch), for
  where torchvision cannot be imported.

Importing the package needs NumPy only; the two torch submodules import torch.
"""

from focal_reference._formulas import (FUNCTIONS, REDUCTIONS, categorical_focal, log_softmax,
                                       reduce, sigmoid_focal, softmax_focal)

__all__ = ["FUNCTIONS", "REDUCTIONS", "categorical_focal", "log_softmax", "reduce",
           "sigmoid_focal", "softmax_focal"]
