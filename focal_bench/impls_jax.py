"""JAX implementations: focal_jax against optax, each under ``jax.jit``.

Every runner computes ``jax.value_and_grad`` of the reduced loss (reduction mean) and blocks on
the result, so one ``run()`` is one forward + backward step as a training loop would jit it.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from focal_bench import problems as P
from focal_bench.implementation import (FLOOR, PEER, PROJECT, REFERENCE, Impl, Runner,
                                        Unavailable)


def prepare(problem: P.Problem, data: dict[str, np.ndarray]) -> dict[str, Any]:
  """Put the problem's arrays on JAX's default device: floats in ``problem.dtype``, int32 labels."""
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(problem.dtype)
  out = {}
  for name, value in data.items():
    if value.dtype.kind == "f":
      out[name] = jax.device_put(jnp.asarray(value, dtype=dtype))
    else:
      out[name] = jax.device_put(jnp.asarray(value, dtype=jnp.int32))
  return jax.block_until_ready(out)


def _focal(name: str) -> Callable:
  try:
    import focal_jax
  except ImportError as e:
    raise Unavailable(f"focal_jax does not import: {e}") from e
  fn = getattr(focal_jax, name, None)
  if fn is None:
    raise Unavailable(f"focal_jax.{name} does not exist yet")
  return fn


def _grad_runner(loss: Callable, args: tuple, argnums: int | tuple[int, ...] = 0,
                 donate: bool = False) -> Runner:
  """A runner for ``jit(value_and_grad(loss))(*args)``; ``donate`` donates ``args[0]``."""
  import jax
  import jax.numpy as jnp
  step = jax.jit(jax.value_and_grad(loss, argnums=argnums),
                 donate_argnums=(0,) if donate else ())
  if not donate:
    return Runner(run=lambda: jax.block_until_ready(step(*args)), jitted=(step, args))
  # A donated buffer is consumed by the call: each timed call gets a fresh copy, made untimed.
  pending: list = []

  def setup() -> None:
    pending.append(jax.block_until_ready(jnp.array(args[0], copy=True)))

  def run() -> None:
    jax.block_until_ready(step(pending.pop(), *args[1:]))

  return Runner(run=run, setup=setup, jitted=(step, args))


# --- softmax -------------------------------------------------------------------------------

def _focal_softmax(donate: bool) -> Callable:
  def build(problem: P.Problem, x: dict) -> Runner:
    fn = _focal("softmax_focal")

    def loss(z, y):
      return fn(z, y, gamma=P.GAMMA, reduction="mean")
    return _grad_runner(loss, (x["logits"], x["labels"]), donate=donate)
  return build


def _optax_ce(donate: bool) -> Callable:
  def build(problem: P.Problem, x: dict) -> Runner:
    import optax

    def loss(z, y):
      return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
    return _grad_runner(loss, (x["logits"], x["labels"]), donate=donate)
  return build


def _copy_floor(problem: P.Problem, x: dict) -> Runner:
  import jax
  # One read of the logits and one write of a fresh array of their size: the memory-traffic
  # floor of any fused forward + backward (the gradient has the logits' size).
  step = jax.jit(lambda z: z * 2)
  z = x["logits"]
  return Runner(run=lambda: jax.block_until_ready(step(z)), jitted=(step, (z,)))


# --- sigmoid -------------------------------------------------------------------------------

def _focal_sigmoid(problem: P.Problem, x: dict) -> Runner:
  fn = _focal("sigmoid_focal")

  def loss(z, y):
    return fn(z, y, alpha=P.SIGMOID_ALPHA, gamma=P.GAMMA, reduction="mean")
  return _grad_runner(loss, (x["logits"], x["labels"]))


def _optax_sigmoid_focal(problem: P.Problem, x: dict) -> Runner:
  import optax

  def loss(z, y):
    return optax.sigmoid_focal_loss(z, y, alpha=P.SIGMOID_ALPHA, gamma=P.GAMMA).mean()
  return _grad_runner(loss, (x["logits"], x["labels"]))


# --- categorical ---------------------------------------------------------------------------

def _focal_categorical(problem: P.Problem, x: dict) -> Runner:
  fn = _focal("categorical_focal")

  def loss(z, y):
    return fn(z, y, gamma=P.GAMMA, reduction="mean")
  return _grad_runner(loss, (x["logits"], x["targets"]))


def _optax_categorical_ce(problem: P.Problem, x: dict) -> Runner:
  import optax

  def loss(z, y):
    return optax.softmax_cross_entropy(z, y).mean()
  return _grad_runner(loss, (x["logits"], x["targets"]))


# --- linear --------------------------------------------------------------------------------

def _focal_linear(problem: P.Problem, x: dict) -> Runner:
  fn = _focal("linear_softmax_focal")

  def loss(hidden, kernel, y):
    return fn(hidden, kernel, y, gamma=P.GAMMA, reduction="mean")
  return _grad_runner(loss, (x["hidden"], x["kernel"], x["labels"]), argnums=(0, 1))


def _materialized_linear(problem: P.Problem, x: dict) -> Runner:
  fn = _focal("softmax_focal")

  def loss(hidden, kernel, y):
    return fn(hidden @ kernel, y, gamma=P.GAMMA, reduction="mean")
  return _grad_runner(loss, (x["hidden"], x["kernel"], x["labels"]), argnums=(0, 1))


def _materialized_linear_ce(problem: P.Problem, x: dict) -> Runner:
  import optax

  def loss(hidden, kernel, y):
    return optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, y).mean()
  return _grad_runner(loss, (x["hidden"], x["kernel"], x["labels"]), argnums=(0, 1))


IMPLS: list[Impl] = [
    Impl("jax_focal", "focal_jax.softmax_focal", "jax", "softmax", PROJECT,
         _focal_softmax(donate=False), ref="jax_optax_ce", vs_deepspeed=True),
    Impl("jax_optax_ce", "optax CE (integer labels)", "jax", "softmax", REFERENCE,
         _optax_ce(donate=False), vs_deepspeed=True),
    Impl("jax_focal_donate", "focal_jax.softmax_focal, donated logits", "jax", "softmax",
         PROJECT, _focal_softmax(donate=True), ref="jax_optax_ce_donate", vs_deepspeed=True,
         note="jit(..., donate_argnums=0): the gradient may reuse the logits' buffer"),
    Impl("jax_optax_ce_donate", "optax CE, donated logits", "jax", "softmax", REFERENCE,
         _optax_ce(donate=True), vs_deepspeed=True),
    Impl("jax_copy", "copy floor (z * 2)", "jax", "softmax", FLOOR, _copy_floor),
    Impl("jax_sigmoid_focal", "focal_jax.sigmoid_focal", "jax", "sigmoid", PROJECT,
         _focal_sigmoid, ref="jax_optax_sigmoid_focal"),
    Impl("jax_optax_sigmoid_focal", "optax.sigmoid_focal_loss", "jax", "sigmoid", REFERENCE,
         _optax_sigmoid_focal),
    Impl("jax_categorical_focal", "focal_jax.categorical_focal", "jax", "categorical", PROJECT,
         _focal_categorical, ref="jax_optax_categorical_ce"),
    Impl("jax_optax_categorical_ce", "optax CE (probability targets)", "jax", "categorical",
         REFERENCE, _optax_categorical_ce, note="optax.softmax_cross_entropy"),
    Impl("jax_linear_focal", "focal_jax.linear_softmax_focal", "jax", "linear", PROJECT,
         _focal_linear, ref="jax_linear_materialized"),
    Impl("jax_linear_materialized", "softmax_focal(hidden @ kernel)", "jax", "linear", REFERENCE,
         _materialized_linear),
    Impl("jax_linear_materialized_ce", "optax CE(hidden @ kernel)", "jax", "linear", PEER,
         _materialized_linear_ce, note="context: the materialized cross-entropy"),
]
