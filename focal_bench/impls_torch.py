"""torch implementations: focal_torch against F.cross_entropy, torchvision's sigmoid focal loss
and the DeepSpeed algorithm, eager and under ``torch.compile``.

Every runner computes the reduced loss (reduction mean) and ``torch.autograd.grad`` of it with
respect to the logits (linear mode: the hidden states and the weight), then synchronizes the
device, so one ``run()`` is one forward + backward step.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from focal_bench import problems as P
from focal_bench.implementation import (DEEPSPEED, FLOOR, PEER, PROJECT, REFERENCE, Impl,
                                        Runner, Unavailable)


def device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def prepare(problem: P.Problem, data: dict[str, np.ndarray]) -> dict[str, Any]:
  """The problem's tensors on torch's device: floats in ``problem.dtype`` (requiring grad where
  the step differentiates), int64 labels; linear mode adds ``weight`` = kernel.T, (V, H)."""
  import torch
  import torch._dynamo
  # Each shape compiles its own static graph; forget the previous shapes' graphs.
  torch._dynamo.reset()
  dtype = getattr(torch, problem.dtype)
  dev = device()
  out: dict[str, Any] = {}
  for name, value in data.items():
    t = torch.from_numpy(value).to(dev)
    if t.is_floating_point():
      t = t.to(dtype)
    out[name] = t
  if problem.mode == "linear":
    out["weight"] = out.pop("kernel").t().contiguous().requires_grad_(True)
    out["hidden"].requires_grad_(True)
  else:
    out["logits"].requires_grad_(True)
  _sync()
  return out


def _sync() -> None:
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _focal(name: str) -> Callable:
  try:
    import focal_torch
  except ImportError as e:
    raise Unavailable(f"focal_torch does not import: {e}") from e
  fn = getattr(focal_torch, name, None)
  if fn is None:
    raise Unavailable(f"focal_torch.{name} does not exist yet")
  return fn


def _grad_runner(loss: Callable, args: tuple, wrt: tuple, compiled: bool) -> Runner:
  """A runner for ``autograd.grad(loss(*args), wrt)``; ``compiled`` wraps ``loss`` in
  ``torch.compile(dynamic=False)`` (a static graph per shape, as a fixed-shape training loop
  gets)."""
  import torch
  if compiled:
    loss = torch.compile(loss, dynamic=False)

  def run() -> None:
    value = loss(*args)
    torch.autograd.grad(value, wrt)
    _sync()

  return Runner(run=run)


# --- softmax -------------------------------------------------------------------------------

def _focal_mean(name: str, target: str, compiled: bool) -> Callable:
  """focal_torch.NAME(logits, x[target]) with gamma P.GAMMA, mean, its gradient in the logits."""
  def build(problem: P.Problem, x: dict) -> Runner:
    fn = _focal(name)

    def loss(z, y):
      return fn(z, y, gamma=P.GAMMA, reduction="mean")
    return _grad_runner(loss, (x["logits"], x[target]), (x["logits"],), compiled)
  return build


def _cross_entropy(target: str, compiled: bool) -> Callable:
  """F.cross_entropy(logits, x[target]): integer labels, or floating-point targets of the
  logits' shape (the probability form)."""
  def build(problem: P.Problem, x: dict) -> Runner:
    import torch.nn.functional as F

    def loss(z, y):
      return F.cross_entropy(z, y)
    return _grad_runner(loss, (x["logits"], x[target]), (x["logits"],), compiled)
  return build


def _deepspeed(problem: P.Problem, x: dict) -> Runner:
  try:
    from focal_reference.deepspeed import DeepSpeedFocalLoss
  except ImportError as e:
    raise Unavailable(f"focal_reference.deepspeed does not import: {e}") from e
  module = DeepSpeedFocalLoss(problem.c, gamma=P.GAMMA, size_average=True)
  return _grad_runner(module, (x["logits"], x["labels"]), (x["logits"],), compiled=False)


def _liger_ce(problem: P.Problem, x: dict) -> Runner:
  """Liger-Kernel's cross-entropy (Triton: CUDA only). It writes the gradient into its input
  during the forward pass, so each call gets a fresh copy of the logits, made untimed."""
  import torch
  if not torch.cuda.is_available():
    raise Unavailable("Liger-Kernel's cross-entropy runs on CUDA only")
  try:
    from liger_kernel.transformers import LigerCrossEntropyLoss
  except ImportError as e:
    raise Unavailable(f"liger_kernel does not import ({e}); pip install liger-kernel") from e
  loss_fn = LigerCrossEntropyLoss()
  pending: list = []

  def setup() -> None:
    pending.append(x["logits"].detach().clone().requires_grad_(True))
    _sync()

  def run() -> None:
    z = pending.pop()
    torch.autograd.grad(loss_fn(z, x["labels"]), (z,))
    _sync()
  return Runner(run=run, setup=setup)


