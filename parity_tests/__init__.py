"""parity_tests: proof that focal_jax and focal_torch compute the same focal losses and
gradients, and that both agree with DeepSpeed's ``FocalLoss`` and with trusted libraries.

It is both a pytest suite (``pytest parity_tests``) and a report (``python -m parity_tests``,
also ``focal-parity``). Both use the same comparison code:

- ``cases``: a ``Case`` (one call) and its inputs; the ONE kwargs dict for both packages;
- the truth is ``focal_reference`` (float64 formulas, the DeepSpeed oracle), shared with the
  unit tests and the benchmarks;
- ``compare``: runners (JAX, torch, reference) and ``measure`` (errors vs tolerance);
- ``tolerances``: per-dtype tolerances and how they are derived from float64 (``derive``
  measures them);
- ``deepspeed_checks``: recorded DeepSpeed values, the oracle, the documented divergences;
- ``anchors``: torchvision (recorded), optax, torch / optax cross-entropy, imbalanced-losses;
- ``golden``: loaders for ``data/*.npz``; ``grid``: the report's configurations;
- ``report``: the command line.
"""