def _copy_floor(problem: P.Problem, x: dict) -> Runner:
  import torch
  z = x["logits"].detach()

  def run() -> None:
    # One read of the logits and one write of a fresh tensor of their size.
    with torch.no_grad():
      z * 2
    _sync()
  return Runner(run=run)


# --- sigmoid -------------------------------------------------------------------------------

def _focal_sigmoid(compiled: bool) -> Callable:
  def build(problem: P.Problem, x: dict) -> Runner:
    fn = _focal("sigmoid_focal")

    def loss(z, y):
      return fn(z, y, alpha=P.SIGMOID_ALPHA, gamma=P.GAMMA, reduction="mean")
    return _grad_runner(loss, (x["logits"], x["labels"]), (x["logits"],), compiled)
  return build


def torchvision_sigmoid_focal() -> tuple[Callable, str]:
  """torchvision's own function where it imports, else its algorithm as written out in
  ``focal_reference.torchvision``; and which it is."""
  try:
    from torchvision.ops import sigmoid_focal_loss
    source = "torchvision.ops.sigmoid_focal_loss"
  except Exception:  # not installed, or a build that does not match this torch
    from focal_reference.torchvision import sigmoid_focal_loss
    source = "focal_reference.torchvision (torchvision not importable)"

  def fn(logits, targets, alpha: float, gamma: float):
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
  return fn, source


def _torchvision(compiled: bool) -> Callable:
  def build(problem: P.Problem, x: dict) -> Runner:
    fn, _ = torchvision_sigmoid_focal()

    def loss(z, y):
      return fn(z, y, alpha=P.SIGMOID_ALPHA, gamma=P.GAMMA)
    return _grad_runner(loss, (x["logits"], x["labels"]), (x["logits"],), compiled)
  return build


# --- linear --------------------------------------------------------------------------------

def _focal_linear(problem: P.Problem, x: dict) -> Runner:
  fn = _focal("linear_softmax_focal")

  def loss(hidden, weight, y):
    return fn(hidden, weight, y, gamma=P.GAMMA, reduction="mean")
  return _grad_runner(loss, (x["hidden"], x["weight"], x["labels"]),
                      (x["hidden"], x["weight"]), compiled=False)


def _materialized_linear(problem: P.Problem, x: dict) -> Runner:
  import torch.nn.functional as F
  fn = _focal("softmax_focal")

  def loss(hidden, weight, y):
    return fn(F.linear(hidden, weight), y, gamma=P.GAMMA, reduction="mean")
  return _grad_runner(loss, (x["hidden"], x["weight"], x["labels"]),
                      (x["hidden"], x["weight"]), compiled=False)


def _materialized_linear_ce(problem: P.Problem, x: dict) -> Runner:
  import torch.nn.functional as F

  def loss(hidden, weight, y):
    return F.cross_entropy(F.linear(hidden, weight), y)
  return _grad_runner(loss, (x["hidden"], x["weight"], x["labels"]),
                      (x["hidden"], x["weight"]), compiled=False)


def _liger() -> Callable:
  """Liger-Kernel's fused linear cross-entropy (Triton: CUDA only), or Unavailable."""
  import torch
  if not torch.cuda.is_available():
    raise Unavailable("Liger-Kernel's fused linear cross-entropy runs on CUDA only")
  try:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
  except ImportError as e:
    raise Unavailable(f"liger_kernel does not import ({e}); pip install liger-kernel") from e
  return LigerFusedLinearCrossEntropyLoss()


def _liger_linear_ce(problem: P.Problem, x: dict) -> Runner:
  loss_fn = _liger()

  def loss(hidden, weight, y):
    return loss_fn(weight, hidden, y)
  return _grad_runner(loss, (x["hidden"], x["weight"], x["labels"]),
                      (x["hidden"], x["weight"]), compiled=False)


def _focal_linear_gamma0(problem: P.Problem, x: dict) -> Runner:
  _liger()  # only measured beside Liger, which it is compared with
  fn = _focal("linear_softmax_focal")

  def loss(hidden, weight, y):
    return fn(hidden, weight, y, gamma=0.0, reduction="mean")
  return _grad_runner(loss, (x["hidden"], x["weight"], x["labels"]),
                      (x["hidden"], x["weight"]), compiled=False)


IMPLS: list[Impl] = [
    Impl("torch_focal", "focal_torch.softmax_focal", "torch", "softmax", PROJECT,
         _focal_mean("softmax_focal", "labels", compiled=False), ref="torch_ce",
         vs_deepspeed=True),
    Impl("torch_ce", "F.cross_entropy", "torch", "softmax", REFERENCE,
         _cross_entropy("labels", compiled=False), vs_deepspeed=True),
    Impl("torch_focal_compiled", "focal_torch.softmax_focal, compiled", "torch", "softmax",
         PROJECT, _focal_mean("softmax_focal", "labels", compiled=True),
         ref="torch_ce_compiled", vs_deepspeed=True, compiled=True),
    Impl("torch_ce_compiled", "F.cross_entropy, compiled", "torch", "softmax", REFERENCE,
         _cross_entropy("labels", compiled=True), vs_deepspeed=True, compiled=True),
    Impl("torch_deepspeed", "DeepSpeed FocalLoss algorithm", "torch", "softmax", DEEPSPEED,
         _deepspeed, note="focal_reference.deepspeed.DeepSpeedFocalLoss, eager"),
    Impl("torch_liger_ce", "Liger cross-entropy", "torch", "softmax", PEER, _liger_ce,
         vs_deepspeed=True, note="liger_kernel.transformers.LigerCrossEntropyLoss (CUDA only)"),
    Impl("torch_copy", "copy floor (z * 2)", "torch", "softmax", FLOOR, _copy_floor),
    Impl("torch_sigmoid_focal", "focal_torch.sigmoid_focal", "torch", "sigmoid", PROJECT,
         _focal_sigmoid(compiled=False), ref="torch_torchvision"),
    Impl("torch_torchvision", "torchvision sigmoid focal", "torch", "sigmoid", REFERENCE,
         _torchvision(compiled=False)),
    Impl("torch_sigmoid_focal_compiled", "focal_torch.sigmoid_focal, compiled", "torch",
         "sigmoid", PROJECT, _focal_sigmoid(compiled=True), ref="torch_torchvision_compiled",
         compiled=True),
    Impl("torch_torchvision_compiled", "torchvision sigmoid focal, compiled", "torch", "sigmoid",
         REFERENCE, _torchvision(compiled=True), compiled=True),
    Impl("torch_categorical_focal", "focal_torch.categorical_focal", "torch", "categorical",
         PROJECT, _focal_mean("categorical_focal", "targets", compiled=False),
         ref="torch_ce_probs"),
    Impl("torch_ce_probs", "F.cross_entropy (probability targets)", "torch", "categorical",
         REFERENCE, _cross_entropy("targets", compiled=False)),
    Impl("torch_categorical_focal_compiled", "focal_torch.categorical_focal, compiled", "torch",
         "categorical", PROJECT, _focal_mean("categorical_focal", "targets", compiled=True),
         ref="torch_ce_probs_compiled", compiled=True),
    Impl("torch_ce_probs_compiled", "F.cross_entropy (probability targets), compiled", "torch",
         "categorical", REFERENCE, _cross_entropy("targets", compiled=True), compiled=True),
    Impl("torch_linear_focal", "focal_torch.linear_softmax_focal", "torch", "linear", PROJECT,
         _focal_linear, ref="torch_linear_materialized"),
    Impl("torch_linear_materialized", "softmax_focal(F.linear(hidden, weight))", "torch", "linear",
         REFERENCE, _materialized_linear),
    Impl("torch_linear_materialized_ce", "F.cross_entropy(F.linear(hidden, weight))", "torch",
         "linear", PEER, _materialized_linear_ce, note="context: the materialized cross-entropy"),
    Impl("torch_linear_focal_gamma0", "focal_torch.linear_softmax_focal, gamma 0", "torch",
         "linear", PEER, _focal_linear_gamma0, ref="torch_linear_liger_ce",
         note="gamma 0 is cross-entropy: the same loss as Liger's (CUDA only)"),
    Impl("torch_linear_liger_ce", "Liger fused linear cross-entropy", "torch", "linear", PEER,
         _liger_linear_ce, note="liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss"),
]
